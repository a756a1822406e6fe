"""ReplicationEngine against real redis-server processes: lifecycle, supervision, readiness.

Covers what the engine owns rather than what the two paths do: the start/shutdown state
machine, failing fast on a bad setup, a clean stop in the middle of a catch-up, restarting a
crashed tailer, readiness and lag as a load balancer sees them, stall detection, trace
continuity across nodes and the metrics a real replication moves. Waits are on conditions with
deadlines (``async_wait_until``); nothing sleeps to let something happen.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from harness.mesh import (
    CONVERGE_TIMEOUT_S,
    Mesh,
    WriteLog,
    build_config,
    expected_snapshot,
    metric,
    open_mesh,
    raw_entries,
    read_stream,
    snapshot,
)
from replication_engine import codec
from replication_engine.clock import HLC, wall_clock_ms
from replication_engine.codec import STREAM_START, Change, StreamId
from replication_engine.cursor import CursorStore
from replication_engine.engine import EngineError, ReplicationEngine
from replication_engine.hot_path import Tailer
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisFactory, async_wait_until, find_redis_server, free_port
from replication_engine.testing.redis_proc import redis_server_version

# Mesh nodes re-emit what they apply only when told to (a mesh node's default is off).
RELAYING = {"settings": {"hot_path": {"relay": True}}}

# Drain time given to tailers on shutdown in these tests; the engine's bound is this + 5 s.
SHUTDOWN_TIMEOUT_S = 2.0
SHUTDOWN_BOUND_S = SHUTDOWN_TIMEOUT_S + 5.0
# A second shutdown() must not wait for anything; this only absorbs scheduler noise.
AT_ONCE_S = 0.5
# Ping interval for the stall tests: a stalled peer must be flagged within two of them.
PING_INTERVAL_S = 0.5
# Scheduling slack on top of a bound the engine promises (a loaded 2-core CI machine).
SLACK_S = 1.0
# Apply chunk for bulk setup: one script call per 1,000 items keeps setup fast.
SETUP_CHUNK = 1000
SECRET = "s3cret-pw"
# The engine's first restart delay is drawn from [base/2, base] with base 0.5 s.
RESTART_FIRST_DELAY_MIN_S = 0.25


# ------------------------------------------------------------------------------------ helpers


def engine_tasks() -> list[str]:
    """Names of the live tasks an engine starts (every one is named ``re-*``)."""
    return sorted(
        t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("re-") and not t.done()
    )


async def preload(store: RedisStore, count: int, *, prefix: str = "pre") -> list[str]:
    """``count`` distinct keys applied to ``store`` (origin "seed"), one stream entry each."""
    hlc = HLC()
    keys = [f"{prefix}:{i:06d}" for i in range(count)]
    for start in range(0, count, SETUP_CHUNK):
        await store.apply_batch(
            [
                Change.put(key, f"value-{key}".encode(), hlc=hlc.now(), origin="seed")
                for key in keys[start : start + SETUP_CHUNK]
            ]
        )
    return keys


async def stream_keys(store: RedisStore, upto: StreamId | None = None) -> list[str]:
    """Keys of a store's CDC entries in stream order, those at or before ``upto`` if given."""
    out: list[str] = []
    start = "-"
    while entries := await raw_entries(store, start):
        for raw_id, fields in entries:
            if upto is not None and codec.parse_stream_id(raw_id) > upto:
                return out
            out.append(fields[b"key"].decode())
        start = f"({entries[-1][0].decode()}"
    return out


async def stored_keys(store: RedisStore) -> set[str]:
    return {change.key async for change in store.versions()}


