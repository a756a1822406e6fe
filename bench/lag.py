"""End-to-end replication lag in a 3-node full mesh under a steady write rate. Prints figures.

    python -m bench.lag [--rate R] [--seconds S] [--relay on|off|both] [--writers N]
                        [--min-read-interval-sec S] [--tailer engine|bare|both]

Every part runs as it would in production, each in its own process: three ``redis-server``s, one
engine process per node (hot path only), and ``N`` writer processes that together issue ``R``
writes/s spread evenly over the nodes (1 KiB-ish JSON values over 10,000 keys). A writer sends the
writes that fell due in one pipeline per node (one in flight per node), so that the load
generator itself is not what saturates first on a small machine.

Lag of one replicated write = when the receiving node's apply script returned (its engine's
wall clock, ms) minus the write's ``updated_at`` (the writer's wall clock when it proposed the
write's HLC, ms). All processes share this host's clock, so the difference is write-to-visible
latency with 1 ms resolution, for every write applied on every receiving node. Writes a node
received twice (relayed by a peer) count once: the second copy is a duplicate, not applied.
The part of it that is the write reaching its own node's stream (the entry id's milliseconds,
Redis's clock, minus ``updated_at``) is printed on its own line: the rest is the engines'.

``--tailer bare`` runs, in place of each engine process, a process of bare redis-py loops, one
per peer, reading at the same spacing (``--min-read-interval-sec``, 0 for none): ``XREAD BLOCK``
for the next entry, ``XRANGE`` the batch, decompress and verify each entry, write it with a
pipelined ``HSET``. It keeps no tree, record, anchor or cursor, so it is a floor for what any
tailer written on redis-py gets on this machine at this rate, not a rival: lag is measured the
same way, when its ``HSET`` pipeline returned.

Diagnostics: the servers' time per command (``INFO commandstats``, every node, over the run) is
printed beside the CPU figures: the engines' apply script (``evalsha``) and the writers'
``fcall`` each hold their server while they run. ``BENCH_LAG_PROFILE=/tmp/lag`` writes a
cProfile of each engine process to ``/tmp/lag-<node>.prof``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.hot_path import (
    PREFIX,
    bare_head_batches,
    command_usec,
    json_payload,
    queue_bare_writes,
    redis_cpu,
    servers,
    workspace,
)
from replication_engine import clock, codec
from replication_engine.codec import Change
from replication_engine.config import EngineConfig, HotPathConfig, default_of
from replication_engine.engine import ReplicationEngine
from replication_engine.knowledge import ApplyStatus
from replication_engine.store.layout import Keyspace
from replication_engine.store.protocol import ApplyResult, PreparedApply, StreamBatch
from replication_engine.store.redis_store import RedisStore

NODES = ("a", "b", "c")
KEYS = 10_000
VALUE_BYTES = 200
# A writer's shortest sleep between checks for due writes (seconds); late writes are counted.
TICK_S = 0.005
LATE_S = 0.05
# Where a bare loop counts the entries it wrote (its node's Redis), for the parent to wait on.
APPLIED_KEY = "bench:lag:applied"


# ------------------------------------------------------------------------------------ engine


def _config(
    node: str, urls: dict[str, str], cursor_path: Path, relay: bool, hot_path: dict[str, Any]
) -> EngineConfig:
    return EngineConfig.model_validate(
        {
            "local_node_id": node,
            "local": {"redis_url": urls[node], "prefix": PREFIX},
            "settings": {
                "cold_path": {"enabled": False},
                "hot_path": {"block_timeout_sec": 1.0, "relay": relay, **hot_path},
            },
            "peers": [
                {"node_id": p, "redis_url": url, "start_from": "latest"}
                for p, url in urls.items()
                if p != node
            ],
            "cursor": {"sqlite_path": str(cursor_path)},
            "http": {"enabled": False},
        }
    )


async def _engine_process(
    node: str, urls: dict[str, str], cursor_path: str, relay: bool, hot_path: dict[str, Any]
) -> None:
    """Run one node's engine until stdin closes; then print its lag samples as JSON."""
    samples: list[int] = []
    split: list[int] = []
    batches = 0
    changes_of: dict[int, list[Change]] = {}
    original_prepare = RedisStore.prepare_apply
    original_apply = RedisStore.apply_prepared

    def prepare(self: RedisStore, changes: Any, **kw: Any) -> PreparedApply:
        prepared = original_prepare(self, changes, **kw)
        changes_of[id(prepared)] = list(changes)
        return prepared

    async def apply(
        self: RedisStore, prepared: PreparedApply, source: StreamBatch | None = None
    ) -> ApplyResult:
        nonlocal batches
        result = await original_apply(self, prepared, source)
        batches += 1
        now = clock.wall_clock_ms()
        for change, status in zip(changes_of.pop(id(prepared), []), result.statuses, strict=False):
            if status is ApplyStatus.APPLIED:
                samples.append(now - change.updated_at)
                if change.stream_id:
                    split.append(int(change.stream_id.split("-")[0]) - change.updated_at)
        return result

    RedisStore.prepare_apply = prepare  # type: ignore[method-assign]
    RedisStore.apply_prepared = apply  # type: ignore[method-assign]
    engine = ReplicationEngine(_config(node, urls, Path(cursor_path), relay, hot_path))
    profile_to = os.environ.get("BENCH_LAG_PROFILE")  # a path prefix: profile engine processes
    profiler = None
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    await engine.start()
    print("ready", flush=True)
    cpu_ready = time.process_time()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # the parent closes stdin to stop us
    cpu = time.process_time() - cpu_ready
    await engine.shutdown()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(f"{profile_to}-{node}.prof")
    report = {"samples": samples, "split": split, "cpu_s": cpu, "batches": batches}
    print(json.dumps(report), flush=True)


