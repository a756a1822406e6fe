"""Chaos against a mesh of real nodes: a proxy on every link, a skewable clock, a workload.

Each node is a real ``redis-server`` (``appendonly yes``, ``appendfsync always``), a
:class:`RedisStore` whose HLC reads an injectable (skewable) wall clock, and a
:class:`ReplicationEngine` with both paths on. Every engine reaches every peer through its own
:class:`TcpProxy`, so a partition between two nodes is the two proxies between them cut or
blackholed. :class:`ChaosMesh` adds the fault operations to :class:`harness.mesh.Mesh`: kill -9
and restart of a Redis, a crash of an engine (:meth:`ReplicationEngine.abort`), SIGSTOP,
partitions, stream trims, corrupt entries, backups restored and data wiped.

:class:`Workload` puts and deletes overlapping keys on every node and records every
acknowledged write with the HLC the store returned; a write that raised is recorded as
*unacknowledged* (it may or may not have happened). :mod:`harness.judge` checks the end state
against those records; :mod:`harness.faults` draws a seeded fault schedule and runs it.

Used by ``tests/chaos``, ``tests/integration/test_deletes.py`` and ``python -m bench.chaos``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import random
import shutil
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from harness.mesh import (
    DEFAULT_PREFIX,
    Mesh,
    MeshNode,
    Unacknowledged,
    Write,
    append_raw,
    closing,
    connect_store,
    deep_merge,
    full_mesh,
    lane_of,
    partitions_of,
    tombstone_count,
)
from harness.proxy import TcpProxy
from replication_engine import codec
from replication_engine.clock import HLC, wall_clock_ms
from replication_engine.codec import StreamId
from replication_engine.config import EngineConfig
from replication_engine.engine import ReplicationEngine
from replication_engine.testing import RedisFactory, RedisHandle, async_wait_until

__all__ = [
    "CHAOS_PEER_OPTIONS",
    "CHAOS_SETTINGS",
    "ChaosMesh",
    "ChaosNode",
    "SkewedClock",
    "Workload",
    "open_chaos_mesh",
]

# Deadline for a node whose cursor database was deleted to bootstrap from every peer.
BOOTSTRAP_DEADLINE_S = 60.0
# Bound on a graceful engine shutdown during a fault.
SHUTDOWN_BOUND_S = 15.0
# Keys per put_many call of a preload.
PRELOAD_BATCH = 1000

# Engine settings of a chaos node: both paths on, short timeouts so faults are noticed and
# healed within seconds (cold path every second, peer op timeout 1 s, circuit reset 1 s).
# Relay on, though a mesh node's default is off: a write then reaches a node along every path
# of the mesh, which gives faults (and the judge) echoes and duplicates to get wrong.
CHAOS_SETTINGS: dict[str, Any] = {
    "hot_path": {"block_timeout_sec": 0.2, "shutdown_timeout_sec": 2.0, "relay": True},
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


# ------------------------------------------------------------------------------------ nodes


class SkewedClock:
    """A wall clock (ms) running ``skew_ms`` ahead (or behind) the real one: an HLC source."""

    def __init__(self) -> None:
        self.skew_ms = 0

    def __call__(self) -> int:
        return wall_clock_ms() + self.skew_ms


@dataclass(eq=False)
class ChaosNode(MeshNode):
    """A mesh node whose engine reads each peer through its own proxy, on a skewable clock."""

    proxies: dict[str, TcpProxy] = field(default_factory=dict)  # peer id -> its proxy
    # Peers on a Redis Cluster: one proxy per cluster node, which the engine's cluster client
    # is pointed at by the peer's cluster_addresses, so the link can be cut like any other.
    cluster_proxies: dict[str, list[TcpProxy]] = field(default_factory=dict)
    clock: SkewedClock = field(default_factory=SkewedClock)

    def link(self, peer_id: str) -> list[TcpProxy]:
        """The proxies this node reads ``peer_id`` through (none for a peer it does not read)."""
        if peer_id in self.proxies:
            return [self.proxies[peer_id]]
        return list(self.cluster_proxies.get(peer_id, ()))

    def all_proxies(self) -> list[TcpProxy]:
        return [*self.proxies.values(), *(p for ps in self.cluster_proxies.values() for p in ps)]

    @property
    def skew_ms(self) -> int:
        return self.clock.skew_ms

    @skew_ms.setter
    def skew_ms(self, value: int) -> None:
        self.clock.skew_ms = value


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


class ChaosMesh(Mesh[ChaosNode]):
    """A mesh of chaos nodes with the fault operations the runner and tests use.

    Build it with :meth:`open` (or :func:`open_chaos_mesh`); :meth:`aclose` shuts engines down,
    closes stores and stops proxies. Servers belong to the factory that made them (the test
    fixture kills them).
    """

    shutdown_timeout_s = SHUTDOWN_BOUND_S

    def __init__(self, topology: Mapping[str, Sequence[str]], nodes: dict[str, ChaosNode]) -> None:
        super().__init__(topology, nodes)
        self.cancel_retries = 0  # extra cancel rounds engine kills needed (see engine.abort)

    @classmethod
    async def open(
        cls,
        node_ids: Sequence[str],
        workdir: Path,
        make_server: RedisFactory,
        *,
        settings: Mapping[str, Any] | None = None,
        peer_options: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        topology: Mapping[str, Sequence[str]] | None = None,
        start_engines: bool = True,
        clusters: Mapping[str, RedisHandle] | None = None,
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
            clusters: ``node -> server`` for nodes whose store is a Redis Cluster (a
                ``PartitionServer``: faults reach the master that holds the data); their
                peers read them through a proxy per cluster node.
        """
        topology = topology or full_mesh(node_ids)
        clusters = clusters or {}
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        servers = {
            n: clusters[n] if n in clusters else make_server(appendonly=True, appendfsync="always")
            for n in node_ids
        }
        nodes: dict[str, ChaosNode] = {}
        mesh = cls(topology, nodes)
        proxies: list[TcpProxy] = []
        try:
            for node_id in node_ids:
                own: dict[str, TcpProxy] = {}
                own_cluster: dict[str, list[TcpProxy]] = {}
                for peer_id in topology[node_id]:
                    targets = (
                        _cluster_nodes(clusters[peer_id])
                        if peer_id in clusters
                        else [servers[peer_id]]
                    )
                    link = [TcpProxy(t.host, t.port) for t in targets]
                    for proxy in link:
                        proxies.append(proxy)
                        await proxy.start()
                    if peer_id in clusters:
                        own_cluster[peer_id] = link
                    else:
                        own[peer_id] = link[0]
                data = _node_config(
                    node_id, servers[node_id].url, own, workdir, settings, peer_options, own_cluster
                )
                data["local"]["cluster"] = node_id in clusters
                deep_merge(data, config or {})
                engine_config = EngineConfig.model_validate(data)
                clock = SkewedClock()
                store = await connect_store(engine_config, hlc=HLC(clock))
                nodes[node_id] = ChaosNode(
                    node_id,
                    servers[node_id],
                    store,
                    engine_config,
                    proxies=own,
                    cluster_proxies=own_cluster,
                    clock=clock,
                )
            if start_engines:
                for node_id in node_ids:
                    if topology[node_id]:
                        await mesh.start_engine(node_id)
                await mesh.wait_bootstrapped()
        except BaseException:
            await mesh.aclose()
            for proxy in proxies:
                if not any(proxy in n.all_proxies() for n in nodes.values()):
                    await proxy.stop()
            raise
        return mesh

    # ------------------------------------------------------------------ engines

    async def kill_engine(self, node_id: str) -> ReplicationEngine:
        """Crash the node's engine: every task cancelled where it stands, then released.

        Unlike :meth:`stop_engine` nothing is asked to stop first: a tailer is cut mid-read,
        mid-apply or mid-save. Connections and the cursor database are closed afterwards, as
        the operating system would close them for a dead process.
        """
        node = self.nodes[node_id]
        engine = node.running()
        node.engine = None
        self.cancel_retries += await engine.abort()
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
                {lane for peer in n.peer_ids for lane in n.lanes(peer)} <= set(n.saved_cursors())
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

    # ------------------------------------------------------------------ network

    def _links(self, a: str, b: str) -> list[TcpProxy]:
        return [*self.nodes[a].link(b), *self.nodes[b].link(a)]

    def partition(self, a: str, b: str, *, how: str = "cut") -> None:
        """Break the links between ``a`` and ``b`` both ways: ``cut`` (resets) or ``blackhole``."""
        for proxy in self._links(a, b):
            _break(proxy, how)

    def partition_one_way(self, reader: str, source: str, *, how: str = "cut") -> None:
        """Break only ``reader``'s link to ``source``: ``source`` still reads ``reader``."""
        for proxy in self.nodes[reader].link(source):
            _break(proxy, how)

    def heal_one_way(self, reader: str, source: str) -> None:
        for proxy in self.nodes[reader].link(source):
            proxy.heal()

    def heal(self, a: str, b: str) -> None:
        for proxy in self._links(a, b):
            proxy.heal()

    def heal_all(self) -> None:
        for node in self.nodes.values():
            for proxy in node.all_proxies():
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
        return [await append_raw(store, fields) for fields in entries]

    # ------------------------------------------------------------------ state

    async def tailers_at_tails(self) -> bool:
        """Every running tailer has read its peer's stream (partition) up to the current tail."""
        tails: dict[tuple[str, str], StreamId] = {}
        for node in self.live:
            for name, part in partitions_of(node.store).items():
                tail = await part.stream_tail()
                if tail is not None:
                    tails[node.node_id, name] = codec.parse_stream_id(tail)
        for node in self.live:
            if node.engine is None:
                continue
            for lane, tailer in node.engine.tailers.items():
                peer_id, partition = lane_of(lane)
                if peer_id in self.forgotten:
                    continue
                tail_id = tails.get((peer_id, partition))
                if tail_id is not None and (tailer.cursor is None or tailer.cursor < tail_id):
                    return False
        return True

    async def wait_tailers_at_tails(self, timeout: float) -> bool:
        """Wait until :meth:`tailers_at_tails`; False if the deadline passed first.

        Equal data does not mean every stream was read: entries that change nothing (corrupt
        ones, duplicates) can still wait behind a breaker that has not reset yet.
        """
        try:
            await self.wait_for(self.tailers_at_tails, timeout)
        except AssertionError:
            return False
        return True

    async def tombstones(self) -> dict[str, int]:
        """Tombstones each node still holds (collected once every member holds them)."""
        return {node.node_id: await tombstone_count(node.store) for node in self.live}

    async def settled(self) -> bool:
        """Converged, with every tombstone collected everywhere: with writes stopped and
        every member up, collection reaches every delete (docs/DELETES.md)."""
        return not any((await self.tombstones()).values()) and await self.converged()

    async def wait_settled(self, timeout: float) -> float:
        """Wait until :meth:`settled`; returns the seconds it took."""
        started = time.monotonic()
        try:
            await self.wait_for(self.settled, timeout)
        except AssertionError as exc:
            held = await self.tombstones()
            raise AssertionError(
                f"tombstones not all collected within {timeout}s: {held}; roots "
                f"{await self.roots()}"
            ) from exc
        return time.monotonic() - started

    # ------------------------------------------------------------------ teardown

    async def aclose(self) -> list[BaseException]:
        """Resume, shut every engine down, close stores, stop proxies; returns errors."""
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                if node.server.is_running():
                    node.server.resume()
        errors = await super().aclose()
        for node in self.nodes.values():
            for proxy in node.all_proxies():
                try:
                    await proxy.stop()
                except Exception as exc:
                    errors.append(exc)
        return errors


