"""Bootstrap: a new node copying a peer's data, against a bare copy loop. Prints figures.

    python -m bench.bootstrap [--items N] [--repeat K]

A peer's store is preloaded with N items (1 KiB JSON values, written through ``put_many``).
Two copies of it are then timed, each into a fresh ``redis-server``, in the same run:

- **bare loop**: ``SCAN`` the peer's item keys, a pipelined ``HGETALL`` per page, a pipelined
  ``HSET`` of the same hashes into the target. No tree, no stream, no checks: an upper bound.
- **engine**: an in-process engine whose only peer is that store, ``start_from: snapshot``,
  timed from ``start()`` until its Merkle root equals the peer's (the bootstrap copies branch by
  branch through the apply path, within ``bootstrap_rate_limit_per_sec``).

For each, the CPU the peer's Redis spent serving it (``INFO cpu`` before and after) is printed as
a share of one core over the copy, since the peer is a live node whose own clients pay for it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.hot_path import PREFIX, json_payload, redis_cpu, servers, workspace
from replication_engine.config import EngineConfig
from replication_engine.engine import ReplicationEngine
from replication_engine.store.layout import Keyspace
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import async_wait_until

PAGE = 1000
VALUE_BYTES = 1024
DEADLINE_S = 600.0
# The peer's item keys, as the bare loop scans them.
ITEMS = Keyspace(PREFIX).item_pattern


async def preload(url: str, items: int) -> None:
    store = await RedisStore.connect(url, node_id="b", prefix=PREFIX)
    rng = random.Random(7)
    try:
        for start in range(0, items, PAGE):
            batch = [
                (f"user:{i:08d}", json_payload(i, VALUE_BYTES, rng), "json")
                for i in range(start, min(items, start + PAGE))
            ]
            await store.put_many(batch)
    finally:
        await store.close()


async def bare_copy(peer_url: str, target_url: str) -> tuple[float, int, float]:
    """Seconds, items copied and the peer's CPU seconds, for SCAN + HGETALL + HSET."""
    source, target = Redis.from_url(peer_url), Redis.from_url(target_url)
    try:
        cpu_before = await redis_cpu(source)
        started = time.perf_counter()
        copied, cursor = 0, 0
        while True:
            cursor, keys = await source.scan(cursor, match=ITEMS, count=PAGE)
            if keys:
                async with source.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.hgetall(key)
                    hashes = await pipe.execute()
                async with target.pipeline(transaction=False) as pipe:
                    for key, fields in zip(keys, hashes, strict=True):
                        pipe.hset(key, mapping=fields)
                    await pipe.execute()
                copied += len(keys)
            if cursor == 0:
                break
        elapsed = time.perf_counter() - started
        return elapsed, copied, await redis_cpu(source) - cpu_before
    finally:
        await source.aclose()
        await target.aclose()


async def engine_copy(peer_url: str, target_url: str, workdir: Path) -> tuple[float, float]:
    """Seconds until the engine's root equals the peer's, and the peer's CPU seconds."""
    config = EngineConfig.model_validate(
        {
            "local_node_id": "a",
            "local": {"redis_url": target_url, "prefix": PREFIX},
            "peers": [{"node_id": "b", "redis_url": peer_url, "start_from": "snapshot"}],
            "settings": {"cold_path": {"interval_sec": 3600}},
            "cursor": {"sqlite_path": str(workdir / f"cursors-{time.monotonic_ns()}.db")},
            "http": {"enabled": False},
        }
    )
    peer = await RedisStore.connect(peer_url, node_id="b", prefix=PREFIX)
    source = Redis.from_url(peer_url)
    engine = ReplicationEngine(config)
    try:
        want = await peer.merkle_root()
        cpu_before = await redis_cpu(source)
        started = time.perf_counter()
        await engine.start()
        store = engine.store
        assert store is not None

        async def same_root() -> bool:
            return await store.merkle_root() == want

        await async_wait_until(same_root, timeout=DEADLINE_S, interval=0.05)
        elapsed = time.perf_counter() - started
        return elapsed, await redis_cpu(source) - cpu_before
    finally:
        await engine.shutdown()
        await peer.close()
        await source.aclose()


async def main(items: int, repeat: int) -> None:
    print(f"bootstrap of {items:,} items of {VALUE_BYTES} B JSON from one peer")
    rows: dict[str, list[tuple[float, float]]] = {"bare loop": [], "engine": []}
    async with workspace() as workdir:
        with servers(1, workdir) as (peer,):
            await preload(peer.url, items)
            for _ in range(repeat):
                with servers(2, workdir) as (bare_target, engine_target):
                    seconds, copied, cpu = await bare_copy(peer.url, bare_target.url)
                    assert copied == items, (copied, items)
                    rows["bare loop"].append((items / seconds, cpu / seconds))
                    seconds, cpu = await engine_copy(peer.url, engine_target.url, workdir)
                    rows["engine"].append((items / seconds, cpu / seconds))
    for name, runs in rows.items():
        rates = [rate for rate, _ in runs]
        loads = [load for _, load in runs]
        print(
            f"  {name:<10} {statistics.median(rates):9,.0f} items/s "
            f"(range {min(rates):,.0f}-{max(rates):,.0f}); peer Redis CPU "
            f"{statistics.median(loads) * 100:.0f}% of a core (median of {len(runs)})"
        )
    ratios = [e[0] / b[0] for e, b in zip(rows["engine"], rows["bare loop"], strict=True)]
    print(
        f"  ratio engine/bare loop: median {statistics.median(ratios):.2f} "
        f"(range {min(ratios):.2f}-{max(ratios):.2f}; issue 17 aims at >= 0.8)"
    )


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args: Any = parser.parse_args(argv)
    asyncio.run(main(args.items, args.repeat))


if __name__ == "__main__":
    run()
