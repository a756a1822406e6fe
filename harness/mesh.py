"""A mesh of real ``redis-server`` nodes, the writes made to it, and the one LWW oracle.

Each node is one Redis (started by a factory such as the ``redis_factory`` fixture), one
:class:`RedisStore` the test writes through, and optionally one :class:`ReplicationEngine`
sharing that store. The topology is a mapping ``node -> peers it tails``; a node listed with no
peers (or left out of ``engines``) is a plain store that others read from. The chaos harness
(:mod:`harness.chaos`) builds on the same nodes and mesh, with a proxy on every link.

What every node must end with is judged by one rule, the package's: :func:`version_order` is
``knowledge.order``, the total order the store's scripts apply, so no test keeps a second copy
of last-writer-wins that could drift from the one the engine runs.

:func:`open_mesh` suits fast, deterministic tests: cold path off, ``start_from: beginning``, a
short XREAD block (so shutdown and idle detection are quick), HTTP off, cursor databases under
``tmp_path``. Anything can be overridden per node (``overrides``), for every node (``common``),
per peer entry (``peer_options``) and per server (``redis_options``).

Usage::

    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": ["a"]}) as mesh:
        log = WriteLog()
        await log.put(mesh["a"], "k", b"v")
        await mesh.wait_converged()
        assert await snapshot(mesh["b"].store) == expected_snapshot(log.writes)

Teardown (engines shut down, stores closed) runs however the block exits; the servers
themselves are killed by the factory that started them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import sqlite3
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from replication_engine import codec, knowledge
from replication_engine.clock import HLC
from replication_engine.codec import Change, StreamId
from replication_engine.cold_path.claims import ABSENT_REASON
from replication_engine.config import EngineConfig
from replication_engine.connection import _CancelSafeSend
from replication_engine.engine import ReplicationEngine
from replication_engine.hot_path import Tailer
from replication_engine.merkle import Geometry
from replication_engine.store.partitioned import PartitionedStore
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import (
    RedisFactory,
    RedisHandle,
    RedisProcess,
    async_wait_until,
    find_redis_server,
    redis_server_version,
)
from replication_engine.testing.cluster import Cluster

__all__ = [
    "CONVERGE_TIMEOUT_S",
    "DEFAULT_PREFIX",
    "EXACT_STREAM_FACTS",
    "Mesh",
    "MeshNode",
    "Order",
    "RawEntry",
    "Unacknowledged",
    "Version",
    "Write",
    "WriteLog",
    "append_raw",
    "build_config",
    "change_order",
    "closing",
    "connect_store",
    "cpu_seconds_over",
    "deep_merge",
    "expected_snapshot",
    "full_mesh",
    "lww_winner",
    "metric",
    "open_mesh",
    "raw_entries",
    "read_stream",
    "redis_processes",
    "snapshot",
    "stream_version",
    "version_order",
    "xread_calls",
]

# Key prefix of every node's store: non-empty so prefix handling is always exercised (and the
# ACL in deploy/redis/users.acl grants ~app:*).
DEFAULT_PREFIX = "app:"
# XREAD BLOCK of test tailers: short, so an idle tailer re-reads (and stops) quickly.
DEFAULT_BLOCK_TIMEOUT_S = 0.2
# Deadline for a mesh to converge; generous for a loaded 2-core CI machine.
CONVERGE_TIMEOUT_S = 30.0
# Deadline for a node's Redis to answer after a restart.
RESTART_DEADLINE_S = 30.0
# Bound on one engine's shutdown during teardown, over the engine's own bound (at most 15 s
# here), so a hung engine cannot hang the suite.
TEARDOWN_SHUTDOWN_S = 20.0

# Redis 7 added the stream facts that make gap detection exact (XINFO STREAM entries-added and
# max-deleted-entry-id). On 6.2 a tailer starting from the beginning reports one gap at its
# first non-empty read, and an XDEL ahead of a cursor goes unseen (README, Known limitations).
EXACT_STREAM_FACTS = redis_server_version(find_redis_server()) >= (7, 0, 0)

# One CDC stream entry as Redis returns it: (id, fields).
RawEntry = tuple[bytes, dict[bytes, bytes]]
# (value, or None for a tombstone; hlc; origin): one key's version on a node.
Version = tuple[bytes | None, int, str]
# The last-writer-wins key of a version (knowledge.order): the greater one wins.
Order = tuple[int, bytes, int, str]


# ------------------------------------------------------------------------------------ writes


def version_order(version: Version) -> Order:
    """Where a version stands in the package's total order (``knowledge.order``).

    A tombstone's content hash is empty, as the store writes it; a value's is
    ``codec.content_hash``, as ``RedisStore.put`` computes it.
    """
    value, hlc, origin = version
    content_hash = "" if value is None else codec.content_hash(value)
    return knowledge.order(hlc, origin, value is None, content_hash)


def change_order(change: Change) -> Order:
    """Where a stored or streamed version stands in the package's total order."""
    return knowledge.order(change.hlc, change.origin, change.tombstone, change.content_hash)


