"""The HTTP server itself, over real sockets: keep-alive, HEAD, and what it does with clients
that send too much, too little, too slowly, or too many at once.

The endpoints read a stand-in for the engine (the server only calls the four methods of
``Probed``; tests/integration/test_http.py reads them from a real engine).
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest

from replication_engine.observability import http
from replication_engine.observability.http import MAX_HEAD_BYTES, HttpServer
from replication_engine.testing import async_wait_until

# Every read in these tests is bounded: a server that fails to answer or to close fails the
# test instead of hanging it.
READ_TIMEOUT_S = 5.0


class Probe:
    """Answers as an engine would; ``broken`` makes /status raise, as a bug would."""

    state = "running"
    broken = False

    def readiness(self) -> tuple[bool, list[str]]:
        return True, ["peer b: lag 0 events"]

    def status(self) -> dict[str, Any]:
        if self.broken:
            raise RuntimeError("a bug in status()")
        return {"node_id": "a", "state": self.state}

    def render_metrics(self) -> bytes:
        return b"# TYPE up gauge\nup 1\n"


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    served = HttpServer(Probe(), "127.0.0.1", 0, head_timeout_sec=0.3, max_connections=3)
    await served.start()
    try:
        yield served
    finally:
        await served.stop()


async def connect(server: HttpServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One reply: status, headers (lower-case names) and the body its Content-Length says."""
    async with asyncio.timeout(READ_TIMEOUT_S):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:-2]:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        return status, headers, await reader.readexactly(int(headers["content-length"]))


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection (nothing more arrives, then EOF)."""
    async with asyncio.timeout(READ_TIMEOUT_S):
        return await reader.read() == b""


async def exchange(server: HttpServer, raw: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """Send raw bytes on a new connection: the reply, and whether the server then closed."""
    reader, writer = await connect(server)
    try:
        writer.write(raw)
        await writer.drain()
        status, headers, body = await read_reply(reader)
        return status, headers, body, await closed(reader)
    finally:
        writer.close()


async def test_a_kept_alive_connection_answers_one_request_after_another(
    server: HttpServer,
) -> None:
    reader, writer = await connect(server)
    try:
        for path, expected in (("/health", 200), ("/ready", 200), ("/nowhere", 404)):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, headers, body = await read_reply(reader)
            assert status == expected, (path, body)
            assert headers["connection"] == "keep-alive"
        writer.write(b"GET /status?verbose=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, headers, body = await read_reply(reader)
        assert status == 200 and headers["connection"] == "close"
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body) == {"node_id": "a", "state": "running"}
        assert await closed(reader), "Connection: close must end the connection"
    finally:
        writer.close()


async def test_http_1_0_gets_one_reply_unless_it_asks_to_keep_alive(server: HttpServer) -> None:
    status, _, body, ended = await exchange(server, b"GET /health HTTP/1.0\r\n\r\n")
    assert status == 200 and json.loads(body) == {"status": "ok", "state": "running"}
    assert ended
    reader, writer = await connect(server)
    try:
        writer.write(b"GET /metrics HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n" * 2)
        for _ in range(2):
            status, headers, body = await read_reply(reader)
            assert status == 200 and body == b"# TYPE up gauge\nup 1\n"
            assert headers["content-type"].startswith("text/plain")
    finally:
        writer.close()


async def test_head_says_the_length_of_the_body_it_leaves_out(server: HttpServer) -> None:
    reader, writer = await connect(server)
    try:
        # Pipelined: if HEAD sent a body, the GET's reply would not start where it is read.
        writer.write(
            b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        async with asyncio.timeout(READ_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 21\r\n" in head
        status, _, body = await read_reply(reader)
        assert (status, body) == (200, b"# TYPE up gauge\nup 1\n")
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to a plain port
        (b"GET /health\r\n\r\n", 400),
        (b"GET  /health HTTP/1.1\r\n\r\n", 400),
        (b"GET health HTTP/1.1\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost x\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nX: a\nY: b\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"GET /health HTTP/2.0\r\n\r\n", 505),
        (b"DELETE /health HTTP/1.1\r\n\r\n", 405),
        (b"GET /health HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 413),
        (b"GET /health HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 413),
        (b"GET /health HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 413),
        (b"GET /health HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 names its Host
        (b"GET /health HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", 400),
        (b"GET /health HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", 400),
    ],
)
async def test_a_refused_request_gets_its_status_and_a_closed_connection(
    server: HttpServer, raw: bytes, status: int
) -> None:
    got, headers, body, ended = await exchange(server, raw)
    assert got == status, body
    assert headers["connection"] == "close" and ended
    if status == 405:
        assert headers["allow"] == "GET, HEAD"


async def test_a_post_with_a_body_is_refused_without_reading_it(server: HttpServer) -> None:
    # The body would parse as a request of its own if the server read on after the head.
    smuggled = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
    raw = b"POST /ready HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled
    status, headers, _, ended = await exchange(server, raw)
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    assert ended, "the server answered what it found inside a request body"


async def test_a_head_larger_than_the_limit_is_refused(server: HttpServer) -> None:
    raw = b"GET /health HTTP/1.1\r\nX: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    status, _, _, ended = await exchange(server, raw)
    assert status == 431 and ended


async def test_a_client_that_stalls_mid_head_is_answered_408_and_dropped(
    server: HttpServer,
) -> None:
    reader, writer = await connect(server)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: ")  # and nothing more
        status, headers, _ = await read_reply(reader)
        assert status == 408 and headers["connection"] == "close"
        assert await closed(reader)
    finally:
        writer.close()


async def test_connections_past_the_limit_get_503_and_the_others_are_served(
    server: HttpServer,
) -> None:
    idle = [await connect(server) for _ in range(server.max_connections)]
    try:
        await async_wait_until(
            lambda: server.connections == server.max_connections,
            timeout=READ_TIMEOUT_S,
            message="every idle connection accepted",
        )
        status, _, body, ended = await exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503 and ended, body
        reader, writer = idle[0]
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_reply(reader))[0] == 200
    finally:
        for _, writer in idle:
            writer.close()


async def test_past_twice_the_limit_a_connection_is_closed_unanswered(
    server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The refused connections below stay open (they never close): a long linger keeps them
    # counted while the last one arrives.
    monkeypatch.setattr(http, "LINGER_SEC", 60.0)
    served = HttpServer(Probe(), "127.0.0.1", 0, head_timeout_sec=60.0, max_connections=2)
    await served.start()
    held = []
    try:
        for _ in range(4):
            held.append(await asyncio.open_connection("127.0.0.1", served.port))
        await async_wait_until(
            lambda: served.connections == 4, timeout=READ_TIMEOUT_S, message="4 connections held"
        )
        for reader, _ in held[2:]:
            assert (await read_reply(reader))[0] == 503
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        held.append((reader, writer))
        async with asyncio.timeout(READ_TIMEOUT_S):
            try:
                assert await reader.read() == b"", "a fifth connection got an answer"
            except ConnectionResetError:
                pass  # closed unanswered, as a reset
        assert served.connections == 4
    finally:
        for _, writer in held:
            writer.close()
        await served.stop()


async def test_a_failing_endpoint_answers_500_and_the_server_keeps_serving(
    server: HttpServer,
) -> None:
    probe = server.probed
    assert isinstance(probe, Probe)
    probe.broken = True
    status, _, body, _ = await exchange(server, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 500 and b"a bug" not in body, "the reply must not carry internals"
    probe.broken = False
    status, _, _, _ = await exchange(
        server, b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200


async def test_stop_ends_kept_alive_connections_instead_of_waiting_for_them() -> None:
    served = HttpServer(Probe(), "127.0.0.1", 0, head_timeout_sec=60.0)
    await served.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_reply(reader))[0] == 200
        async with asyncio.timeout(READ_TIMEOUT_S):  # far below the 60 s idle allowance
            await served.stop()
        assert await closed(reader)
        assert served.connections == 0
    finally:
        writer.close()


async def test_a_server_on_an_ipv6_address_is_reached_at_the_url_it_reports() -> None:
    served = HttpServer(Probe(), "::1", 0)
    try:
        await served.start()
    except OSError as exc:  # a host or container without IPv6 loopback
        pytest.skip(f"cannot listen on ::1 here: {exc}")
    try:
        assert served.url == f"http://[::1]:{served.port}"

        def fetch() -> tuple[int, bytes]:
            with urllib.request.urlopen(served.url + "/health", timeout=READ_TIMEOUT_S) as resp:
                return resp.status, resp.read()

        status, body = await asyncio.to_thread(fetch)
        assert status == 200 and json.loads(body)["status"] == "ok"
    finally:
        await served.stop()