class StateLog:
    """Every state change of an engine, as (``engine.state``, ``replication_engine_state``).

    Wraps the gauge's ``set`` so that no transition, however brief, can be missed by sampling.
    """

    def __init__(self, engine: ReplicationEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[tuple[str, float]] = []
        gauge = engine.metrics.engine_state
        original = gauge.set

        def recording_set(value: float) -> None:
            original(value)
            self.seen.append((engine.state, metric(engine, "replication_engine_state")))

        monkeypatch.setattr(gauge, "set", recording_set)


async def stream_tail_id(store: RedisStore) -> StreamId | None:
    tail = await store.stream_tail()
    return None if tail is None else codec.parse_stream_id(tail)


# ------------------------------------------------------------------------------------ lifecycle


async def test_start_and_shutdown_walk_the_states_in_order_and_shutdown_is_idempotent(
    redis_factory: RedisFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        engines=[],
        common={"settings": {"hot_path": {"shutdown_timeout_sec": SHUTDOWN_TIMEOUT_S}}},
    ) as mesh:
        node = mesh["a"]
        engine = ReplicationEngine(node.config, store=node.store)
        node.engines.append(engine)  # torn down by the mesh whatever happens
        states = StateLog(engine, monkeypatch)
        assert engine.state == "stopped"
        assert metric(engine, "replication_engine_state") == 0

        await engine.start()
        node.engine = engine
        assert engine.state == "running"
        assert metric(engine, "replication_engine_state") == 2
        assert states.seen == [("starting", 1), ("running", 2)]
        log = WriteLog()
        await log.put(mesh["b"], "k", b"v")
        await async_wait_until(
            lambda: node.store.get("k"),
            timeout=CONVERGE_TIMEOUT_S,
            message="the write on b applied on a",
        )

        started = time.monotonic()
        await mesh.stop_engine("a")
        took = time.monotonic() - started
        assert took < SHUTDOWN_BOUND_S, f"shutdown took {took:.2f}s"
        assert engine.state == "stopped"
        assert metric(engine, "replication_engine_state") == 0
        assert states.seen == [("starting", 1), ("running", 2), ("stopping", 3), ("stopped", 0)]
        assert engine_tasks() == []

        started = time.monotonic()
        await engine.shutdown()
        assert time.monotonic() - started < AT_ONCE_S
        assert engine.state == "stopped"
        assert len(states.seen) == 4, "a second shutdown changed state again"


async def test_engine_owning_its_store_starts_again_after_shutdown(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}, engines=[]) as mesh:
        engine = ReplicationEngine(mesh["a"].config)  # connects its own store from the config
        mesh["a"].engines.append(engine)
        await engine.shutdown()  # never started: nothing to do
        assert engine.state == "stopped"

        await engine.start()
        with pytest.raises(EngineError, match="while the engine is running"):
            await engine.start()
        await mesh["b"].store.put("k1", b"1")
        await async_wait_until(
            lambda: mesh["a"].store.get("k1"), timeout=CONVERGE_TIMEOUT_S, message="k1 on a"
        )
        await asyncio.gather(engine.shutdown(), engine.shutdown())  # concurrent calls
        assert engine.state == "stopped" and engine.store is None
        assert engine_tasks() == []

        await engine.start()
        await mesh["b"].store.put("k2", b"2")
        await async_wait_until(
            lambda: mesh["a"].store.get("k2"),
            timeout=CONVERGE_TIMEOUT_S,
            message="k2 on a after the restart",
        )
        # Resumed from its saved cursor: k1 was not read again.
        assert engine.status()["peers"]["b"]["events_read"] == 1
        await engine.shutdown()


async def test_shutdown_is_bounded_when_a_peer_hangs(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        common={"settings": {"hot_path": {"shutdown_timeout_sec": SHUTDOWN_TIMEOUT_S}}},
    ) as mesh:
        await mesh.wait_idle()  # a's tailer sits in XREAD BLOCK on b
        mesh["b"].server.pause()  # SIGSTOP: the tailer's XREAD and every call to b now hang
        try:
            started = time.monotonic()
            engine = await mesh.stop_engine("a")
            took = time.monotonic() - started
        finally:
            mesh["b"].server.resume()
        assert took < SHUTDOWN_BOUND_S, f"shutdown took {took:.2f}s with a hung peer"
        assert engine.state == "stopped"
        assert engine_tasks() == []


# ------------------------------------------------------------------------------------ bad setups


def assert_clean_after_failed_start(engine: ReplicationEngine) -> None:
    assert engine.state == "stopped"
    assert engine_tasks() == []
    assert engine.peers == {} and engine.cursors is None and engine.http is None


