"""A store of many partitions: each key in the partition the functions place it in, each
partition a whole store of its own (items, subtree, stream, clock), the node's root the XOR of
theirs, and on a Redis Cluster the partitions spread over the shards.

Then the engines: a node of many partitions runs a tailer, a repair, a membership and a scrub
per partition (``ReplicationEngine.parts``), through the real path between real servers.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from harness.mesh import (
    Mesh,
    MeshNode,
    WriteLog,
    count_sends,
    expected_snapshot,
    metric,
    open_mesh,
    snapshot,
)
from replication_engine.merkle import Geometry, GeometryError
from replication_engine.observability.metrics import Metrics
from replication_engine.peer import Peer
from replication_engine.store.layout import Keyspace
from replication_engine.store.partitioned import PartitionedStore
from replication_engine.store.redis_store import InvalidWriteError, RedisStore
from replication_engine.testing import RedisFactory, RedisHandle, async_wait_until
from replication_engine.testing.cluster import (
    Cluster,
    redis_cli_binary,
    slot_owner,
    start_cluster,
)

PREFIX = "app:"
SPLIT = Geometry(16, 2, 16)


async def keys_per_master(cluster: Cluster) -> list[int]:
    holding = []
    for master in cluster.masters:
        client = Redis(host=master.host, port=master.port)
        try:
            holding.append(await client.dbsize())
        finally:
            await client.aclose()
    return holding


async def _open(url: str, **options: object) -> PartitionedStore:
    return await PartitionedStore.connect(
        url, node_id="a", prefix=PREFIX, fanout=16, depth=2, partitions=16, **options
    )


async def test_each_key_lives_whole_in_its_own_partition(redis_server: RedisHandle) -> None:
    store = await _open(redis_server.url)
    try:
        keys = [f"user:{i}" for i in range(200)]
        hlcs = await store.put_many([(k, f"v{k}", "text/plain") for k in keys])
        assert len(hlcs) == 200 and all(hlcs)
        await store.delete("user:7")
        redis = store.redis
        for key in keys:
            part = SPLIT.partition_of(key)
            home = Keyspace(PREFIX, part)
            assert await redis.exists(home.item(key)) == 1
            assert await redis.hexists(home.node(SPLIT.leaf_path(key)), key)
            others = [Keyspace(PREFIX, p).item(key) for p in SPLIT.partition_names if p != part]
            assert await redis.exists(*others) == 0
        # Each partition streamed its own writes and nothing else.
        for name in SPLIT.partition_names:
            entries = await redis.xrange(Keyspace(PREFIX, name).cdc)
            assert {SPLIT.partition_of(f[b"key"].decode()) for _, f in entries} <= {name}
        assert (
            sum([await redis.xlen(Keyspace(PREFIX, p).cdc) for p in SPLIT.partition_names]) == 201
        )
        item = await store.get("user:3")
        assert item is not None and item.value == b"vuser:3"
        assert await store.get("user:7") is None
        assert len([i async for i in store.items()]) == 199
    finally:
        await store.close()


async def test_the_nodes_root_is_the_root_one_partition_holding_the_same_versions_has(
    redis_factory: RedisFactory,
) -> None:
    store = await _open(redis_factory().url)
    whole = await RedisStore.connect(
        redis_factory().url, node_id="b", prefix=PREFIX, fanout=16, depth=2
    )
    try:
        await store.put_many([(f"k{i}", f"v{i}", "t") for i in range(300)])
        await store.delete("k1")
        versions = [v async for v in store.versions()]
        assert len(versions) == 300
        await whole.apply_batch(versions, relay=False)
        root = await store.merkle_root()
        assert root != bytes(16) and root == await whole.merkle_root()
    finally:
        await store.close()
        await whole.close()


async def test_a_bad_write_among_many_partitions_writes_nothing_anywhere(
    redis_server: RedisHandle,
) -> None:
    store = await _open(redis_server.url)
    try:
        with pytest.raises(InvalidWriteError):
            await store.put_many([(f"k{i}", "v", "t") for i in range(50)] + [("", "v", "t")])
        assert await store.redis.dbsize() == 1 + 16  # the layout and each partition's meta
    finally:
        await store.close()


async def test_a_store_opened_with_another_partition_count_is_refused_naming_both(
    redis_server: RedisHandle,
) -> None:
    store = await _open(redis_server.url)
    await store.close()
    with pytest.raises(GeometryError, match="partitions=16") as refused:
        await RedisStore.connect(redis_server.url, node_id="a", prefix=PREFIX, fanout=16, depth=2)
    assert "fanout=16 depth=2 partitions=1 leaf" in str(refused.value)
    reopened = await _open(redis_server.url)  # the same layout opens again
    await reopened.close()


@pytest.mark.skipif(redis_cli_binary() is None, reason="no redis-cli binary to build a cluster")
async def test_on_a_cluster_the_partitions_spread_over_every_shard(
    redis_factory: RedisFactory,
) -> None:
    cluster = start_cluster(redis_factory, masters=3)
    store = await _open(f"redis://{cluster.seed.host}:{cluster.seed.port}/0", cluster=True)
    try:
        keys = [f"user:{i}" for i in range(300)]
        hlcs = await store.put_many([(k, k, "t") for k in keys])
        assert len(hlcs) == 300 and all(hlcs)
        for key in keys[:20]:
            item = await store.get(key)
            assert item is not None and item.value == key.encode()
        holding = await keys_per_master(cluster)
        # 16 partitions hash to slots owned by all three masters, and each holds a share.
        assert all(n > 50 for n in holding), holding
    finally:
        await store.close()


# ------------------------------------------------------------------------------ engines

SETTLE_S = 60.0
SPLIT_SETTINGS: dict[str, Any] = {
    "settings": {
        "merkle": {"fanout": 16, "depth": 2, "partitions": 16},
        "cold_path": {"enabled": True, "interval_sec": 0.5},
        "membership": {"interval_sec": 0.2},
    }
}


async def _write_both(mesh: Mesh[MeshNode], log: WriteLog, count: int, tag: str) -> None:
    """``count`` puts on each node, every fifth a delete of an earlier key."""
    for i in range(count):
        for node in ("a", "b"):
            key = f"{tag}:{node}:{i // 5 if i % 5 == 4 else i}"
            if i % 5 == 4:
                await log.delete(mesh[node], key)
            else:
                await log.put(mesh[node], key, f"{node}-{i}".encode())


async def _held_anywhere(mesh: Mesh[MeshNode], keys: list[str]) -> list[str]:
    """Which of ``keys`` some node still holds a version of (a tombstone not collected)."""
    held = []
    for key in keys:
        for node in ("a", "b"):
            if await mesh[node].store.get_version(key) is not None:
                held.append(key)
                break
    return held


async def test_two_nodes_of_many_partitions_converge_and_collect_their_deletes(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """Each partition is read, repaired, certified and collected on its own: writes on both
    nodes arrive, each partition's cursor is its own, and a delete's tombstone is collected
    once both nodes' records for its partition say they hold it."""
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": ["a"]}, common=SPLIT_SETTINGS
    ) as mesh:
        log = WriteLog()
        await _write_both(mesh, log, 100, "k")
        await mesh.wait_converged(SETTLE_S)
        want = expected_snapshot(log.writes)
        for node in ("a", "b"):
            assert await snapshot(mesh[node].store) == want
        # Every partition has its own engine parts and its own cursor in the one database.
        engine = mesh["a"].running()
        assert sorted(engine.parts) == SPLIT.partition_names
        lanes = set(mesh["a"].saved_cursors())
        assert lanes <= {f"b{{{p}}}" for p in SPLIT.partition_names} and len(lanes) >= 8
        # Deleted keys: the tombstones go once both records of their partition cover them.
        deleted = sorted({w.key for w in log.writes if w.value is None})
        assert deleted

        async def collected() -> bool:
            return not await _held_anywhere(mesh, deleted)

        await mesh.wait_for(collected, SETTLE_S)
        status = engine.status()
        assert status["partitions"] == 16 and set(status["membership"]) == set(
            SPLIT.partition_names
        )
        assert status["peers"]["b"]["mode"] == "tailing"
        ready, why = engine.readiness()
        assert ready, why
        # The harness sees each partition's tailer at its own stream's tail.
        await mesh.wait_idle(SETTLE_S)


