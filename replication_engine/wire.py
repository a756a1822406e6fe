"""One connection that sends a whole pipeline as one write and takes its replies as one result.

A tailer at the head of a busy stream makes a hundred or more read cycles a second per peer,
each a pipeline of four or five commands and one apply call. redis-py reads each reply as its
own await under its own timeout, through its pool, retry and response-callback layers: about
250 us of CPU for a tailer's read of four commands on the 2-core benchmark machine, against
about 50 us for the same bytes written at once and parsed by hiredis as they arrive. That was
a fifth to a third of the engine's CPU per batch at the head (README, "Measured": read cycle,
replication lag).

A :class:`Wire` does only that part itself. Its connection is opened by redis-py, from the
pool of the client it is built on: the same address, TLS context, ACL user, database, client
name and connect timeout, with redis-py's own handshake and errors. Then it takes the
connection's transport over. Error replies become redis-py's exception classes
(``BaseParser.parse_error``), so :func:`replication_engine.connection.failure` judges them as
it judges any other call; a lost connection or a timeout raises redis-py's
``ConnectionError`` or ``TimeoutError``.

Replies are matched to pipelines by their order alone. A pipeline whose caller gives up
(cancelled) stays in that order: its replies are read as they come and dropped, so the
pipelines of other callers queued on the wire go on unharmed. Three cases close the connection
instead, failing every pipeline queued on it as on any lost connection (the next call connects
again): a timeout (the server may be stuck), a protocol error (nothing after it can be
matched), and a cancelled pipeline that holds a blocking command (``blocking=True``), which
would hold up the pipelines behind it for as long as it blocks. For the same reason, give each
blocking reader its own wire.

Standalone servers only: a Redis Cluster routes each command by its slot, which is the cluster
client's work.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis
from redis._parsers import BaseParser
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["Command", "Wire", "pack"]

# A command: its name and arguments (text is sent as UTF-8, numbers as their decimal text).
Command = Sequence[bytes | str | int | float]

_INCOMPLETE = object()  # what hiredis's reader returns while a reply is still arriving


def pack(commands: Iterable[Command]) -> bytes:
    """The RESP request for ``commands``, in one buffer."""
    parts: list[bytes] = []
    for command in commands:
        parts.append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, bool) or not isinstance(arg, bytes | int | float):
                # redis-py refuses these too: a bool or an object has no one text on the wire.
                raise TypeError(f"a {type(arg).__name__} is not a Redis argument")
            elif isinstance(arg, int):
                arg = b"%d" % arg
            elif isinstance(arg, float):
                arg = repr(arg).encode()
            parts.append(b"$%d\r\n" % len(arg))
            parts.append(arg)
            parts.append(b"\r\n")
    return b"".join(parts)


class _Replies(asyncio.Protocol):
    """Parses the replies of the pipelines sent on one transport, in the order they were sent."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        # Held, not only its transport: a stream writer collected while its transport is open
        # closes it (asyncio, CPython 3.11.5 and later).
        self.writer = writer
        self.transport = writer.transport
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=BaseParser.parse_error,
            notEnoughData=_INCOMPLETE,
        )
        # Each pipeline sent and not answered yet: its future, how many replies, those read.
        self.waiting: deque[tuple[asyncio.Future[list[Any]], int, list[Any]]] = deque()
        self.lost: BaseException | None = None

    def expect(self, count: int) -> asyncio.Future[list[Any]]:
        done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.waiting.append((done, count, []))
        return done

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while self.waiting:
                done, count, replies = self.waiting[0]
                while len(replies) < count:
                    reply = self.reader.gets()
                    if reply is _INCOMPLETE:
                        return
                    replies.append(reply)
                self.waiting.popleft()
                if not done.done():
                    done.set_result(replies)
        except InvalidResponse as exc:  # not RESP: nothing after it can be matched
            self._fail(exc)
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # the server closed its end: close ours, which fails what waits

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"connection lost: {exc}" if exc else "connection closed"))

    def _fail(self, exc: BaseException) -> None:
        self.lost = exc
        while self.waiting:
            done, _, _ = self.waiting.popleft()
            if not done.done():
                done.set_exception(exc)


