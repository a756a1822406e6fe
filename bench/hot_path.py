"""Hot-path benchmarks against real redis-server processes. Prints figures; asserts nothing.

    python -m bench.hot_path [--backlog N] [--rate R] [--seconds S] [--memory-backlog M]
                             [--only a,b,c]

(a) Catch-up throughput: a peer's stream is preloaded with N events (1 KiB JSON values); one
    engine (hot path only, start_from beginning) applies the whole backlog, timed from
    ``start()`` until its cursor reaches the stream tail. For comparison, a minimal loop in the
    same process reads the same stream into a fresh Redis: XRANGE batches of 1000, decompress,
    verify the hash, pipelined HSET. The loop does none of the engine's work beyond that (no LWW
    check, no Merkle update, no CDC re-emit, no cursor save), so it is an upper bound.
(b) End-to-end lag: 3 nodes in a full mesh, a writer process issuing R writes/s in total, spread
    over the nodes, for S seconds. Lag of one replicated write = the id (ms) of the entry its
    apply appended to the receiving node's own CDC stream, minus the write's ``updated_at`` (ms,
    the writer's clock when it issued the write). All servers share this host's clock, so the
    difference is write-to-visible latency with 1 ms resolution, for every replicated write.
(c) Peak memory of catching up an M-event backlog (and 100k for comparison): the engine runs in
    a child process; its VmHWM (peak RSS, from /proc/<pid>/status) is sampled by this process
    until the child exits and reported next to the batch settings.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

from redis.asyncio import Redis

from replication_engine import clock, codec
from replication_engine.codec import Change, StreamId
from replication_engine.config import EngineConfig
from replication_engine.engine import ReplicationEngine
from replication_engine.hot_path import Tailer
from replication_engine.store.layout import Keyspace
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisProcess

# Key prefix used by every node in these runs.
PREFIX = "bench:"
# XADDs per pipeline round trip while preloading a backlog.
PRELOAD_PIPELINE = 1000
# Distinct pre-encoded payloads cycled through while preloading (encoding 1M values would
# dominate the preload time; each key still gets its own entry and HLC).
PAYLOAD_POOL = 1024
# Size of one preloaded value, as the issue specifies (1 KiB of JSON).
PAYLOAD_BYTES = 1024
# Batch of the hand-written baseline loop.
BASELINE_BATCH = 1000
# How often the parent samples the catching-up engine (cursor or /proc status).
POLL_S = 0.005
MEMORY_POLL_S = 0.05
# Keys the lag benchmark's writers spread over, and the size of their values.
LAG_KEYS = 10_000
LAG_VALUE_BYTES = 200
# Concurrent writes in flight per node in the writer process (within the store's pool).
WRITER_CONCURRENCY = 16


# Stream entries as Redis returns them: (id, fields).
_Entries = list[tuple[bytes, dict[bytes, bytes]]]


# ------------------------------------------------------------------------------------ setup


def engine_config(
    node_id: str, local_url: str, peers: dict[str, str], cursor_path: Path, **hot_path: Any
) -> EngineConfig:
    return EngineConfig.model_validate(
        {
            "local_node_id": node_id,
            "local": {"redis_url": local_url, "prefix": PREFIX},
            "settings": {
                "cold_path": {"enabled": False},
                "hot_path": {"block_timeout": 0.2, "max_batch_size": 1000, **hot_path},
            },
            "peers": [
                {"node_id": p, "redis_url": url, "start_from": "beginning"}
                for p, url in peers.items()
            ],
            "cursor": {"sqlite_path": str(cursor_path)},
            "http": {"enabled": False},
        }
    )


@contextlib.contextmanager
def servers(count: int, workdir: Path) -> Iterator[list[RedisProcess]]:
    """``count`` fresh redis-server processes, killed on exit whatever happens."""
    started: list[RedisProcess] = []
    try:
        for i in range(count):
            server = RedisProcess(data_dir=workdir / f"redis-{time.monotonic_ns()}-{i}")
            started.append(server)
            server.start()
        yield started
    finally:
        for server in started:
            server.kill()


def json_payload(i: int, size: int, rng: random.Random) -> bytes:
    body = {"id": i, "name": f"user {i}", "email": f"user{i}@example.com", "tags": ["a", "b"]}
    text = json.dumps(body)
    pad = size - len(text) - len(',"bio":""')
    body["bio"] = rng.randbytes(max(0, pad // 2)).hex()[: max(0, pad)]
    return json.dumps(body, separators=(",", ":")).encode()[:size]


async def preload(url: str, events: int, origin: str) -> tuple[StreamId, float]:
    """XADD ``events`` valid PUT entries (distinct keys) to the stream at ``url``.

    Returns the last stream id and the seconds the preload took.
    """
    rng = random.Random(7)
    pool = [
        Change.put(
            "k", json_payload(i, PAYLOAD_BYTES, rng), hlc=1, origin=origin, content_type="json"
        )
        for i in range(PAYLOAD_POOL)
    ]
    keys = Keyspace(PREFIX)
    base_ms = clock.wall_clock_ms() - events // 8 - 1000
    started = time.perf_counter()
    redis = Redis.from_url(url)
    last = b"0-0"
    try:
        for first in range(0, events, PRELOAD_PIPELINE):
            async with redis.pipeline(transaction=False) as pipe:
                for i in range(first, min(events, first + PRELOAD_PIPELINE)):
                    template = pool[i % PAYLOAD_POOL]
                    hlc = clock.pack(base_ms + i // 8, i % 8)
                    change = Change(
                        key=f"user:{i:08d}",
                        hlc=hlc,
                        origin=origin,
                        data=template.data,
                        content_hash=template.content_hash,
                        content_type="json",
                        version=1,
                        updated_at=clock.physical_ms(hlc),
                    )
                    pipe.xadd(keys.cdc, cast(Any, codec.encode_entry(change)))
                ids = await pipe.execute()
            last = ids[-1]
    finally:
        await redis.aclose()
    return codec.parse_stream_id(last), time.perf_counter() - started


# ------------------------------------------------------------------------------------ (a)


async def engine_catch_up(
    peer_url: str, local_url: str, tail: StreamId, workdir: Path
) -> tuple[float, ReplicationEngine]:
    config = engine_config(
        "local", local_url, {"peer": peer_url}, workdir / f"cursor-{time.monotonic_ns()}.db"
    )
    engine = ReplicationEngine(config)
    started = time.perf_counter()
    await engine.start()
    try:
        while True:
            tailer = engine.tailers.get("peer")
            if tailer is not None and tailer.cursor is not None and tailer.cursor >= tail:
                break
            await asyncio.sleep(POLL_S)
        elapsed = time.perf_counter() - started
    finally:
        await engine.shutdown()
    return elapsed, engine


async def baseline_catch_up(peer_url: str, target_url: str, tail: StreamId) -> float:
    """XRANGE -> decode_payload -> verify_hash -> pipelined HSET, nothing else."""
    source, target = Redis.from_url(peer_url), Redis.from_url(target_url)
    keys = Keyspace(PREFIX)
    started = time.perf_counter()
    cursor = "-"
    try:
        while True:
            entries = cast(
                _Entries, await source.xrange(keys.cdc, min=cursor, max="+", count=BASELINE_BATCH)
            )
            if not entries:
                break
            async with target.pipeline(transaction=False) as pipe:
                for _raw_id, fields in entries:
                    value = codec.decode_payload(fields[b"data"])
                    codec.verify_hash(value, fields[b"hash"].decode())
                    pipe.hset(
                        PREFIX + "item:" + fields[b"key"].decode(),
                        mapping={
                            "d": fields[b"data"],
                            "h": fields[b"hash"],
                            "meta": fields[b"meta"],
                        },
                    )
                await pipe.execute()
            last = codec.parse_stream_id(entries[-1][0])
            if last >= tail:
                break
            cursor = f"({last}"
    finally:
        await source.aclose()
        await target.aclose()
    return time.perf_counter() - started


async def script_seconds(url: str) -> float:
    """Seconds a Redis spent running scripts (EVALSHA/EVAL), from INFO commandstats."""
    redis = Redis.from_url(url)
    try:
        stats = await redis.info("commandstats")
    finally:
        await redis.aclose()
    return (
        sum(stats.get(name, {}).get("usec", 0) for name in ("cmdstat_evalsha", "cmdstat_eval"))
        / 1e6
    )


async def bench_throughput(backlog: int, workdir: Path) -> None:
    print(f"(a) catch-up throughput, backlog {backlog:,} events of {PAYLOAD_BYTES} B JSON")
    with servers(3, workdir) as (peer, local, baseline_target):
        tail, preload_s = await preload(peer.url, backlog, "peer")
        print(f"    preload: {backlog:,} XADDs in {preload_s:.1f} s")
        engine_s, engine = await engine_catch_up(peer.url, local.url, tail, workdir)
        lua_s = await script_seconds(local.url)
        base_s = await baseline_catch_up(peer.url, baseline_target.url, tail)
    registry = engine.metrics.registry
    flush_sum = (
        registry.get_sample_value("replication_batch_flush_duration_seconds_sum", {"peer": "peer"})
        or 0.0
    )
    flushes = registry.get_sample_value("replication_batch_flush_total", {"peer": "peer"}) or 0
    tailer = engine.tailers["peer"]
    engine_rate, base_rate = backlog / engine_s, backlog / base_s
    print(
        f"    engine:   {engine_rate:>10,.0f} events/s  ({engine_s:.2f} s, {flushes:.0f} batches,"
        f" {flush_sum:.2f} s inside apply+cursor save)"
    )
    print(
        f"              of which {lua_s:.2f} s running the apply script inside the local Redis"
        f" ({lua_s / backlog * 1e6:.0f} us per event)"
    )
    print(f"    baseline: {base_rate:>10,.0f} events/s  ({base_s:.2f} s)")
    print(f"    ratio engine/baseline: {engine_rate / base_rate:.2f}  (target >= 0.8)")
    print(
        f"    engine tailer: applied {tailer.stats.applied:,}, batches {tailer.stats.batches:,},"
        f" final AIMD batch size {tailer.sizer.size}"
    )


# ------------------------------------------------------------------------------------ (b)


async def _writer(urls: dict[str, str], rate: float, seconds: float) -> dict[str, Any]:
    """The writer process body: ``rate`` writes/s in total, an equal share on every node.

    Each node has its own schedule (write n is due at n / share seconds) served by a few
    concurrent workers, so a slow write delays only itself, not the schedule.
    """
    stores = {n: await RedisStore.connect(u, node_id=n, prefix=PREFIX) for n, u in urls.items()}
    rng = random.Random(11)
    values = [json_payload(i, LAG_VALUE_BYTES, rng) for i in range(256)]
    share = rate / len(stores)
    per_node = int(share * seconds)
    next_index = dict.fromkeys(stores, 0)
    late = 0
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def worker(node: str) -> None:
        nonlocal late
        store = stores[node]
        while next_index[node] < per_node:
            n = next_index[node]
            next_index[node] += 1
            delay = started + n / share - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.05:
                late += 1
            await store.put(f"key:{rng.randrange(LAG_KEYS)}", values[n % len(values)], "json")

    await asyncio.gather(*(worker(n) for n in stores for _ in range(WRITER_CONCURRENCY)))
    elapsed = loop.time() - started
    for store in stores.values():
        await store.close()
    return {"writes": per_node * len(stores), "seconds": elapsed, "late": late}


def _caught_up(tailer: Tailer, tail: str | None) -> bool:
    return (
        tail is not None
        and tailer.cursor is not None
        and tailer.cursor >= codec.parse_stream_id(tail)
        and tailer.mode == "tailing"
    )


async def _wait_idle(
    engines: dict[str, ReplicationEngine], stores: dict[str, RedisStore], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tails = {n: await s.stream_tail() for n, s in stores.items()}
        if all(_caught_up(t, tails[p]) for e in engines.values() for p, t in e.tailers.items()):
            if tails == {n: await s.stream_tail() for n, s in stores.items()}:
                return
        await asyncio.sleep(0.1)
    raise TimeoutError("mesh did not go idle")


async def lag_samples(store: RedisStore, since_ms: int) -> list[int]:
    out: list[int] = []
    start = f"{since_ms}-0"
    while True:
        entries = cast(
            _Entries, await store.redis.xrange(store.keys.cdc, min=start, max="+", count=5000)
        )
        if not entries:
            return out
        for raw_id, fields in entries:
            meta = json.loads(fields[b"meta"])
            if meta["origin"] != store.node_id:
                out.append(codec.parse_stream_id(raw_id).ms - int(meta["updated_at"]))
        start = f"({entries[-1][0].decode()}"


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


async def bench_lag(rate: float, seconds: float, workdir: Path) -> None:
    print(f"(b) end-to-end lag, 3-node full mesh, {rate:,.0f} writes/s total for {seconds:g} s")
    ids = ["a", "b", "c"]
    with servers(3, workdir) as procs:
        urls = {n: p.url for n, p in zip(ids, procs, strict=True)}
        stores = {n: await RedisStore.connect(urls[n], node_id=n, prefix=PREFIX) for n in ids}
        engines: dict[str, ReplicationEngine] = {}
        try:
            for n in ids:
                config = engine_config(
                    n,
                    urls[n],
                    {p: urls[p] for p in ids if p != n},
                    workdir / f"lag-{n}-{time.monotonic_ns()}.db",
                )
                engines[n] = ReplicationEngine(config, store=stores[n])
                await engines[n].start()
            since_ms = clock.wall_clock_ms()
            cpu_before = time.process_time()
            wall_before = time.perf_counter()
            writer = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.hot_path",
                "--role",
                "writer",
                "--child-args",
                json.dumps({"urls": urls, "rate": rate, "seconds": seconds}),
                stdout=subprocess.PIPE,
            )
            out, _ = await writer.communicate()
            result = json.loads(out.decode().strip().splitlines()[-1])
            await _wait_idle(engines, stores, timeout=120)
            engine_cpu = time.process_time() - cpu_before
            wall = time.perf_counter() - wall_before
            samples: dict[str, list[int]] = {n: await lag_samples(stores[n], since_ms) for n in ids}
        finally:
            for engine in engines.values():
                await engine.shutdown()
            for store in stores.values():
                await store.close()
    achieved = result["writes"] / result["seconds"]
    print(
        f"    writer: {result['writes']:,} writes in {result['seconds']:.1f} s "
        f"({achieved:,.0f}/s, {result['late']} issued >50 ms late)"
    )
    print(f"    engines (3, one process): {engine_cpu:.1f} s CPU over {wall:.1f} s wall")
    every = [v for values in samples.values() for v in values]
    print("    method: receiving node's CDC entry id (ms) - write's meta.updated_at (ms)")
    for name, values in [*samples.items(), ("all", every)]:
        if not values:
            print(f"    {name}: no replicated entries")
            continue
        print(
            f"    {name:>3}: {len(values):>7,} applied  p50 {percentile(values, 0.50):>5.0f} ms  "
            f"p90 {percentile(values, 0.90):>5.0f} ms  p99 {percentile(values, 0.99):>5.0f} ms  "
            f"max {max(values):>5} ms  mean {statistics.fmean(values):.1f} ms"
        )


# ------------------------------------------------------------------------------------ (c)


def _proc_status(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                out[name] = int(value.split()[0])  # kB
    return out


async def _engine_child(peer_url: str, local_url: str, cursor_path: str, tail: str) -> None:
    """Child process body: catch up to ``tail``, then report timing and memory as JSON."""
    target = codec.parse_stream_id(tail)
    idle_rss = _proc_status(os.getpid()).get("VmRSS", 0)
    config = engine_config("local", local_url, {"peer": peer_url}, Path(cursor_path))
    engine = ReplicationEngine(config)
    started = time.perf_counter()
    await engine.start()
    while True:
        tailer = engine.tailers.get("peer")
        if tailer is not None and tailer.cursor is not None and tailer.cursor >= target:
            break
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    await engine.shutdown()
    status = _proc_status(os.getpid())
    print(json.dumps({"seconds": elapsed, "idle_rss_kb": idle_rss, "hwm_kb": status["VmHWM"]}))


async def memory_run(backlog: int, workdir: Path) -> dict[str, Any]:
    with servers(2, workdir) as (peer, local):
        tail, _ = await preload(peer.url, backlog, "peer")
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.hot_path",
            "--role",
            "engine",
            "--child-args",
            json.dumps(
                {
                    "peer_url": peer.url,
                    "local_url": local.url,
                    "cursor_path": str(workdir / f"mem-{backlog}.db"),
                    "tail": str(tail),
                }
            ),
            stdout=subprocess.PIPE,
        )
        sampled_hwm = 0
        while child.returncode is None:
            sampled_hwm = max(sampled_hwm, _proc_status(child.pid).get("VmHWM", 0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(child.wait(), MEMORY_POLL_S)
        out = await child.stdout.read() if child.stdout else b""
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        result["sampled_hwm_kb"] = sampled_hwm
        result["backlog"] = backlog
        return result


async def bench_memory(backlogs: list[int], workdir: Path) -> None:
    hot = engine_config("x", "redis://127.0.0.1:1/0", {}, workdir / "x.db").settings.hot_path
    print(
        f"(c) peak memory of an engine catching up (child process, VmHWM); batch_size "
        f"{hot.batch_size}, min {hot.min_batch_size}, max {hot.max_batch_size}, values "
        f"{PAYLOAD_BYTES} B"
    )
    for backlog in backlogs:
        r = await memory_run(backlog, workdir)
        print(
            f"    backlog {backlog:>9,}: peak RSS {r['sampled_hwm_kb'] / 1024:7.1f} MiB "
            f"(child's own VmHWM {r['hwm_kb'] / 1024:.1f} MiB, RSS before start "
            f"{r['idle_rss_kb'] / 1024:.1f} MiB), caught up in {r['seconds']:.1f} s "
            f"({backlog / r['seconds']:,.0f} events/s)"
        )


# ------------------------------------------------------------------------------------ main


@contextlib.asynccontextmanager
async def workspace() -> AsyncIterator[Path]:
    with tempfile.TemporaryDirectory(prefix="re-bench-") as tmp:
        yield Path(tmp)


async def main(args: argparse.Namespace) -> None:
    only = set(args.only.split(","))
    async with workspace() as workdir:
        if "a" in only:
            await bench_throughput(args.backlog, workdir)
        if "b" in only:
            await bench_lag(args.rate, args.seconds, workdir)
        if "c" in only:
            backlogs = sorted({min(100_000, args.memory_backlog), args.memory_backlog})
            await bench_memory(backlogs, workdir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.hot_path",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backlog", type=int, default=200_000, help="(a) events preloaded")
    parser.add_argument("--rate", type=float, default=5000.0, help="(b) writes/s in total")
    parser.add_argument("--seconds", type=float, default=10.0, help="(b) seconds of writing")
    parser.add_argument(
        "--memory-backlog",
        type=int,
        default=1_000_000,
        help="(c) events preloaded (also run at 100k for comparison)",
    )
    parser.add_argument("--only", default="a,b,c", help="which benchmarks, e.g. a,c")
    parser.add_argument(
        "--role", choices=["main", "writer", "engine"], default="main", help=argparse.SUPPRESS
    )
    parser.add_argument("--child-args", default="{}", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run() -> None:
    args = parse_args()
    child = json.loads(args.child_args)
    if args.role == "writer":
        print(json.dumps(asyncio.run(_writer(child["urls"], child["rate"], child["seconds"]))))
    elif args.role == "engine":
        asyncio.run(
            _engine_child(
                child["peer_url"], child["local_url"], child["cursor_path"], child["tail"]
            )
        )
    else:
        asyncio.run(main(args))


if __name__ == "__main__":
    run()