async def test_start_fails_clearly_when_local_redis_is_unreachable(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    peer = redis_factory()
    dead_port = free_port()
    local_url = f"redis://:{SECRET}@127.0.0.1:{dead_port}/0"
    config = build_config("a", {"a": local_url, "b": peer.url}, ["b"], tmp_path / "c.db")
    engine = ReplicationEngine(config)

    with pytest.raises(EngineError) as caught:
        await engine.start()

    message = str(caught.value)
    assert f"redis://:***@127.0.0.1:{dead_port}/0" in message
    assert "unreachable" in message
    assert SECRET not in message
    assert_clean_after_failed_start(engine)


async def test_start_says_the_local_redis_refused_the_password_not_that_it_is_unreachable(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # An embedder sees what an operator of the sidecar sees: credentials to fix, not a network.
    local, peer = redis_factory(password="the-right-one"), redis_factory()
    local_url = f"redis://:{SECRET}@127.0.0.1:{local.port}/0"
    config = build_config("a", {"a": local_url, "b": peer.url}, ["b"], tmp_path / "c.db")
    engine = ReplicationEngine(config)

    with pytest.raises(EngineError) as caught:
        await engine.start()

    message = str(caught.value)
    assert message.startswith(
        f"the local Redis at redis://:***@127.0.0.1:{local.port}/0 refused the user or "
        "password: AuthenticationError: "
    ), message
    assert "unreachable" not in message and SECRET not in message
    assert_clean_after_failed_start(engine)


async def test_start_fails_clearly_when_given_store_geometry_differs_from_config(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    local, peer = redis_factory(), redis_factory()
    store = await RedisStore.connect(local.url, node_id="a", prefix="app:", fanout=16, depth=2)
    try:
        config = build_config("a", {"a": local.url, "b": peer.url}, ["b"], tmp_path / "c.db")
        assert config.settings.merkle.fanout == 256
        engine = ReplicationEngine(config, store=store)

        with pytest.raises(EngineError) as caught:
            await engine.start()

        message = str(caught.value)
        assert "fanout=16" in message and "fanout=256" in message, message
        assert_clean_after_failed_start(engine)
        assert await store.redis.ping(), "a store the caller owns must stay open"
    finally:
        await store.close()


async def test_start_fails_clearly_when_stored_geometry_differs_from_config(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    local, peer = redis_factory(), redis_factory()
    first = await RedisStore.connect(local.url, node_id="a", prefix="app:", fanout=16, depth=2)
    await first.close()  # the Redis now records geometry 16/2
    config = build_config("a", {"a": local.url, "b": peer.url}, ["b"], tmp_path / "c.db")
    engine = ReplicationEngine(config)

    with pytest.raises(EngineError) as caught:
        await engine.start()

    message = str(caught.value)
    assert "fanout=16" in message and "fanout=256" in message, message
    assert_clean_after_failed_start(engine)


async def test_start_fails_clearly_when_http_port_is_in_use(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    local, peer = redis_factory(), redis_factory()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = build_config(
            "a",
            {"a": local.url, "b": peer.url},
            ["b"],
            tmp_path / "c.db",
            override={"http": {"enabled": True, "listen": f"127.0.0.1:{port}"}},
        )
        store = await RedisStore.connect(local.url, node_id="a", prefix="app:")
        try:
            engine = ReplicationEngine(config, store=store)
            with pytest.raises(EngineError) as caught:
                await engine.start()
            message = str(caught.value)
            assert "http.listen" in message and f"127.0.0.1:{port}" in message, message
            assert_clean_after_failed_start(engine)
            # Refused before it wrote anything: a second sidecar of a running node, started by
            # mistake on its port, leaves the running one's nonce alone.
            assert await store.record() is None
        finally:
            await store.close()


# ------------------------------------------------------------------------------------ catch-up


@pytest.mark.skipif(
    redis_server_version(find_redis_server())[0] < 7,
    reason="Redis 6.2 cannot say whether a stream read from its start was trimmed: the tailer "
    "reports a gap and the repair it asks for copies keys past the cursor, which this test "
    "forbids (README, Known limitations)",
)
async def test_shutdown_during_catch_up_saves_exactly_what_was_applied_and_resumes(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    entries = 20_000
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        engines=[],
        # A smaller batch ceiling stretches the catch-up over many batches to stop in between.
        common={
            "settings": {
                "hot_path": {"max_batch_size": 200, "shutdown_timeout_sec": SHUTDOWN_TIMEOUT_S}
            }
        },
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        await preload(b.store, entries)
        tail = await stream_tail_id(b.store)
        assert tail is not None

        first = await mesh.start_engine("a")

        def mid_catch_up() -> bool:
            tailer = first.tailers.get("b")
            return (
                tailer is not None
                and tailer.stats.batches >= 2
                and tailer.cursor is not None
                and STREAM_START < tailer.cursor < tail
            )

        await async_wait_until(
            mid_catch_up,
            timeout=CONVERGE_TIMEOUT_S,
            interval=0.002,
            message="a part-way through catching up with b",
        )
        await mesh.stop_engine("a")
        last_applied = first.tailers["b"].cursor
        assert last_applied is not None and last_applied < tail, "stopped too late to test"

        async with await CursorStore.open(a.cursor_path) as cursors:
            saved = await cursors.get("b")
        assert saved == str(last_applied)
        covered = await stream_keys(b.store, upto=codec.parse_stream_id(saved))
        assert 0 < len(covered) < entries
        # Every entry up to the cursor is applied and nothing past it: the cursor neither
        # claims an unapplied entry nor leaves an applied one to be read again.
        assert await stored_keys(a.store) == set(covered)

        second = await mesh.start_engine("a")
        await async_wait_until(
            lambda: "b" in second.tailers and second.tailers["b"].cursor == tail,
            timeout=CONVERGE_TIMEOUT_S,
            message="a's cursor at b's tail",
        )
        # Equal Merkle roots: the same keys with the same (hlc, content, tombstone) everywhere.
        # (Cheaper than comparing 20,000 versions one by one, which wait_converged does.)
        assert await a.store.merkle_root() == await b.store.merkle_root()
        resumed = second.tailers["b"].stats
        assert resumed.read == entries - len(covered), "the restart re-read or skipped entries"
        assert resumed.applied == entries - len(covered)


@pytest.mark.skipif(
    redis_server_version(find_redis_server())[0] < 7,
    reason="Redis 6.2 cannot say whether a stream read from its start was trimmed: the tailer "
    "reports a gap and the repair it asks for fetches items the stream was about to bring, "
    "which this test forbids (README, Known limitations)",
)
async def test_the_repair_cycle_waits_out_a_catch_up_and_runs_as_soon_as_it_ends(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """A node starting 5,000 entries behind its peer gets them by the stream. Its repair cycle
    neither drills into the peer before the tailer has read (it would fetch what the stream is
    about to bring, and read every interior node of the peer's tree to find it) nor while the
    tailer catches up; its in-sync check then runs once the catch-up ends, not an interval
    (an hour here) later."""
    entries = 5_000
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        engines=[],
        common={
            "settings": {
                "cold_path": {"enabled": True, "interval_sec": 3600},
                "hot_path": {"max_batch_size": 200},
            }
        },
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        await preload(b.store, entries)
        engine = await mesh.start_engine("a")
        await async_wait_until(
            lambda: a.metric_total("replication_repair_cycles_total", result="ok") >= 1,
            timeout=CONVERGE_TIMEOUT_S,
            message="a's repair cycle ran after the catch-up",
        )
        assert engine.tailers["b"].stats.applied == entries
        assert a.metric_total("replication_repair_cycles_total", result="skipped") >= 1
        assert a.metric_total("replication_repair_items_fetched_total") == 0
        assert await a.store.merkle_root() == await b.store.merkle_root()


# ------------------------------------------------------------------------------------ supervision


async def test_crashed_tailer_is_logged_counted_and_restarted(
    redis_factory: RedisFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    original = Tailer._decode
    crashes = 0
    calls: list[tuple[float, Tailer]] = []  # (when, by which tailer) of every decode

    async def crash_once(self: Tailer, entries: list[Any], *args: Any) -> Any:
        nonlocal crashes
        calls.append((time.monotonic(), self))
        if crashes == 0:
            crashes += 1
            raise RuntimeError("injected decode failure")
        return await original(self, entries, *args)

    monkeypatch.setattr(Tailer, "_decode", crash_once)
    caplog.set_level(logging.ERROR, logger="replication_engine.engine")
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}) as mesh:
        engine = mesh["a"].running()
        supervisor = next(t for t in asyncio.all_tasks() if t.get_name() == "re-tailer-b")
        log = WriteLog()
        await log.put(mesh["b"], "first", b"1")
        await async_wait_until(
            lambda: crashes == 1, timeout=CONVERGE_TIMEOUT_S, message="the injected crash"
        )
        await mesh.wait_converged(nodes=["a", "b"])

        assert engine.state == "running"
        assert not supervisor.done(), "the supervisor itself must survive a tailer crash"
        assert metric(engine, "replication_tailer_restarts_total", peer="b") == 1
        status = engine.status()["peers"]["b"]
        assert status["restarts"] == 1
        assert "RuntimeError: injected decode failure" in status["error"]
        crashed = [
            r
            for r in caplog.records
            if r.name == "replication_engine.engine" and r.levelno == logging.ERROR and r.exc_info
        ]
        assert len(crashed) == 1
        assert isinstance(crashed[0].exc_info[1], RuntimeError)
        assert getattr(crashed[0], "task", None) == "tailer:b"
        # A fresh tailer took over, and not at once: after a backoff delay (the first one is
        # drawn from [0.25, 0.5] s), so a crash loop cannot spin.
        (crashed_at, crashed_tailer), (resumed_at, resumed_tailer) = calls[:2]
        assert resumed_tailer is not crashed_tailer
        assert resumed_at - crashed_at >= RESTART_FIRST_DELAY_MIN_S

        # The restarted tailer keeps replicating.
        await log.put(mesh["b"], "second", b"2")
        await mesh.wait_converged(nodes=["a", "b"])
        assert await snapshot(mesh["a"].store) == expected_snapshot(log.writes)
        assert engine.state == "running"


async def test_abort_cancels_the_named_tasks_where_they_stand_and_shutdown_releases_the_rest(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(redis_factory, tmp_path, {"a": ["b", "c"], "b": [], "c": []}) as mesh:
        engine = mesh["a"].running()
        names = engine.task_names()
        assert {"tailer:b", "tailer:c", "health:b", "health:c"} <= set(names), names
        with pytest.raises(EngineError, match="no running task matches"):
            await engine.abort(["tailer:b", "tailer:nobody"])
        assert engine.task_names() == names, "a refused abort cancelled something"

        assert await engine.abort("tailer:b") >= 0
        assert engine.task_names() == [n for n in names if n != "tailer:b"]
        assert engine.state == "running", "an abort is a crash of tasks, not a shutdown"
        await engine.abort("health:*")
        assert not [n for n in engine.task_names() if n.startswith("health:")]

        log = WriteLog()
        await log.put(mesh["c"], "k", b"still tailed")
        await mesh.wait_converged(nodes=["a", "c"])  # c's tailer was left running

        await engine.abort()
        assert engine.task_names() == []
        assert engine_tasks() == [], "an aborted task is not restarted"
        await mesh.stop_engine("a")
        assert engine.state == "stopped"


async def test_no_tailer_and_no_periodic_repair_when_both_paths_are_disabled(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        common={"settings": {"hot_path": {"enabled": False}, "cold_path": {"enabled": False}}},
    ) as mesh:
        await mesh["b"].store.put("k", b"only on b")
        engine = mesh["a"].running()
        assert engine.state == "running"
        assert engine.tailers == {}
        names = engine_tasks()
        assert not [n for n in names if n.startswith("re-tailer")], names
        assert "re-health-b" in names
        assert "mode" not in engine.status()["peers"]["b"]
        # The cold path runs only the repairs that are asked for (quarantined entries, gaps, a
        # recovery): none here, so nothing is pulled.
        assert "re-cold-path" in names
        assert engine.cold_path is not None and engine.cold_path.last_stats is None
        assert await mesh["a"].store.get("k") is None
        stats = await engine.repair_once()  # an operator's explicit request still runs
        assert stats.items_applied == 1 and await mesh["a"].store.get("k") is not None


# ------------------------------------------------------------------------------------ readiness


async def test_readiness_is_false_while_lagging_and_true_once_caught_up(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    max_events = 50
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        engines=[],
        common={
            "settings": {
                "slo": {"max_replication_lag_events": max_events},
                # 500 events/s in fixed batches of 100: a 2,000-entry backlog takes ~4 s.
                "hot_path": {
                    "rate_limit_enabled": True,
                    "rate_limit_per_sec": 500,
                    "rate_limit_burst": 50,
                    "batch_size": 100,
                    "max_batch_size": 100,
                    "adaptive_batch_size": False,
                },
            }
        },
    ) as mesh:
        await preload(mesh["b"].store, 2000)
        engine = await mesh.start_engine("a")

        def lagging_reason() -> str | None:
            ready, reasons = engine.readiness()
            hits = [r for r in reasons if r.startswith("peer b: lag ") and "events" in r]
            return None if ready or not hits else hits[0]

        reason = await async_wait_until(
            lagging_reason,
            timeout=CONVERGE_TIMEOUT_S,
            interval=0.02,
            message="readiness reporting b's lag",
        )
        reported = int(reason.split()[3])
        assert reported > max_events, reason
        assert f"exceeds {max_events}" in reason

        await async_wait_until(
            lambda: engine.readiness()[0],
            timeout=CONVERGE_TIMEOUT_S,
            interval=0.05,
            message="ready once caught up",
        )
        peer = engine.status()["peers"]["b"]
        assert peer["lag_events"] is not None and peer["lag_events"] <= max_events


async def test_readiness_is_false_when_all_peers_are_disconnected(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}) as mesh:
        engine = mesh["a"].running()
        await async_wait_until(
            lambda: engine.readiness()[0],
            timeout=CONVERGE_TIMEOUT_S,
            message="ready while b answers",
        )
        mesh["b"].server.kill()
        await async_wait_until(
            lambda: "all peers are disconnected" in engine.readiness()[1],
            timeout=CONVERGE_TIMEOUT_S,
            message="readiness noticing b is gone",
        )
        assert engine.readiness()[0] is False
        assert engine.status()["peers"]["b"]["connected"] is False


# ------------------------------------------------------------------------------------ stalls


STALL_SETTINGS = {"settings": {"peer_health": {"ping_interval_sec": PING_INTERVAL_S}}}


async def wait_idle_and_fresh(mesh: Mesh) -> dict[str, Any]:
    """Wait until a is caught up with an idle b and keeps hearing from it; its status entry."""
    a = mesh["a"]
    await mesh.wait_idle()
    first = a.peer_status("b")["last_activity"]
    assert first is not None
    # No traffic now, yet the peer keeps answering: liveness does not depend on writes.
    await async_wait_until(
        lambda: a.peer_status("b")["last_activity"] > first,
        timeout=CONVERGE_TIMEOUT_S,
        message="b heard from while idle",
    )
    return a.peer_status("b")


async def test_idle_peer_shows_zero_lag_and_recent_activity(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": []}, common=STALL_SETTINGS
    ) as mesh:
        await WriteLog().put(mesh["b"], "k", b"v")
        status = await wait_idle_and_fresh(mesh)
        assert status["lag_ms"] == 0 and status["lag_events"] == 0
        assert status["stalled"] is False and status["connected"] is True
        assert time.time() - status["last_activity"] < 2 * PING_INTERVAL_S + SLACK_S
        assert mesh["a"].running().readiness()[0] is True


async def test_sigstopped_peer_is_flagged_stalled_and_its_lag_is_unknown(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": []}, common=STALL_SETTINGS
    ) as mesh:
        await WriteLog().put(mesh["b"], "k", b"v")
        await wait_idle_and_fresh(mesh)
        a = mesh["a"]
        mesh["b"].server.pause()
        try:
            paused = time.monotonic()
            await async_wait_until(
                lambda: a.peer_status("b")["stalled"],
                timeout=2 * PING_INTERVAL_S + SLACK_S,
                interval=0.02,
                message="b flagged stalled within two ping intervals",
            )
            flagged_after = time.monotonic() - paused
            status = a.peer_status("b")
            # Not the last good figure: nothing is known about a peer that does not answer.
            assert status["lag_ms"] is None and status["lag_events"] is None
            assert status["last_known_lag_ms"] == 0
            assert status["last_known_lag_events"] == 0
            # The lag gauge does not stay at its last reading (0: "current") while b may be
            # taking writes: it is what the lag may be by now, and grows.
            engine = a.running()
            await async_wait_until(
                lambda: metric(engine, "replication_lag_seconds", peer="b") > 2 * PING_INTERVAL_S,
                timeout=4 * PING_INTERVAL_S + SLACK_S,
                interval=0.02,
                message="replication_lag_seconds{peer=b} grows while b does not answer",
            )
        finally:
            mesh["b"].server.resume()
        assert flagged_after <= 2 * PING_INTERVAL_S + SLACK_S


async def test_sigstopped_peer_sets_stalled_gauge_within_two_ping_intervals(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": []}, common=STALL_SETTINGS
    ) as mesh:
        await WriteLog().put(mesh["b"], "k", b"v")
        await wait_idle_and_fresh(mesh)
        engine = mesh["a"].running()
        assert metric(engine, "replication_peer_stalled", peer="b") == 0
        mesh["b"].server.pause()
        try:
            await async_wait_until(
                lambda: metric(engine, "replication_peer_stalled", peer="b") == 1,
                timeout=2 * PING_INTERVAL_S + SLACK_S,
                interval=0.02,
                message="replication_peer_stalled{peer=b} 1 within two ping intervals",
            )
        finally:
            mesh["b"].server.resume()


async def test_stalled_gauge_is_set_for_a_sigstopped_peer(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": []}, common=STALL_SETTINGS
    ) as mesh:
        await WriteLog().put(mesh["b"], "k", b"v")
        await wait_idle_and_fresh(mesh)
        engine = mesh["a"].running()
        mesh["b"].server.pause()
        try:
            await async_wait_until(
                lambda: metric(engine, "replication_peer_stalled", peer="b") == 1,
                timeout=CONVERGE_TIMEOUT_S,
                interval=0.05,
                message="replication_peer_stalled{peer=b} 1",
            )
        finally:
            mesh["b"].server.resume()
        await async_wait_until(
            lambda: metric(engine, "replication_peer_stalled", peer="b") == 0,
            timeout=CONVERGE_TIMEOUT_S,
            interval=0.05,
            message="replication_peer_stalled{peer=b} back to 0 once b answers",
        )


# ------------------------------------------------------------------------------------ tracing

_exporter: InMemorySpanExporter | None = None


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """An in-memory exporter on the process's SDK TracerProvider (set once per process)."""
    global _exporter
    if _exporter is None:
        if not isinstance(trace.get_tracer_provider(), TracerProvider):
            # The global provider can be set only once per process; a later set is ignored.
            trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
        assert isinstance(provider, TracerProvider), f"global tracer provider is {provider!r}"
        _exporter = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(_exporter))
    _exporter.clear()
    yield _exporter
    _exporter.clear()


async def test_a_write_is_traced_through_to_the_apply_on_another_node(
    redis_factory: RedisFactory, tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    # b relays: its re-emitted entry carries the trace on.
    async with open_mesh(redis_factory, tmp_path, {"a": [], "b": ["a"]}, common=RELAYING) as mesh:
        tracer = trace.get_tracer("tests.integration.test_engine")
        with tracer.start_as_current_span("client-write") as client:
            await mesh["a"].store.put("traced", b"payload")
        client_ctx = client.get_span_context()
        expected_parent = (
            f"00-{client_ctx.trace_id:032x}-{client_ctx.span_id:016x}-"
            f"{int(client_ctx.trace_flags):02x}"
        )
        await async_wait_until(
            lambda: mesh["b"].store.get("traced"),
            timeout=CONVERGE_TIMEOUT_S,
            message="the traced key on b",
        )

        def applies() -> list[ReadableSpan]:
            return [
                s
                for s in spans.get_finished_spans()
                if s.name == "replication.apply"
                and (s.attributes or {}).get("replication.key") == "traced"
            ]

        (apply,) = await async_wait_until(
            applies, timeout=CONVERGE_TIMEOUT_S, message="the replication.apply span exported"
        )
        assert apply.context is not None and apply.parent is not None
        assert apply.context.trace_id == client_ctx.trace_id
        assert apply.parent.span_id == client_ctx.span_id
        assert apply.kind is trace.SpanKind.CONSUMER
        assert (apply.attributes or {}).get("replication.origin") == "a"

        on_a = [c for _sid, c in await read_stream(mesh["a"].store) if c.key == "traced"]
        on_b = [c for _sid, c in await read_stream(mesh["b"].store) if c.key == "traced"]
        assert [c.trace_parent for c in on_a] == [expected_parent]
        assert [c.trace_parent for c in on_b] == [expected_parent], "b's re-emitted entry"


# ------------------------------------------------------------------------------------ metrics


async def test_replication_moves_the_hot_path_metrics(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}) as mesh:
        engine = mesh["a"].running()
        log = WriteLog()

        def sample() -> dict[str, float]:
            names = (
                "replication_cdc_events_read_total",
                "replication_cdc_events_applied_total",
                "replication_batch_flush_total",
                "replication_repair_items_applied_total",
            )
            return {name: metric(engine, name, peer="b") for name in names}

        def applied(counts: dict[str, float]) -> float:
            """Events the hot path applied, plus items a repair applied first (each write is
            applied once, by one path). On Redis 6.2 a stream read from its start is a gap (6.2
            cannot show nothing was trimmed), whose repair races the hot path for the first
            writes; on 7.0 the repair count stays 0."""
            return (
                counts["replication_cdc_events_applied_total"]
                + counts["replication_repair_items_applied_total"]
            )

        for i in range(50):
            await log.put(mesh["b"], f"k{i}", b"x")
        await mesh.wait_converged(nodes=["a", "b"])
        await mesh.wait_idle()
        before = sample()
        assert before["replication_cdc_events_read_total"] >= 50
        assert applied(before) >= 50
        assert before["replication_cdc_events_applied_total"] > 0
        assert before["replication_batch_flush_total"] >= 1
        assert metric(engine, "replication_batch_size_entries", peer="b") > 0
        registry = engine.metrics.registry
        assert registry.get_sample_value("replication_lag_seconds", {"peer": "b"}) == 0
        assert registry.get_sample_value("replication_lag_events", {"peer": "b"}) == 0
        flushes = registry.get_sample_value(
            "replication_batch_flush_duration_seconds_count", {"peer": "b"}
        )
        assert flushes == before["replication_batch_flush_total"]

        for i in range(30):
            await log.put(mesh["b"], f"more{i}", b"y")
        await mesh.wait_converged(nodes=["a", "b"])
        await mesh.wait_idle()
        after = sample()
        assert (
            after["replication_cdc_events_read_total"]
            >= before["replication_cdc_events_read_total"] + 30
        )
        assert applied(after) >= applied(before) + 30
        hot = "replication_cdc_events_applied_total"
        assert after[hot] > before[hot]
        assert after["replication_batch_flush_total"] > before["replication_batch_flush_total"]


@pytest.mark.parametrize("hours", [1, -1], ids=["ahead", "behind"])
async def test_start_refuses_a_process_clock_an_hour_off_its_redis(
    redis_factory: RedisFactory, tmp_path: Path, hours: int
) -> None:
    # Ahead, its writes would outrank every other node's (and move the store's clock, which
    # never goes back, ahead for good); behind, it would set every peer's write aside.
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}, engines=[]) as mesh:
        a = mesh["a"]
        a.store.clock.set_source(lambda: wall_clock_ms() + hours * 3_600_000)
        engine = ReplicationEngine(a.config, store=a.store)
        a.engines.append(engine)
        side = "ahead of" if hours > 0 else "behind"
        with pytest.raises(EngineError, match=rf"clock is 36\d\d\.\d s {side} its Redis's"):
            await engine.start()
        assert_clean_after_failed_start(engine)
        assert await a.store.record() is None, "nothing was certified with the wrong clock"
        a.store.clock.set_source(wall_clock_ms)
        await engine.start()
        assert engine.state == "running"


async def test_a_process_clock_that_jumps_an_hour_while_running_makes_the_node_not_ready(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # Stepped back by an hour (an NTP step, a VM resumed): every peer's new write is set
    # aside as clock skew, and the node would look current. Checked at every certification.
    fast = {"settings": {"membership": {"interval_sec": 0.2}}}
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}, common=fast) as mesh:
        a = mesh["a"]
        engine = a.running()
        await async_wait_until(lambda: engine.readiness()[0], timeout=CONVERGE_TIMEOUT_S)
        a.store.clock.set_source(lambda: wall_clock_ms() - 3_600_000)

        def said() -> bool:
            ready, reasons = engine.readiness()
            return not ready and any(
                re.match(r"this process's clock is 36\d\d\.\d s behind its Redis's", r)
                for r in reasons
            )

        await async_wait_until(said, timeout=CONVERGE_TIMEOUT_S, message="not ready, said why")
        a.store.clock.set_source(wall_clock_ms)
        await async_wait_until(
            lambda: engine.readiness()[0], timeout=CONVERGE_TIMEOUT_S, message="ready again"
        )