class Wire:
    """A lazily opened connection, built on ``client``'s pool settings, for whole pipelines.

    ``timeout`` bounds each call, None for no bound, as a socket timeout of None is (a call
    may give its own, for a blocking command); connecting is bounded by the pool's connect
    timeout, as for any of its connections.
    """

    def __init__(self, client: Redis, *, timeout: float | None) -> None:
        self._pool = client.connection_pool
        self._timeout = timeout
        self._replies: _Replies | None = None
        self._connecting = asyncio.Lock()

    async def execute(
        self, commands: Sequence[Command], *, timeout: float | None = None, blocking: bool = False
    ) -> list[Any]:
        """The replies of ``commands``, sent as one write; an error reply is an exception in
        its place (as redis-py's ``execute(raise_on_error=False)`` gives it). ``blocking``:
        the pipeline holds a command that may block (``XREAD BLOCK``, ``BLPOP``)."""
        if not commands:
            return []
        # Packed before a reply is expected: an argument that cannot be sent must fail this
        # call alone, not leave a slot that would hand every later reply to the wrong caller.
        packed = pack(commands)
        replies = await self._connect()
        transport = replies.transport
        assert isinstance(transport, asyncio.WriteTransport)
        done = replies.expect(len(commands))
        transport.write(packed)
        try:
            async with asyncio.timeout(self._timeout if timeout is None else timeout):
                return await done
        except TimeoutError:
            self._drop(replies)
            raise RedisTimeoutError("Timeout reading from the server") from None
        except asyncio.CancelledError:
            # The replies still owed are read and dropped where they stand in the order
            # (``done`` is cancelled); only a blocking command would hold the others up.
            if blocking:
                self._drop(replies)
            raise
        except BaseException:
            self._drop(replies)  # the connection failed: whatever is owed never comes
            raise

    async def call(self, command: Command, *, timeout: float | None = None) -> Any:
        """The reply of one command; an error reply is raised, as redis-py raises it."""
        (reply,) = await self.execute([command], timeout=timeout)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    @property
    def in_flight(self) -> int:
        """Pipelines sent on the open connection and not answered yet, abandoned ones included."""
        return len(self._replies.waiting) if self._replies is not None else 0

    async def _connect(self) -> _Replies:
        async with self._connecting:
            if self._replies is not None and self._replies.lost is None:
                return self._replies
            connection = self._pool.make_connection()  # type: ignore[no-untyped-call]
            await connection.connect()
            # redis-py's connection ran the handshake (TLS, AUTH, SELECT, CLIENT SETNAME)
            # over asyncio streams; its transport now carries nothing but our pipelines.
            reader, writer = connection._reader, connection._writer
            if reader is None or writer is None:
                raise RedisConnectionError("the connection closed during its handshake")
            # Detached, so that redis-py's object, once collected, does not close it.
            connection._reader = connection._writer = None
            transport = writer.transport
            # Bytes after the handshake's replies are not ours to parse; an end of stream
            # already seen would never reach our protocol.
            if getattr(reader, "_buffer", b"") or reader.at_eof() or transport.is_closing():
                transport.close()
                raise RedisConnectionError("the connection closed or spoke out of turn")
            replies = _Replies(writer)
            transport.set_protocol(replies)
            self._replies = replies
            return replies

    def _drop(self, replies: _Replies) -> None:
        replies.transport.close()
        if replies.lost is None:
            replies.lost = RedisConnectionError("connection dropped")
        if self._replies is replies:
            self._replies = None

    def close(self) -> None:
        """Close the connection, if open; a later call opens a new one."""
        if self._replies is not None:
            self._drop(self._replies)
