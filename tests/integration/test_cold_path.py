"""The cold path against real redis-server processes: drill, budget, LWW, backoff, bootstrap.

Node "b" is the one being repaired; node "a" is the peer that took writes "b" never saw (they
were written on "a" directly and never tailed).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pybreaker
import pytest

from harness.mesh import Write, lww_winner
from replication_engine import codec
from replication_engine.clock import HLC, pack, wall_clock_ms
from replication_engine.codec import Change, StreamId
from replication_engine.cold_path import REQUESTED_KEYS_MAX, ColdPath
from replication_engine.config import ColdPathConfig
from replication_engine.cursor import (
    QUARANTINE_FIELD_MAX_BYTES,
    CursorStore,
    quarantined_value,
    read_quarantine,
)
from replication_engine.merkle import GeometryError
from replication_engine.observability.metrics import Metrics
from replication_engine.peer import Peer
from replication_engine.resilience import EventRateLimiter
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import (
    RedisFactory,
    RedisHandle,
    async_wait_until,
    find_redis_server,
    redis_server_version,
)

PREFIX = "n:"
HAS_FUNCTIONS = redis_server_version(find_redis_server())[0] >= 7
# Apply chunk for bulk setup: one script call per 1,000 items keeps setup fast and bounded.
SETUP_CHUNK = 1000
# A busy peer, paced so the writer does not starve the bootstrap of the one event loop.
WRITES_PER_SEC_DURING_BOOTSTRAP = 2000


class FakeClock:
    """Monotonic seconds that only move when the test says so (backoff without sleeping)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Mesh:
    """Stores, peers and cursor files made by one test, all closed at teardown."""

    factory: RedisFactory
    tmp_path: Path
    stores: list[RedisStore] = field(default_factory=list)
    peers: list[Peer] = field(default_factory=list)
    cursors: list[CursorStore] = field(default_factory=list)

    async def store(self, server: RedisHandle, node_id: str, **options: Any) -> RedisStore:
        store = await RedisStore.connect(server.url, node_id=node_id, prefix=PREFIX, **options)
        self.stores.append(store)
        return store

    def peer(self, server: RedisHandle, node_id: str, **options: Any) -> Peer:
        peer = Peer(node_id, server.url, prefix=PREFIX, metrics=Metrics(), **options)
        self.peers.append(peer)
        return peer

    async def cold(self, store: RedisStore, peers: list[Peer], **settings: Any) -> ColdPath:
        cursors = await CursorStore.open(self.tmp_path / f"c-{len(self.cursors)}.db")
        self.cursors.append(cursors)
        clock = settings.pop("clock", time.monotonic)
        catching_up = settings.pop("is_catching_up", lambda: False)
        breaker = settings.pop("local_breaker", None)
        return ColdPath(
            store,
            peers,
            cursors,
            ColdPathConfig(**settings),
            Metrics(),
            is_catching_up=catching_up,
            local_breaker=breaker,
            clock=clock,
        )

    async def aclose(self) -> None:
        for peer in self.peers:
            await peer.close()
        for store in self.stores:
            await store.close()
        for cursors in self.cursors:
            await cursors.close()


@pytest.fixture
async def mesh(redis_factory: RedisFactory, tmp_path: Path) -> AsyncIterator[Mesh]:
    made = Mesh(redis_factory, tmp_path)
    try:
        yield made
    finally:
        await made.aclose()


def seed_changes(count: int, *, origin: str = "seed", start: int = 0) -> list[Change]:
    hlc = HLC()
    return [
        Change.put(f"key:{i:07d}", f"value-{i}".encode(), hlc=hlc.now(), origin=origin)
        for i in range(start, start + count)
    ]


async def populate(changes: list[Change], *stores: RedisStore) -> None:
    for store in stores:
        for i in range(0, len(changes), SETUP_CHUNK):
            await store.apply_batch(changes[i : i + SETUP_CHUNK])


async def versions(store: RedisStore) -> dict[str, tuple[int, str, bool]]:
    return {c.key: (c.hlc, c.content_hash, c.tombstone) async for c in store.versions()}


async def diverge(store: RedisStore, *, new: int, updated: int, deleted: int) -> set[str]:
    """Local writes on ``store`` only: new keys, newer values of seeded keys, deletes of them."""
    keys = set()
    for i in range(new):
        keys.add(f"extra:{store.node_id}:{i}")
        await store.put(f"extra:{store.node_id}:{i}", f"new-{i}")
    for i in range(updated):
        keys.add(f"key:{i:07d}")
        await store.put(f"key:{i:07d}", f"updated-{i}")
    for i in range(updated, updated + deleted):
        keys.add(f"key:{i:07d}")
        await store.delete(f"key:{i:07d}")
    return keys


