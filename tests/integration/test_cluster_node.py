"""A store node on a Redis Cluster, peered with a standalone node, through the real engines.

The cluster is three masters with a replica each, made of ``redis-server`` processes
(``replication_engine.testing.cluster``). One node's store is the cluster
(``local.cluster: true``), the other's a standalone Redis; each reads the other
(``peers[].cluster``). Format 2 keeps a store in one
partition, so its data lives on one shard (the master of partition 0's slot): these tests show
the engine follows that shard through a failover and a slot migration, losing nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from harness.mesh import (
    Mesh,
    MeshNode,
    WriteLog,
    count_sends,
    expected_snapshot,
    open_mesh,
    snapshot,
)
from harness.proxy import TcpProxy
from replication_engine.connection import _CancelSafeSend
from replication_engine.observability.metrics import Metrics
from replication_engine.peer import Peer
from replication_engine.store.redis_store import NotReplicatedError, RedisStore
from replication_engine.testing import RedisFactory, async_wait_until
from replication_engine.testing.cluster import (
    Cluster,
    migrate_slot,
    redis_cli_binary,
    replicas_of,
    slot_owner,
    start_cluster,
)

pytestmark = pytest.mark.skipif(
    redis_cli_binary() is None, reason="no redis-cli binary to create a cluster with"
)

SETTLE_S = 60.0
# Writes per node during a failover or a migration (paced, so the fault lands mid-stream).
WRITES_DURING_FAULT = 300
COMMON: dict[str, Any] = {
    "settings": {
        "cold_path": {"enabled": True, "interval_sec": 0.5},
        "membership": {"interval_sec": 0.2},
    }
}


@pytest.fixture
def cluster(redis_factory: RedisFactory) -> Cluster:
    # Every write fsynced, so a whole shard that goes down comes back with what it acknowledged.
    return start_cluster(
        redis_factory, masters=3, replicas=1, appendonly=True, appendfsync="always"
    )


@pytest.fixture
async def mesh(
    redis_factory: RedisFactory, tmp_path: Path, cluster: Cluster
) -> AsyncIterator[Mesh[MeshNode]]:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"c": ["s"], "s": ["c"]},
        clusters={"c": cluster},
        common=COMMON,
        peer_options={"*": {"circuit_reset_timeout_sec": 1}},
    ) as opened:
        yield opened


async def write_both(
    mesh: Mesh[MeshNode], log: WriteLog, count: int, tag: str, *, retry_s: float = SETTLE_S
) -> None:
    """``count`` puts on each node (every fifth a delete of an earlier key), paced a little.

    A write to the cluster during a failover may fail until the replica takes over; it is
    retried, and only acknowledged writes are logged, as an application would see them.
    """
    for i in range(count):
        for node in ("c", "s"):
            key = f"{tag}:{node}:{i // 5 if i % 5 == 4 else i}"
            deadline = time.monotonic() + retry_s
            while True:
                try:
                    if i % 5 == 4:
                        await log.delete(mesh[node], key)
                    else:
                        await log.put(mesh[node], key, f"{node}-{i}".encode())
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)  # pacing a retry, not a synchronisation
        await asyncio.sleep(0.002)  # pacing: spreads the writes across the fault


async def wait_promoted(cluster: Any, slot: int, old: Any, message: str) -> None:
    """Wait until a node other than ``old`` owns ``slot`` (its replica took over)."""

    def promoted() -> bool:
        try:
            return bool(slot_owner(cluster, slot).port != old.port)
        except Exception:
            return False

    await async_wait_until(promoted, timeout=SETTLE_S, interval=0.1, message=message)


async def assert_everything_arrived(mesh: Mesh[MeshNode], log: WriteLog) -> None:
    await mesh.wait_converged(SETTLE_S)
    want = expected_snapshot(log.writes)
    for node in ("c", "s"):
        got = await snapshot(mesh[node].store)
        lost = sorted(k for k in want if got.get(k) != want[k])
        assert not lost, f"{node} lacks {len(lost)} acknowledged writes, e.g. {lost[:5]}"


async def test_a_cluster_node_and_a_standalone_node_converge(
    mesh: Mesh[MeshNode], cluster: Cluster
) -> None:
    log = WriteLog()
    await write_both(mesh, log, 200, "w")
    await assert_everything_arrived(mesh, log)
    # The cluster client's connections are the cancel-safe ones (redis-py picks its own).
    connections = [c for n in mesh["c"].store.redis.get_nodes() for c in n._connections]  # type: ignore[attr-defined]
    assert connections and all(isinstance(c, _CancelSafeSend) for c in connections)
    # The store's data is in partition 0's slot: one shard holds all of it.
    slot = mesh["c"].store.partition_slot()
    holders = [n.port for n in cluster.masters if n.client().dbsize() > 2]
    assert holders == [slot_owner(cluster, slot).port], holders


async def test_a_cluster_peer_reached_through_an_address_table_is_cut_off_whole(
    redis_factory: RedisFactory, tmp_path: Path, cluster: Cluster
) -> None:
    """A reader that reaches the cluster at other addresses than the ones its nodes announce
    (``cluster_addresses``; here a proxy per node, as NAT or a tunnel would give) connects only
    through them: cutting them stops every read of the cluster, nothing written meanwhile
    arrives, and once they heal everything does."""
    nodes = [*cluster.masters, *cluster.replicas]
    proxies = [TcpProxy(n.host, n.port) for n in nodes]
    for proxy in proxies:
        await proxy.start()
    table = {
        f"{n.host}:{n.port}": f"{p.host}:{p.port}" for n, p in zip(nodes, proxies, strict=True)
    }
    through_proxies = {"redis_url": proxies[0].url_for(), "cluster_addresses": table}
    try:
        async with open_mesh(
            redis_factory,
            tmp_path,
            {"c": ["s"], "s": ["c"]},
            clusters={"c": cluster},
            common=COMMON,
            peer_options={"*": {"circuit_reset_timeout_sec": 1}, "s": through_proxies},
        ) as mesh:
            log = WriteLog()
            await write_both(mesh, log, 20, "before")
            await assert_everything_arrived(mesh, log)
            assert sum(p.stats.connections for p in proxies) > 0, "s read c through the proxies"

            for proxy in proxies:
                proxy.cut()
            during = [f"during:{i}" for i in range(50)]
            for key in during:
                await log.put(mesh["c"], key, b"v")
            await async_wait_until(
                lambda: not mesh["s"].peer_status("c")["connected"],
                timeout=SETTLE_S,
                message="s lost its link to c",
            )
            held = await snapshot(mesh["s"].store)
            arrived = [k for k in during if k in held]
            assert not arrived, f"{len(arrived)} writes reached s past the cut links"

            for proxy in proxies:
                proxy.heal()
            await assert_everything_arrived(mesh, log)
    finally:
        for proxy in proxies:
            await proxy.stop()


def _connections(peer: Peer) -> list[Any]:
    client: Any = peer.query
    if hasattr(client, "get_nodes"):  # a cluster client: each node keeps its own
        return [c for node in client.get_nodes() for c in node._connections]
    pool = client.connection_pool
    return [*pool._available_connections, *pool._in_use_connections]


async def test_the_equality_check_is_one_round_trip_against_a_cluster_as_against_one_redis(
    mesh: Mesh[MeshNode], cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cold path's in-sync check reads a peer's record, stream facts and root in one
    pipeline: against a cluster peer it is still one write to one socket (the partition's
    master's), counted here at the connections of a peer object of its own."""
    log = WriteLog()
    await write_both(mesh, log, 20, "w")
    await assert_everything_arrived(mesh, log)
    sends = count_sends(monkeypatch)
    trips = {}
    for peer_id, url, is_cluster in (
        ("c", cluster.seed.url, True),
        ("s", mesh["s"].server.url, False),
    ):
        peer = Peer(
            peer_id,
            url,
            prefix=mesh[peer_id].store.keys.prefix,
            metrics=Metrics(),
            cluster=is_cluster,
        )
        try:
            await peer.snapshot_facts()  # connects (and reads a cluster's topology) first
            sends.clear()
            _record, _stream, root = await peer.snapshot_facts()
            assert root == await mesh[peer_id].store.merkle_root()
            mine = {id(c) for c in _connections(peer)}
            trips[peer_id] = sum(1 for sent in sends if sent in mine)
        finally:
            await peer.close()
    assert trips == {"c": 1, "s": 1}, trips


