"""``replication-engine migrate`` on a populated format-1 store. Prints figures.

    python -m bench.migrate [--items N] [--value-bytes B] [--batch K] [--during M]

Two redis-server processes, "a" and "b", get the same N items through the apply path. Node a's
store is then turned back into format 1 (``harness.format1``: the layout the previous release
wrote, claims and stream included) and converted by the real command, ``python -m
replication_engine migrate --config``, whose output is printed, while node b's application
writes M more items. Afterwards a's converted store must hold what b held before (equal roots
once b's new items are set aside), and then an engine pair, one per node, must bring a the items
b took meanwhile: the time until their roots are equal is printed. Numbers only.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from bench.hot_path import servers, workspace
from bench.repair import populate
from harness.format1 import to_format1
from replication_engine.config import EngineConfig
from replication_engine.engine import ReplicationEngine
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import async_wait_until

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
            before_b = await stores[1].merkle_root()
            for label, extra in (("dry run", ["--dry-run"]), ("migrate", [])):
                print(f"$ replication-engine migrate --config a.yaml {' '.join(extra)}".rstrip())
                started = time.monotonic()
                writing = None
                if not extra:  # b's application keeps writing while a converts
                    writing = asyncio.create_task(_write(stores[1], args.during))
                process = await asyncio.create_subprocess_exec(
                    *command,
                    *extra,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
                output, _ = await process.communicate()
                print(output.decode().rstrip())
                print(f"  ({label}: exit {process.returncode}, {time.monotonic() - started:.1f}s)")
                if writing is not None:
                    print(f"  (node b took {await writing:,} writes meanwhile)")
            reopened = await RedisStore.connect(a.url, node_id="a", prefix=PREFIX)
            root_a = await reopened.merkle_root()
            verdict = "equal" if root_a == before_b else "DIFFER"
            print(f"roots: a converted {root_a.hex()}, b before {before_b.hex()}: {verdict}")
            took = await _converge(a.url, b.url, workdir, reopened, stores[1])
            print(f"engines on a and b: roots equal {took:.1f}s after they started")
            for store in (reopened, *stores):
                await store.close()


async def _write(store: RedisStore, count: int) -> int:
    for first in range(0, count, 500):
        chunk = range(first, min(first + 500, count))
        await store.put_many([(f"during:{i}", b"written while a converts", "text") for i in chunk])
    return count


async def _converge(
    a_url: str, b_url: str, workdir: Path, a_store: RedisStore, b_store: RedisStore
) -> float:
    """Seconds from starting an engine on each node until their roots are equal."""
    engines = []
    for me, url, peer, peer_url in (("a", a_url, "b", b_url), ("b", b_url, "a", a_url)):
        config = {
            "local_node_id": me,
            "local": {"redis_url": url, "prefix": PREFIX},
            "peers": [{"node_id": peer, "redis_url": peer_url, "prefix": PREFIX}],
            "settings": {"cold_path": {"interval_sec": 1}},
            "cursor": {"sqlite_path": str(workdir / f"cursors-{me}.db")},
            "http": {"enabled": False},
        }
        engines.append(ReplicationEngine(EngineConfig.model_validate(config)))
    started = time.monotonic()
    for engine in engines:
        await engine.start()
    try:

        async def equal() -> bool:
            return await a_store.merkle_root() == await b_store.merkle_root()

        await async_wait_until(equal, timeout=600, interval=0.05)
        return time.monotonic() - started
    finally:
        for engine in engines:
            await engine.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--value-bytes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--during", type=int, default=10_000, help="b's writes during it")
    asyncio.run(main(parser.parse_args()))
