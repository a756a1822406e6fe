"""Seeded chaos runs against a real mesh, and the convergence checker that judges them.

A run starts 3 to 5 nodes. Each node is a real ``redis-server`` (``appendonly yes``,
``appendfsync always``), a :class:`RedisStore` whose HLC reads an injectable (skewable) wall
clock, and a :class:`ReplicationEngine` with both paths on. Every engine reaches every peer
through its own :class:`TcpProxy`, so a partition between two nodes is the two proxies between
them cut or blackholed. Writers put and delete overlapping keys on every node and record every
acknowledged write with the HLC the store returned; a write that raised is recorded as
*unacknowledged* (it may or may not have happened).

A fault schedule drawn from the seed then runs (faults on disjoint nodes may overlap): kill -9
of a node's Redis and restart; kill (task cancel) or graceful stop of a node's engine and a new
engine on the same cursor database; SIGSTOP of a Redis for longer than the peer circuit
timeout; partitions (cut or blackhole, both ways); trimming a node's stream below a stopped
node's cursor; corrupt entries appended to a node's stream; a node's wall clock running seconds
ahead or behind; a node's cursor database deleted (it must re-bootstrap).

Then faults stop, writers stop, the mesh quiesces and :func:`judge` checks the end state: every
Merkle root equal, every node holding the same versions, every key holding the last-writer-wins
winner of the acknowledged writes (or a newer unacknowledged one that did land), no
acknowledged write lost unless superseded, no deleted key resurrected, a gap counted for every
trim below a cursor, and exactly the injected corrupt entries quarantined.

Used by ``tests/chaos`` (bounded runs) and ``python -m bench.chaos`` (long runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import itertools
import random
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from harness.proxy import TcpProxy
from replication_engine import codec
from replication_engine.clock import HLC, wall_clock_ms
from replication_engine.codec import StreamId
from replication_engine.config import EngineConfig
from replication_engine.engine import ReplicationEngine
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisHandle, async_wait_until

__all__ = [
    "FAULT_KINDS",
    "ChaosMesh",
    "ChaosNode",
    "ChaosReport",
    "Fault",
    "Judgement",
    "Unacknowledged",
    "Version",
    "Workload",
    "Write",
    "judge",
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
# Deadline for a node whose cursor database was deleted to bootstrap from every peer.
BOOTSTRAP_DEADLINE_S = 60.0
# Deadline for a node's Redis to answer after a restart.
RESTART_DEADLINE_S = 30.0
# Bound on a graceful engine shutdown during a fault.
SHUTDOWN_BOUND_S = 15.0
# How long a cancelled engine task gets to end before it is cancelled again. Python 3.11's
# asyncio.wait_for (used by redis-py when sending) can lose a cancellation that lands while the
# send completes, so one cancel is not always enough; the retries are counted and reported.
CANCEL_ROUND_S = 0.5
CANCEL_ROUNDS = 40
# Key prefix of every store: the ACL in deploy/redis/users.acl grants ~app:*.
PREFIX = "app:"

# (value, or None for a tombstone; hlc; origin): one key's version on a node.
Version = tuple[bytes | None, int, str]
# What the runner needs to start a server: RedisProcess keyword arguments in, a started server out.
ServerFactory = Callable[..., RedisHandle]

# Engine settings of a chaos node: both paths on, short timeouts so faults are noticed and
# healed within seconds (cold path every second, peer op timeout 1 s, circuit reset 1 s).
CHAOS_SETTINGS: dict[str, Any] = {
    "hot_path": {"block_timeout": 0.2, "shutdown_timeout": 2.0},
    "cold_path": {
        "enabled": True,
        "interval_sec": 1.0,
        "backoff_base_sec": 0.5,
        "backoff_max_sec": 2.0,
        "root_cache_ttl_sec": 0.5,
    },
    # Peer op timeout is max(1 s, 10 x this).
    "slo": {"max_peer_op_latency_ms": 100},
    "peer_health": {"ping_interval_sec": 1.0, "idle_threshold_sec": 1.0},
    # Certify, read the members' records and collect tombstones five times a second.
    "membership": {"interval_sec": 0.2},
}
CHAOS_PEER_OPTIONS: dict[str, Any] = {
    "circuit_failure_threshold": 2,
    "circuit_reset_timeout_sec": 1.0,
}


# ------------------------------------------------------------------------------------ writes


@dataclass(frozen=True, slots=True)
class Write:
    """One acknowledged local write; ``value`` None is a delete."""

    node: str
    key: str
    value: bytes | None
    hlc: int

    @property
    def order(self) -> tuple[int, str]:
        """Last-writer-wins order: HLC, ties broken by origin node id."""
        return (self.hlc, self.node)

    @property
    def version(self) -> Version:
        return (self.value, self.hlc, self.node)


@dataclass(frozen=True, slots=True)
class Unacknowledged:
    """A write that raised: it may have happened (the reply was lost) or not."""

    node: str
    key: str
    value: bytes | None
    error: str


@dataclass(frozen=True, slots=True)
class Judgement:
    """What :func:`judge` found; ``ok`` only when every list of problems is empty."""

    keys: int
    acknowledged: int
    unacknowledged: int
    unacknowledged_landed: int  # final versions explained only by an unacknowledged write
    lost: list[str]  # acknowledged writes neither held nor superseded
    resurrections: list[str]  # keys whose acknowledged winner is a delete but that hold a value
    phantoms: list[str]  # final versions that no write (acknowledged or not) explains
    divergent: list[str]  # keys on which nodes disagree

    @property
    def ok(self) -> bool:
        return not (self.lost or self.resurrections or self.phantoms or self.divergent)


def _order(version: Version) -> tuple[int, str]:
    return (version[1], version[2])


def judge(
    states: Mapping[str, Mapping[str, Version]],
    writes: Sequence[Write],
    unacknowledged: Sequence[Unacknowledged] = (),
    lost_to_operator: Collection[tuple[str, int, str]] = (),
) -> Judgement:
    """Check final per-node states (tombstones included) against the writes made.

    Every node must hold the same version of every key. That version must be the
    last-writer-wins winner (max ``(hlc, origin)``) of the acknowledged writes of the key, or a
    newer version that an unacknowledged write of the same origin, key and value explains (a
    write whose reply was lost to a kill can still have landed). A key may also be gone from
    every node when that winner is a delete: its tombstone was collected (docs/DELETES.md). An
    acknowledged write is *lost* when the final version orders before it, or the key is gone
    while the winner is a value that no unacknowledged delete can have superseded; a
    *resurrection* is a key whose acknowledged winner is a delete but which holds an older
    value.

    ``lost_to_operator`` lists ``(key, hlc, origin)`` of acknowledged writes that only their
    origin's Redis held when an operator restored it from a backup, wiped it or removed the
    node for good: they may be gone, and the winner is judged among the other writes.
    """
    excused = set(lost_to_operator)
    by_key: dict[str, list[Write]] = {}
    for write in writes:
        if (write.key, write.hlc, write.node) not in excused:
            by_key.setdefault(write.key, []).append(write)
    maybe: set[tuple[str, str, bytes | None]] = {(u.node, u.key, u.value) for u in unacknowledged}
    acked_versions = {(w.key, w.node, w.hlc): w.value for w in writes}
    nodes = sorted(states)
    divergent: list[str] = []
    keys = set(by_key)
    for node in nodes:
        keys |= set(states[node])
    reference = states[nodes[0]] if nodes else {}
    for key in sorted(keys):
        seen = {node: states[node].get(key) for node in nodes}
        if len(set(seen.values())) > 1:
            divergent.append(f"{key}: " + ", ".join(f"{n}={_show(v)}" for n, v in seen.items()))
    lost: list[str] = []
    resurrections: list[str] = []
    phantoms: list[str] = []
    landed = 0
    for key in sorted(keys):
        final = reference.get(key)
        acked = by_key.get(key, [])
        winner = max(acked, key=lambda w: w.order) if acked else None
        if final is not None:
            value, hlc, origin = final
            if (key, origin, hlc) in acked_versions:
                if acked_versions[(key, origin, hlc)] != value:
                    phantoms.append(
                        f"{key}: holds {_show(final)}, written as "
                        f"{_show((acked_versions[(key, origin, hlc)], hlc, origin))}"
                    )
            elif (origin, key, value) in maybe:
                landed += 1
            else:
                phantoms.append(f"{key}: holds {_show(final)}, which no write explains")
        collected = final is None and (winner is None or winner.value is None)
        if (
            final is None
            and not collected
            and any(u.key == key and u.value is None for u in unacknowledged)
        ):
            landed += 1  # a delete whose reply was lost landed, and was collected since
            collected = True
        for write in acked:
            if collected:
                break
            if final is None or _order(final) < write.order:
                lost.append(f"{key}: {_show(write.version)} lost; holds {_show(final)}")
        if (
            winner is not None
            and winner.value is None
            and final is not None
            and final[0] is not None
            and _order(final) < winner.order
        ):
            resurrections.append(f"{key}: deleted at {_show(winner.version)}, holds {_show(final)}")
    return Judgement(
        keys=len(keys),
        acknowledged=len(writes),
        unacknowledged=len(unacknowledged),
        unacknowledged_landed=landed,
        lost=lost,
        resurrections=resurrections,
        phantoms=phantoms,
        divergent=divergent,
    )


def _show(version: Version | None) -> str:
    if version is None:
        return "nothing"
    value, hlc, origin = version
    what = "tombstone" if value is None else repr(value[:24])
    return f"{what}@{hlc:016x}/{origin}"


# ------------------------------------------------------------------------------------ mesh


class SkewedClock:
    """A wall clock (ms) running ``skew_ms`` ahead (or behind) the real one: an HLC source."""

    def __init__(self) -> None:
        self.skew_ms = 0

    def __call__(self) -> int:
        return wall_clock_ms() + self.skew_ms


@dataclass(eq=False)
class ChaosNode:
    """One node: its server, its store (shared by its successive engines) and its engine."""

    node_id: str
    server: RedisHandle
    store: RedisStore
    config: EngineConfig
    proxies: dict[str, TcpProxy]  # peer id -> the proxy this node's engine reads it through
    clock: SkewedClock
    engine: ReplicationEngine | None = None
    engines: list[ReplicationEngine] = field(default_factory=list)

    @property
    def skew_ms(self) -> int:
        return self.clock.skew_ms

    @skew_ms.setter
    def skew_ms(self, value: int) -> None:
        self.clock.skew_ms = value

    @property
    def cursor_path(self) -> Path:
        return Path(self.config.cursor.sqlite_path)

    def running(self) -> ReplicationEngine:
        if self.engine is None:
            raise AssertionError(f"node {self.node_id} has no running engine")
        return self.engine

    def metric_total(self, name: str, **labels: str) -> float:
        """Samples of ``name`` whose labels include ``labels``, summed over every engine this
        node has run (each engine has its own registry)."""
        total = 0.0
        for engine in self.engines:
            for family in engine.metrics.registry.collect():
                for sample in family.samples:
                    if sample.name == name and all(
                        sample.labels.get(k) == v for k, v in labels.items()
                    ):
                        total += sample.value
        return total

    def delete_cursor_db(self) -> None:
        """Remove the cursor database and its WAL files (the engine must be stopped)."""
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{self.cursor_path}{suffix}").unlink(missing_ok=True)

    def saved_cursors(self) -> dict[str, StreamId]:
        """Cursors on disk, read through a separate SQLite connection."""
        if not self.cursor_path.exists():
            return {}
        with contextlib.closing(sqlite3.connect(self.cursor_path)) as db:
            rows = db.execute("SELECT peer_id, stream_id FROM cursors").fetchall()
        return {str(peer): codec.parse_stream_id(str(sid)) for peer, sid in rows}

    def saved_cursor(self, peer_id: str) -> StreamId | None:
        return self.saved_cursors().get(peer_id)

    def membership(self) -> dict[str, Any]:
        """The running engine's membership status (docs/DELETES.md)."""
        status = self.running().status()["membership"]
        assert status is not None
        return cast(dict[str, Any], status)

    def quarantined(self) -> list[tuple[str, str, str]]:
        """(peer, stream id, reason) of every quarantine row kept on disk."""
        if not self.cursor_path.exists():
            return []
        with contextlib.closing(sqlite3.connect(self.cursor_path)) as db:
            rows = db.execute("SELECT peer_id, stream_id, reason FROM quarantine").fetchall()
        return [(str(p), str(s), str(r)) for p, s, r in rows]


