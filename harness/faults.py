"""Seeded chaos runs: a fault schedule drawn from the seed, carried out on a mesh under load.

:func:`run_chaos` starts 3 to 5 nodes (:class:`harness.chaos.ChaosMesh`) and a workload, then
runs the schedule (faults on disjoint nodes may overlap): kill -9 of a node's Redis and
restart; a crash (``engine.abort``) or graceful stop of a node's engine and a new engine on the
same cursor database; SIGSTOP of a Redis for longer than the peer circuit timeout; partitions
(cut or blackhole, both ways, or one way); trimming a node's stream below a stopped node's
cursor; corrupt entries appended to a node's stream; a node's wall clock running seconds ahead
or behind; a node's cursor database deleted; a Redis restored from a backup or restarted
without its data; with ``membership``, a node joining late and one forgotten for good.

Then faults stop, writers stop, the mesh quiesces and the end state is checked:
:func:`harness.judge.judge` on the versions, plus a gap counted for every trim below a cursor,
exactly the injected corrupt entries quarantined, and every value dropped by absence found below
a delete of its key (:func:`harness.judge.unexplained_drops`).

Used by ``tests/chaos`` (bounded runs) and ``python -m bench.chaos`` (long runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from harness.chaos import BOOTSTRAP_DEADLINE_S, ChaosMesh, ChaosNode, Workload
from harness.judge import Judgement, judge, unexplained_drops
from harness.mesh import (
    DEFAULT_PREFIX,
    RESTART_DEADLINE_S,
    Version,
    Write,
    partitions_of,
    snapshot,
    version_order,
)
from replication_engine import codec
from replication_engine.clock import wall_clock_ms
from replication_engine.codec import StreamId
from replication_engine.config import EngineConfig
from replication_engine.store.layout import Keyspace
from replication_engine.testing import RedisFactory, RedisHandle, async_wait_until
from replication_engine.testing.cluster import PartitionServer, start_cluster

__all__ = [
    "FAULT_KINDS",
    "MEMBERSHIP_KINDS",
    "ChaosReport",
    "Fault",
    "FaultRunner",
    "plan_faults",
    "run_chaos",
]

# Every fault the runner knows, in the order reports list them.
FAULT_KINDS = (
    "redis_kill",
    "engine_kill",
    "redis_pause",
    "partition_cut",
    "partition_blackhole",
    "link_one_way",
    "trim",
    "corrupt",
    "clock_skew",
    "cursor_loss",
    "redis_restore",
    "redis_wipe",
)
# Faults of the mesh's membership, each planned once per run (run_chaos(membership=True)): a
# node added with start_from latest, a node forgotten for good at the end.
MEMBERSHIP_KINDS = ("member_join", "member_forget")
# Seconds each kind of fault lasts (drawn uniformly). A pause outlasts the peer op timeout
# (1 s) plus the circuit reset (1 s), so breakers open during it and half-open after it.
FAULT_SECONDS: dict[str, tuple[float, float]] = {
    "redis_kill": (0.5, 3.0),
    "engine_kill": (0.2, 3.0),
    "redis_pause": (2.5, 4.0),
    "partition_cut": (1.0, 4.0),
    "partition_blackhole": (1.5, 4.0),
    "trim": (0.5, 1.5),
    "corrupt": (0.2, 0.5),
    "clock_skew": (2.0, 6.0),
    "cursor_loss": (0.2, 1.5),
    # Longer than many collection ticks (0.2 s here): the one-way link holds collection back.
    "link_one_way": (1.5, 4.0),
    # Writes taken between the backup and the restore (or before the wipe) go with it.
    "redis_restore": (1.0, 3.0),
    "redis_wipe": (0.2, 1.0),
    "member_join": (0.1, 0.1),
    "member_forget": (0.1, 0.1),
}
# Quiet time between two faults (seconds).
FAULT_GAP_S = (0.3, 1.5)
# Share of faults that start while the previous one still runs (on other nodes: a fault holds
# a lock on each node it touches, so two faults never act on one node at once).
OVERLAP_SHARE = 0.3
# Wall-clock skew injected into a node (ms, either sign): far below max_clock_offset_sec.
SKEW_MS = (800, 2500)
# Entries kept by a trim; the stopped node's cursor must be older than all of them.
TRIM_KEEP = 2
# Writes made on the trimmed node while the lagging node is stopped, so there is a gap to make.
TRIM_BURST = 20
# Deadline for the restarted lagging node to report the gap.
GAP_DEADLINE_S = 20.0


@dataclass
class Fault:
    """One planned fault and, once run, what happened."""

    kind: str
    node: str
    other: str
    start_s: float  # planned offset from the start of the fault phase
    duration_s: float
    skew_ms: int = 0
    hard: bool = True  # engine_kill: cancel the tasks (True) or shut down gracefully
    count: int = 0  # corrupt: entries appended
    outcome: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        what = {
            "redis_kill": f"kill -9 redis of {self.node}",
            "engine_kill": f"{'kill' if self.hard else 'stop'} engine of {self.node}",
            "redis_pause": f"SIGSTOP redis of {self.node}",
            "partition_cut": f"cut {self.node}<->{self.other}",
            "partition_blackhole": f"blackhole {self.node}<->{self.other}",
            "trim": f"trim stream of {self.node} below the cursor of stopped {self.other}",
            "corrupt": f"{self.count} corrupt entries into the stream of {self.node}",
            "clock_skew": f"clock of {self.node} {self.skew_ms:+d} ms",
            "cursor_loss": f"delete the cursor db of {self.node} (engine stopped), restart",
            "link_one_way": f"cut only {self.node}'s link to {self.other}",
            "redis_restore": f"restore redis of {self.node} from a backup taken at the start",
            "redis_wipe": f"restart redis of {self.node} without its data",
            "member_join": f"{self.node} joins with start_from latest",
            "member_forget": f"{self.node} gone for good, forgotten by {self.other}",
        }[self.kind]
        outcome = f" -> {self.outcome}" if self.outcome else ""
        return f"t={self.start_s:6.2f}s {self.duration_s:4.1f}s {what}{outcome}"


def plan_faults(
    seed: int,
    node_ids: Sequence[str],
    duration_s: float,
    kinds: Sequence[str] = FAULT_KINDS,
    *,
    overlap_share: float = OVERLAP_SHARE,
) -> list[Fault]:
    """A reproducible schedule covering every kind at least once.

    Kinds are drawn from a shuffled bag (refilled when empty), so a schedule covers every kind
    before repeating any; the first bag is planned whatever ``duration_s``. A fault usually
    starts after the previous one ended plus a quiet gap; ``overlap_share`` of them start while
    it still runs.
    """
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown:
        raise ValueError(f"unknown fault kinds {unknown}; known: {', '.join(FAULT_KINDS)}")
    if len(node_ids) < 2:
        raise ValueError("a chaos run needs at least 2 nodes")
    rng = random.Random(f"faults/{seed}")
    faults: list[Fault] = []
    bag: list[str] = []
    at = rng.uniform(*FAULT_GAP_S)
    first_bag = len(kinds)
    while True:
        if not bag:
            bag = list(kinds)
            rng.shuffle(bag)
        kind = bag.pop()
        duration = rng.uniform(*FAULT_SECONDS[kind])
        if at + duration > duration_s and len(faults) >= first_bag:
            break
        node, other = rng.sample(list(node_ids), 2)
        faults.append(
            Fault(
                kind=kind,
                node=node,
                other=other,
                start_s=round(at, 3),
                duration_s=round(duration, 3),
                skew_ms=rng.choice((-1, 1)) * rng.randint(*SKEW_MS),
                hard=rng.random() < 0.7,
                count=rng.randint(1, 4),
            )
        )
        if rng.random() < overlap_share:
            at += rng.uniform(0.1, duration)
        else:
            at += duration + rng.uniform(*FAULT_GAP_S)
    return faults


_CORRUPTIONS: tuple[Callable[[str, int], dict[str, bytes]], ...] = (
    # A PUT whose data does not match its hash.
    lambda key, n: {
        "op": b"PUT",
        "key": key.encode(),
        "hash": b"0" * 32,
        "data": f"tampered {n}".encode(),
        "meta": b'{"hlc":"0000000000000001","origin":"x","version":1}',
    },
    # An unknown operation.
    lambda key, n: {"op": b"MERGE", "key": key.encode(), "meta": b"{}"},
    # Meta that is not JSON.
    lambda key, n: {"op": b"DEL", "key": key.encode(), "meta": b"{not json"},
    # A PUT without data.
    lambda key, n: {"op": b"PUT", "key": key.encode(), "hash": b"0" * 32, "meta": b"{}"},
    # An HLC that is not 16 hex digits.
    lambda key, n: {"op": b"DEL", "key": key.encode(), "meta": b'{"hlc":"soon"}'},
)


class FaultRunner:
    """Carries faults out on a mesh and remembers what each one did.

    A fault holds a lock on every node it touches (``node``, and ``other`` for partitions and
    trims), so overlapping faults act on disjoint nodes.
    """

    def __init__(
        self, mesh: ChaosMesh, workload: Workload, seed: int, workdir: Path | None = None
    ) -> None:
        self.mesh = mesh
        self.workload = workload
        self.workdir = workdir or Path(".")
        # (key, hlc, origin) of acknowledged writes an operator's action may have taken away.
        self.lost_to_operator: set[tuple[str, int, str]] = set()
        self.backups = 0
        self.rng = random.Random(f"runner/{seed}")
        self.injected: dict[str, set[StreamId]] = {n: set() for n in mesh.ids}
        self.trimmed_injected: dict[str, set[StreamId]] = {n: set() for n in mesh.ids}
        self.trims: list[Fault] = []
        # node -> peer -> stream id up to which the node's quarantine of that peer was reset.
        self.excused: dict[str, dict[str, StreamId]] = {n: {} for n in mesh.ids}
        self.last_fault_end: float | None = None
        self._locks = {n: asyncio.Lock() for n in mesh.ids}
        self.epoch = time.monotonic()  # start of the fault phase, for outcome times

    def touches(self, fault: Fault) -> list[str]:
        both = fault.kind.startswith("partition") or fault.kind in (
            "trim",
            "link_one_way",
            "member_forget",
        )
        return sorted({fault.node, fault.other} if both else {fault.node})

    async def run(self, fault: Fault) -> None:
        """Carry ``fault`` out (holding its nodes' locks); on error, restore those nodes."""
        async with contextlib.AsyncExitStack() as held:
            for node_id in self.touches(fault):  # sorted: no lock-order deadlock
                await held.enter_async_context(self._locks[node_id])
            fault.outcome["started_at_s"] = round(time.monotonic() - self.epoch, 2)
            try:
                await getattr(self, f"_{fault.kind}")(fault)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.restore(self.touches(fault))
                raise
            finally:
                self.last_fault_end = time.monotonic()

    async def _hold(self, seconds: float) -> None:
        # The fault's planned duration: what is being simulated, not a wait for an outcome.
        await asyncio.sleep(seconds)

    async def _redis_kill(self, fault: Fault) -> None:
        self.mesh.kill_redis(fault.node)
        await self._hold(fault.duration_s)
        await self.mesh.restart_redis(fault.node)

    async def _engine_kill(self, fault: Fault) -> None:
        if fault.hard:
            await self.mesh.kill_engine(fault.node)
        else:
            await self.mesh.stop_engine(fault.node)
        await self._hold(fault.duration_s)
        await self.mesh.start_engine(fault.node)

    async def _redis_pause(self, fault: Fault) -> None:
        self.mesh.pause_redis(fault.node)
        try:
            await self._hold(fault.duration_s)
            fault.outcome["circuits"] = {
                n.node_id: n.engine.peers[fault.node].circuit_state
                for n in self.mesh
                if n.engine is not None and fault.node in n.engine.peers
            }
        finally:
            self.mesh.resume_redis(fault.node)

    async def _partition_cut(self, fault: Fault) -> None:
        self.mesh.partition(fault.node, fault.other, how="cut")
        await self._hold(fault.duration_s)
        self.mesh.heal(fault.node, fault.other)

    async def _partition_blackhole(self, fault: Fault) -> None:
        self.mesh.partition(fault.node, fault.other, how="blackhole")
        await self._hold(fault.duration_s)
        self.mesh.heal(fault.node, fault.other)

    async def _trim(self, fault: Fault) -> None:
        """Stop ``other``, write on ``node``, trim ``node``'s stream past ``other``'s cursor."""
        lagging = self.mesh[fault.other]
        await self.mesh.stop_engine(fault.other)
        cursor = lagging.saved_cursors().get(fault.node)
        burst = await self.workload.burst(fault.node, TRIM_BURST, self.rng)
        first = await self.mesh.trim(fault.node, TRIM_KEEP)
        for sid in self.injected[fault.node]:
            if first is None or sid < first:
                self.trimmed_injected[fault.node].add(sid)
        below = cursor is not None and first is not None and first > cursor.next()
        fault.outcome.update(
            cursor=str(cursor), first_left=str(first), burst=burst, below_cursor=below
        )
        await self._hold(fault.duration_s)
        engine = await self.mesh.start_engine(fault.other)
        if below:
            self.trims.append(fault)
            gaps = engine.metrics.registry
            try:
                await async_wait_until(
                    lambda: (
                        (
                            gaps.get_sample_value(
                                "replication_stream_gaps_total", {"peer": fault.node}
                            )
                            or 0
                        )
                        > 0
                    ),
                    timeout=GAP_DEADLINE_S,
                    interval=0.05,
                )
                fault.outcome["gap_reported"] = True
            except AssertionError:
                fault.outcome["gap_reported"] = False

    async def _corrupt(self, fault: Fault) -> None:
        entries = [
            _CORRUPTIONS[self.rng.randrange(len(_CORRUPTIONS))](
                self.rng.choice(self.workload.keys), i
            )
            for i in range(fault.count)
        ]
        ids = await self.mesh.append_corrupt(fault.node, entries)
        self.injected[fault.node].update(ids)
        fault.outcome["ids"] = [str(i) for i in ids]
        await self._hold(fault.duration_s)

    async def _clock_skew(self, fault: Fault) -> None:
        node = self.mesh[fault.node]
        node.skew_ms = fault.skew_ms
        try:
            await self._hold(fault.duration_s)
        finally:
            node.skew_ms = 0

    async def _cursor_loss(self, fault: Fault) -> None:
        """Stop the engine, delete its cursor database, start again: it must resume from the
        positions its store recorded (or bootstrap, where it has none)."""
        node = self.mesh[fault.node]
        await self.mesh.stop_engine(fault.node)
        node.delete_cursor_db()
        await self._hold(fault.duration_s)
        await self.mesh.start_engine(fault.node)
        # The new engine reads on from its store's position in each peer's stream: corrupt
        # entries before its first saved cursor were quarantined in the old database, gone with
        # it, so they are excused from the quarantine check.
        for peer_id in node.peer_ids:
            if peer_id in self.mesh.forgotten:
                # Gone for good (its Redis with it): nothing to resume. The forget comes after
                # the last fault, but a starved harness starts a fault late, past it.
                continue
            cursors: list[StreamId] = []
            for lane in node.lanes(peer_id):  # a node of many partitions reads each on its own
                saved = cast(Callable[[], StreamId], functools.partial(node.saved_cursor, lane))
                cursor: StreamId = await async_wait_until(
                    saved,
                    timeout=BOOTSTRAP_DEADLINE_S,
                    interval=0.05,
                    message=f"{fault.node} resumed reading {lane}",
                )
                cursors.append(cursor)
            self.excused[fault.node][peer_id] = min(cursors)
        fault.outcome["bootstrapped_to"] = {p: str(c) for p, c in self.excused[fault.node].items()}

    async def _link_one_way(self, fault: Fault) -> None:
        self.mesh.partition_one_way(fault.node, fault.other)
        await self._hold(fault.duration_s)
        self.mesh.heal_one_way(fault.node, fault.other)

    async def _redis_restore(self, fault: Fault) -> None:
        """Back the node's Redis up, let it take writes, restore the backup (its engine runs)."""
        self.backups += 1
        backup = self.workdir / f"backup-{fault.node}-{self.backups}"
        mark = len(self.workload.writes)
        taken_ms = wall_clock_ms()
        await self.mesh.backup_redis(fault.node, backup)
        await self._hold(fault.duration_s)
        await self._take_away(
            fault, mark, taken_ms, lambda: self.mesh.restore_redis(fault.node, backup)
        )

    async def _redis_wipe(self, fault: Fault) -> None:
        """Restart the node's Redis without its data (no persistence), its engine running."""
        await self._take_away(fault, 0, 0, lambda: self.mesh.wipe_redis(fault.node))
        await self._hold(fault.duration_s)

    async def _take_away(
        self, fault: Fault, mark: int, since_ms: int, act: Callable[[], Awaitable[None]]
    ) -> None:
        """Do ``act`` (which loses the node's data since ``mark`` / ``since_ms``) with the
        node's writers paused, first noting which of its writes only it held: an operator's
        restore or wipe may rightly lose those (the checker excuses them)."""
        node_id = fault.node
        await self.workload.stop_node(node_id)
        only_there = await self._held_only_by(node_id, self.workload.writes[mark:])
        self.lost_to_operator.update((w.key, w.hlc, w.node) for w in only_there)
        excused = len(only_there)
        gone = {sid for sid in self.injected[node_id] if sid.ms >= since_ms}
        self.trimmed_injected[node_id] |= gone
        await act()
        fault.outcome.update(writes_only_there=excused, corrupt_entries_gone=len(gone))
        self.workload.start_node(node_id)

    async def _held_only_by(self, node_id: str, writes: Sequence[Write]) -> list[Write]:
        """``node_id``'s writes that no other node holds: none holds that version or a later
        one of the key, and none that lacks the key has collected tombstones up to the write
        (a collected delete that superseded it is held as knowledge, not as a version)."""

        async def holdings(node: ChaosNode) -> tuple[dict[str, Version], dict[str, int]]:
            """What the node holds, and each partition's collected horizon."""
            horizons = {}
            for name, part in partitions_of(node.store).items():
                record = await part.record()
                horizons[name] = record.collected if record is not None else 0
            state = await snapshot(node.store, include_tombstones=True)
            return state, horizons

        others: list[tuple[dict[str, Version], dict[str, int]]] = []
        for node in self.mesh.live:
            if node.node_id != node_id:
                # A fault running alongside may have this node's Redis down for a moment.
                others.append(
                    await async_wait_until(
                        functools.partial(holdings, node),
                        timeout=2 * RESTART_DEADLINE_S,
                        interval=0.1,
                        ignore=(RedisConnectionError, RedisTimeoutError, OSError),
                        message=f"{node.node_id}'s Redis answering, to see what it holds",
                    )
                )
        only_there = []
        for write in writes:
            if write.node != node_id:
                continue
            held = False
            for state, horizons in others:
                version = state.get(write.key)
                if version is None:
                    held = horizons[self.mesh.geometry.partition_of(write.key)] >= write.hlc
                else:
                    held = version_order(version) >= write.order
                if held:
                    break
            if not held:
                only_there.append(write)
        return only_there

    async def _member_join(self, fault: Fault) -> None:
        """A new, empty node whose peers read from the latest entry on (docs/DELETES.md)."""
        node = self.mesh[fault.node]
        data = node.config.model_dump()
        for peer in data["peers"]:
            peer["start_from"] = "latest"
        node.config = EngineConfig.model_validate(data)
        engine = await self.mesh.start_engine(fault.node)
        membership = engine.status()["membership"]
        if "state" in membership:
            fault.outcome["membership"] = membership["state"]
        else:  # a node of many partitions: each has its own record
            fault.outcome["membership"] = sorted({m["state"] for m in membership.values()})
        self.workload.start_node(fault.node)

    async def _member_forget(self, fault: Fault) -> None:
        """The node is gone for good (engine and Redis), and ``other`` forgets it."""
        node_id = fault.node
        await self.workload.stop_node(node_id)
        only_there = await self._held_only_by(node_id, self.workload.writes)
        self.lost_to_operator.update((w.key, w.hlc, w.node) for w in only_there)
        if self.mesh[node_id].engine is not None:
            await self.mesh.stop_engine(node_id)
        self.mesh.kill_redis(node_id)
        self.mesh.forgotten.add(node_id)
        await self.mesh[fault.other].running().forget(node_id)

    async def restore(self, node_ids: Iterable[str] | None = None) -> None:
        """Undo whatever faults left on ``node_ids`` (default all): up, linked, running."""
        chosen = self.mesh.ids if node_ids is None else list(node_ids)
        nodes = [self.mesh[n] for n in chosen if n not in self.mesh.forgotten]
        for node in nodes:
            for peer_id in self.mesh.ids:
                if peer_id != node.node_id and peer_id not in self.mesh.forgotten:
                    self.mesh.heal(node.node_id, peer_id)
            node.skew_ms = 0
            if node.server.is_running():
                node.server.resume()
            else:
                await self.mesh.restart_redis(node.node_id)
        for node in nodes:
            if node.engine is None and node.config.peers and node.node_id not in self.workload.idle:
                await self.mesh.start_engine(node.node_id)


# ------------------------------------------------------------------------------------ a run


@dataclass
class ChaosReport:
    """Figures and findings of one run; ``ok`` says whether every check passed."""

    seed: int
    nodes: int
    fault_phase_s: float
    faults: list[Fault]
    judgement: Judgement | None = None
    converge_s: float | None = None
    settled_s: float | None = None  # until every tombstone was collected everywhere
    lost_to_operator: int = 0  # writes only a restored, wiped or forgotten node held
    absence_drops: float = 0.0  # versions dropped as proven dead by a peer's claims
    absence_drops_checked: int = 0  # of the values among them, those checked against deletes
    failures: list[str] = field(default_factory=list)
    gaps_total: float = 0.0
    quarantined_metric: float = 0.0
    quarantined_rows: int = 0
    injected_corrupt: int = 0
    cancel_retries: int = 0
    roots: dict[str, str] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def faults_by_kind(self) -> dict[str, int]:
        counts = Counter(f.kind for f in self.faults)
        return {kind: counts[kind] for kind in FAULT_KINDS + MEMBERSHIP_KINDS if counts[kind]}

    def summary(self) -> dict[str, Any]:
        j = self.judgement
        return {
            "seed": self.seed,
            "nodes": self.nodes,
            "ok": self.ok,
            "fault_phase_s": round(self.fault_phase_s, 1),
            "wall_s": round(self.wall_s, 1),
            "faults_by_kind": self.faults_by_kind(),
            "writes_acknowledged": j.acknowledged if j else None,
            "writes_unacknowledged": j.unacknowledged if j else None,
            "unacknowledged_that_landed": j.unacknowledged_landed if j else None,
            "writes_lost": len(j.lost) if j else None,
            "writes_lost_to_operator_action": self.lost_to_operator,
            "absence_drops": self.absence_drops,
            "absence_drops_of_values_checked": self.absence_drops_checked,
            "resurrections": len(j.resurrections) if j else None,
            "phantom_versions": len(j.phantoms) if j else None,
            "divergent_keys": len(j.divergent) if j else None,
            "keys": j.keys if j else None,
            "trims_below_cursor": sum(
                1 for f in self.faults if f.kind == "trim" and f.outcome.get("below_cursor")
            ),
            "trims_with_gap_reported": sum(1 for f in self.faults if f.outcome.get("gap_reported")),
            "gaps_counted": self.gaps_total,
            "corrupt_entries_injected": self.injected_corrupt,
            "quarantine_rows": self.quarantined_rows,
            "quarantine_events_counted": self.quarantined_metric,
            "cancel_retries": self.cancel_retries,
            "converge_after_last_fault_s": (
                None if self.converge_s is None else round(self.converge_s, 2)
            ),
            "all_tombstones_collected_after_last_fault_s": (
                None if self.settled_s is None else round(self.settled_s, 2)
            ),
        }

    def render(self) -> str:
        lines = [f"chaos run seed={self.seed} nodes={self.nodes}: {'OK' if self.ok else 'FAILED'}"]
        for key, value in self.summary().items():
            lines.append(f"  {key}: {value}")
        if not self.ok:
            lines.append(
                f"  reproduce: python -m bench.chaos --seed {self.seed} "
                f"--nodes {self.nodes} --duration {self.fault_phase_s:g}"
            )
            lines.append("  fault schedule:")
            lines.extend(f"    {f.describe()}" for f in self.faults)
            lines.append("  failures:")
            lines.extend(f"    {failure}" for failure in self.failures[:60])
            if len(self.failures) > 60:
                lines.append(f"    ... {len(self.failures) - 60} more")
        return "\n".join(lines)


async def run_chaos(
    seed: int,
    workdir: Path,
    make_server: RedisFactory,
    *,
    nodes: int = 3,
    duration_s: float = 45.0,
    kinds: Sequence[str] = FAULT_KINDS,
    keys: int = 40,
    rate_per_node: float = 25.0,
    converge_timeout_s: float = 120.0,
    config: Mapping[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    membership: bool = True,
    cluster_node: bool = False,
    preload: int = 0,
) -> ChaosReport:
    """One seeded run: mesh up, workload and faults for ``duration_s``, quiesce, judge.

    ``preload`` keys (of the ``keys``) are put on the first node just before the fault phase,
    so that a large key space has large tree nodes from the start.

    ``config`` is deep-merged into every node's engine configuration (e.g.
    ``{"local": {"stream_maxlen": 50}}`` for streams that trim themselves under load).

    With ``membership`` (and at least 3 nodes) one more node, configured in every peer list
    from the start, joins with ``start_from: latest`` at the start of the fault phase (until
    then it holds collection back, as a configured member that has not started does), and
    after the last fault one node other than it is gone for good and forgotten.

    With ``cluster_node``, node ``a``'s store is a Redis Cluster (3 masters with a replica
    each, AOF fsynced): a kill or pause of "its Redis" hits the master holding its data (a
    failover; the first kill and the first pause always go to ``a``), its peers read it
    directly (a link cut reaches only what ``a`` reads), its writes wait for one replica
    (``put(replicas=1)``), and restores, wipes and the forget go to other nodes.

    Never raises for a failed check: the report lists failures (with the seed and the
    schedule in :meth:`ChaosReport.render`). Raises only when the harness itself breaks.
    """
    if not 2 <= nodes <= 26:
        raise ValueError(f"nodes={nodes}: expected 2..26")
    started = time.monotonic()
    node_ids = [chr(ord("a") + i) for i in range(nodes)]
    joiner = chr(ord("a") + nodes) if membership and nodes >= 3 and nodes < 26 else None
    faults = plan_faults(seed, node_ids, duration_s, kinds)
    if joiner is not None:
        faults = _with_membership_faults(seed, node_ids, joiner, faults)
    clusters: dict[str, RedisHandle] = {}
    if cluster_node:
        faults = _onto_cluster([_off_cluster(f, "a", node_ids) for f in faults], "a")
        cluster = await asyncio.to_thread(
            start_cluster, make_server, masters=3, replicas=1, appendonly=True, appendfsync="always"
        )
        clusters["a"] = PartitionServer(cluster, key_slot(Keyspace(DEFAULT_PREFIX).record.encode()))
    report = ChaosReport(seed=seed, nodes=nodes, fault_phase_s=duration_s, faults=faults)
    say = progress or (lambda _message: None)
    everyone = [*node_ids, joiner] if joiner is not None else node_ids
    mesh = await ChaosMesh.open(
        everyone,
        workdir,
        make_server,
        config=config,
        start_engines=joiner is None,
        clusters=clusters,
    )
    if joiner is not None:
        try:
            for node_id in node_ids:
                await mesh.start_engine(node_id)
            await mesh.wait_bootstrapped()
        except BaseException:
            await mesh.aclose()
            raise
    workload = Workload(
        mesh, seed, keys=keys, rate_per_node=rate_per_node, replicas=dict.fromkeys(clusters, 1)
    )
    if joiner is not None:
        workload.idle.add(joiner)
    runner = FaultRunner(mesh, workload, seed, workdir)

    async def carry_out(fault: Fault) -> None:
        say(f"start {fault.describe()}")
        try:
            await runner.run(fault)
        except Exception as exc:
            report.failures.append(f"fault {fault.describe()} raised {type(exc).__name__}: {exc}")
        say(f"end   {fault.describe()}")

    try:
        if preload:
            await workload.preload(node_ids[0], min(preload, keys))
        workload.start()
        runner.epoch = phase_start = time.monotonic()
        async with asyncio.TaskGroup() as group:
            for fault in faults:
                # Keep to the schedule: the planned start is part of the reproducible plan.
                delay = phase_start + fault.start_s - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                group.create_task(carry_out(fault), name=f"chaos.fault[{fault.kind}]")
        await runner.restore()
        await workload.stop()
        last = runner.last_fault_end or time.monotonic()
        try:
            await mesh.wait_converged(converge_timeout_s)
            report.converge_s = time.monotonic() - last
        except AssertionError as exc:
            report.failures.append(str(exc))
        # The quarantine check asks every tailer about entries up to its peer's tail; one that
        # has still not got there by the deadline is reported by that check, with its state.
        await mesh.wait_tailers_at_tails(converge_timeout_s)
        # Every member up and the writers stopped: every delete is collected everywhere, and
        # the states are judged once nothing changes any more.
        try:
            await mesh.wait_settled(converge_timeout_s)
            report.settled_s = time.monotonic() - last
        except AssertionError as exc:
            report.failures.append(str(exc))
        await _check(report, mesh, workload, runner)
        report.lost_to_operator = len(runner.lost_to_operator)
        report.absence_drops = sum(
            n.metric_total("replication_absence_drops_total") for n in mesh.live
        )
    finally:
        with contextlib.suppress(BaseException):
            await workload.stop()
        errors = await mesh.aclose()
        report.failures.extend(f"teardown: {type(e).__name__}: {e}" for e in errors)
        report.wall_s = time.monotonic() - started
    return report


def _off_cluster(fault: Fault, cluster: str, node_ids: Sequence[str]) -> Fault:
    """``fault`` moved off the cluster node where it cannot act on one: a restore or wipe of
    data files, and the forget (a cluster node's Redis cannot be "gone for good" here)."""
    if fault.node != cluster or fault.kind not in ("redis_restore", "redis_wipe", "member_forget"):
        return fault
    other = fault.other if fault.other != cluster else next(n for n in node_ids if n != cluster)
    by = next((n for n in node_ids if n not in (cluster, other)), cluster)
    fault.node, fault.other = other, by
    return fault


def _onto_cluster(faults: list[Fault], cluster: str) -> list[Fault]:
    """``faults`` with the first Redis kill and the first pause moved onto the cluster node,
    so every run fails its data's master over at least once, and the first cut partition and
    one-way link fault moved onto links from the cluster node (read through a proxy per cluster
    node, so a cut reaches every connection to the cluster)."""
    for kind in ("redis_kill", "redis_pause"):
        first = next((f for f in faults if f.kind == kind), None)
        if first is not None and first.node != cluster:
            first.node, first.other = cluster, first.node
    for kind in ("partition_cut", "link_one_way"):
        first = next((f for f in faults if f.kind == kind), None)
        if first is not None and cluster not in (first.node, first.other):
            first.other = cluster  # node reads the cluster node: that link breaks
        elif first is not None and first.node == cluster:
            first.node, first.other = first.other, cluster
    return faults


def _with_membership_faults(
    seed: int, node_ids: Sequence[str], joiner: str, faults: list[Fault]
) -> list[Fault]:
    """``faults`` with a join of ``joiner`` before them and a forget after them all."""
    rng = random.Random(f"membership/{seed}")
    join = Fault("member_join", joiner, joiner, 0.1, FAULT_SECONDS["member_join"][0])
    end = max((f.start_s + f.duration_s for f in faults), default=0.0)
    gone, by = rng.sample(list(node_ids), 2)
    forget = Fault(
        "member_forget",
        gone,
        by,
        round(end + rng.uniform(*FAULT_GAP_S), 3),
        FAULT_SECONDS["member_forget"][0],
    )
    return [join, *faults, forget]


async def _check(
    report: ChaosReport, mesh: ChaosMesh, workload: Workload, runner: FaultRunner
) -> None:
    states = await mesh.states()
    report.roots = await mesh.roots()
    if len(set(report.roots.values())) != 1:
        report.failures.append(f"merkle roots differ: {report.roots}")
    judgement = judge(states, workload.writes, workload.unacknowledged, runner.lost_to_operator)
    report.judgement = judgement
    drops = {node.node_id: node.dropped_by_absence() for node in mesh.live}
    report.absence_drops_checked = sum(len(d) for d in drops.values())
    report.failures.extend(unexplained_drops(drops, workload.writes, workload.unacknowledged))
    for label, problems in (
        ("lost", judgement.lost),
        ("resurrected", judgement.resurrections),
        ("phantom", judgement.phantoms),
        ("divergent", judgement.divergent),
    ):
        report.failures.extend(f"{label}: {p}" for p in problems)
    for fault in runner.trims:
        if not fault.outcome.get("gap_reported"):
            report.failures.append(f"no gap reported for: {fault.describe()}")
    report.gaps_total = sum(
        n.metric_total("replication_stream_gaps_total", peer=p)
        for n in mesh.live
        for p in n.peer_ids
    )
    report.cancel_retries = mesh.cancel_retries
    report.injected_corrupt = sum(len(ids) for ids in runner.injected.values())
    # Corrupt entries trimmed away (by a trim fault, or by MAXLEN under load) before a node
    # read them cannot be asked of it.
    gone: dict[str, set[StreamId]] = {}
    oldest_of: dict[str, StreamId | None] = {}
    for peer in mesh.live:
        # Corrupt entries go to the stream of a store of one partition (the corrupt fault is
        # not run on nodes of many).
        store = next(iter(partitions_of(peer.store).values()))
        first = cast(list[tuple[bytes, Any]], await store.redis.xrange(store.keys.cdc, count=1))
        oldest = codec.parse_stream_id(first[0][0]) if first else None
        oldest_of[peer.node_id] = oldest
        gone[peer.node_id] = runner.trimmed_injected[peer.node_id] | {
            sid for sid in runner.injected[peer.node_id] if oldest is None or sid < oldest
        }
    for node in mesh.live:
        rows = node.quarantined()
        report.quarantined_rows += len(rows)
        report.quarantined_metric += node.metric_total("replication_cdc_events_quarantined_total")
        for peer_id in node.peer_ids:
            if peer_id in mesh.forgotten:
                continue
            got = {codec.parse_stream_id(sid) for p, sid, _ in rows if p == peer_id}
            injected = runner.injected[peer_id]
            unexpected = got - injected
            floor = runner.excused[node.node_id].get(peer_id, codec.STREAM_START)
            missing = {sid for sid in injected - gone[peer_id] - got if sid > floor}
            if unexpected:
                report.failures.append(
                    f"{node.node_id} quarantined entries of {peer_id} that "
                    f"were not injected: {sorted(map(str, unexpected))}"
                )
            if missing:
                tailer = node.engine.tailers.get(peer_id) if node.engine else None
                state = None if tailer is None else (tailer.mode, str(tailer.cursor))
                tail = await mesh[peer_id].store.stream_tail()
                report.failures.append(
                    f"{node.node_id} did not quarantine corrupt entries of {peer_id}: "
                    f"{sorted(map(str, missing))} (saved cursor {node.saved_cursor(peer_id)}, "
                    f"tailer {state}, {peer_id}'s stream {oldest_of[peer_id]}..{tail})"
                )
