"""``replication-engine migrate`` on a populated format-1 store. Prints figures.

    python -m bench.migrate [--items N] [--value-bytes B] [--batch K]

Two redis-server processes, "a" and "b", get the same N items through the apply path. Node a's
store is then turned back into format 1 (``harness.format1``: the layout the previous release
wrote, claims and stream included) and converted by the real command, ``python -m
replication_engine migrate --config``, whose output is printed as it comes. Afterwards a's root
must equal b's (the same data, laid out as format 2) and its store must open. Numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

from bench.hot_path import servers, workspace
from bench.repair import populate
from harness.format1 import to_format1
from replication_engine.store.redis_store import RedisStore

PREFIX = "app:"


async def main(args: argparse.Namespace) -> None:
    async with workspace() as workdir:
        with servers(2, workdir) as (a, b):
            stores = [
                await RedisStore.connect(s.url, node_id=n, prefix=PREFIX)
                for s, n in ((a, "a"), (b, "b"))
            ]
            took = await populate(stores, args.items, args.value_bytes)
            print(f"populated {args.items:,} items of {args.value_bytes} B on both in {took:.1f}s")
            await to_format1(stores[0].redis, PREFIX, stores[0].geometry)
            keys = await stores[0].redis.dbsize()
            print(f"node a's store turned back into format 1 ({keys:,} keys)")
            config = workdir / "a.yaml"
            config.write_text(
                f"local_node_id: a\nlocal:\n  redis_url: {a.url}\n  prefix: '{PREFIX}'\n"
                f"peers:\n  - node_id: b\n    redis_url: {b.url}\n    prefix: '{PREFIX}'\n"
            )
            command = [sys.executable, "-m", "replication_engine", "migrate"]
            command += ["--config", str(config), "--batch", str(args.batch)]
            for label, extra in (("dry run", ["--dry-run"]), ("migrate", [])):
                print(f"$ replication-engine migrate --config a.yaml {' '.join(extra)}".rstrip())
                started = time.monotonic()
                done = subprocess.run(  # noqa: ASYNC221 - the command under measurement
                    [*command, *extra], capture_output=True, text=True, check=False
                )
                print(done.stdout.rstrip() + done.stderr.rstrip())
                print(f"  ({label}: exit {done.returncode}, {time.monotonic() - started:.1f}s)")
            reopened = await RedisStore.connect(a.url, node_id="a", prefix=PREFIX)
            root_a, root_b = await reopened.merkle_root(), await stores[1].merkle_root()
            verdict = "equal" if root_a == root_b else "DIFFER"
            print(f"roots: a {root_a.hex()} b {root_b.hex()}: {verdict}")
            for store in (reopened, *stores):
                await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1000)
    asyncio.run(main(parser.parse_args()))
