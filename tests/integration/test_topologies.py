"""Deployment topologies end to end, against real ``redis-server`` processes (docs/TOPOLOGIES.md).

- Full mesh: a node with an empty Redis joins a mesh holding 100k keys while its members keep
  taking writes; it bootstraps from their data, tails from then on and ends identical.
- Read replicas: a primary under write load and a tree of followers that bootstrap from their
  upstream's data, refuse local writes, converge, and resume from their cursor after a restart.
- Hot standby: two nodes replicating both ways; the active one is killed (``kill -9`` of its
  Redis, its engine cancelled), writes move to the standby at once, the old active returns and
  catches up; what was exposed at the moment of failure is what the standby reported.
- Load-balancer health: ``/ready`` fails while a node lags its upstream by more than the event
  or the time threshold and recovers once caught up; ``status --mesh`` marks a lagging and a
  divergent node.

The shipped example configurations under ``deploy/examples/`` are loaded here too.

Waits are on conditions with deadlines. The writers are paced by a rate limiter: that is load
generation, not synchronisation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiolimiter import AsyncLimiter
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError as RedisResponseError

from harness.mesh import (
    Mesh,
    MeshNode,
    Order,
    Write,
    WriteLog,
    change_order,
    connect_store,
    expected_snapshot,
    full_mesh,
    lww_winner,
    metric,
    open_mesh,
    read_stream,
    snapshot,
    version_order,
)
from replication_engine import ReadOnlyStoreError, ReplicationEngine, codec
from replication_engine.clock import HLC
from replication_engine.codec import Change, StreamId
from replication_engine.config import EngineConfig, load_config
from replication_engine.cursor import CursorStore
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import (
    RedisFactory,
    async_wait_until,
    find_redis_server,
    redis_server_version,
)
from replication_engine.tools import mesh_status

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "deploy" / "examples"
# Keys the read-replica primary holds before any follower exists: "some thousands", so a
# follower that replayed or re-copied them would show up in its read counts.
PRELOAD_KEYS = 3000
# Share of the preloaded keys deleted again, so tombstones are relayed and collected too.
PRELOAD_DELETE_EVERY = 10
# Preloaded keys still live: what every bootstrap copies at least (the primary, alone in its
# mesh, collects the preload's tombstones as soon as it runs).
LIVE_PRELOAD_KEYS = PRELOAD_KEYS - len(range(0, PRELOAD_KEYS, PRELOAD_DELETE_EVERY))
# Writes per second of the background writers: well within what a 2-core CI machine's
# followers can relay, so convergence deadlines are about correctness, not capacity.
WRITER_RATE = 200
# Writes the primary takes while the mid-tree follower is down.
DOWN_WRITES = 200
# Deadline for a tree of 7 nodes (two relay hops) to converge after the writer stops.
TREE_CONVERGE_S = 60.0
# Deadline for a level of the tree to bootstrap (4 followers copying thousands of keys at
# once under write load: about 5 s on an idle 2-core machine, 20 s on a busy one).
BOOTSTRAP_S = 90.0
# Deadline for conditions that wait on breakers, reconnects and restarts.
RECOVERY_S = 30.0

READ_REPLICA_TREE = {
    "primary": [],
    "f1": ["primary"],
    "f2": ["primary"],
    "f11": ["f1"],
    "f12": ["f1"],
    "f21": ["f2"],
    "f22": ["f2"],
}
FOLLOWER = {"mode": "follower"}


# ------------------------------------------------------------------------------------ helpers


@dataclass
class Writer:
    """Puts and deletes through one node's store at a steady pace until stopped.

    Every acknowledged write goes into ``log`` with its HLC. A write that fails (the node's
    Redis died under it) is not acknowledged: it is counted in ``failures`` and ends the run,
    as a client would see its connection drop.
    """

    node: MeshNode
    log: WriteLog
    rng: random.Random
    keys: Sequence[str]
    rate_per_sec: float = WRITER_RATE
    delete_share: float = 0.15
    failures: list[BaseException] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        # A tenth of the rate per tenth of a second: an even pace, not one-second bursts.
        limiter = AsyncLimiter(max(1.0, self.rate_per_sec / 10), 0.1)
        i = 0
        while not self._stop.is_set():
            await limiter.acquire()
            key = self.rng.choice(self.keys)
            try:
                if self.rng.random() < self.delete_share:
                    await self.log.delete(self.node, key)
                else:
                    await self.log.put(self.node, key, f"{self.node.node_id}:{i}".encode())
            except (RedisConnectionError, ConnectionError, OSError) as exc:
                self.failures.append(exc)
                return
            i += 1

    def stop(self) -> None:
        self._stop.set()

    def written(self) -> int:
        """Acknowledged writes on this writer's node in the log (earlier writers' included)."""
        return len(self.log.by_node(self.node.node_id))


@contextlib.asynccontextmanager
async def writing(writer: Writer) -> AsyncIterator[Writer]:
    """Run ``writer`` for the duration of the block; stopped and awaited on exit."""
    task = asyncio.create_task(writer.run(), name=f"writer[{writer.node.node_id}]")
    try:
        yield writer
    finally:
        writer.stop()
        await task


async def wait_writes(writer: Writer, total: int, timeout: float = RECOVERY_S) -> None:
    """Wait until ``writer``'s node has taken ``total`` acknowledged writes from it."""
    await async_wait_until(
        lambda: writer.written() >= total,
        timeout=timeout,
        interval=0.02,
        message=f"{total} writes on {writer.node.node_id}",
    )


async def start_owned_engine(mesh: Mesh, node_id: str) -> ReplicationEngine:
    """Start an engine that opens its own store from its config, as the sidecar process does.

    A follower's engine then opens the store read-only; the mesh's own store object (used by
    the test for reads) is a second client of the same Redis.
    """
    node = mesh[node_id]
    if node.engine is not None:
        raise AssertionError(f"node {node_id} already has a running engine")
    engine = ReplicationEngine(node.config)
    node.engines.append(engine)
    await engine.start()
    node.engine = engine
    return engine


