"""Anti-entropy: compare Merkle roots with each peer, drill into what differs, repair it.

The hot path only sees what a peer's stream still holds; the cold path heals everything else
(downtime past retention, trimmed streams, quarantined entries, bugs). It reads each peer's
tree through the same :class:`TreeReader` as our own, so both sides of a comparison are read the
same way, and it applies what it fetches through the store's one apply path, so last-writer-wins
decides and a stale or duplicate fetch is harmless.

Cost follows the size of the difference, not of the store: one root read per peer when in sync;
otherwise only the children maps of differing branches are read, level by level, in pipelined
chunks (``NODE_CHUNK_PATHS`` nodes per round trip, at most ``drill_concurrency`` chunks in
flight), and only the differing keys are fetched. ``merkle.py`` decides what differs; this module
only does the reading, fetching and applying.

Bounds (DESIGN.md invariant 5): items fetched per cycle (``max_items_per_cycle``, shared by all
peers), items per round trip (``fetch_batch_size``), tree nodes per round trip
(``NODE_CHUNK_PATHS``), chunks in flight (``drill_concurrency``), keys remembered from
``request_repair`` (``REQUESTED_KEYS_MAX`` per peer), and items per second during a bootstrap.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import pybreaker

from replication_engine import codec, merkle
from replication_engine.codec import STREAM_START, Change, CodecError, StreamId, parse_stream_id
from replication_engine.config import ColdPathConfig
from replication_engine.cursor import CursorStore
from replication_engine.errors import ReplicationError
from replication_engine.knowledge import (
    ApplyStatus,
    NodeRecord,
    is_dead_by_absence,
    order,
    sid_key,
)
from replication_engine.merkle import GeometryError
from replication_engine.observability.metrics import Metrics
from replication_engine.peer import Peer, PeerUnavailable, StreamInfo
from replication_engine.resilience import Backoff, EventRateLimiter
from replication_engine.store.protocol import Store
from replication_engine.store.redis_store import ApplyResult

__all__ = ["ColdPath", "LocalStoreError", "PeerRepair", "RepairStats"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Tree nodes read per pipelined round trip: every child of one node at the default fanout. A
# reply is at most 256 full children maps (about 2 MB); leaf buckets are far smaller.
NODE_CHUNK_PATHS = 256
# Keys from request_repair(keys=...) remembered per peer. Past this the keys are dropped: a
# quarantined key differs from the peer's stored version, so the next drill finds it anyway.
REQUESTED_KEYS_MAX = 10_000
# Corrupt keys named in one warning, so a bad batch is one readable log line.
CORRUPT_KEYS_LOGGED = 5
# Quarantine reason of a version dropped because a peer's claims prove it dead.
ABSENT_REASON = "absent_on_peer"
WRITTEN_OFF_REASON = "written_off"
# Cursor database meta entry holding the peer's stream token when its bootstrap began.
_BOOTSTRAP_TOKEN = "bootstrap_token:"


class LocalStoreError(ReplicationError, RuntimeError):
    """Our own store failed during a repair: the peer is not to blame and is not backed off."""

    retryable = True


@dataclass(slots=True)
class PeerRepair:
    """What one cycle did with one peer.

    ``round_trips`` and ``bytes_read`` are the peer's side only (its ReadCounter), which is
    what a repair costs the peer and the network.
    """

    peer: str
    in_sync: bool = False
    branches_visited: int = 0
    items_fetched: int = 0
    items_applied: int = 0
    round_trips: int = 0
    bytes_read: int = 0
    remaining: bool = False
    error: str | None = None
    duration_sec: float = 0.0
    items_corrupt: int = 0  # fetched items the peer stores unreadably: skipped, logged
    items_missing: int = 0  # keys the peer no longer held when fetched: not complete
    items_refused: int = 0  # refused by our store (a wrong-typed key) or our clock: kept pending
    # Everything the peer held when the repair began is held here now: its claims were taken.
    complete: bool = False
    discarded: int = 0  # versions here that the peer's claims prove dead: dropped
    written_off: int = 0  # versions here the peer's claims cover while it holds older ones


@dataclass(slots=True)
class RepairStats:
    """What one cycle did, summed over peers, with each peer's detail in ``peers``."""

    peers_checked: int = 0
    peers_in_sync: int = 0
    branches_visited: int = 0
    items_fetched: int = 0
    items_applied: int = 0
    bytes_read: int = 0
    round_trips: int = 0
    duration_sec: float = 0.0
    peers: dict[str, PeerRepair] = field(default_factory=dict)
    skipped_reason: str | None = None
    peers_skipped: dict[str, str] = field(default_factory=dict)  # peer -> why not checked

    def add(self, repair: PeerRepair) -> None:
        self.peers[repair.peer] = repair
        self.peers_checked += 1
        self.peers_in_sync += int(repair.in_sync)
        self.branches_visited += repair.branches_visited
        self.items_fetched += repair.items_fetched
        self.items_applied += repair.items_applied
        self.bytes_read += repair.bytes_read
        self.round_trips += repair.round_trips


@dataclass(frozen=True, slots=True)
class PeerFacts:
    """What a repair that starts now may claim once complete: the peer's record, stream facts
    and root, read in that order (``Peer.snapshot_facts``)."""

    record: NodeRecord | None
    stream: StreamInfo
    root: bytes
    read_at: float  # monotonic

    @property
    def tail(self) -> str:
        last = self.stream.last or STREAM_START
        return sid_key(last.ms, last.seq)


@dataclass(slots=True)
class _Compared:
    """Children maps of one chunk of tree nodes, read on both sides."""

    level: int
    paths: list[str]
    empty: list[bool]  # known empty on our side: not read there
    local: list[dict[str, str]]
    remote: list[dict[str, str]]