@contextlib.asynccontextmanager
async def open_chaos_mesh(
    make_server: RedisFactory,
    workdir: Path,
    node_ids: Sequence[str] = ("a", "b", "c"),
    **options: Any,
) -> AsyncIterator[ChaosMesh]:
    """:meth:`ChaosMesh.open` (``options`` are its keywords), torn down however the block
    exits."""
    mesh = await ChaosMesh.open(list(node_ids), workdir, make_server, **options)
    async with closing(mesh):
        yield mesh


def _break(proxy: TcpProxy, how: str) -> None:
    if how == "cut":
        proxy.cut()
    elif how == "blackhole":
        proxy.blackhole()
    else:
        raise ValueError(f"how={how!r}: expected 'cut' or 'blackhole'")


def _cluster_nodes(server: RedisHandle) -> list[RedisHandle]:
    """Every node of the cluster a ``PartitionServer`` stands for, its seed first (the master
    no fault touches, so a client started at any time can find the cluster)."""
    cluster = getattr(server, "cluster", None)
    if cluster is None:
        raise AssertionError(f"{server!r} is not a cluster (a PartitionServer)")
    nodes: list[RedisHandle] = [*cluster.masters, *cluster.replicas]
    return sorted(nodes, key=lambda n: (n.host, n.port) != (server.host, server.port))


