"""One peer: its connections, health and circuit breaker, and every read we make of it.

Two clients per peer: blocking ``XREAD`` calls hold a connection for up to the block timeout, so
they get their own, and Merkle or item queries from the cold path never queue behind them.
Every call goes through the peer's breaker, so a dead peer costs one fast failure per call
instead of a connect timeout, and records latency and liveness for status and readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pybreaker
from redis.asyncio import Redis
from redis.exceptions import InvalidResponse, ResponseError

from replication_engine import clock
from replication_engine.codec import STREAM_START, StreamId, is_node_id, parse_stream_id
from replication_engine.config import HotPathConfig, PeerConfig, default_of
from replication_engine.connection import (
    Failure,
    TlsOptions,
    client_maker,
    failure,
    node_of,
)
from replication_engine.errors import ReplicationError
from replication_engine.knowledge import ALL_WRITES, NodeRecord
from replication_engine.merkle import ZERO, GeometryError
from replication_engine.observability.metrics import Metrics
from replication_engine.redaction import redact_url
from replication_engine.resilience import breaker_remaining, breaker_state, make_breaker
from replication_engine.store.layout import Keyspace, text
from replication_engine.store.reader import ReadCounter, TreeReader
from replication_engine.wire import Command, Wire

log = logging.getLogger(__name__)
T = TypeVar("T")

Entry = tuple[bytes, dict[bytes, bytes]]
# Failures that say the peer (or the path to it) is unwell, as opposed to a bug or a refusal:
# they count against the peer's breaker (connection.failure decides which kind a failure is).
_UNWELL = (Failure.UNAVAILABLE, Failure.DENIED, Failure.MALFORMED)
# What making a reply of the wrong shape into values raises in the functions below.
_SHAPE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError)


class _MalformedReply(InvalidResponse):
    """A peer's reply of another shape than its command returns, found as our own code makes
    it into values: ``MALFORMED`` (``connection.failure``), as redis-py's own errors of the
    kind are. It never leaves :meth:`Peer.call`, which makes it a :class:`PeerUnavailable`."""


@contextlib.contextmanager
def _reply_of(what: str) -> Iterator[None]:
    """Where a peer's replies are made into values: an error of their shape there is the
    peer's failure, not a bug of ours. Only that step is wrapped; an error reply re-raised
    there (a ``RedisError``) keeps its own kind."""
    try:
        yield
    except _SHAPE_ERRORS as exc:
        raise _MalformedReply(f"{what}: {type(exc).__name__}: {exc}"[:300]) from exc


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """O(1) facts about a peer's stream, read alongside every batch."""

    length: int
    first: StreamId | None
    last: StreamId | None
    max_deleted: StreamId | None = None  # Redis >= 7: newest id removed by XDEL
    entries_added: int | None = None  # Redis >= 7: entries ever added

    def trimmed_past(self, cursor: StreamId) -> bool:
        """Entries after ``cursor`` may have been removed before we read them.

        Trimming removes the oldest entries first, so if the oldest remaining entry is newer
        than the successor of our cursor, the entries in between are gone (or never existed:
        the rule can over-report, which costs one extra repair, but never under-reports). On
        Redis 7 a stream from which nothing was ever removed (entries added == length) is
        exempt only when read from its start, and XDEL of a newer entry
        (max-deleted-entry-id) also counts.

        A cursor read from this stream is an id the stream held. So a stream that no longer
        reaches the cursor (deleted, or its newest id below it), or that starts past it
        without having lost anything, is not the stream the cursor was read from: it was
        deleted and written again (``DEL`` by hand, a restore of the peer's stream alone), and
        whatever it held after the cursor is gone with it.
        """
        if self.max_deleted is not None and self.max_deleted > cursor:
            return True
        if self.went_back(cursor) or (cursor != STREAM_START and self.last is None):
            return True  # the stream is gone, or went back: not the one the cursor was read from
        if self.length == 0:
            # Trimmed to nothing: entries past the cursor existed if the head moved past it.
            added = self.entries_added is None or self.entries_added > 0
            return added and self.last is not None and self.last > cursor
        if self.first is None or self.first <= cursor.next():
            return False
        if cursor != STREAM_START:
            return True  # the cursor's own entry is gone: removed, or another stream
        return self.entries_added is None or self.entries_added > self.length

    def went_back(self, cursor: StreamId) -> bool:
        """The stream's newest id is below ``cursor``: it was deleted and written again, and
        its entries are not after the cursor, where reads look (see :meth:`trimmed_past`)."""
        return cursor != STREAM_START and self.last is not None and self.last < cursor