async def caught_up(node: MeshNode, upstream: MeshNode) -> bool:
    """The node's tailer of ``upstream`` has applied up to ``upstream``'s stream tail."""
    tail = await upstream.store.stream_tail()
    tailer = node.running().tailers.get(upstream.node_id)
    return tail is not None and tailer is not None and tailer.cursor == StreamId.parse(tail)


def tailer_settled(node: MeshNode, peer_id: str) -> bool:
    """The node's tailer of ``peer_id`` has a cursor (bootstrap, if any, is finished)."""
    engine = node.engine
    tailer = None if engine is None else engine.tailers.get(peer_id)
    return (
        tailer is not None
        and tailer.cursor is not None
        and tailer.mode in ("catching_up", "tailing")
    )


async def stream_ids(store: RedisStore) -> list[StreamId]:
    return [sid for sid, _ in await read_stream(store)]


async def xlen(store: RedisStore) -> int:
    return int(await store.redis.xlen(store.keys.cdc))


async def saved_cursors(path: Path) -> tuple[dict[str, str], bool]:
    """The cursors in a node's cursor database, and whether any bootstrap is in progress."""
    cursors = await CursorStore.open(path)
    try:
        saved = await cursors.all()
        pending = [await cursors.bootstrap_state(peer) for peer in saved]
        return saved, any(state is not None for state in pending)
    finally:
        await cursors.close()


async def preload(log: WriteLog, node: MeshNode, count: int) -> None:
    """``count`` keys written on ``node``, every ``PRELOAD_DELETE_EVERY``-th deleted again."""
    chunk = 200
    for start in range(0, count, chunk):
        keys = [f"seed:{i:05d}" for i in range(start, min(count, start + chunk))]
        await asyncio.gather(*(log.put(node, key, f"seed-{key}".encode()) for key in keys))
    doomed = [f"seed:{i:05d}" for i in range(0, count, PRELOAD_DELETE_EVERY)]
    for start in range(0, len(doomed), chunk):
        await asyncio.gather(*(log.delete(node, key) for key in doomed[start : start + chunk]))


async def agreeing_snapshots(stores: Sequence[RedisStore]) -> list[dict[str, Any]]:
    """Snapshots (tombstones included) taken while the stores agree: a tombstone collected on
    one store between two reads would otherwise show as a difference."""
    taken: list[dict[str, Any]] = []

    async def agree() -> bool:
        taken[:] = [await snapshot(store, include_tombstones=True) for store in stores]
        return all(t == taken[0] for t in taken[1:])

    await async_wait_until(agree, timeout=RECOVERY_S, message="the stores agree")
    return taken


def covered(versions: dict[str, Order], write: Write) -> bool:
    """A store holding ``versions`` (key -> order of its newest version) has ``write`` or a
    newer one."""
    held = versions.get(write.key)
    return held is not None and held >= write.order


# ------------------------------------------------------------------------------------ examples

EXAMPLE_DIRS = ("read-replicas", "hot-standby", "load-balancer-health")
EXAMPLE_FILES = sorted(p for d in EXAMPLE_DIRS for p in (EXAMPLES / d).glob("*.yaml"))


def load_examples(directory: str) -> dict[str, EngineConfig]:
    configs = [load_config(p, env={}) for p in sorted((EXAMPLES / directory).glob("*.yaml"))]
    return {c.local_node_id: c for c in configs}


def redis_host(url: str) -> str:
    return url.split("@", 1)[-1].split("/", 1)[0]


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_example_config_loads(path: Path) -> None:
    config = load_config(path, env={})
    assert config.local.prefix == "app:"
    assert all(p.password is None for p in config.peers), "secrets belong in the environment"
    env = {f"REPLICATION_ENGINE__PEERS__{i}__PASSWORD": f"pw{i}" for i in range(len(config.peers))}
    with_secrets = load_config(path, env=env)
    for i, peer in enumerate(with_secrets.peers):
        assert peer.password is not None and peer.password.get_secret_value() == f"pw{i}"


def test_example_topologies_are_consistent() -> None:
    assert len(EXAMPLE_FILES) >= 7
    # Read replicas: one primary taking writes, a tree of followers below it.
    tree = load_examples("read-replicas")
    roots = [c for c in tree.values() if not c.peers]
    assert [c.mode for c in roots] == ["mesh"]
    for node_id, config in tree.items():
        if config is roots[0]:
            continue
        assert config.mode == "follower", node_id
        (upstream,) = config.peers
        assert upstream.start_from == "snapshot", node_id
        assert redis_host(upstream.redis_url) == redis_host(tree[upstream.node_id].local.redis_url)
        seen = {node_id}
        while tree[upstream.node_id].peers:  # walks up to the primary, never round a loop
            assert upstream.node_id not in seen, node_id
            seen.add(upstream.node_id)
            upstream = tree[upstream.node_id].peers[0]
    assert any(tree[c.peers[0].node_id].mode == "follower" for c in tree.values() if c.peers)
    # Hot standby: two mesh nodes, each tailing the other.
    pair = load_examples("hot-standby")
    assert set(pair) == {"active", "standby"}
    for node_id, config in pair.items():
        (other,) = config.peers
        assert config.mode == "mesh" and other.node_id != node_id
        assert redis_host(other.redis_url) == redis_host(pair[other.node_id].local.redis_url)
    # Load-balancer health: a follower with both lag thresholds, reachable by the balancer.
    lb = load_examples("load-balancer-health")
    replica = lb["replica-1"]
    assert replica.mode == "follower"
    assert replica.settings.slo.max_replication_lag_events is not None
    assert replica.http.enabled and replica.http.host == "0.0.0.0"
    assert len(lb["node-a"].peers) >= 2


# ------------------------------------------------------------------------------------ full mesh

# Keys the two-node mesh holds before a third node joins it (issue: "a mesh holding 100k keys").
JOIN_KEYS = 100_000
# Items per apply call while seeding the mesh.
JOIN_SEED_CHUNK = 1000
# Writes a node takes after the newcomer settled, so its hot path is seen carrying them too.
JOIN_WRITES_AFTER = 100