async def test_a_restart_resumes_every_partition_from_its_own_cursor(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": ["a"]}, common=SPLIT_SETTINGS
    ) as mesh:
        log = WriteLog()
        await _write_both(mesh, log, 40, "one")
        await mesh.wait_converged(SETTLE_S)
        before = mesh["a"].saved_cursors()
        await mesh.stop_engine("a")
        await _write_both(mesh, log, 40, "two")  # a's store takes writes while its engine is down
        engine = await mesh.start_engine("a")
        await mesh.wait_converged(SETTLE_S)
        assert await snapshot(mesh["a"].store) == expected_snapshot(log.writes)
        # Nothing was copied again: every partition resumed from where it stopped.
        assert metric(engine, "replication_bootstraps_total") == 0
        after = mesh["a"].saved_cursors()
        assert all(after[lane] >= cursor for lane, cursor in before.items())


async def test_a_peer_laid_out_in_another_number_of_partitions_is_refused_both_ways(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """A partition of a store of 16 holds a sixteenth of the keys, and its record's claims
    cover only those: read as a whole store (or a whole store read as one partition), its
    claims would be wrong. Nothing is applied or claimed from such a peer, on either path,
    and the reason is in the status."""
    one = {"settings": {"merkle": {"partitions": 1}}}
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": ["a"]},
        common=SPLIT_SETTINGS,
        overrides={"b": one},
    ) as mesh:
        await mesh["a"].store.put("from-a", b"1")
        await mesh["b"].store.put("from-b", b"2")

        def refused(node: str, peer: str, lane: str) -> bool:
            engine = mesh[node].running()
            error = engine.tailer_errors.get(f"tailer:{lane}") or ""
            repair = (engine.status()["peers"][peer].get("partitions") or {}).get("0", {})
            cold = engine.status()["peers"][peer].get("repair") or repair.get("repair") or {}
            return "PeerLayoutError" in error and "partition" in str(cold)

        await async_wait_until(lambda: refused("a", "b", "b{0}"), timeout=SETTLE_S)
        await async_wait_until(lambda: refused("b", "a", "a"), timeout=SETTLE_S)
        assert await mesh["a"].store.get("from-b") is None
        assert await mesh["b"].store.get("from-a") is None
        assert (
            "16 partition(s), this node reads stores of 1"
            in mesh["b"].running().tailer_errors["tailer:a"]
        )


