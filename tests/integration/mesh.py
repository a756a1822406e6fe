"""An N-node replication mesh of real ``redis-server`` processes, for integration and chaos tests.

Each node is one Redis (started by the ``redis_factory`` fixture), one :class:`RedisStore` the
test writes through, and optionally one :class:`ReplicationEngine` sharing that store. The
topology is a mapping ``node -> peers it tails``; a node listed with no peers (or left out of
``engines``) is a plain store that others read from.

Defaults suit fast, deterministic tests: cold path off, ``start_from: beginning``, a short XREAD
block (so shutdown and idle detection are quick), HTTP off, cursor databases under ``tmp_path``.
Anything can be overridden per node (``overrides``), for every node (``common``), per peer entry
(``peer_options``) and per server (``redis_options``).

Usage::

    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": ["a"]}) as mesh:
        log = WriteLog()
        await log.put(mesh["a"], "k", b"v")
        await mesh.wait_converged()
        assert await snapshot(mesh["b"].store) == expected_snapshot(log.writes)

Teardown (engines shut down, stores closed) runs however the block exits; the servers
themselves are killed by ``redis_factory``.

Import it as ``from integration.mesh import ...``: ``tests/`` has no ``__init__.py``, so pytest
puts it on ``sys.path`` (for ``tests/conftest.py``) and ``integration`` resolves from any suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from harness.chaos import Version, Write
from replication_engine import codec
from replication_engine.codec import Change, StreamId
from replication_engine.config import EngineConfig
from replication_engine.engine import ReplicationEngine
from replication_engine.hot_path import Tailer
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import (
    RedisFactory,
    RedisHandle,
    async_wait_until,
    find_redis_server,
    redis_server_version,
)

__all__ = [
    "CONVERGE_TIMEOUT_S",
    "DEFAULT_PREFIX",
    "EXACT_STREAM_FACTS",
    "Mesh",
    "MeshNode",
    "RawEntry",
    "Version",
    "Write",
    "WriteLog",
    "append_raw",
    "build_config",
    "converged",
    "cpu_seconds_over",
    "expected_snapshot",
    "full_mesh",
    "lww_winner",
    "metric",
    "open_mesh",
    "raw_entries",
    "read_stream",
    "snapshot",
    "stream_version",
    "wait_converged",
    "xread_calls",
]

# Key prefix of every node's store: non-empty so prefix handling is always exercised.
DEFAULT_PREFIX = "app:"
# XREAD BLOCK of test tailers: short, so an idle tailer re-reads (and stops) quickly.
DEFAULT_BLOCK_TIMEOUT_S = 0.2
# Deadline for a mesh to converge; generous for a loaded 2-core CI machine.
CONVERGE_TIMEOUT_S = 30.0
# Bound on one engine's shutdown during teardown, so a hung engine cannot hang the suite.
TEARDOWN_SHUTDOWN_S = 15.0

# Redis 7 added the stream facts that make gap detection exact (XINFO STREAM entries-added and
# max-deleted-entry-id). On 6.2 a tailer starting from the beginning reports one gap at its
# first non-empty read, and an XDEL ahead of a cursor goes unseen (README, Known limitations).
EXACT_STREAM_FACTS = redis_server_version(find_redis_server()) >= (7, 0, 0)

# One CDC stream entry as Redis returns it: (id, fields).
RawEntry = tuple[bytes, dict[bytes, bytes]]


# ------------------------------------------------------------------------------------ writes


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
    """Per key, the write with the greatest ``(hlc, origin)``: what every node must end with."""
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
            out[change.key] = (
                None if change.tombstone else change.value,
                change.hlc,
                change.origin,
            )
    else:
        async for item in store.items():
            out[item.key] = (item.value, item.hlc, item.origin)
    return out


async def converged(stores: Sequence[RedisStore]) -> bool:
    """Every store has the same Merkle root and the same versions, tombstones included."""
    roots = {await s.merkle_root() for s in stores}
    if len(roots) != 1:
        return False
    first = await snapshot(stores[0], include_tombstones=True)
    for store in stores[1:]:
        if await snapshot(store, include_tombstones=True) != first:
            return False
    return True


async def wait_converged(stores: Sequence[RedisStore], timeout: float = CONVERGE_TIMEOUT_S) -> None:
    """Wait until :func:`converged`; the failure names each store's root and item count."""
    try:
        await async_wait_until(lambda: converged(stores), timeout=timeout, interval=0.05)
    except AssertionError as exc:
        described = []
        for store in stores:
            items = await snapshot(store, include_tombstones=True)
            described.append(
                f"{store.node_id}: root={(await store.merkle_root()).hex()[:16]} "
                f"versions={len(items)}"
            )
        raise AssertionError(f"stores did not converge: {'; '.join(described)}") from exc


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


