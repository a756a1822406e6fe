"""Cost of a cold-path repair against the size of the difference, next to a full scan.

    python -m bench.repair [--keys N] [--divergent 10,1000,10000] [--value-bytes 100]

Two redis-server processes: "a" (the peer) and "b" (the node being repaired). Both are
populated with the same N items through the apply path (pipelined, 1,000 per script call, both
servers at once). Then, for each d in ``--divergent``, d items are changed on "a" only (half
newer versions of existing keys, half new keys) and the difference is found and fetched twice:

- by the cold path (Merkle roots, drill into differing branches, fetch differing items, apply);
- by a full scan, the way a tool without a tree would: SCAN every item key on both sides,
  HGETALL each in pipelined batches, compare versions (no apply: the scan alone is the cost).

Reported per d: wall time, Redis round trips and bytes read from the peer (the peer's
ReadCounter for the cold path; the same counting for the scan), the size of the divergent items
themselves, and the ratios. Also the time of an in-sync check (equal roots). No assertions on
speed: this prints figures for people to read.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from redis.asyncio import Redis

from replication_engine.clock import HLC
from replication_engine.codec import Change
from replication_engine.cold_path import ColdPath, RepairStats
from replication_engine.config import ColdPathConfig
from replication_engine.cursor import CursorStore
from replication_engine.observability.metrics import Metrics
from replication_engine.peer import Peer
from replication_engine.store.layout import Keyspace
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisProcess

PREFIX = "bench:"
# Items per apply script call while populating: big enough to amortise the round trip, small
# enough that one call does not block the server for long.
POPULATE_CHUNK = 1000
# Keys per SCAN call and per HGETALL pipeline in the full scan (what a careful tool would use).
SCAN_COUNT = 1000
# Bytes of value entropy drawn once; values are slices of it, so they do not compress away.
VALUE_POOL_BYTES = 1 << 20
# In-sync cycles timed; the first one opens the peer connection and is reported apart.
IN_SYNC_CHECKS = 11


@dataclass
class Cost:
    seconds: float
    round_trips: int
    bytes_read: int


@dataclass
class Row:
    divergent: int
    divergent_bytes: int
    cold: Cost
    cold_fetched: int
    scan: Cost
    scan_found: int


def _values(value_bytes: int) -> Iterator[bytes]:
    pool = os.urandom(VALUE_POOL_BYTES)
    offset = 0
    while True:
        if offset + value_bytes > len(pool):
            offset = 0
        yield pool[offset : offset + value_bytes]
        offset += 7


async def populate(stores: list[RedisStore], keys: int, value_bytes: int) -> float:
    """Write ``keys`` identical items to every store; returns seconds taken."""
    hlc = HLC()
    values = _values(value_bytes)
    started = time.perf_counter()
    for start in range(0, keys, POPULATE_CHUNK):
        chunk = [
            Change.put(f"key:{i:08d}", next(values), hlc=hlc.now(), origin="seed")
            for i in range(start, min(keys, start + POPULATE_CHUNK))
        ]
        await asyncio.gather(*(store.apply_batch(chunk) for store in stores))
    return time.perf_counter() - started


async def diverge(
    peer_store: RedisStore, keys: int, count: int, round_no: int, value_bytes: int
) -> list[str]:
    """Change ``count`` items on the peer only: half newer versions, half new keys."""
    values = _values(value_bytes)
    updated = count // 2
    step = max(1, keys // max(1, updated))
    names = [f"key:{(i * step + round_no) % keys:08d}" for i in range(updated)]
    names += [f"new:{round_no}:{i:08d}" for i in range(count - updated)]
    for start in range(0, len(names), POPULATE_CHUNK):
        chunk = [
            Change.put(name, next(values), hlc=peer_store.clock.now(), origin=peer_store.node_id)
            for name in names[start : start + POPULATE_CHUNK]
        ]
        await peer_store.apply_batch(chunk)
    return names


async def item_bytes(client: Redis, keyspace: Keyspace, names: list[str]) -> int:
    """Stored size of the given items (field names plus values), as a fetch reads them."""
    total = 0
    for start in range(0, len(names), SCAN_COUNT):
        async with client.pipeline(transaction=False) as pipe:
            for name in names[start : start + SCAN_COUNT]:
                pipe.hgetall(keyspace.item(name))
            for raw in await pipe.execute():
                total += sum(len(k) + len(v) for k, v in raw.items())
    return total


async def scan_versions(
    client: Redis, keyspace: Keyspace, cost: Cost
) -> dict[bytes | str, tuple[bytes | None, bytes | None, bytes | None]]:
    """Every item's (hlc, content hash, tombstone flag), by SCAN + pipelined HGETALL."""
    out: dict[bytes | str, tuple[bytes | None, bytes | None, bytes | None]] = {}
    cursor = 0
    while True:
        cursor, batch = await client.scan(cursor, match=keyspace.item_pattern, count=SCAN_COUNT)
        cost.round_trips += 1
        cost.bytes_read += sum(len(k) for k in batch)
        if batch:
            async with client.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.hgetall(key)
                replies = await pipe.execute()
            cost.round_trips += 1
            for key, raw in zip(batch, replies, strict=True):
                cost.bytes_read += sum(len(k) + len(v) for k, v in raw.items())
                out[key] = (raw.get(b"hlc"), raw.get(b"h"), raw.get(b"del"))
        if cursor == 0:
            return out


async def full_scan(
    peer_client: Redis, local_client: Redis, keyspace: Keyspace
) -> tuple[Cost, int]:
    """Find what differs by reading everything; returns the peer-side cost and keys found."""
    peer_cost, local_cost = Cost(0.0, 0, 0), Cost(0.0, 0, 0)
    started = time.perf_counter()
    theirs = await scan_versions(peer_client, keyspace, peer_cost)
    ours = await scan_versions(local_client, keyspace, local_cost)
    found = sum(1 for key, version in theirs.items() if ours.get(key) != version)
    peer_cost.seconds = time.perf_counter() - started
    return peer_cost, found


