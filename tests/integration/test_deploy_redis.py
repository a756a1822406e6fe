"""deploy/redis: the ACL file and start-redis.sh against a real redis-server.

The ACL file is loaded into a server started on a free port and exercised with the same
client library the engine uses: each user may do what its role needs and nothing else;
start-redis.sh renders hashed passwords that the server accepts.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
ACL_FILE = REPO / "deploy" / "redis" / "users.acl"
START_REDIS = REPO / "deploy" / "redis" / "start-redis.sh"
PREFIX = "app:"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_redis(
    argv: list[str],
    *,
    port: int,
    log: Path,
    ready: Callable[[], bool],
    env: Mapping[str, str] | None = None,
    timeout_s: float = 15.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a Redis process, wait until `ready()` is true, and always stop it."""
    redis = pytest.importorskip("redis")
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"redis exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if ready():
                    break
            except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"redis on port {port} not ready in {timeout_s}s")
            time.sleep(0.05)  # sync-ok: poll interval inside a deadline loop
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def server_args(port: int, directory: Path) -> list[str]:
    """A throwaway server: loopback only, no persistence."""
    return [
        *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory)),
        *("--save", "", "--appendonly", "no"),
    ]


def client(port: int, user: str | None = None, password: str | None = None) -> Any:
    redis = pytest.importorskip("redis")
    return redis.Redis(
        host="127.0.0.1",
        port=port,
        username=user,
        password=password,
        socket_timeout=5,
        socket_connect_timeout=1,
        # Fail fast: the readiness loop and the assertions do their own retrying.
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
    )


def ping_as(port: int, user: str, password: str) -> Callable[[], bool]:
    def ready() -> bool:
        with client(port, user, password) as conn:
            return bool(conn.ping())

    return ready


redis_server_required = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not on PATH"
)