def _pairs(raw: Any) -> dict[Any, Any]:
    """A hash or map reply as a dict: redis-py's callbacks give one, and so does a RESP3 map
    read off a :class:`~replication_engine.wire.Wire`; a RESP2 reply there is the flat list of
    its pairs."""
    if isinstance(raw, dict):
        return raw
    pairs = iter(raw or ())
    return dict(zip(pairs, pairs, strict=True))


def _record(raw: Any) -> NodeRecord | None:
    if isinstance(raw, BaseException):
        raise raw
    return NodeRecord.from_fields({text(k): text(v) for k, v in _pairs(raw).items()})


def _entries(raw: Any) -> list[Entry]:
    """``XRANGE``'s entries, each as redis-py gives them: (id, fields as a dict)."""
    return [(entry_id, _pairs(fields)) for entry_id, fields in raw or ()]


def parse_stream_info(raw: Any) -> StreamInfo:
    if isinstance(raw, ResponseError):
        if "no such key" in str(raw).lower():
            return StreamInfo(0, None, None, None)
        raise raw
    if isinstance(raw, BaseException):
        raise raw
    raw = {text(name): value for name, value in _pairs(raw).items()}

    def entry_id(value: Any) -> StreamId | None:
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
            if value is None:
                return None
        return parse_stream_id(value)

    first = entry_id(raw.get("first-entry"))
    last = entry_id(raw.get("last-generated-id")) or entry_id(raw.get("last-entry"))
    max_deleted = raw.get("max-deleted-entry-id")
    added = raw.get("entries-added")
    return StreamInfo(
        length=int(raw.get("length", 0)),
        first=first,
        last=last,
        max_deleted=parse_stream_id(max_deleted) if max_deleted is not None else None,
        entries_added=int(added) if added is not None else None,
    )


Facts = tuple[NodeRecord | None, "StreamInfo", bytes]
# How long a facts read waits for the peer's other partitions to ask too.
FACTS_WINDOW_SEC = 0.005


@dataclass(slots=True)
class _FactsBatch:
    """Facts reads asked of a peer's partitions and not sent yet, by partition: each waiter
    with the read counter of the partition that asked."""

    waiting: dict[str, list[tuple[asyncio.Future[Facts], ReadCounter]]] = field(
        default_factory=dict
    )
    task: asyncio.Task[None] | None = None


def _settle(
    waiters: list[tuple[asyncio.Future[Facts], ReadCounter]], outcome: Facts | BaseException
) -> None:
    for waiter, _counter in waiters:
        if waiter.done():
            continue  # its caller was cancelled meanwhile
        if isinstance(outcome, BaseException):
            waiter.set_exception(outcome)
        else:
            waiter.set_result(outcome)


def _cancel(waiting: dict[str, list[tuple[asyncio.Future[Facts], ReadCounter]]]) -> None:
    for waiters in waiting.values():
        for waiter, _counter in waiters:
            waiter.cancel()


class PeerLayoutError(GeometryError):
    """The peer's store is laid out in another number of partitions than this node's."""


class PeerIdentityError(PeerLayoutError):
    """The store at a peer's address is another node's: its record names that node. The
    peer's ``redis_url`` or ``prefix`` is wrong (the local store's own address, say), or two
    nodes share a ``node_id``. Nothing read from it may be applied or claimed, nor its record
    count as the peer's knowledge; like a layout mismatch, only a config change mends it."""