@pytest.mark.slow
async def test_full_mesh_new_node_joins_100k_keys_while_writes_continue(
    redis_factory: RedisFactory, tmp_path: Path, record_property: Any
) -> None:
    """A node with an empty Redis joins a running mesh: snapshot bootstrap, then tailing.

    The 100k seeded keys are on a and b but in neither stream, so c can only get them by the
    bootstrap; the writes made meanwhile on a and b reach it through the streams it tails from
    the tail recorded before the copy. c must end with exactly the last-writer-wins state.
    """
    async with open_mesh(
        redis_factory,
        tmp_path,
        full_mesh(["a", "b", "c"]),
        common={"settings": {"hot_path": {"relay": False}}},
        overrides={"c": {"settings": {"cold_path": {"bootstrap_rate_limit_per_sec": 1_000_000}}}},
        peer_options={"c": {"start_from": "snapshot"}},
        engines=["a", "b"],
    ) as mesh:
        hlc = HLC()
        seeds = [
            Write("seed", f"seed:{i:06d}", f"seed-{i}".encode(), hlc.now())
            for i in range(JOIN_KEYS)
        ]
        changes = [Change.put(w.key, w.value or b"", hlc=w.hlc, origin=w.node) for w in seeds]

        async def seed(store: RedisStore) -> None:
            for start in range(0, JOIN_KEYS, JOIN_SEED_CHUNK):
                await store.apply_batch(changes[start : start + JOIN_SEED_CHUNK], relay=False)

        await asyncio.gather(seed(mesh["a"].store), seed(mesh["b"].store))
        assert await mesh["a"].store.merkle_root() == await mesh["b"].store.merkle_root()

        log = WriteLog()
        rng = random.Random(7)
        keys = [f"seed:{i:06d}" for i in range(0, JOIN_KEYS, 97)] + [
            f"live:{i}" for i in range(500)
        ]
        writers = [Writer(mesh[n], log, random.Random(rng.random()), keys) for n in ("a", "b")]
        async with writing(writers[0]), writing(writers[1]):
            await wait_writes(writers[0], 50)
            before_join = len(log.writes)
            started = time.perf_counter()
            await mesh.start_engine("c")
            for peer_id in ("a", "b"):
                await async_wait_until(
                    functools.partial(tailer_settled, mesh["c"], peer_id),
                    timeout=BOOTSTRAP_S,
                    message=f"c bootstrapped from {peer_id}",
                )
            bootstrap_sec = time.perf_counter() - started
            during_join = len(log.writes) - before_join
            await wait_writes(writers[0], writers[0].written() + JOIN_WRITES_AFTER)
        assert not writers[0].failures and not writers[1].failures
        assert during_join > 0, "writes went on while c bootstrapped"

        await mesh.wait_converged(timeout=TREE_CONVERGE_S)
        assert await snapshot(mesh["c"].store) == expected_snapshot([*seeds, *log.writes])
        # The live writes reached c through its tailers, not only through the copy.
        assert mesh["c"].total("applied") > 0
        # The data set was copied once: bootstraps run in turn, so the second one read only
        # what differed by then (writes made meanwhile), not the 100k keys again.
        fetched = [
            metric(mesh["c"].running(), "replication_repair_items_fetched_total", peer=p)
            for p in ("a", "b")
        ]
        assert JOIN_KEYS <= sum(fetched) <= JOIN_KEYS + len(log.writes), fetched
        record_property("bootstrap_sec", round(bootstrap_sec, 2))
        record_property("writes_during_bootstrap", during_join)
        print(
            f"\nc joined a 2-node mesh of {JOIN_KEYS:,} keys in {bootstrap_sec:.1f} s "
            f"while a and b took {during_join} writes; fetched per peer {fetched}"
        )


# ------------------------------------------------------------------------------------ read replicas


