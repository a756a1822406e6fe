"""The repair cycle: each peer in priority order, within one budget of items per cycle.

A peer whose root equals ours costs one read (or none while its root is cached); otherwise
the cycle drills into the branches that differ, fetches and applies what the peer holds
differently, and hands the result to :class:`claims.Claims` for its conclusions. A failing
peer is backed off (exponential, jittered, reset by the next success) and skipped until its
backoff passes or while its breaker is open; a geometry mismatch is reported and the peer never
drilled; a failure of our own store ends the cycle without backing any peer off.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence

from replication_engine.codec import Change
from replication_engine.cold_path.claims import Claims, PeerFacts
from replication_engine.cold_path.fetch import Fetcher
from replication_engine.cold_path.local import LocalStoreError, Part, Shared
from replication_engine.cold_path.stats import PeerRepair, RepairStats, describe, is_complete
from replication_engine.knowledge import ApplyStatus
from replication_engine.merkle import GeometryError
from replication_engine.peer import Peer, PeerUnavailable
from replication_engine.resilience import Backoff

log = logging.getLogger(__name__)


class RepairCycle(Part):
    """Runs repair cycles against ``peers`` and keeps what they learn about each peer: its
    backoff, its cached facts, its geometry, its last repair.

    A requested peer is repaired even while catching up or with ``enabled`` false, and its
    request settled after.

    Args:
        peers: every peer, visited in ``priority`` order.
        fetcher: fetches from peers and applies here.
        claims: draws each repair's conclusions.
        clock: monotonic seconds for backoff and root-cache ages.
        is_catching_up: True while a tailer is still catching up.
        is_forgotten: True for a peer forgotten by an operator: never read.
        is_bootstrapping: True for a peer with a bootstrap running or waiting.
    """

    def __init__(
        self,
        shared: Shared,
        peers: Sequence[Peer],
        *,
        fetcher: Fetcher,
        claims: Claims,
        clock: Callable[[], float],
        is_catching_up: Callable[[], bool],
        is_forgotten: Callable[[str], bool],
        is_bootstrapping: Callable[[str], bool],
    ) -> None:
        super().__init__(shared)
        self.peers = list(peers)
        self.fetcher = fetcher
        self.claims = claims
        self._clock = clock
        self.is_catching_up = is_catching_up
        self.is_forgotten = is_forgotten
        self.is_bootstrapping = is_bootstrapping
        self.last_repair: dict[str, PeerRepair] = {}
        self.last_stats: RepairStats | None = None
        self.backoff = {
            p.node_id: Backoff(self.settings.backoff_base_sec, self.settings.backoff_max_sec)
            for p in self.peers
        }
        self._retry_at: dict[str, float] = {}
        self._facts_cache: dict[str, PeerFacts] = {}
        self.geometry_errors: dict[str, str] = {}

    def is_peer(self, peer_id: str) -> bool:
        return peer_id in self.backoff

    def backoff_remaining(self, peer_id: str) -> float:
        """Seconds until ``peer_id`` is tried again after a failure (0 when not backing off)."""
        return max(0.0, self._retry_at.get(peer_id, 0.0) - self._clock())

    def forget_facts(self, peer_id: str) -> None:
        """The peer changed in a way its stream did not deliver: a cached root is no evidence."""
        self._facts_cache.pop(peer_id, None)

    # ------------------------------------------------------------------------ one cycle

    async def run(self, force: bool) -> RepairStats:
        """One cycle (see ``ColdPath.repair_once``)."""
        started = time.perf_counter()
        stats = RepairStats()
        catching_up = self.is_catching_up()
        requested = self.requests.peers()
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
            repair, local_failed = await self.repair_peer(peer, budget, force or pid in requested)
            budget = max(0, budget - repair.items_fetched)
            stats.add(repair)
            self.last_repair[pid] = repair
            failed = failed or repair.error is not None
        stats.duration_sec = time.perf_counter() - started
        self._finish(stats, failed)
        return stats

    def _finish(self, stats: RepairStats, failed: bool) -> None:
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

    def _skip_reason(
        self, peer: Peer, waiting_for_catch_up: bool, requested: set[str], force: bool = False
    ) -> str | None:
        pid = peer.node_id
        if self.is_forgotten(pid):
            return "forgotten"
        if self.is_bootstrapping(pid):
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

    # ------------------------------------------------------------------------ one peer

    async def repair_peer(
        self, peer: Peer, budget: int, fresh_root: bool
    ) -> tuple[PeerRepair, bool]:
        """Repair from one peer; returns the report and whether our own store failed."""
        pid = peer.node_id
        repair = PeerRepair(peer=pid)
        trips, read = peer.counter.round_trips, peer.counter.bytes_read
        started = time.perf_counter()
        local_failed = False
        self.fetcher.begin(pid)
        began = time.monotonic()
        try:
            taken, has_record = await self._repair(peer, repair, budget, fresh_root, began)
        except GeometryError as exc:
            self._geometry_failed(pid, repair, exc)
        except LocalStoreError as exc:
            repair.error = str(exc)
            local_failed = True
            log.warning("repair.local_store_failed", extra={"peer": pid, "error": describe(exc)})
        except Exception as exc:
            self._peer_failed(pid, repair, exc)
        else:
            self.geometry_errors.pop(pid, None)
            if pid in self.backoff:
                self.backoff[pid].reset()
            self._retry_at.pop(pid, None)
            self.requests.settle(pid, taken, repair, has_record=has_record, began=began)
        finally:
            repair.round_trips = peer.counter.round_trips - trips
            repair.bytes_read = peer.counter.bytes_read - read
            repair.duration_sec = time.perf_counter() - started
        return repair, local_failed

    async def _repair(
        self, peer: Peer, repair: PeerRepair, budget: int, fresh_root: bool, began: float
    ) -> tuple[list[str], bool]:
        """Requested keys first, then the facts, then the drill if the roots differ, then the
        conclusions; returns the requested keys fetched and whether the peer has a record."""
        pid = peer.node_id
        own = await self.local.call("read record", self.local.store.record())
        taken = self.requests.keys_to_fetch(pid, budget)
        if taken:
            await self.fetcher.fetch_keys(peer, repair, taken)
            budget -= len(taken)
        facts, fresh = await self.peer_facts(peer, fresh=fresh_root)
        local_root = await self.local.call("read root", self.local.store.reader.root())
        absent: list[str] = []
        if local_root == facts.root:
            repair.in_sync = True
        else:
            await self._drill(peer, repair, budget, absent)
            fresh = True  # the drill read the peer's tree after these facts
        await self.claims.conclude(
            peer,
            facts,
            own,
            repair,
            absent=absent,
            behind=self.fetcher.behind(pid),
            complete=fresh and is_complete(repair),
            began=began,
        )
        return taken, facts.record is not None

    async def _drill(self, peer: Peer, repair: PeerRepair, budget: int, absent: list[str]) -> None:
        pid = peer.node_id
        self.metrics.merkle_divergences.labels(pid).inc()
        # A divergent peer's root is about to change under us or under it.
        self._facts_cache.pop(pid, None)
        # Checked at every drill, not once: a peer's store can be replaced under the same id
        # (a restore, a rebuild, an old format) by one whose tree cannot be compared with ours.
        # Equal roots need no check, so the in-sync cycle stays one round trip.
        await self.check_geometry(peer)
        if budget <= 0:
            repair.remaining = True
        else:
            await self.fetcher.drill(peer, [""], repair, limit=budget, absent=absent)

    def _geometry_failed(self, pid: str, repair: PeerRepair, exc: GeometryError) -> None:
        repair.error = str(exc)
        if self.geometry_errors.get(pid) != repair.error:
            log.error("repair.geometry_mismatch", extra={"peer": pid, "error": describe(exc)})
        self.geometry_errors[pid] = repair.error
        self.metrics.repair_failures.labels(pid).inc()

    def _peer_failed(self, pid: str, repair: PeerRepair, exc: Exception) -> None:
        repair.error = describe(exc)
        delay = self.backoff[pid].next_delay() if pid in self.backoff else 0.0
        self._retry_at[pid] = self._clock() + delay
        self.metrics.repair_failures.labels(pid).inc()
        log.warning(
            "repair.peer_failed",
            extra={"peer": pid, "error": repair.error, "backoff_seconds": round(delay, 3)},
        )

    async def peer_facts(self, peer: Peer, *, fresh: bool) -> tuple[PeerFacts, bool]:
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

    async def check_geometry(self, peer: Peer) -> None:
        """Refuse to compare trees of different shapes (see ``ColdPath.check_geometry``)."""
        pid = peer.node_id
        ours = self.local.geometry
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

    # ------------------------------------------------------------------------ one key

    async def heal(self, key: str, held: tuple[int, str]) -> str | None:
        """Replace our unreadable copy of ``key`` with a peer's (see ``ColdPath.heal``)."""
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
            result = await self.local.apply([theirs], {0: held})
            if result.statuses and result.statuses[0] is ApplyStatus.APPLIED:
                return peer.node_id
        return None
