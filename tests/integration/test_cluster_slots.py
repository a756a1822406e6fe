"""Format 2's promise on a real Redis Cluster: every script and function call touches one slot.

A Cluster refuses a call whose keys span slots (CROSSSLOT) and a script that touches keys of
another node's slots. So the store's calls are made here through redis-py's ``RedisCluster``
against three masters: each call must route by the key it declares and find every other key it
touches on the same node. This checks the format call by call;
tests/integration/test_cluster_node.py runs the engines on a cluster.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator

import pytest
import xxhash
from redis.asyncio.cluster import RedisCluster

from replication_engine.codec import Change
from replication_engine.connection import Failure, failure
from replication_engine.store.protocol import StreamBatch
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisFactory, find_redis_server, wait_until
from replication_engine.testing.cluster import (
    Cluster,
    redis_cli_binary,
    slot_owner,
    start_cluster,
)
from replication_engine.testing.redis_proc import redis_server_version

pytestmark = pytest.mark.skipif(
    redis_cli_binary() is None, reason="no redis-cli binary to create a cluster with"
)
PREFIX = "app:"


@pytest.fixture
def cluster(redis_factory: RedisFactory) -> Cluster:
    return start_cluster(redis_factory, masters=3)


@pytest.fixture
async def store(cluster: Cluster) -> AsyncIterator[RedisStore]:
    client = RedisCluster(host=cluster.seed.host, port=cluster.seed.port)
    await client.initialize()
    # RedisCluster speaks the same commands as a Redis client, routed by key.
    opened = RedisStore(client, node_id="a", prefix=PREFIX)  # type: ignore[arg-type]
    await opened.check_geometry()
    await opened.load_functions()
    yield opened
    await client.aclose()


def _change(key: str, hlc: int, *, tombstone: bool = False) -> Change:
    data = b"" if tombstone else f"{key}@{hlc}".encode()
    return Change(
        key=key,
        hlc=hlc << 16,
        origin="b",
        tombstone=tombstone,
        data=data,
        content_hash="" if tombstone else xxhash.xxh3_128_hexdigest(data),
        content_type="text/plain",
        version=1,
        updated_at=hlc,
    )


async def test_every_store_call_routes_to_one_slot_of_a_three_shard_cluster(
    store: RedisStore, cluster: Cluster
) -> None:
    # Local writes through the functions.
    await store.put("user:1", b"hello", "text/plain")
    await store.put_many([(f"k{i}", b"v", "t") for i in range(20)])
    await store.delete("k1")
    item = await store.get("user:1")
    assert item is not None and item.value == b"hello"
    assert (await store.get_version("k1")).tombstone  # type: ignore[union-attr]
    # The record, the apply path with a stream's anchor and claims, the clock.
    _, incarnation, _ = await store.open_record(mode="mesh", relay=True)
    source = StreamBatch("b", "tok", f"{0:020d}-{0:020d}", f"{1:020d}-{0:020d}", "f", {"b": 9})
    statuses = await store.apply_batch([_change("remote", 5), _change("gone", 6, tombstone=True)])
    assert len(statuses) == 2
    prepared = store.prepare_apply([_change("more", 7)], relay=False)
    await store.apply_prepared(prepared, source=source)
    await store.raise_clock(10 << 16)
    cert = await store.certify(
        expected_run="",
        expected_nonces=[],
        nonce="n1",
        advance=True,
        state="ok",
    )
    # Knowledge: inherit, members, forget barriers, collection, discards.
    await store.inherit(
        peer="b",
        token="tok",
        tail=f"{1:020d}-{0:020d}",
        incarnation=incarnation,
        cert=cert.cert,
        claims={"b": 3 << 16},
    )
    await store.add_to_record(members=["a", "b"], forgotten=["c"])
    await store.claim_all_writes(["c"], incarnation=incarnation, cert=cert.cert)
    await store.collect_tombstones(7 << 16, incarnation=incarnation, cert=cert.cert)
    await store.discard_versions(
        [("remote", 5 << 16, "b")], incarnation=incarnation, cert=cert.cert
    )
    # Reads of the tree, the items, the stream, and the scrub's check and fix.
    root = await store.merkle_root()
    keys = sorted([v.key async for v in store.versions()])
    assert "user:1" in keys and "remote" not in keys
    assert root != bytes(16) and await store.stream_tail() is not None
    record = await store.record()
    assert record is not None and record.members >= {"a", "b"}
    for parent in store.leaf_parents()[:3]:
        assert await store.scrub(parent, fix=True) == 0
    assert await store.tombstone_count() >= 0
    # Everything of the store's data shares the partition's slot: one node holds it all.
    holders = [n.port for n in cluster.masters if n.client().dbsize() > 1]
    assert len(holders) == 1, holders


async def test_redis_cli_in_cluster_mode_writes_through_the_functions(
    store: RedisStore, cluster: Cluster
) -> None:
    cli = redis_cli_binary()
    assert cli is not None
    if redis_server_version(find_redis_server())[0] < 7:
        pytest.skip("Redis before 7.0 has no FCALL (the store's calls above ran as scripts)")
    item = store.keys.item("user:42")
    written = subprocess.run(  # noqa: ASYNC221 - a client process, waited for
        [cli, "-c", "-p", str(cluster.seed.port), "FCALL", "re_put", "1", item, "Ada", "text"],
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert len(written.stdout.split()) == 2, written
    got = await store.get("user:42")
    assert got is not None and (got.value, got.content_type) == (b"Ada", "text")


async def test_a_cluster_that_is_down_fails_an_apply_whole_and_refuses_no_item(
    store: RedisStore, cluster: Cluster
) -> None:
    """A master gone (no replica to promote): the cluster says CLUSTERDOWN to every call,
    whatever its slot. That is the store being unavailable, retried whole, and no item's
    fault: none may be marked refused (and so quarantined) for it."""
    home = slot_owner(cluster, store.partition_slot())
    other = next(n for n in cluster.masters if n.port != home.port)
    other.kill()

    def down() -> bool:
        with home.client() as client:
            return client.cluster("info").get("cluster_state") == "fail"

    await asyncio.to_thread(wait_until, down, timeout=30, message="cluster_state:fail")
    with pytest.raises(Exception) as raised:
        await store.apply_batch([_change("x", 5), _change("y", 6), _change("z", 7)])
    # What the tailer waits out (the local breaker counts it), not an item's refusal.
    assert failure(raised.value) is Failure.UNAVAILABLE, raised.value