@dataclass(frozen=True, slots=True)
class Write:
    """One acknowledged local write; ``value`` None is a delete."""

    node: str
    key: str
    value: bytes | None
    hlc: int

    @property
    def version(self) -> Version:
        return (self.value, self.hlc, self.node)

    @property
    def order(self) -> Order:
        return version_order(self.version)


@dataclass(frozen=True, slots=True)
class Unacknowledged:
    """A write that raised: it may have happened (the reply was lost) or not."""

    node: str
    key: str
    value: bytes | None
    error: str


@dataclass
class WriteLog:
    """Writes through a node's store, remembering each acknowledged one with its HLC."""

    writes: list[Write] = field(default_factory=list)

    async def put(self, node: MeshNode, key: str, value: bytes) -> Write:
        hlc = await node.store.put(key, value)
        return self._record(Write(node.node_id, key, value, hlc))

    async def delete(self, node: MeshNode, key: str) -> Write:
        hlc = await node.store.delete(key)
        return self._record(Write(node.node_id, key, None, hlc))

    def _record(self, write: Write) -> Write:
        self.writes.append(write)
        return write

    def by_node(self, node_id: str) -> list[Write]:
        return [w for w in self.writes if w.node == node_id]

    def not_by(self, node_id: str) -> list[Write]:
        return [w for w in self.writes if w.node != node_id]


def lww_winner(writes: Iterable[Write]) -> dict[str, Write]:
    """Per key, the write greatest in :func:`version_order`: what every node must end with."""
    winners: dict[str, Write] = {}
    for write in writes:
        held = winners.get(write.key)
        if held is None or write.order > held.order:
            winners[write.key] = write
    return winners


def expected_snapshot(
    writes: Iterable[Write], *, include_tombstones: bool = False
) -> dict[str, Version]:
    """What :func:`snapshot` must return once every write has replicated."""
    return {
        key: w.version
        for key, w in lww_winner(writes).items()
        if include_tombstones or w.value is not None
    }


# ------------------------------------------------------------------------------------ reads


async def snapshot(store: RedisStore, *, include_tombstones: bool = False) -> dict[str, Version]:
    """``key -> (value, hlc, origin)`` of a store; tombstones (value None) only if asked."""
    out: dict[str, Version] = {}
    if include_tombstones:
        async for change in store.versions():
            out[change.key] = stream_version(change)
    else:
        async for item in store.items():
            out[item.key] = (item.value, item.hlc, item.origin)
    return out


async def agreed_states(stores: Sequence[RedisStore]) -> dict[str, dict[str, Version]] | None:
    """Every store's versions (tombstones included) when all the stores hold the same Merkle
    root and the same versions; None while they differ."""
    if len({await s.merkle_root() for s in stores}) != 1:
        return None
    states = {s.node_id: await snapshot(s, include_tombstones=True) for s in stores}
    first, *rest = states.values()
    return states if all(state == first for state in rest) else None


