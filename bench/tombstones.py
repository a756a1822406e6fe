"""Tombstone collection by knowledge, measured: how fast with every member up, how it waits for
a stopped member, how ``forget`` releases it, and what a held tombstone costs in Redis memory.

A 3-node full mesh (relay off, in-process engines, each Redis its own process). Phases:

1. every member up: ``--deletes`` keys are written and then deleted on node a; the tombstone
   count on every node is sampled each membership tick until it is back to zero;
2. node c stopped (engine and Redis): as many deletes again; the count on a grows and stays,
   and ``replication_member_holding_collection_seconds{member="c"}`` (the metric the alert
   ``ReplicationCollectionHeldBack`` watches) grows with the wait;
3. ``forget c`` on a: collection resumes and the count returns to zero.

Memory per held tombstone: ``used_memory`` of a fresh Redis before and after ``--deletes``
deletes of keys that never held a value (item hash, leaf entry, tombstone index entry).

    python -m bench.tombstones --deletes 20000
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.chaos import ChaosMesh
from harness.mesh import redis_processes
from replication_engine.observability.logs import setup_logging
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import async_wait_until

# Membership tick of the mesh (seconds): the production default is 2 s.
TICK_S = 0.5
# Longest wait for the tombstones to go (seconds).
DEADLINE_S = 300.0
SETTINGS: dict[str, Any] = {
    "hot_path": {"relay": False, "block_timeout_sec": 0.2},
    "cold_path": {"interval_sec": 5.0},
    "membership": {"interval_sec": TICK_S, "gc_batch": 1000},
}


async def _counts(mesh: ChaosMesh, nodes: list[str]) -> dict[str, int]:
    return {n: await mesh[n].store.tombstone_count() for n in nodes}


async def _write_then_delete(store: RedisStore, prefix: str, count: int) -> float:
    """Puts then deletes ``count`` keys; returns when the last delete was acknowledged."""
    chunk = 1000
    for start in range(0, count, chunk):
        keys = [f"{prefix}:{i}" for i in range(start, min(count, start + chunk))]
        await store.put_many([(key, b"v" * 100, "binary") for key in keys])
    for start in range(0, count, chunk):
        await asyncio.gather(
            *(store.delete(f"{prefix}:{i}") for i in range(start, min(count, start + chunk)))
        )
    return time.monotonic()


async def _until_collected(mesh: ChaosMesh, nodes: list[str], since: float) -> float:
    async def none_left() -> bool:
        return not any((await _counts(mesh, nodes)).values())

    await async_wait_until(none_left, timeout=DEADLINE_S, interval=TICK_S / 5)
    return time.monotonic() - since


async def _memory_per_tombstone(make: Any, count: int) -> float:
    server = make()
    store = await RedisStore.connect(server.url, node_id="m", prefix="mem:")
    try:
        await store.put("warm-up", b"v")
        await store.delete("warm-up")
        await store.redis.delete(store.keys.cdc)
        before = int((await store.redis.info("memory"))["used_memory"])
        chunk = 1000
        for start in range(0, count, chunk):
            await asyncio.gather(
                *(store.delete(f"never-written:{i}") for i in range(start, start + chunk))
            )
        # The DEL entries in the stream are not what a held tombstone costs (the stream is
        # capped at local.stream_maxlen whether or not anything is collected).
        await store.redis.delete(store.keys.cdc)
        after = int((await store.redis.info("memory"))["used_memory"])
        return (after - before) / count
    finally:
        await store.close()


async def run(deletes: int, workdir: Path) -> None:
    with redis_processes(workdir) as make:
        per_tombstone = await _memory_per_tombstone(make, deletes)
        mesh = await ChaosMesh.open(["a", "b", "c"], workdir / "mesh", make, settings=SETTINGS)
        try:
            a = mesh["a"]
            done = await _write_then_delete(a.store, "phase1", deletes)
            peak = await _counts(mesh, ["a", "b", "c"])
            took = await _until_collected(mesh, ["a", "b", "c"], done)
            print(
                f"1. all members up: {deletes:,} deletes on a; tombstones right after the last "
                f"delete {peak}; zero on every node {took:.1f} s after it "
                f"({took / TICK_S:.0f} ticks of {TICK_S} s)"
            )

            await mesh.stop_engine("c")
            mesh.kill_redis("c")
            await _write_then_delete(a.store, "phase2", deletes)
            held_for = 10 * TICK_S * 4
            started = time.monotonic()
            counts = await _counts(mesh, ["a", "b"])

            def holding() -> float:
                return a.metric_total("replication_member_holding_collection_seconds", member="c")

            await async_wait_until(
                lambda: time.monotonic() - started >= held_for and holding() > 0,
                timeout=DEADLINE_S,
                interval=TICK_S,
            )
            still = await _counts(mesh, ["a", "b"])
            print(
                f"2. c stopped (engine and Redis): {deletes:,} more deletes on a; tombstones "
                f"{counts} then {still} {held_for:.0f} s later; a's "
                f'replication_member_holding_collection_seconds{{member="c"}} = '
                f"{holding():.1f} (ReplicationCollectionHeldBack fires past 1800); "
                f"a's /status says held_back_by={a.membership()['held_back_by']!r}"
            )

            forgotten_at = time.monotonic()
            await a.running().forget("c")
            mesh.forgotten.add("c")
            took = await _until_collected(mesh, ["a", "b"], forgotten_at)
            print(f"3. forget c on a: zero tombstones on a and b {took:.1f} s later")
        finally:
            await mesh.aclose()
        print(
            f"memory per held tombstone: {per_tombstone:.0f} bytes of Redis used_memory "
            f"(item hash, leaf entry, tombstone index entry; keys of ~20 bytes; the capped CDC "
            f"stream's DEL entries not counted)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tombstones", description=__doc__)
    parser.add_argument("--deletes", type=int, default=20_000)
    args = parser.parse_args(argv)
    # The stopped member's engine and peers warn about it, as they should; errors still show.
    setup_logging("ERROR", json_format=False)
    workdir = Path(tempfile.mkdtemp(prefix="re-tombstones-"))
    try:
        asyncio.run(run(args.deletes, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
