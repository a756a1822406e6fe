"""The hot path: one tailer per peer, turning the peer's CDC stream into local applies.

Per batch: read (XRANGE while catching up, XREAD BLOCK at the head), decode and verify, quarantine
what fails, drop echoes of our own writes, coalesce per key, apply through the store's one apply
path, and only then save the cursor. A crash anywhere re-reads at most one batch, which the
idempotent apply absorbs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pybreaker

from replication_engine import codec
from replication_engine.codec import Change, CodecError, StreamId
from replication_engine.cursor import CursorError, CursorStore
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
from replication_engine.store.protocol import Store
from replication_engine.store.redis_store import ApplyStatus, PreparedApply

log = logging.getLogger("replication_engine.hot_path")

_PRESSURE_POLL_SEC = 0.5
# Entries decoded between yields to the event loop (see Tailer._decode).
_DECODE_SLICE = 64


@dataclass(frozen=True, slots=True)
class TailerSettings:
    batch_size: int = 100
    min_batch_size: int = 50
    max_batch_size: int = 1000
    adaptive: bool = True
    block_timeout_sec: float = 5.0
    flush_slo_sec: float = 0.2
    read_slo_sec: float = 0.1
    rate_limit_per_sec: float | None = None
    rate_limit_burst: int = 1000
    shutdown_timeout_sec: float = 10.0
    max_payload: int = codec.DEFAULT_MAX_PAYLOAD
    retry_base_sec: float = 0.05
    retry_max_sec: float = 5.0
    # Re-emit applied versions on the local stream (chains and trees need it; see apply_batch).
    relay: bool = True
    # At the head of the stream, the least time between the starts of two reads (see _read).
    min_read_interval_sec: float = 0.0


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


@dataclass(frozen=True, slots=True)
class _Read:
    """A read started ahead of its turn, and the count it asked for."""

    task: asyncio.Task[tuple[StreamInfo, list[Entry]]]
    count: int


@dataclass(frozen=True, slots=True)
class Batch:
    """Decoded changes, coalesced per key, and the same packed for the store (None if empty)."""

    changes: list[Change]
    prepared: PreparedApply | None


class CursorSaveFailed(RuntimeError):
    """The cursor could not be saved: the tailer stops applying rather than run ahead of it."""


Bootstrap = Callable[[Peer], Awaitable[StreamId]]


class Tailer:
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
        on_quarantine: Callable[[str, Sequence[str]], None] = lambda peer_id, keys: None,
        bootstrap: Bootstrap | None = None,
    ) -> None:
        self.peer = peer
        self.store = store
        self.cursors = cursors
        self.local_node_id = local_node_id
        self.settings = settings
        self.metrics = metrics
        self.local_breaker = local_breaker
        self.on_gap = on_gap
        self.on_quarantine = on_quarantine
        self.bootstrap = bootstrap
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
        self.cursor: StreamId | None = None  # saved: everything up to here is applied
        self._read_pos: StreamId | None = None  # decoded, maybe not yet applied (pipelining)
        self._head_read_at: float | None = None  # when the last read at the head started
        self.tail: StreamId | None = None
        self.lag_ms: int | None = None  # unknown until the first read answers
        self.lag_events: int | None = None
        self.mode = "starting"
        self.catching_up = True
        self.last_batch_at: float | None = None
        self.last_gap_at: float | None = None
        self.growth_per_sec: float | None = None
        self.last_read_at: float | None = None
        self._growth_mark: tuple[float, int] | None = None
        self._gap_seen: tuple[StreamId | None, StreamId | None] | None = None
        self._stop = asyncio.Event()
        self._retry = Backoff(settings.retry_base_sec, settings.retry_max_sec)
        self._peer_id = peer.node_id
        metrics.batch_size.labels(self._peer_id).set(self.sizer.size)

    # ------------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(self) -> None:
        """The task body. Returns when stopped; raises only on a bug or a cursor failure.

        While catching up, the work is a three-stage pipeline over two servers and this
        process: batch N+1 is read from the peer and decoded here while batch N is applied by
        the local Redis. Commits stay strictly in stream order (one in flight at a time), so the
        saved cursor only ever covers applied batches. At the head of the stream each batch is
        committed before the next read, which then starts from the saved cursor.
        """
        try:
            if self.cursor is None:
                cursor = await self._initial_cursor()
                if cursor is None:
                    return
                self.cursor = cursor
            ahead: _Read | None = None
            committing: asyncio.Task[bool] | None = None
            try:
                while not self._stop.is_set():
                    if ahead is None and committing is not None:
                        finished, committing = committing, None
                        if not await finished:
                            break
                    read = await self._read(ahead)
                    ahead = None
                    if read is None:
                        continue
                    info, entries, requested = read
                    full = len(entries) >= requested
                    if full:
                        # More is waiting: read the next batch while this one is decoded and
                        # applied (the peer's Redis, this process and ours work in parallel).
                        after = codec.parse_stream_id(entries[-1][0])
                        count = self.sizer.size
                        ahead = _Read(
                            asyncio.ensure_future(
                                self.peer.read_batch(after, count, block_ms=None)
                            ),
                            count,
                        )
                    prepared = await self._prepare(info, entries, requested)
                    if committing is not None:
                        finished, committing = committing, None
                        if not await finished:
                            break  # stopping with the previous batch unapplied: re-read later
                    if prepared is not None:
                        committing = asyncio.ensure_future(self._commit_prepared(*prepared))
                        if not full:
                            finished, committing = committing, None
                            await finished
            finally:
                await self._settle(ahead, committing)
        finally:
            self.mode = "stopped"

    async def _settle(self, ahead: _Read | None, committing: asyncio.Task[bool] | None) -> None:
        """On the way out: drop the read in flight, let the commit in flight finish (bounded)."""
        if ahead is not None:
            ahead.task.cancel()
            with contextlib.suppress(BaseException):
                await ahead.task
        if committing is None:
            return
        if not committing.done():
            # A commit that is cancelled still completes its attempt and saves its cursor
            # within the shutdown bound (see _commit); a graceful stop just lets it run.
            await asyncio.wait({committing}, timeout=self.settings.shutdown_timeout_sec)
        if not committing.done():
            committing.cancel()
            await asyncio.wait({committing}, timeout=self.settings.shutdown_timeout_sec)
        if committing.done() and not committing.cancelled():
            committing.exception()  # retrieved; a cursor failure already surfaced or will again

    # ------------------------------------------------------------------------ start position

    async def _initial_cursor(self) -> StreamId | None:
        saved = await self.cursors.get(self._peer_id)
        if saved is not None:
            log.info("resuming from cursor", extra={"peer": self._peer_id, "cursor": saved})
            return codec.parse_stream_id(saved)
        start_from = self.peer.start_from
        if start_from == "snapshot" and self.bootstrap is not None:
            self.mode = "bootstrapping"
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

    # ------------------------------------------------------------------------ reading

    async def _read(self, ahead: _Read | None = None) -> tuple[StreamInfo, list[Entry], int] | None:
        """The next batch after the cursor (or the read already started ahead of it), with the
        count it asked for (a full batch means more is waiting)."""
        assert self.cursor is not None
        block_ms = None if self.catching_up else max(1, int(self.settings.block_timeout_sec * 1000))
        self.mode = "catching_up" if self.catching_up else "tailing"
        if ahead is None:
            self._read_pos = None  # nothing in flight: this read starts at the saved cursor
            if block_ms is not None and await self._linger():
                return None
            count = self.sizer.size
            read = asyncio.ensure_future(
                self.peer.read_batch(self.cursor, count, block_ms=block_ms)
            )
        else:
            read, count = ahead.task, ahead.count
        stop = asyncio.ensure_future(self._stop.wait())
        started = time.perf_counter()
        try:
            await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not read.done():  # stopping: nothing is in hand yet, so dropping the read is safe
                read.cancel()
                # Bounded: redis-py can swallow a cancellation while it is connecting.
                await asyncio.wait({read}, timeout=1.0)
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
        info, entries = result
        return info, entries, count

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
        if wait > 0 and await sleep_or_stop(self._stop, wait):
            return True
        self._head_read_at = time.monotonic()
        return False

    async def _wait_for_peer(self, reason: str) -> None:
        self.mode = "waiting_for_peer"
        delay = max(self.peer.circuit_wait(), self._retry.next_delay())
        log.debug(
            "peer unavailable, waiting",
            extra={"peer": self._peer_id, "reason": reason, "delay_sec": round(delay, 3)},
        )
        await sleep_or_stop(self._stop, delay)

    # ------------------------------------------------------------------------ one batch

    async def _prepare(
        self, info: StreamInfo, entries: list[Entry], requested: int
    ) -> tuple[StreamInfo, int, int, Batch, StreamId] | None:
        """Gap check, decode and quarantine: everything before the apply.

        Returns what ``_commit_prepared`` needs, or None for an empty read (at the head).
        """
        position = self.cursor if self._read_pos is None else self._read_pos
        assert position is not None
        self.tail = info.last
        self._publish_lag(info)  # before applying: a batch that cannot be applied still counts
        if info.trimmed_past(position) and (info.first, info.max_deleted) != self._gap_seen:
            self._gap_seen = (info.first, info.max_deleted)  # one gap, however many batches
            self._report_gap(info)
        if not entries:
            self.catching_up = False
            self.sizer.observe(0)
            self._publish_lag(info)
            self.metrics.batch_size.labels(self._peer_id).set(self.sizer.size)
            return None
        changes, last_id = await self._decode(entries, position)
        self._read_pos = last_id
        prepared = self.store.prepare_apply(changes, relay=self.settings.relay) if changes else None
        batch = Batch(changes, prepared)
        return info, requested, len(entries), batch, last_id

    async def _commit_prepared(
        self, info: StreamInfo, requested: int, read: int, batch: Batch, last_id: StreamId
    ) -> bool:
        """Apply and save one decoded batch, then adapt the batch size. False when stopped."""
        flush_started = time.perf_counter()
        if not await self._commit(batch, last_id):
            self._read_pos = None  # the next read goes from the saved cursor
            return False
        flush = time.perf_counter() - flush_started
        self.catching_up = read >= requested
        self.sizer.observe(
            read,
            requested=requested,
            flush_seconds=flush,
            flush_slo_seconds=self.settings.flush_slo_sec,
        )
        self.metrics.batch_size.labels(self._peer_id).set(self.sizer.size)
        self._publish_lag(info)
        return True

    def _report_gap(self, info: StreamInfo) -> None:
        self.stats.gaps += 1
        self.last_gap_at = time.time()
        self.metrics.stream_gaps.labels(self._peer_id).inc()
        log.warning(
            "peer stream trimmed past our cursor: entries were missed, asking the cold path to "
            "repair",
            extra={
                "peer": self._peer_id,
                "cursor": str(self.cursor),
                "first_entry": str(info.first),
                "max_deleted": str(info.max_deleted),
            },
        )
        self.on_gap(self._peer_id)

    async def _decode(
        self, entries: list[Entry], position: StreamId
    ) -> tuple[list[Change], StreamId]:
        """Decode, verify and coalesce a batch, yielding to the event loop as it goes.

        A batch takes milliseconds of CPU; yielding every ``_DECODE_SLICE`` entries lets the
        apply of the previous batch go out (and its reply come back) meanwhile, so the local
        Redis is not left idle, and keeps other peers' tailers and the HTTP server responsive.
        """
        coalesced: dict[str, Change] = {}
        rejected: list[str] = []
        last_id = position
        for n, (raw_id, fields) in enumerate(entries):
            if n and n % _DECODE_SLICE == 0:
                await asyncio.sleep(0)
            try:
                sid = codec.parse_stream_id(raw_id)
            except CodecError:  # ids come from Redis itself; keep the cursor where it was
                continue
            last_id = sid
            try:
                change = codec.decode_entry(
                    sid, fields, default_origin=self._peer_id, max_payload=self.settings.max_payload
                )
            except CodecError as exc:
                key = codec.key_hint(fields)
                await self._quarantine(sid, key, exc, fields)
                if key is not None:
                    rejected.append(key)
                continue
            if change.origin == self.local_node_id:
                self.stats.echoes += 1
                self.metrics.echoes.labels(self._peer_id).inc()
                continue
            change.value = None  # verified; only the wire bytes are applied, keep memory bounded
            coalesced.pop(change.key, None)
            coalesced[change.key] = change
        self.stats.read += len(entries)
        self.metrics.events_read.labels(self._peer_id).inc(len(entries))
        if rejected:
            self.on_quarantine(self._peer_id, rejected)
        return list(coalesced.values()), last_id

    async def _quarantine(
        self, sid: StreamId, key: str | None, exc: CodecError, fields: Mapping[Any, Any]
    ) -> None:
        self.stats.quarantined += 1
        self.metrics.events_quarantined.labels(self._peer_id, exc.reason).inc()
        log.warning(
            "quarantined entry",
            extra={
                "peer": self._peer_id,
                "stream_id": str(sid),
                "key": key,
                "reason": exc.reason,
                "error": str(exc)[:200],
            },
        )
        try:
            await self.cursors.quarantine_add(self._peer_id, str(sid), key, str(exc)[:500], fields)
            self.metrics.quarantine_evicted.set(self.cursors.evicted)
        except CursorError:
            log.exception("could not record quarantined entry", extra={"peer": self._peer_id})
            raise

    # ------------------------------------------------------------------------ apply + cursor

    async def _commit(self, batch: Batch, last_id: StreamId) -> bool:
        """Apply ``batch`` then save ``last_id``, retrying with backoff until done or stopped.

        Once stopping, the batch in hand gets one more attempt and is otherwise left unapplied
        (its cursor unsaved, so it is re-read on the next start). Each attempt runs shielded:
        if the task is cancelled mid-apply, the attempt still finishes (within the shutdown
        bound) and saves the cursor for what it applied.
        """
        while True:
            delay = 0.0
            if await self._admit(len(batch.changes)):
                attempt = asyncio.ensure_future(self._apply_and_save(batch, last_id))
                try:
                    outcome = await asyncio.shield(attempt)
                except asyncio.CancelledError:
                    if not attempt.done():
                        await asyncio.wait({attempt}, timeout=self.settings.shutdown_timeout_sec)
                    if attempt.done() and not attempt.cancelled():
                        attempt.exception()
                    raise
                if outcome is None:
                    self._retry.reset()
                    return True
                self.stats.apply_failures += 1
                delay = max(outcome, self._retry.next_delay())
            if self._stop.is_set() or await sleep_or_stop(self._stop, delay):
                log.warning(
                    "stopping with an unapplied batch; it will be re-read",
                    extra={"peer": self._peer_id, "cursor": str(self.cursor)},
                )
                return False

    async def _admit(self, events: int) -> bool:
        """Backpressure and rate limit; False when the caller should re-check stop first."""
        try:
            accepting = await self.store.should_accept_writes()
        except Exception:  # an unreadable INFO is the breaker's business, not a pause
            accepting = True
        if not accepting:
            self.stats.backpressure_pauses += 1
            self.metrics.backpressure_pauses.inc()
            self.mode = "backpressure"
            await sleep_or_stop(self._stop, _PRESSURE_POLL_SEC)
            return False
        if self.limiter is not None and events:
            await self.limiter.acquire(events)
        return True

    async def _apply_and_save(self, batch: Batch, last_id: StreamId) -> float | None:
        """One attempt. None on success, else seconds to wait before the next attempt."""
        started = time.perf_counter()
        if batch.prepared is not None:
            try:
                with self.local_breaker.calling():
                    with continue_trace(batch.changes):
                        statuses = await self.store.apply_prepared(batch.prepared)
            except pybreaker.CircuitBreakerError:
                self.mode = "local_store_unavailable"
                return breaker_remaining(self.local_breaker)
            except Exception as exc:
                log.warning(
                    "apply failed; batch kept and retried, cursor not advanced",
                    extra={"peer": self._peer_id, "error": f"{type(exc).__name__}: {exc}"[:300]},
                )
                return 0.0
            applied = sum(1 for s in statuses if s is ApplyStatus.APPLIED)
            rejected = [
                c for c, s in zip(batch.changes, statuses, strict=True) if s is ApplyStatus.REJECTED
            ]
            deduped = len(statuses) - applied - len(rejected)
            self.stats.applied += applied
            self.stats.deduped += deduped
            self.metrics.events_applied.labels(self._peer_id).inc(applied)
            self.metrics.events_deduped.labels(self._peer_id).inc(deduped)
            for change in rejected:
                await self._quarantine(
                    codec.parse_stream_id(change.stream_id or "0-0"),
                    change.key,
                    CodecError(
                        f"HLC {change.hlc:016x} is beyond the allowed clock offset: "
                        "the origin's clock is ahead",
                        reason="clock_skew",
                    ),
                    codec.encode_entry(change),
                )
        try:
            await self.cursors.save(self._peer_id, str(last_id))
        except CursorError as exc:
            raise CursorSaveFailed(
                f"peer {self._peer_id}: cursor {last_id} was applied but could not be saved; "
                f"stopping this tailer rather than apply past an unsaved cursor: {exc}"
            ) from exc
        self.cursor = last_id
        flush = time.perf_counter() - started
        self.stats.batches += 1
        self.last_batch_at = time.time()
        self.metrics.batch_flushes.labels(self._peer_id).inc()
        self.metrics.batch_flush_seconds.labels(self._peer_id).observe(flush)
        if flush > self.settings.flush_slo_sec:
            self.metrics.slo_breaches.labels("batch_flush_latency").inc()
        return None

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

    def _publish_lag(self, info: StreamInfo) -> None:
        self._track_growth(info)
        self.lag_ms = codec.lag_ms(self.cursor, info.last, info.first)
        self.lag_events = codec.lag_events(self.cursor, info.first, info.last, info.length)
        self.metrics.lag_ms.labels(self._peer_id).set(self.lag_ms)
        self.metrics.lag_events.labels(self._peer_id).set(self.lag_events)