async def _bare_process(node: str, urls: dict[str, str], interval: float) -> None:
    """Bare loops tailing every peer into ``node``'s Redis until stdin closes (see the module
    docstring); each counts what it wrote in ``APPLIED_KEY`` so the parent can wait for the
    end. Prints its lag samples as JSON."""
    keys = Keyspace(PREFIX)
    local = Redis.from_url(urls[node])
    samples: list[int] = []
    batches = 0
    stop = asyncio.Event()

    async def tail(peer_url: str) -> None:
        nonlocal batches
        source = Redis.from_url(peer_url)
        async for entries in bare_head_batches(source, keys, interval, stop):
            async with local.pipeline(transaction=False) as pipe:
                queue_bare_writes(pipe, keys, entries)
                pipe.incrby(APPLIED_KEY, len(entries))
                await pipe.execute()
            now = clock.wall_clock_ms()
            batches += 1
            for _raw_id, fields in entries:
                samples.append(now - int(codec.decode_meta(fields[b"meta"])["updated_at"]))
        await source.aclose()

    tasks = [asyncio.create_task(tail(url)) for peer, url in urls.items() if peer != node]
    print("ready", flush=True)
    cpu_ready = time.process_time()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    cpu = time.process_time() - cpu_ready
    stop.set()
    await asyncio.gather(*tasks)
    await local.aclose()
    print(json.dumps({"samples": samples, "split": [], "cpu_s": cpu, "batches": batches}))


# ------------------------------------------------------------------------------------ writer


async def _writer_process(urls: dict[str, str], rate: float, seconds: float, seed: int) -> None:
    """Issue ``rate`` writes/s (this writer's share), even over the nodes, for ``seconds``.

    One pipeline in flight per node: the writes that fell due meanwhile go in the next one, so
    a write's timestamp (taken as its pipeline is built) is when it went to Redis, not when it
    started queueing in this process.
    """
    stores = {n: await RedisStore.connect(u, node_id=n, prefix=PREFIX) for n, u in urls.items()}
    rng = random.Random(seed)
    values = [json_payload(i, VALUE_BYTES, rng) for i in range(256)]
    share = rate / len(stores)
    count = int(share * seconds)
    late = 0
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def node_writer(store: RedisStore) -> None:
        nonlocal late
        issued = 0
        while issued < count:
            now = loop.time()
            due = min(count, int((now - started) * share) + 1)
            if due <= issued:
                # Sleep until the next write falls due (not a fixed tick: polling every
                # millisecond cost this process more CPU than the writes themselves).
                await asyncio.sleep(max(TICK_S, started + issued / share - now))
                continue
            late += sum(1 for n in range(issued, due) if now - (started + n / share) > LATE_S)
            writes: list[tuple[str, bytes | str, str]] = [
                (f"key:{rng.randrange(KEYS)}", values[n % len(values)], "json")
                for n in range(issued, due)
            ]
            issued = due
            await store.put_many(writes)

    await asyncio.gather(*(node_writer(store) for store in stores.values()))
    elapsed = loop.time() - started
    for store in stores.values():
        await store.close()
    report = {"writes": count * len(stores), "seconds": elapsed, "late": late}
    print(json.dumps({**report, "cpu_s": time.process_time()}), flush=True)


# ------------------------------------------------------------------------------------ parent