def stream_version(change: Change) -> Version:
    return (None if change.tombstone else change.value, change.hlc, change.origin)


async def xread_calls(store: RedisStore) -> int:
    """How many XREAD commands the store's Redis has served (INFO commandstats)."""
    stats = await store.redis.info("commandstats")
    entry = stats.get("cmdstat_xread")
    return int(entry["calls"]) if isinstance(entry, dict) else 0


def metric(engine: ReplicationEngine, name: str, **labels: str) -> float:
    """One sample of an engine's Prometheus registry (0 when the series does not exist yet)."""
    value = engine.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# ------------------------------------------------------------------------------------ mesh


def full_mesh(node_ids: Sequence[str]) -> dict[str, list[str]]:
    """Every node tails every other node."""
    return {n: [p for p in node_ids if p != n] for n in node_ids}


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


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


class Mesh:
    """The nodes of one test. Build it with :func:`open_mesh`."""

    def __init__(self, topology: Mapping[str, Sequence[str]], nodes: dict[str, MeshNode]) -> None:
        self.topology = {n: list(p) for n, p in topology.items()}
        self.nodes = nodes

    def __getitem__(self, node_id: str) -> MeshNode:
        return self.nodes[node_id]

    def __iter__(self) -> Iterator[MeshNode]:
        return iter(self.nodes.values())

    @property
    def stores(self) -> list[RedisStore]:
        return [n.store for n in self.nodes.values()]

    # ------------------------------------------------------------------ engine lifecycle

    async def start_engine(self, node_id: str) -> ReplicationEngine:
        """A new engine for the node (same store, same cursor db), started."""
        node = self.nodes[node_id]
        if node.engine is not None:
            raise AssertionError(f"node {node_id} already has a running engine")
        engine = ReplicationEngine(node.config, store=node.store)
        node.engines.append(engine)
        await engine.start()
        node.engine = engine
        return engine

    async def stop_engine(self, node_id: str, timeout: float | None = None) -> ReplicationEngine:
        """Shut the node's engine down (bounded) and return it, for its final stats."""
        node = self.nodes[node_id]
        engine = node.running()
        node.engine = None
        await engine.shutdown(timeout)
        return engine

    async def restart_engine(self, node_id: str) -> ReplicationEngine:
        await self.stop_engine(node_id)
        return await self.start_engine(node_id)

    def running_nodes(self) -> list[MeshNode]:
        """Nodes with a running engine."""
        return [n for n in self.nodes.values() if n.engine is not None]

    # ------------------------------------------------------------------ server faults

    async def restart_server(self, node_id: str) -> None:
        """Start the node's (killed or stopped) Redis again and wait until its store answers.

        The store's pooled connections to the old process are dropped first: each would
        otherwise fail once ("connection closed by server") before reconnecting.
        """
        node = self.nodes[node_id]
        await asyncio.to_thread(node.server.restart)
        await node.store.redis.connection_pool.disconnect()
        await async_wait_until(
            node.store.redis.ping,
            timeout=CONVERGE_TIMEOUT_S,
            ignore=(RedisConnectionError, RedisTimeoutError),
            message=f"{node_id}'s Redis answering after restart",
        )

    # ------------------------------------------------------------------ waiting

    async def wait_converged(
        self, node_ids: Sequence[str] | None = None, timeout: float = CONVERGE_TIMEOUT_S
    ) -> None:
        ids = list(node_ids) if node_ids is not None else list(self.nodes)
        await wait_converged([self.nodes[n].store for n in ids], timeout=timeout)

    async def _tails(self) -> dict[str, StreamId | None]:
        tails: dict[str, StreamId | None] = {}
        for node in self.nodes.values():
            tail = await node.store.stream_tail()
            tails[node.node_id] = None if tail is None else codec.parse_stream_id(tail)
        return tails

    async def idle(self) -> bool:
        """Every running tailer is at its peer's stream tail, and no stream grew meanwhile.

        Reading the tails before and after checking the cursors closes the race where one node
        finishes an apply (growing its own stream) between the checks of two tailers.
        """
        before = await self._tails()
        for node in self.running_nodes():
            engine = node.running()
            if set(engine.tailers) != set(node.peer_ids):
                return False
            for peer_id, tailer in engine.tailers.items():
                tail = before[peer_id]
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
                        await engine.shutdown()
                except Exception as exc:
                    errors.append(exc)
        for node in self.nodes.values():
            try:
                await node.store.close()
            except Exception as exc:
                errors.append(exc)
        return errors