async def raw_entries(store: RedisStore, start: str = "-", count: int = 1000) -> list[RawEntry]:
    """Up to ``count`` raw entries of a store's CDC stream from ``start`` (XRANGE syntax)."""
    entries = await store.redis.xrange(store.keys.cdc, min=start, max="+", count=count)
    return cast(list[RawEntry], entries)


async def append_raw(store: RedisStore, fields: Mapping[str, bytes]) -> StreamId:
    """XADD ``fields`` to a store's CDC stream directly, bypassing the store (corrupt input)."""
    raw_id = await store.redis.xadd(store.keys.cdc, cast(Any, dict(fields)))
    return codec.parse_stream_id(cast(bytes, raw_id))


async def read_stream(store: RedisStore) -> list[tuple[StreamId, Change]]:
    """A store's whole CDC stream, decoded (raises CodecError on an entry it cannot decode)."""
    out: list[tuple[StreamId, Change]] = []
    start = "-"
    while entries := await raw_entries(store, start):
        for raw_id, fields in entries:
            sid = codec.parse_stream_id(raw_id)
            out.append((sid, codec.decode_entry(sid, fields, default_origin=store.node_id)))
        start = f"({out[-1][0]}"
    return out


def partitions_of(store: Any) -> dict[str, RedisStore]:
    """A node's store partition by partition (a store of one partition is its own)."""
    if isinstance(store, PartitionedStore):
        return dict(store.partitions)
    return {"0": store}


def lane_of(name: str) -> tuple[str, str]:
    """``(peer, partition)`` of a tailer's name in ``engine.tailers`` (``b`` or ``b{3}``)."""
    peer, _, rest = name.partition("{")
    return peer, rest.rstrip("}") or "0"


async def tombstone_count(store: Any) -> int:
    return sum([await part.tombstone_count() for part in partitions_of(store).values()])


def stream_version(change: Change) -> Version:
    return (None if change.tombstone else change.value, change.hlc, change.origin)


async def xread_calls(store: RedisStore) -> int:
    """How many XREAD commands the store's Redis has served (INFO commandstats)."""
    stats = await store.redis.info("commandstats")
    entry = stats.get("cmdstat_xread")
    return int(entry["calls"]) if isinstance(entry, dict) else 0


def count_sends(monkeypatch: Any) -> list[int]:
    """From now on (for the test), the id of the connection of every command or pipeline
    written to a socket: how many round trips a call cost, and to which connections."""
    sends: list[int] = []
    original = _CancelSafeSend.send_packed_command

    async def counted(self: Any, command: Any, check_health: bool = True) -> None:
        sends.append(id(self))
        await original(self, command, check_health)

    monkeypatch.setattr(_CancelSafeSend, "send_packed_command", counted)
    return sends


def metric(engine: ReplicationEngine, name: str, **labels: str) -> float:
    """One sample of an engine's Prometheus registry (0 when the series does not exist yet)."""
    value = engine.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ------------------------------------------------------------------------------------ nodes


