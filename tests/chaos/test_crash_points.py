"""Crash-point injection: kill the engine at random points between reading a batch, applying it
and saving its cursor, over a peer stream that keeps being written, restarting it each time from
the same cursor database.

Two kinds of crash:

* in-process, 1,000+ times: the engine's tasks are cancelled after a seeded random number of
  event-loop iterations (a cancel lands mid-read, mid-apply or mid-save), sometimes during
  ``start()`` itself, sometimes with the cursor database closed at once (so an apply already
  under way cannot save its cursor, as in a process that dies between the two);
* a real ``kill -9`` of a subprocess running ``replication-engine run`` at a random delay, a few
  dozen times.

After every crash the cursor on disk must be covered by what the store holds (at-least-once:
a cursor is saved only after its batch is applied) and never go backwards. At the end every
crashed node must hold exactly what a reference node that tailed the same stream without a
crash holds (same versions, same Merkle root), and must have appended each remote version to
its own stream at most once (effectively once: re-reads are recognised as duplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from replication_engine import codec
from replication_engine.codec import STREAM_START, StreamId
from replication_engine.config import EngineConfig
from replication_engine.engine import ReplicationEngine
from replication_engine.observability.metrics import Metrics
from replication_engine.peer import Peer
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisFactory, async_wait_until, awaiting_frames, open_files

PREFIX = "app:"
# In-process crashes (cancellations) per run: the brief's 1,000 and a margin.
IN_PROCESS_CRASHES = 1_050
# Real kill -9 of an engine subprocess.
PROCESS_KILLS = 24
# Event-loop iterations before a cancel: spans several read/apply/save cycles of a tailer.
MAX_SPIN = 300
# Delay range of a kill -9 after the subprocess reported it is running (seconds).
KILL_DELAY_S = (0.0, 0.4)
# Keys the peer writes: few, so versions of one key pile up inside and across batches.
KEYS = 25
# Deadline for catching up after the last crash.
CATCH_UP_S = 60.0
# Deadline for an engine subprocess to report itself running.
SPAWN_DEADLINE_S = 30.0
SEED = 4242
# The phase a crash waits for after its random spin, in turn ("" = wherever the spin ended).
PHASES = ("", "reading", "applying", "saving")
# How long a crash may step the loop waiting for its phase (a batch arrives every few ms).
PHASE_WAIT_S = 1.0


# ------------------------------------------------------------------------------------ helpers


def engine_config(node_id: str, local_url: str, peer_url: str, cursor_path: Path) -> dict[str, Any]:
    """A hot-path-only node (no cold path: the stream alone must deliver everything)."""
    return {
        "local_node_id": node_id,
        "local": {"redis_url": local_url, "prefix": PREFIX},
        "settings": {
            "hot_path": {
                "block_timeout_sec": 0.1,
                "batch_size": 4,
                "min_batch_size": 1,
                "max_batch_size": 16,
                "shutdown_timeout_sec": 2.0,
            },
            "cold_path": {"enabled": False},
            "peer_health": {"enabled": False},
        },
        "peers": [{"node_id": "b", "redis_url": peer_url, "start_from": "beginning"}],
        "cursor": {"sqlite_path": str(cursor_path)},
        "http": {"enabled": False},
    }


def saved_cursor(path: Path) -> StreamId | None:
    """The cursor for peer b on disk, through a separate connection (None before any save)."""
    if not path.exists():
        return None
    with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
        try:
            row = db.execute("SELECT stream_id FROM cursors WHERE peer_id = 'b'").fetchone()
        except sqlite3.OperationalError:  # no table yet: the engine died while creating it
            return None
    return None if row is None else codec.parse_stream_id(row[0])


Order = tuple[int, str]


@dataclass
class StreamOracle:
    """The peer's stream as written so far, and what a cursor into it obliges a node to hold."""

    peer: RedisStore
    entries: list[tuple[StreamId, str, Order]] = field(default_factory=list)

    async def refresh(self) -> None:
        start = f"({self.entries[-1][0]}" if self.entries else "-"
        while raw := await self.peer.redis.xrange(
            self.peer.keys.cdc, min=start, max="+", count=2000
        ):
            for raw_id, fields in raw:
                sid = codec.parse_stream_id(raw_id)
                change = codec.decode_entry(sid, fields, default_origin="b")
                self.entries.append((sid, change.key, (change.hlc, change.origin)))
            start = f"({self.entries[-1][0]}"

    def obliged(self, cursor: StreamId) -> dict[str, Order]:
        """Per key, the newest version at or below ``cursor``: applied before it was saved."""
        out: dict[str, Order] = {}
        for sid, key, order in self.entries:
            if sid > cursor:
                break
            out[key] = max(out.get(key, order), order)
        return out

    async def uncovered(self, store: RedisStore, cursor: StreamId | None) -> list[str]:
        """Keys whose obliged version ``store`` does not hold (nor anything newer)."""
        if cursor is None:
            return []
        await self.refresh()
        assert self.entries and cursor <= self.entries[-1][0], "cursor beyond the peer's tail"
        obliged = self.obliged(cursor)
        keys = sorted(obliged)
        held = await store.reader.items(keys)
        problems = []
        for key, version in zip(keys, held, strict=True):
            have = None if not isinstance(version, codec.Change) else (version.hlc, version.origin)
            if have is None or have < obliged[key]:
                problems.append(f"{key}: cursor {cursor} covers {obliged[key]}, store has {have}")
        return problems