@pytest.mark.skipif(redis_cli_binary() is None, reason="no redis-cli binary to build a cluster")
async def test_a_cluster_node_of_many_partitions_spreads_over_its_shards_and_converges(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    cluster = start_cluster(redis_factory, masters=3)
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"c": ["s"], "s": ["c"]},
        clusters={"c": cluster},
        common=SPLIT_SETTINGS,
    ) as mesh:
        log = WriteLog()
        for i in range(150):
            node = ("c", "s")[i % 2]
            if i % 7 == 6:
                await log.delete(mesh[node], f"k{i - 3}")
            else:
                await log.put(mesh[node], f"k{i}", f"{node}{i}".encode())
        await mesh.wait_converged(SETTLE_S)
        for node in ("c", "s"):
            assert await snapshot(mesh[node].store) == expected_snapshot(log.writes)
        holding = await keys_per_master(cluster)
        assert all(n > 20 for n in holding), holding


@pytest.mark.skipif(redis_cli_binary() is None, reason="no redis-cli binary to build a cluster")
async def test_a_failover_sends_only_the_dead_shards_partitions_into_recovery(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """One master of the cluster node is killed mid-writes and its replica promoted. Only the
    partitions whose slots it held may have lost writes, so only they recover (their Redis
    has another run_id); the others go on as if nothing happened. The mesh converges, with
    every write the standalone node acknowledged on both nodes."""
    cluster = start_cluster(
        redis_factory, masters=3, replicas=1, appendonly=True, appendfsync="always"
    )
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"c": ["s"], "s": ["c"]},
        clusters={"c": cluster},
        common=SPLIT_SETTINGS,
        peer_options={"*": {"circuit_reset_timeout_sec": 1}},
    ) as mesh:
        store = mesh["c"].store
        assert isinstance(store, PartitionedStore)
        victim = slot_owner(cluster, store.partitions["0"].partition_slot())
        on_victim = {
            name
            for name, part in store.partitions.items()
            if slot_owner(cluster, part.partition_slot()).port == victim.port
        }
        assert 0 < len(on_victim) < 16
        log = WriteLog()

        async def write(count: int) -> None:
            for i in range(count):
                for node in ("c", "s"):
                    deadline = time.monotonic() + SETTLE_S
                    while True:
                        try:
                            await log.put(mesh[node], f"w:{node}:{i}", f"{node}{i}".encode())
                            break
                        except Exception:
                            if time.monotonic() > deadline:
                                raise
                            await asyncio.sleep(0.05)  # pacing a retry, not a synchronisation

        writer = asyncio.create_task(write(300))
        await async_wait_until(lambda: len(log.writes) >= 100, timeout=SETTLE_S)
        victim.kill()
        await writer
        await mesh.wait_converged(SETTLE_S)
        final = await snapshot(mesh["s"].store)
        assert final == await snapshot(mesh["c"].store)
        assert {k: v for k, v in final.items() if k.startswith("w:s:")} == expected_snapshot(
            log.by_node("s")
        )
        engine = mesh["c"].running()
        recovered = {
            name
            for name in SPLIT.partition_names
            if metric(engine, "replication_recoveries_total", partition=name) > 0
        }
        assert recovered and recovered <= on_victim, (recovered, on_victim)