def full_mesh(node_ids: Sequence[str]) -> dict[str, list[str]]:
    """Every node tails every other node."""
    return {n: [p for p in node_ids if p != n] for n in node_ids}


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` merged into ``base`` (in place, and returned): nested mappings key by key."""
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


async def connect_store(config: EngineConfig, *, hlc: HLC | None = None) -> RedisStore:
    """The node's store, opened as the engine opens one it owns from the same config, so a
    test's store and a sidecar's agree on geometry, limits and clock checks. A node of many
    partitions gets a ``PartitionedStore``, which reads and writes as one store does."""
    options: dict[str, Any] = {
        "node_id": config.local_node_id,
        "prefix": config.local.prefix,
        "fanout": config.settings.merkle.fanout,
        "depth": config.settings.merkle.depth,
        "stream_maxlen": config.local.stream_maxlen,
        "max_memory_ratio": config.local.max_memory_ratio,
        "max_clock_offset_sec": config.local.max_clock_offset_sec,
        "hlc": hlc,
        "cluster": config.local.cluster,
    }
    partitions = config.settings.merkle.partitions
    if partitions > 1:
        split = await PartitionedStore.connect(
            config.local.redis_url, partitions=partitions, **options
        )
        return cast(RedisStore, split)
    return await RedisStore.connect(config.local.redis_url, **options)


@dataclass(eq=False)
class MeshNode:
    """One node: its server, its store (shared by successive engines) and its current engine."""

    node_id: str
    server: RedisHandle
    store: RedisStore
    config: EngineConfig
    engine: ReplicationEngine | None = None
    # Every engine started for this node, oldest first (stats of earlier lives stay readable).
    engines: list[ReplicationEngine] = field(default_factory=list)

    @property
    def peer_ids(self) -> list[str]:
        return [p.node_id for p in self.config.peers]

    def lanes(self, peer_id: str) -> list[str]:
        """The names this node reads ``peer_id`` under: its id, or one per partition
        (``b{3}``) on a node of many: its tailers' keys and its cursors' names."""
        merkle = self.config.settings.merkle
        if merkle.partitions == 1:
            return [peer_id]
        names = Geometry(merkle.fanout, merkle.depth, merkle.partitions).partition_names
        return [f"{peer_id}{{{name}}}" for name in names]

    @property
    def cursor_path(self) -> Path:
        return Path(self.config.cursor.sqlite_path)

    def running(self) -> ReplicationEngine:
        if self.engine is None:
            raise AssertionError(f"node {self.node_id} has no running engine")
        return self.engine

    def tailer(self, peer_id: str) -> Tailer:
        tailer = self.running().tailers.get(peer_id)
        if tailer is None:
            raise AssertionError(f"node {self.node_id} has no tailer for {peer_id} yet")
        return tailer

    def stat(self, peer_id: str, name: str) -> int:
        """One statistic of the current tailer of ``peer_id`` (0 before it exists)."""
        tailer = self.running().tailers.get(peer_id)
        return 0 if tailer is None else int(getattr(tailer.stats, name))

    def peer_status(self, peer_id: str) -> dict[str, Any]:
        peer: dict[str, Any] = self.running().status()["peers"][peer_id]
        return peer

    def total(self, stat: str) -> int:
        """A tailer statistic summed over this node's current tailers (e.g. ``"applied"``)."""
        return sum(getattr(t.stats, stat) for t in self.running().tailers.values())

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

    def membership(self) -> dict[str, Any]:
        """The running engine's membership status (docs/DELETES.md)."""
        status = self.running().status()["membership"]
        assert status is not None
        return cast(dict[str, Any], status)

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

    def quarantined(self) -> list[tuple[str, str, str]]:
        """(peer, stream id, reason) of every quarantine row kept on disk."""
        if not self.cursor_path.exists():
            return []
        with contextlib.closing(sqlite3.connect(self.cursor_path)) as db:
            rows = db.execute("SELECT peer_id, stream_id, reason FROM quarantine").fetchall()
        return [(str(p), str(s), str(r)) for p, s, r in rows]

    def dropped_by_absence(self) -> list[tuple[str, int, str]]:
        """(key, hlc, origin) of every value this node dropped by absence (docs/DELETES.md,
        "Absence by knowledge") whose quarantine row is still on disk: a lost cursor
        database, or the quarantine's bound, takes rows with it."""
        if not self.cursor_path.exists():
            return []
        with contextlib.closing(sqlite3.connect(self.cursor_path)) as db:
            rows = db.execute(
                "SELECT key, raw FROM quarantine WHERE reason LIKE ?", (f"{ABSENT_REASON}:%",)
            ).fetchall()
        dropped = []
        for key, raw in rows:
            meta = json.loads(json.loads(raw)["meta"])
            dropped.append((str(key), int(meta["hlc"], 16), str(meta["origin"])))
        return dropped


# ------------------------------------------------------------------------------------ mesh

NodeT = TypeVar("NodeT", bound=MeshNode)
MeshT = TypeVar("MeshT", bound="Mesh[Any]")


class Mesh(Generic[NodeT]):
    """The nodes of one test: engine lifecycle, server restarts, convergence and idle waits.

    Build it with :func:`open_mesh` (or :meth:`harness.chaos.ChaosMesh.open`).
    """

    # Bound on a graceful engine shutdown; None leaves the engine's own (drain time + 5 s).
    shutdown_timeout_s: float | None = None

    def __init__(self, topology: Mapping[str, Sequence[str]], nodes: dict[str, NodeT]) -> None:
        self.topology = {n: list(p) for n, p in topology.items()}
        self.nodes = nodes
        self.forgotten: set[str] = set()  # nodes removed for good: out of every check
        # The states that the last successful :meth:`converged` check compared: judged as they
        # were, since a tombstone collected a moment later would make a re-read differ.
        self.converged_states: dict[str, dict[str, Version]] = {}

    @property
    def geometry(self) -> Geometry:
        """The mesh's store layout (every node uses the same)."""
        merkle = next(iter(self.nodes.values())).config.settings.merkle
        return Geometry(merkle.fanout, merkle.depth, merkle.partitions)

    def __getitem__(self, node_id: str) -> NodeT:
        return self.nodes[node_id]

    def __iter__(self) -> Iterator[NodeT]:
        return iter(self.nodes.values())

    @property
    def ids(self) -> list[str]:
        return list(self.nodes)

    @property
    def live(self) -> list[NodeT]:
        """Nodes not forgotten: what convergence and every final check are about."""
        return [n for n in self.nodes.values() if n.node_id not in self.forgotten]

    @property
    def stores(self) -> list[RedisStore]:
        return [n.store for n in self.nodes.values()]

    # ------------------------------------------------------------------ engines

    async def start_engine(self, node_id: str) -> ReplicationEngine:
        """A new engine on the node's store and cursor database, started."""
        node = self.nodes[node_id]
        if node.engine is not None:
            raise AssertionError(f"node {node_id} already has a running engine")
        engine = ReplicationEngine(node.config, store=node.store)
        node.engines.append(engine)
        await engine.start()
        node.engine = engine
        return engine

    async def stop_engine(self, node_id: str, timeout: float | None = None) -> ReplicationEngine:
        """Graceful shutdown (drains, saves cursors), bounded; returns the engine, for its
        final stats."""
        node = self.nodes[node_id]
        engine = node.running()
        node.engine = None
        await engine.shutdown(self.shutdown_timeout_s if timeout is None else timeout)
        return engine

    async def restart_engine(self, node_id: str) -> ReplicationEngine:
        await self.stop_engine(node_id)
        return await self.start_engine(node_id)

    def running_nodes(self) -> list[NodeT]:
        """Nodes with a running engine."""
        return [n for n in self.nodes.values() if n.engine is not None]

    # ------------------------------------------------------------------ servers

    def kill_redis(self, node_id: str) -> None:
        """SIGKILL the node's Redis (with ``appendfsync always``, acknowledged writes are on
        disk)."""
        self.nodes[node_id].server.kill()

    async def restart_redis(self, node_id: str) -> None:
        """Start the node's (killed or stopped) Redis again on its port and data, and wait
        until its store answers.

        The store's pooled connections to the old process are dropped first: each would
        otherwise fail once ("connection closed by server") before reconnecting.
        """
        node = self.nodes[node_id]
        await asyncio.to_thread(node.server.restart)
        pool = getattr(node.store.redis, "connection_pool", None)  # a cluster client has none
        if pool is not None:
            await pool.disconnect()
        await async_wait_until(
            node.store.redis.ping,
            timeout=RESTART_DEADLINE_S,
            interval=0.05,
            ignore=(RedisConnectionError, RedisTimeoutError, OSError),
            message=f"{node_id}'s Redis answering after restart",
        )

    def pause_redis(self, node_id: str) -> None:
        self.nodes[node_id].server.pause()

    def resume_redis(self, node_id: str) -> None:
        self.nodes[node_id].server.resume()

    # ------------------------------------------------------------------ convergence

    def _chosen(self, node_ids: Sequence[str] | None) -> list[NodeT]:
        return self.live if node_ids is None else [self.nodes[n] for n in node_ids]

    async def roots(self, node_ids: Sequence[str] | None = None) -> dict[str, str]:
        return {n.node_id: (await n.store.merkle_root()).hex() for n in self._chosen(node_ids)}

    async def states(self, node_ids: Sequence[str] | None = None) -> dict[str, dict[str, Version]]:
        """Each node's versions, tombstones included (default: every live node)."""
        return {
            n.node_id: await snapshot(n.store, include_tombstones=True)
            for n in self._chosen(node_ids)
        }

    async def converged(self, node_ids: Sequence[str] | None = None) -> bool:
        """Same Merkle root everywhere, and the same versions (tombstones included)."""
        states = await agreed_states([n.store for n in self._chosen(node_ids)])
        if states is None:
            return False
        self.converged_states = states
        return True

    async def wait_converged(
        self, timeout: float = CONVERGE_TIMEOUT_S, *, nodes: Sequence[str] | None = None
    ) -> float:
        """Wait until :meth:`converged`; returns the seconds it took. The failure names each
        node's root and version count."""
        started = time.monotonic()
        try:
            await self.wait_for(lambda: self.converged(nodes), timeout)
        except AssertionError as exc:
            described = []
            for node in self._chosen(nodes):
                try:
                    versions = await snapshot(node.store, include_tombstones=True)
                    root = (await node.store.merkle_root()).hex()[:16]
                    described.append(f"{node.node_id}: root={root} versions={len(versions)}")
                except Exception as error:
                    described.append(f"{node.node_id}: unreadable ({type(error).__name__})")
            raise AssertionError(
                f"mesh did not converge within {timeout}s: {'; '.join(described)}"
            ) from exc
        return time.monotonic() - started

    async def wait_for(self, condition: Callable[[], Awaitable[bool]], timeout: float) -> None:
        """Wait until ``condition``; a server restarted a moment ago may still refuse a
        connection or two, which counts as "not yet"."""
        await async_wait_until(
            condition,
            timeout=timeout,
            interval=0.05,
            ignore=(RedisConnectionError, RedisTimeoutError),
        )

    # ------------------------------------------------------------------ idle

    async def _tails(self) -> dict[tuple[str, str], StreamId | None]:
        """The tail of every stream: (node, partition) -> its last entry's id."""
        tails: dict[tuple[str, str], StreamId | None] = {}
        for node in self.live:
            for name, part in partitions_of(node.store).items():
                tail = await part.stream_tail()
                tails[node.node_id, name] = None if tail is None else codec.parse_stream_id(tail)
        return tails

    async def idle(self) -> bool:
        """Every running tailer is at its peer's stream tail, and no stream grew meanwhile.

        Reading the tails before and after checking the cursors closes the race where one node
        finishes an apply (growing its own stream) between the checks of two tailers. A store
        of many partitions has a stream, and each peer a tailer, per partition.
        """
        before = await self._tails()
        for node in self.running_nodes():
            engine = node.running()
            lanes = {lane_of(name): tailer for name, tailer in engine.tailers.items()}
            parts = partitions_of(node.store)
            if set(lanes) != {(peer, part) for peer in node.peer_ids for part in parts}:
                return False
            for lane, tailer in lanes.items():
                tail = before[lane]
                if tailer.mode != "tailing" or tailer.lag_events != 0:
                    return False
                if tail is not None and (tailer.cursor is None or tailer.cursor < tail):
                    return False
        return before == await self._tails()

    async def wait_idle(self, timeout: float = CONVERGE_TIMEOUT_S) -> None:
        """Wait until :meth:`idle`: nothing left to read anywhere."""
        await async_wait_until(
            self.idle,
            timeout=timeout,
            interval=0.05,
            message="every tailer at its peer's stream tail",
        )

    async def wait_more_reads(self, node_id: str, reads: int, timeout: float = 10.0) -> None:
        """Wait until the node's Redis served ``reads`` more XREADs than it has now."""
        store = self.nodes[node_id].store
        target = await xread_calls(store) + reads
        await async_wait_until(
            lambda: _at_least(xread_calls(store), target),
            timeout=timeout,
            interval=0.05,
            message=f"{reads} more XREADs on {node_id}",
        )

    # ------------------------------------------------------------------ teardown

    async def aclose(self) -> list[BaseException]:
        """Shut every engine down, then close every store; returns the errors met."""
        errors: list[BaseException] = []
        for node in self.nodes.values():
            node.engine = None
            for engine in node.engines:  # earlier ones too: a test may have left one running
                if engine.state == "stopped":
                    continue
                try:
                    async with asyncio.timeout(TEARDOWN_SHUTDOWN_S):
                        await engine.shutdown(self.shutdown_timeout_s)
                except Exception as exc:
                    errors.append(exc)
        for node in self.nodes.values():
            try:
                await node.store.close()
            except Exception as exc:
                errors.append(exc)
        return errors


async def _at_least(value: Awaitable[int], target: int) -> bool:
    return await value >= target


@contextlib.asynccontextmanager
async def closing(mesh: MeshT) -> AsyncIterator[MeshT]:
    """Yield ``mesh`` and tear it down however the block exits; a teardown error fails a block
    that passed, and never hides the error of one that failed."""
    try:
        yield mesh
    except BaseException:
        await mesh.aclose()  # the test's own failure is the one worth reporting
        raise
    errors = await mesh.aclose()
    if errors:
        raise errors[0]


def build_config(
    node_id: str,
    urls: Mapping[str, str],
    peers: Sequence[str],
    cursor_path: Path,
    *,
    prefix: str = DEFAULT_PREFIX,
    common: Mapping[str, Any] | None = None,
    override: Mapping[str, Any] | None = None,
    peer_options: Mapping[str, Any] | None = None,
    clustered: Collection[str] = (),
) -> EngineConfig:
    """The test configuration of one node (see the module docstring for the defaults);
    ``clustered`` nodes' URLs are a seed node of a Redis Cluster."""
    data: dict[str, Any] = {
        "local_node_id": node_id,
        "local": {"redis_url": urls[node_id], "prefix": prefix, "cluster": node_id in clustered},
        "settings": {
            "cold_path": {"enabled": False},
            "hot_path": {"block_timeout_sec": DEFAULT_BLOCK_TIMEOUT_S},
        },
        "peers": [
            {
                "node_id": p,
                "redis_url": urls[p],
                "start_from": "beginning",
                "cluster": p in clustered,
                **copy.deepcopy(dict(peer_options or {})),
            }
            for p in peers
        ],
        "cursor": {"sqlite_path": str(cursor_path)},
        "http": {"enabled": False},
    }
    deep_merge(data, common or {})
    deep_merge(data, override or {})
    return EngineConfig.model_validate(data)


@contextlib.asynccontextmanager
async def open_mesh(
    redis_factory: RedisFactory,
    tmp_path: Path,
    topology: Mapping[str, Sequence[str]],
    *,
    common: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    peer_options: Mapping[str, Mapping[str, Any]] | None = None,
    redis_options: Mapping[str, Mapping[str, Any]] | None = None,
    engines: Iterable[str] | None = None,
    prefix: str = DEFAULT_PREFIX,
    clusters: Mapping[str, Cluster] | None = None,
) -> AsyncIterator[Mesh[MeshNode]]:
    """Start servers and stores for ``topology``, start engines, yield the mesh, tear down.

    Args:
        redis_factory: the fixture; servers it starts are killed by it at test end.
        tmp_path: where cursor databases go (``cursors-<node>.db``).
        topology: ``node -> peers it tails``. Every peer must be a node of the topology.
        common: deep-merged into every node's config mapping.
        overrides: ``node -> mapping`` deep-merged into that node's config (after ``common``).
        peer_options: ``node -> mapping`` merged into each of that node's peer entries
            (``"*"`` for every node), e.g. ``{"circuit_reset_timeout_sec": 1}``.
        redis_options: ``node -> RedisProcess kwargs`` (``"*"`` for every node), e.g.
            ``{"b": {"appendonly": True}}``.
        engines: nodes whose engines start now; default every node with peers. Others can be
            started later with :meth:`Mesh.start_engine`.
        prefix: key prefix of every store.
        clusters: ``node -> Cluster``: that node's store is the cluster (no server is started
            for it; its ``server`` is the cluster's seed), read and written as a cluster.
    """
    for node_id, peers in topology.items():
        unknown = [p for p in peers if p not in topology]
        if unknown or node_id in peers:
            raise ValueError(f"topology: node {node_id!r} has bad peers {peers!r}")
    overrides = overrides or {}
    peer_options = peer_options or {}
    redis_options = redis_options or {}
    clusters = clusters or {}
    servers: dict[str, RedisHandle] = {}
    for node_id in topology:
        if node_id in clusters:
            servers[node_id] = clusters[node_id].seed
            continue
        options = {**redis_options.get("*", {}), **redis_options.get(node_id, {})}
        servers[node_id] = redis_factory(**options)
    urls = {n: s.url for n, s in servers.items()}
    nodes: dict[str, MeshNode] = {}
    mesh = Mesh(topology, nodes)
    try:
        for node_id, peers in topology.items():
            config = build_config(
                node_id,
                urls,
                peers,
                tmp_path / f"cursors-{node_id}.db",
                prefix=prefix,
                common=common,
                override=overrides.get(node_id),
                peer_options={**peer_options.get("*", {}), **peer_options.get(node_id, {})},
                clustered=set(clusters),
            )
            store = await connect_store(config)
            nodes[node_id] = MeshNode(node_id, servers[node_id], store, config)
        to_start = [n for n, p in topology.items() if p] if engines is None else list(engines)
        for node_id in to_start:
            await mesh.start_engine(node_id)
    except BaseException:
        await mesh.aclose()
        raise
    async with closing(mesh):
        yield mesh


@contextlib.contextmanager
def redis_processes(workdir: Path) -> Iterator[RedisFactory]:
    """A factory of local ``redis-server`` processes with their data under ``workdir``, every
    one killed on exit: what a benchmark uses where a test has the ``redis_factory`` fixture."""
    started: list[RedisProcess] = []

    def make(**kwargs: Any) -> RedisHandle:
        server = RedisProcess(data_dir=workdir / f"redis-{len(started)}", **kwargs)
        started.append(server)  # before start, so a half-started server is killed too
        server.start()
        return server

    try:
        yield make
    finally:
        for server in started:
            server.kill()


async def cpu_seconds_over(window_s: float) -> float:
    """CPU time this process spends while the event loop runs for ``window_s`` seconds.

    A measurement window, not a synchronisation: callers assert that an idle or blocked engine
    costs almost nothing over it.
    """
    started = time.process_time()
    await asyncio.sleep(window_s)  # sync-ok: a fixed measurement window
    return time.process_time() - started