async def _child(role: str, **kwargs: Any) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.lag",
        "--role",
        role,
        "--child-args",
        json.dumps(kwargs),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def _roots_settle(stores: dict[str, RedisStore], timeout: float) -> float:
    """Seconds until every node holds the same Merkle root (and keeps it for 0.5 s)."""
    started = time.monotonic()
    stable_since: float | None = None
    while time.monotonic() - started < timeout:
        roots = {await s.merkle_root() for s in stores.values()}
        if len(roots) == 1:
            stable_since = stable_since or time.monotonic()
            if time.monotonic() - stable_since >= 0.5:
                return stable_since - started
        else:
            stable_since = None
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the mesh did not converge within {timeout} s")


async def _bare_done(stores: dict[str, RedisStore], writes: int, timeout: float) -> float:
    """Seconds until the bare loops wrote every write on each of the other nodes."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        done = 0
        for store in stores.values():
            done += int(await store.redis.get(APPLIED_KEY) or 0)
        if done >= writes * (len(stores) - 1):
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the bare loops did not finish within {timeout} s")


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


async def run_once(
    rate: float,
    seconds: float,
    relay: bool,
    writers: int,
    workdir: Path,
    hot_path: dict[str, Any],
    tailer: str = "engine",
) -> None:
    what = "engine processes" if tailer == "engine" else "bare-loop processes (no engine)"
    print(
        f"  relay {'on' if relay else 'off'}: {rate:,.0f} writes/s for {seconds:g} s, "
        f"{writers} writer process(es), 3 {what}, 3 redis-servers, "
        f"hot_path {hot_path or 'defaults'}"
    )
    with servers(len(NODES), workdir) as procs:
        urls = {n: p.url for n, p in zip(NODES, procs, strict=True)}
        stores = {n: await RedisStore.connect(urls[n], node_id=n, prefix=PREFIX) for n in NODES}
        interval = hot_path.get(
            "min_read_interval_sec", default_of(HotPathConfig, "min_read_interval_sec")
        )
        engines = {
            n: (
                await _child(
                    "engine",
                    node=n,
                    urls=urls,
                    cursor_path=str(workdir / f"lag-{n}-{time.monotonic_ns()}.db"),
                    relay=relay,
                    hot_path=hot_path,
                )
                if tailer == "engine"
                else await _child("bare", node=n, urls=urls, interval=interval)
            )
            for n in NODES
        }
        try:
            for proc in engines.values():
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
                if line.strip() != b"ready":
                    raise RuntimeError(f"engine process did not start: {line!r}")
            redis_cpu_before = {n: await redis_cpu(s.redis) for n, s in stores.items()}
            commands_before = {n: await command_usec(s.redis) for n, s in stores.items()}
            wall_before = time.perf_counter()
            writer_procs = [
                await _child("writer", urls=urls, rate=rate / writers, seconds=seconds, seed=i)
                for i in range(writers)
            ]
            results = []
            for proc in writer_procs:
                out, _ = await proc.communicate()
                results.append(json.loads(out.decode().strip().splitlines()[-1]))
            writes_done = time.perf_counter()
            written = sum(r["writes"] for r in results)
            if tailer == "engine":
                settle = await _roots_settle(stores, timeout=120)
            else:
                settle = await _bare_done(stores, written, timeout=120)
            wall = time.perf_counter() - wall_before
            redis_used = {
                n: await redis_cpu(s.redis) - redis_cpu_before[n] for n, s in stores.items()
            }
            commands: dict[str, list[int]] = {}  # command -> [calls, usec], every node's
            for n, s in stores.items():
                before = commands_before[n]
                for name, (calls, usec) in (await command_usec(s.redis)).items():
                    was = before.get(name, (0, 0))
                    total = commands.setdefault(name, [0, 0])
                    total[0] += calls - was[0]
                    total[1] += usec - was[1]
            samples: dict[str, list[int]] = {}
            to_stream: list[int] = []
            cpu: dict[str, float] = {}
            batches = 0
            for node, proc in engines.items():
                out, _ = await proc.communicate(b"")
                report = json.loads(out.decode().strip().splitlines()[-1])
                samples[node], cpu[node] = report["samples"], report["cpu_s"]
                to_stream.extend(report["split"])
                batches += report["batches"]
        finally:
            for proc in engines.values():
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            for store in stores.values():
                await store.close()
    writes = sum(r["writes"] for r in results)
    span = max(r["seconds"] for r in results)
    late = sum(r["late"] for r in results)
    print(
        f"    writers: {writes:,} writes in {span:.1f} s ({writes / span:,.0f}/s, "
        f"{late:,} issued >{LATE_S * 1000:.0f} ms late)"
    )
    print(
        f"    converged {settle:.2f} s after the last write was issued "
        f"({writes_done - wall_before:.1f} s of writing); engine CPU "
        + ", ".join(f"{n} {c:.1f} s" for n, c in cpu.items())
        + "; redis CPU "
        + ", ".join(f"{n} {c:.1f} s" for n, c in redis_used.items())
        + f"; writer CPU {sum(r['cpu_s'] for r in results):.1f} s; over {wall:.1f} s wall "
        f"on {os.cpu_count()} CPUs"
    )
    # What the servers' time went to (the bench's own INFO and convergence checks included):
    # the engines' applies and the writers' calls are scripts, each blocking its server.
    busiest = sorted(commands.items(), key=lambda kv: -kv[1][1])[:6]
    print(
        "    redis time by command, all nodes (what a script calls counts in its time too): "
        + ", ".join(
            f"{name} {usec / 1e6:.2f} s ({calls:,} calls, {usec / max(1, calls):.0f} us each)"
            for name, (calls, usec) in busiest
        )
    )
    per_batch_ms = sum(cpu.values()) / max(1, batches) * 1000
    print(
        f"    engines: {batches:,} batches applied, {per_batch_ms:.2f} ms of engine CPU per batch "
        "(reads, decode, apply call, cursor save)"
    )
    if to_stream:
        print(
            f"    of which write to stream entry (the peer's XADD): p50 "
            f"{percentile(to_stream, 0.50):.0f} ms  p90 {percentile(to_stream, 0.90):.0f} ms  "
            f"p99 {percentile(to_stream, 0.99):.0f} ms"
        )
    every = [v for values in samples.values() for v in values]
    for name, values in [*samples.items(), ("all", every)]:
        if not values:
            print(f"    {name:>3}: nothing applied")
            continue
        print(
            f"    {name:>3}: {len(values):>7,} applied  p50 {percentile(values, 0.50):>4.0f} ms  "
            f"p90 {percentile(values, 0.90):>4.0f} ms  p99 {percentile(values, 0.99):>4.0f} ms"
            f"  max {max(values):>5} ms  mean {statistics.fmean(values):.1f} ms"
        )


async def bench_lag(
    rate: float,
    seconds: float,
    relay: str,
    writers: int,
    workdir: Path | None = None,
    min_read_interval_sec: float | None = None,
    tailer: str = "engine",
) -> None:
    print("(b) end-to-end lag (write on one node to applied on another), 3-node full mesh")
    print(f"    method: {__doc__.split('Lag of one replicated write = ')[1].split('.')[0]}")
    modes = {"on": [True], "off": [False], "both": [True, False]}[relay]
    hot_path: dict[str, Any] = {}
    if min_read_interval_sec is not None:
        hot_path["min_read_interval_sec"] = min_read_interval_sec
    tailers = ["engine", "bare"] if tailer == "both" else [tailer]
    runs = [(mode, kind) for mode in modes for kind in tailers]
    async with contextlib.AsyncExitStack() as stack:
        where = workdir if workdir is not None else await stack.enter_async_context(workspace())
        for mode, kind in runs:
            if kind == "bare" and mode:
                continue  # a bare loop never relays
            await run_once(rate, seconds, mode, writers, where, hot_path, kind)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.lag",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rate", type=float, default=5000.0, help="writes/s in total")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of writing")
    parser.add_argument("--relay", choices=["on", "off", "both"], default="both")
    parser.add_argument("--writers", type=int, default=1, help="writer processes")
    parser.add_argument(
        "--min-read-interval-sec",
        type=float,
        default=None,
        help="hot_path.min_read_interval_sec of the engines, seconds (default: the config default)",
    )
    parser.add_argument(
        "--tailer",
        choices=["engine", "bare", "both"],
        default="engine",
        help="what tails the streams: the engine, bare redis-py loops (a floor), or both",
    )
    parser.add_argument(
        "--role",
        choices=["main", "writer", "engine", "bare"],
        default="main",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--child-args", default="{}", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run() -> None:
    args = parse_args()
    child = json.loads(args.child_args)
    if args.role == "writer":
        asyncio.run(_writer_process(**child))
    elif args.role == "engine":
        asyncio.run(_engine_process(**child))
    elif args.role == "bare":
        asyncio.run(_bare_process(**child))
    else:
        asyncio.run(
            bench_lag(
                args.rate,
                args.seconds,
                args.relay,
                args.writers,
                None,
                args.min_read_interval_sec,
                args.tailer,
            )
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    run()
