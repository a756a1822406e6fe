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
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import pybreaker

from replication_engine import merkle
from replication_engine.clock import wall_clock_ms
from replication_engine.codec import STREAM_START, Change, CodecError, StreamId, parse_stream_id
from replication_engine.config import ColdPathConfig
from replication_engine.cursor import CursorStore
from replication_engine.merkle import GeometryError
from replication_engine.observability.metrics import Metrics
from replication_engine.peer import Peer, PeerUnavailable
from replication_engine.resilience import Backoff, EventRateLimiter
from replication_engine.standing import Standing, out_of_mesh_reason
from replication_engine.store.protocol import Store
from replication_engine.store.redis_store import ApplyStatus

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


class LocalStoreError(RuntimeError):
    """Our own store failed during a repair: the peer is not to blame and is not backed off."""


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
    items_missing: int = 0  # keys the peer no longer held when fetched
    out_of_mesh: str | None = None  # why nothing was pulled: the peer's standing record


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
        tombstone_grace_sec: the mesh's tombstone grace. With it, nothing is pulled from a peer
            whose standing record says it is stale or was out of contact for longer (see
            :mod:`replication_engine.standing`); None skips that check.
        wall_ms: wall-clock milliseconds, to age peers' standing records.

    Error handling: :meth:`run` never raises for a peer's failure. A failing peer is backed off
    (exponential, jittered, reset by the next success) and skipped until its backoff passes or
    while its breaker is open. A geometry mismatch is reported on the peer's repair and in
    :meth:`status`, logged once at ERROR, and the peer is never drilled. A failure of our own
    store ends the cycle without backing any peer off. A peer out of the mesh past the
    tombstone grace is compared but never pulled from (its repair and :meth:`status` say why,
    a WARNING is logged once per change, its repair requests stay pending).
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
        tombstone_grace_sec: float | None = None,
        wall_ms: Callable[[], int] = wall_clock_ms,
        relay: bool = True,
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
        self._root_cache: dict[str, tuple[bytes, float]] = {}
        self._geometry_ok: set[str] = set()
        self._geometry_errors: dict[str, str] = {}
        self._requests: dict[str, set[str]] = {}
        self._requested_keys: dict[str, dict[str, None]] = {}
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._cycle_lock = asyncio.Lock()
        # One bootstrap at a time (see bootstrap()); peers with one running or waiting are
        # left out of repair cycles, which would only fetch what the bootstrap copies anyway.
        self._bootstrap_lock = asyncio.Lock()
        self._bootstrapping: set[str] = set()
        self._grace_ms = None if tombstone_grace_sec is None else int(tombstone_grace_sec * 1000)
        self._wall_ms = wall_ms
        self._out_of_mesh: dict[str, str] = {}

    # ------------------------------------------------------------------------ control

    def request_repair(self, peer_id: str, *, reason: str, keys: Iterable[str] = ()) -> None:
        """Ask for a repair from ``peer_id`` now (a gap in its stream, or quarantined entries).

        The request survives until a cycle repairs the peer completely, and makes cycles run
        for that peer even while catching up. ``keys`` are fetched first, without a drill.
        """
        if peer_id not in self._backoff:
            log.warning(
                "repair.request_ignored peer=%s reason=%s: not a configured peer", peer_id, reason
            )
            return
        self._requests.setdefault(peer_id, set()).add(reason)
        pending = self._requested_keys.setdefault(peer_id, {})
        dropped = 0
        for key in keys:
            if len(pending) < REQUESTED_KEYS_MAX:
                pending[key] = None
            elif key not in pending:
                dropped += 1
        if dropped:
            log.warning(
                "repair.request_keys_dropped peer=%s dropped=%d limit=%d",
                peer_id,
                dropped,
                REQUESTED_KEYS_MAX,
            )
        # The peer changed in a way the stream did not deliver: a cached root is no evidence.
        self._root_cache.pop(peer_id, None)
        log.info("repair.requested peer=%s reason=%s keys=%d", peer_id, reason, len(pending))
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
                except Exception:  # never let one bad cycle end the loop
                    log.exception("repair.cycle_failed")
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
            log.debug("repair.skipped reason=catching_up")
            return stats
        budget = self.settings.max_items_per_cycle
        failed = False
        local_failed = False
        for peer in sorted(self.peers, key=lambda p: p.priority):
            pid = peer.node_id
            reason = self._skip_reason(peer, catching_up and not force, requested)
            if local_failed:
                reason = "local_store_failed"
            if reason is not None:
                stats.peers_skipped[pid] = reason
                continue
            repair, local_error = await self._repair_peer(peer, budget, force or pid in requested)
            budget = max(0, budget - repair.items_fetched)
            stats.add(repair)
            if repair.out_of_mesh is not None:
                stats.peers_skipped[pid] = "out_of_mesh"
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
            "repair.cycle.complete result=%s peers=%d in_sync=%d visited=%d fetched=%d "
            "applied=%d round_trips=%d bytes=%d seconds=%.3f",
            result,
            stats.peers_checked,
            stats.peers_in_sync,
            stats.branches_visited,
            stats.items_fetched,
            stats.items_applied,
            stats.round_trips,
            stats.bytes_read,
            stats.duration_sec,
        )
        return stats

    def _skip_reason(
        self, peer: Peer, waiting_for_catch_up: bool, requested: set[str]
    ) -> str | None:
        pid = peer.node_id
        if pid in self._bootstrapping:
            return "bootstrapping"
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
        try:
            taken = list(self._requested_keys.get(pid, {}))[:budget]
            if taken and await self._held_back(peer, repair):
                taken = []
            elif taken:
                await self._fetch_and_apply(peer, repair, None, lambda batcher: batcher.add(taken))
                budget -= len(taken)
            local_root = await self._local("read root", self.store.reader.root())
            remote_root = await self._peer_root(peer, fresh=fresh_root)
            if local_root == remote_root:
                repair.in_sync = True
            else:
                self.metrics.merkle_divergences.labels(pid).inc()
                # A divergent peer's root is about to change under us or under it.
                self._root_cache.pop(pid, None)
                if pid not in self._geometry_ok:
                    await self.check_geometry(peer)
                if budget <= 0:
                    repair.remaining = True
                elif repair.out_of_mesh is None and not await self._held_back(peer, repair):
                    await self._drill_and_repair(peer, [""], repair, limit=budget)
        except GeometryError as exc:
            repair.error = str(exc)
            if self._geometry_errors.get(pid) != repair.error:
                log.error("repair.geometry_mismatch peer=%s error=%s", pid, repair.error)
            self._geometry_errors[pid] = repair.error
            self.metrics.repair_failures.labels(pid).inc()
        except LocalStoreError as exc:
            repair.error = str(exc)
            local_failed = True
            log.warning("repair.local_store_failed peer=%s error=%s", pid, exc)
        except Exception as exc:
            repair.error = _describe(exc)
            delay = self._backoff[pid].next_delay() if pid in self._backoff else 0.0
            self._retry_at[pid] = self._clock() + delay
            self.metrics.repair_failures.labels(pid).inc()
            log.warning(
                "repair.peer_failed peer=%s error=%s backoff_sec=%.1f", pid, repair.error, delay
            )
        else:
            self._geometry_errors.pop(pid, None)
            if pid in self._backoff:
                self._backoff[pid].reset()
            self._retry_at.pop(pid, None)
            pending = self._requested_keys.get(pid)
            if pending:
                for key in taken:
                    pending.pop(key, None)
            if not repair.remaining and not pending:
                self._requests.pop(pid, None)
                self._requested_keys.pop(pid, None)
        finally:
            repair.round_trips = peer.counter.round_trips - trips
            repair.bytes_read = peer.counter.bytes_read - read
            repair.duration_sec = time.perf_counter() - started
        return repair, local_failed

    async def _held_back(self, peer: Peer, repair: PeerRepair) -> bool:
        """True (and the repair marked unfinished) when nothing may be pulled from ``peer``."""
        reason = await self.peer_out_of_mesh(peer)
        if reason is None:
            return False
        repair.out_of_mesh = reason
        repair.remaining = True  # keeps the peer's repair requests for when it is back
        return True

    async def peer_standing(self, peer: Peer) -> Standing | None:
        """The peer's standing record, read now (None: it has none).

        Raises:
            PeerUnavailable: the peer did not answer.
        """
        fields = await peer.call(peer.reader.mesh_record, what="mesh_record")
        return Standing.from_fields(fields)

    async def peer_out_of_mesh(self, peer: Peer) -> str | None:
        """Why nothing may be pulled from ``peer`` now, or None; tracked for status and logs.

        Raises:
            PeerUnavailable: the peer did not answer.
        """
        if self._grace_ms is None:
            return None
        pid = peer.node_id
        standing = await self.peer_standing(peer)
        reason = out_of_mesh_reason(standing, self._wall_ms(), self._grace_ms)
        before = self._out_of_mesh.get(pid)
        if reason is None:
            if before is not None:
                log.info("repair.peer_back_in_mesh peer=%s", pid)
                self._out_of_mesh.pop(pid, None)
                self.metrics.peer_out_of_mesh.labels(pid).set(0)
            return None
        if before is None:
            log.warning(
                "repair.peer_out_of_mesh peer=%s reason=%s: not pulling from it until it is "
                "back (a value it kept could be one the mesh deleted and collected)",
                pid,
                reason,
            )
            self.metrics.peer_out_of_mesh.labels(pid).set(1)
        self._out_of_mesh[pid] = reason
        return reason

    async def _peer_root(self, peer: Peer, *, fresh: bool) -> bytes:
        pid = peer.node_id
        now = self._clock()
        cached = self._root_cache.get(pid)
        if not fresh and cached is not None and now - cached[1] < self.settings.root_cache_ttl_sec:
            return cached[0]
        root = await peer.call(peer.reader.root, what="merkle_root")
        self._root_cache[pid] = (root, now)
        return root

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
    ) -> None:
        await self._fetch_and_apply(
            peer,
            repair,
            limiter,
            lambda batcher: self._drill(peer, starts, repair, limit=limit, on_keys=batcher.add),
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
        select: Callable[[dict[str, str], dict[str, str]], list[str]] = merkle.diff_leaf,
    ) -> None:
        """Walk the branches under ``starts`` that differ, handing differing leaf keys on.

        ``select`` picks the keys of a differing leaf bucket (ours, the peer's): by default the
        ones to fetch from the peer.

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
                            for key in select(local, remote)
                        ]
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
            log.warning(
                "repair.corrupt_items peer=%s count=%d keys=%r reasons=%s",
                pid,
                len(corrupt),
                [k for k, _ in corrupt[:CORRUPT_KEYS_LOGGED]],
                sorted({reason for _, reason in corrupt}),
            )
        return changes

    async def _apply_counted(self, peer: Peer, changes: list[Change], repair: PeerRepair) -> None:
        statuses = await self._apply(changes)
        applied = sum(1 for status in statuses if status is ApplyStatus.APPLIED)
        repair.items_applied += applied
        self.metrics.repair_items_applied.labels(peer.node_id).inc(applied)

    async def _apply(self, changes: list[Change]) -> list[ApplyStatus]:
        if self.local_breaker is None:
            return await self._local("apply", self.store.apply_batch(changes, relay=self.relay))
        try:
            with self.local_breaker.calling():
                return await self.store.apply_batch(changes, relay=self.relay)
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
        reason = await self.peer_out_of_mesh(peer)
        if reason is not None:
            # The tailer waits and retries: copying from it could bring back collected deletes.
            raise PeerUnavailable(f"peer {pid}: out of the mesh ({reason})")
        state = await self.cursors.bootstrap_state(pid)
        if state is None:
            info = await peer.stream_info()
            await self.cursors.bootstrap_begin(pid, str(info.last or STREAM_START))
            state = await self.cursors.bootstrap_state(pid)
            if state is None:
                raise RuntimeError(f"bootstrap of peer {pid!r} was not recorded")
        tail = parse_stream_id(state.tail_id)
        done = set(state.done_branches)
        branches = self.store.geometry.all_children()
        total = len(branches)
        started = time.perf_counter()
        log.info(
            "bootstrap.started peer=%s tail_id=%s done=%d total=%d", pid, tail, len(done), total
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
        for branch in branches:
            if branch in done:
                continue
            await self._drill_and_repair(peer, [branch], repair, limit=None, limiter=limiter)
            await self.cursors.bootstrap_mark_done(pid, [branch])
            done.add(branch)
            if progress is not None:
                progress(len(done), total)
        await self.cursors.bootstrap_finish(pid, str(tail))
        log.info(
            "bootstrap.complete peer=%s tail_id=%s fetched=%d applied=%d corrupt=%d seconds=%.1f",
            pid,
            tail,
            repair.items_fetched,
            repair.items_applied,
            repair.items_corrupt,
            time.perf_counter() - started,
        )
        return tail

    # ------------------------------------------------------------------------ re-bootstrap

    async def copy_from(self, peer: Peer) -> PeerRepair:
        """Fetch and apply everything ``peer`` holds that differs here: a repair with no budget.

        Used by a re-bootstrap (:mod:`replication_engine.rebootstrap`). Unlike
        :meth:`bootstrap` it keeps no progress and moves no cursor, so it can run while the
        peer's tailer runs. A repeat after an interruption visits only what still differs.
        Items are applied at most ``bootstrap_rate_limit_per_sec`` per second.

        Raises:
            GeometryError, PeerUnavailable, LocalStoreError: as for :meth:`bootstrap`.
        """
        repair = PeerRepair(peer=peer.node_id)
        limiter = EventRateLimiter(
            self.settings.bootstrap_rate_limit_per_sec, burst=self.settings.fetch_batch_size
        )
        async with self._cycle_lock:
            await self.check_geometry(peer)
            await self._drill_and_repair(peer, [""], repair, limit=None, limiter=limiter)
        return repair

    async def local_only_keys(
        self, peer: Peer, on_keys: Callable[[list[str]], Awaitable[None]]
    ) -> None:
        """Hand ``on_keys`` every key we hold and ``peer`` does not, in batches.

        Normal repair never acts on such keys: absence on a peer is not a delete. A
        re-bootstrap does: see :mod:`replication_engine.rebootstrap`. Only differing branches
        are read, so the cost follows the difference.
        """
        repair = PeerRepair(peer=peer.node_id)
        async with self._cycle_lock:
            await self.check_geometry(peer)
            await self._drill(peer, [""], repair, limit=None, on_keys=on_keys, select=_local_only)

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
                "out_of_mesh": self._out_of_mesh.get(pid),
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


def _local_only(local: dict[str, str], remote: dict[str, str]) -> list[str]:
    return sorted(key for key in local if key not in remote)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
