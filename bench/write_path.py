"""Write-path throughput: ``RedisStore.put`` against plain pipelined ``HSET`` + ``XADD``.

The store's put does more than the baseline on purpose (content hash, compression, the HLC, the
Merkle leaf and its ancestors, all inside one Lua script); this measures what that atomicity
costs against the cheapest way to land the same payloads in an item hash and a stream. Both
sides get the same server, payloads, number of concurrent writers and discipline: one round
trip per put, no batching across puts. Numbers only; nothing here asserts a speed.

Usage: ``python -m bench.write_path [--n N] [--concurrency C] [--payload-bytes B] [--batch K]``

Then the same payloads through ``put_many`` in batches of K against one pipeline of ``HSET`` +
``XADD`` per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from redis.asyncio import BlockingConnectionPool, Redis

from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisProcess, find_redis_server, redis_server_version

# Puts run before measuring, so connections, the script cache and allocator are warm.
WARMUP_PUTS = 500
# Same cap the store uses by default, so the stream trims the same way on both sides.
STREAM_MAXLEN = 100_000
# Seconds a writer waits for a free pooled connection before the bench fails loudly.
POOL_TIMEOUT_S = 30.0


@dataclass
class Run:
    name: str
    seconds: float
    latencies_s: list[float]

    @property
    def rate(self) -> float:
        return len(self.latencies_s) / self.seconds

    def quantile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def make_payloads(n: int, size: int, seed: int = 1) -> list[bytes]:
    """Distinct JSON documents of at least ``size`` bytes, compressible like real ones."""
    rnd = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    out = []
    for i in range(n):
        tags: list[str] = []
        owner = f"user-{rnd.randrange(10_000)}"
        text = json.dumps({"id": i, "owner": owner, "tags": tags})
        while len(text) < size:
            tags.append(f"{rnd.choice(words)}-{rnd.randrange(1_000_000)}")
            text = json.dumps({"id": i, "owner": owner, "tags": tags})
        out.append(text.encode())
    return out


async def drive(
    name: str, put: Callable[[int], Awaitable[object]], n: int, concurrency: int
) -> Run:
    """``concurrency`` tasks share one counter; each put is timed on its own."""
    next_index = 0
    latencies: list[float] = []

    async def writer() -> None:
        nonlocal next_index
        while next_index < n:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            await put(index)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for i in range(concurrency):
            group.create_task(writer(), name=f"bench_writer[{i}]")
    return Run(name, time.perf_counter() - started, latencies)


def client(url: str, concurrency: int) -> Redis:
    # A blocking pool sized to the writers: both sides queue for connections the same way.
    pool = BlockingConnectionPool.from_url(url, max_connections=concurrency, timeout=POOL_TIMEOUT_S)
    return Redis(connection_pool=pool)


async def bench_store(url: str, payloads: Sequence[bytes], concurrency: int) -> Run:
    redis = client(url, concurrency)
    # Built on our own client rather than RedisStore.connect(): connect() uses a non-blocking
    # pool of 32 that fails, rather than waits, past 32 concurrent calls.
    store = RedisStore(redis, node_id="bench", stream_maxlen=STREAM_MAXLEN)
    try:
        await store.check_geometry()
        for i in range(WARMUP_PUTS):
            await store.put(f"warm:{i}", payloads[i % len(payloads)], content_type="json")

        async def put(i: int) -> object:
            return await store.put(f"bench:{i}", payloads[i], content_type="json")

        return await drive("RedisStore.put", put, len(payloads), concurrency)
    finally:
        await redis.aclose()


async def bench_baseline(url: str, payloads: Sequence[bytes], concurrency: int) -> Run:
    redis = client(url, concurrency)
    try:

        async def put(i: int, key_prefix: str = "bench") -> object:
            key = f"{key_prefix}:{i}"
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hset(f"item:{key}", mapping={"d": payloads[i % len(payloads)], "ct": "json"})
                pipe.xadd(
                    "cdc",
                    {"op": "PUT", "key": key, "data": payloads[i % len(payloads)]},
                    maxlen=STREAM_MAXLEN,
                    approximate=True,
                )
                return await pipe.execute()

        for i in range(WARMUP_PUTS):
            await put(i, "warm")
        return await drive("HSET+XADD pipelined", put, len(payloads), concurrency)
    finally:
        await redis.aclose()


async def bench_many(url: str, payloads: Sequence[bytes], batch: int) -> tuple[float, float]:
    """Seconds for ``put_many`` in batches of ``batch``, and for the same batches as one
    pipeline of ``HSET`` + ``XADD`` each (one batch in flight at a time on both sides)."""
    redis = Redis.from_url(url)
    store = RedisStore(redis, node_id="bench", stream_maxlen=STREAM_MAXLEN)
    try:
        await store.check_geometry()
        await store.put_many([(f"warm:{i}", payloads[i], "json") for i in range(batch)])
        started = time.perf_counter()
        for first in range(0, len(payloads), batch):
            chunk = range(first, min(first + batch, len(payloads)))
            await store.put_many([(f"many:{i}", payloads[i], "json") for i in chunk])
        store_s = time.perf_counter() - started
        await redis.flushall()
        started = time.perf_counter()
        for first in range(0, len(payloads), batch):
            async with redis.pipeline(transaction=False) as pipe:
                for i in range(first, min(first + batch, len(payloads))):
                    pipe.hset(f"item:many:{i}", mapping={"d": payloads[i], "ct": "json"})
                    pipe.xadd(
                        "cdc",
                        {"op": "PUT", "key": f"many:{i}", "data": payloads[i]},
                        maxlen=STREAM_MAXLEN,
                        approximate=True,
                    )
                await pipe.execute()
        return store_s, time.perf_counter() - started
    finally:
        await redis.aclose()


async def run(n: int, concurrency: int, payload_bytes: int, batch: int = 1000) -> None:
    payloads = make_payloads(n, payload_bytes)
    binary = find_redis_server()
    version = ".".join(map(str, redis_server_version(binary)))
    with RedisProcess(binary=binary) as server:
        print(f"redis-server {version} at {server.host}:{server.port}")
        print(
            f"payload ~{payload_bytes} B JSON, n={n}, concurrency={concurrency}, "
            f"median payload {statistics.median(map(len, payloads)):.0f} B"
        )
        admin = server.client()
        try:
            store_run = await bench_store(server.url, payloads, concurrency)
            memory_store = admin.info("memory")["used_memory"]
            admin.flushall()
            baseline_run = await bench_baseline(server.url, payloads, concurrency)
            memory_baseline = admin.info("memory")["used_memory"]
            admin.flushall()
            many_s, many_baseline_s = await bench_many(server.url, payloads, batch)
        finally:
            admin.close()
    for r in (store_run, baseline_run):
        print(
            f"{r.name:<22} {r.rate:>10.0f} puts/s  p50 {r.quantile_ms(0.5):6.2f} ms  "
            f"p99 {r.quantile_ms(0.99):6.2f} ms  ({len(r.latencies_s)} puts in {r.seconds:.2f} s)"
        )
    print(f"ratio store/baseline   {store_run.rate / baseline_run.rate:.2f}")
    print(f"redis used_memory      store {memory_store} B, baseline {memory_baseline} B")
    print(
        f"put_many, batches of {batch}: {n / many_s:,.0f}/s; pipelined HSET+XADD "
        f"{n / many_baseline_s:,.0f}/s; ratio {many_baseline_s / many_s:.2f}"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="puts per side")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent writers")
    parser.add_argument("--payload-bytes", type=int, default=1024, help="payload size")
    parser.add_argument("--batch", type=int, default=1000, help="items per put_many call")
    args = parser.parse_args(argv)
    if args.n < 1 or args.concurrency < 1 or args.payload_bytes < 16:
        parser.error("--n and --concurrency must be >= 1, --payload-bytes >= 16")
    asyncio.run(run(args.n, args.concurrency, args.payload_bytes, args.batch))


if __name__ == "__main__":
    main()