async def test_read_replica_tree(
    redis_factory: RedisFactory, tmp_path: Path, record_property: Any
) -> None:
    followers = [n for n in READ_REPLICA_TREE if n != "primary"]
    async with open_mesh(
        redis_factory,
        tmp_path,
        READ_REPLICA_TREE,
        overrides={f: FOLLOWER for f in followers},
        peer_options={"*": {"start_from": "snapshot"}},
        engines=[],
    ) as mesh:
        primary = mesh["primary"]
        log = WriteLog()
        await preload(log, primary, PRELOAD_KEYS)
        preloaded = len(log.writes)
        assert await xlen(primary.store) == preloaded
        # The primary's sidecar: mode mesh, no peers; it accepts writes and reads nothing.
        await mesh.start_engine("primary")
        assert primary.running().readiness() == (True, [])

        keys = [f"seed:{i:05d}" for i in range(0, PRELOAD_KEYS, 7)] + [
            f"live:{i}" for i in range(300)
        ]
        writer = Writer(primary, log, random.Random(11), keys)
        async with writing(writer):
            # Level by level, so each follower bootstraps from an upstream that already holds
            # the preloaded data, while the primary keeps taking writes.
            for level in (("f1", "f2"), ("f11", "f12", "f21", "f22")):
                for node_id in level:
                    await start_owned_engine(mesh, node_id)
                for node_id in level:
                    upstream = mesh[node_id].peer_ids[0]
                    await async_wait_until(
                        functools.partial(tailer_settled, mesh[node_id], upstream),
                        timeout=BOOTSTRAP_S,
                        message=f"{node_id} bootstrapped from {upstream}",
                    )
            await wait_writes(writer, writer.written() + 100)

            # Followers refuse local writes, with a message that says what to do instead.
            for node_id in followers:
                store = mesh[node_id].running().store
                assert isinstance(store, RedisStore) and store.read_only
                with pytest.raises(ReadOnlyStoreError) as refused:
                    await store.put("local:write", b"refused")
                message = str(refused.value)
                assert f"{node_id!r} is a follower" in message
                assert "write to the primary" in message
                with pytest.raises(ReadOnlyStoreError):
                    await store.delete("seed:00001")
                assert await mesh[node_id].store.get_version("local:write") is None

            # A mid-tree follower restarts while the primary keeps writing.
            f1 = mesh["f1"]
            first_life = await mesh.stop_engine("f1")
            stopped_at = writer.written()
            saved, bootstrapping = await saved_cursors(f1.cursor_path)
            assert set(saved) == {"primary"} and not bootstrapping
            await wait_writes(writer, stopped_at + DOWN_WRITES)
        written_while_down = writer.written() - stopped_at

        second_life = await start_owned_engine(mesh, "f1")
        primary_tail = codec.parse_stream_id(await primary.store.stream_tail() or "0-0")
        await async_wait_until(
            lambda: tailer_settled(f1, "primary") and f1.tailer("primary").cursor == primary_tail,
            timeout=RECOVERY_S,
            message="restarted f1 caught up with the primary",
        )
        # It resumed from its cursor: it read exactly the entries after it, which are the
        # writes made while it was down plus those it had not applied yet when it stopped
        # (its lag then), a small fraction of the store. No bootstrap ran.
        assert first_life.tailers["primary"].cursor == StreamId.parse(saved["primary"])
        after_cursor = [
            sid for sid in await stream_ids(primary.store) if sid > StreamId.parse(saved["primary"])
        ]
        resumed = f1.tailer("primary").stats.read
        unapplied_at_stop = resumed - written_while_down
        assert resumed == len(after_cursor)
        assert 0 <= unapplied_at_stop <= stopped_at - preloaded
        store_keys = len(await snapshot(primary.store, include_tombstones=True))
        assert store_keys >= LIVE_PRELOAD_KEYS
        assert resumed < store_keys // 4, (
            f"read {resumed} entries after the restart ({written_while_down} written while "
            f"down, {unapplied_at_stop} unapplied at stop); the store holds {store_keys} keys"
        )
        assert metric(second_life, "replication_repair_items_fetched_total", peer="primary") == 0
        record_property(
            "f1_restart",
            {
                "read_after_restart": resumed,
                "written_while_down": written_while_down,
                "unapplied_at_stop": unapplied_at_stop,
                "store_keys": store_keys,
            },
        )

        # Every bootstrap copied its upstream's data (at least the live preloaded keys) and
        # then tailed only what came after: never the preload from the stream.
        assert (
            metric(first_life, "replication_repair_items_fetched_total", peer="primary")
            >= LIVE_PRELOAD_KEYS
        )
        assert first_life.tailers["primary"].stats.read <= stopped_at - preloaded + 1
        for node_id in ("f2", "f11", "f12", "f21", "f22"):
            node = mesh[node_id]
            upstream = node.peer_ids[0]
            engine = node.running()
            assert (
                metric(engine, "replication_repair_items_fetched_total", peer=upstream)
                >= LIVE_PRELOAD_KEYS
            ), node_id
            upstream_entries = await xlen(mesh[upstream].store)
            assert engine.tailers[upstream].stats.read <= upstream_entries - LIVE_PRELOAD_KEYS, (
                node_id
            )

        # The children of f1 keep converging through it after its restart.
        async with writing(Writer(primary, log, random.Random(12), keys)) as more:
            await wait_writes(more, more.written() + 200)
        # Converged: one root and the same versions on all seven (a re-read of the roots
        # afterwards could catch the primary a tombstone collection ahead of its followers).
        await mesh.wait_converged(timeout=TREE_CONVERGE_S)
        assert await snapshot(primary.store) == expected_snapshot(log.writes)


async def test_read_replica_embedded_follower_refuses_local_writes(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory, tmp_path, {"up": [], "f": ["up"]}, overrides={"f": FOLLOWER}
    ) as mesh:
        follower = mesh["f"]
        assert follower.running().config.mode == "follower"
        with pytest.raises(ReadOnlyStoreError):
            await follower.store.put("local:write", b"must be refused")
        # The application's own store object, and a client in another language, write through
        # the store's functions: they refuse too, or the write would never leave the follower.
        other = await connect_store(follower.config)
        try:
            with pytest.raises(ReadOnlyStoreError, match="is a follower"):
                await other.put("app:write", b"must be refused")
            with pytest.raises(ReadOnlyStoreError, match="is a follower"):
                await other.delete("app:write")
            if redis_server_version(find_redis_server())[0] >= 7:
                with pytest.raises(RedisResponseError, match=r"^FOLLOWER node f is a follower"):
                    await other.redis.execute_command(
                        "FCALL", "re_put", 1, other.keys.item("raw:write"), b"from elsewhere"
                    )
        finally:
            await other.close()
        for key in ("local:write", "app:write", "raw:write"):
            assert await follower.store.get(key) is None