async def paced_writer(store: RedisStore, stop: asyncio.Event, rng: random.Random) -> int:
    written = 0
    while not stop.is_set():
        key = f"k:{rng.randrange(KEYS)}"
        if rng.random() < 0.2:
            await store.delete(key)
        else:
            await store.put(key, f"b:{written}".encode() * rng.choice((1, 1, 30)))
        written += 1
        # Pacing of the offered load (~250 writes/s), not synchronisation.
        await asyncio.sleep(0.004)  # sync-ok: load pacing
    return written


@contextlib.asynccontextmanager
async def writing(store: RedisStore, seed: int) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(paced_writer(store, stop, random.Random(seed)), name="writer[b]")
    try:
        yield
    finally:
        stop.set()
        await task


async def versions(store: RedisStore) -> dict[str, tuple[bytes | None, int, str]]:
    out = {}
    async for change in store.versions():
        out[change.key] = (None if change.tombstone else change.value, change.hlc, change.origin)
    return out


async def relayed(store: RedisStore) -> list[tuple[str, int, str]]:
    """Every remote version the store appended to its own stream, in order."""
    entries = await store.redis.xrange(store.keys.cdc)
    out = []
    for raw_id, fields in entries:
        change = codec.decode_entry(raw_id, fields, default_origin=store.node_id)
        out.append((change.key, change.hlc, change.origin))
    return out


def crash_point(engine: ReplicationEngine) -> str:
    """Where the peer's tailer stands right now: reading, applying, saving, or elsewhere."""
    names: list[str] = []
    ours = (engine, *engine.tailers.values())  # not the reference engine's tasks
    for task in asyncio.all_tasks():
        frames = awaiting_frames(task)
        if not frames:
            continue
        owner = frames[0].f_locals.get("self")
        chain = [frame.f_code.co_name for frame in frames]
        if any(owner is o for o in ours) and chain[0] in ("_supervise_tailer", "_apply_and_save"):
            names.extend(chain)
    if "apply_batch" in names or "apply_prepared" in names:
        return "applying"
    if "save" in names:
        return "saving"
    if "_read" in names or "read_batch" in names:
        return "reading"
    return "elsewhere"


async def assert_same_as_reference(
    node: RedisStore, reference: RedisStore, peer_stream: Sequence[tuple[str, int, str]]
) -> None:
    assert await versions(node) == await versions(reference)
    assert await node.merkle_root() == await reference.merkle_root()
    appended = await relayed(node)
    assert len(appended) == len(set(appended)), "a version was applied (and relayed) twice"
    assert set(appended) <= set(peer_stream), "a version the peer never wrote was relayed"


async def caught_up(path: Path, peer: RedisStore) -> bool:
    tail = await peer.stream_tail()
    cursor = saved_cursor(path)
    return tail is not None and cursor is not None and str(cursor) == tail


# ------------------------------------------------------------------------------------ tests