async def catch_up_from_stream(
    source: RedisStore, target: RedisStore, after: StreamId, origin: str
) -> int:
    """What the hot path does after a bootstrap: apply the source's stream after ``after``."""
    cursor, applied = str(after), 0
    while True:
        entries: Any = await source.redis.xrange(
            source.keys.cdc, min=f"({cursor}", max="+", count=1000
        )
        if not entries:
            return applied
        changes = [
            codec.decode_entry(sid, fields, default_origin=origin) for sid, fields in entries
        ]
        await target.apply_batch(changes)
        applied += len(changes)
        cursor = entries[-1][0].decode()


async def stream_keys_after(store: RedisStore, after: StreamId) -> set[str]:
    entries: Any = await store.redis.xrange(store.keys.cdc, min=f"({after}", max="+")
    return {fields[b"key"].decode() for _, fields in entries}


async def repair_until_equal(
    pairs: list[tuple[ColdPath, RedisStore]], timeout: float = 30.0
) -> int:
    """Run cycles of every cold path until all stores' roots agree; returns the rounds run."""
    rounds = 0

    async def converged() -> bool:
        nonlocal rounds
        rounds += 1
        for cold, _ in pairs:
            await cold.repair_once(force=True)
        roots = {await store.merkle_root() for _, store in pairs}
        return len(roots) == 1

    await async_wait_until(
        converged, timeout=timeout, interval=0.0, message="roots equal after repair cycles"
    )
    return rounds


# ---------------------------------------------------------------------------- repair


async def test_missed_writes_converge_fetching_only_divergent_keys(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(5000), a, b)
    divergent = await diverge(a, new=20, updated=12, deleted=5)
    assert len(divergent) == 37
    # No hot path ran, and the peer's stream is trimmed to nothing: only the tree is left.
    await a.redis.xtrim(a.keys.cdc, maxlen=0, approximate=False)
    assert await a.redis.xlen(a.keys.cdc) == 0
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")])

    stats = await cold.repair_once()

    repair = stats.peers["a"]
    assert (repair.error, repair.in_sync, repair.remaining) == (None, False, False)
    assert repair.items_fetched == 37
    assert repair.items_applied == 37
    assert await a.merkle_root() == await b.merkle_root()
    assert await versions(a) == await versions(b)
    # Root, one interior level, the leaves, the items: a handful of peer round trips.
    assert repair.round_trips <= 8
    again = await cold.repair_once()
    assert again.peers["a"].in_sync and again.items_fetched == 0


async def test_budget_caps_items_per_cycle_and_later_cycles_finish(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(5000), a, b)
    await diverge(a, new=20, updated=12, deleted=5)
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")], max_items_per_cycle=10)

    first = await cold.repair_once()
    assert first.items_fetched == 10
    assert first.peers["a"].remaining is True
    assert await a.merkle_root() != await b.merkle_root()

    fetched = [first.items_fetched]
    while await a.merkle_root() != await b.merkle_root():
        assert len(fetched) < 10, f"no convergence after {fetched}"
        fetched.append((await cold.repair_once()).items_fetched)
    assert fetched == [10, 10, 10, 7]
    assert await versions(a) == await versions(b)


async def test_keys_only_the_local_node_has_are_kept_and_pulled_by_the_peer(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(1000), a, b)
    only_a = await diverge(a, new=15, updated=0, deleted=0)
    only_b = await diverge(b, new=9, updated=0, deleted=0)
    cold_b = await mesh.cold(b, [mesh.peer(server_a, "a")])
    cold_a = await mesh.cold(a, [mesh.peer(server_b, "b")])

    from_a = await cold_b.repair_once()
    assert from_a.items_fetched == len(only_a)
    for key in only_b:
        assert await b.get(key) is not None, f"{key} only b had was removed"
        assert await a.get(key) is None

    from_b = await cold_a.repair_once()
    assert from_b.items_fetched == len(only_b)
    for key in only_a | only_b:
        assert await a.get(key) is not None and await b.get(key) is not None
    assert await a.merkle_root() == await b.merkle_root()


async def test_deletes_propagate_and_a_later_update_beats_an_earlier_delete(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(200), a, b)
    await a.delete("key:0000001")
    deleted_at = await a.delete("key:0000002")
    b.clock.observe(deleted_at)  # b's update happens after a's delete, in HLC order too
    updated_at = await b.put("key:0000002", "b wins")
    assert updated_at > deleted_at
    cold_b = await mesh.cold(b, [mesh.peer(server_a, "a")])
    cold_a = await mesh.cold(a, [mesh.peer(server_b, "b")])

    await repair_until_equal([(cold_b, b), (cold_a, a)])

    for store in (a, b):
        assert await store.get("key:0000001") is None
        tomb = await store.get_version("key:0000001")
        assert tomb is not None and tomb.tombstone
        item = await store.get("key:0000002")
        assert item is not None and item.value == b"b wins" and item.origin == "b"
    assert await versions(a) == await versions(b)


