"""Catch-up into a node whose store is a Redis Cluster, against one whose store is one Redis.

    python -m bench.cluster [--backlog N] [--repeat K]

A standalone peer's stream is preloaded with N events (1 KiB JSON values, as in
``bench.hot_path``). In the same run, one engine (hot path only, relay off, start_from
beginning) applies the whole backlog into a fresh standalone Redis, and another into a fresh
3-master Redis Cluster (``local.cluster: true``), each timed from ``start()`` until its cursor
reaches the tail; the two alternate ``--repeat`` times. Redis CPU per event is the
``used_cpu_sys + used_cpu_user`` delta of the target's servers (every master of the cluster)
over the run, divided by N. Prints figures; asserts nothing.

Format 2 keeps a store in one partition (one hash tag), so the cluster node's data is on one
shard: this measures what the cluster client and routing cost, not a spread over shards.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from redis.asyncio import Redis

from bench.hot_path import engine_config, preload
from harness.mesh import redis_processes
from replication_engine.codec import StreamId
from replication_engine.engine import ReplicationEngine
from replication_engine.testing import RedisHandle
from replication_engine.testing.cluster import Cluster, start_cluster

POLL_S = 0.005


async def cpu_seconds(nodes: list[RedisHandle]) -> float:
    total = 0.0
    for node in nodes:
        redis = Redis(host=node.host, port=node.port)
        try:
            info = await redis.info("cpu")
        finally:
            await redis.aclose()
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


async def catch_up(
    peer_url: str, target: RedisHandle, tail: StreamId, workdir: Path, *, cluster: bool
) -> float:
    config = engine_config(
        "local",
        target.url,
        {"peer": peer_url},
        workdir / f"cursor-{time.monotonic_ns()}.db",
        relay=False,
    )
    data = config.model_dump()
    data["local"]["cluster"] = cluster
    engine = ReplicationEngine(type(config).model_validate(data))
    started = time.perf_counter()
    await engine.start()
    try:
        while True:
            tailer = engine.tailers.get("peer")
            if tailer is not None and tailer.cursor is not None and tailer.cursor >= tail:
                break
            await asyncio.sleep(POLL_S)  # sampling the cursor, not synchronising
        return time.perf_counter() - started
    finally:
        await engine.shutdown()


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
        peer, standalone = make(), make()
        cluster: Cluster = await asyncio.to_thread(start_cluster, make, masters=3)
        tail, preload_s = await preload(peer.url, args.backlog, "peer")
        print(f"backlog: {args.backlog:,} events of 1 KiB JSON, preloaded in {preload_s:.1f} s")
        results: dict[str, list[tuple[float, float]]] = {"standalone": [], "cluster": []}
        for _ in range(args.repeat):
            for name, nodes, is_cluster in (
                ("standalone", [standalone], False),
                ("cluster", cluster.masters, True),
            ):
                await flush(nodes)
                cpu_before = await cpu_seconds(nodes)
                seconds = await catch_up(peer.url, nodes[0], tail, workdir, cluster=is_cluster)
                cpu = await cpu_seconds(nodes) - cpu_before
                results[name].append((seconds, cpu))
        for name, runs in results.items():
            rates = [args.backlog / s for s, _ in runs]
            cpu_us = [cpu / args.backlog * 1e6 for _, cpu in runs]
            print(
                f"{name:>10}: {statistics.median(rates):>8,.0f} events/s median "
                f"(range {min(rates):,.0f}-{max(rates):,.0f}, {len(runs)} runs); Redis CPU "
                f"{statistics.median(cpu_us):.1f} us/event"
            )
        ratio = statistics.median(args.backlog / s for s, _ in results["cluster"]) / (
            statistics.median(args.backlog / s for s, _ in results["standalone"])
        )
        print(f"cluster / standalone: {ratio:.2f}")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    run()