def local_version() -> tuple[int, int] | None:
    """The version of the redis-server on PATH, or None when it cannot be read."""
    found = re.search(
        r" v=(\d+)\.(\d+)\.",
        subprocess.run(
            [shutil.which("redis-server") or "redis-server", "--version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout,
    )
    return None if found is None else (int(found.group(1)), int(found.group(2)))


def acl_for_local_redis(acl: str) -> str:
    """The ACL as start-redis.sh renders it for the redis-server on PATH: CLIENT SETINFO
    exists from Redis 7.2 on and FCALL_RO from 7.0, and older servers refuse an ACL file that
    names them."""
    version = local_version()
    if version is None or version < (7, 2):
        acl = acl.replace(" +client|setinfo", "")
    if version is None or version < (7, 0):
        acl = acl.replace(" +fcall_ro", "")
    return acl


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """A real redis-server loaded with a copy of users.acl (placeholders replaced)."""
    passwords = {"replicator": secrets.token_hex(16), "engine": secrets.token_hex(16)}
    acl = acl_for_local_redis(ACL_FILE.read_text(encoding="utf-8"))
    acl = acl.replace(">CHANGE_ME_REPLICATOR", ">" + passwords["replicator"])
    acl = acl.replace(">CHANGE_ME_ENGINE", ">" + passwords["engine"])
    acl_copy = tmp_path / "users.acl"
    acl_copy.write_text(acl, encoding="utf-8")
    port = free_port()
    argv = [shutil.which("redis-server") or "redis-server", *server_args(port, tmp_path)]
    argv += ["--aclfile", str(acl_copy)]
    ready = ping_as(port, "engine", passwords["engine"])
    with running_redis(argv, port=port, log=tmp_path / "redis.log", ready=ready):
        yield port, passwords


@redis_server_required
def test_acl_against_real_redis(acl_server: tuple[int, dict[str, str]]) -> None:
    redis = pytest.importorskip("redis")
    nopermission = redis.exceptions.NoPermissionError
    port, passwords = acl_server
    stream, item, tree = f"{PREFIX}{{0}}cdc", f"{PREFIX}{{0}}item:k1", f"{PREFIX}{{0}}mk:0"

    with client(port, "engine", passwords["engine"]) as engine:
        # What the local engine does: atomic scripts, writes under the prefix,
        # memory checks for backpressure.
        engine.hset(item, mapping={"data": "v1", "hash": "00" * 16})
        engine.hset(tree, mapping={"00": "ff" * 16})
        engine.set(f"{PREFIX}geometry", "256:2")
        stream_id = engine.xadd(stream, {"op": "PUT", "key": "k1"})
        sha = engine.script_load("return redis.call('HGET', KEYS[1], 'data')")
        assert engine.evalsha(sha, 1, item) == b"v1"
        assert engine.eval("return redis.call('TIME')[1]", 0)
        assert "used_memory" in engine.info("memory")
        if (local_version() or (0, 0)) >= (7, 0):
            # The engine loads the store's function library; the replicator calls its reads.
            from replication_engine.store import functions

            engine.function_load(functions.library_source(), replace=True)
        with pytest.raises(nopermission):
            engine.set("other:key", "x")
        with pytest.raises(nopermission):
            engine.flushall()
        with pytest.raises(nopermission):
            engine.config_get("maxmemory")
        with pytest.raises(nopermission):
            engine.keys("*")

    with client(port, "replicator", passwords["replicator"]) as reader:
        # Everything the peer reader needs works ...
        assert reader.ping()
        reader.execute_command("SELECT", 0)
        reader.client_setname("replication-engine.peer")
        assert reader.client_id() > 0
        assert [entry_id for entry_id, _ in reader.xrange(stream)] == [stream_id]
        assert reader.xrevrange(stream, count=1)[0][0] == stream_id
        assert reader.xread({stream: "0-0"}, count=10)
        assert reader.xlen(stream) == 1
        assert reader.xinfo_stream(stream)["length"] == 1
        assert reader.hgetall(item)[b"data"] == b"v1"
        assert reader.hmget(item, ["data", "hash"])[0] == b"v1"
        assert reader.hget(tree, "00") == b"ff" * 16
        assert reader.hscan(tree)[1]
        assert reader.get(f"{PREFIX}geometry") == b"256:2"
        assert reader.mget([f"{PREFIX}geometry"]) == [b"256:2"]
        assert reader.exists(item) == 1
        assert reader.type(item) == b"hash"
        if (local_version() or (0, 0)) >= (7, 0):
            # Many hashes in one call, through a function flagged no-writes, and only under the
            # prefix: Redis checks the calls inside against the replicator's own rules.
            (fields,) = reader.fcall_ro("re_hashes", 1, item)
            assert dict(zip(fields[::2], fields[1::2], strict=True))[b"data"] == b"v1"
            with pytest.raises(nopermission):
                reader.fcall_ro("re_hashes", 1, "other:{0}item:k1")
            with pytest.raises(nopermission):
                reader.fcall("re_hashes", 1, item)

        # ... and nothing that writes, runs code or leaves the prefix.
        denied: list[tuple[Any, ...]] = [
            ("HSET", item, "data", "v2"),
            ("XADD", stream, "*", "op", "PUT"),
            ("XTRIM", stream, "MAXLEN", "0"),
            ("XGROUP", "CREATE", stream, "g", "$"),
            ("DEL", item),
            ("SET", f"{PREFIX}x", "1"),
            ("EVAL", "return 1", "0"),
            ("EVALSHA", "0" * 40, "0"),
            ("SCRIPT", "LOAD", "return 1"),
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("CONFIG", "GET", "maxmemory"),
            ("INFO",),
            ("PUBLISH", f"{PREFIX}chan", "x"),
            ("HGETALL", "other:{0}item:k1"),
            ("XRANGE", "other:{0}cdc", "-", "+"),
            ("GET", "other"),
        ]
        for command in denied:
            with pytest.raises(nopermission):
                reader.execute_command(*command)
        assert reader.hgetall(item)[b"data"] == b"v1", "the item must be unchanged"

    with client(port) as anonymous:
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()


# ---------------------------------------------------------------------------
# start-redis.sh renders the ACL with hashed passwords
# ---------------------------------------------------------------------------


@redis_server_required
@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("sh", "sha256sum", "sed", "grep", "cut")),
    reason="needs a POSIX shell with coreutils",
)
def test_start_redis_script_renders_hashed_passwords(tmp_path: Path) -> None:
    redis = pytest.importorskip("redis")
    # Stand-in for the image's entrypoint: run the command as given.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    entrypoint = bin_dir / "docker-entrypoint.sh"
    entrypoint.write_text('#!/bin/sh\nexec "$@"\n', encoding="utf-8")
    entrypoint.chmod(0o755)

    # Characters that would break a naive sed substitution or shell quoting.
    passwords = {"replicator": "r/e&p l|i$c'a\"t\\or", "engine": secrets.token_urlsafe(24)}
    rendered = tmp_path / "rendered.acl"
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "REPLICATOR_PASSWORD": passwords["replicator"],
        "ENGINE_PASSWORD": passwords["engine"],
        "ACL_TEMPLATE": str(ACL_FILE),
        "ACL_RENDERED": str(rendered),
    }
    port = free_port()
    argv = ["sh", str(START_REDIS), *server_args(port, tmp_path)]
    ready = ping_as(port, "engine", passwords["engine"])
    with running_redis(argv, port=port, log=tmp_path / "redis.log", ready=ready, env=env):
        text = rendered.read_text(encoding="utf-8")
        assert "CHANGE_ME" not in text
        for password in passwords.values():
            assert password not in text, "plain passwords must not reach the disk"
        assert rendered.stat().st_mode & 0o077 == 0, "rendered ACL must be owner-only"
        with client(port, "replicator", passwords["replicator"]) as reader:
            assert reader.ping()
        with client(port, "replicator", "CHANGE_ME_REPLICATOR") as wrong:
            with pytest.raises(redis.exceptions.AuthenticationError):
                wrong.ping()
