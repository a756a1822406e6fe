"""Nothing an entry or a key holds can wedge a stream (DESIGN.md invariant 7), end to end.

Under the old apply path each of these stopped a tailer for good: a batch of big values over
Redis's limit on one argument, a key of the wrong type made by hand under the prefix, and a
batch whose last entry for a key was refused for clock skew (dropping an earlier valid one).
Every test runs real engines against real ``redis-server`` processes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from harness.mesh import Mesh, MeshNode, WriteLog, append_raw, metric, open_mesh
from replication_engine import clock
from replication_engine.codec import Change, encode_entry
from replication_engine.cursor import (
    QUARANTINE_FIELD_MAX_BYTES,
    quarantined_value,
    read_quarantine,
)
from replication_engine.peer import Peer
from replication_engine.testing import RedisFactory, async_wait_until

# Deadline for an entry to be applied or a repair to land.
DEADLINE_S = 30.0
# Bytes per argument this file's local Redis accepts (Redis's own default is 512 MB): small, so
# a batch of a few megabytes stands in for the 500 MB batches that wedged a tailer.
PROTO_MAX_BULK = 1024 * 1024


async def test_a_batch_of_big_values_over_the_argument_limit_applies_in_bounded_calls(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        engines=[],
        overrides={"a": {"settings": {"hot_path": {"max_batch_bytes": 256 * 1024}}}},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        await a.store.redis.config_set("proto-max-bulk-len", str(PROTO_MAX_BULK))
        log = WriteLog()
        rng = random.Random(5)
        # 24 values of 200 KB: 4.8 MB in one read, each value far under the limit.
        for i in range(24):
            await log.put(b, f"big:{i}", rng.randbytes(200_000))
        engine = await mesh.start_engine("a")

        async def all_applied() -> bool:
            return all([await a.store.get(f"big:{i}") is not None for i in range(24)])

        await async_wait_until(all_applied, timeout=DEADLINE_S, message="every big value applied")
        assert a.stat("b", "apply_failures") == 0
        assert engine.local_breaker.current_state == "closed"
        for write in log.writes:
            item = await a.store.get(write.key)
            assert item is not None and item.value == write.value


async def test_a_backlog_of_big_entries_is_read_within_the_batch_bytes_from_the_first_read(
    redis_factory: RedisFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before any entry's size is known, only the count bounds a read: a first read of a full
    # batch of big entries (the audit's 16 of 60 MB) held them all in memory at once.
    budget = 256 * 1024
    reads: list[int] = []  # bytes of the entries each read brought
    original = Peer.read_batch

    async def measured(self: Peer, *args: Any, **kwargs: Any) -> Any:
        record, info, entries = await original(self, *args, **kwargs)
        reads.append(sum(len(v) for _, fields in entries for v in fields.values()))
        return record, info, entries

    monkeypatch.setattr(Peer, "read_batch", measured)
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        engines=[],
        overrides={"a": {"settings": {"hot_path": {"max_batch_bytes": budget}}}},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        rng = random.Random(9)
        for i in range(24):
            await b.store.put(f"big:{i}", rng.randbytes(200_000))
        await mesh.start_engine("a")
        await mesh.wait_idle()
        assert all([await a.store.get(f"big:{i}") is not None for i in range(24)])
    # One entry of 200 KB over the budget at most, where a first read of the default batch
    # size would have brought all 24 (4.8 MB).
    assert reads and max(reads) <= budget + 210_000, reads


async def test_a_wrong_typed_key_costs_one_quarantined_item_and_a_log_line_naming_it(
    redis_factory: RedisFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="replication_engine")
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}, engines=[]) as mesh:
        a, b = mesh["a"], mesh["b"]
        # Made by hand on a, under the prefix: the item key of "x" holds a string.
        await a.store.redis.set(a.store.keys.item("x"), b"somestring")
        log = WriteLog()
        for key in ("before", "x", "after"):
            await log.put(b, key, f"value of {key}".encode())
        engine = await mesh.start_engine("a")
        await mesh.wait_idle()

        assert await a.store.get("before") is not None and await a.store.get("after") is not None
        tailer = a.tailer("b")
        assert tailer.stats.refused == 1 and tailer.stats.apply_failures == 0
        assert engine.local_breaker.current_state == "closed"
        assert (
            metric(engine, "replication_cdc_events_quarantined_total", peer="b", reason="refused")
            == 1
        )
        rows = await engine.cursors.quarantine_list() if engine.cursors else []
        assert [row.key for row in rows] == ["x"], "quarantined once, however often repaired"
        assert rows[0].reason.startswith("refused by the local store: WRONGTYPE")
        lines = [r for r in caplog.records if r.getMessage() == "tailer.entry_refused"]
        assert lines and getattr(lines[0], "key", None) == "x"
        assert getattr(lines[0], "peer", None) == "b"
        assert "WRONGTYPE" in getattr(lines[0], "error", "")
        # The key stays requested for repair: once an operator removes the stray key, it heals.
        assert engine.cold_path is not None and engine.cold_path.has_pending("b")
        await a.store.redis.delete(a.store.keys.item("x"))
        await engine.repair_once()

        async def healed() -> bool:
            return await a.store.get("x") is not None

        await async_wait_until(healed, timeout=DEADLINE_S, message="x repaired")


async def test_a_clock_skewed_entry_is_set_aside_without_dropping_an_earlier_valid_one(
    redis_factory: RedisFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="replication_engine.cold_path")
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        engines=[],
        common={"local": {"max_clock_offset_sec": 60}},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        now = clock.wall_clock_ms()
        valid = Change.put("k", b"valid", hlc=clock.pack(now, 0), origin="b")
        # Incompressible and over the 4 KiB a quarantine row keeps of a field: set aside, the
        # value must still come back whole once the origin's clock is right.
        far = random.Random(17).randbytes(QUARANTINE_FIELD_MAX_BYTES * 3)
        ahead = Change.put("k", far, hlc=clock.pack(now + 3_600_000, 0), origin="b")
        # Both in one batch, the skewed one last: coalescing must not let it hide the valid one.
        await append_raw(b.store, encode_entry(valid))
        await append_raw(b.store, encode_entry(ahead))
        engine = await mesh.start_engine("a")
        await mesh.wait_idle()

        item = await a.store.get("k")
        assert item is not None and item.value == b"valid"
        assert (
            metric(
                engine, "replication_cdc_events_quarantined_total", peer="b", reason="clock_skew"
            )
            == 1
        )
        # And a repair of k is requested (it heals once the origin's clock is right).
        requests = [
            (getattr(r, "peer", None), getattr(r, "reason", None), getattr(r, "pending_keys", None))
            for r in caplog.records
            if r.getMessage() == "repair.requested"
        ]
        assert ("b", "clock_skew", 1) in requests, requests
        (row,), _ = read_quarantine(a.cursor_path, reason="clock_skew", values=True)
        assert quarantined_value(row) == far


async def write_past_a_hole_restart_and_fetch(
    mesh: Mesh[MeshNode], stat: str, mend: Callable[[], Awaitable[None]]
) -> None:
    """b writes k = "new" while a cannot take it (a's tailer counts it under ``stat``). Once b
    certifies it, a's engine stops, ``mend`` puts the cause right, and a starts again, which
    forgets the repair it asked for: a must fetch k, not claim past it, and b keep it."""
    a, b = mesh["a"], mesh["b"]
    await b.store.put("k", b"new")
    newest = await b.store.get("k")
    assert newest is not None

    async def b_certified_it() -> bool:
        record = await b.store.record()
        return record is not None and record.self_claim >= newest.hlc

    await async_wait_until(b_certified_it, timeout=DEADLINE_S, message="b certifies k")
    await async_wait_until(
        lambda: a.stat("b", stat) >= 1, timeout=DEADLINE_S, message=f"k counted {stat}"
    )
    await mesh.stop_engine("a")
    await mend()
    await mesh.start_engine("a")

    async def a_holds_k() -> bool:
        held = await a.store.get("k")
        return held is not None and held.value == b"new"

    await async_wait_until(a_holds_k, timeout=DEADLINE_S, message="a fetched k")
    await mesh.wait_converged()
    held = await b.store.get("k")
    assert held is not None and held.value == b"new"


async def test_an_entry_set_aside_is_fetched_after_a_restart_not_claimed_past(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # a's clock falls an hour behind: it sets b's new write aside (clock skew, from where a
    # stands) and holds only the version before it. Within one process a claims nothing of b's
    # stream while the repair it asked for waits; the clock is then put right and a restarted,
    # which forgets that request. Had the batch left a's store anchored in b's stream, the
    # next read would claim b's writes past k: a would refuse k for good as known, and b, seeing
    # a claim its version while holding an older one, would replace its own newest version with
    # a's (written off). The hole is kept in the store: a fetches k instead.
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": ["a"]},
        common={"local": {"max_clock_offset_sec": 60}},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        await b.store.put("k", b"before")
        await mesh.wait_converged()
        # Set back while the engine runs (one whose clock is wrong at start is refused).
        a.store.clock.set_source(lambda: clock.wall_clock_ms() - 3_600_000)

        async def put_the_clock_right() -> None:
            a.store.clock.set_source(clock.wall_clock_ms)

        await write_past_a_hole_restart_and_fetch(mesh, "quarantined", put_the_clock_right)


async def test_an_entry_the_store_refused_is_fetched_after_a_restart_not_claimed_past(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # The same hole made by the apply itself: a's item key for k holds a string (made by hand),
    # so a's store refuses b's k. The operator deletes the string and restarts a's engine.
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": ["a"]}) as mesh:
        a, b = mesh["a"], mesh["b"]
        await b.store.put("seen", b"before")
        await mesh.wait_converged()
        await a.store.redis.set(a.store.keys.item("k"), "not a hash")

        async def delete_the_string() -> None:
            await a.store.redis.delete(a.store.keys.item("k"))

        await write_past_a_hole_restart_and_fetch(mesh, "refused", delete_the_string)