class _Batcher:
    """Collects keys found by a drill, fetches them ``size`` at a time and applies them.

    Fetching while the drill goes on keeps memory bounded by a batch or two even when a
    bootstrap finds hundreds of thousands of keys. One apply runs in the background while the
    next batch is fetched: the peer's Redis and ours work at the same time, in apply order.
    """

    def __init__(
        self,
        size: int,
        fetch: Callable[[list[str]], Awaitable[list[Change]]],
        apply: Callable[[list[Change]], Coroutine[Any, Any, None]],
    ) -> None:
        self.size = size
        self._fetch = fetch
        self._apply = apply
        self._buffer: list[str] = []
        self._applying: asyncio.Task[None] | None = None

    async def add(self, keys: Iterable[str]) -> None:
        self._buffer.extend(keys)
        while len(self._buffer) >= self.size:
            batch, self._buffer = self._buffer[: self.size], self._buffer[self.size :]
            await self._flush(batch)

    async def finish(self) -> None:
        if self._buffer:
            batch, self._buffer = self._buffer, []
            await self._flush(batch)
        await self._applied()

    async def aclose(self) -> None:
        """Cancel an apply still running (after a failure or a cancellation) and await it."""
        task, self._applying = self._applying, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _flush(self, batch: list[str]) -> None:
        changes = await self._fetch(batch)
        await self._applied()
        if changes:
            self._applying = asyncio.create_task(self._apply(changes), name="cold_path.apply")

    async def _applied(self) -> None:
        task, self._applying = self._applying, None
        if task is not None:
            await task