async def test_concurrent_writes_during_repair_converge_to_the_lww_winners(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(2000), a, b)
    cold_b = await mesh.cold(b, [mesh.peer(server_a, "a")], max_items_per_cycle=50)
    cold_a = await mesh.cold(a, [mesh.peer(server_b, "b")], max_items_per_cycle=50)
    writes: list[Write] = []

    overlapped = asyncio.Event()  # set once repair rounds ran while writes went on

    async def writer(store: RedisStore, seed: int) -> None:
        i = 0
        while i < 400 or not overlapped.is_set():
            i += 1
            key = f"key:{(i * 7 + seed) % 300:07d}"
            if i % 9 == 0:
                hlc, value = await store.delete(key), None
            else:
                value = f"{store.node_id}-{i}".encode()
                hlc = await store.put(key, value)
            writes.append(Write(store.node_id, key, value, hlc))

    cycles = 0

    async def repairer(done: asyncio.Event) -> None:
        nonlocal cycles
        while not done.is_set():
            await cold_b.repair_once(force=True)
            await cold_a.repair_once(force=True)
            cycles += 1
            if cycles >= 3:
                overlapped.set()

    done = asyncio.Event()
    repairing = asyncio.create_task(repairer(done))
    try:
        await asyncio.gather(writer(a, 0), writer(b, 3))
    finally:
        done.set()
        await repairing
    assert cycles >= 3

    await repair_until_equal([(cold_b, b), (cold_a, a)])

    assert await versions(a) == await versions(b)
    for key, winner in lww_winner(writes).items():
        for store in (a, b):
            item = await store.get(key)
            if winner.value is None:
                assert item is None, key
            else:
                assert item is not None, key
                assert (item.value, item.hlc) == (winner.value, winner.hlc), key


