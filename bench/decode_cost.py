"""Instructions this process spends per event a tailer reads, counted by callgrind.

The apply script's cost is counted inside Redis by ``bench.apply_cost``; this counts the other
half of a catch-up, the tailer's own Python, which bounds a sidecar's catch-up as often as the
script does (both run near their limit on two cores). One batch of ``--entries`` stream entries
of 1 KiB JSON (the other benches' values, about 600 bytes compressed), in the shape a peer's
``XRANGE`` reply has on the wire, goes through the engine's own code, each stage on top of the
one before:

- ``read``: the reply parsed by hiredis as ``replication_engine.wire`` reads it, and its
  fields paired (``peer._entries``);
- ``decode``: ``Tailer._decode``, which parses ids, decodes and verifies every entry
  (decompress, content hash, meta) and coalesces the batch;
- ``prepare``: ``RedisStore.prepare_apply``, relay off: leaf digests, the items packed for the
  apply script.

Each stage runs ``--batches`` times in a child process under ``valgrind --tool=callgrind``,
and once more with no batches; the difference, per event, is the figure (imports and set-up
cancel out). Wall-clock figures on a shared 2-core machine swing by tens of percent; these do
not. Compare two versions with ``PYTHONPATH`` pointing at the other checkout (which needs this
file too)::

    python -m bench.decode_cost
    (cd ../old && PYTHONPATH=. python -m bench.decode_cost)

Needs valgrind (Debian's ``valgrind``); a run takes a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import hiredis
import pybreaker
from redis.asyncio import Redis

from bench.hot_path import PAYLOAD_BYTES, engine_config, json_payload
from replication_engine import clock, codec, peer
from replication_engine.hot_path import Tailer, TailerSettings
from replication_engine.observability.metrics import Metrics
from replication_engine.store.redis_store import RedisStore

STAGES = ("read", "decode", "prepare")
# Never connected to: nothing measured here does I/O.
UNUSED_URL = "redis://127.0.0.1:1"
# A stream id's milliseconds and the entries' HLCs: well in the past, so nothing is skewed.
BASE_MS = 1_700_000_000_000


def _resp(value: Any) -> bytes:
    if isinstance(value, list):
        return b"*%d\r\n" % len(value) + b"".join(map(_resp, value))
    return b"$%d\r\n%s\r\n" % (len(value), value)


def xrange_reply(entries: int) -> bytes:
    """An ``XRANGE`` reply of ``entries`` PUT entries of distinct keys, as RESP2 bytes."""
    rng = random.Random(7)
    reply = []
    for i in range(entries):
        value = json_payload(i, PAYLOAD_BYTES, rng)
        change = codec.Change.put(
            f"user:{i:08d}",
            value,
            hlc=clock.pack(BASE_MS + i, 0),
            origin="peer",
            content_type="application/json",
        )
        fields = codec.encode_entry(change)
        flat = [part for name, data in fields.items() for part in (name.encode(), data)]
        reply.append([f"{BASE_MS + i}-0".encode(), flat])
    return _resp(reply)


def _tailer(store: RedisStore) -> Tailer:
    """A tailer of peer "peer" for node "local", with nothing behind it but its own code:
    ``_decode`` touches only its settings, counters and metrics."""
    config = engine_config("local", UNUSED_URL, {"peer": UNUSED_URL + "/1"}, Path("unused.db"))
    return Tailer(
        cast(Any, SimpleNamespace(node_id="peer")),
        store,
        cast(Any, None),
        local_node_id="local",
        settings=TailerSettings.from_config(config),
        metrics=Metrics(),
        local_breaker=pybreaker.CircuitBreaker(),
    )


async def _work(stage: str, batches: int, entries: int) -> None:
    wire = xrange_reply(entries)
    store = RedisStore(Redis.from_url(UNUSED_URL), node_id="local")
    tailer = _tailer(store)
    for _ in range(batches):
        reader = hiredis.Reader()
        reader.feed(wire)
        read = peer._entries(reader.gets())
        if stage == "read":
            continue
        changes, _, _ = await tailer._decode(read, codec.STREAM_START)
        assert len(changes) == entries, "every entry decodes"
        if stage == "prepare":
            store.prepare_apply(changes, relay=False)


def _instructions(stage: str, batches: int, entries: int) -> int:
    """Instructions the child process runs in all (callgrind's "Collected")."""
    command = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        "-m",
        "bench.decode_cost",
        "--child",
        stage,
        "--batches",
        str(batches),
        "--entries",
        str(entries),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=os.environ)
    match = re.search(r"Collected : (\d+)", done.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count from callgrind:\n{done.stderr[-2000:]}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_cost", description=__doc__)
    parser.add_argument("--entries", type=int, default=1000, help="entries per batch")
    parser.add_argument("--batches", type=int, default=2, help="batches per measured run")
    parser.add_argument("--child", choices=STAGES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(_work(args.child, args.batches, args.entries))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not on PATH (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    events = args.batches * args.entries
    print(
        f"Python instructions per event read: batches of {args.entries:,} entries of "
        f"{PAYLOAD_BYTES} B JSON, {args.batches} batches a run, Python {sys.version.split()[0]}"
    )
    before = 0.0
    for stage in STAGES:
        idle = _instructions(stage, 0, args.entries)
        busy = _instructions(stage, args.batches, args.entries)
        total = (busy - idle) / events
        print(f"  {stage:8} {total - before:>9,.0f}   (up to here {total:,.0f})")
        before = total
    return 0


if __name__ == "__main__":
    sys.exit(main())
