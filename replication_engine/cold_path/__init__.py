"""Anti-entropy: compare Merkle roots with each peer, drill into what differs, repair it.

The hot path only sees what a peer's stream still holds; the cold path heals everything else
(downtime past retention, trimmed streams, quarantined entries, bugs). It reads each peer's
tree through the same :class:`TreeReader` as our own, so both sides of a comparison are read the
same way, and it applies what it fetches through the store's one apply path, so last-writer-wins
decides and a stale or duplicate fetch is harmless.

Cost follows the size of the difference, not of the store: one root read per peer when in sync;
otherwise only the children maps of differing branches are read, level by level, in pipelined
chunks (``NODE_CHUNK_PATHS`` nodes per round trip, at most ``drill_concurrency`` chunks in
flight), and only the differing keys are fetched. ``merkle.DrillPlan`` decides where to read
next and what differs; this package only does the reading, fetching and applying.

Bounds (DESIGN.md invariant 5): items fetched per cycle (``max_items_per_cycle``, shared by all
peers), items per round trip (``fetch_batch_size``), tree nodes per round trip
(``NODE_CHUNK_PATHS``), chunks in flight (``drill_concurrency``), keys remembered from
``request_repair`` (``REQUESTED_KEYS_MAX`` per peer), and items per second during a bootstrap.

The package, one job a module; :class:`ColdPath` here is the one object the engine holds:

- ``drill``: the drill's reads, where ``merkle.DrillPlan`` says.
- ``fetch``: fetch what a drill or a request names, apply it here, count it.
- ``repair``: the periodic cycle and the repair from one peer (backoff, facts, geometry).
- ``claims``: what a repair concludes from a peer's record (dead versions, write-offs, claims).
- ``bootstrap``: the resumable copy of a peer's data.
- ``requests``: repairs asked for and not yet answered (pure).
- ``local``: our own store, its failures told apart from a peer's.
- ``stats``: what a repair did.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from typing import Any

import pybreaker

from replication_engine.codec import StreamId
from replication_engine.cold_path.bootstrap import Bootstrap
from replication_engine.cold_path.claims import Claims
from replication_engine.cold_path.drill import NODE_CHUNK_PATHS
from replication_engine.cold_path.fetch import Fetcher
from replication_engine.cold_path.local import LocalStore, LocalStoreError, Shared
from replication_engine.cold_path.repair import RepairCycle
from replication_engine.cold_path.requests import REQUESTED_KEYS_MAX, RepairRequests
from replication_engine.cold_path.stats import PeerRepair, RepairStats, describe
from replication_engine.config import ColdPathConfig
from replication_engine.cursor import CursorStore
from replication_engine.observability.metrics import Metrics
from replication_engine.peer import Peer
from replication_engine.store.protocol import Store

__all__ = [
    "NODE_CHUNK_PATHS",
    "REQUESTED_KEYS_MAX",
    "ColdPath",
    "LocalStoreError",
    "PeerRepair",
    "RepairStats",
]

log = logging.getLogger(__name__)


# The shortest wait between cycles while a requested repair is pending: its peer may be
# skipped for a reason with no backoff (an open breaker), which must not spin the loop.
_RETRY_FLOOR_SEC = 0.5
# How soon a cycle skipped because a tailer was catching up is tried again: the catch-up's end
# should not wait out a whole interval for its in-sync check.
_CATCH_UP_RECHECK_SEC = 1.0
# Requests whose keys' versions the tailer quarantined because this store would not hold
# them: a repair that meets the same versions does not keep them again.
_KEPT_BY_THE_TAILER = ("clock_skew", "refused")


class ColdPath:
    """The anti-entropy loop of one node against all its peers.

    Args:
        store: our store; only ``node_id``, ``reader``, ``geometry``, ``record``,
            ``inherit``, ``discard_versions`` and the apply path are used.
        peers: every peer; each cycle visits them in ``priority`` order.
        cursors: where bootstrap progress and the versions a repair drops are kept.
        settings: the ``cold_path`` config section.
        metrics: the engine's metrics.
        is_catching_up: True while a tailer is still catching up; periodic cycles wait for it
            (the stream will deliver what a repair would fetch), trying again every second,
            and requested repairs do not.
        local_breaker: wraps every apply on our store, so a failing local Redis trips the same
            breaker the hot path uses.
        clock: monotonic seconds for backoff and root-cache ages; tests inject a fake one.
        relay: re-emit repaired versions on our stream (see ``apply_batch``).
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
        self.peers = list(peers)
        self.cursors = cursors
        self.settings = settings
        self.metrics = metrics
        self.is_forgotten = is_forgotten
        self._requests = RepairRequests()
        local = LocalStore(store, breaker=local_breaker, relay=relay)
        shared = Shared(local, cursors, settings, metrics, self._requests)
        self._fetcher = fetcher = Fetcher(shared)
        self._claims = Claims(shared, on_complete)
        self._repairs = RepairCycle(
            shared,
            self.peers,
            fetcher=fetcher,
            claims=self._claims,
            clock=clock,
            is_catching_up=is_catching_up,
            is_forgotten=is_forgotten,
            is_bootstrapping=lambda peer_id: self._bootstrap.is_bootstrapping(peer_id),
        )
        self._bootstrap = Bootstrap(
            shared,
            repairs=self._repairs,
            fetcher=fetcher,
            claims=self._claims,
            is_forgotten=is_forgotten,
        )
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._cycle_lock = asyncio.Lock()

    @property
    def last_stats(self) -> RepairStats | None:
        """What the latest cycle did (None before the first)."""
        return self._repairs.last_stats

    # ------------------------------------------------------------------------ control

    def has_pending(self, peer_id: str) -> bool:
        """True while keys set aside from ``peer_id``'s stream wait for their repair: until
        then the stream proves nothing about them (see hot_path.Tailer)."""
        return self._requests.has_pending(peer_id)

    def is_requested(self, peer_id: str, reason: str) -> bool:
        """A request for ``reason`` from ``peer_id`` is waiting for its repair."""
        return self._requests.is_requested(peer_id, reason)

    def request_repair(self, peer_id: str, *, reason: str, keys: Iterable[str] = ()) -> None:
        """Ask for a repair from ``peer_id`` now (a gap in its stream, or quarantined entries).

        The request survives until a cycle repairs the peer completely, and makes cycles run
        for that peer even while catching up. ``keys`` are fetched first, without a drill.
        """
        if not self._repairs.is_peer(peer_id):
            log.warning(
                "repair.request_ignored",
                extra={"peer": peer_id, "reason": reason, "hint": "not a configured peer"},
            )
            return
        keys = list(keys)
        if reason in _KEPT_BY_THE_TAILER:
            self._fetcher.rejections.hold_by_stream(peer_id, keys)
        dropped = self._requests.add(peer_id, reason, keys, at=time.monotonic())
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
        self._repairs.forget_facts(peer_id)
        log.info(
            "repair.requested",
            extra={
                "peer": peer_id,
                "reason": reason,
                "pending_keys": self._requests.pending_keys(peer_id),
            },
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
            skipped = False
            if self.settings.enabled or woken or self._requests:
                try:
                    skipped = (await self.repair_once()).skipped_reason == "catching_up"
                except Exception as exc:  # never let one bad cycle end the loop
                    log.exception("repair.cycle_failed", extra={"error": describe(exc)})
                    self.metrics.repair_cycles.labels("error").inc()
            if self._stopping.is_set():
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._next_wait(skipped)):
                    await self._wake.wait()

    def _next_wait(self, skipped: bool = False) -> float:
        """Until the next cycle: the interval, or sooner when a requested repair is waiting
        for a peer's backoff to end (a recovery must not wait a whole interval, which with
        ``enabled`` false is the only other thing that would wake it), or when this cycle was
        ``skipped`` for a catch-up (the cycle runs once it ends)."""
        wait = self.settings.interval_sec
        if skipped:
            wait = min(wait, _CATCH_UP_RECHECK_SEC)
        peers = self._requests.peers()
        if peers:
            soonest = min(self.backoff_remaining(peer_id) for peer_id in peers)
            wait = min(wait, max(_RETRY_FLOOR_SEC, soonest))
        return wait

    async def repair_once(self, *, force: bool = False) -> RepairStats:
        """Run one cycle now and return what it did.

        Args:
            force: run even while catching up, and read every peer's root afresh instead of
                trusting the root cache (an explicit request wants a current answer).
        """
        async with self._cycle_lock:
            return await self._repairs.run(force)

    def backoff_remaining(self, peer_id: str) -> float:
        """Seconds until ``peer_id`` is tried again after a failure (0 when not backing off)."""
        return self._repairs.backoff_remaining(peer_id)

    async def heal(self, key: str, held: tuple[int, str]) -> str | None:
        """Replace this store's unreadable copy of ``key`` (version ``held``: hlc, origin)
        with a peer's copy that verifies; returns the peer it came from, or None.

        The tree covers the content hash, not the bytes, so a copy whose bytes rotted compares
        equal everywhere and no repair would ever touch it; and a copy whose bytes verify is
        the same write, so it replaces exactly the held version (as a written-off one is),
        whatever this store's claims say. A peer holding an older version cannot help; one
        holding a newer version replaces it as any newer version would.
        """
        return await self._repairs.heal(key, held)

    async def check_geometry(self, peer: Peer) -> None:
        """Refuse to compare trees of different shapes.

        Different geometries put keys in different buckets, so every branch would differ
        forever: an endless, useless repair. A peer with no geometry stored is new or empty and
        passes (it records ours, or its own, on first use, and is checked again next time).

        Raises:
            GeometryError: naming the peer, its geometry and ours.
            PeerUnavailable: the peer did not answer.
        """
        await self._repairs.check_geometry(peer)

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
        return await self._bootstrap.run(peer, progress)

    # ------------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """Per-peer backoff, geometry problems, pending requests and the last repair."""
        peers: dict[str, Any] = {}
        for peer in self.peers:
            pid = peer.node_id
            last = self._repairs.last_repair.get(pid)
            backoff = self._repairs.backoff.get(pid)
            peers[pid] = {
                "backoff_remaining_sec": round(self.backoff_remaining(pid), 3),
                "failures": backoff.failures if backoff is not None else 0,
                "circuit": peer.circuit_state,
                "geometry_error": self._repairs.geometry_errors.get(pid),
                "repair_requested": self._requests.reasons(pid),
                "requested_keys": self._requests.pending_keys(pid),
                "forgotten": self.is_forgotten(pid),
                "last_complete_repair": self._claims.last_complete.get(pid),
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
