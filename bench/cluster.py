"""Catch-up into a node whose store is a Redis Cluster, against one whose store is one Redis.

    python -m bench.cluster [--backlog N] [--repeat K] [--bootstrap-items M]

A standalone peer's stream is preloaded with N events (1 KiB JSON values, as in
``bench.hot_path``). In the same run, one engine (hot path only, relay off, start_from
beginning) applies the whole backlog into a fresh standalone Redis, and another into a fresh
3-master Redis Cluster (``local.cluster: true``), each timed from ``start()`` until its cursor
reaches the tail; the two alternate ``--repeat`` times. Redis CPU per event is the
``used_cpu_sys + used_cpu_user`` delta of the target's servers (every master of the cluster)
over the run, divided by N. With ``--bootstrap-items M``, a cluster peer and a standalone peer
are each loaded with the same M items (100-byte values, through ``put_many``) and a new
standalone node bootstraps from each in turn: time, round trips and bytes read from the peer.
Prints figures; asserts nothing.

With ``--partitions 16`` every store is laid out in 16 partitions (fanout 16, depth 3), the
peer's backlog spread over its 16 streams, and a third target is timed beside the two: a
standalone node of one partition reading a one-partition peer with the same backlog, the
layout a node on one Redis uses. The cluster node's partitions then sit on all three shards.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.hot_path import PREFIX, engine_catch_up, preload, redis_cpu
from harness.mesh import redis_processes
from replication_engine.codec import StreamId
from replication_engine.config import EngineConfig
from replication_engine.engine import ReplicationEngine
from replication_engine.store.partitioned import PartitionedStore
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisHandle, async_wait_until
from replication_engine.testing.cluster import Cluster, start_cluster


async def cpu_seconds(nodes: list[RedisHandle]) -> float:
    total = 0.0
    for node in nodes:
        redis = Redis(host=node.host, port=node.port)
        try:
            total += await redis_cpu(redis)
        finally:
            await redis.aclose()
    return total


async def flush(nodes: list[RedisHandle]) -> None:
    for node in nodes:
        redis = Redis(host=node.host, port=node.port)
        try:
            await redis.flushall()
        finally:
            await redis.aclose()


async def main(args: argparse.Namespace) -> None:
    with (
        tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp,
        redis_processes(Path(tmp)) as make,
    ):
        workdir = Path(tmp)
        split = args.partitions
        peer, standalone = make(), make()
        cluster: Cluster = await asyncio.to_thread(start_cluster, make, masters=3)
        tail, preload_s = await preload(peer.url, args.backlog, "peer", partitions=split)
        print(
            f"backlog: {args.backlog:,} events of 1 KiB JSON in {split} partition(s), preloaded "
            f"in {preload_s:.1f} s"
        )
        targets: list[tuple[str, list[RedisHandle], bool, str, StreamId, int]] = [
            ("standalone", [standalone], False, peer.url, tail, split),
            ("cluster", cluster.masters, True, peer.url, tail, split),
        ]
        if split > 1:
            whole = make()
            whole_tail, _ = await preload(whole.url, args.backlog, "peer")
            targets.append(
                ("standalone, 1 partition", [standalone], False, whole.url, whole_tail, 1)
            )
        results: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in targets}
        for _ in range(args.repeat):
            for name, nodes, is_cluster, source, last, partitions in targets:
                await flush(nodes)
                cpu_before = await cpu_seconds(nodes)
                seconds, _engine = await engine_catch_up(
                    source,
                    nodes[0].url,
                    last,
                    workdir,
                    relay=False,
                    cluster=is_cluster,
                    partitions=partitions,
                )
                cpu = await cpu_seconds(nodes) - cpu_before
                results[name].append((seconds, cpu))
        for name, runs in results.items():
            rates = [args.backlog / s for s, _ in runs]
            cpu_us = [cpu / args.backlog * 1e6 for _, cpu in runs]
            print(
                f"{name:>24}: {statistics.median(rates):>8,.0f} events/s median "
                f"(range {min(rates):,.0f}-{max(rates):,.0f}, {len(runs)} runs); Redis CPU "
                f"{statistics.median(cpu_us):.1f} us/event"
            )
        ratio = statistics.median(args.backlog / s for s, _ in results["cluster"]) / (
            statistics.median(args.backlog / s for s, _ in results["standalone"])
        )
        print(f"cluster / standalone: {ratio:.2f}")
        if args.bootstrap_items:
            await bench_bootstrap(args.bootstrap_items, make, cluster, workdir, args.partitions)


BOOTSTRAP_VALUE_BYTES = 100
# The geometry of a store of 16 partitions here, as bench.hot_path.engine_config lays it out.
SPLIT: dict[str, Any] = {"fanout": 16, "depth": 3}
BOOTSTRAP_PAGE = 1000


async def load(url: str, items: int, *, cluster: bool, partitions: int = 1) -> bytes:
    """``items`` items written through the store's functions; returns the store's root."""
    store: RedisStore | PartitionedStore
    if partitions > 1:
        store = await PartitionedStore.connect(
            url, node_id="peer", prefix=PREFIX, cluster=cluster, partitions=partitions, **SPLIT
        )
    else:
        store = await RedisStore.connect(url, node_id="peer", prefix=PREFIX, cluster=cluster)
    try:
        value = b"v" * BOOTSTRAP_VALUE_BYTES
        for start in range(0, items, BOOTSTRAP_PAGE):
            end = min(items, start + BOOTSTRAP_PAGE)
            await store.put_many([(f"user:{i:08d}", value, "binary") for i in range(start, end)])
        return await store.merkle_root()
    finally:
        await store.close()


async def bootstrap(
    peer_url: str,
    target: RedisHandle,
    want: bytes,
    workdir: Path,
    *,
    cluster: bool,
    partitions: int = 1,
) -> tuple[float, int, int]:
    """Seconds until a new node's root equals the peer's; round trips and bytes read (over
    every partition's reader)."""
    merkle = {**SPLIT, "partitions": partitions} if partitions > 1 else {}
    config = EngineConfig.model_validate(
        {
            "local_node_id": "new",
            "local": {"redis_url": target.url, "prefix": PREFIX},
            "peers": [
                {
                    "node_id": "peer",
                    "redis_url": peer_url,
                    "start_from": "snapshot",
                    "cluster": cluster,
                }
            ],
            "settings": {
                "merkle": merkle,
                "cold_path": {"interval_sec": 3600, "bootstrap_rate_limit_per_sec": 1_000_000},
            },
            "cursor": {"sqlite_path": str(workdir / f"cursors-{time.monotonic_ns()}.db")},
            "http": {"enabled": False},
        }
    )
    engine = ReplicationEngine(config)
    started = time.perf_counter()
    await engine.start()
    try:
        store = engine.store
        assert store is not None

        async def same_root() -> bool:
            return await store.merkle_root() == want

        await async_wait_until(same_root, timeout=600, interval=0.05)
        elapsed = time.perf_counter() - started
        counters = [part.peers["peer"].counter for part in engine.parts.values()]
        trips = sum(counter.round_trips for counter in counters)
        return elapsed, trips, sum(counter.bytes_read for counter in counters)
    finally:
        await engine.shutdown()


async def bench_bootstrap(
    items: int, make: Any, cluster: Cluster, workdir: Path, partitions: int
) -> None:
    standalone_peer = make()
    print(
        f"bootstrap: {items:,} items of {BOOTSTRAP_VALUE_BYTES} B into a new standalone node, "
        f"{partitions} partition(s)"
    )
    for name, url, is_cluster in (
        ("from the cluster peer", cluster.seed.url, True),
        ("from a standalone peer", standalone_peer.url, False),
    ):
        # The same keys and values; each store stamps its own HLCs, so each has its own root.
        # The cluster held the catch-up runs' node: it starts empty for this one.
        await flush(cluster.masters if is_cluster else [standalone_peer])
        want = await load(url, items, cluster=is_cluster, partitions=partitions)
        target = make()
        seconds, trips, read = await bootstrap(
            url, target, want, workdir, cluster=is_cluster, partitions=partitions
        )
        target.kill()
        print(
            f"  {name:<24} {seconds:6.1f} s, {items / seconds:9,.0f} items/s, {trips:,} round "
            f"trips, {read / 1e6:,.1f} MB read"
        )


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bootstrap-items", type=int, default=0, help="0: no bootstrap run")
    parser.add_argument(
        "--partitions", type=int, default=1, choices=(1, 16), help="partitions of every store"
    )
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    run()