async def cold_repair(cold: ColdPath) -> RepairStats:
    return await cold.repair_once(force=True)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:,.0f}x" if b else "-"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GB"


def print_table(keys: int, rows: list[Row]) -> None:
    header = (
        f"{'divergent':>9} | {'div. data':>9} | {'cold time':>9} {'RTs':>5} {'read':>9} "
        f"{'read/div':>8} | {'scan time':>9} {'RTs':>6} {'read':>9} | "
        f"{'time x':>7} {'RTs x':>7} {'bytes x':>7}"
    )
    print(f"\nRepair of d divergent items among {keys:,} (peer side: round trips, bytes read)")
    print(header)
    print("-" * len(header))
    for row in rows:
        cold, scan = row.cold, row.scan
        print(
            f"{row.divergent:>9,} | {_size(row.divergent_bytes):>9} | "
            f"{cold.seconds:>8.3f}s {cold.round_trips:>5,} {_size(cold.bytes_read):>9} "
            f"{cold.bytes_read / max(1, row.divergent_bytes):>7.2f}x | "
            f"{scan.seconds:>8.2f}s {scan.round_trips:>6,} {_size(scan.bytes_read):>9} | "
            f"{_ratio(scan.seconds, cold.seconds):>7} "
            f"{_ratio(scan.round_trips, cold.round_trips):>7} "
            f"{_ratio(scan.bytes_read, cold.bytes_read):>7}"
        )
    print("x = full scan / cold path; read/div = cold-path bytes read / divergent item bytes")


async def run(keys: int, divergent: list[int], value_bytes: int) -> None:
    with RedisProcess() as peer_server, RedisProcess() as local_server:
        peer_store = await RedisStore.connect(peer_server.url, node_id="a", prefix=PREFIX)
        local = await RedisStore.connect(local_server.url, node_id="b", prefix=PREFIX)
        peer_client = Redis.from_url(peer_server.url)
        local_client = Redis.from_url(local_server.url)
        with tempfile.TemporaryDirectory() as tmp:
            cursors = await CursorStore.open(Path(tmp) / "cursors.db")
            peers: list[Peer] = []
            try:
                print(
                    f"populating {keys:,} items of {value_bytes} bytes on both servers ...",
                    flush=True,
                )
                seconds = await populate([peer_store, local], keys, value_bytes)
                print(
                    f"populate: {seconds:.1f}s ({keys / seconds:,.0f} items/s per server, "
                    f"both servers at once)",
                    flush=True,
                )

                peer = Peer("a", peer_server.url, prefix=PREFIX, metrics=Metrics())
                peers.append(peer)
                cold = ColdPath(local, [peer], cursors, ColdPathConfig(), Metrics())
                checks = [await cold_repair(cold) for _ in range(IN_SYNC_CHECKS)]
                assert all(c.peers["a"].in_sync for c in checks), checks
                warm = sorted(c.duration_sec * 1000 for c in checks[1:])
                print(
                    f"in-sync check (equal roots): first {checks[0].duration_sec * 1000:.2f} ms "
                    f"(connects), then median {warm[len(warm) // 2]:.2f} ms over "
                    f"{len(warm)}; {checks[-1].round_trips} peer round trip, "
                    f"{checks[-1].bytes_read} bytes read",
                    flush=True,
                )

                rows = []
                for round_no, count in enumerate(divergent):
                    names = await diverge(peer_store, keys, count, round_no, value_bytes)
                    size = await item_bytes(peer_client, peer_store.keys, names)
                    scan, found = await full_scan(peer_client, local_client, peer_store.keys)
                    peer = Peer("a", peer_server.url, prefix=PREFIX, metrics=Metrics())
                    peers.append(peer)
                    settings = ColdPathConfig(max_items_per_cycle=max(count, 1000))
                    cold = ColdPath(local, [peer], cursors, settings, Metrics())
                    stats = await cold_repair(cold)
                    repair = stats.peers["a"]
                    assert repair.error is None and not repair.remaining, repair
                    assert await peer_store.merkle_root() == await local.merkle_root()
                    rows.append(
                        Row(
                            divergent=count,
                            divergent_bytes=size,
                            cold=Cost(repair.duration_sec, repair.round_trips, repair.bytes_read),
                            cold_fetched=repair.items_fetched,
                            scan=scan,
                            scan_found=found,
                        )
                    )
                    print(
                        f"d={count:,}: cold path fetched {repair.items_fetched:,} "
                        f"(visited {repair.branches_visited:,} tree nodes) in "
                        f"{repair.duration_sec:.3f}s; full scan found {found:,} in "
                        f"{scan.seconds:.1f}s",
                        flush=True,
                    )
                print_table(keys, rows)
            finally:
                for peer in peers:
                    await peer.close()
                await cursors.close()
                await peer_client.aclose()
                await local_client.aclose()
                await peer_store.close()
                await local.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.repair",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--keys", type=int, default=1_000_000, help="items on each node")
    parser.add_argument(
        "--divergent",
        default="10,1000,10000",
        help="comma-separated numbers of divergent items, run in turn",
    )
    parser.add_argument("--value-bytes", type=int, default=100, help="size of each value")
    args = parser.parse_args(argv)
    divergent = [int(part) for part in args.divergent.split(",") if part.strip()]
    if args.keys < 1 or any(d < 1 for d in divergent):
        parser.error("--keys and every --divergent value must be >= 1")
    started = time.perf_counter()
    asyncio.run(run(args.keys, divergent, args.value_bytes))
    print(f"total: {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