@dataclass(slots=True)
class _Link:
    connected: bool = False
    last_ok: float | None = None
    last_ok_wall: float | None = None
    last_error: str | None = None
    latency_ms: float | None = None
    # Whether the last read found no store at all (no partition meta, no record): said once
    # per stretch, as a peer whose engine never started and a wrong prefix look the same.
    no_store: bool = False


class PeerUnavailable(ReplicationError, ConnectionError):
    """The peer's breaker is open or the peer did not answer; the message is safe to log."""

    retryable = True


def _peer_default(name: str) -> Any:
    return default_of(PeerConfig, name)


class Peer:
    def __init__(
        self,
        node_id: str,
        url: str,
        *,
        prefix: str,
        metrics: Metrics,
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
        priority: int = _peer_default("priority"),
        failure_threshold: int = _peer_default("circuit_failure_threshold"),
        reset_timeout_sec: float = _peer_default("circuit_reset_timeout_sec"),
        op_timeout_sec: float = 5.0,
        block_timeout_sec: float = default_of(HotPathConfig, "block_timeout_sec"),
        start_from: str = _peer_default("start_from"),
        cluster: bool = False,
        cluster_addresses: Mapping[str, str] | None = None,
        partitions: int = 1,
        wall_ms: Callable[[], int] = clock.wall_clock_ms,
        max_clock_offset_sec: float = 300.0,
    ) -> None:
        self.node_id = node_id
        # What bounds a plausible claim in the peer's record (see _plausible).
        self._wall_ms = wall_ms
        self._max_ahead_ms = int(max_clock_offset_sec * 1000)
        self._record_problems: tuple[str, ...] = ()
        self.display_url = redact_url(url)
        self.keys = Keyspace(prefix)
        self.metrics = metrics
        self.priority = priority
        self.start_from = start_from
        self.block_timeout_sec = block_timeout_sec
        self.breaker = make_breaker(
            name=f"peer:{node_id}", failures=failure_threshold, longest_open_sec=reset_timeout_sec
        )
        common: dict[str, Any] = {"username": username, "password": password, "tls": tls}
        # A peer that is a Redis Cluster is read through a cluster client, seeded by ``url``.
        make = client_maker(cluster, cluster_addresses)
        self.query: Redis = make(url, socket_timeout=op_timeout_sec, client_name=None, **common)
        self._op_timeout_sec = op_timeout_sec
        # The tailer's reads of a standalone peer go over a connection of their own, the wait
        # and the batch in one round trip; a cluster's through its clients, routed by slot,
        # the wait on a client of its own with a blocking read per partition (a Cluster
        # refuses one read across slots).
        self._wire: Wire | None = None if cluster else Wire(self.query, timeout=op_timeout_sec)
        self.stream: Redis | None = None
        if cluster:
            self.stream = make(
                url,
                socket_timeout=block_timeout_sec + op_timeout_sec,
                max_connections=partitions + 1,
                client_name=None,
                **common,
            )
        self._wires = [self._wire] if self._wire is not None else []
        self.counter = ReadCounter()
        self.reader = TreeReader(self.query, self.keys, counter=self.counter)
        # The layout this node reads the peer with: a partition of another layout holds
        # other keys, and its record's claims cover only them.
        self.partitions = partitions
        self._link = _Link()
        self._facts = _FactsBatch()
        self._is_view = False
        # Labelled once: every call of the peer updates them.
        self._latency = metrics.peer_latency.labels(node_id)
        self._connected = metrics.peer_connected.labels(node_id)
        self._stalled = metrics.peer_stalled.labels(node_id)
        self._connected.set(0)
        metrics.watch_circuit(metrics.peer_circuit.labels(node_id), lambda: self.circuit_state)

    def partition(self, name: str) -> Peer:
        """The peer's partition ``name``: its keys, read over the same connections, under the
        same breaker, with the same liveness (a dead peer is dead for every partition). The
        breaker is the peer's, not its shard's: a cluster peer with one shard down stops
        being read in every partition until the trial calls pass."""
        view = copy.copy(self)
        view.keys = self.keys.of(name)
        # Its own count of reads: a repair's cost is measured on it while other partitions'
        # repairs of the same peer run.
        view.counter = ReadCounter()
        view.reader = TreeReader(self.query, view.keys, counter=view.counter)
        if self._wire is not None:  # its tailer blocks on its own connection
            view._wire = Wire(self.query, timeout=self._op_timeout_sec)
            self._wires.append(view._wire)
        view._is_view = True
        return view

    # The link's state, shared by the peer and its partitions.
    @property
    def connected(self) -> bool:
        return self._link.connected

    @property
    def no_store(self) -> bool:
        """Whether the last read found nothing stored under the prefix (see peer.no_store)."""
        return self._link.no_store

    @property
    def last_ok(self) -> float | None:
        """Monotonic time of the last successful call."""
        return self._link.last_ok

    @property
    def last_ok_wall(self) -> float | None:
        return self._link.last_ok_wall

    @property
    def last_error(self) -> str | None:
        return self._link.last_error

    @property
    def latency_ms(self) -> float | None:
        return self._link.latency_ms

    # ------------------------------------------------------------------------ calls

    async def call(self, fn: Callable[[], Awaitable[T]], *, what: str) -> T:
        """Run one peer operation under the breaker, recording latency and liveness."""
        started = time.perf_counter()
        try:
            with self.breaker.calling():
                result = await fn()
        except pybreaker.CircuitBreakerError:
            raise PeerUnavailable(
                f"peer {self.node_id}: circuit open, "
                f"retry in {breaker_remaining(self.breaker):.1f}s"
            ) from None
        except Exception as exc:
            kind = failure(exc)
            if kind not in _UNWELL:
                raise
            message = _describe(exc, kind)
            self._failed(message, what)
            raise PeerUnavailable(f"peer {self.node_id}: {what} failed: {message}") from None
        elapsed = time.perf_counter() - started
        self._succeeded(elapsed, what)
        return result

    def _succeeded(self, elapsed: float, what: str) -> None:
        link = self._link
        if not link.connected:
            log.info("peer.connected", extra={"peer": self.node_id, "url": self.display_url})
        link.connected = True
        link.last_ok = time.monotonic()
        link.last_ok_wall = time.time()
        link.last_error = None
        if what != "xread":  # a blocking read's latency is the block time, not the peer's
            link.latency_ms = elapsed * 1000
            self._latency.observe(elapsed)
        self._connected.set(1)
        self._stalled.set(0)

    def _failed(self, message: str, what: str) -> None:
        link = self._link
        if link.connected or link.last_error != message:
            log.warning(
                "peer.call_failed",
                extra={"peer": self.node_id, "op": what, "error": message, "url": self.display_url},
            )
        link.connected = False
        link.last_error = message
        self._connected.set(0)

    @property
    def circuit_state(self) -> str:
        return breaker_state(self.breaker)

    def circuit_wait(self) -> float:
        return breaker_remaining(self.breaker)

    def stalled(self, threshold_sec: float) -> bool:
        """No successful call for ``threshold_sec`` (never connected counts as stalled)."""
        return self.last_ok is None or time.monotonic() - self.last_ok > threshold_sec

    # ------------------------------------------------------------------------ reads

    async def ping(self) -> None:
        async def ping() -> Any:
            # On a cluster, the master of the partition's slot: the one node that matters.
            return await self.query.ping(**await node_of(self.query, self.keys.record))

        await self.call(ping, what="ping")

    async def read_batch(
        self, cursor: StreamId, count: int, *, block_ms: int | None
    ) -> tuple[NodeRecord | None, StreamInfo, list[Entry]]:
        """The peer's record, up to ``count`` entries after ``cursor`` and its stream's facts,
        read in that order in one pipeline.

        The order is what makes the read safe, not the pipeline: Redis runs one connection's
        commands in order, but other clients' commands may run between them (a pipeline that
        reaches the server in pieces). The record is read first: whatever it claims was in the
        stream before the entries were read (docs/DELETES.md, "Claims", way 2). The facts are
        read last: trimming only ever removes the oldest entries, so if they show nothing
        trimmed past ``cursor``, nothing was when the entries were read, and a trim that ran
        in between shows as a gap (at worst one that cost nothing: an extra repair).

        With ``block_ms``, an ``XREAD BLOCK`` first waits (up to ``block_ms``) for an entry
        after ``cursor``; only then is the batch read, with the record read before it.
        """
        keys = self.keys
        batch: list[Command] = [
            ("HGET", keys.part_meta, "partitions"),
            ("HGETALL", keys.record),
            ("XRANGE", keys.cdc, f"({cursor}", "+", "COUNT", count),
            ("XINFO", "STREAM", keys.cdc),
        ]
        wire = self._wire
        if wire is not None and block_ms is not None:
            # The wait rides in front of the batch: one round trip for both.
            batch.insert(
                0, ("XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS", keys.cdc, str(cursor))
            )
        elif block_ms is not None:
            stream = self.stream
            assert stream is not None  # a cluster peer's
            await self.call(
                lambda: stream.xread({keys.cdc: str(cursor)}, count=1, block=block_ms),
                what="xread",
            )

        async def run() -> tuple[Any, NodeRecord | None, StreamInfo, list[Entry]] | str:
            if wire is not None:
                timeout = self._op_timeout_sec + (block_ms or 0) / 1000
                replies = await wire.execute(batch, timeout=timeout, blocking=block_ms is not None)
            else:
                async with self.query.pipeline(transaction=False) as pipe:
                    pipe.hget(keys.part_meta, "partitions")
                    pipe.hgetall(keys.record)
                    pipe.xrange(keys.cdc, min=f"({cursor}", max="+", count=count)
                    pipe.xinfo_stream(keys.cdc)
                    replies = await pipe.execute(raise_on_error=False)
            *waited, layout, record_raw, entries_raw, info_raw = replies
            for name, reply in ((keys.record, record_raw), (keys.cdc, info_raw)):
                if isinstance(reply, ResponseError) and str(reply).startswith("WRONGTYPE"):
                    return name  # the peer answered: its store is what is wrong (below)
            for reply in (*waited, entries_raw):
                if isinstance(reply, BaseException):
                    raise reply
            with _reply_of("record, entries or stream facts"):
                record = _record(record_raw)
                return layout, record, parse_stream_info(info_raw), _entries(entries_raw)

        # A wait's latency is the block time, not the peer's: "xread" is not timed.
        what = "xread" if wire is not None and block_ms is not None else "xrange"
        read = await self.call(run, what=what)
        if isinstance(read, str):
            raise PeerLayoutError(
                f"peer {self.node_id}: {read} holds another type than this engine writes there "
                f"(WRONGTYPE): made by hand, or by another program under the prefix "
                f"{keys.prefix!r}; nothing is read from this peer until it is put right"
            )
        layout, record, info, entries = read
        self._check_layout(layout, keys.partition)
        # After the call: a wrong config is not a failure of the link.
        record = self._checked(record)
        self._note_store(layout is None and record is None and not entries)
        return record, info, entries

    def _note_store(self, absent: bool) -> None:
        if absent and not self._link.no_store:
            log.warning(
                "peer.no_store",
                extra={
                    "peer": self.node_id,
                    "prefix": self.keys.prefix,
                    "url": self.display_url,
                    "hint": "nothing is stored under this prefix there: the peer's engine has "
                    "not started yet, or this peer's prefix or redis_url is wrong (it is read "
                    "as an empty store meanwhile)",
                },
            )
        elif not absent and self._link.no_store:
            log.info("peer.store_found", extra={"peer": self.node_id, "prefix": self.keys.prefix})
        self._link.no_store = absent

    def _checked(self, record: NodeRecord | None) -> NodeRecord | None:
        """The peer's record, if it is this peer's (PeerIdentityError if another node's), with
        what no engine could have written left out (:meth:`_plausible`)."""
        if record is None:
            return None
        if record.node_id and record.node_id != self.node_id:
            raise PeerIdentityError(
                f"peer {self.node_id}: the store at {self.display_url} (prefix "
                f"{self.keys.prefix!r}) belongs to node {record.node_id!r}; this peer's "
                f"redis_url or prefix is wrong, or two nodes share a node_id"
            )
        return self._plausible(record)

    def _plausible(self, record: NodeRecord) -> NodeRecord:
        """``record`` without what no engine writes: ids that are no node ids in its lists or
        claims, and claims, a certified ``self`` or a collection frontier past this node's
        clock plus ``local.max_clock_offset_sec`` (the bound past which a write is refused as
        clock skew), bar the all-writes claim about a node the record lists as forgotten.

        A claim lets this node drop what the peer lacks, and a member's frontier lets it
        collect tombstones: one from a broken or hand-edited record would drop live writes
        everywhere it spreads. Left out, such a claim claims nothing, which only ever keeps
        data (a drop or a collection waits). A clock set back here errs the same way. The
        record stays in use; what was left out is logged once per change.
        """
        bound = clock.pack(self._wall_ms() + self._max_ahead_ms, clock.MAX_COUNTER)
        forgotten = frozenset(f for f in record.forgotten if is_node_id(f))
        members = frozenset(m for m in record.members if is_node_id(m))
        problems = [
            f"{name} {text!r} is not a node id"
            for name, ids in (("member", record.members), ("forgotten", record.forgotten))
            for text in sorted(ids - members - forgotten)
        ]
        claims: dict[str, int] = {}
        for origin, claim in record.claims.items():
            if not is_node_id(origin):
                problems.append(f"claim about {origin!r}: not a node id")
            elif claim > bound and not (claim == ALL_WRITES and origin in forgotten):
                problems.append(f"claim about {origin} at {claim:016x}: past this node's clock")
            else:
                claims[origin] = claim
        self_claim, collected = record.self_claim, record.collected
        if self_claim > bound:
            problems.append(f"self at {self_claim:016x}: past this node's clock")
            self_claim = 0
        if collected > bound:
            problems.append(f"collected at {collected:016x}: past this node's clock")
            collected = 0
        said, self._record_problems = self._record_problems, tuple(problems)
        if problems and self._record_problems != said:
            log.warning(
                "peer.record_implausible",
                extra={
                    "peer": self.node_id,
                    "problems": [p[:200] for p in problems[:10]],
                    "hint": "left out of what this node takes from the peer's record (claims "
                    "nothing, drops nothing); a store no engine wrote, or edited by hand",
                },
            )
        if not problems:
            return record
        return replace(
            record,
            claims=claims,
            self_claim=self_claim,
            collected=collected,
            members=members,
            forgotten=forgotten,
        )

    def _check_layout(self, partitions: Any, name: str) -> None:
        """Refuse a partition of a store laid out otherwise than this node reads it: its
        stream holds another share of the keys, and its record's claims cover only those, so
        nothing read from it may be applied or claimed. A partition without a meta has never
        been opened: it holds nothing yet."""
        if partitions is None or isinstance(partitions, BaseException):
            return
        if text(partitions) != str(self.partitions):
            raise PeerLayoutError(
                f"peer {self.node_id}: partition {name} belongs to a store of "
                f"{text(partitions)[:20]} partition(s), this node reads stores of "
                f"{self.partitions} (settings.merkle.partitions must match on every node; "
                f"docs/FORMAT.md, 'Partitions')"
            )

    async def snapshot_facts(self) -> Facts:
        """The peer's record, stream facts and Merkle root, read in that order in one round
        trip: what a repair that starts now may claim once it is complete.

        The partitions of a peer asked within a few milliseconds of each other (every
        partition's repair cycle starts on the same beat) are read in one pipeline, which a
        cluster client sends as one round trip per shard: the in-sync check of a node of many
        partitions costs what it costs a node of one, per shard.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Facts] = loop.create_future()
        batch = self._facts
        batch.waiting.setdefault(self.keys.partition, []).append((waiter, self.counter))
        if batch.task is None:
            batch.task = loop.create_task(self._read_facts(), name=f"peer[{self.node_id}].facts")
        return await waiter

    async def _read_facts(self) -> None:
        batch = self._facts
        try:
            if self.partitions > 1:
                await asyncio.sleep(FACTS_WINDOW_SEC)  # the other partitions' cycles join in
        except asyncio.CancelledError:
            waiting, batch.waiting, batch.task = batch.waiting, {}, None
            _cancel(waiting)
            raise
        waiting, batch.waiting, batch.task = batch.waiting, {}, None
        names = list(waiting)

        async def run() -> list[Facts | PeerLayoutError]:
            async with self.query.pipeline(transaction=False) as pipe:
                for name in names:
                    keys = self.keys.of(name)
                    pipe.hget(keys.part_meta, "partitions")
                    pipe.hgetall(keys.record)
                    pipe.xinfo_stream(keys.cdc)
                    pipe.get(keys.root)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
            for root_raw in replies[3::4]:
                if isinstance(root_raw, BaseException):
                    raise root_raw
            # Made into values within the call: a reply of the wrong shape fails it.
            quads = (replies[4 * at : 4 * at + 4] for at in range(len(names)))
            return [self._facts_of(name, *quad) for name, quad in zip(names, quads, strict=True)]

        try:
            outcomes = await self.call(run, what="snapshot_facts")
        except asyncio.CancelledError:
            _cancel(waiting)  # the loop is closing: so are the reads it owed
            raise
        except Exception as exc:
            for name in names:
                _settle(waiting[name], exc)
            return
        for name, outcome in zip(names, outcomes, strict=True):
            if not isinstance(outcome, PeerLayoutError):
                for _waiter, counter in waiting[name]:
                    counter.round_trips += 1
            _settle(waiting[name], outcome)

    def _facts_of(
        self, name: str, layout: Any, record_raw: Any, info_raw: Any, root_raw: Any
    ) -> Facts | PeerLayoutError:
        """Partition ``name``'s facts from its replies, or the layout error that refuses them."""
        try:
            self._check_layout(layout, name)
            with _reply_of("record"):
                record = _record(record_raw)
            record = self._checked(record)
        except PeerLayoutError as exc:
            return exc
        with _reply_of("stream facts or root"):
            root = ZERO if root_raw is None else bytes.fromhex(root_raw.decode("ascii"))
            return record, parse_stream_info(info_raw), root

    async def record(self) -> NodeRecord | None:
        return self._checked(await self.call(self.reader.node_record, what="record"))

    async def clock(self) -> int:
        """The peer store's HLC (0 when it has none): a floor for a store that lost its own."""

        async def run() -> int:
            raw = await self.query.get(self.keys.hlc)
            with _reply_of("clock"):
                return clock.from_hex(raw) if raw else 0

        return await self.call(run, what="clock")

    async def stream_info(self) -> StreamInfo:
        async def run() -> StreamInfo:
            async with self.query.pipeline(transaction=False) as pipe:
                pipe.xinfo_stream(self.keys.cdc)
                (raw,) = await pipe.execute(raise_on_error=False)
            with _reply_of("stream facts"):
                return parse_stream_info(raw)

        return await self.call(run, what="xinfo")

    async def close(self) -> None:
        if self._is_view:
            return  # the peer's connections are closed by the peer
        for wire in self._wires:
            wire.close()
        for client in (self.query, self.stream):
            if client is None:
                continue
            try:
                await client.aclose()
            except Exception as exc:  # closing a dead connection must not fail shutdown
                log.debug(
                    "peer.close_failed",
                    exc_info=True,
                    extra={"peer": self.node_id, "error": _describe(exc)},
                )


def _describe(exc: BaseException, kind: Failure | None = None) -> str:
    text = str(exc) or type(exc).__name__
    words = text if isinstance(exc, _MalformedReply) else f"{type(exc).__name__}: {text}"
    if kind is Failure.MALFORMED:
        words = f"malformed reply: {words}"
    return redact_url(words)[:300]