async def test_read_replica_tree_mirrors_collected_deletes(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """A follower mirrors its upstream, absence included (docs/DELETES.md, "Followers").

    f11 is away while the primary deletes keys; the primary and f1 collect those tombstones,
    and f1's short stream rolls past f11's cursor, so the DEL entries are gone by the time f11
    returns. Its repair from f1 finds keys f1 lacks while f1's claim about the primary's writes
    covers them: dead, dropped. Members never wait for followers.
    """
    followers = [n for n in READ_REPLICA_TREE if n != "primary"]
    tree_settings = {"membership": {"interval_sec": 0.1}, "cold_path": {"interval_sec": 0.5}}
    async with open_mesh(
        redis_factory,
        tmp_path,
        READ_REPLICA_TREE,
        common={"settings": tree_settings},
        overrides={f: {**FOLLOWER, "local": {"stream_maxlen": 20}} for f in followers},
        peer_options={"*": {"start_from": "snapshot"}},
        engines=[],
    ) as mesh:
        primary = mesh["primary"]
        log = WriteLog()
        keys = [f"doomed:{i}" for i in range(40)] + [f"kept:{i}" for i in range(40)]
        for key in keys:
            await log.put(primary, key, key.encode())
        for node_id in READ_REPLICA_TREE:
            await start_owned_engine(mesh, node_id)
        await mesh.wait_converged(timeout=TREE_CONVERGE_S)
        await mesh.stop_engine("f11")

        for i in range(40):
            await log.delete(primary, f"doomed:{i}")
        for i in range(60):  # enough for f1's 20-entry stream to roll past f11's cursor
            await log.put(primary, f"later:{i}", b"after the deletes")

        async def f1_collected() -> bool:
            return (
                await mesh["f1"].store.tombstone_count() == 0
                and await mesh["f1"].store.get_version("doomed:39") is None
                and await primary.store.get_version("doomed:39") is None
            )

        await async_wait_until(f1_collected, timeout=TREE_CONVERGE_S, message="f1 collected")
        assert await mesh["f11"].store.get("doomed:0") is not None, "f11 still holds the value"

        engine = await start_owned_engine(mesh, "f11")
        await mesh.wait_converged(timeout=TREE_CONVERGE_S)

        for node in mesh:
            for i in range(40):
                assert await node.store.get_version(f"doomed:{i}") is None, (node.node_id, i)
            assert await node.store.get("kept:0") is not None
            assert await node.store.get("later:59") is not None
        assert metric(engine, "replication_stream_gaps_total", peer="f1") >= 1
        assert metric(engine, "replication_absence_drops_total", peer="f1") == 40


# ------------------------------------------------------------------------------------ hot standby

HOT_STANDBY = {"A": ["B"], "B": ["A"]}
# The active takes writes faster than the standby is allowed to apply them (even on a busy
# machine, where the writer slows down), so the standby trails by at least
# EXPOSED_AT_LEAST writes when the active dies: an exposure worth measuring.
ACTIVE_WRITE_RATE = 500
STANDBY_APPLY_RATE = 100
STANDBY_BATCH = 10
EXPOSED_AT_LEAST = 100
# Writes the standby takes after the failover, part of them while the old active returns.
STANDBY_WRITES = 200


@dataclass
class Takeover:
    """What a hot-standby failover exposed and how it ended (see :func:`fail_over`)."""

    exposure: dict[str, Any]  # B's status()["peers"]["A"] at the instant A died
    acked_on_a: list[Write]  # every write A acknowledged before it died
    # Writes A persisted but never acknowledged (the one in flight when it died): they may
    # survive, as a client that saw its connection drop must assume.
    unacked_on_a: list[Write]
    unreplicated: list[Write]  # of those, the ones B held neither at failure nor newer
    a_stream: dict[tuple[str, int], StreamId]  # (key, hlc) -> A's stream id, A's writes
    log: WriteLog
    final_a: dict[str, Any]
    final_b: dict[str, Any]
    b_before_return: dict[str, Order]  # B's newest version of A's writes, per key

    @property
    def exposure_cursor(self) -> StreamId:
        return StreamId.parse(self.exposure["cursor"])

    def after_exposure_cursor(self) -> list[StreamId]:
        return [sid for sid in self.a_stream.values() if sid > self.exposure_cursor]


async def fail_over(redis_factory: RedisFactory, tmp_path: Path) -> Takeover:
    """A (active) and B (standby) replicate both ways; A dies; writes move to B; A returns.

    B applies A's events at most ``STANDBY_APPLY_RATE`` per second while A takes
    ``ACTIVE_WRITE_RATE`` writes per second, so B trails A when A's Redis is killed (SIGKILL;
    ``appendonly yes``, ``appendfsync always``) and A's engine is shut down with it.
    """
    throttled = {
        "settings": {
            "hot_path": {
                "rate_limit_enabled": True,
                "rate_limit_per_sec": STANDBY_APPLY_RATE,
                "rate_limit_burst": STANDBY_BATCH,
                "batch_size": STANDBY_BATCH,
                "min_batch_size": STANDBY_BATCH,
                "max_batch_size": STANDBY_BATCH,
            }
        }
    }
    # Relay on (the example configs have it off): B's stream then records each version B
    # applied, which is how this test learns what B held when A died. What B holds is the same.
    async with open_mesh(
        redis_factory,
        tmp_path,
        HOT_STANDBY,
        common={"settings": {"hot_path": {"relay": True}}},
        overrides={"B": throttled},
        peer_options={"*": {"circuit_reset_timeout_sec": 0.5}},
        redis_options={"*": {"appendonly": True, "appendfsync": "always"}},
    ) as mesh:
        a, b = mesh["A"], mesh["B"]
        log = WriteLog()
        keys = [f"k:{i}" for i in range(400)]
        active = Writer(a, log, random.Random(21), keys, rate_per_sec=ACTIVE_WRITE_RATE)
        async with writing(active):
            await wait_writes(active, 300)
            await async_wait_until(
                lambda: (b.peer_status("A")["last_known_lag_events"] or 0) >= EXPOSED_AT_LEAST,
                timeout=RECOVERY_S,
                message="the standby trails the active",
            )
            # The failure: A's Redis dies mid-write. B's view of A once it has noticed (what
            # an operator reads before failing over) is the exposure of a failover to B.
            a.server.kill()
            await async_wait_until(
                lambda: not b.peer_status("A")["connected"],
                timeout=RECOVERY_S,
                message="B notices that A is gone",
            )
            exposure = dict(b.peer_status("A"))
            # Writes move to B at once: it already holds everything it replicated and takes
            # writes like any mesh node; the client only switches its URL. B overwrites some
            # of A's keys and writes keys of its own.
            b_keys = keys[:100] + [f"b:{i}" for i in range(100)]
            standby = Writer(b, log, random.Random(22), b_keys)
            async with writing(standby):
                await wait_writes(standby, 1)
                await mesh.stop_engine("A")  # the active's sidecar goes down with its node
                await async_wait_until(
                    lambda: active.failures,
                    timeout=RECOVERY_S,
                    message="the writer on A saw its connection fail",
                )
                await async_wait_until(
                    lambda: not b.peer_status("A")["connected"],
                    timeout=RECOVERY_S,
                    message="B noticed that A is gone",
                )
                acked_on_a = list(log.by_node("A"))
                # What B holds of A's writes now that A is gone: every version B applied is
                # re-emitted on B's stream with origin A (B's own writes are origin B).
                held: dict[str, Order] = {}
                for _, change in await read_stream(b.store):
                    if change.origin == "A":
                        version = change_order(change)
                        held[change.key] = max(held.get(change.key, version), version)
                unreplicated = [w for w in acked_on_a if not covered(held, w)]

                # A returns with its data and a new engine (same cursor database).
                await mesh.restart_redis("A")
                await mesh.start_engine("A")
                await wait_writes(standby, standby.written() + STANDBY_WRITES)
        await mesh.wait_idle()
        await mesh.wait_converged()
        finals = await agreeing_snapshots([a.store, b.store])
        a_changes = [(sid, c) for sid, c in await read_stream(a.store) if c.origin == "A"]
        a_stream = {(c.key, c.hlc): sid for sid, c in a_changes}
        acked = {(w.key, w.hlc) for w in acked_on_a}
        unacked = [
            Write("A", c.key, None if c.tombstone else c.value, c.hlc)
            for _, c in a_changes
            if (c.key, c.hlc) not in acked
        ]
        return Takeover(
            exposure=exposure,
            acked_on_a=acked_on_a,
            unacked_on_a=unacked,
            unreplicated=unreplicated,
            a_stream=a_stream,
            log=log,
            final_a=finals[0],
            final_b=finals[1],
            b_before_return=held,
        )


async def test_hot_standby_takeover(
    redis_factory: RedisFactory, tmp_path: Path, record_property: Any
) -> None:
    run = await fail_over(redis_factory, tmp_path)
    record_property("unreplicated_at_failure", len(run.unreplicated))
    record_property(
        "exposure",
        {
            k: run.exposure[k]
            for k in ("cursor", "tail", "last_known_lag_ms", "last_known_lag_events")
        },
    )

    # A came back with every write it acknowledged (appendfsync always).
    lost = [w for w in run.acked_on_a if (w.key, w.hlc) not in run.a_stream]
    assert not lost, f"{len(lost)} acknowledged writes lost by A's crash"
    # The failover exposed writes; all of them after the cursor B reported, none before it.
    assert run.unreplicated, "B was caught up when A died: the failover exposed nothing"
    exposed = run.after_exposure_cursor()
    assert all(run.a_stream[(w.key, w.hlc)] > run.exposure_cursor for w in run.unreplicated)
    assert len(run.unreplicated) <= len(exposed), (len(run.unreplicated), len(exposed))

    # In the end A and B are identical, and every acknowledged write (A's before the failure,
    # B's after it) survives unless a later write superseded it. The sequential writer had at
    # most one write in flight when A died; if A had persisted it, it replicates like the rest.
    assert run.final_a == run.final_b
    assert len(run.unacked_on_a) <= 1, run.unacked_on_a
    every_write = run.log.writes + run.unacked_on_a
    winners = lww_winner(every_write)
    live = {k: v for k, v in run.final_b.items() if v[0] is not None}
    assert live == expected_snapshot(every_write)
    final_order = {key: version_order(version) for key, version in run.final_b.items()}

    def survives(write: Write) -> bool:
        """Held, superseded, or deleted later with the delete's tombstone since collected."""
        winner = winners[write.key]
        collected = write.key not in final_order and winner.value is None
        return covered(final_order, write) or (collected and winner.order >= write.order)

    replicated = [w for w in run.acked_on_a if covered(run.b_before_return, w)]
    assert replicated and all(survives(w) for w in replicated)
    # The unreplicated writes were recovered when A returned: each is there or superseded.
    assert all(survives(w) for w in run.unreplicated)
    recovered = [w for w in run.unreplicated if winners[w.key] == w]
    assert recovered, "no unreplicated write was still the newest for its key"
    for write in recovered:
        if write.key in run.final_b:
            assert run.final_b[write.key] == write.version, write
        else:
            assert write.value is None, write  # the recovered delete, its tombstone collected


async def test_hot_standby_exposure_figures_bound_the_unreplicated_writes(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    run = await fail_over(redis_factory, tmp_path)
    assert run.unreplicated
    newest = max(run.a_stream[(w.key, w.hlc)].ms for w in run.unreplicated)
    span_ms, count = newest - run.exposure_cursor.ms, len(run.unreplicated)
    reported_ms = run.exposure["last_known_lag_ms"]
    reported_events = run.exposure["last_known_lag_events"]
    # The span is a bound (B counts up to now while A is unreachable); the event count is an
    # estimate (lag at the last read plus A's recent write rate times the silence since).
    assert span_ms <= reported_ms, (
        f"{count} unreplicated writes over {span_ms} ms after the cursor; "
        f"B reported {reported_ms} ms"
    )
    assert count / 2 <= reported_events <= count * 2, (count, reported_events)


# ------------------------------------------------------------------------------------ load balancer

LB_TOPOLOGY = {"up": [], "ev": ["up"], "sec": ["up"]}
# The backlog the two lagging nodes replay: written at most BACKLOG_RATE per second, so it
# spans more than a second and its entries' ages spread well beyond MAX_LAG_SEC.
BACKLOG_WRITES = 1500
BACKLOG_RATE = 1000
# Thresholds of the two nodes: "ev" checks only the event lag, "sec" only the time lag.
MAX_LAG_EVENTS = 100
MAX_LAG_SEC = 0.25
# How fast the lagging nodes may apply: the backlog takes a few seconds to replay.
LAGGING_APPLY_RATE = 400
LAGGING_BATCH = 50


def throttled_hot_path(rate: float, batch: int) -> dict[str, Any]:
    return {
        "rate_limit_enabled": True,
        "rate_limit_per_sec": rate,
        "rate_limit_burst": batch,
        "batch_size": batch,
        "min_batch_size": batch,
        "max_batch_size": batch,
    }


async def http_get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with session.get(url) as response:
        return response.status, await response.json()


def lag_reasons(engine: ReplicationEngine) -> list[str]:
    """The readiness reasons that name a measured lag over a bound (not "lag not known yet",
    which holds before the first read)."""
    ready, reasons = engine.readiness()
    return [] if ready else [r for r in reasons if " lag " in r and " exceeds " in r]


async def test_load_balancer_health(redis_factory: RedisFactory, tmp_path: Path) -> None:
    throttled = {"settings": {"hot_path": throttled_hot_path(LAGGING_APPLY_RATE, LAGGING_BATCH)}}
    overrides = {
        "ev": {
            **throttled,
            "http": {"enabled": True, "listen": "127.0.0.1:0"},
            "settings": {
                **throttled["settings"],
                "slo": {
                    "max_replication_lag_events": MAX_LAG_EVENTS,
                    "max_replication_lag_sec": 3600,
                },
            },
        },
        "sec": {
            "settings": {
                **throttled["settings"],
                "slo": {"max_replication_lag_sec": MAX_LAG_SEC},
            },
        },
    }
    async with open_mesh(
        redis_factory, tmp_path, LB_TOPOLOGY, overrides=overrides, engines=[]
    ) as mesh:
        up = mesh["up"]
        log = WriteLog()
        keys = [f"k:{i}" for i in range(5000)]
        async with writing(Writer(up, log, random.Random(31), keys, BACKLOG_RATE)) as backlog:
            await wait_writes(backlog, BACKLOG_WRITES)
        backlog_ids = await stream_ids(up.store)
        first, last = backlog_ids[0], backlog_ids[-1]
        assert last.ms - first.ms > 4 * MAX_LAG_SEC * 1000, "backlog too young to test lag_sec"

        ev = await mesh.start_engine("ev")
        sec = await mesh.start_engine("sec")
        assert ev.http is not None
        base = ev.http.url
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            # Behind by more than max_replication_lag_events: not ready, and says why.
            reasons = await async_wait_until(
                lambda: lag_reasons(ev),
                timeout=RECOVERY_S,
                interval=0.005,
                message="ev not ready because of its event lag",
            )
            assert reasons[0].startswith("peer up: lag ") and reasons[0].endswith(
                f"events exceeds {MAX_LAG_EVENTS}"
            ), reasons
            status, body = await http_get(session, f"{base}/ready")
            lagging_status = ev.status()["peers"]["up"]
            assert status == 503 and body["ready"] is False, body
            assert any("events exceeds" in r for r in body["reasons"]), body
            assert not any(" ms exceeds" in r for r in body["reasons"]), body
            status, body = await http_get(session, f"{base}/status")
            assert status == 200
            peer = body["peers"]["up"]
            assert peer["connected"] and peer["lag_events"] > MAX_LAG_EVENTS, peer
            assert lagging_status["lag_events"] > MAX_LAG_EVENTS

            # Behind by more than max_replication_lag_sec: not ready, and says why.
            reasons = await async_wait_until(
                lambda: lag_reasons(sec),
                timeout=RECOVERY_S,
                interval=0.005,
                message="sec not ready because of its time lag",
            )
            assert all(" ms exceeds 250 ms" in r for r in reasons), reasons
            assert sec.status()["peers"]["up"]["lag_ms"] > MAX_LAG_SEC * 1000

            # Caught up: both ready again, lag 0.
            await async_wait_until(
                lambda: ev.readiness()[0] and sec.readiness()[0] and mesh.idle(),
                timeout=RECOVERY_S,
                message="ev and sec caught up and ready",
            )
            status, body = await http_get(session, f"{base}/ready")
            assert (status, body["ready"]) == (200, True), body
            status, body = await http_get(session, f"{base}/status")
            peer = body["peers"]["up"]
            assert (peer["lag_events"], peer["lag_ms"]) == (0, 0), peer
            assert peer["cursor"] == str(last)
        await mesh.wait_converged()


async def test_load_balancer_health_not_ready_while_a_backlog_cannot_be_applied(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"up": [], "full": ["up"]},
        # Any Redis is "above 0.1% of a 64 MiB maxmemory": the node never accepts applies.
        overrides={"full": {"local": {"max_memory_ratio": 0.001}}},
        redis_options={"full": {"maxmemory": 64 * 1024 * 1024}},
        engines=[],
    ) as mesh:
        log = WriteLog()
        keys = [f"k:{i}" for i in range(100)]
        async with writing(Writer(mesh["up"], log, random.Random(41), keys)) as backlog:
            await wait_writes(backlog, 500)
        engine = await mesh.start_engine("full")
        await async_wait_until(
            lambda: getattr(engine.tailers.get("up"), "mode", None) == "backpressure",
            timeout=RECOVERY_S,
            message="full read the backlog and holds it under memory backpressure",
        )
        peer = engine.status()["peers"]["up"]
        assert peer["connected"] and peer["events_read"] > 0 and peer["events_applied"] == 0
        ready, _ = engine.readiness()
        assert not ready, f"ready while 500 entries behind, lag reported {peer['lag_events']}"


@dataclass(frozen=True)
class StatusRow:
    node: str
    root: str
    lag_ms: int | None
    flags: frozenset[str]


async def run_mesh_status(config: EngineConfig) -> tuple[int, dict[str, StatusRow]]:
    """``replication-engine status --mesh --config FILE``, as the CLI runs it, parsed."""
    out = io.StringIO()
    code = await mesh_status(config, out=out)
    rows: dict[str, StatusRow] = {}
    header, *lines = out.getvalue().splitlines()
    assert header.split()[:2] == ["node", "root"], out.getvalue()
    for line in lines:
        if not line.strip():
            break  # the summary below the table
        words = line.split()
        lag = None
        if " ms / " in line:
            lag = int(line.split(" ms / ")[0].split()[-1])
        rows[words[0]] = StatusRow(
            words[0], words[1], lag, frozenset(w for w in words if w in ("LAGGING", "DIVERGENT"))
        )
    return code, rows


# A follower replaying a backlog at SLOW_APPLY_RATE events per second, SLOW_BATCH at a time.
SLOW_APPLY_RATE = 100
SLOW_BATCH = 20
# Writes node b takes while node a's sidecar is down, in the mesh_status scenario.
BURST_WRITES = 600


async def test_load_balancer_health_mesh_status(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # A full mesh seen from node a, which flags lag above 0.25 s. Relaying, so that b's burst
    # reaches c's stream too and a lags behind both.
    a_slo = {"settings": {"slo": {"max_replication_lag_sec": MAX_LAG_SEC}}}
    async with open_mesh(
        redis_factory,
        tmp_path,
        full_mesh(["a", "b", "c", "d"]),
        common={"settings": {"hot_path": {"relay": True}}},
        overrides={"a": a_slo},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        log = WriteLog()
        for i in range(20):
            await log.put(b, f"early:{i}", b"v")
        await mesh.wait_idle()
        await mesh.wait_converged()
        code, rows = await run_mesh_status(a.config)
        assert code == 0 and set(rows) == {"a", "b", "c", "d"}
        assert not any(row.flags for row in rows.values()), rows

        # d's sidecar stops: d misses everything from now on (divergent). Then a's sidecar
        # stops too, a little later (so a and d hold different data), and b takes a burst of
        # writes that c applies and a does not (a lags).
        await mesh.stop_engine("d")
        for i in range(20):
            await log.put(b, f"middle:{i}", b"v")
        await mesh.wait_idle()
        await mesh.stop_engine("a")
        keys = [f"k:{i}" for i in range(2000)]
        async with writing(Writer(b, log, random.Random(51), keys, BACKLOG_RATE)) as burst:
            await wait_writes(burst, burst.written() + BURST_WRITES)
        await mesh.wait_idle()  # b and c, the running ones
        # status --mesh reads Redis and a's cursor database: it works with a's sidecar down.
        code, rows = await run_mesh_status(a.config)
        assert code == 1
        for peer in ("b", "c"):
            assert rows[peer].flags == {"LAGGING"}, rows[peer]
            assert rows[peer].lag_ms is not None and rows[peer].lag_ms > MAX_LAG_SEC * 1000
        assert rows["b"].root == rows["c"].root == (await b.store.merkle_root()).hex()[:16]
        assert rows["d"].flags == {"DIVERGENT"} and rows["d"].lag_ms == 0, rows["d"]
        assert rows["a"].flags == {"DIVERGENT"}, rows["a"]  # a lags, so its data differs too

        # a's sidecar returns and catches up: no lag left; d stays divergent.
        await mesh.start_engine("a")
        await mesh.wait_idle()
        code, rows = await run_mesh_status(a.config)
        assert code == 1
        assert {n: row.flags for n, row in rows.items()} == {
            "a": frozenset(),
            "b": frozenset(),
            "c": frozenset(),
            "d": {"DIVERGENT"},
        }
        assert all(row.lag_ms == 0 for n, row in rows.items() if n != "a"), rows

        # d's sidecar returns: one root, no flags, exit 0.
        await mesh.start_engine("d")
        await mesh.wait_idle()
        await mesh.wait_converged()
        code, rows = await run_mesh_status(a.config)
        assert code == 0, rows
        assert len({row.root for row in rows.values()}) == 1
        assert not any(row.flags for row in rows.values()), rows


async def test_mesh_status_lag_is_what_the_store_applied_not_a_killed_sidecars_cursor(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # A sidecar killed between two cursor saves leaves its saved cursor behind what its store
    # applied. status --mesh, run while it is down (a load balancer's check), must not call
    # that lag: nothing is missing.
    a_slo = {"settings": {"slo": {"max_replication_lag_sec": MAX_LAG_SEC}}}
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": []}, overrides={"a": a_slo}, engines=["b"]
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        log = WriteLog()
        saved = None
        for round_ in range(2):
            for i in range(20):
                await log.put(b, f"k:{round_}:{i}", b"v")
            await mesh.start_engine("a")
            await mesh.wait_idle()
            await mesh.wait_converged()
            await mesh.stop_engine("a")
            saved = saved or a.saved_cursor("b")
        # Where a kill before the second round's save leaves it: 20 writes short.
        assert saved is not None and saved < a.saved_cursor("b")
        async with await CursorStore.open(a.cursor_path) as cursors:
            await cursors.save("b", str(saved))
        code, rows = await run_mesh_status(a.config)
    assert code == 0, rows
    assert rows["b"].lag_ms == 0 and not rows["b"].flags, rows["b"]


async def test_load_balancer_health_mesh_status_of_a_lagging_follower(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    slow = {
        "mode": "follower",
        "settings": {
            "hot_path": throttled_hot_path(SLOW_APPLY_RATE, SLOW_BATCH),
            "slo": {"max_replication_lag_sec": MAX_LAG_SEC},
        },
    }
    async with open_mesh(
        redis_factory, tmp_path, {"up": [], "f": ["up"]}, overrides={"f": slow}, engines=[]
    ) as mesh:
        log = WriteLog()
        keys = [f"k:{i}" for i in range(1000)]
        # Two seconds of writes: f, replaying them at 100/s, stays seconds behind for a while.
        async with writing(Writer(mesh["up"], log, random.Random(61), keys, 300)) as backlog:
            await wait_writes(backlog, 600)
        await mesh.start_engine("f")

        def lagging_with_a_batch_applied() -> bool:
            # status --mesh reads lag from f's anchor in up's stream: wait for one to be set.
            tailer = mesh["f"].running().tailers.get("up")
            return (
                tailer is not None
                and tailer.stats.batches > 0
                and (tailer.lag_ms or 0) > MAX_LAG_SEC * 1000
            )

        await async_wait_until(
            lagging_with_a_batch_applied, timeout=RECOVERY_S, message="f lags up"
        )
        code, rows = await run_mesh_status(mesh["f"].config)
        assert code == 1 and "LAGGING" in rows["up"].flags
        assert (mesh["f"].tailer("up").lag_ms or 0) > MAX_LAG_SEC * 1000, (
            "f caught up during the check"
        )
        # The upstream is the reference, not the divergent one.
        assert "DIVERGENT" not in rows["up"].flags, rows