@pytest.mark.skipif(redis_cli_binary() is None, reason="no redis-cli binary to build a cluster")
async def test_the_equality_check_of_16_partitions_is_one_round_trip_per_shard(
    redis_factory: RedisFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every partition's repair cycle reads its peer's record, stream facts and root: asked
    together (the cycles start on one beat), they go in one pipeline, one write per shard's
    socket against a cluster and one against a single Redis."""
    cluster = start_cluster(redis_factory, masters=3)
    single = redis_factory()
    for url, is_cluster in ((cluster.seed.url, True), (single.url, False)):
        store = await _open(url, cluster=is_cluster)
        await store.put_many([(f"k{i}", "v", "t") for i in range(100)])
        await store.close()
    sends = count_sends(monkeypatch)
    trips = {}
    for name, url, is_cluster in (("cluster", cluster.seed.url, True), ("one", single.url, False)):
        peer = Peer("a", url, prefix=PREFIX, metrics=Metrics(), cluster=is_cluster, partitions=16)
        views = [peer.partition(p) for p in SPLIT.partition_names]
        try:
            # Connects to every master (and reads a cluster's topology) first.
            await asyncio.gather(*(view.snapshot_facts() for view in views))
            sends.clear()
            facts = await asyncio.gather(*(view.snapshot_facts() for view in views))
            assert all(root != bytes(16) for _record, _stream, root in facts)
            trips[name] = len(sends)
        finally:
            await peer.close()
    assert trips == {"cluster": 3, "one": 1}, trips