async def test_a_master_failover_under_writes_loses_nothing_the_cluster_kept(
    mesh: Mesh[MeshNode], cluster: Cluster
) -> None:
    """The master of the partition's slot is killed mid-writes; its replica is promoted by the
    cluster. Writes on the cluster node retry until it has; the engines follow the new master
    (the tailer reads the partition's stream there, from its cursor) and converge. A write the
    old master acknowledged but had not yet sent to its replica is lost by Redis itself (see
    README, "Redis Cluster"): the check is that the two nodes end with the same data and that
    every write acknowledged by the standalone node, and every write the cluster kept, is on
    both."""
    slot = mesh["c"].store.partition_slot()
    old = slot_owner(cluster, slot)
    log = WriteLog()
    writer = asyncio.create_task(write_both(mesh, log, WRITES_DURING_FAULT, "f"))
    await async_wait_until(lambda: len(log.writes) >= 100, timeout=SETTLE_S, message="writes")
    old.kill()
    started = time.monotonic()

    await wait_promoted(cluster, slot, old, "replica promoted")
    await writer
    await mesh.wait_converged(SETTLE_S)
    converged_s = time.monotonic() - started
    final = await snapshot(mesh["s"].store)
    assert final == await snapshot(mesh["c"].store)
    # Keys are written by one node each: s's must all be there, exactly as acknowledged.
    assert {k: v for k, v in final.items() if k.startswith("f:s:")} == expected_snapshot(
        log.by_node("s")
    )
    acked_on_cluster = expected_snapshot(log.by_node("c"))
    lost_by_redis = [k for k, v in acked_on_cluster.items() if final.get(k) != v]
    print(
        f"\nfailover: {len(log.writes)} writes acknowledged, converged {converged_s:.1f}s "
        f"after the kill; {len(lost_by_redis)} of the cluster's acknowledged writes lost by "
        f"Redis's asynchronous replication"
    )


