"""CPU per read cycle at the head of a stream, the engine against a bare loop. Prints figures.

    python -m bench.read_cycle [--rate R] [--seconds S] [--interval S] [--repeat K]

A peer Redis is written at ``R`` writes/s by a writer process (``bench.lag``'s: the store's own
``put_many``, so the stream is a real CDC stream), and read at its head into a second Redis,
reads spaced ``--interval`` apart, for ``S`` seconds: once by an engine in this process (hot
path only, cold path off), once by a bare loop in this process, alternated ``K`` times on fresh
servers. The bare loop does what any tailer written on redis-py must: wait out the interval,
``XREAD BLOCK`` for the next entry, ``XRANGE`` the batch, decompress and verify each entry, write
it with a pipelined ``HSET``. It skips the engine's record and stream facts, LWW apply script,
Merkle update and cursor save, so it is a floor, not a rival.

Reported for each: CPU of this process (every thread) per read cycle and per event, where a
read cycle is one ``XRANGE`` the peer served, and the peer's blocking reads per cycle. The cost of
a cycle is what sets the price of a shorter ``min_read_interval_sec`` (lower lag, more cycles).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from redis.asyncio import Redis

from bench.hot_path import PREFIX, bare_head_batches, queue_bare_writes, servers, workspace
from replication_engine.config import EngineConfig
from replication_engine.engine import ReplicationEngine
from replication_engine.store.layout import Keyspace
from replication_engine.store.redis_store import RedisStore


async def _reads(url: str) -> tuple[int, int]:
    """(XREAD, XRANGE) calls a Redis has served so far."""
    redis = Redis.from_url(url)
    try:
        stats = await redis.info("commandstats")
    finally:
        await redis.aclose()
    return (
        int(stats.get("cmdstat_xread", {}).get("calls", 0)),
        int(stats.get("cmdstat_xrange", {}).get("calls", 0)),
    )


async def _writer(peer_url: str, rate: float, seconds: float) -> asyncio.subprocess.Process:
    args = {"urls": {"a": peer_url}, "rate": rate, "seconds": seconds, "seed": 1}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.lag",
        "--role",
        "writer",
        "--child-args",
        json.dumps(args),
        stdout=asyncio.subprocess.PIPE,
    )


async def _measure(peer_url: str, rate: float, seconds: float) -> tuple[float, int, int, int]:
    """Run the writer to its end; (this process's CPU seconds, writes, XREADs, XRANGEs)."""
    xread0, xrange0 = await _reads(peer_url)
    cpu0 = time.process_time()
    writer = await _writer(peer_url, rate, seconds)
    out, _ = await writer.communicate()
    writes = int(json.loads(out.decode().strip().splitlines()[-1])["writes"])
    cpu = time.process_time() - cpu0
    xread1, xrange1 = await _reads(peer_url)
    return cpu, writes, xread1 - xread0, xrange1 - xrange0


async def engine_run(
    peer_url: str, local_url: str, workdir: Path, rate: float, seconds: float, interval: float
) -> tuple[float, int, int, int]:
    config = EngineConfig.model_validate(
        {
            "local_node_id": "b",
            "local": {"redis_url": local_url, "prefix": PREFIX},
            "settings": {
                "cold_path": {"enabled": False},
                "hot_path": {"relay": False, "min_read_interval_sec": interval},
            },
            "peers": [{"node_id": "a", "redis_url": peer_url, "start_from": "latest"}],
            "cursor": {"sqlite_path": str(workdir / f"cursors-{time.monotonic_ns()}.db")},
            "http": {"enabled": False},
        }
    )
    # The peer's store, opened once so the writer finds its functions loaded.
    await (await RedisStore.connect(peer_url, node_id="a", prefix=PREFIX)).close()
    engine = ReplicationEngine(config)
    await engine.start()
    try:
        deadline = time.monotonic() + 30
        while engine.tailers.get("a") is None or engine.tailers["a"].mode != "tailing":
            if time.monotonic() > deadline:
                raise RuntimeError("the engine did not reach the head of the stream")
            await asyncio.sleep(0.05)
        return await _measure(peer_url, rate, seconds)
    finally:
        await engine.shutdown()


async def bare_run(
    peer_url: str, local_url: str, rate: float, seconds: float, interval: float
) -> tuple[float, int, int, int]:
    await (await RedisStore.connect(peer_url, node_id="a", prefix=PREFIX)).close()
    source, target = Redis.from_url(peer_url), Redis.from_url(local_url)
    keys = Keyspace(PREFIX)
    stop = asyncio.Event()

    async def tail() -> None:
        async for entries in bare_head_batches(source, keys, interval, stop):
            async with target.pipeline(transaction=False) as pipe:
                queue_bare_writes(pipe, keys, entries)
                await pipe.execute()

    task = asyncio.create_task(tail())
    try:
        return await _measure(peer_url, rate, seconds)
    finally:
        stop.set()
        await task
        await source.aclose()
        await target.aclose()


def _line(name: str, runs: list[tuple[float, int, int, int]]) -> tuple[float, str]:
    per_cycle = [cpu / max(1, xrange) * 1000 for cpu, _, _, xrange in runs]
    per_event = [cpu / max(1, writes) * 1e6 for cpu, writes, _, _ in runs]
    waits = [xread / max(1, xrange) for _, _, xread, xrange in runs]
    cycles = [xrange for *_, xrange in runs]
    median = statistics.median(per_cycle)
    return median, (
        f"    {name:<6} {median:5.2f} ms CPU per read cycle ({min(per_cycle):.2f}-"
        f"{max(per_cycle):.2f}), {statistics.median(per_event):5.0f} us per event, "
        f"{statistics.median(cycles):,.0f} cycles, {statistics.median(waits):.2f} blocking "
        "reads per cycle"
    )


async def main(args: argparse.Namespace) -> None:
    print(
        f"read cycle at the head: {args.rate:,.0f} writes/s for {args.seconds:g} s, reads "
        f"{args.interval * 1000:g} ms apart, {args.repeat} run(s) each, alternated"
    )
    results: dict[str, list[tuple[float, int, int, int]]] = {"bare": [], "engine": []}
    async with workspace() as tmp:
        for _ in range(args.repeat):
            for name in ("bare", "engine"):
                with servers(2, tmp) as (peer, local):
                    if name == "bare":
                        run = await bare_run(
                            peer.url, local.url, args.rate, args.seconds, args.interval
                        )
                    else:
                        run = await engine_run(
                            peer.url, local.url, tmp, args.rate, args.seconds, args.interval
                        )
                results[name].append(run)
    bare, bare_text = _line("bare", results["bare"])
    engine, engine_text = _line("engine", results["engine"])
    print(bare_text)
    print(engine_text)
    print(f"    engine / bare: {engine / bare:.2f} times the bare loop's CPU per cycle")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.read_cycle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="writes/s")
    parser.add_argument("--seconds", type=float, default=8.0, help="seconds of writing per run")
    parser.add_argument("--interval", type=float, default=0.005, help="seconds between reads")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, alternated")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> None:
    asyncio.run(main(parse_args(argv)))


if __name__ == "__main__":
    run()