# Files a Redis keeps its data in: the RDB, the AOF of 6.2 and the AOF directory of 7.x.
_DATA_FILES = ("dump.rdb", "appendonly.aof", "appendonlydir")


def _data_dir(server: RedisHandle) -> Path:
    data_dir = getattr(server, "data_dir", None)
    if data_dir is None:
        raise AssertionError(f"{server!r} keeps no data directory here (a docker server?)")
    return Path(data_dir)


def _remove_data_files(data_dir: Path) -> None:
    for name in _DATA_FILES:
        path = data_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _copy_data_files(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in _DATA_FILES:
        path = source / name
        if path.is_dir():
            shutil.copytree(path, target / name, dirs_exist_ok=True)
        elif path.exists():
            shutil.copy2(path, target / name)


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


class ChaosMesh:
    """A full mesh of chaos nodes with the fault operations the runner and tests use.

    Build it with :meth:`open`; :meth:`aclose` shuts engines down, closes stores and stops
    proxies. Servers belong to the factory that made them (the test fixture kills them).
    """

    def __init__(self, nodes: dict[str, ChaosNode]) -> None:
        self.nodes = nodes
        self.cancel_retries = 0  # extra cancel rounds needed by engine kills (see CANCEL_ROUND_S)
        self.forgotten: set[str] = set()  # nodes removed for good: out of every check
        # The states that the last successful :meth:`converged` check compared: judged as they
        # were, since a tombstone collected a moment later would make a re-read differ.
        self.converged_states: dict[str, dict[str, Version]] = {}

    def __getitem__(self, node_id: str) -> ChaosNode:
        return self.nodes[node_id]

    def __iter__(self) -> Any:
        return iter(self.nodes.values())

    @property
    def ids(self) -> list[str]:
        return list(self.nodes)

    @property
    def live(self) -> list[ChaosNode]:
        """Nodes not forgotten: what convergence and every final check are about."""
        return [n for n in self.nodes.values() if n.node_id not in self.forgotten]

    @classmethod
    async def open(
        cls,
        node_ids: Sequence[str],
        workdir: Path,
        make_server: ServerFactory,
        *,
        settings: Mapping[str, Any] | None = None,
        peer_options: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        topology: Mapping[str, Sequence[str]] | None = None,
        start_engines: bool = True,
    ) -> ChaosMesh:
        """Start servers, proxies and stores (and engines) for a full mesh of ``node_ids``.

        Args:
            node_ids: 2 or more node ids.
            workdir: where cursor databases go.
            make_server: starts one Redis; called with ``appendonly=True,
                appendfsync="always"``.
            settings: deep-merged over :data:`CHAOS_SETTINGS`.
            peer_options: merged into every peer entry over :data:`CHAOS_PEER_OPTIONS`.
            config: deep-merged into every node's whole config mapping (last).
            topology: node -> peers it tails; default every node tails every other.
            start_engines: start an engine on every node with peers.
        """
        topology = topology or {n: [p for p in node_ids if p != n] for n in node_ids}
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        servers = {n: make_server(appendonly=True, appendfsync="always") for n in node_ids}
        nodes: dict[str, ChaosNode] = {}
        mesh = cls(nodes)
        proxies: list[TcpProxy] = []
        try:
            for node_id in node_ids:
                own: dict[str, TcpProxy] = {}
                for peer_id in topology[node_id]:
                    target = servers[peer_id]
                    proxy = TcpProxy(target.host, target.port)
                    proxies.append(proxy)
                    await proxy.start()
                    own[peer_id] = proxy
                data = _node_config(
                    node_id, servers[node_id].url, own, workdir, settings, peer_options
                )
                _deep_merge(data, config or {})
                engine_config = EngineConfig.model_validate(data)
                clock = SkewedClock()
                store = await RedisStore.connect(
                    servers[node_id].url,
                    node_id=node_id,
                    prefix=engine_config.local.prefix,
                    fanout=engine_config.settings.merkle.fanout,
                    depth=engine_config.settings.merkle.depth,
                    stream_maxlen=engine_config.local.stream_maxlen,
                    max_clock_offset_sec=engine_config.local.max_clock_offset_sec,
                    hlc=HLC(clock),
                )
                nodes[node_id] = ChaosNode(
                    node_id, servers[node_id], store, engine_config, own, clock
                )
            if start_engines:
                for node_id in node_ids:
                    if topology[node_id]:
                        await mesh.start_engine(node_id)
                await mesh.wait_bootstrapped()
        except BaseException:
            await mesh.aclose()
            for proxy in proxies:
                if not any(proxy in n.proxies.values() for n in nodes.values()):
                    await proxy.stop()
            raise
        return mesh

    # ------------------------------------------------------------------ engines

    async def start_engine(self, node_id: str) -> ReplicationEngine:
        """A new engine on the node's store and cursor database, started."""
        node = self.nodes[node_id]
        if node.engine is not None:
            raise AssertionError(f"node {node_id} already runs an engine")
        engine = ReplicationEngine(node.config, store=node.store)
        node.engines.append(engine)
        await engine.start()
        node.engine = engine
        return engine

    async def stop_engine(self, node_id: str) -> ReplicationEngine:
        """Graceful shutdown (drains, saves cursors), bounded."""
        node = self.nodes[node_id]
        engine = node.running()
        node.engine = None
        await engine.shutdown(SHUTDOWN_BOUND_S)
        return engine

    async def kill_engine(self, node_id: str) -> ReplicationEngine:
        """Cancel every task of the node's engine where it stands (a crash), then release it.

        Unlike :meth:`stop_engine` nothing is asked to stop first: a tailer is cut mid-read,
        mid-apply or mid-save. Connections and the cursor database are closed afterwards, as
        the operating system would close them for a dead process.
        """
        node = self.nodes[node_id]
        engine = node.running()
        node.engine = None
        tasks = list(engine._tasks.values())
        for round_no in range(CANCEL_ROUNDS):
            pending = [t for t in tasks if not t.done()]
            if not pending:
                break
            if round_no:
                self.cancel_retries += 1
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=CANCEL_ROUND_S)
        still = [t.get_name() for t in tasks if not t.done()]
        if still:
            raise AssertionError(f"node {node_id}: engine tasks survived cancellation: {still}")
        await engine.shutdown(SHUTDOWN_BOUND_S)
        return engine

    async def wait_bootstrapped(self, timeout: float = BOOTSTRAP_DEADLINE_S) -> None:
        """Wait until every running engine has a saved cursor for each of its peers.

        A fresh engine first bootstraps from each peer's snapshot and tails from the peer's
        tail at that moment; input injected before that is (rightly) never read as stream
        entries, so tests that inject stream entries wait for this first.
        """

        def ready() -> bool:
            return all(
                set(n.proxies) <= set(n.saved_cursors())
                for n in self.nodes.values()
                if n.engine is not None
            )

        await async_wait_until(
            ready,
            timeout=timeout,
            interval=0.05,
            message="every engine bootstrapped from every peer",
        )

    # ------------------------------------------------------------------ servers

    def kill_redis(self, node_id: str) -> None:
        """SIGKILL the node's Redis (acknowledged writes are on disk: appendfsync always)."""
        self.nodes[node_id].server.kill()

    async def restart_redis(self, node_id: str) -> None:
        """Start the node's Redis again on its port and data, and wait until the store answers."""
        node = self.nodes[node_id]
        await asyncio.to_thread(node.server.restart)
        # Pooled connections to the dead process would each fail once before reconnecting.
        await node.store.redis.connection_pool.disconnect()
        await async_wait_until(
            node.store.redis.ping,
            timeout=RESTART_DEADLINE_S,
            interval=0.05,
            ignore=(RedisConnectionError, RedisTimeoutError, OSError),
            message=f"{node_id}'s Redis answering after restart",
        )

    async def backup_redis(self, node_id: str, to: Path) -> None:
        """Copy the node's Redis data files (its AOF, and RDB if any) to ``to``, as an operator's
        backup would: the server is paused meanwhile, so the copy is of one moment."""
        server = self.nodes[node_id].server
        data_dir = _data_dir(server)
        server.pause()
        try:
            await asyncio.to_thread(_copy_data_files, data_dir, to)
        finally:
            server.resume()

    async def restore_redis(self, node_id: str, backup: Path) -> None:
        """Stop the node's Redis, replace its data files with ``backup``'s, start it again."""
        node = self.nodes[node_id]
        data_dir = _data_dir(node.server)
        node.server.kill()
        await asyncio.to_thread(_remove_data_files, data_dir)
        await asyncio.to_thread(_copy_data_files, backup, data_dir)
        await self.restart_redis(node_id)

    async def wipe_redis(self, node_id: str) -> None:
        """Restart the node's Redis with no data at all (a restart without persistence)."""
        node = self.nodes[node_id]
        data_dir = _data_dir(node.server)
        node.server.kill()
        await asyncio.to_thread(_remove_data_files, data_dir)
        await self.restart_redis(node_id)

    def pause_redis(self, node_id: str) -> None:
        self.nodes[node_id].server.pause()

    def resume_redis(self, node_id: str) -> None:
        self.nodes[node_id].server.resume()

    # ------------------------------------------------------------------ network

    def _links(self, a: str, b: str) -> list[TcpProxy]:
        return [
            p for p in (self.nodes[a].proxies.get(b), self.nodes[b].proxies.get(a)) if p is not None
        ]

    def partition(self, a: str, b: str, *, how: str = "cut") -> None:
        """Break the links between ``a`` and ``b`` both ways: ``cut`` (resets) or ``blackhole``."""
        for proxy in self._links(a, b):
            if how == "cut":
                proxy.cut()
            elif how == "blackhole":
                proxy.blackhole()
            else:
                raise ValueError(f"how={how!r}: expected 'cut' or 'blackhole'")

    def partition_one_way(self, reader: str, source: str, *, how: str = "cut") -> None:
        """Break only ``reader``'s link to ``source``: ``source`` still reads ``reader``."""
        proxy = self.nodes[reader].proxies[source]
        if how == "cut":
            proxy.cut()
        elif how == "blackhole":
            proxy.blackhole()
        else:
            raise ValueError(f"how={how!r}: expected 'cut' or 'blackhole'")

    def heal_one_way(self, reader: str, source: str) -> None:
        self.nodes[reader].proxies[source].heal()

    def heal(self, a: str, b: str) -> None:
        for proxy in self._links(a, b):
            proxy.heal()

    def heal_all(self) -> None:
        for node in self.nodes.values():
            for proxy in node.proxies.values():
                proxy.heal()

    # ------------------------------------------------------------------ streams

    async def trim(self, node_id: str, keep: int) -> StreamId | None:
        """XTRIM the node's CDC stream to its newest ``keep`` entries; returns the first id left."""
        store = self.nodes[node_id].store
        await store.redis.xtrim(store.keys.cdc, maxlen=keep, approximate=False)
        first = cast(list[tuple[bytes, Any]], await store.redis.xrange(store.keys.cdc, count=1))
        return codec.parse_stream_id(first[0][0]) if first else None

    async def append_corrupt(
        self, node_id: str, entries: Iterable[Mapping[str, bytes]]
    ) -> list[StreamId]:
        """XADD raw entries to the node's CDC stream, bypassing its store (corrupt input)."""
        store = self.nodes[node_id].store
        ids = []
        for fields in entries:
            raw = await store.redis.xadd(store.keys.cdc, dict(fields))  # type: ignore[arg-type]
            ids.append(codec.parse_stream_id(cast(bytes, raw)))
        return ids

    # ------------------------------------------------------------------ state

    async def roots(self) -> dict[str, str]:
        return {n.node_id: (await n.store.merkle_root()).hex() for n in self.live}

    async def states(self) -> dict[str, dict[str, Version]]:
        """Every live node's versions, tombstones included."""
        return {node.node_id: await state_of(node) for node in self.live}

    async def converged(self) -> bool:
        """Same Merkle root everywhere, and the same versions (tombstones included)."""
        if len(set((await self.roots()).values())) != 1:
            return False
        states = await self.states()
        first, *rest = states.values()
        if any(s != first for s in rest):
            return False
        self.converged_states = states
        return True

    async def tailers_at_tails(self) -> bool:
        """Every running tailer has read its peer's stream up to the current tail."""
        tails: dict[str, StreamId] = {}
        for node in self.live:
            tail = await node.store.stream_tail()
            if tail is not None:
                tails[node.node_id] = codec.parse_stream_id(tail)
        for node in self.live:
            if node.engine is None:
                continue
            for peer_id, tailer in node.engine.tailers.items():
                if peer_id in self.forgotten:
                    continue
                tail_id = tails.get(peer_id)
                if tail_id is not None and (tailer.cursor is None or tailer.cursor < tail_id):
                    return False
        return True

    async def wait_tailers_at_tails(self, timeout: float) -> bool:
        """Wait until :meth:`tailers_at_tails`; False if the deadline passed first.

        Equal data does not mean every stream was read: entries that change nothing (corrupt
        ones, duplicates) can still wait behind a breaker that has not reset yet.
        """
        try:
            await self._wait(self.tailers_at_tails, timeout)
        except AssertionError:
            return False
        return True

    async def tombstones(self) -> dict[str, int]:
        """Tombstones each node still holds (collected once every member holds them)."""
        return {node.node_id: await node.store.tombstone_count() for node in self.live}

    async def settled(self) -> bool:
        """Converged, with every tombstone collected everywhere: with writes stopped and
        every member up, collection reaches every delete (docs/DELETES.md)."""
        return not any((await self.tombstones()).values()) and await self.converged()

    async def wait_settled(self, timeout: float) -> float:
        """Wait until :meth:`settled`; returns the seconds it took."""
        started = time.monotonic()
        try:
            await self._wait(self.settled, timeout)
        except AssertionError as exc:
            held = await self.tombstones()
            raise AssertionError(
                f"tombstones not all collected within {timeout}s: {held}; roots "
                f"{await self.roots()}"
            ) from exc
        return time.monotonic() - started

    async def wait_converged(self, timeout: float) -> float:
        """Wait until :meth:`converged`; returns the seconds it took."""
        started = time.monotonic()
        try:
            await self._wait(self.converged, timeout)
        except AssertionError as exc:
            roots = await self.roots()
            raise AssertionError(f"mesh did not converge within {timeout}s; roots {roots}") from exc
        return time.monotonic() - started

    async def _wait(self, condition: Callable[[], Awaitable[bool]], timeout: float) -> None:
        # Servers restarted by the last faults may still refuse a connection or two.
        await async_wait_until(
            condition,
            timeout=timeout,
            interval=0.1,
            ignore=(RedisConnectionError, RedisTimeoutError),
        )

    # ------------------------------------------------------------------ teardown

    async def aclose(self) -> list[BaseException]:
        """Resume, heal, shut every engine down, close stores, stop proxies; returns errors."""
        errors: list[BaseException] = []
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                if node.server.is_running():
                    node.server.resume()
        for node in self.nodes.values():
            node.engine = None
            for engine in node.engines:
                if engine.state == "stopped":
                    continue
                try:
                    async with asyncio.timeout(SHUTDOWN_BOUND_S + 5):
                        await engine.shutdown(SHUTDOWN_BOUND_S)
                except Exception as exc:
                    errors.append(exc)
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                await node.store.close()
            for proxy in node.proxies.values():
                try:
                    await proxy.stop()
                except Exception as exc:
                    errors.append(exc)
        return errors