def _node_config(
    node_id: str,
    url: str,
    proxies: Mapping[str, TcpProxy],
    workdir: Path,
    settings: Mapping[str, Any] | None,
    peer_options: Mapping[str, Any] | None,
    cluster_links: Mapping[str, Sequence[TcpProxy]],
) -> dict[str, Any]:
    """A chaos node's config: each peer read through its proxy; a cluster peer through a proxy
    per cluster node, seeded by the first, with the table that maps each node's announced
    address to its proxy."""
    peer_entry = {**CHAOS_PEER_OPTIONS, **(peer_options or {})}
    return {
        "local_node_id": node_id,
        "local": {"redis_url": url, "prefix": DEFAULT_PREFIX},
        "settings": deep_merge(copy.deepcopy(CHAOS_SETTINGS), settings or {}),
        "peers": [
            {"node_id": peer_id, "redis_url": proxy.url_for(), **copy.deepcopy(peer_entry)}
            for peer_id, proxy in proxies.items()
        ]
        + [
            {
                "node_id": peer_id,
                "redis_url": link[0].url_for(),
                "cluster": True,
                "cluster_addresses": {
                    f"{p.target_host}:{p.target_port}": f"{p.host}:{p.port}" for p in link
                },
                **copy.deepcopy(peer_entry),
            }
            for peer_id, link in cluster_links.items()
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
        replicas: Mapping[str, int] | None = None,
    ) -> None:
        self.mesh = mesh
        # node -> replicas of its Redis each write waits for (a cluster node's: so a failover
        # cannot take an acknowledged write away).
        self.replicas = dict(replicas or {})
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
        replicas = self.replicas.get(node_id, 0)
        try:
            if value is None:
                hlc = await store.delete(key, replicas=replicas)
            else:
                hlc = await store.put(key, value, replicas=replicas)
        except Exception as exc:
            self.unacknowledged.append(
                Unacknowledged(node_id, key, value, f"{type(exc).__name__}: {exc}"[:200])
            )
            return None
        write = Write(node_id, key, value, hlc)
        self.writes.append(write)
        return write

    async def preload(self, node_id: str, count: int) -> None:
        """Put the first ``count`` keys on one node in batches, each write recorded: a large
        key space whose tree nodes are big before any fault (the workload alone fills one
        slowly)."""
        keys = self.keys[:count]
        for start in range(0, len(keys), PRELOAD_BATCH):
            batch = [
                (key, f"{node_id}:{next(self._seq)}".encode(), "binary")
                for key in keys[start : start + PRELOAD_BATCH]
            ]
            hlcs = await self.mesh[node_id].store.put_many(
                batch, replicas=self.replicas.get(node_id, 0)
            )
            self.writes.extend(
                Write(node_id, key, value, hlc)
                for (key, value, _ct), hlc in zip(batch, hlcs, strict=True)
            )

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
