"""A small TCP proxy that injects network faults between the engine and a Redis server.

Killing or pausing a server tests crashes and hangs of the *node*; partitions, resets and slow
links are faults of the *network* and look different to a client (a reset socket, a read that
never returns, a slow round trip). Chaos tests put this proxy between a peer URL and the real
server to produce exactly those.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["ProxyStats", "TcpProxy", "ThreadedTcpProxy"]

# Read size per chunk; RESP requests and most replies fit in one, so delay applies per message.
CHUNK_BYTES = 64 * 1024
# Deadline for dialling the target; a dead target must fail the client, not hang the proxy.
CONNECT_TIMEOUT_S = 5.0
# Deadline for connection handlers to wind down in stop() before they are cancelled.
STOP_TIMEOUT_S = 5.0
# Deadline for the proxy thread to bring its loop up or down.
THREAD_TIMEOUT_S = 10.0

_T = TypeVar("_T")
# What split_requests runs between two requests: (the request just forwarded, the proxy's
# (host, port) on the server connection).
BetweenRequests = Callable[[bytes, tuple[str, int]], Coroutine[Any, Any, None]]


@dataclass
class ProxyStats:
    """Bytes forwarded each way and connections accepted (``active`` is currently open)."""

    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0
    active: int = 0


def _reset(writer: asyncio.StreamWriter) -> None:
    # SO_LINGER with a zero timeout makes close() send RST, so the client sees "connection
    # reset" at once, as with a dropped route or a crashed middlebox, not an orderly FIN.
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One proxied connection: the accepted client side and the dialled upstream side."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream

    def reset(self) -> None:
        _reset(self.client)
        self.upstream.transport.abort()


def split_resp_requests(buffer: bytes) -> tuple[list[bytes], bytes]:
    """The whole RESP requests (``*<n>`` arrays of ``$<len>`` bulk strings, as clients send)
    at the start of ``buffer``, and the incomplete rest. Anything else passes as one piece."""
    requests: list[bytes] = []
    at = 0
    while at < len(buffer):
        if buffer[at : at + 1] != b"*":
            return [*requests, buffer[at:]], b""
        end = _resp_request_end(buffer, at)
        if end is None:
            break
        requests.append(buffer[at:end])
        at = end
    return requests, buffer[at:]


def _resp_request_end(buffer: bytes, start: int) -> int | None:
    """Where the request starting at ``start`` ends, or None when it has not all arrived."""
    header_end = buffer.find(b"\r\n", start)
    if header_end < 0:
        return None
    at = header_end + 2
    for _ in range(int(buffer[start + 1 : header_end])):
        line_end = buffer.find(b"\r\n", at)  # "$<len>": buffer[at] is the "$"
        if line_end < 0:
            return None
        at = line_end + 2 + int(buffer[at + 1 : line_end]) + 2
        if at > len(buffer):
            return None
    return at


class TcpProxy:
    """Asyncio TCP proxy with switchable faults; all methods run on the loop that started it.

    Faults:
        ``set_delay(s)``: each chunk waits ``s`` before it is forwarded, in both directions.
            Chunks of one direction are forwarded in order, so the delay also caps throughput.
        ``cut()``: every open connection is reset now, and new ones are reset on accept,
            until ``heal()``.
        ``blackhole()``: connections stay open but bytes are read and discarded in both
            directions until ``heal()``; a client only notices through its own timeout.
        ``split_requests(s, between=hook)``: requests reach the server one at a time, ``s``
            apart, so the commands of one pipeline run apart from each other and other
            clients' commands can run in between (as behind a middlebox that re-segments a
            stream). ``hook(request, address)``, awaited after each request is forwarded and
            before the next, is where a test puts such a command; ``address`` is the proxy's
            end of the server connection, as the server's ``CLIENT LIST`` shows it.

    Resource handling: ``stop()`` closes the listener, resets every connection and awaits
    every connection task, so no task outlives the proxy.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self._listen_port = listen_port
        self.stats = ProxyStats()
        self._delay_s = 0.0
        self._split_s: float | None = None
        self._between: BetweenRequests | None = None
        self._is_cut = False
        self._is_blackholed = False
        self._is_stopping = False
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The listening port (the real one once started with ``listen_port=0``)."""
        return self._listen_port

    @property
    def host(self) -> str:
        return self.listen_host

    def url_for(self, scheme: str = "redis", db: int = 0) -> str:
        return f"{scheme}://{self.listen_host}:{self.port}/{db}"

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("proxy already started")
        self._server = await asyncio.start_server(self._handle, self.listen_host, self._listen_port)
        self._listen_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._is_stopping = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for link in list(self._links):
            link.reset()
        # Resetting the links ends every pump, so handlers finish on their own. They are not
        # cancelled first: asyncio's stream callback logs a cancelled handler as an error.
        handlers = list(self._handlers)
        if handlers:
            _, pending = await asyncio.wait(handlers, timeout=STOP_TIMEOUT_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if server is not None:
            await server.wait_closed()

    def set_delay(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"seconds={seconds!r}: expected >= 0")
        self._delay_s = seconds

    def split_requests(self, seconds: float | None, between: BetweenRequests | None = None) -> None:
        """Forward each RESP request on its own, ``seconds`` after the one before (None: off)."""
        if seconds is not None and seconds < 0:
            raise ValueError(f"seconds={seconds!r}: expected >= 0 or None")
        self._split_s, self._between = seconds, between

    def cut(self) -> None:
        self._is_cut = True
        for link in list(self._links):
            link.reset()

    def blackhole(self) -> None:
        self._is_blackholed = True

    def heal(self) -> None:
        """Lift ``cut()`` and ``blackhole()``; the delay stays until ``set_delay(0)``."""
        self._is_cut = False
        self._is_blackholed = False

    def is_cut(self) -> bool:
        return self._is_cut

    def is_blackholed(self) -> bool:
        return self._is_blackholed

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.stats.connections += 1
        self.stats.active += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.stats.active -= 1
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._is_cut or self._is_stopping:
            _reset(writer)
            return
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                up_reader, up_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
        except (OSError, TimeoutError):
            # The target is down: the client sees a reset, as it would from a dead node.
            _reset(writer)
            return
        link = _Link(writer, up_writer)
        if self._is_cut or self._is_stopping:
            # cut() or stop() ran while we were dialling and could not see this link yet.
            link.reset()
            return
        self._links.add(link)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._pump(reader, up_writer, link, upstream=True))
                group.create_task(self._pump(up_reader, writer, link, upstream=False))
        finally:
            self._links.discard(link)
            link.reset()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        *,
        upstream: bool,
    ) -> None:
        pending = b""  # the start of a request not yet forwarded whole (split_requests)
        try:
            while True:
                data = await reader.read(CHUNK_BYTES)
                if not data:
                    return
                if self._delay_s > 0:
                    # Injected latency, not synchronisation: the fault being simulated.
                    await asyncio.sleep(self._delay_s)
                if self._is_blackholed:
                    continue
                if upstream and (self._split_s is not None or pending):
                    requests, pending = split_resp_requests(pending + data)
                    for request in requests:
                        writer.write(request)
                        await writer.drain()
                        # The fault itself: requests reach the server this far apart.
                        await asyncio.sleep(self._split_s or 0.0)
                        if self._between is not None:
                            await self._between(request, writer.get_extra_info("sockname"))
                else:
                    writer.write(data)
                    await writer.drain()
                if upstream:
                    self.stats.bytes_up += len(data)
                else:
                    self.stats.bytes_down += len(data)
        except (ConnectionError, OSError):
            return
        finally:
            # Either side ending ends the pair; Redis clients never half-close.
            link.reset()


class ThreadedTcpProxy:
    """``TcpProxy`` on its own thread and event loop, for synchronous chaos checkers and benches.

    Every method blocks until the proxy's loop has carried it out, so after ``cut()`` returns the
    old connections are already reset.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
    ) -> None:
        self._proxy = TcpProxy(
            target_host, target_port, listen_host=listen_host, listen_port=listen_port
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._proxy.port

    @property
    def host(self) -> str:
        return self._proxy.host

    @property
    def stats(self) -> ProxyStats:
        """A snapshot, so the caller never reads counters mid-update from another thread."""
        return self._call(lambda: dataclasses.replace(self._proxy.stats))

    def url_for(self, scheme: str = "redis", db: int = 0) -> str:
        return self._proxy.url_for(scheme, db)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("proxy already started")
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"tcp_proxy[{self._proxy.target_port}]", daemon=True
        )
        self._thread.start()
        try:
            self._run(self._proxy.start())
        except BaseException:
            self._shutdown_loop()
            raise

    def stop(self) -> None:
        if self._loop is None:
            return
        try:
            self._run(self._proxy.stop())
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop, self._thread = None, None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(THREAD_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"{thread.name} did not stop within {THREAD_TIMEOUT_S}s")
        loop.close()

    def set_delay(self, seconds: float) -> None:
        self._call(lambda: self._proxy.set_delay(seconds))

    def cut(self) -> None:
        async def cut_and_flush() -> None:
            self._proxy.cut()
            # abort() closes sockets in callbacks queued on the loop; yielding once lets them
            # run before we report back, so the caller observes the cut as done.
            await asyncio.sleep(0)

        self._run(cut_and_flush())

    def blackhole(self) -> None:
        self._call(self._proxy.blackhole)

    def heal(self) -> None:
        self._call(self._proxy.heal)

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("proxy is not started")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(THREAD_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def _call(self, fn: Callable[[], _T]) -> _T:
        async def call() -> _T:
            return fn()

        return self._run(call())

    def __enter__(self) -> ThreadedTcpProxy:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
