"""Write and read amplification of full meshes, with relaying on and off. Prints figures.

    python -m bench.amplification [--writes N] [--sizes 3,5,9] [--rate R] [--value-bytes B]

Each mesh size is run twice, once with ``settings.hot_path.relay`` on and once with it off on
every node; both runs are measured the same way. A run starts fresh ``redis-server`` processes
and one in-process engine per node (hot path only: cold path off, ``start_from: beginning``)
forming a full mesh (every node tails every other node). ``N`` writes with distinct keys are
issued round-robin across the nodes at ``R`` writes per second in total; the run ends when
every tailer is at its peer's stream tail and no stream grows any more. Figures are per write.

Relaying on: a node that applies a remote write re-emits it on its own stream, so every
node's stream carries every write and each tailer reads all of them; those it already has are
deduplicated, its own writes come back as echoes. Relaying off: each node's stream carries only
the writes made on it, and each of the other nodes reads them once (in a full mesh every node
tails every origin directly, so nothing is lost; in a chain or a tree relaying is what carries
writes past the first hop). Measured, in both modes:

- CDC entries written: the sum of every node's stream length (XLEN); bytes written: their
  sizes as below.
- Entries read: the sum of every tailer's entries read; applied, deduplicated (not newer than
  what the node holds) and echoes (the reader's own writes) from the tailers' counters.
- Entry bytes read: for every entry a tailer read, its size as Redis sends it (RESP: id, field
  names and values), computed from the entries themselves. Every tailer started at the
  beginning of an empty stream, and the run checks that each read its peer's whole stream.
- Wire bytes read: every engine reaches its peers through a counting TCP proxy (one per
  server; writers and each engine's own store connect directly), so this is exactly what the
  peers' Redis servers sent to tailers during the run: entries plus what every read carries
  besides them (the ``XINFO STREAM`` reply pipelined with each read, RESP framing, pings).
- Read calls: XREAD + XRANGE commands served (``INFO commandstats``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from redis.asyncio import Redis

from bench.hot_path import servers
from harness.proxy import ThreadedTcpProxy
from replication_engine import codec
from replication_engine.config import EngineConfig
from replication_engine.engine import ReplicationEngine
from replication_engine.store.redis_store import RedisStore

# Key prefix of every node in these runs.
PREFIX = "amp:"
# XREAD BLOCK of the tailers: an idle tailer re-reads this often, so quiescence is seen fast.
BLOCK_TIMEOUT_S = 0.5
# Writes in flight per node; the pace is set by --rate, this only bounds concurrency.
WRITER_CONCURRENCY = 4
# Deadline for a mesh to go quiet after the last write.
IDLE_TIMEOUT_S = 120.0
# How often quiescence is checked; a benchmark may poll, a test would not.
IDLE_POLL_S = 0.1


@dataclass
class Figures:
    """Totals of one run (divide by ``writes`` for per-write figures)."""

    nodes: int
    relay: bool
    writes: int
    seconds: float
    entries_written: int
    entry_bytes_written: int
    entries_read: int
    applied: int
    deduped: int
    echoes: int
    entry_bytes_read: int
    wire_bytes: int
    read_calls: int


def resp_bulk(value: bytes) -> int:
    return len(f"${len(value)}\r\n") + len(value) + 2


def entry_resp_bytes(raw_id: bytes, fields: dict[bytes, bytes]) -> int:
    """Bytes of one stream entry in an XRANGE/XREAD reply: ``*2 id *2k field value ...``."""
    size = len("*2\r\n") + resp_bulk(raw_id) + len(f"*{2 * len(fields)}\r\n")
    return size + sum(resp_bulk(k) + resp_bulk(v) for k, v in fields.items())


def engine_config(
    node_id: str,
    urls: dict[str, str],
    peer_urls: dict[str, str],
    cursor_path: Path,
    relay: bool,
) -> EngineConfig:
    return EngineConfig.model_validate(
        {
            "local_node_id": node_id,
            "local": {"redis_url": urls[node_id], "prefix": PREFIX},
            "settings": {
                "cold_path": {"enabled": False},
                "hot_path": {"block_timeout_sec": BLOCK_TIMEOUT_S, "relay": relay},
            },
            "peers": [
                {"node_id": p, "redis_url": url, "prefix": PREFIX, "start_from": "beginning"}
                for p, url in peer_urls.items()
                if p != node_id
            ],
            "cursor": {"sqlite_path": str(cursor_path)},
            "http": {"enabled": False},
        }
    )


async def read_calls(client: Redis) -> int:
    stats = await client.info("commandstats")
    return sum(
        int(entry["calls"])
        for name in ("cmdstat_xread", "cmdstat_xrange")
        if isinstance(entry := stats.get(name), dict)
    )


async def write_all(
    stores: dict[str, RedisStore], writes: int, rate: float, value_bytes: int
) -> None:
    """``writes`` puts of distinct keys, round-robin over the nodes, ``rate`` per second."""
    rng = random.Random(7)
    values = [rng.randbytes(value_bytes) for _ in range(64)]
    owners = [stores[n] for n in sorted(stores)]
    pending = iter(range(writes))
    started = time.monotonic()

    async def worker() -> None:
        for i in pending:  # shared iterator: each write is taken by exactly one worker
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the load, not synchronising
            await owners[i % len(owners)].put(f"w:{i:07d}", values[i % len(values)])

    await asyncio.gather(*(worker() for _ in range(WRITER_CONCURRENCY * len(owners))))


def caught_up(engine: ReplicationEngine, tails: dict[str, str | None]) -> bool:
    for peer_id, tailer in engine.tailers.items():
        tail = tails[peer_id]
        if tail is None:
            continue
        if tailer.cursor is None or tailer.cursor < codec.parse_stream_id(tail):
            return False
        if tailer.mode != "tailing":
            return False
    return len(engine.tailers) == len(engine.peers)


async def wait_quiet(engines: dict[str, ReplicationEngine], stores: dict[str, RedisStore]) -> None:
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        tails = {n: await s.stream_tail() for n, s in stores.items()}
        if all(caught_up(e, tails) for e in engines.values()):
            if tails == {n: await s.stream_tail() for n, s in stores.items()}:
                return
        await asyncio.sleep(IDLE_POLL_S)
    raise TimeoutError(f"mesh of {len(stores)} did not go quiet in {IDLE_TIMEOUT_S}s")


async def xrange(store: RedisStore, start: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    entries = await store.redis.xrange(store.keys.cdc, min=start, max="+", count=1000)
    return cast(list[tuple[bytes, dict[bytes, bytes]]], entries)


async def stream_sizes(store: RedisStore) -> tuple[int, int]:
    """(entries in the store's stream, their RESP bytes)."""
    entries = total = 0
    start = "-"
    while batch := await xrange(store, start):
        entries += len(batch)
        total += sum(entry_resp_bytes(raw_id, fields) for raw_id, fields in batch)
        start = f"({batch[-1][0].decode()}"
    return entries, total


async def run_mesh(
    nodes: int, relay: bool, writes: int, rate: float, value_bytes: int, workdir: Path
) -> Figures:
    node_ids = [f"n{i}" for i in range(nodes)]
    mode = "relay" if relay else "norelay"
    with servers(nodes, workdir) as procs, contextlib.ExitStack() as stack:
        urls = {n: p.url for n, p in zip(node_ids, procs, strict=True)}
        proxies = {
            n: stack.enter_context(ThreadedTcpProxy(p.host, p.port))
            for n, p in zip(node_ids, procs, strict=True)
        }
        peer_urls = {n: proxy.url_for() for n, proxy in proxies.items()}
        stores = {n: await RedisStore.connect(urls[n], node_id=n, prefix=PREFIX) for n in node_ids}
        engines = {
            n: ReplicationEngine(
                engine_config(n, urls, peer_urls, workdir / f"{n}-{nodes}-{mode}.db", relay),
                store=stores[n],
            )
            for n in node_ids
        }
        try:
            for engine in engines.values():
                await engine.start()
            await wait_quiet(engines, stores)
            bytes_before = sum(proxy.stats.bytes_down for proxy in proxies.values())
            calls_before = [await read_calls(s.redis) for s in stores.values()]
            started = time.monotonic()
            await write_all(stores, writes, rate, value_bytes)
            await wait_quiet(engines, stores)
            seconds = time.monotonic() - started
            bytes_after = sum(proxy.stats.bytes_down for proxy in proxies.values())
            calls_after = [await read_calls(s.redis) for s in stores.values()]
            sizes = {n: await stream_sizes(s) for n, s in stores.items()}
            tailers = [t for e in engines.values() for t in e.tailers.values()]
            entries_read = sum(t.stats.read for t in tailers)
            # Every tailer started at the beginning of an empty stream, so it read its peer's
            # whole stream (with relaying on or off): that makes the per-entry byte counts exact.
            for engine in engines.values():
                for peer_id, tailer in engine.tailers.items():
                    if tailer.stats.read != sizes[peer_id][0]:
                        raise RuntimeError(
                            f"{engine.node_id} read {tailer.stats.read} of "
                            f"{peer_id}'s {sizes[peer_id][0]} entries"
                        )
            return Figures(
                nodes=nodes,
                relay=relay,
                writes=writes,
                seconds=seconds,
                entries_written=sum(s[0] for s in sizes.values()),
                entry_bytes_written=sum(s[1] for s in sizes.values()),
                entries_read=entries_read,
                applied=sum(t.stats.applied for t in tailers),
                deduped=sum(t.stats.deduped for t in tailers),
                echoes=sum(t.stats.echoes for t in tailers),
                # Each stream is read whole by each of the other nodes' tailers.
                entry_bytes_read=(nodes - 1) * sum(s[1] for s in sizes.values()),
                wire_bytes=bytes_after - bytes_before,
                read_calls=sum(a - b for b, a in zip(calls_before, calls_after, strict=True)),
            )
        finally:
            for engine in engines.values():
                await engine.shutdown()
            for store in stores.values():
                await store.close()


def table_row(f: Figures) -> list[str]:
    def per(value: int, digits: int = 2) -> str:
        return f"{value / f.writes:.{digits}f}"

    return [
        str(f.nodes),
        "on" if f.relay else "off",
        per(f.entries_written),
        per(f.entry_bytes_written, 0),
        per(f.entries_read),
        per(f.applied),
        per(f.deduped),
        per(f.echoes),
        per(f.entry_bytes_read, 0),
        per(f.wire_bytes, 0),
        per(f.read_calls),
    ]


HEADER = [
    "nodes",
    "relay",
    "entries written",
    "bytes written",
    "entries read",
    "applied",
    "deduped",
    "echoes",
    "entry bytes read",
    "wire bytes read",
    "read calls",
]


def print_table(figures: list[Figures], value_bytes: int) -> None:
    table = [HEADER] + [table_row(f) for f in figures]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEADER))]
    print(f"\nper write ({figures[0].writes} writes of {value_bytes}-byte values per mesh):")
    for i, row in enumerate(table):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for f in figures:
        relay = "on" if f.relay else "off"
        print(f"{f.nodes} nodes, relay {relay}: {f.seconds:.1f} s from first write to quiet")


async def main(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="re-bench-amp-") as tmp:
        workdir = Path(tmp)
        figures: list[Figures] = []
        for nodes in sizes:
            for relay in (True, False):
                figures.append(
                    await run_mesh(nodes, relay, args.writes, args.rate, args.value_bytes, workdir)
                )
                print(f"{nodes} nodes, relay {'on' if relay else 'off'}: done", flush=True)
        print_table(figures, args.value_bytes)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.amplification",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--writes", type=int, default=2000, help="writes per mesh size")
    parser.add_argument("--sizes", default="3,5,9", help="mesh sizes, comma-separated")
    parser.add_argument("--rate", type=float, default=500.0, help="writes per second in total")
    parser.add_argument("--value-bytes", type=int, default=200, help="bytes per value")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> Any:
    asyncio.run(main(parse_args(argv)))


if __name__ == "__main__":
    run()