class ColdPath:
    """The anti-entropy loop of one node against all its peers.

    Args:
        store: our store; only ``reader``, ``geometry``, ``keys`` and ``apply_batch`` are used.
        peers: every peer; each cycle visits them in ``priority`` order.
        cursors: where bootstrap progress is kept.
        settings: the ``cold_path`` config section.
        metrics: the engine's metrics.
        is_catching_up: True while a tailer is still catching up; periodic cycles wait for it
            (the stream will deliver what a repair would fetch), requested repairs do not.
        local_breaker: wraps every apply on our store, so a failing local Redis trips the same
            breaker the hot path uses.
        clock: monotonic seconds for backoff and root-cache ages; tests inject a fake one.
        is_forgotten: True for a peer forgotten by an operator: never read or pulled from.
        on_complete: called with a peer's id and the monotonic time its repair began, after
            every complete repair from it (its claims taken, or it has no record to take them
            from): a recovering node and a forget barrier count them.

    Claims (docs/DELETES.md): a repair reads the peer's record, stream facts and root first.
    When it fetched and applied everything that differed, with nothing left over, corrupt or
    refused, this store holds everything the peer held then, and takes the peer's claims and an
    anchor in its stream. The same drill lists the keys only this store holds: a version there
    that the peer's claims cover is dead (deleted and collected), and is dropped here.

    Error handling: :meth:`run` never raises for a peer's failure. A failing peer is backed off
    (exponential, jittered, reset by the next success) and skipped until its backoff passes or
    while its breaker is open. A geometry mismatch is reported on the peer's repair and in
    :meth:`status`, logged once at ERROR, and the peer is never drilled. A failure of our own
    store ends the cycle without backing any peer off.
    """

    def __init__(
        self,
        store: Store,
        peers: Sequence[Peer],
        cursors: CursorStore,
        settings: ColdPathConfig,
        metrics: Metrics,
        *,
        is_catching_up: Callable[[], bool] = lambda: False,
        local_breaker: pybreaker.CircuitBreaker | None = None,
        clock: Callable[[], float] = time.monotonic,
        relay: bool = True,
        is_forgotten: Callable[[str], bool] = lambda peer_id: False,
        on_complete: Callable[[str, float], None] = lambda peer_id, began: None,
    ) -> None:
        self.store = store
        self.relay = relay  # re-emit repaired versions on our stream (see apply_batch)
        self.peers = list(peers)
        self.cursors = cursors
        self.settings = settings
        self.metrics = metrics
        self.is_catching_up = is_catching_up
        self.local_breaker = local_breaker
        self._clock = clock
        self.last_repair: dict[str, PeerRepair] = {}
        self.last_stats: RepairStats | None = None
        self._backoff = {
            p.node_id: Backoff(settings.backoff_base_sec, settings.backoff_max_sec)
            for p in self.peers
        }
        self._retry_at: dict[str, float] = {}
        self._facts_cache: dict[str, PeerFacts] = {}
        self.last_complete: dict[str, float] = {}  # peer -> wall time of its last complete repair
        self._geometry_ok: set[str] = set()
        self._geometry_errors: dict[str, str] = {}
        # peer -> reason -> monotonic time of the latest request: a repair that began before
        # a request does not answer it (a recovery or a forget barrier waits for a later one).
        self._requests: dict[str, dict[str, float]] = {}
        self._requested_keys: dict[str, dict[str, None]] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._cycle_lock = asyncio.Lock()
        # One bootstrap at a time (see bootstrap()); peers with one running or waiting are
        # left out of repair cycles, which would only fetch what the bootstrap copies anyway.
        self._bootstrap_lock = asyncio.Lock()
        self._bootstrapping: set[str] = set()
        self.is_forgotten = is_forgotten
        self.on_complete = on_complete
        self._refused: dict[str, set[str]] = {}  # peer -> keys our store refuses (logged once)
        # peer -> its versions this cycle that ours outrank (STALE, SKIPPED): written off, if
        # its record, read again after the fetch, covers ours (see _write_off).
        self._behind: dict[str, dict[str, Change]] = {}

    # ------------------------------------------------------------------------ control

    def has_pending(self, peer_id: str) -> bool:
        """True while keys set aside from ``peer_id``'s stream wait for their repair: until
        then the stream proves nothing about them (see hot_path.Tailer)."""
        reasons = self._requests.get(peer_id, ())
        return bool(self._requested_keys.get(peer_id)) or any(
            reason in reasons for reason in ("quarantine", "clock_skew", "refused")
        )

    def is_requested(self, peer_id: str, reason: str) -> bool:
        """A request for ``reason`` from ``peer_id`` is waiting for its repair."""
        return reason in self._requests.get(peer_id, {})

    def request_repair(self, peer_id: str, *, reason: str, keys: Iterable[str] = ()) -> None:
        """Ask for a repair from ``peer_id`` now (a gap in its stream, or quarantined entries).

        The request survives until a cycle repairs the peer completely, and makes cycles run
        for that peer even while catching up. ``keys`` are fetched first, without a drill.
        """
        if peer_id not in self._backoff:
            log.warning(
                "repair.request_ignored",
                extra={"peer": peer_id, "reason": reason, "hint": "not a configured peer"},
            )
            return
        self._requests.setdefault(peer_id, {})[reason] = time.monotonic()
        pending = self._requested_keys.setdefault(peer_id, {})
        dropped = 0
        for key in keys:
            if len(pending) < REQUESTED_KEYS_MAX:
                pending[key] = None
            elif key not in pending:
                dropped += 1
        if dropped:
            log.warning(
                "repair.request_keys_dropped",
                extra={
                    "peer": peer_id,
                    "dropped": dropped,
                    "limit": REQUESTED_KEYS_MAX,
                    "hint": "the next drill finds the keys anyway",
                },
            )
        # The peer changed in a way the stream did not deliver: a cached root is no evidence.
        self._facts_cache.pop(peer_id, None)
        log.info(
            "repair.requested",
            extra={"peer": peer_id, "reason": reason, "pending_keys": len(pending)},
        )
        self._wake.set()

    def stop(self) -> None:
        """Make :meth:`run` return after the cycle in progress (if any)."""
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        """Run a cycle every ``interval_sec``, or at once when a repair is requested.

        With ``enabled`` false only requested repairs run: they are the safety net for entries
        the hot path could not deliver.
        """
        self._stopping.clear()
        while not self._stopping.is_set():
            woken = self._wake.is_set()
            self._wake.clear()
            if self.settings.enabled or woken or self._requests:
                try:
                    await self.repair_once()
                except Exception as exc:  # never let one bad cycle end the loop
                    log.exception("repair.cycle_failed", extra={"error": _describe(exc)})
                    self.metrics.repair_cycles.labels("error").inc()
            if self._stopping.is_set():
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.interval_sec):
                    await self._wake.wait()

    # ------------------------------------------------------------------------ one cycle

    async def repair_once(self, *, force: bool = False) -> RepairStats:
        """Run one cycle now and return what it did.

        Args:
            force: run even while catching up, and read every peer's root afresh instead of
                trusting the root cache (an explicit request wants a current answer).
        """
        async with self._cycle_lock:
            return await self._cycle(force)

    async def _cycle(self, force: bool) -> RepairStats:
        started = time.perf_counter()
        stats = RepairStats()
        catching_up = self.is_catching_up()
        requested = {pid for pid, reasons in self._requests.items() if reasons}
        if catching_up and not force and not requested:
            stats.skipped_reason = "catching_up"
            self.metrics.repair_cycles.labels("skipped").inc()
            self.last_stats = stats
            log.debug("repair.skipped", extra={"reason": "catching_up"})
            return stats
        budget = self.settings.max_items_per_cycle
        failed = False
        local_failed = False
        for peer in sorted(self.peers, key=lambda p: p.priority):
            pid = peer.node_id
            reason = self._skip_reason(peer, catching_up and not force, requested, force)
            if local_failed:
                reason = "local_store_failed"
            if reason is not None:
                stats.peers_skipped[pid] = reason
                continue
            repair, local_error = await self._repair_peer(peer, budget, force or pid in requested)
            budget = max(0, budget - repair.items_fetched)
            stats.add(repair)
            self.last_repair[pid] = repair
            failed = failed or repair.error is not None
            local_failed = local_error
        stats.duration_sec = time.perf_counter() - started
        if stats.peers_checked == 0 and self.peers:
            stats.skipped_reason = "no_peer_available"
            result = "skipped"
        else:
            result = "error" if failed else "ok"
            self.metrics.repair_seconds.observe(stats.duration_sec)
        self.metrics.repair_cycles.labels(result).inc()
        self.last_stats = stats
        log.debug(
            "repair.cycle.complete",
            extra={
                "result": result,
                "peers_checked": stats.peers_checked,
                "peers_in_sync": stats.peers_in_sync,
                "branches_visited": stats.branches_visited,
                "items_fetched": stats.items_fetched,
                "items_applied": stats.items_applied,
                "round_trips": stats.round_trips,
                "bytes_read": stats.bytes_read,
                "seconds": round(stats.duration_sec, 3),
            },
        )
        return stats

    def _skip_reason(
        self, peer: Peer, waiting_for_catch_up: bool, requested: set[str], force: bool = False
    ) -> str | None:
        pid = peer.node_id
        if self.is_forgotten(pid):
            return "forgotten"
        if pid in self._bootstrapping:
            return "bootstrapping"
        if not self.settings.enabled and not force and pid not in requested:
            return "disabled"
        if waiting_for_catch_up and pid not in requested:
            return "catching_up"
        if self.backoff_remaining(pid) > 0:
            return "backoff"
        if peer.circuit_state == "open":
            return "circuit_open"
        return None

    def backoff_remaining(self, peer_id: str) -> float:
        """Seconds until ``peer_id`` is tried again after a failure (0 when not backing off)."""
        return max(0.0, self._retry_at.get(peer_id, 0.0) - self._clock())

    async def _repair_peer(
        self, peer: Peer, budget: int, fresh_root: bool
    ) -> tuple[PeerRepair, bool]:
        """Repair from one peer; returns the report and whether our own store failed."""
        pid = peer.node_id
        repair = PeerRepair(peer=pid)
        trips, read = peer.counter.round_trips, peer.counter.bytes_read
        started = time.perf_counter()
        local_failed = False
        taken: list[str] = []
        has_record = True
        self._behind[pid] = {}
        began = time.monotonic()
        try:
            own = await self._local("read record", self.store.record())
            taken = list(self._requested_keys.get(pid, {}))[:budget]
            if taken:
                await self._fetch_and_apply(peer, repair, None, lambda batcher: batcher.add(taken))
                budget -= len(taken)
            facts, fresh = await self._peer_facts(peer, fresh=fresh_root)
            has_record = facts.record is not None
            local_root = await self._local("read root", self.store.reader.root())
            absent: list[str] = []
            if local_root == facts.root:
                repair.in_sync = True
            else:
                self.metrics.merkle_divergences.labels(pid).inc()
                # A divergent peer's root is about to change under us or under it.
                self._facts_cache.pop(pid, None)
                fresh = True  # the drill below reads the peer's tree after these facts
                if pid not in self._geometry_ok:
                    await self.check_geometry(peer)
                if budget <= 0:
                    repair.remaining = True
                else:
                    await self._drill_and_repair(peer, [""], repair, limit=budget, absent=absent)
            complete = fresh and self._is_complete(repair)
            await self._conclude(peer, facts, own, repair, absent, complete, began)
        except GeometryError as exc:
            repair.error = str(exc)
            if self._geometry_errors.get(pid) != repair.error:
                log.error("repair.geometry_mismatch", extra={"peer": pid, "error": _describe(exc)})
            self._geometry_errors[pid] = repair.error
            self.metrics.repair_failures.labels(pid).inc()
        except LocalStoreError as exc:
            repair.error = str(exc)
            local_failed = True
            log.warning("repair.local_store_failed", extra={"peer": pid, "error": _describe(exc)})
        except Exception as exc:
            repair.error = _describe(exc)
            delay = self._backoff[pid].next_delay() if pid in self._backoff else 0.0
            self._retry_at[pid] = self._clock() + delay
            self.metrics.repair_failures.labels(pid).inc()
            log.warning(
                "repair.peer_failed",
                extra={"peer": pid, "error": repair.error, "backoff_seconds": round(delay, 3)},
            )
        else:
            self._geometry_errors.pop(pid, None)
            if pid in self._backoff:
                self._backoff[pid].reset()
            self._retry_at.pop(pid, None)
            pending = self._requested_keys.get(pid)
            if pending and not repair.items_refused and not repair.items_corrupt:
                for key in taken:
                    pending.pop(key, None)
            # A request stands until its peer's claims were taken, or until nothing more can be
            # had from it (a peer without a record: an engine that predates records), except a
            # recovery's: it needs the claims, and a peer whose engine starts gets a record.
            conclusive = (repair.complete and "anchor" not in self._requests.get(pid, ())) or (
                self._is_complete(repair)
                and not has_record
                and "recovery" not in self._requests.get(pid, ())
            )
            if not pending and conclusive:
                self._requested_keys.pop(pid, None)
                reasons = self._requests.get(pid, {})
                for reason in [r for r, at in reasons.items() if at <= began]:
                    del reasons[reason]
                if not reasons:
                    self._requests.pop(pid, None)
        finally:
            repair.round_trips = peer.counter.round_trips - trips
            repair.bytes_read = peer.counter.bytes_read - read
            repair.duration_sec = time.perf_counter() - started
        return repair, local_failed

    @staticmethod
    def _is_complete(repair: PeerRepair) -> bool:
        """Whether this store now holds everything the peer held when the repair began.

        A key the peer no longer held when fetched (a tombstone collected there meanwhile)
        leaves ours behind: the claims read at the start may cover that delete, and taking
        them would claim a write this store lacks. The next cycle finds the key on this side
        only and settles it by absence.
        """
        return (
            repair.error is None
            and not repair.remaining
            and not repair.items_corrupt
            and not repair.items_refused
            and not repair.items_missing
        )

    async def _peer_facts(self, peer: Peer, *, fresh: bool) -> tuple[PeerFacts, bool]:
        """The peer's facts, and whether they were read now (a cached copy, within
        ``root_cache_ttl_sec``, answers "in sync?" but proves nothing about claims)."""
        pid = peer.node_id
        now = self._clock()
        cached = self._facts_cache.get(pid)
        ttl = self.settings.root_cache_ttl_sec
        if not fresh and cached is not None and now - cached.read_at < ttl:
            return cached, False
        record, stream, root = await peer.snapshot_facts()
        facts = PeerFacts(record, stream, root, now)
        self._facts_cache[pid] = facts
        return facts, True

    async def _conclude(
        self,
        peer: Peer,
        facts: PeerFacts,
        own: NodeRecord | None,
        repair: PeerRepair,
        absent: list[str],
        complete: bool,
        began: float,
    ) -> None:
        """After the drill: drop what the peer proves dead, replace what it proves written
        off, then, if the repair was ``complete``, take its claims (and set
        ``repair.complete``). ``began`` (monotonic seconds) is when the repair read our
        record: what waits for a repair that began after some event compares it.

        Both rest on the peer's record as read before the drill. If that record went back
        meanwhile (the peer's Redis restored or wiped mid-repair), neither is done.
        """
        record = facts.record
        if record is None and complete:
            # A peer that never ran an engine (or whose record is gone) claims nothing, and so
            # can hold none of this node's writes that a recovery waits for.
            self.on_complete(peer.node_id, began)
        behind = list(self._behind.pop(peer.node_id, {}).values())
        if record is None or own is None or not (complete or absent or behind):
            return
        now = await peer.record()
        if (
            now is None
            or now.incarnation != record.incarnation
            or now.epoch != record.epoch
            or now.cert < record.cert
        ):
            log.warning(
                "repair.peer_record_moved",
                extra={
                    "peer": peer.node_id,
                    "hint": "the peer's record changed during the repair; nothing is concluded "
                    "from it this cycle",
                },
            )
            return
        if absent and not record.recovering:
            repair.discarded = await self._drop_dead(peer, record, own, absent)
        if behind and not record.recovering:
            repair.written_off = await self._write_off(peer, record, behind)
        if not complete:
            return
        taken = await self._local(
            "take claims",
            self.store.inherit(
                peer=peer.node_id,
                token=record.token,
                tail=facts.tail,
                incarnation=own.incarnation,
                cert=own.cert,
                claims=record.all_claims(),
            ),
        )
        if not taken:
            return
        if taken == 1:
            # The peer's tailer here read on past a gap the repair began before: one more
            # repair, beginning now, anchors it (and until then its stream proves nothing).
            self._requests.setdefault(peer.node_id, {})["anchor"] = time.monotonic()
        else:
            self._requests.get(peer.node_id, {}).pop("anchor", None)
        repair.complete = True
        self.last_complete[peer.node_id] = time.time()
        self.on_complete(peer.node_id, began)

    async def _drop_dead(
        self, peer: Peer, record: NodeRecord, own: NodeRecord, keys: list[str]
    ) -> int:
        """Drop the versions held here under ``keys`` (which ``peer`` lacks) that its claims
        cover: the peer applied them or newer and lost them only to a collection."""
        dropped = 0
        sample: list[str] = []
        for start in range(0, len(keys), self.settings.fetch_batch_size):
            batch = keys[start : start + self.settings.fetch_batch_size]
            held = await self._local("read items", self.store.reader.items(batch))
            dead: list[Change] = [
                version
                for version in held
                if isinstance(version, Change)
                and is_dead_by_absence((version.hlc, version.origin), record)
            ]
            if not dead:
                continue
            for version in dead:
                if not version.tombstone:
                    evicted = await self.cursors.quarantine_add(
                        self.store.node_id,
                        "0-0",
                        version.key,
                        f"{ABSENT_REASON}: peer {peer.node_id} lacks the key and its claim "
                        f"about {version.origin}'s writes covers this version (deleted and "
                        f"collected)",
                        codec.encode_entry(version),
                    )
                    self.metrics.quarantine_evicted.inc(evicted)
            done = await self._local(
                "drop dead versions",
                self.store.discard_versions(
                    [(v.key, v.hlc, v.origin) for v in dead],
                    incarnation=own.incarnation,
                    cert=own.cert,
                ),
            )
            if done < 0:
                break  # our own record went back: nothing concluded
            dropped += done
            sample.extend(v.key for v in dead[: CORRUPT_KEYS_LOGGED - len(sample)])
        if dropped:
            self.metrics.absence_drops.labels(peer.node_id).inc(dropped)
            log.warning(
                "repair.dropped_dead",
                extra={
                    "peer": peer.node_id,
                    "count": dropped,
                    "keys": sample,
                    "quarantine_reason": ABSENT_REASON,
                    "hint": "versions here that the peer lacks while its claims cover them "
                    "(deleted and collected); values are kept in the quarantine",
                },
            )
        return dropped

    async def _write_off(self, peer: Peer, record: NodeRecord, theirs: list[Change]) -> int:
        """Replace the versions held here that ``peer``'s claims cover while it holds an older
        version of the key (docs/DELETES.md, "Written off").

        The peer applied ours or newer, and a store loses a version only to a newer one, to a
        collection, or to an operator: holding an older one, it lost ours to a recovery that
        wrote it off (certified past it), and a restore brought it back here. Every store
        whose claims cover it refuses it, so the mesh would stay split for good; the peer's
        version replaces it, whatever this store's own claims say (they may cover the peer's
        version only because ours superseded it). The version replaced is quarantined.
        """
        replaced = 0
        for start in range(0, len(theirs), self.settings.fetch_batch_size):
            batch = theirs[start : start + self.settings.fetch_batch_size]
            held = await self._local("read items", self.store.reader.items([c.key for c in batch]))
            chosen: list[Change] = []
            replaces: dict[int, tuple[int, str]] = {}
            for change, ours in zip(batch, held, strict=True):
                if (
                    isinstance(ours, Change)
                    and order(ours.hlc, ours.origin, ours.tombstone, ours.content_hash)
                    > order(change.hlc, change.origin, change.tombstone, change.content_hash)
                    and is_dead_by_absence((ours.hlc, ours.origin), record)
                ):
                    replaces[len(chosen)] = (ours.hlc, ours.origin)
                    chosen.append(change)
                    evicted = await self.cursors.quarantine_add(
                        self.store.node_id,
                        "0-0",
                        ours.key,
                        f"{WRITTEN_OFF_REASON}: peer {peer.node_id} holds an older version while "
                        f"its claim about {ours.origin}'s writes covers this one (lost to a "
                        f"recovery, brought back by a restore)",
                        codec.encode_entry(ours),
                    )
                    self.metrics.quarantine_evicted.inc(evicted)
            if not chosen:
                continue
            result = await self._apply(chosen, replaces)
            done = sum(1 for status in result.statuses if status is ApplyStatus.APPLIED)
            replaced += done
            log.warning(
                "repair.written_off",
                extra={
                    "peer": peer.node_id,
                    "count": done,
                    "keys": [c.key for c in chosen[:CORRUPT_KEYS_LOGGED]],
                    "quarantine_reason": WRITTEN_OFF_REASON,
                    "hint": "versions here that the peer's claims cover while it holds older "
                    "ones were replaced by the peer's; they are kept in the quarantine",
                },
            )
        if replaced:
            self.metrics.written_off.labels(peer.node_id).inc(replaced)
        return replaced

    async def heal(self, key: str, held: tuple[int, str]) -> str | None:
        """Replace this store's unreadable copy of ``key`` (version ``held``: hlc, origin)
        with a peer's copy that verifies; returns the peer it came from, or None.

        The tree covers the content hash, not the bytes, so a copy whose bytes rotted compares
        equal everywhere and no repair would ever touch it; and a copy whose bytes verify is
        the same write, so it replaces exactly the held version (as a written-off one is),
        whatever this store's claims say. A peer holding an older version cannot help; one
        holding a newer version replaces it as any newer version would.
        """
        for peer in sorted(self.peers, key=lambda p: p.priority):
            try:
                (theirs,) = await peer.call(
                    functools.partial(peer.reader.items, [key]), what="heal_item"
                )
            except PeerUnavailable:
                continue
            if not isinstance(theirs, Change):
                continue  # absent there, or unreadable there too
            if (theirs.hlc, theirs.origin) < held:
                continue
            result = await self._apply([theirs], {0: held})
            if result.statuses and result.statuses[0] is ApplyStatus.APPLIED:
                return peer.node_id
        return None

    async def check_geometry(self, peer: Peer) -> None:
        """Refuse to compare trees of different shapes.

        Different geometries put keys in different buckets, so every branch would differ
        forever: an endless, useless repair. A peer with no geometry stored is new or empty and
        passes (it records ours, or its own, on first use, and is checked again next time).

        Raises:
            GeometryError: naming the peer, its geometry and ours.
            PeerUnavailable: the peer did not answer.
        """
        pid = peer.node_id
        ours = self.store.geometry
        try:
            theirs = await peer.call(peer.reader.geometry, what="geometry")
        except GeometryError as exc:
            raise GeometryError(f"peer {pid!r}: {exc}; ours is {ours.describe()}") from None
        if theirs is None:
            return
        if theirs != ours:
            raise GeometryError(
                f"peer {pid!r}: merkle geometry {theirs.describe()}, ours {ours.describe()}; "
                f"the trees cannot be compared, so nothing is repaired from this peer until "
                f"both stores use one geometry"
            )
        self._geometry_ok.add(pid)

    # ------------------------------------------------------------------------ drill and fetch

    async def _drill_and_repair(
        self,
        peer: Peer,
        starts: Sequence[str],
        repair: PeerRepair,
        *,
        limit: int | None,
        limiter: EventRateLimiter | None = None,
        absent: list[str] | None = None,
    ) -> None:
        await self._fetch_and_apply(
            peer,
            repair,
            limiter,
            lambda batcher: self._drill(
                peer, starts, repair, limit=limit, on_keys=batcher.add, absent=absent
            ),
        )

    async def _fetch_and_apply(
        self,
        peer: Peer,
        repair: PeerRepair,
        limiter: EventRateLimiter | None,
        feed: Callable[[_Batcher], Awaitable[None]],
    ) -> None:
        """Fetch and apply, in batches, every key ``feed`` hands the batcher."""
        batcher = _Batcher(
            self.settings.fetch_batch_size,
            lambda keys: self._fetch(peer, keys, repair, limiter),
            lambda changes: self._apply_counted(peer, changes, repair),
        )
        try:
            await feed(batcher)
            await batcher.finish()
        finally:
            await batcher.aclose()

    async def _drill(
        self,
        peer: Peer,
        starts: Sequence[str],
        repair: PeerRepair,
        *,
        limit: int | None,
        on_keys: Callable[[list[str]], Awaitable[None]],
        absent: list[str] | None = None,
    ) -> None:
        """Walk the branches under ``starts`` that differ, handing differing leaf keys on.

        The keys of a differing leaf bucket that the peer holds with another digest go to
        ``on_keys`` (to fetch); those only this store holds are appended to ``absent``, when
        given, up to ``max_items_per_cycle`` of them (absence by knowledge decides on them).

        Deeper levels are read first, so leaf keys (and their fetches) start flowing early and
        the queue of pending paths stays small. Stops once ``limit`` keys are found, setting
        ``repair.remaining`` when anything was left unvisited. A branch missing from our parent
        node is empty here, so its subtree is only read on the peer (half the reads of a
        bootstrap into an empty store).
        """
        geometry = self.store.geometry
        depth, width = geometry.depth, geometry.width
        # Per level: (path, known empty on our side).
        queues: list[deque[tuple[str, bool]]] = [deque() for _ in range(depth + 1)]
        for path in starts:
            queues[len(path) // width].append((path, False))
        outstanding: set[asyncio.Task[_Compared]] = set()
        found = 0
        try:
            while True:
                while len(outstanding) < self.settings.drill_concurrency and (
                    limit is None or found < limit
                ):
                    level = next((lv for lv in range(depth, -1, -1) if queues[lv]), None)
                    if level is None:
                        break
                    queue = queues[level]
                    chunk = [queue.popleft() for _ in range(min(NODE_CHUNK_PATHS, len(queue)))]
                    outstanding.add(
                        asyncio.create_task(
                            self._compare(peer, level, chunk),
                            name=f"cold_path.drill[{peer.node_id}]",
                        )
                    )
                if not outstanding:
                    break
                if limit is not None and found >= limit:
                    repair.remaining = True
                    break
                done, _ = await asyncio.wait(outstanding, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    outstanding.discard(task)
                    compared = task.result()
                    repair.branches_visited += len(compared.paths)
                    if compared.level == depth:
                        keys = [
                            key
                            for local, remote in zip(compared.local, compared.remote, strict=True)
                            for key in merkle.diff_leaf(local, remote)
                        ]
                        if absent is not None:
                            room = self.settings.max_items_per_cycle - len(absent)
                            only_here = [
                                key
                                for local, remote in zip(
                                    compared.local, compared.remote, strict=True
                                )
                                for key in local
                                if key not in remote
                            ]
                            absent.extend(only_here[: max(0, room)])
                        if limit is not None and found + len(keys) > limit:
                            keys = keys[: limit - found]
                            repair.remaining = True
                        found += len(keys)
                        if keys:
                            await on_keys(keys)
                        continue
                    below = queues[compared.level + 1]
                    for path, empty, local, remote in zip(
                        compared.paths,
                        compared.empty,
                        compared.local,
                        compared.remote,
                        strict=True,
                    ):
                        below.extend(
                            (path + child, empty or child not in local)
                            for child in merkle.diff_children(local, remote)
                        )
            if any(queues):
                repair.remaining = True
        finally:
            for task in outstanding:
                task.cancel()
            if outstanding:
                await asyncio.gather(*outstanding, return_exceptions=True)

    async def _compare(self, peer: Peer, level: int, chunk: list[tuple[str, bool]]) -> _Compared:
        paths = [path for path, _ in chunk]
        empty = [is_empty for _, is_empty in chunk]
        remote = await peer.call(lambda: peer.reader.nodes(paths), what="merkle_nodes")
        wanted = [path for path, is_empty in chunk if not is_empty]
        read = iter(await self._local("read tree nodes", self.store.reader.nodes(wanted)))
        local = [{} if is_empty else next(read) for is_empty in empty]
        return _Compared(level, paths, empty, local, remote)

    async def _fetch(
        self, peer: Peer, keys: list[str], repair: PeerRepair, limiter: EventRateLimiter | None
    ) -> list[Change]:
        """The peer's versions of ``keys``, leaving out those it lost or stores unreadably."""
        pid = peer.node_id
        if limiter is not None:
            await limiter.acquire(len(keys))
        fetched = await peer.call(lambda: peer.reader.items(keys), what="repair_items")
        repair.items_fetched += len(keys)
        self.metrics.repair_items_fetched.labels(pid).inc(len(keys))
        changes: list[Change] = []
        corrupt: list[tuple[str, str]] = []
        for key, got in zip(keys, fetched, strict=True):
            if isinstance(got, CodecError):
                corrupt.append((key, got.reason))
            elif got is None:
                repair.items_missing += 1  # deleted and collected on the peer since the drill
            else:
                changes.append(got)
        if corrupt:
            repair.items_corrupt += len(corrupt)
            self.metrics.repair_items_corrupt.labels(pid).inc(len(corrupt))
            log.warning(
                "repair.corrupt_items",
                extra={
                    "peer": pid,
                    "count": len(corrupt),
                    "keys": [k for k, _ in corrupt[:CORRUPT_KEYS_LOGGED]],
                    "reasons": sorted({reason for _, reason in corrupt}),
                },
            )
        return changes

    async def _apply_counted(self, peer: Peer, changes: list[Change], repair: PeerRepair) -> None:
        result = await self._apply(changes)
        applied = sum(1 for status in result.statuses if status is ApplyStatus.APPLIED)
        repair.items_applied += applied
        self.metrics.repair_items_applied.labels(peer.node_id).inc(applied)
        refused = self._refused.setdefault(peer.node_id, set())
        behind = self._behind.setdefault(peer.node_id, {})
        for index, status in enumerate(result.statuses):
            change = changes[index]
            if status in (ApplyStatus.STALE, ApplyStatus.SKIPPED):
                if len(behind) < self.settings.max_items_per_cycle:
                    behind[change.key] = change
            if status not in (ApplyStatus.REFUSED, ApplyStatus.REJECTED):
                refused.discard(change.key)
                continue
            # Not held here: the repair is not complete, and the request for it stays. The hot
            # path quarantined the entry; this says once per key why the repair cannot land.
            repair.items_refused += 1
            self._requested_keys.setdefault(peer.node_id, {})[change.key] = None
            if change.key not in refused:
                refused.add(change.key)
                why = result.refused.get(index, "stamped beyond the allowed clock offset")
                log.error(
                    "repair.item_refused",
                    extra={
                        "peer": peer.node_id,
                        "key": change.key,
                        "error": why[:300],
                        "hint": "kept pending until the local store accepts it",
                    },
                )

    async def _apply(
        self, changes: list[Change], replaces: dict[int, tuple[int, str]] | None = None
    ) -> ApplyResult:
        prepared = self.store.prepare_apply(changes, relay=self.relay, replaces=replaces)
        if self.local_breaker is None:
            return await self._local("apply", self.store.apply_prepared(prepared))
        try:
            with self.local_breaker.calling():
                return await self.store.apply_prepared(prepared)
        except pybreaker.CircuitBreakerError as exc:
            raise LocalStoreError(f"local store: breaker open: {exc}") from exc
        except Exception as exc:
            raise LocalStoreError(f"local store: apply failed: {_describe(exc)}") from exc

    async def _local(self, what: str, op: Awaitable[T]) -> T:
        try:
            return await op
        except Exception as exc:
            raise LocalStoreError(f"local store: {what} failed: {_describe(exc)}") from exc

    # ------------------------------------------------------------------------ bootstrap

    async def bootstrap(
        self, peer: Peer, *, progress: Callable[[int, int], None] | None = None
    ) -> StreamId:
        """Copy a peer's data into our store and return where its stream must be tailed from.

        The peer's stream tail is recorded before anything is copied, so every write the peer
        takes during the copy is in its stream after the returned id; some of those may be
        copied too, and the idempotent apply absorbs the duplicate. The copy goes one level-1
        branch (a child of the root) at a time, each marked done in the cursor store once
        applied, so an interrupted bootstrap resumes with the branches it had not finished.
        Branches already equal to ours are done at once. There is no per-cycle budget, but
        items are applied at most ``bootstrap_rate_limit_per_sec`` per second, in batches of
        ``fetch_batch_size``; only bounded reads are made (never a BGSAVE).

        Bootstraps run one at a time. A new node in a mesh bootstraps from every peer; run
        together, each copy would start from our empty tree and read the whole data set from
        its peer. Run in turn, the first copies the data and the others read only what
        differs (the peers' recent writes), at a fraction of the cost. Each peer's tail is
        recorded when its own copy begins, so what it wrote while waiting is in its tree.

        Args:
            peer: the peer to copy from.
            progress: called with (branches done, total branches) as branches finish.

        Returns:
            The peer's stream tail when the bootstrap began (``0-0`` for an empty stream);
            the cursor is saved there too.

        Raises:
            GeometryError: the peer's tree has another geometry.
            PeerUnavailable: the peer failed, or is out of the mesh past the tombstone grace;
                progress so far is kept, call again to resume.
            LocalStoreError: our store failed; likewise resumable.
            CursorError: the cursor store failed.
        """
        self._bootstrapping.add(peer.node_id)
        try:
            async with self._bootstrap_lock:
                return await self._bootstrap(peer, progress)
        finally:
            self._bootstrapping.discard(peer.node_id)

    async def _bootstrap(self, peer: Peer, progress: Callable[[int, int], None] | None) -> StreamId:
        pid = peer.node_id
        await self.check_geometry(peer)
        if self.is_forgotten(pid):
            raise PeerUnavailable(f"peer {pid}: forgotten by an operator; nothing is copied")
        began = time.monotonic()
        self._behind[pid] = {}
        own = await self._local("read record", self.store.record())
        facts, _ = await self._peer_facts(peer, fresh=True)
        record = facts.record
        state = await self.cursors.bootstrap_state(pid)
        resumed = state is not None
        if state is None:
            info = facts.stream
            await self.cursors.bootstrap_begin(pid, str(info.last or STREAM_START))
            if record is not None:
                await self.cursors.meta_set(_BOOTSTRAP_TOKEN + pid, record.token)
            state = await self.cursors.bootstrap_state(pid)
            if state is None:
                raise RuntimeError(f"bootstrap of peer {pid!r} was not recorded")
        tail = parse_stream_id(state.tail_id)
        done = set(state.done_branches)
        branches = self.store.geometry.all_children()
        total = len(branches)
        started = time.perf_counter()
        log.info(
            "bootstrap.started",
            extra={
                "peer": pid,
                "tail_id": str(tail),
                "branches_done": len(done),
                "branches_total": total,
            },
        )
        repair = PeerRepair(peer=pid)
        (remote,) = await peer.call(lambda: peer.reader.nodes([""]), what="merkle_nodes")
        (local,) = await self._local("read tree nodes", self.store.reader.nodes([""]))
        differing = set(merkle.diff_children(local, remote))
        equal = [b for b in branches if b not in done and b not in differing]
        if equal:
            await self.cursors.bootstrap_mark_done(pid, equal)
            done.update(equal)
        if progress is not None:
            progress(len(done), total)
        limiter = EventRateLimiter(
            self.settings.bootstrap_rate_limit_per_sec, burst=self.settings.fetch_batch_size
        )
        absent: list[str] = []
        for branch in branches:
            if branch in done:
                continue
            await self._drill_and_repair(
                peer, [branch], repair, limit=None, limiter=limiter, absent=absent
            )
            await self.cursors.bootstrap_mark_done(pid, [branch])
            done.add(branch)
            if progress is not None:
                progress(len(done), total)
        # Everything the peer held when the copy began is here (for a resumed copy, when the
        # first attempt began): anchor the tailer there. Claims are only taken from the record
        # read at that same moment, which a resumed copy no longer has; its next repair cycle
        # takes them.
        saved_token = await self.cursors.meta_get(_BOOTSTRAP_TOKEN + pid)
        complete = self._is_complete(repair) and record is not None
        if resumed and (record is None or saved_token != record.token):
            complete = False
        if resumed and complete and record is not None:
            record = NodeRecord(
                node_id=record.node_id,
                relay=record.relay,
                incarnation=record.incarnation,
                epoch=record.epoch,
                cert=record.cert,
                state=record.state,
            )
        if record is not None:
            tail_facts = PeerFacts(record, StreamInfo(0, None, tail), facts.root, facts.read_at)
            await self._conclude(peer, tail_facts, own, repair, absent, complete, began)
        await self.cursors.bootstrap_finish(pid, str(tail))
        self.metrics.bootstraps.labels(pid).inc()
        log.info(
            "bootstrap.complete",
            extra={
                "peer": pid,
                "tail_id": str(tail),
                "items_fetched": repair.items_fetched,
                "items_applied": repair.items_applied,
                "items_corrupt": repair.items_corrupt,
                "anchored": repair.complete,
                "seconds": round(time.perf_counter() - started, 3),
            },
        )
        return tail

    # ------------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """Per-peer backoff, geometry problems, pending requests and the last repair."""
        peers: dict[str, Any] = {}
        for peer in self.peers:
            pid = peer.node_id
            last = self.last_repair.get(pid)
            backoff = self._backoff.get(pid)
            peers[pid] = {
                "backoff_remaining_sec": round(self.backoff_remaining(pid), 3),
                "failures": backoff.failures if backoff is not None else 0,
                "circuit": peer.circuit_state,
                "geometry_error": self._geometry_errors.get(pid),
                "repair_requested": sorted(self._requests.get(pid, ())),
                "requested_keys": len(self._requested_keys.get(pid, {})),
                "forgotten": self.is_forgotten(pid),
                "last_complete_repair": self.last_complete.get(pid),
                "last_repair": asdict(last) if last is not None else None,
            }
        cycle = self.last_stats
        return {
            "enabled": self.settings.enabled,
            "last_cycle": None
            if cycle is None
            else {
                "peers_checked": cycle.peers_checked,
                "peers_in_sync": cycle.peers_in_sync,
                "items_fetched": cycle.items_fetched,
                "items_applied": cycle.items_applied,
                "duration_sec": round(cycle.duration_sec, 4),
                "skipped_reason": cycle.skipped_reason,
                "peers_skipped": dict(cycle.peers_skipped),
            },
            "peers": peers,
        }


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
