"""This node's part in deletes by knowledge: certification, recovery, members and collection.

docs/DELETES.md is the design and :mod:`replication_engine.knowledge` its rules; this module
carries them out against Redis, once per tick (``settings.membership.interval_sec``):

1. **Certify** the store's claim about its own writes. The certify script refuses to advance it
   when the Redis process changed or the record's nonce is not the one this engine wrote last:
   the store may have lost writes, and the node goes into **recovery**.
2. **Read** every peer's record, derive the member set, publish it (with the forgotten set).
3. **Collect** the tombstones at or below the stable frontier, in bounded batches.
4. **Publish** what holds collection back, for status, metrics and alerts.

Recovery: local writes through the engine's store pause while the HLC floor is restored; every
peer is asked for a repair; once each has given a complete repair (the cold path calls
:meth:`Membership.on_repair_complete`), the store's own claim is certified again under a new
epoch and the node is serving again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from replication_engine import clock
from replication_engine.cursor import CursorStore
from replication_engine.knowledge import (
    ALL_WRITES,
    RECOVERING,
    SERVING,
    NodeRecord,
    derive_members,
    frontier,
    sid_key,
    stable_frontier,
)
from replication_engine.observability.metrics import Metrics
from replication_engine.peer import Peer
from replication_engine.store.redis_store import StoreOwnershipError

if TYPE_CHECKING:
    from replication_engine.store.protocol import Certification, RecordKeeper

__all__ = ["Membership"]

log = logging.getLogger(__name__)

# Cursor database meta entries: the Redis run_id and nonce this engine certified with last (and
# the nonce it was about to write, in case it stopped between the two writes), and the HLC
# floor (the highest store clock seen), a second opinion when the store loses its clock.
META_RUN = "store_run_id"
META_NONCE = "store_nonce"
META_NONCE_PENDING = "store_nonce_pending"
META_FLOOR = "hlc_floor"
# Batches of tombstones collected per tick at most: bounded work, the rest next tick.
GC_BATCHES_PER_TICK = 8
# What a node the mesh forgot says (docs/DELETES.md, "Forgetting a member").
# Ticks in a row with no peer listing this node before it is said (see _note_readers): a new
# node's peers publish it on their next tick.
_UNLISTED_TICKS = 5
# How long readiness remembers the record being rewritten by someone else (see notes()).
REWRITTEN_NOTE_SEC = 60.0
UNREAD_NOTE = (
    "no peer lists this node as a member, so none reads its stream: writes made here reach no "
    "other node; add it to the peers of the nodes it peers with"
)
_FORGOTTEN = (
    "the mesh forgot this node: every member drops its writes, so it takes none; to bring the "
    "machine back, wipe its store and give it a new node id"
)
# How _known_by names a peer it could not ask.
_UNASKED = "unreachable peer "
# Seconds a peer's clock read may take while the HLC floor is restored.
FLOOR_READ_TIMEOUT_SEC = 2.0


class Membership:
    """Certification, recovery, the member set and tombstone collection of one node.

    Args:
        node_id, mode, relay: this node (``relay`` is recorded: it decides what a reader of
            its stream may claim).
        store: our store.
        cursors: the cursor database (certification memory, HLC floor).
        peers: the configured peers.
        metrics: the engine's metrics.
        interval_sec: seconds between ticks.
        gc_batch: tombstones collected per script call.
        request_repair: asks the cold path for a repair from a peer (recovery).
        on_forgotten: called with a configured peer's id when it becomes forgotten.

    Error handling: :meth:`run` never raises for a peer or store failure; a failed tick is
    logged and the next one tries again. :meth:`open` raises when the store cannot be opened.
    """

    def __init__(
        self,
        *,
        node_id: str,
        mode: str,
        relay: bool,
        store: RecordKeeper,
        cursors: CursorStore,
        peers: Sequence[Peer],
        metrics: Metrics,
        interval_sec: float,
        gc_batch: int,
        scrub_per_tick: int,
        request_repair: Callable[[str, str], None],
        on_forgotten: Callable[[str], None] = lambda peer_id: None,
        max_clock_offset_ms: int | None = None,
    ) -> None:
        self.node_id = node_id
        # How far this process's clock may be from its Redis's before the node is not ready
        # (None: not checked); what is wrong with it now, if anything (see _note_clock).
        self.max_clock_offset_ms = max_clock_offset_ms
        self.clock_problem: str | None = None
        self.mode = mode
        self.relay = relay
        self.store = store
        self.cursors = cursors
        self.peers = list(peers)
        self.metrics = metrics
        self.interval_sec = interval_sec
        self.gc_batch = gc_batch
        self.scrub_per_tick = scrub_per_tick
        self._scrub_at = 0  # the next parent of leaf buckets to check
        self.tree_repairs = 0
        self.request_repair = request_repair
        self.on_forgotten = on_forgotten
        self.state = SERVING
        self.reason = ""
        self.since_ms: int | None = None
        # Monotonic times the record was found rewritten by someone else on the same Redis
        # process (see _certify): kept a while, since a second engine's recoveries are over
        # in milliseconds and a readiness probe would never see one.
        self._rewritten_at: list[float] = []
        self.recovery_pending: set[str] = set()  # peers still owing a complete repair
        self._recovery_began = 0.0  # monotonic: a repair that began before does not count
        # Forget barriers: forgotten id -> (monotonic start, incarnation and cert of our
        # record then, peers still owing a complete repair begun since).
        self.barriers: dict[str, tuple[float, str, int, set[str]]] = {}
        self.members: frozenset[str] = frozenset()
        self.waited_for: frozenset[str] = frozenset()
        self.forgotten: frozenset[str] = frozenset()
        self.records: dict[str, NodeRecord | None] = {}  # peers' records as last read
        self.unreadable: set[str] = set()  # peers whose record the last tick could not read
        self.own: NodeRecord | None = None
        self.stable = 0
        self.holder: str | None = None
        self.tombstones = 0
        self.oldest_tombstone_ms: int | None = None
        self.collected = 0  # tombstones collected by this engine
        self.ticks = 0  # ticks begun: what tests and status count time in
        self._holding_since: dict[str, float] = {}
        self._run = ""
        self._nonces: list[str] = []
        self._floor = 0
        self._certified_since_recovery = False
        self._opened = False
        self.unread = False  # no peer lists this node (see _note_readers)
        self._unlisted_ticks = 0
        self._tick_error: str | None = None
        self._collect_error: str | None = None
        self._wake = asyncio.Event()
        self._publish_recovery()

    # ------------------------------------------------------------------------ start

    async def open(self) -> None:
        """At engine start, before any tailer: open the record, certify, maybe recover.

        Returns with the HLC floor restored, so local writes through the store can go on. A
        local store that does not answer (or refuses the record) does not stop the engine from
        starting: the node counts as recovering, and every tick tries again. A store whose
        record names another node does (StoreOwnershipError): that is a wrong config, which no
        retry mends, and an engine on it would take that node's writes for its own.
        """
        try:
            await self._open()
        except StoreOwnershipError:
            raise  # a wrong config, not an outage: retrying would not make the store ours
        except Exception as exc:
            self._opened = False
            self.state = RECOVERING
            self.reason = f"the local store could not be opened: {_describe(exc)}"
            self.since_ms = clock.wall_clock_ms()
            self.metrics.recovering.set(1)
            log.warning(
                "membership.open_failed", extra={"node": self.node_id, "error": _describe(exc)}
            )

    async def _open(self) -> None:
        self._run = await self.cursors.meta_get(META_RUN) or ""
        self._nonces = [
            n
            for n in (
                await self.cursors.meta_get(META_NONCE),
                await self.cursors.meta_get(META_NONCE_PENDING),
            )
            if n
        ]
        self._floor = int(await self.cursors.meta_get(META_FLOOR) or 0)
        outcome, _inc, _epoch = await self.store.open_record(mode=self.mode, relay=self.relay)
        own = await self.store.record()
        if outcome == "created":
            known_by = await self._known_by()
            if known_by and known_by.startswith(_UNASKED):
                # A new node whose peer is down looks the same as a wiped one: be safe.
                await self._enter_recovery(
                    f"the store has no record, and {known_by} whether it knows this node's "
                    f"writes (a new node, or one whose Redis was wiped or replaced): "
                    f"recovering, to be safe"
                )
            elif known_by:
                await self._enter_recovery(
                    f"the store has no record, but {known_by} knows this node's writes: its "
                    f"Redis was wiped or replaced"
                )
            else:
                # Nobody has seen a write of this node: a new store, with nothing to recover.
                # Its first certification must not be mistaken for a store that moved. Its
                # clock still starts above its peers': a first write stamped below a tombstone
                # the mesh collected before it joined would be ordered before that delete
                # while nothing is left to say so.
                self._run = ""
                self._nonces = []
                await self._restore_floor()
                log.info("membership.new_store", extra={"node": self.node_id})
        elif own is not None and own.recovering:
            await self._enter_recovery(own.reason or "a recovery was left unfinished")
        await self._certify()
        self.own = await self.store.record()
        await self._publish_members()
        self._opened = True

    # ------------------------------------------------------------------------ loop

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad tick must not end the loop
                message = _describe(exc)
                if message != self._tick_error:  # once per distinct failure, not every tick
                    log.warning(
                        "membership.tick_failed", extra={"node": self.node_id, "error": message}
                    )
                self._tick_error = message
            else:
                self._tick_error = None
            if await _wait(stop, self._wake, self.interval_sec):
                return
            self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    async def tick(self) -> None:
        self.ticks += 1
        if not self._opened:
            self.state = SERVING  # decided afresh by the open
            await self._open()
            return
        await self._certify()
        await self._read_peers()
        await self._publish_members()
        self._note_readers()
        await self._close_barriers()
        self.own = await self.store.record()
        try:
            await self._collect()
        except Exception as exc:  # the rest of the tick still runs: scrub, metrics
            self._collection_failed(exc)
        else:
            self._collect_error = None
        await self._scrub()
        self._publish_metrics()

    def _collection_failed(self, exc: Exception) -> None:
        """Counted every time, logged once per distinct failure: a collection that keeps
        failing lets tombstones pile up, which nothing else would show."""
        self.metrics.tombstone_collection_failures.inc()
        message = _describe(exc)
        if message != self._collect_error:
            log.warning(
                "membership.collection_failed", extra={"node": self.node_id, "error": message}
            )
        self._collect_error = message

    # ------------------------------------------------------------------------ certification

    async def _certify(self) -> None:
        if self.state == RECOVERING and not self.recovery_pending and not self.store.writes_paused:
            await self._finish_recovery()
            return
        result, nonce = await self._run_certify(
            advance=self.state == SERVING, state=self.state, reason=self.reason
        )
        if result.outcome == "absent":
            await self.store.open_record(mode=self.mode, relay=self.relay)
            await self._enter_recovery("the store's record vanished: its Redis was wiped")
            await self._certify()
            return
        await self._remember(result.run_id, nonce, result.clock)
        expected = self.state == RECOVERING and not self._certified_since_recovery
        self._certified_since_recovery = True
        if result.outcome == "moved" and not expected:
            if result.recorded_run_id != result.run_id:
                why = (
                    f"the store's Redis restarted or was replaced (run_id "
                    f"{result.recorded_run_id[:8] or '-'} -> {result.run_id[:8]}): writes not "
                    f"yet persisted may be lost"
                )
            else:
                # The same Redis process: no restart, so either the record was put back by
                # hand (a restore into a running server) or another engine certifies it too.
                now = time.monotonic()
                self._rewritten_at = [
                    t for t in self._rewritten_at if now - t < REWRITTEN_NOTE_SEC
                ] + [now]
                why = (
                    f"the store's record does not hold the nonce this engine wrote last: "
                    f"another engine for node {self.node_id} runs on this store (stop all but "
                    f"one), or the record was restored or rewritten"
                )
            if self.state == RECOVERING:
                why = f"{why} (again, during its recovery: starting it over)"
            await self._enter_recovery(why)
            await self._certify()  # publish the state

    async def _run_certify(
        self, *, advance: bool, state: str, reason: str = "", new_epoch: str = ""
    ) -> tuple[Certification, str]:
        """One certify call with a fresh nonce, saved as pending first: an engine that stops
        between the script and :meth:`_remember` still knows the nonce it may have written."""
        nonce = secrets.token_hex(8)
        await self.cursors.meta_set(META_NONCE_PENDING, nonce)
        before = self.store.clock.wall()
        result = await self.store.certify(
            expected_run=self._run,
            expected_nonces=self._nonces,
            nonce=nonce,
            advance=advance,
            new_epoch=new_epoch,
            state=state,
            reason=reason,
        )
        self._note_clock(result.server_ms, before, self.store.clock.wall())
        return result, nonce

    def _note_clock(self, server_ms: int, before: int, after: int) -> None:
        """Compare this process's clock with its Redis's at every certification: one that
        jumped an hour back while the engine runs sets every peer's new write aside (clock
        skew) while the node looks current; ahead, it stamps this node's writes ahead of every
        other's. The node is not ready while they differ past ``max_clock_offset_ms``."""
        bound = self.max_clock_offset_ms
        if bound is None or not server_ms:
            return
        problem = clock.offset_problem(before, after, server_ms, bound)
        if problem is not None and self.clock_problem is None:
            log.error("membership.clock_off", extra={"node": self.node_id, "problem": problem})
        elif problem is None and self.clock_problem is not None:
            log.info("membership.clock_ok", extra={"node": self.node_id})
        self.clock_problem = problem

    async def _remember(self, run_id: str, nonce: str, store_clock: int) -> None:
        self._run = run_id
        self._nonces = [nonce]
        await self.cursors.meta_set(META_RUN, run_id)
        await self.cursors.meta_set(META_NONCE, nonce)
        floor = max(self._floor, store_clock, self.store.clock.last)
        if floor > self._floor:
            self._floor = floor
            await self.cursors.meta_set(META_FLOOR, str(floor))

    # ------------------------------------------------------------------------ recovery

    async def _known_by(self) -> str | None:
        """Who knows that this node wrote before: its engine's memory, or a peer that claims
        or anchors on its writes (None: a new store). An unreachable peer might."""
        if self._run or self._nonces:
            return "this engine's cursor database"
        for peer in self.peers:
            try:
                async with asyncio.timeout(FLOOR_READ_TIMEOUT_SEC):
                    record = await peer.record()
            except Exception:
                return f"{_UNASKED}{peer.node_id} cannot be asked"
            self.records[peer.node_id] = record
            if record is not None and _knows_writes_of(record, self.node_id):
                return f"peer {peer.node_id}"
        return None

    async def _enter_recovery(self, reason: str) -> None:
        first = self.state != RECOVERING
        self.state = RECOVERING
        # The first certification of a recovery finds the store "moved": that is what started
        # it. A later one means the store moved again.
        self._certified_since_recovery = False
        self.reason = reason
        self.recovery_pending = {p.node_id for p in self.peers if p.node_id not in self.forgotten}
        self._recovery_began = time.monotonic()
        # The store may have lost what a barrier's repairs brought: they begin again.
        self.barriers.clear()
        if first:
            self.since_ms = clock.wall_clock_ms()
            self.metrics.recoveries.inc()
            log.warning(
                "membership.recovering",
                extra={
                    "node": self.node_id,
                    "reason": reason,
                    "hint": "restoring the HLC floor and asking every peer for a complete "
                    "repair before claiming its own writes again",
                },
            )
        self.metrics.recovering.set(1)
        self._publish_recovery()
        await self._restore_floor()
        for peer_id in sorted(self.recovery_pending):
            self.request_repair(peer_id, "recovery")

    async def _restore_floor(self) -> None:
        """Raise the store clock above every HLC it may have issued before it lost its clock,
        and above every peer's (each read at once, for at most ``FLOOR_READ_TIMEOUT_SEC``).

        Local writes through the store pause meanwhile: a write stamped below one this node
        already issued would lose to it everywhere, silently.
        """
        self.store.writes_paused = "restoring the HLC floor after the store lost its clock"
        try:
            floor = max(self._floor, self.store.clock.last)
            reachable = [p for p in self.peers if not self.is_forgotten(p.node_id)]
            clocks = await asyncio.gather(*(self._peer_clock(peer) for peer in reachable))
            floor = max([floor, *clocks])
            if floor:
                await self.store.raise_clock(floor)
        finally:
            self.store.writes_paused = None

    @staticmethod
    async def _peer_clock(peer: Peer) -> int:
        try:
            async with asyncio.timeout(FLOOR_READ_TIMEOUT_SEC):
                return await peer.clock()
        except Exception:  # an unreachable peer cannot help; the others still do
            return 0

    def on_repair_complete(self, peer_id: str, began: float) -> None:
        """The cold path took ``peer_id``'s claims (a complete repair that began at the
        monotonic time ``began``)."""
        for barrier in self.barriers.values():
            if began >= barrier[0]:
                barrier[3].discard(peer_id)
        if peer_id in self.recovery_pending and began >= self._recovery_began:
            self.recovery_pending.discard(peer_id)
            self._publish_recovery()
            log.info(
                "membership.recovery_progress",
                extra={
                    "node": self.node_id,
                    "peer": peer_id,
                    "pending": sorted(self.recovery_pending),
                },
            )
            if not self.recovery_pending:
                self._wake.set()

    async def _finish_recovery(self) -> None:
        result, nonce = await self._run_certify(
            advance=True, state=SERVING, new_epoch=secrets.token_hex(4)
        )
        await self._remember(result.run_id, nonce, result.clock)
        if result.outcome != "ok":
            # The store moved again during the recovery: start it over.
            self.state = SERVING
            await self._enter_recovery("the store changed again during its recovery")
            return
        self.state = SERVING
        self.reason = ""
        self.since_ms = clock.wall_clock_ms()
        self.metrics.recovering.set(0)
        self._publish_recovery()
        log.info(
            "membership.recovered",
            extra={
                "node": self.node_id,
                "hint": "every peer gave a complete repair; its own writes are certified again "
                "under a new epoch",
            },
        )

    # ------------------------------------------------------------------------ members

    async def _read_peers(self) -> None:
        self.unreadable = set()
        for peer in self.peers:
            try:
                self.records[peer.node_id] = await peer.record()
            except Exception:  # keep the last record read: claims only grow
                self.unreadable.add(peer.node_id)

    def _note_readers(self) -> None:
        """Say when no peer lists this node as a member, for ``_UNLISTED_TICKS`` ticks in a
        row with every peer's record read: a node that reads its peers but that none of them
        reads (missing from their peers lists) takes writes that reach no other node, and is
        otherwise ready and in sync by every other measure. A node listed by some member has a
        reader (members come from configured peers), so this never flags a working mesh; a
        follower takes no writes and is never read by its upstream."""
        if self.mode != "mesh" or not self.peers:
            return
        records = [self.records.get(peer.node_id) for peer in self.peers]
        if self.unreadable or any(record is None for record in records):
            return  # a peer not read, or whose engine never ran: no telling yet
        if any(self.node_id in record.members for record in records if record is not None):
            if self.unread:
                log.info("membership.read_by_peers", extra={"node": self.node_id})
            self.unread, self._unlisted_ticks = False, 0
            return
        self._unlisted_ticks += 1
        if self._unlisted_ticks >= _UNLISTED_TICKS and not self.unread:
            self.unread = True
            log.warning(
                "membership.unread",
                extra={
                    "node": self.node_id,
                    "peers": [p.node_id for p in self.peers],
                    "hint": UNREAD_NOTE,
                },
            )

    async def _publish_members(self) -> None:
        own = await self.store.record()
        published, waited, gone = derive_members(
            node_id=self.node_id,
            mode=self.mode,
            peers=[p.node_id for p in self.peers],
            own=own,
            records=self.records,
        )
        if own is None or published - own.members or gone - own.forgotten:
            published, gone = await self.store.add_to_record(members=published, forgotten=gone)
        newly = gone - self.forgotten
        self.members, self.waited_for, self.forgotten = published, waited - gone, gone
        if self.node_id in gone and self.store.writes_refused is None:
            # Every member drops this node's writes now: taking one would acknowledge a loss.
            self.store.writes_refused = _FORGOTTEN
            log.error(
                "membership.self_forgotten",
                extra={"node": self.node_id, "hint": _FORGOTTEN},
            )
        self._open_barriers(own)
        for peer in self.peers:
            if peer.node_id in newly:
                log.warning(
                    "membership.peer_forgotten",
                    extra={
                        "node": self.node_id,
                        "peer": peer.node_id,
                        "hint": "nothing is read or pulled from it any more; collection no "
                        "longer waits for it",
                    },
                )
                self.recovery_pending.discard(peer.node_id)
                self._publish_recovery()
                self.on_forgotten(peer.node_id)

    def _open_barriers(self, own: NodeRecord | None) -> None:
        """Start a forget barrier for each forgotten node this store does not claim entirely.

        Its writes that some member still holds must stay protected by a claim after it is
        gone: until this store claims all of them, collection waits, and this store claims
        them only once it has had a complete repair from every peer that began after the
        forget was known here (so it holds every write of the forgotten node any peer holds).
        Barriers live in memory; an engine that restarts begins them again.
        """
        if own is None:
            return
        for gone in sorted(self.forgotten - self.barriers.keys()):
            if gone == self.node_id or own.claim(gone) >= ALL_WRITES:
                continue
            owing = {p.node_id for p in self.peers if p.node_id not in self.forgotten}
            self.barriers[gone] = (time.monotonic(), own.incarnation, own.cert, owing)
            log.info(
                "membership.forget_barrier",
                extra={
                    "node": self.node_id,
                    "forgotten": gone,
                    "peers": sorted(owing),
                    "hint": "claiming its writes after a complete repair from each peer",
                },
            )
            for peer_id in sorted(owing):
                self.request_repair(peer_id, "forget")

    async def _close_barriers(self) -> None:
        closed = sorted(gone for gone, barrier in self.barriers.items() if not barrier[3])
        if not closed:
            return
        _began, incarnation, cert, _owing = self.barriers[closed[0]]
        ready = [gone for gone in closed if self.barriers[gone][1:3] == (incarnation, cert)]
        if await self.store.claim_all_writes(ready, incarnation=incarnation, cert=cert):
            log.info(
                "membership.forget_claimed",
                extra={
                    "node": self.node_id,
                    "forgotten": ready,
                    "hint": "every peer gave a complete repair since the forget; collection "
                    "no longer waits on their writes",
                },
            )
        for gone in ready:  # claimed, or our record went back: the barrier begins again
            del self.barriers[gone]

    def is_forgotten(self, node_id: str) -> bool:
        return node_id in self.forgotten

    async def forget(self, node_id: str) -> None:
        """Forget a member gone for good (the operator verb; see docs/DELETES.md).

        Raises:
            ValueError: ``node_id`` is this node.
        """
        if node_id == self.node_id:
            raise ValueError(f"node {node_id!r} cannot forget itself")
        await self.store.add_to_record(forgotten=[node_id])
        log.warning("membership.forget", extra={"node": self.node_id, "forgotten": node_id})
        await self._publish_members()
        self._wake.set()

    # ------------------------------------------------------------------------ collection

    async def _collect(self) -> None:
        own = self.own
        records: dict[str, NodeRecord | None] = dict(self.records)
        records[self.node_id] = own
        if self.mode == "mesh":
            self.stable, self.holder = stable_frontier(
                self.waited_for, records, self.unreadable, self.forgotten
            )
        else:
            # A follower mirrors its upstream: members never wait for it, and it waits only
            # for its own knowledge (docs/DELETES.md, "Followers").
            self.stable = frontier(own, self.waited_for, self.forgotten)
            self.holder = self.node_id
        if own is not None and self.stable > 0:
            await self._collect_below(own)
        # Counted once, after collecting: a count taken before would be published while the
        # tombstones it counts are already gone.
        self.tombstones = await self.store.tombstone_count()
        self.oldest_tombstone_ms = await self.store.oldest_tombstone_ms()

    async def _collect_below(self, own: NodeRecord) -> None:
        for _ in range(GC_BATCHES_PER_TICK):
            done = await self.store.collect_tombstones(
                self.stable, incarnation=own.incarnation, cert=own.cert, limit=self.gc_batch
            )
            if done > 0:
                self.collected += done
                self.metrics.tombstones_collected.inc(done)
            if done < self.gc_batch:
                break

    async def _scrub(self) -> None:
        """Check a few parents of leaf buckets against their leaves, round robin."""
        if not self.scrub_per_tick:
            return
        parents = self.store.leaf_parents()
        for _ in range(min(self.scrub_per_tick, len(parents))):
            parent = parents[self._scrub_at % len(parents)]
            self._scrub_at += 1
            fixed = await self.store.scrub(parent, fix=True)
            if fixed:
                self.tree_repairs += fixed
                self.metrics.tree_repairs.inc(fixed)
                log.warning(
                    "membership.tree_rebuilt",
                    extra={
                        "node": self.node_id,
                        "parent": parent,
                        "nodes_rebuilt": fixed,
                        "hint": "tree nodes disagreed with their children and were rebuilt "
                        "from the leaves",
                    },
                )

    def _publish_recovery(self) -> None:
        """1 for each peer the recovery still waits for, 0 for every other: set wherever the
        pending set changes, so a recovery that ends between two ticks still shows it ended."""
        for peer in self.peers:
            pending = peer.node_id in self.recovery_pending
            self.metrics.recovery_pending.labels(peer.node_id).set(1 if pending else 0)

    def _publish_metrics(self) -> None:
        now = time.monotonic()
        self.metrics.tombstones.set(self.tombstones)
        self.metrics.members.set(len(self.members))
        self.metrics.forgotten_members.set(len(self.forgotten))
        wall = clock.wall_clock_ms()
        oldest = self.oldest_tombstone_ms
        self.metrics.oldest_tombstone_age.set(
            0.0 if oldest is None else max(0.0, (wall - oldest) / 1000)
        )
        if self.stable:
            behind = (wall - clock.physical_ms(self.stable)) / 1000
            self.metrics.stable_frontier_age.set(max(0.0, behind))
        held = (
            self.oldest_tombstone_ms is not None
            and clock.physical_ms(self.stable) < self.oldest_tombstone_ms
        )
        holder = self.holder if held else None
        for member in set(self._holding_since) | ({holder} if holder else set()):
            if member == holder:
                since = self._holding_since.setdefault(member, now)
                self.metrics.member_holding.labels(member).set(now - since)
            else:
                self._holding_since.pop(member, None)
                self.metrics.member_holding.labels(member).set(0)

    # ------------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        wall = clock.wall_clock_ms()

        def age(hlc: int) -> float | None:
            return round((wall - clock.physical_ms(hlc)) / 1000, 3) if hlc else None

        records: dict[str, NodeRecord | None] = dict(self.records)
        records[self.node_id] = self.own
        members = {
            member: {
                "frontier_age_sec": age(
                    frontier(records.get(member), self.waited_for, self.forgotten)
                ),
                "recovering": bool(records.get(member) and records[member].recovering),  # type: ignore[union-attr]
                "readable": records.get(member) is not None,
            }
            for member in sorted(self.waited_for)
        }
        held = (
            self.oldest_tombstone_ms is not None
            and clock.physical_ms(self.stable) < self.oldest_tombstone_ms
        )
        return {
            "state": self.state,
            "reason": self.reason or None,
            "since_ms": self.since_ms,
            "recovery_pending": sorted(self.recovery_pending),
            "members": members,
            "forgotten": sorted(self.forgotten),
            "forget_barriers": {
                gone: sorted(barrier[3]) for gone, barrier in sorted(self.barriers.items())
            },
            "stable_frontier_age_sec": age(self.stable),
            "held_back_by": self.holder if held else None,
            "tombstones": self.tombstones,
            "oldest_tombstone_age_sec": (
                None
                if self.oldest_tombstone_ms is None
                else round((wall - self.oldest_tombstone_ms) / 1000, 3)
            ),
            "collected": self.collected,
            "ticks": self.ticks,
            "unread_by_peers": self.unread,
        }

    def notes(self) -> list[str]:
        """What readiness should say while this node serves: a record rewritten by someone
        else more than once lately (another engine for this node, almost surely), and members
        this node does not peer with (a node taken out of the peer lists without a forget: its
        writes reach no one who does not read it, and collection waits for it)."""
        notes = []
        now = time.monotonic()
        recent = [t for t in self._rewritten_at if now - t < REWRITTEN_NOTE_SEC]
        if len(recent) >= 2:
            notes.append(
                f"another engine for node {self.node_id} runs on this store: its record was "
                f"rewritten by someone else more than once in the last "
                f"{REWRITTEN_NOTE_SEC:.0f}s (stop all but one; membership.recovering)"
            )
        peered = {peer.node_id for peer in self.peers}
        unpeered = sorted(self.members - peered - self.forgotten - {self.node_id})
        if unpeered and self.mode == "mesh":
            notes.append(
                f"member(s) {', '.join(unpeered)} not among this node's peers: this node does "
                f"not read their writes, and tombstone collection waits for them (add them as "
                f"peers, or `replication-engine forget` one gone for good)"
            )
        return notes

    def not_ready_reason(self) -> str | None:
        if self.node_id in self.forgotten:
            return _FORGOTTEN
        if self.clock_problem is not None:
            return self.clock_problem
        if self.state == SERVING:
            return None
        pending = ", ".join(sorted(self.recovery_pending)) or "-"
        return f"recovering: {self.reason}; waiting for a complete repair from {pending}"


async def _wait(stop: asyncio.Event, wake: asyncio.Event, timeout: float) -> bool:
    """Wait for ``stop``, ``wake`` or ``timeout``, whichever comes first; True when stopping."""
    waiters = {
        asyncio.create_task(stop.wait(), name="membership.stop"),
        asyncio.create_task(wake.wait(), name="membership.wake"),
    }
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return stop.is_set()


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def _knows_writes_of(record: NodeRecord, node_id: str) -> bool:
    """Whether ``record``'s store claims or anchors on some of ``node_id``'s writes.

    An anchor at the start of the stream knows none: a peer's repair can anchor on a new
    store's empty stream between its record's creation and this check, and that is no sign of
    a wipe.
    """
    anchor = record.anchors.get(node_id)
    return record.claims.get(node_id, 0) > 0 or (
        anchor is not None and anchor.position != sid_key(0, 0)
    )
