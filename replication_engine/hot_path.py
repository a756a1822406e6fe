"""The hot path: one tailer per peer, turning the peer's CDC stream into local applies.

Per batch: read (XRANGE while catching up, XREAD BLOCK at the head), decode and verify, quarantine
what fails, drop echoes of our own writes, coalesce per key, apply through the store's one apply
path, and only then save the cursor. A crash anywhere re-reads at most one batch, or, at the
head of a busy stream, where saves are spaced ``CURSOR_SAVE_EVERY_SEC`` apart, at most that long's
batches: the idempotent apply absorbs both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

import pybreaker

from replication_engine import clock, codec
from replication_engine.codec import Change, CodecError, StreamId
from replication_engine.config import EngineConfig
from replication_engine.cursor import CursorError, CursorStore
from replication_engine.errors import ReplicationError
from replication_engine.knowledge import ApplyStatus, NodeRecord, sid_key
from replication_engine.observability.metrics import Metrics
from replication_engine.observability.tracing import continue_trace
from replication_engine.peer import Entry, Peer, PeerUnavailable, StreamInfo
from replication_engine.resilience import (
    AimdBatchSizer,
    Backoff,
    EventRateLimiter,
    breaker_remaining,
    sleep_or_stop,
)
from replication_engine.store.protocol import PreparedApply, Store, StreamBatch
from replication_engine.store.redis_store import StoreKeyError

log = logging.getLogger(__name__)

_PRESSURE_POLL_SEC = 0.5
# Entries decoded between yields to the event loop (see Tailer._decode).
_DECODE_SLICE = 64
# At the head of a stream that grows by at least BUSY_STREAM_PER_SEC entries a second, the
# longest a cursor that is applied goes unsaved: one SQLite write per read there cost a tenth of
# a read cycle's CPU. Otherwise a tailer saves after every batch, and it always saves when it
# stops; a blocking read with a cursor unsaved ends by this deadline. So only a crash re-reads,
# at most this long's batches.
CURSOR_SAVE_EVERY_SEC = 1.0
# Set apart from the read interval (it was one entry per interval, 100/s at the 10 ms default),
# so that a shorter interval does not bring back a save per batch at 100-200 writes/s.
BUSY_STREAM_PER_SEC = 100.0
# Weight of the newest batch in the running mean of entry sizes that bounds reads in bytes.
_ENTRY_SIZE_WEIGHT = 0.3
# Entries a read asks for before any entry's size is known (see Tailer._read_count).
_FIRST_READ_ENTRIES = 2


class _Outcome(Enum):
    """How an attempt at a commit behind another ended, besides applied or failed."""

    BEHIND_STOPPED = "the commit before stopped with its batch unapplied"
    OUT_OF_TURN = "the store had not applied the batch before: send this one again"


def _committed(task: asyncio.Task[bool]) -> bool:
    """Whether a finished commit task applied its batch and saved its cursor."""
    return not task.cancelled() and task.exception() is None and task.result()


def _observe(task: asyncio.Task[Any]) -> None:
    """Retrieve ``task``'s outcome whenever it ends, for a task that is given up on.

    A task waited for only within a bound (a read that swallowed its cancellation while
    connecting, an apply that outlasted the shutdown bound) may still fail after the wait, and
    asyncio then logs "Task exception was never retrieved" with a traceback: noise that looks
    like a crash in an operator's log, for a failure the tailer already handles by re-reading.
    """
    task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class TailerMode(StrEnum):
    """What a tailer is doing: status "mode", and the metric replication_tailer_mode, which
    publishes every member (so a dashboard sees a mode end as well as begin)."""

    STARTING = "starting"
    BOOTSTRAPPING = "bootstrapping"
    CATCHING_UP = "catching_up"
    TAILING = "tailing"
    WAITING_FOR_PEER = "waiting_for_peer"
    BACKPRESSURE = "backpressure"
    LOCAL_STORE_UNAVAILABLE = "local_store_unavailable"
    CURSOR_SAVE_FAILED = "cursor_save_failed"
    PEER_MISMATCH = "peer_mismatch"  # the store at the peer's address is not this peer's
    STOPPED = "stopped"

    @property
    def vouches(self) -> bool:
        """Whether a node whose tailer is in this mode can be vouched for by its lag figure:
        not while the tailer has not read yet, copies a snapshot, or cannot apply or save."""
        return self not in _UNVOUCHED


_ALL_MODES = tuple(TailerMode)
_UNVOUCHED = frozenset(
    {
        TailerMode.STARTING,
        TailerMode.BOOTSTRAPPING,
        TailerMode.BACKPRESSURE,
        TailerMode.LOCAL_STORE_UNAVAILABLE,
        TailerMode.CURSOR_SAVE_FAILED,
        TailerMode.PEER_MISMATCH,
    }
)


@dataclass(frozen=True, slots=True)
class TailerSettings:
    """A tailer's settings. The configuration is their one source (:meth:`from_config`); only
    what an operator has no reason to tune has a default here."""

    batch_size: int
    min_batch_size: int
    max_batch_size: int
    adaptive: bool
    block_timeout_sec: float
    flush_slo_sec: float
    read_slo_sec: float
    rate_limit_per_sec: float | None
    rate_limit_burst: int
    shutdown_timeout_sec: float
    # Re-emit applied versions on the local stream (chains and trees need it; see apply_batch).
    relay: bool
    # At the head of the stream, the least time between the starts of two reads (see _read).
    min_read_interval_sec: float
    # Bytes of entries one read aims at (the read count shrinks for big entries) and one apply
    # call carries at most (the store splits a bigger batch).
    max_batch_bytes: int
    # Versions stamped further ahead of this node's wall clock are refused (clock skew).
    max_clock_offset_ms: int
    max_payload: int = codec.DEFAULT_MAX_PAYLOAD
    retry_base_sec: float = 0.05
    retry_max_sec: float = 5.0

    @classmethod
    def from_config(cls, config: EngineConfig) -> TailerSettings:
        hot, slo = config.settings.hot_path, config.settings.slo
        return cls(
            batch_size=hot.batch_size,
            min_batch_size=hot.min_batch_size,
            max_batch_size=hot.max_batch_size,
            adaptive=hot.adaptive_batch_size,
            block_timeout_sec=hot.block_timeout_sec,
            flush_slo_sec=slo.max_batch_flush_latency_ms / 1000,
            read_slo_sec=slo.max_stream_read_latency_ms / 1000,
            rate_limit_per_sec=hot.rate_limit_per_sec if hot.rate_limit_enabled else None,
            rate_limit_burst=hot.rate_limit_burst,
            shutdown_timeout_sec=hot.shutdown_timeout_sec,
            relay=config.relay,
            min_read_interval_sec=hot.min_read_interval_sec,
            max_batch_bytes=hot.max_batch_bytes,
            max_clock_offset_ms=int(config.local.max_clock_offset_sec * 1000),
        )


@dataclass(slots=True)
class TailerStats:
    read: int = 0
    applied: int = 0
    deduped: int = 0
    echoes: int = 0
    quarantined: int = 0
    batches: int = 0
    gaps: int = 0
    apply_failures: int = 0
    backpressure_pauses: int = 0
    known: int = 0  # at or below this store's claim for their origin (replays, copies)
    refused: int = 0  # the store refused them (a wrong-typed key): quarantined
    # Batches sent behind one still being applied and answered out of turn, because that one
    # failed; each is sent again in its turn. Rises with apply_failures during a catch-up.
    out_of_turn: int = 0


class _PeerSeries:
    """The tailer's metric series, labelled once: a read cycle at the head updates a dozen of
    them, and finding a labelled child costs more than updating it."""

    def __init__(self, metrics: Metrics, peer_id: str) -> None:
        self.batch_size = metrics.batch_size.labels(peer_id)
        self.events_read = metrics.events_read.labels(peer_id)
        self.events_applied = metrics.events_applied.labels(peer_id)
        self.events_deduped = metrics.events_deduped.labels(peer_id)
        self.batch_flushes = metrics.batch_flushes.labels(peer_id)
        self.batch_flush_seconds = metrics.batch_flush_seconds.labels(peer_id)
        self.lag = metrics.lag.labels(peer_id)
        self.lag_events = metrics.lag_events.labels(peer_id)


@dataclass(slots=True)
class _Send:
    """A commit's sends, for the commit behind it (see ``Tailer._turn``)."""

    # How many applies had missed when its current attempt went out; None before the first.
    misses: int | None = None
    # Set once its first attempt has gone out, or once it is done, whichever comes first.
    went: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


