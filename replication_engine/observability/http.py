"""/health, /ready, /metrics and /status over HTTP/1.1, served on asyncio streams.

``/health`` answers whether the process is alive (a supervisor restarts it otherwise);
``/ready`` whether a load balancer should send it reads (replication is caught up within the
configured lag). Keeping the two apart stops a lagging node from being restarted in a loop.

Four GET endpoints do not need a web framework: aiohttp cost 0.15 s of the sidecar's 0.55 s
start-up (its import alone) and, with what it depends on, nine packages in the image. What a
framework did for us, this module does in the open: requests are bounded (a head of at most
``MAX_HEAD_BYTES``, sent within ``head_timeout_sec``), bodies are never read (a request that
announces one is answered and its connection closed, so no body is ever taken for the next
request), connections are bounded (``max_connections``; the next ones get a 503, and past twice
that many, a closed socket), and a client that stops reading its reply is dropped after the
same timeout. Anything the parser refuses is answered with a 4xx or 5xx status and the
connection closed: the server never guesses where a bad request ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

# Engine states in which the process is alive: a supervisor restarts it in any other.
ALIVE_STATES = ("starting", "running", "stopping")
# The request line and headers together (what curl, Prometheus and kubelet send is a few hundred
# bytes; aiohttp allowed 8 KiB per line).
MAX_HEAD_BYTES = 16 * 1024
# How long a client may take to send a request head, to read a reply, or to sit idle on a
# kept-alive connection.
HEAD_TIMEOUT_SEC = 10.0
# How long a refused request's connection is kept to let its reply reach the client.
LINGER_SEC = 1.0
# Open connections at once; a Prometheus server and a few probes use one or two each.
MAX_CONNECTIONS = 64
ALLOWED = "GET, HEAD"
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
# RFC 9110 token characters: a method and a header name are made of these alone.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")


@dataclass(frozen=True)
class Refusal:
    """A request refused before it reached an endpoint: the status to send, and why. Its
    connection is then closed."""

    status: int
    detail: str


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    keep_alive: bool


def parse_head(head: bytes) -> Request | Refusal:
    """A request's head (request line and headers, ending in an empty line) as a Request, or
    the Refusal to answer it with. Pure, so the fuzz target drives it with arbitrary bytes."""
    lines = head.split(b"\r\n")
    if len(lines) < 3 or lines[-1] != b"" or lines[-2] != b"":
        return Refusal(400, "a request head ends with an empty line (CRLF CRLF)")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return Refusal(400, "the request line is: method, target and version, one space apart")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        return Refusal(400, "the method is not a token")
    found = _VERSION.fullmatch(version)
    if found is None:
        return Refusal(400, "the version is not HTTP/<digit>.<digit>")
    if found.group(1) != b"1":
        return Refusal(505, "this server speaks HTTP/1.0 and HTTP/1.1")
    if not target.startswith(b"/") or any(c <= 0x20 or c == 0x7F for c in target):
        return Refusal(400, "the target is not a path (origin form: /path?query)")
    connection: set[bytes] = set()
    body = False
    hosts = 0
    for line in lines[1:-2]:
        if b"\r" in line or b"\n" in line or b"\0" in line:
            return Refusal(400, "a header line holds a bare CR, LF or NUL")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            return Refusal(400, "a header line is not name: value")
        name, value = name.lower(), value.strip(b" \t")
        if name == b"host":
            hosts += 1
        elif name == b"connection":
            connection.update(t.strip(b" \t").lower() for t in value.split(b","))
        elif name == b"transfer-encoding":
            body = True
        elif name == b"content-length":
            if not value.isdigit():
                return Refusal(400, "Content-Length is not a number")
            body = body or value.strip(b"0") != b""  # no int(): it refuses 5,000 digits
    if method not in (b"GET", b"HEAD"):
        return Refusal(405, f"only {ALLOWED} are served")
    if body:
        return Refusal(413, "these endpoints take no request body")
    minor = found.group(2)
    # RFC 9112 3.2: a server must refuse an HTTP/1.1 request without a Host, and any request
    # with more than one (proxies may disagree on which one counts).
    if hosts > 1:
        return Refusal(400, "a request has at most one Host header")
    if hosts == 0 and minor != b"0":
        return Refusal(400, "an HTTP/1.1 request names its Host")
    keep_alive = b"close" not in connection and (minor != b"0" or b"keep-alive" in connection)
    path = target.split(b"?", 1)[0].decode("ascii", "replace")
    return Request(method.decode("ascii"), path, keep_alive)


class Probed(Protocol):
    """What the endpoints read: the engine answers these, and nothing else of it is reachable
    from here (the server neither imports nor drives the engine)."""

    @property
    def state(self) -> str: ...

    def readiness(self) -> tuple[bool, list[str]]: ...

    def status(self) -> dict[str, Any]: ...

    def render_metrics(self) -> bytes: ...


class HttpServer:
    def __init__(
        self,
        probed: Probed,
        host: str,
        port: int,
        *,
        head_timeout_sec: float = HEAD_TIMEOUT_SEC,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.probed = probed
        self.host = host
        self.port = port
        self.head_timeout_sec = head_timeout_sec
        self.max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    @property
    def url(self) -> str:
        """Where to reach the server; an IPv6 address goes in brackets, as URLs write it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, limit=MAX_HEAD_BYTES
        )
        for sock in self._server.sockets:  # the real port when configured with port 0
            self.port = int(sock.getsockname()[1])
            break

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Kept-alive connections sit waiting for a next request: end them, do not wait them out.
        # Closing the transport ends each one's read (cancelling its task instead would make
        # asyncio log the cancellation as the callback's error).
        for writer in self._connections.values():
            writer.transport.abort()
        if self._connections:
            await asyncio.wait(self._connections)
        await self._server.wait_closed()
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        crowded = len(self._connections) >= self.max_connections
        if len(self._connections) >= 2 * self.max_connections:
            writer.transport.abort()  # a flood: even the 503s (a second each) are at their bound
            return
        self._connections[task] = writer
        try:
            if crowded:
                await self._finish(reader, writer, _error(503, "too many connections: try again"))
            else:
                await self._serve(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stalled: nothing to answer
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                async with asyncio.timeout(self.head_timeout_sec):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    await self._finish(
                        reader, writer, _error(400, "the request head was cut short")
                    )
                return  # else: closed between requests, as clients do
            except asyncio.LimitOverrunError:
                await self._finish(
                    reader, writer, _error(431, f"the request head exceeds {MAX_HEAD_BYTES} bytes")
                )
                return
            except TimeoutError:
                await self._finish(reader, writer, _error(408, "no complete request head in time"))
                return
            request = parse_head(head)
            if isinstance(request, Refusal):
                await self._finish(reader, writer, _error(request.status, request.detail))
                return
            status, body, content_type = self._answer(request.path)
            reply = _response(
                status,
                b"" if request.method == "HEAD" else body,
                content_type,
                length=len(body),
                keep_alive=request.keep_alive,
            )
            writer.write(reply)
            async with asyncio.timeout(self.head_timeout_sec):
                await writer.drain()
            if not request.keep_alive:
                return

    async def _finish(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: bytes
    ) -> None:
        """Send a last reply; the caller closes the connection. What the client still sends is
        read and dropped until it closes too (bounded by ``LINGER_SEC``): closing a socket with
        unread data makes the kernel reset the connection, which can destroy the reply before
        the client reads it."""
        writer.write(reply)
        with contextlib.suppress(ConnectionError, TimeoutError, OSError):
            async with asyncio.timeout(min(LINGER_SEC, self.head_timeout_sec)):
                await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
                while await reader.read(MAX_HEAD_BYTES):
                    pass

    def _answer(self, path: str) -> tuple[int, bytes, str]:
        try:
            if path == "/health":
                state = self.probed.state
                alive = state in ALIVE_STATES
                return _json({"status": "ok" if alive else "down", "state": state}, alive)
            if path == "/ready":
                ready, reasons = self.probed.readiness()
                return _json({"ready": ready, "notes" if ready else "reasons": reasons}, ready)
            if path == "/metrics":
                return 200, self.probed.render_metrics(), CONTENT_TYPE_LATEST
            if path == "/status":
                return _json(self.probed.status(), True)
        except Exception:
            log.exception("http.endpoint_failed", extra={"path": path})
            return 500, b"internal error: see the engine's log\n", "text/plain; charset=utf-8"
        return 404, b"not found: /health, /ready, /metrics, /status\n", "text/plain; charset=utf-8"


def _json(body: Any, ok: bool) -> tuple[int, bytes, str]:
    text = json.dumps(body, indent=2, default=str).encode()
    return 200 if ok else 503, text, "application/json; charset=utf-8"


def _error(status: int, detail: str) -> bytes:
    return _response(status, f"{detail}\n".encode(), "text/plain; charset=utf-8")


def _response(
    status: int,
    body: bytes,
    content_type: str,
    *,
    length: int | None = None,
    keep_alive: bool = False,
) -> bytes:
    """One whole reply. ``length`` is the body a GET would get (HEAD sends none but says it)."""
    head = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body) if length is None else length}",
        "Cache-Control: no-store",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
    ]
    if status == 405:
        head.append(f"Allow: {ALLOWED}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
