"""Stream catch-up by a sidecar process with a mesh node's default config, start-up included.
Prints figures; asserts nothing.

    python -m bench.sidecar [--backlog N] [--repeat K]

What an operator waits for when a node joins with ``start_from: beginning``, or comes back after
a long stop: from starting ``replication-engine run`` until the node has applied its peer's whole
stream.

A peer store gets ``N`` items of 1 KiB JSON through ``RedisStore.put_many``, so its stream, its
items and its tree agree as a real peer's do. Each repeat then runs, on fresh local servers:

- the bare loop of ``bench.hot_path`` (``XRANGE`` batches of 1000, decompress, verify the hash,
  pipelined ``HSET``) in this process, before and after the sidecar; the ratio uses their mean;
- ``replication-engine run --config FILE`` as a child process. ``FILE`` is
  ``config.example.yaml``'s settings (a mesh node: relay off, the cold path on, HTTP on) with
  only the node ids, addresses, prefix, cursor path, HTTP port and the peer's
  ``start_from: beginning`` changed. It is timed from the spawn until the local store records
  that it has applied the peer's stream up to its tail (the anchor in the store's record, read
  from Redis as an operator could), so interpreter start-up, imports and opening the store count.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from redis.asyncio import Redis

from bench.hot_path import (
    PAYLOAD_BYTES,
    PREFIX,
    baseline_catch_up,
    json_payload,
    redis_cpu,
    servers,
)
from replication_engine import codec
from replication_engine.codec import StreamId
from replication_engine.knowledge import NodeRecord
from replication_engine.store.layout import Keyspace
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import redis_server_version

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"
# Items per put_many call while filling the peer.
FILL_BATCH = 1000
# How often the local store's record is read while the sidecar catches up (seconds).
POLL_S = 0.02
# Longest wait for one catch-up before the run is abandoned (seconds).
DEADLINE_S = 600.0


async def fill_peer(url: str, items: int) -> StreamId:
    """Write ``items`` distinct keys through the store's write path; the stream's tail id."""
    rng = random.Random(7)
    store = await RedisStore.connect(
        url, node_id="peer", prefix=PREFIX, stream_maxlen=items + FILL_BATCH
    )
    try:
        # A peer's engine gives its store a record; without one its stream has no epoch that a
        # reader could anchor to (docs/DELETES.md, "Claims").
        await store.open_record(mode="mesh", relay=False)
        for first in range(0, items, FILL_BATCH):
            await store.put_many(
                [
                    (f"user:{i:08d}", json_payload(i, PAYLOAD_BYTES, rng), "application/json")
                    for i in range(first, min(items, first + FILL_BATCH))
                ]
            )
    finally:
        await store.close()
    redis = Redis.from_url(url)
    try:
        stream = Keyspace(PREFIX).cdc
        length = await redis.xlen(stream)
        newest: Any = await redis.xrevrange(stream, count=1)
    finally:
        await redis.aclose()
    assert length == items, f"the peer's stream holds {length} entries, not {items}"
    return codec.parse_stream_id(newest[0][0])


def sidecar_config(local_url: str, peer_url: str, workdir: Path) -> Path:
    """The example config, as a mesh node that copied it would run it, pointed at these servers."""
    config: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    node = config["replication"]
    node["local_node_id"] = "local"
    node["local"]["redis_url"] = local_url
    node["local"]["prefix"] = PREFIX
    node["peers"] = [{"node_id": "peer", "redis_url": peer_url, "start_from": "beginning"}]
    node["cursor"]["sqlite_path"] = str(workdir / f"cursor-{time.monotonic_ns()}.db")
    node["http"]["listen"] = "127.0.0.1:0"  # any free port
    path = workdir / f"sidecar-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def applied_up_to(local: Redis) -> StreamId | None:
    """How far the local store has applied the peer's stream, from its record's anchor."""
    raw: dict[bytes, bytes] = await local.hgetall(Keyspace(PREFIX).record)  # type: ignore[assignment]
    record = NodeRecord.from_fields({k.decode(): v.decode() for k, v in raw.items()})
    anchor = record.anchors.get("peer") if record is not None else None
    return None if anchor is None else StreamId(*anchor.stream_id)


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sidecar_catch_up(
    peer_url: str, local_url: str, tail: StreamId, workdir: Path
) -> tuple[float, int, dict[str, float], dict[str, tuple[float, int]]]:
    """Seconds from spawning the sidecar until its store has applied ``tail``; its exit code
    after SIGTERM (0 for a clean drain); the CPU seconds the sidecar, the local Redis and the
    peer's Redis spent meanwhile; the local Redis's seconds and calls per command."""
    config = sidecar_config(local_url, peer_url, workdir)
    log = (workdir / f"{config.stem}.log").open("wb")
    local, peer = Redis.from_url(local_url), Redis.from_url(peer_url)
    redis_before = {"local": await redis_cpu(local), "peer": await redis_cpu(peer)}
    await local.config_resetstat()  # commandstats from here: the sidecar's calls only
    started = time.perf_counter()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "replication_engine",
        "run",
        "--config",
        str(config),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        while True:
            position = await applied_up_to(local)
            if position is not None and position >= tail:
                elapsed = time.perf_counter() - started
                cpu = {"sidecar": process_cpu(child.pid)}
                for name, redis in (("local", local), ("peer", peer)):
                    cpu[name] = await redis_cpu(redis) - redis_before[name]
                commands = await command_seconds(local)
                break
            if child.returncode is not None:
                raise RuntimeError(f"the sidecar exited with {child.returncode}; see {log.name}")
            if time.perf_counter() - started > DEADLINE_S:
                raise RuntimeError(f"no catch-up within {DEADLINE_S:.0f} s; see {log.name}")
            await asyncio.sleep(POLL_S)  # polling another process's progress through Redis
        child.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(child.wait(), 60)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
        await local.aclose()
        await peer.aclose()
        log.close()
    return elapsed, code, cpu, commands


async def command_seconds(redis: Redis) -> dict[str, tuple[float, int]]:
    """Seconds and calls per command since the last ``CONFIG RESETSTAT``, from commandstats."""
    stats = await redis.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(fields["usec"]) / 1e6, int(fields["calls"]))
        for name, fields in stats.items()
    }


def describe_commands(commands: dict[str, tuple[float, int]], events: int) -> str:
    """The local Redis's time by command, the apply script's per event and per call."""
    script_s, calls = commands.get("evalsha", (0.0, 0))
    rest = sorted(
        ((s, name) for name, (s, _) in commands.items() if name != "evalsha"), reverse=True
    )
    others = ", ".join(f"{name} {s * 1e3:.0f} ms" for s, name in rest[:4])
    per_call = script_s / calls * 1e3 if calls else 0.0
    return (
        f"apply script {script_s:.2f} s in {calls:,} calls ({script_s / events * 1e6:.1f} us "
        f"per event, {per_call:.1f} ms per call); besides: {others or 'nothing'}"
    )


async def run(backlog: int, repeat: int, workdir: Path) -> None:
    with servers(1, workdir) as (peer,):
        version = ".".join(map(str, redis_server_version(peer.binary)))
        print(
            f"sidecar catch-up of {backlog:,} events of {PAYLOAD_BYTES} B JSON, "
            f"config.example.yaml defaults for a mesh node, redis-server {version}"
        )
        filling = time.perf_counter()
        tail = await fill_peer(peer.url, backlog)
        print(f"  peer filled through put_many in {time.perf_counter() - filling:.1f} s")
        ratios, rates, bases = [], [], []
        for i in range(repeat):
            with servers(3, workdir) as (before, local, after):
                base_before = await baseline_catch_up(peer.url, before.url, tail)
                seconds, code, cpu, commands = await sidecar_catch_up(
                    peer.url, local.url, tail, workdir
                )
                base_after = await baseline_catch_up(peer.url, after.url, tail)
            base_rate = backlog / ((base_before + base_after) / 2)
            rate = backlog / seconds
            ratios.append(rate / base_rate)
            rates.append(rate)
            bases.append(base_rate)
            print(
                f"  run {i + 1}: bare loop {base_rate:,.0f} events/s ({base_before:.2f} s before, "
                f"{base_after:.2f} s after); sidecar {rate:,.0f} events/s ({seconds:.2f} s from "
                f"spawn, exit {code}); ratio {rate / base_rate:.2f} (target >= 0.9)\n"
                f"    CPU meanwhile: sidecar {cpu['sidecar']:.2f} s, local redis "
                f"{cpu['local']:.2f} s, peer redis {cpu['peer']:.2f} s\n"
                f"    local redis: {describe_commands(commands, backlog)}"
            )
    print(
        f"  ratio median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-"
        f"{max(ratios):.2f}); sidecar median {statistics.median(rates):,.0f} events/s, bare loop "
        f"{statistics.median(bases):,.0f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sidecar", description=__doc__)
    parser.add_argument("--backlog", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with tempfile.TemporaryDirectory(prefix="re-sidecar-") as tmp:
        asyncio.run(run(args.backlog, args.repeat, Path(tmp)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