async def _at_least(value: Any, target: int) -> bool:
    return bool(await value >= target)


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
) -> EngineConfig:
    """The test configuration of one node (see the module docstring for the defaults)."""
    data: dict[str, Any] = {
        "local_node_id": node_id,
        "local": {"redis_url": urls[node_id], "prefix": prefix},
        "settings": {
            "cold_path": {"enabled": False},
            "hot_path": {"block_timeout": DEFAULT_BLOCK_TIMEOUT_S},
        },
        "peers": [
            {
                "node_id": p,
                "redis_url": urls[p],
                "start_from": "beginning",
                **copy.deepcopy(dict(peer_options or {})),
            }
            for p in peers
        ],
        "cursor": {"sqlite_path": str(cursor_path)},
        "http": {"enabled": False},
    }
    _deep_merge(data, common or {})
    _deep_merge(data, override or {})
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
) -> AsyncIterator[Mesh]:
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
    """
    for node_id, peers in topology.items():
        unknown = [p for p in peers if p not in topology]
        if unknown or node_id in peers:
            raise ValueError(f"topology: node {node_id!r} has bad peers {peers!r}")
    overrides = overrides or {}
    peer_options = peer_options or {}
    redis_options = redis_options or {}
    servers: dict[str, RedisHandle] = {}
    for node_id in topology:
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
            )
            store = await RedisStore.connect(
                config.local.redis_url,
                node_id=node_id,
                prefix=config.local.prefix,
                fanout=config.settings.merkle.fanout,
                depth=config.settings.merkle.depth,
                stream_maxlen=config.local.stream_maxlen,
                max_memory_ratio=config.local.max_memory_ratio,
            )
            nodes[node_id] = MeshNode(node_id, servers[node_id], store, config)
        to_start = [n for n, p in topology.items() if p] if engines is None else list(engines)
        for node_id in to_start:
            await mesh.start_engine(node_id)
    except BaseException:
        await mesh.aclose()
        raise
    try:
        yield mesh
    except BaseException:
        await mesh.aclose()  # the test's own failure is the one worth reporting
        raise
    errors = await mesh.aclose()
    if errors:
        raise errors[0]


async def cpu_seconds_over(window_s: float) -> float:
    """CPU time this process spends while the event loop runs for ``window_s`` seconds.

    A measurement window, not a synchronisation: callers assert that an idle or blocked engine
    costs almost nothing over it.
    """
    started = time.process_time()
    await asyncio.sleep(window_s)  # sync-ok: a fixed measurement window
    return time.process_time() - started