async def test_a_thousand_in_process_crashes_lose_and_duplicate_nothing(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    servers = {n: redis_factory(appendonly=True, appendfsync="always") for n in ("b", "a", "r")}
    b = await RedisStore.connect(servers["b"].url, node_id="b", prefix=PREFIX)
    a = await RedisStore.connect(servers["a"].url, node_id="a", prefix=PREFIX)
    r = await RedisStore.connect(servers["r"].url, node_id="a", prefix=PREFIX)
    cursor_path = tmp_path / "a.db"
    config = EngineConfig.model_validate(
        engine_config("a", servers["a"].url, servers["b"].url, cursor_path)
    )
    reference = ReplicationEngine(
        EngineConfig.model_validate(
            engine_config("a", servers["r"].url, servers["b"].url, tmp_path / "r.db")
        ),
        store=r,
    )
    oracle = StreamOracle(b)
    kinds: dict[str, int] = {"tasks": 0, "tasks_cursor_db_gone": 0, "start": 0}
    points: dict[str, int] = {"reading": 0, "applying": 0, "saving": 0, "elsewhere": 0}
    extra_cancel_rounds = 0
    previous = STREAM_START
    engine: ReplicationEngine | None = None
    started = time.monotonic()
    try:
        await reference.start()
        async with writing(b, SEED):
            for crash in range(IN_PROCESS_CRASHES):
                engine = ReplicationEngine(config, store=a)
                spin = rng.randrange(MAX_SPIN)
                roll = rng.random()
                if roll < 0.1:
                    # Crash during start-up: opening the cursor db, connecting, spawning.
                    kinds["start"] += 1
                    starting = asyncio.create_task(engine.start())
                    for _ in range(spin // 10):
                        await asyncio.sleep(0)  # sync-ok: the random crash point
                    starting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await starting
                    if engine.state == "running":
                        extra_cancel_rounds += await engine.abort()
                else:
                    await engine.start()
                    for _ in range(spin):
                        await asyncio.sleep(0)  # sync-ok: the random crash point
                    # Three crashes in four then step on to the next moment the tailer is in a
                    # chosen phase, so each phase is hit however short it is on this machine.
                    target = PHASES[crash % len(PHASES)]
                    deadline = time.monotonic() + PHASE_WAIT_S
                    while target and crash_point(engine) != target:
                        if time.monotonic() > deadline:
                            break
                        await asyncio.sleep(0)  # sync-ok: stepping the loop to a crash point
                    points[crash_point(engine)] += 1
                    if roll < 0.4 and engine.cursors is not None:
                        # The process is gone: an apply in flight can no longer save its cursor.
                        kinds["tasks_cursor_db_gone"] += 1
                        closing = asyncio.create_task(engine.cursors.close())
                        extra_cancel_rounds += await engine.abort()
                        await closing
                    else:
                        kinds["tasks"] += 1
                        extra_cancel_rounds += await engine.abort()
                await engine.shutdown(5.0)
                assert engine.state == "stopped"
                cursor = saved_cursor(cursor_path)
                at = cursor or STREAM_START
                assert at >= previous, f"crash {crash}: cursor went back {previous} -> {at}"
                previous = at
                problems = await oracle.uncovered(a, cursor)
                assert not problems, f"crash {crash}: saved cursor ahead of applies: {problems}"
        engine = ReplicationEngine(config, store=a)
        await engine.start()
        await async_wait_until(
            lambda: caught_up(cursor_path, b),
            timeout=CATCH_UP_S,
            interval=0.05,
            message="crashed node caught up",
        )
        await async_wait_until(
            lambda: caught_up(tmp_path / "r.db", b),
            timeout=CATCH_UP_S,
            interval=0.05,
            message="reference node caught up",
        )
        await oracle.refresh()
        peer_stream = [(key, hlc, origin) for _, key, (hlc, origin) in oracle.entries]
        await assert_same_as_reference(a, r, peer_stream)
        print(
            f"in-process crashes: {kinds}, at {points}, extra cancel rounds: "
            f"{extra_cancel_rounds}, peer entries: {len(oracle.entries)}, "
            f"{time.monotonic() - started:.1f}s"
        )
        assert sum(kinds.values()) >= 1000
        # The crashes landed in every phase of a batch, not only between batches.
        assert min(points["reading"], points["applying"], points["saving"]) >= 20, points
    finally:
        for running in (engine, reference):
            if running is not None:
                await running.shutdown(5.0)
        for store in (a, b, r):
            await store.close()


async def spawn_engine(config_path: Path, log_path: Path) -> asyncio.subprocess.Process:
    """``replication-engine run`` in a subprocess; returns once it logged that it is running."""
    log = log_path.open("ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "replication_engine.cli",
            "--log-format",
            "json",
            "run",
            "--config",
            str(config_path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    finally:
        log.close()
    marker = b'"msg": "engine.started"'

    def running() -> bool:
        if proc.returncode is not None:
            raise AssertionError(
                f"engine exited with {proc.returncode}: {log_path.read_bytes()[-2000:]!r}"
            )
        return marker in log_path.read_bytes()

    await async_wait_until(
        running, timeout=SPAWN_DEADLINE_S, interval=0.01, message="engine subprocess running"
    )
    return proc


async def test_real_kill_9_of_an_engine_process_at_random_points(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    rng = random.Random(SEED + 1)
    servers = {n: redis_factory(appendonly=True, appendfsync="always") for n in ("b", "a", "r")}
    b = await RedisStore.connect(servers["b"].url, node_id="b", prefix=PREFIX)
    a = await RedisStore.connect(servers["a"].url, node_id="a", prefix=PREFIX)
    r = await RedisStore.connect(servers["r"].url, node_id="a", prefix=PREFIX)
    cursor_path = tmp_path / "a.db"
    config_path = tmp_path / "a.yaml"
    config_path.write_text(
        yaml.safe_dump(engine_config("a", servers["a"].url, servers["b"].url, cursor_path))
    )
    log_path = tmp_path / "a.log"
    reference = ReplicationEngine(
        EngineConfig.model_validate(
            engine_config("a", servers["r"].url, servers["b"].url, tmp_path / "r.db")
        ),
        store=r,
    )
    oracle = StreamOracle(b)
    previous = STREAM_START
    proc: asyncio.subprocess.Process | None = None
    try:
        await reference.start()
        async with writing(b, SEED + 1):
            for kill in range(PROCESS_KILLS):
                proc = await spawn_engine(config_path, log_path)
                # The crash point: a random moment of reading, applying or saving.
                await asyncio.sleep(rng.uniform(*KILL_DELAY_S))  # sync-ok
                os.kill(proc.pid, signal.SIGKILL)
                assert await proc.wait() == -signal.SIGKILL
                proc = None
                cursor = saved_cursor(cursor_path)
                at = cursor or STREAM_START
                assert at >= previous, f"kill {kill}: cursor went back {previous} -> {at}"
                previous = at
                problems = await oracle.uncovered(a, cursor)
                assert not problems, f"kill {kill}: saved cursor ahead of applies: {problems}"
        assert previous > STREAM_START, "no kill landed after a cursor save"
        proc = await spawn_engine(config_path, log_path)
        await async_wait_until(
            lambda: caught_up(cursor_path, b),
            timeout=CATCH_UP_S,
            interval=0.05,
            message="killed node caught up",
        )
        await async_wait_until(
            lambda: caught_up(tmp_path / "r.db", b),
            timeout=CATCH_UP_S,
            interval=0.05,
            message="reference node caught up",
        )
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        proc = None
        await oracle.refresh()
        peer_stream = [(key, hlc, origin) for _, key, (hlc, origin) in oracle.entries]
        await assert_same_as_reference(a, r, peer_stream)
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        await reference.shutdown(5.0)
        for store in (a, b, r):
            await store.close()


# ------------------------------------------------------------------------------------ cancellation


async def test_a_cancelled_peer_call_always_raises_cancelled_error(
    redis_factory: RedisFactory,
) -> None:
    server = redis_factory()
    rng = random.Random(7)
    swallowed = 0
    for _ in range(300):
        peer = Peer("b", server.url, prefix=PREFIX, metrics=Metrics())
        finished = asyncio.Event()

        async def call(peer: Peer = peer, finished: asyncio.Event = finished) -> None:
            await peer.ping()
            finished.set()

        task = asyncio.create_task(call())
        for _ in range(rng.randint(4, 16)):
            await asyncio.sleep(0)  # sync-ok: lands the cancel inside connect/send
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if finished.is_set() and task.cancelling():
            swallowed += 1
        await peer.close()
    assert swallowed == 0, f"{swallowed} of 300 cancelled peer calls finished normally"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd")
async def test_a_start_cancelled_at_random_points_leaves_no_cursor_file_open(
    tmp_path: Path,
) -> None:
    from replication_engine.cursor import CursorStore

    path = tmp_path / "cursors.db"
    await (await CursorStore.open(path)).close()
    rng = random.Random(11)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # what is asserted is a deterministic close, not the collector's timing
    try:
        for _ in range(200):
            opening = asyncio.create_task(CursorStore.open(path))
            for _ in range(rng.randint(3, 30)):
                await asyncio.sleep(0)  # sync-ok: lands the cancel inside open()
            opening.cancel()
            try:
                store = await opening
            except asyncio.CancelledError:
                continue
            await store.close()
        assert open_files(path) == 0, f"{open_files(path)} descriptors left open on {path}"
    finally:
        if gc_was_enabled:
            gc.enable()
        gc.collect()
