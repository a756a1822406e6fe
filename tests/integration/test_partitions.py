"""A store of many partitions: each key in the partition the functions place it in, each
partition a whole store of its own (items, subtree, stream, clock), the node's root the XOR of
theirs, and on a Redis Cluster the partitions spread over the shards.

The engine does not run such a store yet (it refuses one: issue 16's multi-partition engine);
this is the layer it will stand on, through the same public calls an embedder makes.
"""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from replication_engine.merkle import Geometry, GeometryError
from replication_engine.store.layout import Keyspace
from replication_engine.store.partitioned import PartitionedStore
from replication_engine.store.redis_store import InvalidWriteError, RedisStore
from replication_engine.testing import RedisFactory, RedisHandle
from replication_engine.testing.cluster import redis_cli_binary, start_cluster

PREFIX = "app:"
SPLIT = Geometry(16, 2, 16)


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
    assert "fanout=16 depth=2 leaf" in str(refused.value)
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
        holding = []
        for master in cluster.masters:
            client = Redis(host=master.host, port=master.port)
            try:
                holding.append(await client.dbsize())
            finally:
                await client.aclose()
        # 16 partitions hash to slots owned by all three masters, and each holds a share.
        assert all(n > 50 for n in holding), holding
    finally:
        await store.close()