async def test_a_slot_migration_under_writes_loses_nothing(
    mesh: Mesh[MeshNode], cluster: Cluster
) -> None:
    """The partition's slot moves to another master, key batch by key batch as
    ``redis-cli --cluster reshard`` moves it, while both nodes write: the store's calls meet
    ASK and TRYAGAIN meanwhile, nothing acknowledged is lost and the mesh converges."""
    slot = mesh["c"].store.partition_slot()
    source = slot_owner(cluster, slot)
    target = next(n for n in cluster.masters if n.port != source.port)
    log = WriteLog()
    writer = asyncio.create_task(write_both(mesh, log, WRITES_DURING_FAULT, "m"))
    await async_wait_until(lambda: len(log.writes) >= 100, timeout=SETTLE_S, message="writes")
    moved = await asyncio.to_thread(migrate_slot, cluster, slot, source, target)
    assert moved > 0
    assert slot_owner(cluster, slot).port == target.port
    await writer
    await assert_everything_arrived(mesh, log)


async def test_a_write_that_waits_for_a_replica_is_on_it_when_put_returns(
    mesh: Mesh[MeshNode], cluster: Cluster
) -> None:
    """``put(replicas=1)`` returns once the partition master's replica has the write (``WAIT``
    on the connection that made it, not the cluster client's every-master ``WAIT``)."""
    store = mesh["c"].store
    (replica,) = replicas_of(cluster, slot_owner(cluster, store.partition_slot()))
    for i in range(20):
        await store.put(f"durable:{i}", b"on two servers", replicas=1)
        with replica.client() as client:
            client.execute_command("READONLY")
            assert client.exists(store.keys.item(f"durable:{i}")), i
    await store.delete("durable:0", replicas=1)
    hlcs = await store.put_many([(f"many:{i}", b"v", "t") for i in range(50)], replicas=1)
    assert len(hlcs) == 50
    # A replica that does not answer: the write is made, on the master alone, and says so.
    replica.pause()
    try:
        with pytest.raises(NotReplicatedError) as caught:
            await store.put("lonely", b"master only", replicas=1, replica_timeout_sec=0.3)
    finally:
        replica.resume()
    assert caught.value.replicas == 0 and len(caught.value.hlcs) == 1
    item = await store.get("lonely")
    assert item is not None and item.hlc == caught.value.hlcs[0]


async def test_the_whole_shard_down_and_back_loses_nothing(
    mesh: Mesh[MeshNode], cluster: Cluster
) -> None:
    """The partition's master and its replica both go down (the cluster cannot serve the slot)
    while the standalone node keeps writing; they come back from their AOF, and the mesh
    converges with every acknowledged write of either node."""
    log = WriteLog()
    await write_both(mesh, log, 50, "before")
    slot = mesh["c"].store.partition_slot()
    master = slot_owner(cluster, slot)
    (replica,) = replicas_of(cluster, master)
    replica.kill()
    master.kill()
    for i in range(100):
        await log.put(mesh["s"], f"during:{i}", b"written while the shard is down")

    async def down_seen() -> bool:
        engine = mesh["c"].running()
        return engine.status()["local_circuit"] != "closed"

    await async_wait_until(down_seen, timeout=SETTLE_S, message="c's local breaker opens")
    await asyncio.to_thread(master.restart)
    await asyncio.to_thread(replica.restart)
    await assert_everything_arrived(mesh, log)


async def test_a_cluster_peer_s_first_call_can_be_a_ping(cluster: Cluster) -> None:
    """A peer's health ping goes to the partition's master, which the client must look up in
    a topology it may not have read yet (the ping can come before any read)."""
    peer = Peer("c", cluster.seed.url, prefix="app:", metrics=Metrics(), cluster=True)
    try:
        await peer.ping()
        assert peer.connected and peer.last_error is None
    finally:
        await peer.close()


async def test_writes_that_wait_for_a_replica_follow_a_failover(cluster: Cluster) -> None:
    """``put(replicas=1)`` borrows a connection of the slot's master past redis-py's routing;
    after that master dies, its failure re-reads the topology, so a retried write reaches the
    promoted replica even when nothing else uses the client."""
    store = await RedisStore.connect(cluster.seed.url, node_id="c", prefix="app:", cluster=True)
    try:
        await store.put("k", b"before", replicas=1)
        slot = store.partition_slot()
        old = slot_owner(cluster, slot)
        old.kill()

        await wait_promoted(cluster, slot, old, "promoted")
        await asyncio.to_thread(old.restart)  # back as the new master's replica

        async def written() -> bool:
            await store.put("k", b"after", replicas=1)
            return True

        await async_wait_until(
            written, timeout=SETTLE_S, interval=0.2, ignore=(Exception,), message="put after"
        )
        item = await store.get("k")
        assert item is not None and item.value == b"after"
    finally:
        await store.close()
