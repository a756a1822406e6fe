"""Bootstrap: copy a peer's data into our store, resumably, and say where to tail it from.

The copy goes by level-1 branches, a few at a time, each marked done in the cursor store once
applied; see ``ColdPath.bootstrap`` for the guarantees.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from replication_engine import merkle
from replication_engine.codec import STREAM_START, StreamId, parse_stream_id
from replication_engine.cold_path.claims import Claims, PeerFacts
from replication_engine.cold_path.fetch import Fetcher
from replication_engine.cold_path.local import Part, Shared
from replication_engine.cold_path.repair import RepairCycle
from replication_engine.cold_path.stats import PeerRepair, is_complete
from replication_engine.cursor import BootstrapState
from replication_engine.knowledge import NodeRecord
from replication_engine.peer import Peer, PeerUnavailable, StreamInfo
from replication_engine.resilience import EventRateLimiter

log = logging.getLogger(__name__)

# Cursor database meta entry holding the peer's stream token when its bootstrap began.
_BOOTSTRAP_TOKEN = "bootstrap_token:"
# Branches copied at the same time. A branch's copy waits on one Redis or the other most of
# the time (a drill level, a fetch, an apply); four in flight keep this process and both
# servers busy (bench.bootstrap: 0.76 of the bare copy loop with one, 0.83 with two, 0.94 with
# four, 1.00 with eight, the peer's Redis at 24, 27, 30 and 32% of a core). The peer's load is
# bounded by bootstrap_rate_limit_per_sec, shared by all four. Each branch is marked done on
# its own, so a resumed copy skips exactly those.
BRANCHES_AT_ONCE = 4


class Bootstrap(Part):
    """Bootstraps from peers, one at a time (see ``ColdPath.bootstrap``).

    The cursor database keeps the tail, the branches done and the peer's token; of the
    settings, ``bootstrap_rate_limit_per_sec`` and ``fetch_batch_size``.

    Args:
        repairs: the repair cycle, for its geometry check and the peer's facts (which a
            bootstrap reads afresh, and so refreshes for the cycle).
        fetcher: fetches from the peer and applies here.
        claims: concludes a complete copy (claims taken, the tailer anchored).
        is_forgotten: True for a peer forgotten by an operator: nothing is copied from it.
    """

    def __init__(
        self,
        shared: Shared,
        *,
        repairs: RepairCycle,
        fetcher: Fetcher,
        claims: Claims,
        is_forgotten: Callable[[str], bool],
    ) -> None:
        super().__init__(shared)
        self.repairs = repairs
        self.fetcher = fetcher
        self.claims = claims
        self.is_forgotten = is_forgotten
        # One bootstrap at a time; peers with one running or waiting are left out of repair
        # cycles, which would only fetch what the bootstrap copies anyway.
        self._lock = asyncio.Lock()
        self._running: set[str] = set()

    def is_bootstrapping(self, peer_id: str) -> bool:
        return peer_id in self._running

    async def run(self, peer: Peer, progress: Callable[[int, int], None] | None) -> StreamId:
        self._running.add(peer.node_id)
        try:
            async with self._lock:
                return await self._copy(peer, progress)
        finally:
            self._running.discard(peer.node_id)

    async def _copy(self, peer: Peer, progress: Callable[[int, int], None] | None) -> StreamId:
        pid = peer.node_id
        await self.repairs.check_geometry(peer)
        if self.is_forgotten(pid):
            raise PeerUnavailable(f"peer {pid}: forgotten by an operator; nothing is copied")
        began = time.monotonic()
        self.fetcher.begin(pid)
        own = await self.local.call("read record", self.local.store.record())
        facts, _ = await self.repairs.peer_facts(peer, fresh=True)
        state, resumed = await self._state(pid, facts)
        tail = parse_stream_id(state.tail_id)
        done = set(state.done_branches)
        branches = self.local.geometry.all_children()
        started = time.perf_counter()
        log.info(
            "bootstrap.started",
            extra={
                "peer": pid,
                "tail_id": str(tail),
                "branches_done": len(done),
                "branches_total": len(branches),
            },
        )
        repair = PeerRepair(peer=pid)
        await self._skip_equal(peer, branches, done)
        if progress is not None:
            progress(len(done), len(branches))
        absent: list[str] = []
        await self._copy_branches(peer, branches, done, repair, absent, progress)
        await self._anchor(peer, facts, own, repair, absent, tail, resumed, began)
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

    async def _state(self, pid: str, facts: PeerFacts) -> tuple[BootstrapState, bool]:
        """The bootstrap's saved state, and whether it resumes one begun before; a new one
        records the peer's stream tail (and token) before anything is copied."""
        state = await self.cursors.bootstrap_state(pid)
        if state is not None:
            return state, True
        await self.cursors.bootstrap_begin(pid, str(facts.stream.last or STREAM_START))
        if facts.record is not None:
            await self.cursors.meta_set(_BOOTSTRAP_TOKEN + pid, facts.record.token)
        state = await self.cursors.bootstrap_state(pid)
        if state is None:
            raise RuntimeError(f"bootstrap of peer {pid!r} was not recorded")
        return state, False

    async def _skip_equal(self, peer: Peer, branches: list[str], done: set[str]) -> None:
        """Mark done at once the branches already equal to ours."""
        (remote,) = await peer.call(lambda: peer.reader.nodes([""]), what="merkle_nodes")
        (local,) = await self.local.call("read tree nodes", self.local.store.reader.nodes([""]))
        differing = set(merkle.diff_children(local, remote))
        equal = [b for b in branches if b not in done and b not in differing]
        if equal:
            await self.cursors.bootstrap_mark_done(peer.node_id, equal)
            done.update(equal)

    async def _copy_branches(
        self,
        peer: Peer,
        branches: list[str],
        done: set[str],
        repair: PeerRepair,
        absent: list[str],
        progress: Callable[[int, int], None] | None,
    ) -> None:
        limiter = EventRateLimiter(
            self.settings.bootstrap_rate_limit_per_sec, burst=self.settings.fetch_batch_size
        )
        waiting = iter([branch for branch in branches if branch not in done])

        async def copy_some() -> None:
            # Workers share one iterator: each takes the next branch when it is free.
            for branch in waiting:
                await self.fetcher.drill(
                    peer, [branch], repair, limit=None, limiter=limiter, absent=absent
                )
                await self.cursors.bootstrap_mark_done(peer.node_id, [branch])
                done.add(branch)
                if progress is not None:
                    progress(len(done), len(branches))

        workers = [
            asyncio.create_task(copy_some(), name=f"bootstrap.copy.{peer.node_id}")
            for _ in range(BRANCHES_AT_ONCE)
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    async def _anchor(
        self,
        peer: Peer,
        facts: PeerFacts,
        own: NodeRecord | None,
        repair: PeerRepair,
        absent: list[str],
        tail: StreamId,
        resumed: bool,
        began: float,
    ) -> None:
        """Everything the peer held when the copy began is here (for a resumed copy, when the
        first attempt began): anchor the tailer there. Claims are only taken from the record
        read at that same moment, which a resumed copy no longer has; its next repair cycle
        takes them."""
        saved_token = await self.cursors.meta_get(_BOOTSTRAP_TOKEN + peer.node_id)
        record = facts.record
        complete = is_complete(repair) and record is not None
        if resumed and (record is None or saved_token != record.token):
            complete = False
        if record is None:
            return
        if resumed and complete:
            record = _without_claims(record)
        await self.claims.conclude(
            peer,
            PeerFacts(record, StreamInfo(0, None, tail), facts.root, facts.read_at),
            own,
            repair,
            absent=absent,
            behind=self.fetcher.behind(peer.node_id),
            complete=complete,
            began=began,
        )


def _without_claims(record: NodeRecord) -> NodeRecord:
    """``record`` claiming nothing: an anchor is taken, its claims are not."""
    return NodeRecord(
        node_id=record.node_id,
        relay=record.relay,
        incarnation=record.incarnation,
        epoch=record.epoch,
        cert=record.cert,
        state=record.state,
    )
