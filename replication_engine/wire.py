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

Every reply is read within bounds (:func:`bound_reader`, which
:mod:`replication_engine.connection` applies to redis-py's hiredis parser too): an aggregate
that declares more than :data:`MAX_REPLY_ELEMENTS` elements, or aggregates nested deeper than
:data:`MAX_REPLY_DEPTH`, are a protocol error, like any other reply that is not RESP. hiredis-py
makes a list of the declared length as soon as it reads an aggregate's header, before any
element arrives: unbounded, one ``*2000000000`` from a peer costs 16 GB of address space and
seconds of the event loop to free, on every retry.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis
from redis._parsers import BaseParser
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["MAX_REPLY_DEPTH", "MAX_REPLY_ELEMENTS", "Command", "Wire", "bound_reader", "pack"]

log = logging.getLogger(__name__)

# A command: its name and arguments (text is sent as UTF-8, numbers as their decimal text).
Command = Sequence[bytes | str | int | float]

_INCOMPLETE = object()  # what hiredis's reader returns while a reply is still arriving

# The most elements one aggregate of a reply may declare (an array, set or push; a map's pairs).
# Our biggest are a leaf bucket's hash as the cold path reads it, two per key in the bucket,
# and a batch of entries (hot_path.max_batch_size, 1,000 by default). Ten million is a bucket
# of five million keys: under the default 65,536 buckets, more keys than one Redis can hold.
# Freeing an unfilled list of this length takes about 15 ms.
MAX_REPLY_ELEMENTS = 10_000_000
# The deepest nesting of aggregates a reply may have: COMMAND's, which redis-py's cluster client
# reads, is 8 deep, XREAD's 5. With the bound above, one reply can declare at most this many
# times ten million elements: about 0.2 s to free, against 2.6 s for one ``*2000000000``.
MAX_REPLY_DEPTH = 16


class _ReaderLimits(ctypes.Structure):
    """hiredis's ``redisReader`` (``read.h``, as hiredis-py 3.5 bundles it), up to its last
    limit, ``maxdepth``."""

    _fields_ = [
        ("err", ctypes.c_int),
        ("errstr", ctypes.c_char * 128),
        ("buf", ctypes.c_void_p),
        ("pos", ctypes.c_size_t),
        ("len", ctypes.c_size_t),
        ("maxbuf", ctypes.c_size_t),
        ("maxelements", ctypes.c_longlong),
        ("task", ctypes.c_void_p),
        ("tasks", ctypes.c_int),
        ("ridx", ctypes.c_int),
        ("reply", ctypes.c_void_p),
        ("fn", ctypes.c_void_p),
        ("privdata", ctypes.c_void_p),
        ("maxdepth", ctypes.c_int),
    ]


# hiredis-py's Reader object (``src/reader.h``, as of hiredis-py 3.5): the object header, the
# redisReader pointer, two strings, a flag, three objects and a saved error of three.
_READER_OBJECT_BYTES = object.__basicsize__ + 8 + 2 * 8 + 8 + 3 * 8 + 3 * 8
# hiredis's defaults (REDIS_READER_MAX_ARRAY_ELEMENTS, REDIS_READER_MAX_REPLY_DEPTH): what a
# new reader's limits read as where the layout is the one above.
_DEFAULT_MAX_ELEMENTS = (1 << 32) - 1
_DEFAULT_MAX_DEPTH = 1024
_PROBE_MAXBUF = 54_321  # set on a probe reader, to be found where maxbuf should be


def _limits(reader: hiredis.Reader) -> _ReaderLimits:
    """The C reader behind ``reader``: the first field after hiredis-py's object header."""
    address = ctypes.c_void_p.from_address(id(reader) + object.__basicsize__).value
    if not address:  # hiredis-py makes its C reader with the object: never seen
        raise RuntimeError("a hiredis Reader without its C reader")
    return _ReaderLimits.from_address(address)


def _refused(reply: bytes, limits: tuple[int, int] | None = None) -> bool:
    """Whether a new reader, with ``limits`` (elements, depth) if given, refuses ``reply``."""
    reader = hiredis.Reader()
    if limits is not None:
        state = _limits(reader)
        state.maxelements, state.maxdepth = limits
    reader.feed(reply)
    try:
        reader.gets()
    except hiredis.ProtocolError:
        return True
    return False


@functools.cache
def _unbounded_because() -> str | None:
    """Why this hiredis's readers cannot be bounded, or None when they can.

    hiredis checks both limits as it reads each aggregate's header (``maxelements`` and
    ``maxdepth``, public fields of its C reader); hiredis-py sets neither and offers no way
    to, so they are set through ctypes. Nothing is written before the layout is confirmed:
    the object's size, hiredis's default nesting limit at work, then three values read back
    where the layout puts them (a buffer limit set through hiredis-py's own API, and hiredis's
    two defaults); then both limits are seen at work on probes. Any other hiredis is left
    unbounded, and said so once.
    """
    if ctypes.sizeof(ctypes.c_void_p) != 8 or hiredis.Reader.__basicsize__ != _READER_OBJECT_BYTES:
        return "its Reader object is not laid out as in hiredis-py 3.5"
    if not _refused(b"*1\r\n" * (_DEFAULT_MAX_DEPTH + 1)):
        return "its hiredis has no nesting limit (maxdepth)"
    probe = hiredis.Reader()
    probe.setmaxbuf(_PROBE_MAXBUF)
    state = _limits(probe)
    found = (state.maxbuf, state.maxelements, state.maxdepth)
    if found != (_PROBE_MAXBUF, _DEFAULT_MAX_ELEMENTS, _DEFAULT_MAX_DEPTH):
        return f"its reader's limits are not where hiredis 1.x keeps them (found {found})"
    bounds = (MAX_REPLY_ELEMENTS, MAX_REPLY_DEPTH)
    if _refused(b"*2\r\n*1\r\n:1\r\n:2\r\n", bounds):
        return "its reader refused a reply within the bounds"
    if not _refused(b"*%d\r\n" % (MAX_REPLY_ELEMENTS + 1), bounds):
        return "its reader ignored the elements limit"
    if not _refused(b"*1\r\n" * (MAX_REPLY_DEPTH + 1), bounds):
        return "its reader ignored the nesting limit"
    return None


def bound_reader(reader: hiredis.Reader) -> bool:
    """Bound a new ``reader``: an aggregate of more than :data:`MAX_REPLY_ELEMENTS` elements,
    or nested deeper than :data:`MAX_REPLY_DEPTH`, is a protocol error (hiredis's own, raised
    as the reader's ``protocolError``) from the moment its header is read.

    Returns:
        False, with nothing set and a warning logged once per process, where this hiredis
        cannot be bounded (see :func:`_unbounded_because`); True otherwise.
    """
    why = _unbounded_because()
    if why is not None:
        _warn_unbounded(why)
        return False
    state = _limits(reader)
    state.maxelements = MAX_REPLY_ELEMENTS
    state.maxdepth = MAX_REPLY_DEPTH
    return True


@functools.cache
def _warn_unbounded(why: str) -> None:
    log.warning(
        "wire.replies_unbounded",
        extra={
            "hiredis": hiredis.__version__,
            "why": why,
            "hint": "replies are read without the element and nesting bounds: a peer can make "
            "this process allocate what an aggregate's header declares (hiredis 3.5 is known to "
            "take the bounds)",
        },
    )


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
        bound_reader(self.reader)
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
