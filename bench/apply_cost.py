"""Instructions Redis spends in the apply script per event, counted by callgrind.

Wall-clock benchmarks on a shared 2-core machine swing by tens of percent; instruction counts
do not. This starts ``redis-server`` under ``valgrind --tool=callgrind``, applies ``--events``
fresh 1 KiB values in batches of ``--batch`` through ``RedisStore.apply_batch`` (relay off, as
a full mesh runs), and again with no events, and prints the difference per event. Run it with
``PYTHONPATH`` pointing at another checkout to compare two versions of the scripts::

    python -m bench.apply_cost --events 20000
    (cd ../old && PYTHONPATH=. python -m bench.apply_cost --events 20000)

The second form needs this file in that checkout too (copy it). Needs valgrind (Debian's
``valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from replication_engine import clock
from replication_engine.codec import Change
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import find_redis_server, free_port

# Seconds to wait for the server under valgrind to answer (it starts ~50x slower).
START_DEADLINE_S = 60.0


async def _apply(port: int, events: int, batch: int, relay: bool) -> None:
    store = await RedisStore.connect(f"redis://127.0.0.1:{port}/0", node_id="here", prefix="c:")
    try:
        base = clock.wall_clock_ms()
        value = b"x" * 1024
        for start in range(0, events, batch):
            changes = [
                Change.put(
                    f"key:{i}", value + str(i).encode(), hlc=clock.pack(base, i), origin="peer"
                )
                for i in range(start, min(events, start + batch))
            ]
            await store.apply_batch(changes, relay=relay)
    finally:
        await store.close()


def _instructions(events: int, batch: int, relay: bool, workdir: Path) -> int:
    port = free_port()
    out = workdir / f"callgrind.{events}.out"
    server = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            find_redis_server(),
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + START_DEADLINE_S
        while (
            subprocess.run(
                ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
            ).stdout.strip()
            != "PONG"
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server under valgrind did not answer")
            time.sleep(0.2)  # polling a process that starts slowly under valgrind
        asyncio.run(_apply(port, events, batch, relay))
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)
        server.wait(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    match = re.search(rb"^summary: (\d+)", out.read_bytes(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no summary line in {out}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.apply_cost", description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--relay", action="store_true", help="re-emit applied versions")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind not found (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="re-apply-cost-") as tmp:
        workdir = Path(tmp)
        empty = _instructions(0, args.batch, args.relay, workdir)
        full = _instructions(args.events, args.batch, args.relay, workdir)
    per_event = (full - empty) / args.events
    print(
        f"apply script: {per_event:,.0f} instructions per event "
        f"({args.events:,} fresh 1 KiB values in batches of {args.batch}, relay "
        f"{'on' if args.relay else 'off'}; redis-server under callgrind)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