def _node_config(
    node_id: str,
    url: str,
    proxies: Mapping[str, TcpProxy],
    workdir: Path,
    settings: Mapping[str, Any] | None,
    peer_options: Mapping[str, Any] | None,
) -> dict[str, Any]:
    peer_entry = {**CHAOS_PEER_OPTIONS, **(peer_options or {})}
    return {
        "local_node_id": node_id,
        "local": {"redis_url": url, "prefix": PREFIX},
        "settings": _deep_merge(copy.deepcopy(CHAOS_SETTINGS), settings or {}),
        "peers": [
            {"node_id": peer_id, "redis_url": proxy.url_for(), **copy.deepcopy(peer_entry)}
            for peer_id, proxy in proxies.items()
        ],
        "cursor": {
            "sqlite_path": str(workdir / f"cursors-{node_id}.db"),
            "quarantine_max_rows": 100_000,
        },
        "http": {"enabled": False},
    }


# ------------------------------------------------------------------------------------ workload


class Workload:
    """Concurrent puts and deletes of overlapping keys on every node, each one recorded.

    ``writers_per_node`` tasks per node each write about ``rate_per_node / writers_per_node``
    times a second, picking one of ``keys`` shared keys (deletes with ``delete_ratio``).
    Values are unique (node, sequence number), so a final value names the write it came from.
    """

    def __init__(
        self,
        mesh: ChaosMesh,
        seed: int,
        *,
        keys: int = 40,
        rate_per_node: float = 25.0,
        delete_ratio: float = 0.2,
        writers_per_node: int = 2,
    ) -> None:
        self.mesh = mesh
        self.seed = seed
        self.keys = [f"k:{i}" for i in range(keys)]
        self.rate_per_node = rate_per_node
        self.delete_ratio = delete_ratio
        self.writers_per_node = writers_per_node
        self.writes: list[Write] = []
        self.unacknowledged: list[Unacknowledged] = []
        self._seq = itertools.count()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._node_stop: dict[str, asyncio.Event] = {}
        self._node_tasks: dict[str, list[asyncio.Task[None]]] = {}
        self.idle: set[str] = set()  # nodes nobody writes to (not joined yet, or forgotten)

    async def write(self, node_id: str, key: str, value: bytes | None) -> Write | None:
        """One put (or delete, with ``value`` None), recorded as acknowledged or not."""
        store = self.mesh[node_id].store
        try:
            if value is None:
                hlc = await store.delete(key)
            else:
                hlc = await store.put(key, value)
        except Exception as exc:
            self.unacknowledged.append(
                Unacknowledged(node_id, key, value, f"{type(exc).__name__}: {exc}"[:200])
            )
            return None
        write = Write(node_id, key, value, hlc)
        self.writes.append(write)
        return write

    def value(self, node_id: str, rng: random.Random) -> bytes:
        # Sometimes long enough (>= 64 bytes) to travel zstd-compressed.
        return f"{node_id}:{next(self._seq)}".encode() * rng.choice((1, 1, 2, 12))

    async def _writer(self, node_id: str, rng: random.Random) -> None:
        mean_gap_s = self.writers_per_node / self.rate_per_node
        mine = self._node_stop[node_id]
        while not self._stop.is_set() and not mine.is_set():
            key = rng.choice(self.keys)
            value = None if rng.random() < self.delete_ratio else self.value(node_id, rng)
            await self.write(node_id, key, value)
            # Pacing of the offered load (not synchronisation): exponential think time.
            await asyncio.sleep(rng.expovariate(1 / mean_gap_s))

    def start(self) -> None:
        self._stop.clear()
        for node_id in self.mesh.ids:
            if node_id not in self.idle:
                self.start_node(node_id)

    def start_node(self, node_id: str) -> None:
        """Writers for one node (a node that joins late)."""
        self.idle.discard(node_id)
        self._node_stop[node_id] = asyncio.Event()
        index = self.mesh.ids.index(node_id)
        for writer in range(self.writers_per_node):
            rng = random.Random(f"{self.seed}/{index}/{writer}")
            task = asyncio.create_task(
                self._writer(node_id, rng), name=f"chaos.writer[{node_id}/{writer}]"
            )
            self._tasks.append(task)
            self._node_tasks.setdefault(node_id, []).append(task)

    async def stop_node(self, node_id: str) -> None:
        """No more writes to one node (a node about to be forgotten)."""
        self.idle.add(node_id)
        if node_id in self._node_stop:
            self._node_stop[node_id].set()
        tasks = self._node_tasks.pop(node_id, [])
        if tasks:
            await asyncio.gather(*tasks)

    async def stop(self) -> None:
        self._stop.set()
        tasks, self._tasks = self._tasks, []
        self._node_tasks.clear()
        if tasks:
            await asyncio.gather(*tasks)

    async def burst(self, node_id: str, count: int, rng: random.Random) -> int:
        """``count`` puts on one node now; returns how many were acknowledged."""
        done = 0
        for _ in range(count):
            if await self.write(node_id, rng.choice(self.keys), self.value(node_id, rng)):
                done += 1
        return done