@dataclass(frozen=True, slots=True)
class _Read:
    """A read started ahead of its turn, and the count it asked for."""

    task: asyncio.Task[tuple[NodeRecord | None, StreamInfo, list[Entry]]]
    count: int


@dataclass(frozen=True, slots=True)
class Batch:
    """Decoded changes, coalesced per key, the same packed for the store (None if empty), and
    where in the peer's stream they came from (None: nothing to record)."""

    changes: list[Change]
    prepared: PreparedApply | None
    source: StreamBatch | None = None
    gap: bool = False  # entries were missed before this batch: ask for a repair once applied


class CursorSaveFailed(ReplicationError, RuntimeError):
    """The cursor could not be saved: the tailer stops applying rather than run ahead of it."""


Bootstrap = Callable[[Peer], Awaitable[StreamId]]


# Called with (peer, keys, reason) when entries had to be set aside: the cold path repairs the
# keys from the peer's stored items.
RepairRequest = Callable[[str, Sequence[str], str], None]


class Tailer:
    """One peer's stream, applied here in order.

    Besides the data, each batch carries what it proves (docs/DELETES.md, "Claims"): where
    this store now stands in the peer's stream, and, for a read that reached the stream's end,
    the claims the peer's record makes about what its stream holds. The store takes them only
    when it has applied the stream contiguously. While an entry it set aside (quarantined,
    clock-skewed or refused) waits for its repair, the tailer claims nothing.
    """

    def __init__(
        self,
        peer: Peer,
        store: Store,
        cursors: CursorStore,
        *,
        local_node_id: str,
        settings: TailerSettings,
        metrics: Metrics,
        local_breaker: pybreaker.CircuitBreaker,
        on_gap: Callable[[str], None] = lambda peer_id: None,
        on_unanchored: Callable[[str], None] = lambda peer_id: None,
        on_quarantine: RepairRequest = lambda peer_id, keys, reason: None,
        repair_pending: Callable[[str], bool] = lambda peer_id: False,
        bootstrap: Bootstrap | None = None,
        wall_ms: Callable[[], int] = clock.wall_clock_ms,
    ) -> None:
        self.peer = peer
        self.store = store
        self.cursors = cursors
        self.local_node_id = local_node_id
        self.settings = settings
        self.metrics = metrics
        self.local_breaker = local_breaker
        self.on_gap = on_gap
        self.on_unanchored = on_unanchored
        self.on_quarantine = on_quarantine
        self.repair_pending = repair_pending
        self.bootstrap = bootstrap
        self._wall_ms = wall_ms  # the store's wall clock: what "too far ahead" is judged by
        self.sizer = AimdBatchSizer(
            settings.batch_size,
            settings.min_batch_size,
            settings.max_batch_size,
            adaptive=settings.adaptive,
        )
        self.limiter = (
            EventRateLimiter(settings.rate_limit_per_sec, settings.rate_limit_burst)
            if settings.rate_limit_per_sec
            else None
        )
        self.stats = TailerStats()
        # Everything up to here is applied; saved too, but for at most CURSOR_SAVE_EVERY_SEC.
        self.cursor: StreamId | None = None
        self._read_pos: StreamId | None = None  # decoded, maybe not yet applied (pipelining)
        self._head_read_at: float | None = None  # when the last read at the head started
        self._last_read_had_entries = False
        self._saved: StreamId | None = None  # the cursor in the database, as last read or saved
        self._saved_at = 0.0  # when (monotonic)
        self._committed_at = 0.0  # when the last commit finished (perf_counter)
        self.tail: StreamId | None = None
        self.lag_ms: int | None = None  # unknown until the first read answers
        self.lag_events: int | None = None
        self._mode = TailerMode.STARTING
        self.catching_up = True
        self.last_batch_at: float | None = None
        self.last_gap_at: float | None = None
        self.growth_per_sec: float | None = None
        self.last_read_at: float | None = None
        self.record: NodeRecord | None = None  # the peer's record, as of the last read
        self._growth_mark: tuple[float, int] | None = None
        self._gap_seen: tuple[StreamId | None, StreamId | None] | None = None
        self._entry_bytes: float | None = None  # running mean size of one entry
        self._stop = asyncio.Event()
        self._stop_signal: asyncio.Future[None] | None = None  # set with _stop, awaitable
        self._retry = Backoff(settings.retry_base_sec, settings.retry_max_sec)
        # The applies that did not land (failed, or answered out of turn), and each commit in
        # flight's sends: see _turn.
        self._misses = 0
        self._sends: dict[asyncio.Task[Any] | None, _Send] = {}
        self._peer_id = peer.node_id
        self._series = _PeerSeries(metrics, self._peer_id)
        self._series.batch_size.set(self.sizer.size)
        metrics.publish_tailer_mode(self._peer_id, self._mode, _ALL_MODES)

    @property
    def mode(self) -> TailerMode:
        """What the tailer is doing (published as a metric)."""
        return self._mode

    @mode.setter
    def mode(self, mode: TailerMode) -> None:
        # Every read sets it; the series are written only when it changes.
        if mode != self._mode:
            self._mode = mode
            self.metrics.publish_tailer_mode(self._peer_id, mode, _ALL_MODES)

    # ------------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop.set()
        if self._stop_signal is not None and not self._stop_signal.done():
            self._stop_signal.set_result(None)

    def _stopping(self) -> asyncio.Future[None]:
        """A future done once stopped: read and linger race it without a task per wait."""
        if self._stop_signal is None:
            self._stop_signal = asyncio.get_running_loop().create_future()
            if self._stop.is_set():
                self._stop_signal.set_result(None)
        return self._stop_signal

    async def run(self) -> None:
        """The task body. Returns when stopped; raises only on a bug or a cursor failure.

        While catching up, the work is a three-stage pipeline over two servers and this
        process: batch N+1 is read from the peer and decoded here while batch N is applied by
        the local Redis. Batch N+1's apply is sent as soon as it is decoded, behind batch N's
        if that is still running, so the local Redis goes from one to the next without waiting
        for this process to take N's reply; the store applies it only if N was applied (mode
        ``n``, see ``_may_pipeline``). Commits finish strictly in stream order, so the saved
        cursor only ever covers applied batches. At the head of the stream each batch is
        committed before the next read, which then starts where it ended.
        """
        try:
            if self.cursor is None:
                cursor = await self._initial_cursor()
                if cursor is None:
                    return
                self.cursor = cursor
            ahead: _Read | None = None
            committing: list[asyncio.Task[bool]] = []  # in stream order, at most two
            try:
                while not self._stop.is_set():
                    if ahead is None and not await self._finish(committing, keep=0):
                        break
                    read = await self._read(ahead)
                    ahead = None
                    if read is None:
                        continue
                    record, info, entries, requested = read
                    full = len(entries) >= requested
                    if full:
                        # More is waiting: read the next batch while this one is decoded and
                        # applied (the peer's Redis, this process and ours work in parallel).
                        after = codec.parse_stream_id(entries[-1][0])
                        count = self._read_count()
                        ahead = _Read(
                            asyncio.create_task(
                                self.peer.read_batch(after, count, block_ms=None),
                                name=f"tailer[{self._peer_id}].read_ahead",
                            ),
                            count,
                        )
                    prepared = await self._prepare(record, info, entries, requested)
                    pipelined = full and prepared is not None and self._may_pipeline(prepared[3])
                    if not await self._finish(committing, keep=1 if pipelined else 0):
                        break  # stopping with an earlier batch unapplied: re-read later
                    if prepared is not None:
                        if full:
                            committing.append(
                                asyncio.create_task(
                                    self._commit_prepared(
                                        *prepared, behind=committing[-1] if committing else None
                                    ),
                                    name=f"tailer[{self._peer_id}].commit",
                                )
                            )
                        else:
                            await self._commit_prepared(*prepared)
            finally:
                await self._settle(ahead, committing)
            await self._save_cursor()
        finally:
            self.mode = TailerMode.STOPPED

    @staticmethod
    async def _finish(committing: list[asyncio.Task[bool]], *, keep: int) -> bool:
        """Wait for the oldest commits until ``keep`` are left in flight; False when one
        stopped with its batch unapplied (so none after it saved its cursor either)."""
        while len(committing) > keep:
            if not await committing.pop(0):
                return False
        return True

    def _may_pipeline(self, batch: Batch) -> bool:
        """Whether ``batch`` may be sent while the one before it is still being applied.

        Only a batch read on from the last (mode ``c``), in one apply call, to a store whose
        applies reach Redis in the order they were sent: the store then applies it only if its
        anchor shows the batch before it applied (mode ``n``), and says so when it did not,
        which the commit answers by sending it again in its turn. A batch after a gap, or from
        the stream's start, is sent in its turn, as is any batch with claims: what it claims
        may depend on a refusal in the reply not read yet (docs/DELETES.md, "Claims").
        """
        source = batch.source
        if source is None or source.mode != "c" or source.claims:
            return False
        if batch.prepared is not None and len(batch.prepared.chunks) > 1:
            return False
        return self.store.applies_in_order

    async def _settle(self, ahead: _Read | None, committing: list[asyncio.Task[bool]]) -> None:
        """On the way out: drop the read in flight, let the commits in flight finish (bounded)."""
        if ahead is not None:
            ahead.task.cancel()
            # wait() never raises the read's own outcome, but a cancellation of this task
            # still propagates (suppressing BaseException around an await would swallow it).
            await asyncio.wait({ahead.task})
            _observe(ahead.task)  # a read that failed as it was dropped
        bound = self.settings.shutdown_timeout_sec
        if running := {task for task in committing if not task.done()}:
            # A commit that is cancelled still completes its attempt and saves its cursor
            # within the shutdown bound (see _commit); a graceful stop just lets it run.
            await asyncio.wait(running, timeout=bound)
        if running := {task for task in committing if not task.done()}:
            for task in running:
                task.cancel()
            await asyncio.wait(running, timeout=bound)
        for task in committing:
            _observe(task)  # a cursor failure already surfaced or will again

    # ------------------------------------------------------------------------ start position

    async def _initial_cursor(self) -> StreamId | None:
        """Where to read from: the saved cursor, or the store's own position when it is older.

        The store records how far it applied the peer's stream in the same step as the data
        (its anchor). A store restored from a backup, or a cursor database newer than the
        store, leaves the anchor behind the cursor: re-reading from the anchor applies what
        the store lost (what was trimmed meanwhile is a gap the cold path repairs).
        """
        saved = await self.cursors.get(self._peer_id)
        stored = await self._stored_position()
        if saved is not None:
            cursor = self._saved = codec.parse_stream_id(saved)
            if stored is not None and stored < cursor:
                log.warning(
                    "store.behind_cursor",
                    extra={
                        "peer": self._peer_id,
                        "cursor": saved,
                        "store_position": str(stored),
                        "hint": "resuming from the store's position, older than the cursor "
                        "database's (the store went back, or lost writes)",
                    },
                )
                return stored
            log.info("tailer.resumed_from_cursor", extra={"peer": self._peer_id, "cursor": saved})
            return cursor
        if stored is not None:
            log.info(
                "tailer.resumed_from_store",
                extra={
                    "peer": self._peer_id,
                    "cursor": str(stored),
                    "hint": "no saved cursor: resuming from the store's position",
                },
            )
            return stored
        start_from = self.peer.start_from
        if start_from == "snapshot" and self.bootstrap is not None:
            self.mode = TailerMode.BOOTSTRAPPING
            while not self._stop.is_set():
                try:
                    return await self.bootstrap(self.peer)
                except PeerUnavailable as exc:
                    await self._wait_for_peer(str(exc))
            return None
        if start_from == "latest":
            while not self._stop.is_set():
                try:
                    info = await self.peer.stream_info()
                    return info.last or codec.STREAM_START
                except PeerUnavailable as exc:
                    await self._wait_for_peer(str(exc))
            return None
        return codec.STREAM_START

    async def _stored_position(self) -> StreamId | None:
        """The store's position in the peer's stream (None: none, or the store is down).

        With the store down the saved cursor is used: nothing can be applied until it is back,
        and a store that comes back having lost writes is found by its certification, while
        the anchor keeps the batches read meanwhile from claiming anything.
        """
        try:
            record = await self.store.record()
        except Exception as exc:
            log.warning(
                "tailer.store_unreadable",
                extra={
                    "peer": self._peer_id,
                    "error": f"{type(exc).__name__}: {exc}"[:200],
                    "hint": "the local store is unreadable at start; resuming from the saved "
                    "cursor",
                },
            )
            return None
        anchor = record.anchors.get(self._peer_id) if record is not None else None
        return None if anchor is None else StreamId(*anchor.stream_id)

    # ------------------------------------------------------------------------ reading

    def _read_count(self) -> int:
        """The AIMD batch size, cut so one read stays near ``max_batch_bytes``.

        Until an entry has been read, nothing bounds a read's bytes but its count: the first
        reads take two entries (a read that brings fewer reached the head, as a single write
        at a quiet head does), so a backlog of big entries (60 MB each, say) is never asked
        for a batch at a time before their size is known.
        """
        if self._entry_bytes is None:
            return _FIRST_READ_ENTRIES
        count = self.sizer.size
        if self._entry_bytes:
            count = min(count, max(1, int(self.settings.max_batch_bytes // self._entry_bytes)))
        return count

    async def _read(
        self, ahead: _Read | None = None
    ) -> tuple[NodeRecord | None, StreamInfo, list[Entry], int] | None:
        """The next batch after the cursor (or the read already started ahead of it), with the
        peer's record read just before it and the count it asked for (a full batch means more
        is waiting)."""
        assert self.cursor is not None
        block_ms = None if self.catching_up else max(1, int(self.settings.block_timeout_sec * 1000))
        self.mode = TailerMode.CATCHING_UP if self.catching_up else TailerMode.TAILING
        if ahead is None:
            self._read_pos = None  # nothing in flight: this read starts at the saved cursor
            if block_ms is not None:
                if await self._linger():
                    return None
                if self._entries_waiting():
                    block_ms = None
                elif self.cursor != self._saved:
                    if self._may_defer_save():
                        # A busy stream that paused: wait no longer than the save falls due.
                        due = self._saved_at + CURSOR_SAVE_EVERY_SEC - time.monotonic()
                        block_ms = max(1, min(block_ms, int(due * 1000)))
                    else:
                        await self._save_cursor()  # the stream may stay quiet for long
            count = self._read_count()
            read = asyncio.create_task(
                self.peer.read_batch(self.cursor, count, block_ms=block_ms),
                name=f"tailer[{self._peer_id}].read",
            )
        else:
            read, count = ahead.task, ahead.count
        started = time.perf_counter()
        try:
            racing: set[asyncio.Future[Any]] = {read, self._stopping()}
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            _observe(read)  # this task is cancelled: nobody reads the read's outcome, done or not
            raise
        finally:
            if not read.done():  # stopping: nothing is in hand yet, so dropping the read is safe
                read.cancel()
                # Bounded: redis-py can swallow a cancellation while it is connecting.
                await asyncio.wait({read}, timeout=1.0)
                _observe(read)  # it may still fail after that, with nobody reading it
        if self._stop.is_set() and not read.done():
            return None
        try:
            result = read.result()
        except asyncio.CancelledError:
            return None
        except PeerUnavailable as exc:
            await self._wait_for_peer(str(exc))
            return None
        if block_ms is None and time.perf_counter() - started > self.settings.read_slo_sec:
            self.metrics.slo_breaches.labels("stream_read_latency").inc()
        self._retry.reset()
        record, info, entries = result
        self._last_read_had_entries = bool(entries)
        return record, info, entries, count

    def _entries_waiting(self) -> bool:
        """Whether entries have almost surely arrived since the last read, so the read can skip
        the blocking wait (a round trip that only says "something is there").

        Judged by the stream's own write rate: the last read brought entries, and at the rate
        the stream grows at least one more has been written since. A stream that went quiet
        meanwhile costs one read that comes back empty; the next one waits again.
        """
        if not self._last_read_had_entries or not self.growth_per_sec or self.last_read_at is None:
            return False
        return self.growth_per_sec * (time.monotonic() - self.last_read_at) >= 1.0

    async def _linger(self) -> bool:
        """Space reads at the head ``min_read_interval_sec`` apart; True when stopped meanwhile.

        XREAD BLOCK returns as soon as one entry arrives, so under a steady write rate every
        read would carry one or two entries and each would pay a full read, apply and cursor
        save. Waiting out the rest of the interval lets the writes of that interval arrive
        together: at most the interval of added lag, for far fewer round trips per write. A
        read that blocked longer than the interval (a quiet stream) starts at once.
        """
        now = time.monotonic()
        wait = 0.0
        if self._head_read_at is not None:
            wait = self._head_read_at + self.settings.min_read_interval_sec - now
        if wait > 0:
            await asyncio.wait({self._stopping()}, timeout=wait)
            if self._stop.is_set():
                return True
        self._head_read_at = time.monotonic()
        return False

    async def _wait_for_peer(self, reason: str) -> None:
        self.mode = TailerMode.WAITING_FOR_PEER
        delay = max(self.peer.circuit_wait(), self._retry.next_delay())
        log.debug(
            "tailer.waiting_for_peer",
            extra={"peer": self._peer_id, "error": reason, "delay_seconds": round(delay, 3)},
        )
        await sleep_or_stop(self._stop, delay)

    # ------------------------------------------------------------------------ one batch

    async def _prepare(
        self, record: NodeRecord | None, info: StreamInfo, entries: list[Entry], requested: int
    ) -> tuple[StreamInfo, int, int, Batch, StreamId] | None:
        """Gap check, decode and quarantine: everything before the apply.

        Returns what ``_commit_prepared`` needs, or None when there is nothing to apply or
        record (an empty read whose claims the store already has).
        """
        position = self.cursor if self._read_pos is None else self._read_pos
        assert position is not None
        self.tail = info.last
        self.record = record
        self._publish_lag(info)  # before applying: a batch that cannot be applied still counts
        gap = info.trimmed_past(position)
        # Reported once the batch is applied (a batch read ahead may be dropped unapplied).
        new_gap = gap and (info.first, info.max_deleted) != self._gap_seen
        if entries:
            changes, last_id, set_aside = await self._decode(entries, position)
        else:
            changes, last_id, set_aside = [], position, False
            self.catching_up = False
            self.sizer.observe(0)
            self._publish_lag(info)
            self._series.batch_size.set(self.sizer.size)
        self._read_pos = last_id
        prepared = self.store.prepare_apply(changes, relay=self.settings.relay) if changes else None
        rejected = prepared is not None and len(prepared.accepted) < prepared.size
        reached_end = len(entries) < requested
        # An entry set aside or refused is a hole in what the store holds of the stream, as
        # a gap is: the batch unanchors the store (durably, unlike the repair asked for), so
        # no batch claims past it, in this process or after a restart, until a complete
        # repair has fetched it.
        hole = set_aside or rejected
        source = self._source(record, position, last_id, gap or hole, reached_end and not hole)
        if not entries and source is None:
            if new_gap:
                self._note_gap(info)  # nothing to apply, so nothing to wait for
            return None
        batch = Batch(changes, prepared, source, new_gap)
        return info, requested, len(entries), batch, last_id

    def _source(
        self,
        record: NodeRecord | None,
        first: StreamId,
        last: StreamId,
        gap: bool,
        may_claim: bool,
    ) -> StreamBatch | None:
        """What this batch tells the store about the peer's stream (None: nothing new)."""
        if record is None:
            return None  # a peer without a record (an engine that predates records)
        if gap:
            mode = "g"
        elif first == codec.STREAM_START and record.holds_whole_stream:
            mode = "f"  # from the start of a stream that holds every write its claims cover
        else:
            mode = "c"
        claims: dict[str, int] = {}
        if may_claim and not self.repair_pending(self._peer_id):
            claims = record.stream_claims()
        if first == last and mode == "c" and not claims:
            return None  # an empty read: worth a call only to anchor, unanchor or raise claims
        return StreamBatch(
            self._peer_id,
            record.token,
            sid_key(first.ms, first.seq),
            sid_key(last.ms, last.seq),
            mode,
            claims,
        )

    async def _commit_prepared(
        self,
        info: StreamInfo,
        requested: int,
        read: int,
        batch: Batch,
        last_id: StreamId,
        behind: asyncio.Task[bool] | None = None,
    ) -> bool:
        """Apply and save one decoded batch, then adapt the batch size. False when stopped.

        ``behind``: the commit of the batch before this one, if still in flight (see run).
        """
        flush_started = time.perf_counter()
        if not await self._commit(batch, last_id, behind):
            self._read_pos = None  # the next read goes from the saved cursor
            return False
        # Time spent queued behind the batch before is not this batch's: the sizer and the
        # flush SLO judge what the store took for this one.
        flush = time.perf_counter() - max(flush_started, self._committed_at)
        self._committed_at = time.perf_counter()
        if batch.gap and (info.first, info.max_deleted) != self._gap_seen:
            # Asked only now: a repair that begins after this batch is applied covers both the
            # entries missed and this batch, and so lets the store anchor here again.
            self._note_gap(info)
        self.catching_up = read >= requested
        if read:
            self.sizer.observe(
                read,
                requested=requested,
                flush_seconds=flush,
                flush_slo_seconds=self.settings.flush_slo_sec,
            )
        self._series.batch_size.set(self.sizer.size)
        self._publish_lag(info)
        return True

    def _note_gap(self, info: StreamInfo) -> None:
        """Count the gap and ask for its repair: once per gap, however many batches see it."""
        self._gap_seen = (info.first, info.max_deleted)
        self.stats.gaps += 1
        self.last_gap_at = time.time()
        self.metrics.stream_gaps.labels(self._peer_id).inc()
        log.warning(
            "tailer.gap",
            extra={
                "peer": self._peer_id,
                "cursor": str(self.cursor),
                "first_entry": str(info.first),
                "newest": str(info.last),
                "max_deleted": str(info.max_deleted),
                "hint": self._gap_hint(info),
            },
        )
        self.on_gap(self._peer_id)

    def _gap_hint(self, info: StreamInfo) -> str:
        cursor = self.cursor or codec.STREAM_START
        if info.last is None and cursor != codec.STREAM_START:
            return (
                "the peer's stream is gone (deleted): whatever it held past our cursor was "
                "missed; the cold path repairs it"
            )
        if info.went_back(cursor):
            return (
                "the peer's stream was deleted and written again, its newest id below our "
                "cursor: entries were missed, and the new ones are repaired by the cold path "
                "until the stream's ids pass the cursor"
            )
        return (
            "the peer's stream lost entries past our cursor (trimmed, deleted, or deleted and "
            "written again): they were missed; the cold path repairs them"
        )

    async def _decode(
        self, entries: list[Entry], position: StreamId
    ) -> tuple[list[Change], StreamId, bool]:
        """Decode, verify and coalesce a batch, yielding to the event loop as it goes.

        A batch takes milliseconds of CPU; yielding every ``_DECODE_SLICE`` entries lets the
        apply of the previous batch go out (and its reply come back) meanwhile, so the local
        Redis is not left idle, and keeps other peers' tailers and the HTTP server responsive.

        An entry stamped too far ahead of this node's clock is set aside before coalescing, so
        that it cannot displace an earlier valid version of its key from the batch. Returns the
        changes, the last id read, and whether anything was set aside (quarantined).
        """
        coalesced: dict[str, Change] = {}
        rejected: list[str] = []
        skewed: list[str] = []
        last_id = position
        size = 0
        future = self._wall_ms() + self.settings.max_clock_offset_ms
        # Read once, not per entry: this loop is most of a catch-up's own CPU.
        peer_id, max_payload, local_id = (
            self._peer_id,
            self.settings.max_payload,
            self.local_node_id,
        )
        for n, (raw_id, fields) in enumerate(entries):
            if n and n % _DECODE_SLICE == 0:
                await asyncio.sleep(0)
            if fields:  # len() mapped in C: a generator here cost more than the rest of a step
                size += sum(map(len, fields)) + sum(map(len, fields.values()))
            try:
                sid = codec.parse_stream_id(raw_id)
            except CodecError as exc:
                # Redis sends none, a server posing as one may: kept and counted as any other
                # rejected entry, under the last good position, where the cursor stays.
                key = codec.key_hint(fields)
                await self._quarantine(last_id, key, exc, fields)
                rejected.append(key or "")
                continue
            last_id = sid
            try:
                change = codec.decode_entry(
                    sid, fields, default_origin=peer_id, max_payload=max_payload
                )
            except CodecError as exc:
                key = codec.key_hint(fields)
                await self._quarantine(sid, key, exc, fields)
                rejected.append(key or "")
                continue
            if change.origin == local_id:
                self.stats.echoes += 1
                self.metrics.echoes.labels(self._peer_id).inc()
                continue
            if change.hlc >> clock.COUNTER_BITS > future:  # its physical_ms, without a call
                await self._quarantine(
                    sid,
                    change.key,
                    CodecError(
                        f"HLC {change.hlc:016x} is beyond the allowed clock offset: "
                        "the origin's clock is ahead",
                        reason="clock_skew",
                    ),
                    fields,
                )
                skewed.append(change.key)
                continue
            change.value = None  # verified; only the wire bytes are applied, keep memory bounded
            coalesced.pop(change.key, None)
            coalesced[change.key] = change
        self.stats.read += len(entries)
        self._series.events_read.inc(len(entries))
        if entries:
            mean = size / len(entries)
            self._entry_bytes = (
                mean
                if self._entry_bytes is None
                else (1 - _ENTRY_SIZE_WEIGHT) * self._entry_bytes + _ENTRY_SIZE_WEIGHT * mean
            )
        if rejected:
            self.on_quarantine(self._peer_id, [k for k in rejected if k], "quarantine")
        if skewed:
            self.on_quarantine(self._peer_id, skewed, "clock_skew")
        return list(coalesced.values()), last_id, bool(rejected or skewed)

    async def _quarantine(
        self, sid: StreamId, key: str | None, exc: CodecError, fields: Mapping[Any, Any]
    ) -> None:
        self.stats.quarantined += 1
        self.metrics.events_quarantined.labels(self._peer_id, exc.reason).inc()
        log.warning(
            "tailer.quarantined",
            extra={
                "peer": self._peer_id,
                "stream_id": str(sid),
                "key": key,
                "reason": exc.reason,
                "error": str(exc)[:200],
            },
        )
        # The row's reason starts with the code, as every other quarantine row's does, so that
        # `quarantine --reason clock_skew` (a prefix) finds what the metric counted.
        text = str(exc)
        if not text.startswith(exc.reason):
            text = f"{exc.reason}: {text}"
        try:
            evicted = await self.cursors.quarantine_add(
                self._peer_id, str(sid), key, text[:500], fields
            )
            self.metrics.quarantine_evicted.inc(evicted)
        except CursorError:
            log.exception(
                "tailer.quarantine_failed",
                extra={"peer": self._peer_id, "stream_id": str(sid), "key": key},
            )
            raise

    # ------------------------------------------------------------------------ apply + cursor

    async def _commit(
        self, batch: Batch, last_id: StreamId, behind: asyncio.Task[bool] | None = None
    ) -> bool:
        """Apply ``batch`` then save ``last_id``, retrying with backoff until done or stopped.

        Once stopping, the batch in hand gets one more attempt and is otherwise left unapplied
        (its cursor unsaved, so it is re-read on the next start). Each attempt runs shielded:
        if the task is cancelled mid-apply, the attempt still finishes (within the shutdown
        bound) and saves the cursor for what it applied. With ``behind`` (the commit before,
        in flight), nothing is counted or saved before that one has finished, and not at all
        if it stopped with its batch unapplied.
        """
        me = asyncio.current_task()
        sends = self._sends[me] = _Send()  # before any await: the commit behind looks it up
        try:
            while True:
                delay = 0.0
                if behind is not None and not behind.done():
                    await self._turn(behind)
                if behind is not None and behind.done():
                    if not _committed(behind):
                        return False
                    behind = None
                if await self._admit(len(batch.changes)):
                    sends.misses = self._misses
                    sends.went.set()
                    attempt = asyncio.create_task(
                        self._apply_and_save(batch, last_id, behind),
                        name=f"tailer[{self._peer_id}].apply",
                    )
                    try:
                        outcome = await asyncio.shield(attempt)
                    except asyncio.CancelledError:
                        if not attempt.done():
                            await asyncio.wait(
                                {attempt}, timeout=self.settings.shutdown_timeout_sec
                            )
                        _observe(attempt)
                        raise
                    if outcome is None:
                        self._retry.reset()
                        return True
                    if outcome is _Outcome.BEHIND_STOPPED:
                        return False
                    if outcome is _Outcome.OUT_OF_TURN:
                        self.stats.out_of_turn += 1
                        self._misses += 1
                        continue  # the batch before is applied by now: send this one in its turn
                    self.stats.apply_failures += 1
                    self._misses += 1
                    delay = max(outcome, self._retry.next_delay())
                if self._stop.is_set() or await sleep_or_stop(self._stop, delay):
                    log.warning(
                        "tailer.stopped_unapplied",
                        extra={
                            "peer": self._peer_id,
                            "cursor": str(self.cursor),
                            "hint": "stopping with a batch not applied; it is re-read at the next "
                            "start",
                        },
                    )
                    return False
        finally:
            sends.went.set()
            del self._sends[me]

    async def _turn(self, behind: asyncio.Task[bool]) -> None:
        """Wait until this batch may be sent behind ``behind``, the commit of the batch before
        it, or until that commit is done.

        It must reach the store after that one's apply, so it waits for that apply to go out.
        It then goes right behind it, unless an apply has missed since that one went out (that
        one's own, or the one before it): then that one is or may be sent again, this one would
        be answered out of turn, and so, each in its turn, would every batch after it. So it
        waits for that commit to finish instead, and one miss costs one batch sent twice.
        """
        ahead = self._sends.get(behind)
        if ahead is None:  # not started yet (tasks start in the order they were made)
            await asyncio.wait({behind})
            return
        await ahead.went.wait()
        if not behind.done() and ahead.misses != self._misses:
            await asyncio.wait({behind})

    async def _admit(self, events: int) -> bool:
        """Backpressure and rate limit; False when the caller should re-check stop first."""
        try:
            accepting = await self.store.should_accept_writes()
        except Exception:  # an unreadable INFO is the breaker's business, not a pause
            accepting = True
        if not accepting:
            self.stats.backpressure_pauses += 1
            self.metrics.backpressure_pauses.inc()
            self.mode = TailerMode.BACKPRESSURE
            await sleep_or_stop(self._stop, _PRESSURE_POLL_SEC)
            return False
        if self.limiter is not None and events:
            await self.limiter.acquire(events)
        return True

    async def _apply_and_save(
        self, batch: Batch, last_id: StreamId, behind: asyncio.Task[bool] | None = None
    ) -> float | _Outcome | None:
        """One attempt. None on success, an ``_Outcome``, or seconds to wait before the next
        attempt."""
        started = time.perf_counter()
        prepared, source = batch.prepared, batch.source
        if prepared is None and source is not None:
            prepared = self.store.prepare_apply([], relay=self.settings.relay)
        if source is not None and source.claims and self.repair_pending(self._peer_id):
            # The claims were decided when this batch was read, maybe while the batch before
            # it was being applied; that apply refused an entry since, which waits for its
            # repair, and no claim may cover it until then (docs/DELETES.md, "Claims").
            source = dataclasses.replace(source, claims={})
        if behind is not None and source is not None:
            source = dataclasses.replace(source, mode="n")  # applied only after the one before
        result = None
        if prepared is not None:
            try:
                with self.local_breaker.calling():
                    with continue_trace(batch.changes):
                        result = await self.store.apply_prepared(prepared, source)
            except pybreaker.CircuitBreakerError:
                self.mode = TailerMode.LOCAL_STORE_UNAVAILABLE
                return breaker_remaining(self.local_breaker)
            except Exception as exc:
                level = logging.ERROR if isinstance(exc, StoreKeyError) else logging.WARNING
                log.log(
                    level,
                    "tailer.apply_failed",
                    extra={
                        "peer": self._peer_id,
                        "error": f"{type(exc).__name__}: {exc}"[:300],
                        "hint": "batch kept and retried, cursor not advanced",
                    },
                )
                return 0.0
        if behind is not None:
            await asyncio.wait({behind})  # counts and cursors move in stream order
            if not _committed(behind):
                return _Outcome.BEHIND_STOPPED
            started = max(started, self._committed_at)
        if result is not None:
            if result.out_of_turn:
                return _Outcome.OUT_OF_TURN
            await self._count(batch.changes, result.statuses, result.refused)
            if result.anchored is False:
                # Unanchored (a gap, a start past the stream's start, the peer's stream
                # restarted or recovered, a bootstrap that could not take claims): nothing this
                # stream carries is claimed until a complete repair anchors it again.
                self.on_unanchored(self._peer_id)
        # The cursor and the batch count move together, with no await between them: a status
        # read while the cursor is saved shows the batch both applied and counted.
        self.cursor = last_id
        self.stats.batches += 1
        self.last_batch_at = time.time()
        if not self._may_defer_save():
            await self._save_cursor()
        flush = time.perf_counter() - started
        self._series.batch_flushes.inc()
        self._series.batch_flush_seconds.observe(flush)
        if flush > self.settings.flush_slo_sec:
            self.metrics.slo_breaches.labels("batch_flush_latency").inc()
        return None

    def _may_defer_save(self) -> bool:
        """At the head of a busy stream the next read is due soon and will find entries: its
        save covers this one's, up to ``CURSOR_SAVE_EVERY_SEC`` after the last."""
        if self.catching_up or self.growth_per_sec is None:
            return False
        if self.growth_per_sec < BUSY_STREAM_PER_SEC:
            return False
        return time.monotonic() - self._saved_at < CURSOR_SAVE_EVERY_SEC

    async def _save_cursor(self) -> None:
        """Save the applied cursor if it moved. A read at the head that only took claims leaves
        it where this tailer last saved it: no write to the database for it."""
        cursor = self.cursor
        if cursor is None or cursor == self._saved:
            return
        try:
            await self.cursors.save(self._peer_id, str(cursor))
        except CursorError as exc:
            # What this tailer reports from now on is what is saved, not what it applied.
            self.cursor = self._saved
            raise CursorSaveFailed(
                f"peer {self._peer_id}: cursor {cursor} was applied but could not be saved; "
                f"stopping this tailer rather than apply further past an unsaved cursor: {exc}"
            ) from exc
        self._saved = cursor
        self._saved_at = time.monotonic()

    async def _count(
        self, changes: list[Change], statuses: list[ApplyStatus], refused: Mapping[int, str]
    ) -> None:
        """Count what the apply did; quarantine what the store refused and ask for a repair."""
        applied = known = 0
        for status in statuses:
            if status is ApplyStatus.APPLIED:
                applied += 1
            elif status is ApplyStatus.KNOWN:
                known += 1
        skewed = [i for i, status in enumerate(statuses) if status is ApplyStatus.REJECTED]
        deduped = len(statuses) - applied - len(refused) - len(skewed)
        self.stats.applied += applied
        self.stats.deduped += deduped
        self.stats.known += known
        self._series.events_applied.inc(applied)
        self._series.events_deduped.inc(deduped)
        set_aside = [
            (i, "refused", f"refused by the local store: {why}") for i, why in refused.items()
        ]
        set_aside += [
            (i, "clock_skew", "HLC is beyond the allowed clock offset: the origin's clock is ahead")
            for i in skewed
        ]
        for reason in ("refused", "clock_skew"):
            keys = []
            for index, why, message in set_aside:
                if why != reason:
                    continue
                change = changes[index]
                keys.append(change.key)
                if reason == "refused":
                    self.stats.refused += 1
                    log.error(
                        "tailer.entry_refused",
                        extra={
                            "peer": self._peer_id,
                            "key": change.key,
                            "error": message[:300],
                            "hint": "the local store refused it; quarantined, repair requested",
                        },
                    )
                await self._quarantine(
                    codec.parse_stream_id(change.stream_id or "0-0"),
                    change.key,
                    CodecError(message, reason=reason),
                    codec.encode_entry(change),
                )
            if keys:
                self.on_quarantine(self._peer_id, keys, reason)

    # ------------------------------------------------------------------------ lag

    def _track_growth(self, info: StreamInfo) -> None:
        """Entries per second the peer's stream is growing by (for exposure estimates)."""
        added = info.entries_added if info.entries_added is not None else info.length
        now = time.monotonic()
        if self._growth_mark is not None:
            then, before = self._growth_mark
            if now - then >= 0.2 and added >= before:
                rate = (added - before) / (now - then)
                self.growth_per_sec = (
                    rate
                    if self.growth_per_sec is None
                    else (0.5 * self.growth_per_sec + 0.5 * rate)
                )
                self._growth_mark = (now, added)
        else:
            self._growth_mark = (now, added)
        self.last_read_at = now

    def publish_unread_lag(self) -> None:
        """While the peer cannot be read: the lag as it may be by now, the lag at the last read
        plus the time since (a lag that stayed at its last reading, 0 say, would say this node
        is current while its peer takes writes it cannot see). Reads set it right again."""
        if self.last_read_at is not None:
            since = time.monotonic() - self.last_read_at
            self._series.lag.set((self.lag_ms or 0) / 1000 + since)

    def _publish_lag(self, info: StreamInfo) -> None:
        self._track_growth(info)
        self.lag_ms = codec.lag_ms(self.cursor, info.last, info.first)
        self.lag_events = codec.lag_events(self.cursor, info.first, info.last, info.length)
        self._series.lag.set(self.lag_ms / 1000)
        self._series.lag_events.set(self.lag_events)