async def test_geometry_mismatch_is_reported_once_and_nothing_is_fetched(
    mesh: Mesh, redis_factory: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a = await mesh.store(server_a, "a", fanout=16)
    b = await mesh.store(server_b, "b")
    await a.put("k", "v")
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")])

    with caplog.at_level(logging.ERROR, logger="replication_engine.cold_path"):
        first = await cold.repair_once()
        second = await cold.repair_once()

    for stats in (first, second):
        repair = stats.peers["a"]
        assert repair.error is not None
        assert "fanout=16" in repair.error and "fanout=256" in repair.error
        assert "'a'" in repair.error
        assert (repair.items_fetched, repair.branches_visited) == (0, 0)
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1
    assert cold.status()["peers"]["a"]["geometry_error"] == first.peers["a"].error
    assert await b.get("k") is None
    with pytest.raises(GeometryError, match="fanout=16"):
        await cold.check_geometry(mesh.peers[0])


async def test_a_peer_with_no_geometry_stored_passes_the_check(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    b = await mesh.store(server_b, "b")
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")])

    await cold.check_geometry(mesh.peers[0])  # server_a is empty: a new node


async def test_a_dead_peer_is_backed_off_then_repaired_after_restart(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a = redis_factory(appendonly=True, appendfsync="always")
    server_b = redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(500), a, b)
    await diverge(a, new=5, updated=0, deleted=0)
    clock = FakeClock()
    cold = await mesh.cold(
        b,
        [mesh.peer(server_a, "a", op_timeout_sec=1.0)],
        clock=clock,
        backoff_base_sec=5.0,
        backoff_max_sec=60.0,
    )
    server_a.kill()

    failed = await cold.repair_once()
    assert failed.peers["a"].error is not None
    remaining = cold.status()["peers"]["a"]["backoff_remaining_sec"]
    assert 2.5 <= remaining <= 5.0  # full jitter within [base/2, base]
    failures = cold.metrics.registry.get_sample_value(
        "replication_repair_failures_total", {"peer": "a"}
    )
    assert failures == 1

    skipped = await cold.repair_once()
    assert skipped.peers_skipped == {"a": "backoff"}
    assert skipped.peers_checked == 0 and skipped.skipped_reason == "no_peer_available"

    server_a.restart()
    await a.redis.connection_pool.disconnect()  # the test's own client held a killed socket
    clock.now += remaining + 0.001
    recovered = await cold.repair_once()
    assert recovered.peers["a"].error is None
    assert recovered.items_fetched == 5
    assert await a.merkle_root() == await b.merkle_root()
    status = cold.status()["peers"]["a"]
    assert (status["backoff_remaining_sec"], status["failures"]) == (0.0, 0)


async def test_a_local_store_failure_ends_the_cycle_without_backing_off_the_peer(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await diverge(a, new=3, updated=0, deleted=0)
    breaker = pybreaker.CircuitBreaker(fail_max=1, reset_timeout=60)
    breaker.open()
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")], local_breaker=breaker)

    stats = await cold.repair_once()

    error = stats.peers["a"].error
    assert error is not None and error.startswith("local store")
    assert cold.backoff_remaining("a") == 0.0
    assert await b.get("extra:a:0") is None
    breaker.close()
    assert (await cold.repair_once()).items_applied == 3


async def test_corrupt_items_on_the_peer_are_skipped_and_counted(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(500), a, b)
    extra = sorted(await diverge(a, new=10, updated=0, deleted=0))
    await a.redis.hset(a.keys.item(extra[0]), "h", "00" * 16)  # hash mismatch
    await a.redis.hset(a.keys.item(extra[1]), "d", codec.ZSTD_MAGIC + b"garbage")  # bad zstd
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")])

    stats = await cold.repair_once()

    repair = stats.peers["a"]
    assert repair.error is None
    assert (repair.items_fetched, repair.items_corrupt, repair.items_applied) == (10, 2, 8)
    assert await b.get(extra[0]) is None and await b.get(extra[1]) is None
    for key in extra[2:]:
        assert await b.get(key) is not None
    again = await cold.repair_once()  # the corrupt pair still differs; still no crash
    assert again.peers["a"].error is None and again.peers["a"].items_corrupt == 2


@pytest.mark.parametrize("reads", ["function", "pipeline"])
async def test_a_wrong_typed_item_on_the_peer_is_skipped_alone_and_the_rest_is_repaired(
    mesh: Mesh, redis_factory: RedisFactory, caplog: pytest.LogCaptureFixture, reads: str
) -> None:
    if reads == "function" and not HAS_FUNCTIONS:
        pytest.skip("Redis before 7.0 has no functions: its reader pipelines (the other case)")
    caplog.set_level(logging.INFO, logger="replication_engine.store.reader")
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(200), a, b)
    extra = sorted(await diverge(a, new=10, updated=0, deleted=0))
    # Written through the store, then made a string by hand: the peer's tree still lists it.
    await a.redis.delete(a.keys.item(extra[0]))
    await a.redis.set(a.keys.item(extra[0]), b"not a hash")
    if reads == "pipeline" and HAS_FUNCTIONS:
        await a.redis.function_flush()  # a Redis without the library: the reader pipelines
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")])

    stats = await cold.repair_once()

    repair = stats.peers["a"]
    assert repair.error is None, repair.error
    assert (repair.items_fetched, repair.items_corrupt, repair.items_applied) == (10, 1, 9)
    assert await b.get(extra[0]) is None
    for key in extra[1:]:
        assert await b.get(key) is not None, f"{key} not repaired"
    (row,) = await cold.cursors.quarantine_list(peer_id="a")
    assert row.key == extra[0] and row.reason.startswith("bad_item: "), row
    assert "WRONGTYPE" in row.reason, row.reason
    # One wrong-typed key is the data's fault, not the function's: the reader keeps using it.
    pipelined = [r for r in caplog.records if r.getMessage() == "reader.pipelined"]
    assert bool(pipelined) == (reads == "pipeline"), pipelined


async def test_items_the_peer_stores_corrupt_are_quarantined_and_counted_once_each(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(200), a, b)
    extra = sorted(await diverge(a, new=8, updated=0, deleted=0))
    broken: dict[str, dict[str, bytes]] = {
        extra[0]: {"hlc": b"not an hlc"},
        extra[1]: {"o": b"\xff\xfe"},  # a binary origin
        extra[2]: {"v": b"1e99"},
        extra[3]: {"h": b"00" * 16},  # hash mismatch
    }
    for key, fields in broken.items():
        await a.redis.hset(a.keys.item(key), mapping=fields)  # type: ignore[arg-type]
    await a.redis.hdel(a.keys.item(extra[4]), "d")  # data missing
    await a.redis.delete(a.keys.item(extra[5]))
    await a.redis.set(a.keys.item(extra[5]), b"not a hash")
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")])

    def corrupt_total() -> float | None:
        return cold.metrics.registry.get_sample_value(
            "replication_repair_items_corrupt_total", {"peer": "a"}
        )

    for cycle in range(3):
        stats = await cold.repair_once()
        repair = stats.peers["a"]
        assert (repair.error, repair.items_corrupt) == (None, 6), (cycle, repair)
    assert corrupt_total() == 6
    kept = await cold.cursors.quarantine_list(peer_id="a")
    assert sorted(str(row.key) for row in kept) == extra[:6], "each corrupt item kept once"
    rows = {row.key: row for row in kept}
    for key in (extra[0], extra[1], extra[2], extra[5]):
        assert rows[key].reason.startswith("bad_item: "), rows[key]
    for key in (extra[3], extra[4]):
        assert rows[key].reason.startswith("hash_mismatch: "), rows[key]
    assert rows[extra[3]].raw["h"] == "00" * 16  # the fields as the peer stores them
    assert "d" not in rows[extra[4]].raw

    # A valid version is repaired; a new version, still corrupt, is a new rejection.
    await a.put(extra[3], "fixed")
    await a.put(extra[4], "newer")
    await a.redis.hdel(a.keys.item(extra[4]), "d")
    stats = await cold.repair_once()

    assert stats.peers["a"].items_corrupt == 5
    fixed = await b.get(extra[3])
    assert fixed is not None and fixed.value == b"fixed"
    assert corrupt_total() == 7
    assert len(await cold.cursors.quarantine_list(peer_id="a")) == 7


async def test_an_item_stamped_beyond_the_clock_offset_is_quarantined_once_with_its_value(
    mesh: Mesh, redis_factory: RedisFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    # The peer takes what ours refuses: a write stamped an hour ahead (and no stream entry of
    # it reaches ours: only the repair meets it).
    a = await mesh.store(server_a, "a", max_clock_offset_sec=86_400)
    b = await mesh.store(server_b, "b")
    # Incompressible and over the 4 KiB a row keeps of a field: the value must be kept whole.
    far = random.Random(7).randbytes(QUARANTINE_FIELD_MAX_BYTES * 2)
    await a.put("fine", "v")  # before: a's clock follows what it applies
    ahead = Change.put("ahead", far, hlc=pack(wall_clock_ms() + 3_600_000, 0), origin="c")
    await a.apply_batch([ahead])
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")])

    with caplog.at_level(logging.ERROR, logger="replication_engine.cold_path"):
        for cycle in range(3):
            stats = await cold.repair_once()
            repair = stats.peers["a"]
            # From the second cycle on, met twice: as a key kept pending, then by the drill.
            assert repair.error is None and repair.items_refused >= 1, (cycle, repair)

    assert await b.get("ahead") is None and await b.get("fine") is not None
    rows, _ = read_quarantine(cold.cursors.path, peer_id="a", values=True)
    assert [row.key for row in rows] == ["ahead"], "kept once"
    assert rows[0].reason.startswith("clock_skew: "), rows[0].reason
    assert quarantined_value(rows[0]) == far
    refused = cold.metrics.registry.get_sample_value(
        "replication_repair_items_refused_total", {"peer": "a"}
    )
    assert refused == 1
    logged = [r for r in caplog.records if r.getMessage() == "repair.item_refused"]
    assert len(logged) == 1, logged


async def test_an_item_whose_stream_entry_the_hot_path_kept_is_not_kept_again_by_a_repair(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a = await mesh.store(server_a, "a", max_clock_offset_sec=86_400)
    b = await mesh.store(server_b, "b")
    ahead = Change.put("ahead", b"v", hlc=pack(wall_clock_ms() + 3_600_000, 0), origin="c")
    await a.apply_batch([ahead])
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")])
    # What the tailer does after quarantining the entry from a's stream.
    cold.request_repair("a", reason="clock_skew", keys=["ahead"])

    for _ in range(2):
        assert (await cold.repair_once()).peers["a"].items_refused >= 1

    assert await cold.cursors.quarantine_list(peer_id="a") == []
    assert cold.has_pending("a")  # still asked for: it lands once the clocks agree


async def test_requested_keys_are_fetched_first_and_run_while_catching_up(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(300), a, b)
    keys = sorted(await diverge(a, new=2, updated=1, deleted=0))
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")], is_catching_up=lambda: True)

    waiting = await cold.repair_once()
    assert waiting.skipped_reason == "catching_up" and waiting.items_fetched == 0

    cold.request_repair("a", reason="quarantine", keys=keys)
    stats = await cold.repair_once()
    repair = stats.peers["a"]
    assert repair.items_fetched == 3 and repair.items_applied == 3
    assert repair.branches_visited == 0 and repair.in_sync  # fixed before the root compare
    assert cold.status()["peers"]["a"]["repair_requested"] == []
    assert (await cold.repair_once()).skipped_reason == "catching_up"


async def test_requested_keys_are_bounded(mesh: Mesh, redis_factory: RedisFactory) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    b = await mesh.store(server_b, "b")
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")])

    cold.request_repair("a", reason="quarantine", keys=(f"k{i}" for i in range(50_000)))

    status = cold.status()["peers"]["a"]
    assert status["requested_keys"] == REQUESTED_KEYS_MAX
    assert status["repair_requested"] == ["quarantine"]


async def test_cached_root_is_reused_until_a_repair_is_requested(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(100), a, b)
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")], root_cache_ttl_sec=3600)

    assert (await cold.repair_once()).peers["a"].round_trips == 1
    await a.put("late", "value")
    cached = await cold.repair_once()
    assert cached.peers["a"].in_sync and cached.peers["a"].round_trips == 0

    cold.request_repair("a", reason="gap")
    repaired = await cold.repair_once()
    assert repaired.items_fetched == 1
    assert await b.get("late") is not None


async def test_run_repairs_at_once_when_woken_and_stops(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    cold = await mesh.cold(b, [mesh.peer(server_a, "a")], interval_sec=3600)
    task = asyncio.create_task(cold.run(), name="cold_path")
    try:
        await async_wait_until(
            lambda: cold.last_stats is not None, timeout=10, message="first cycle at start"
        )
        await a.put("gap-key", "value")

        cold.request_repair("a", reason="gap")

        await async_wait_until(
            lambda: b.get("gap-key"),
            timeout=10,
            message="requested repair ran without waiting the interval",
        )
    finally:
        cold.stop()
        async with asyncio.timeout(10):
            await task


async def test_peers_are_repaired_in_priority_order_sharing_one_budget(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_c, server_b = redis_factory(), redis_factory(), redis_factory()
    a, c = await mesh.store(server_a, "a"), await mesh.store(server_c, "c")
    b = await mesh.store(server_b, "b")
    await diverge(a, new=8, updated=0, deleted=0)
    await diverge(c, new=8, updated=0, deleted=0)
    peers = [mesh.peer(server_a, "a", priority=2), mesh.peer(server_c, "c", priority=1)]
    cold = await mesh.cold(b, peers, max_items_per_cycle=10)

    stats = await cold.repair_once()

    assert list(stats.peers) == ["c", "a"]
    assert (stats.peers["c"].items_fetched, stats.peers["a"].items_fetched) == (8, 2)
    assert stats.peers["a"].remaining and not stats.peers["c"].remaining


async def test_cancelling_a_cycle_mid_repair_raises_and_leaves_no_task_behind(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(3000), a)
    peer = mesh.peer(server_a, "a")
    cold = await mesh.cold(b, [peer], max_items_per_cycle=5000, fetch_batch_size=50)

    for attempt in range(5):
        target = peer.counter.round_trips + 3 + attempt  # cancel a little later each time
        cycle = asyncio.create_task(cold.repair_once())
        await async_wait_until(
            functools.partial(_reached, peer, target),
            timeout=10,
            interval=0.001,
            message="cycle under way",
        )
        cycle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cycle
        left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("cold_")]
        assert left == [], f"attempt {attempt}: tasks left running: {left}"

    assert (await cold.repair_once()).peers["a"].remaining is False
    assert await a.merkle_root() == await b.merkle_root()


# ---------------------------------------------------------------------------- bootstrap


async def test_bootstrap_copies_a_peer_and_returns_the_tail_before_the_copy(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(20_000), a)
    tail_before = StreamId.parse(await a.stream_tail() or "0-0")
    peer = mesh.peer(server_a, "a")
    cold = await mesh.cold(b, [peer])
    reported: list[tuple[int, int]] = []
    during: set[str] = set()
    started = asyncio.Event()

    async def write_during_bootstrap() -> None:
        await started.wait()
        for i in range(50):
            await a.put(f"during:{i}", f"v{i}")
            during.add(f"during:{i}")

    def progress(done: int, total: int) -> None:
        reported.append((done, total))
        started.set()

    writer = asyncio.create_task(write_during_bootstrap())
    try:
        tail = await cold.bootstrap(peer, progress=progress)
        written_during = set(during)
    finally:
        await writer

    assert tail == tail_before
    assert written_during, "the writer ran while the bootstrap was still copying"
    assert during <= await stream_keys_after(a, tail)
    assert reported[-1] == (256, 256)
    assert [done for done, _ in reported] == sorted(done for done, _ in reported)
    assert await cold.cursors.bootstrap_state("a") is None
    assert await cold.cursors.get("a") == str(tail)
    copied = await versions(b)
    seeded = {k: v for k, v in (await versions(a)).items() if k.startswith("key:")}
    assert {k: v for k, v in copied.items() if k.startswith("key:")} == seeded

    await catch_up_from_stream(a, b, tail, "a")
    assert await a.merkle_root() == await b.merkle_root()


async def test_repair_cycles_leave_out_a_peer_while_it_is_being_bootstrapped(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    await populate(seed_changes(2000), a)
    peer = mesh.peer(server_a, "a")
    # Slow enough that the bootstrap is still copying when the cycle runs.
    cold = await mesh.cold(b, [peer], bootstrap_rate_limit_per_sec=200, fetch_batch_size=50)
    copying = asyncio.Event()
    bootstrap = asyncio.create_task(cold.bootstrap(peer, progress=lambda *_: copying.set()))
    try:
        await asyncio.wait_for(copying.wait(), timeout=10)
        stats = await cold.repair_once(force=True)
        assert stats.peers_skipped == {"a": "bootstrapping"}
        assert stats.items_fetched == 0
    finally:
        bootstrap.cancel()
        await asyncio.gather(bootstrap, return_exceptions=True)

    # Once no bootstrap runs, the peer is repaired by cycles again.
    stats = await cold.repair_once(force=True)
    assert stats.peers_skipped == {}
    assert stats.peers["a"].items_fetched > 0


async def test_an_interrupted_bootstrap_resumes_without_rewalking_done_branches(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    server_a, server_b, server_c = redis_factory(), redis_factory(), redis_factory()
    a, b = await mesh.store(server_a, "a"), await mesh.store(server_b, "b")
    c = await mesh.store(server_c, "c")
    await populate(seed_changes(20_000), a)
    peer = mesh.peer(server_a, "a")
    # Slow enough (20,000 items at 4,000/s) that the test can interrupt it part way.
    cold = await mesh.cold(b, [peer], bootstrap_rate_limit_per_sec=4000)

    first = asyncio.create_task(cold.bootstrap(peer))
    state = await async_wait_until(
        lambda: _some_branches_done(cold),
        timeout=30,
        interval=0.005,
        message="bootstrap marked a branch done",
    )
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    state = await cold.cursors.bootstrap_state("a")
    assert state is not None and 0 < len(state.done_branches) < 256
    done_branch = sorted(state.done_branches)[0]
    geometry = b.geometry
    in_done = _key_in_branch(geometry, lambda branch: branch == done_branch)
    in_todo = _key_in_branch(geometry, lambda branch: branch not in state.done_branches)
    await a.put(in_done, "written after the branch was copied")
    await a.put(in_todo, "written before the branch was copied")
    trips_before = peer.counter.round_trips
    resumed_progress: list[int] = []

    tail = await cold.bootstrap(peer, progress=lambda done, _total: resumed_progress.append(done))

    resumed_trips = peer.counter.round_trips - trips_before
    assert str(tail) == state.tail_id
    assert resumed_progress[0] >= len(state.done_branches)
    # A done branch is not walked again: what changed there since is left to the stream.
    assert await b.get(in_done) is None
    assert in_done in await stream_keys_after(a, tail)
    assert await b.get(in_todo) is not None
    # The same copy from scratch costs more peer round trips than the resumed one.
    full_peer = mesh.peer(server_a, "a")
    full = await mesh.cold(c, [full_peer])
    await full.bootstrap(full_peer)
    assert resumed_trips < full_peer.counter.round_trips

    await catch_up_from_stream(a, b, tail, "a")
    assert await a.merkle_root() == await b.merkle_root()
    assert await versions(a) == await versions(b)


def _reached(peer: Peer, round_trips: int) -> bool:
    return peer.counter.round_trips >= round_trips


async def _some_branches_done(cold: ColdPath) -> Any:
    state = await cold.cursors.bootstrap_state("a")
    return state if state is not None and state.done_branches else None


def _key_in_branch(geometry: Any, wanted: Callable[[str], bool]) -> str:
    for i in range(100_000):
        key = f"probe:{i}"
        if wanted(geometry.leaf_path(key)[: geometry.width]):
            return key
    raise AssertionError("no probe key found for the branch")


@pytest.mark.slow
async def test_bootstrap_of_100k_keys_while_the_peer_keeps_writing(
    mesh: Mesh, redis_factory: RedisFactory, record_property: Callable[[str, Any], None]
) -> None:
    server_a, server_b = redis_factory(), redis_factory()
    a = await mesh.store(server_a, "a", stream_maxlen=1_000_000)
    b = await mesh.store(server_b, "b")
    setup_started = time.perf_counter()
    await populate(seed_changes(100_000), a)
    populate_sec = time.perf_counter() - setup_started
    peer = mesh.peer(server_a, "a")
    cold = await mesh.cold(b, [peer], bootstrap_rate_limit_per_sec=1_000_000)
    stop, tail_recorded = asyncio.Event(), asyncio.Event()
    written: list[str] = []

    pace = EventRateLimiter(WRITES_PER_SEC_DURING_BOOTSTRAP, burst=50)

    async def keep_writing() -> None:
        await tail_recorded.wait()
        i = 0
        while not stop.is_set():
            await pace.acquire(1)
            key = f"key:{(i * 7919) % 120_000:07d}"  # updates of copied keys and new keys
            await (a.delete(key) if i % 10 == 0 else a.put(key, f"live-{i}"))
            written.append(key)
            i += 1

    writer = asyncio.create_task(keep_writing())
    started = time.perf_counter()
    try:
        tail = await cold.bootstrap(peer, progress=lambda _done, _total: tail_recorded.set())
    finally:
        stop.set()
        tail_recorded.set()
        await writer
    bootstrap_sec = time.perf_counter() - started
    caught_up = await catch_up_from_stream(a, b, tail, "a")

    assert written, "writes went on during the bootstrap"
    assert set(written) <= await stream_keys_after(a, tail)
    assert await a.merkle_root() == await b.merkle_root()
    record_property("populate_sec", round(populate_sec, 2))
    record_property("bootstrap_sec", round(bootstrap_sec, 2))
    record_property("writes_during", len(written))
    record_property("caught_up_entries", caught_up)
    print(
        f"\n100k bootstrap: populate {populate_sec:.1f}s, bootstrap {bootstrap_sec:.1f}s, "
        f"{len(written)} writes during, {caught_up} stream entries applied after"
    )


async def _claim(store: RedisStore, claims: dict[str, int]) -> None:
    """Give ``store`` a certified record (not recovering) whose claims are ``claims``, as a
    complete repair would."""
    _, incarnation, _ = await store.open_record(mode="mesh", relay=False)
    own = await store.certify(
        expected_run="", expected_nonces=[], nonce="n", advance=True, state="ok"
    )
    taken = await store.inherit(
        peer="x",
        token="t",
        tail=f"{0:020d}-{0:020d}",
        incarnation=incarnation,
        cert=own.cert,
        claims=claims,
    )
    assert taken > 0


async def test_a_written_off_version_is_replaced_even_when_our_claims_cover_the_peer_s(
    mesh: Mesh,
) -> None:
    """This store holds c's version of k, which the mesh wrote off (the peer holds b's older
    one while its claims cover c's), and this store's own claims already cover b's version (its
    tailer read on past it before a restore brought c's back). The apply answers "known" for
    the peer's version, before comparing versions; the repair must still replace ours, or the
    mesh stays split for good (docs/DELETES.md, "Written off")."""
    server_a, server_b = mesh.factory(), mesh.factory()
    here, there = await mesh.store(server_a, "a"), await mesh.store(server_b, "p")
    older = Change.put("k", b"older", hlc=100 << 16, origin="b")
    newer = Change.put("k", b"newer", hlc=200 << 16, origin="c")
    await there.apply_batch([older])
    await here.apply_batch([newer])
    await _claim(there, {"b": older.hlc, "c": newer.hlc})
    await _claim(here, {"b": older.hlc})
    cold = await mesh.cold(here, [mesh.peer(server_b, "p")])

    stats = await cold.repair_once(force=True)

    item = await here.get("k")
    assert item is not None and item.value == b"older", stats
    assert await here.merkle_root() == await there.merkle_root()
    (kept,) = await mesh.cursors[0].quarantine_list()
    assert kept.key == "k" and kept.reason.startswith("written_off"), kept


async def test_a_requested_repair_that_failed_is_retried_when_its_backoff_ends(
    mesh: Mesh, redis_factory: RedisFactory
) -> None:
    """With periodic cycles off, a requested repair (a recovery, a gap) is the only thing that
    runs; one that met its peer down backs off, and is tried again when the backoff ends, not
    an interval later."""
    here, there = redis_factory(), redis_factory(appendonly=True, appendfsync="always")
    local, remote = await mesh.store(here, "b"), await mesh.store(there, "a")
    await populate(seed_changes(20, origin="a"), remote)
    want = await remote.merkle_root()
    peer = mesh.peer(there, "a", failure_threshold=100)
    cold = await mesh.cold(
        local, [peer], enabled=False, interval_sec=600, backoff_base_sec=0.5, backoff_max_sec=1
    )
    there.kill()
    runner = asyncio.create_task(cold.run())
    try:
        cold.request_repair("a", reason="gap")

        def failed() -> bool:
            last = cold.status()["peers"]["a"]["last_repair"]
            return last is not None and last["error"] is not None

        await async_wait_until(failed, timeout=20, message="the repair met its peer down")
        await asyncio.to_thread(there.restart)

        async def repaired() -> bool:
            return await local.merkle_root() == want

        await async_wait_until(repaired, timeout=20, message="repaired within the backoff")
    finally:
        cold.stop()
        await runner