# ------------------------------------------------------------------------------------ faults


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
        for peer_id in node.proxies:
            saved = cast(Callable[[], StreamId], functools.partial(node.saved_cursor, peer_id))
            cursor: StreamId = await async_wait_until(
                saved,
                timeout=BOOTSTRAP_DEADLINE_S,
                interval=0.05,
                message=f"{fault.node} resumed reading {peer_id}",
            )
            self.excused[fault.node][peer_id] = cursor
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

        async def holdings(node: ChaosNode) -> tuple[dict[str, Version], int]:
            record = await node.store.record()
            return await state_of(node), record.collected if record is not None else 0

        others: list[tuple[dict[str, Version], int]] = []
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
            for state, horizon in others:
                version = state.get(write.key)
                if version is None:
                    held = horizon >= write.hlc
                else:
                    held = _order(version) >= write.order
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
        fault.outcome["membership"] = engine.status()["membership"]["state"]
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
    make_server: ServerFactory,
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
) -> ChaosReport:
    """One seeded run: mesh up, workload and faults for ``duration_s``, quiesce, judge.

    ``config`` is deep-merged into every node's engine configuration (e.g.
    ``{"local": {"stream_maxlen": 50}}`` for streams that trim themselves under load).

    With ``membership`` (and at least 3 nodes) one more node, configured in every peer list
    from the start, joins with ``start_from: latest`` at the start of the fault phase (until
    then it holds collection back, as a configured member that has not started does), and
    after the last fault one node other than it is gone for good and forgotten.

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
    report = ChaosReport(seed=seed, nodes=nodes, fault_phase_s=duration_s, faults=faults)
    say = progress or (lambda _message: None)
    everyone = [*node_ids, joiner] if joiner is not None else node_ids
    mesh = await ChaosMesh.open(
        everyone, workdir, make_server, config=config, start_engines=joiner is None
    )
    if joiner is not None:
        try:
            for node_id in node_ids:
                await mesh.start_engine(node_id)
            await mesh.wait_bootstrapped()
        except BaseException:
            await mesh.aclose()
            raise
    workload = Workload(mesh, seed, keys=keys, rate_per_node=rate_per_node)
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


async def state_of(node: ChaosNode) -> dict[str, Version]:
    """One node's versions, tombstones included."""
    state: dict[str, Version] = {}
    async for change in node.store.versions():
        state[change.key] = (None if change.tombstone else change.value, change.hlc, change.origin)
    return state


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
        for p in n.proxies
    )
    report.cancel_retries = mesh.cancel_retries
    report.injected_corrupt = sum(len(ids) for ids in runner.injected.values())
    # Corrupt entries trimmed away (by a trim fault, or by MAXLEN under load) before a node
    # read them cannot be asked of it.
    gone: dict[str, set[StreamId]] = {}
    oldest_of: dict[str, StreamId | None] = {}
    for peer in mesh.live:
        first = cast(
            list[tuple[bytes, Any]], await peer.store.redis.xrange(peer.store.keys.cdc, count=1)
        )
        oldest = codec.parse_stream_id(first[0][0]) if first else None
        oldest_of[peer.node_id] = oldest
        gone[peer.node_id] = runner.trimmed_injected[peer.node_id] | {
            sid for sid in runner.injected[peer.node_id] if oldest is None or sid < oldest
        }
    for node in mesh.live:
        rows = node.quarantined()
        report.quarantined_rows += len(rows)
        report.quarantined_metric += node.metric_total("replication_cdc_events_quarantined_total")
        for peer_id in node.proxies:
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
