"""What two idle nodes cost, by the number of partitions of their stores. Prints figures.

    python -m bench.idle [--partitions 1,16,64] [--seconds 10]

For each count, two engines in this process replicate with each other (a full mesh of two real
``redis-server`` processes, default settings but the geometry: fanout = partitions, depth 2;
the test harness's short blocking read and disabled cold path are put back to the defaults),
nothing is written, and the process's CPU time is read over ``--seconds`` once both have
started and settled. Each partition of a node tails each peer, certifies its record, collects
and scrubs on its own schedule, so the cost grows with the partitions; one partition is the
baseline, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path

from harness.mesh import open_mesh, redis_processes
from replication_engine.config.models import HotPathConfig

SETTLE_S = 3.0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def idle_share(partitions: int, seconds: float, workdir: Path) -> float:
    """CPU of two idle engines of ``partitions`` partitions, as a share of one core."""
    fanout = partitions if partitions > 1 else 256
    defaults = HotPathConfig()
    common = {
        "settings": {
            "merkle": {"fanout": fanout, "depth": 2, "partitions": partitions},
            "hot_path": {"block_timeout_sec": defaults.block_timeout_sec},
            "cold_path": {"enabled": True},
        }
    }
    with redis_processes(workdir) as make:
        async with open_mesh(make, workdir, {"a": ["b"], "b": ["a"]}, common=common):
            await asyncio.sleep(SETTLE_S)  # the first reads, certifications and repairs
            cpu, started = _cpu_seconds(), time.monotonic()
            await asyncio.sleep(seconds)  # measuring idleness: nothing to wait for
            return (_cpu_seconds() - cpu) / (time.monotonic() - started)


async def main(args: argparse.Namespace) -> None:
    counts = [int(n) for n in args.partitions.split(",")]
    print(f"two idle nodes, CPU of this process over {args.seconds:.0f} s (share of one core)")
    base = None
    for count in counts:
        with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
            share = await idle_share(count, args.seconds, Path(tmp))
        base = share if base is None else base
        print(
            f"  {count:>3} partition(s): {share * 100:5.1f}% of a core, "
            f"{share / base:4.1f}x the first row, {share * 100 / count / 2:.2f}% per partition "
            f"per node"
        )


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--partitions", default="1,16,64", help="comma-separated counts")
    parser.add_argument("--seconds", type=float, default=10.0)
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    run()
