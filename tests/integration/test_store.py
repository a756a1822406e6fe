"""RedisStore against a real redis-server: the write path, the apply path and the tree.

The Lua scripts are the only code that changes a store, so these tests check them from the
outside against the pure reference (``MerkleModel``, ``codec``): the tree Redis holds must equal
the model built from the stored versions, apply must be order- and duplicate-independent, and
every CDC entry the scripts write must decode like one ``codec.encode_entry`` produced.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.exceptions
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from harness.mesh import change_order
from replication_engine import clock, codec
from replication_engine.clock import HLC
from replication_engine.codec import Change, CodecError, decode_entry, encode_entry, encode_payload
from replication_engine.connection import make_client
from replication_engine.errors import ReplicationError
from replication_engine.knowledge import ALL_WRITES, ApplyStatus
from replication_engine.merkle import ZERO, Geometry, GeometryError, MerkleModel, leaf_digest
from replication_engine.store.protocol import StreamBatch
from replication_engine.store.redis_store import (
    InvalidWriteError,
    NotReplicatedError,
    ReadOnlyStoreError,
    RedisStore,
    StoreKeyError,
    StoreUnavailableError,
)
from replication_engine.testing import RedisFactory, RedisHandle, async_wait_until

StoreFactory = Callable[..., Awaitable[RedisStore]]

# Anchor for remote HLCs: the present, so tombstones are inside the default grace period.
NOW_MS = clock.wall_clock_ms()
TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
SPAN_ID = 0xB7AD6B7169203331
TRACE_PARENT = f"00-{TRACE_ID:032x}-{SPAN_ID:016x}-01"
_GLOB_SPECIAL = "\\*?[]^"


class ManualClock:
    """A wall clock the test sets by hand (tombstone ages, clocks stuck in the past)."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@pytest.fixture
async def open_store() -> AsyncIterator[StoreFactory]:
    """Open stores by URL; every one is closed at teardown."""
    opened: list[RedisStore] = []

    async def make(url: str, **kwargs: Any) -> RedisStore:
        kwargs.setdefault("node_id", "node-a")
        store = await RedisStore.connect(url, **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


def _escape(prefix: str) -> str:
    return "".join("\\" + c if c in _GLOB_SPECIAL else c for c in prefix)


async def redis_tree(
    store: RedisStore,
) -> tuple[str, dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """Root, interior nodes and leaf buckets exactly as Redis holds them, found by SCAN.

    Scanning (rather than walking from the root) also catches stray nodes a walk would miss.
    """
    nodes: dict[str, dict[str, str]] = {}
    leaves: dict[str, dict[str, str]] = {}
    root_raw = await store.redis.get(store.keys.root)
    async for raw_key in store.redis.scan_iter(match=f"{_escape(store.keys.part)}mk:*", count=1000):
        path = raw_key.decode("utf-8")[len(store.keys.part) + len("mk:") :]
        if path == "root":
            continue
        content = {k.decode(): v.decode() for k, v in (await store.redis.hgetall(raw_key)).items()}
        (leaves if store.geometry.is_leaf(path) else nodes)[path] = content
    root = root_raw.decode() if root_raw is not None else "0" * 32
    return root, nodes, leaves


async def model_of(store: RedisStore) -> MerkleModel:
    digests = {
        c.key: leaf_digest(c.key, c.hlc, c.content_hash, c.tombstone)
        async for c in store.versions()
    }
    return MerkleModel.build(digests, store.geometry)


async def assert_tree_matches_model(store: RedisStore) -> None:
    model = await model_of(store)
    root, nodes, leaves = await redis_tree(store)
    assert root == model.root
    assert nodes == model.nodes
    assert leaves == model.leaves
    expected_root = ZERO if model.root == "0" * 32 else bytes.fromhex(model.root)
    assert await store.merkle_root() == expected_root


async def state_of(store: RedisStore) -> dict[str, tuple[int, str, bool, str, bytes | None]]:
    return {
        c.key: (c.hlc, c.origin, c.tombstone, c.content_hash, c.value)
        async for c in store.versions()
    }


async def items_of(store: RedisStore) -> dict[str, tuple[bytes, str, int, str]]:
    return {i.key: (i.value, i.content_hash, i.hlc, i.origin) async for i in store.items()}


async def cdc_entries(store: RedisStore) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return list(await store.redis.xrange(store.keys.cdc))


async def claim(store: RedisStore, claims: dict[str, int]) -> None:
    """Give the store claims (docs/DELETES.md) as a complete repair from a peer would."""
    await store.open_record(mode="mesh", relay=False)
    record = await store.record()
    assert record is not None
    assert await store.inherit(
        peer="node-z",
        token="t",
        tail="0-0",
        incarnation=record.incarnation,
        cert=record.cert,
        claims=claims,
    )


async def collect(store: RedisStore, stable: int, limit: int = 500) -> int:
    """Collect the store's tombstones at or below the stable frontier ``stable``."""
    await store.open_record(mode="mesh", relay=False)
    record = await store.record()
    assert record is not None
    return await store.collect_tombstones(
        stable, incarnation=record.incarnation, cert=record.cert, limit=limit
    )


def put(key: str, value: bytes, ms_offset: int, origin: str = "node-b", counter: int = 0) -> Change:
    return Change.put(key, value, hlc=clock.pack(NOW_MS + ms_offset, counter), origin=origin)


def tomb(key: str, ms_offset: int, origin: str = "node-b", counter: int = 0) -> Change:
    return Change.delete(key, hlc=clock.pack(NOW_MS + ms_offset, counter), origin=origin)


# ---------------------------------------------------------------------------- local writes


async def test_put_get_delete_round_trip(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url, prefix="t:")
    hlc = await store.put("user:1", b'{"name": "ada"}', content_type="json")
    item = await store.get("user:1")
    assert item is not None
    assert item.value == b'{"name": "ada"}'
    assert item.content_type == "json"
    assert item.origin == "node-a"
    assert item.hlc == hlc

    await store.put("text", "héllo")
    assert (await store.get("text")).value == "héllo".encode()  # type: ignore[union-attr]

    deleted_at = await store.delete("user:1")
    assert deleted_at > hlc
    assert await store.get("user:1") is None
    version = await store.get_version("user:1")
    assert version is not None and version.tombstone and version.hlc == deleted_at

    revived = await store.put("user:1", b"back")
    assert revived > deleted_at
    assert (await store.get("user:1")).value == b"back"  # type: ignore[union-attr]
    assert await store.get("never-written") is None
    assert await store.get_version("never-written") is None


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"x",
        b"\x28\xb5\x2f\xfd",
        b"\x28\xb5\x2f\xfd" + b"z" * 500,
        b"compressible " * 200,
        random.Random(7).randbytes(5000),
    ],
    ids=["empty", "one", "magic", "magic-long", "compressible", "random"],
)
async def test_value_round_trip(
    redis_server: RedisHandle, open_store: StoreFactory, value: bytes
) -> None:
    store = await open_store(redis_server.url)
    await store.put("k", value)
    item = await store.get("k")
    assert item is not None and item.value == value
    stored = await store.redis.hget(store.keys.item("k"), "d")
    assert stored == encode_payload(value)


async def test_put_many_writes_each_like_put_in_one_round_trip(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url)
    first = await store.put("k", b"v1")
    hlcs = await store.put_many(
        [("k", b"v2", "json"), ("other", "text", "text"), ("k", b"v3", "x")]
    )
    assert len(hlcs) == 3 and first < hlcs[0] < hlcs[1] < hlcs[2]
    item = await store.get("k")
    assert item is not None and (item.value, item.hlc, item.content_type) == (b"v3", hlcs[2], "x")
    assert (await store.get_version("k")).version == 3  # type: ignore[union-attr]
    assert (await store.get("other")).value == b"text"  # type: ignore[union-attr]
    assert [
        decode_entry(sid, f, default_origin="x").hlc for sid, f in await cdc_entries(store)
    ] == [
        first,
        *hlcs,
    ]
    assert await store.put_many([]) == []
    await assert_tree_matches_model(store)


async def test_versions_increase_per_key(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url)
    for expected in (1, 2, 3):
        await store.put("k", b"v%d" % expected)
        assert (await store.get_version("k")).version == expected  # type: ignore[union-attr]


async def test_concurrent_writers_share_one_clock(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    # Two store objects stand for two writer processes on one Redis, both with a frozen clock.
    frozen = ManualClock(NOW_MS)
    a = await open_store(redis_server.url, hlc=HLC(frozen))
    b = await open_store(redis_server.url, hlc=HLC(frozen))
    hlcs: list[int] = []
    for wave in range(20):
        hlcs += await asyncio.gather(
            *(
                s.put(f"k{i % 10}", b"v%d" % i)
                for i in range(wave * 16, wave * 16 + 16)
                for s in (a, b)
            )
        )
    assert len(set(hlcs)) == len(hlcs) == 640
    await assert_tree_matches_model(a)


async def test_a_writer_whose_clock_runs_an_hour_ahead_does_not_move_the_store_clock_ahead(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    # The store clock never goes back: one write stamped an hour ahead would stamp every later
    # write here an hour ahead too, whoever makes it, after that clock is put right.
    ahead = await open_store(redis_server.url, hlc=HLC(ManualClock(NOW_MS + 3_600_000)))
    honest = await open_store(redis_server.url)
    stamped = await ahead.put("k", b"from a clock an hour ahead")
    after = await honest.put("j", b"from a right clock")
    seconds, micros = await honest.redis.time()
    server_ms = int(seconds) * 1000 + int(micros) // 1000
    for hlc in (stamped, after):
        assert clock.physical_ms(hlc) <= server_ms + 1_000, (hlc, server_ms)
    assert stamped < after  # the store's own order still holds


async def test_more_concurrent_writers_than_pool_connections(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url)
    hlcs = await asyncio.gather(*(store.put(f"k{i}", b"v") for i in range(64)))
    assert len(set(hlcs)) == 64


async def _functions_or_skip(store: RedisStore) -> None:
    if not (await store.load_functions()).functions:
        pytest.skip("Redis 6.2 has no functions: its writes go through redis-py's pool")


async def test_writes_in_flight_are_bounded_by_the_pool_size(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    """Local writes share one pipelined connection; at most as many are in flight on it as the
    client's pool has connections, as the pool bounded them before (the rest wait their turn)."""
    store = await open_store(redis_server.url)
    await _functions_or_skip(store)
    await store.put("warm", b"up")  # connected: the puts below are sent as they are made
    redis_server.pause()  # nothing is answered: what is sent stays in flight
    try:
        # The puts take their first step together and await nothing before they send or
        # queue for a slot: once any is in flight, every one has sent or is queued.
        puts = [asyncio.create_task(store.put(f"k{i}", b"v")) for i in range(100)]
        await async_wait_until(lambda: store._api.in_flight > 0, timeout=10, message="sent")
        assert store._api.in_flight == 64
    finally:
        redis_server.resume()
    hlcs = await asyncio.gather(*puts)
    assert len(set(hlcs)) == 100 and store._api.in_flight == 0
    assert await store.get("k99") is not None


async def test_a_cancelled_put_does_not_fail_the_puts_made_alongside_it(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    """An embedding application cancels calls (a request timed out): the other writes sharing
    the connection must not fail with it."""
    store = await open_store(redis_server.url)
    await _functions_or_skip(store)
    await store.put("warm", b"up")
    redis_server.pause()
    try:
        given_up = asyncio.create_task(store.put("given-up", b"v"))
        alongside = asyncio.create_task(store.put("alongside", b"v"))
        await async_wait_until(lambda: store._api.in_flight == 2, timeout=10, message="both sent")
        given_up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await given_up
    finally:
        redis_server.resume()
    await alongside
    made = [await store.get(key) for key in ("alongside", "given-up")]
    # The second too: sent before it was given up, so Redis made it (a cancel undoes no write).
    assert [item.value if item else None for item in made] == [b"v", b"v"]


# ---------------------------------------------------------------------------- the tree


@pytest.mark.parametrize(
    "geometry",
    [Geometry(), Geometry(2, 3), Geometry(16, 3), Geometry(65536, 1), Geometry(8, 4)],
    ids=lambda g: f"{g.fanout}x{g.depth}",
)
async def test_lua_tree_equals_model(
    redis_server: RedisHandle, open_store: StoreFactory, geometry: Geometry
) -> None:
    store = await open_store(
        redis_server.url, prefix="tree:", fanout=geometry.fanout, depth=geometry.depth
    )
    rnd = random.Random(geometry.fanout * 10 + geometry.depth)
    keys = [f"k{i}" for i in range(60)] + ["a:b", "a.b", "a b", "ключ", "🎉"]
    for _ in range(400):
        key = rnd.choice(keys)
        if rnd.random() < 0.3:
            await store.delete(key)
        else:
            await store.put(key, rnd.randbytes(rnd.randrange(0, 200)))
    await assert_tree_matches_model(store)
    # Applied remote versions go through the other script; the tree must still agree.
    # Newer than every local write so far, yet within the store's allowed clock offset.
    ahead = clock.physical_ms(store.clock.last) - NOW_MS + 1_000
    statuses = await store.apply_batch(
        [put(rnd.choice(keys), b"remote %d" % i, ahead + i) for i in range(50)]
        + [tomb(rnd.choice(keys), ahead + 100 + i) for i in range(20)]
    )
    assert ApplyStatus.APPLIED in statuses
    await assert_tree_matches_model(store)


async def test_an_interior_node_of_many_children_is_a_hash_table_holding_the_same_digests(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    """Redis keeps a hash of up to 512 entries as a listpack, where each field read or written
    is a scan: a node of the default fanout's 256 children made the tree's upkeep a third of the
    apply. Past 64 children the scripts make the node a hash table; its content is unchanged."""
    store = await open_store(redis_server.url, prefix="dense:")  # the default 256 x 2
    geometry = store.geometry
    crowded: dict[str, str] = {}  # leaf path -> one key, all under level-1 node "00"
    sparse: dict[str, str] = {}  # the same, 10 leaves under node "01"
    for i in itertools.count():
        key = f"k{i}"
        path = geometry.leaf_path(key)
        if path.startswith("00") and len(crowded) < 70:
            crowded.setdefault(path, key)
        elif path.startswith("01") and len(sparse) < 10:
            sparse.setdefault(path, key)
        if len(crowded) == 70 and len(sparse) == 10:
            break
    keys = list(crowded.values()) + list(sparse.values())
    await store.put_many([(key, b"local", "application/octet-stream") for key in keys[:40]])
    ahead = clock.physical_ms(store.clock.last) - NOW_MS + 1_000
    await store.apply_batch([put(key, b"remote", ahead) for key in keys[40:]])  # the apply path
    node = f"{store.keys.part}mk:"
    assert await store.redis.object("encoding", node + "00") == b"hashtable"
    assert await store.redis.hlen(node + "00") == 70
    # A node of few children stays compact: the conversion only pays where scans are long.
    assert await store.redis.object("encoding", node + "01") in (b"listpack", b"ziplist")
    await assert_tree_matches_model(store)
    # Deletes go through the same flush, and leave nothing behind either.
    for key in keys[:20]:
        await store.delete(key)
    await assert_tree_matches_model(store)


async def test_empty_store_has_zero_root(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url)
    assert await store.merkle_root() == ZERO
    await store.put("k", b"v")
    assert await store.merkle_root() != ZERO


# ---------------------------------------------------------------------------- convergence


def _random_changes(seed: int) -> list[Change]:
    """Several versions per key from three origins, with HLC ties across origins.

    (key, hlc, origin) is unique: two different versions with the same clock and origin cannot
    come from a correct writer (the order settles those by tombstone and content hash, which
    ``test_versions_tied_on_hlc_and_origin_converge_in_any_order`` covers).
    """
    rnd = random.Random(seed)
    out: list[Change] = []
    seen: set[tuple[str, int, str]] = set()
    keys = [f"key:{i}" for i in range(25)] + ["x.y", "sp ace", "ümlaut"]
    while len(out) < 200:
        key = rnd.choice(keys)
        offset = rnd.randrange(0, 40)
        origin = rnd.choice(["node-a", "node-b", "node-c"])
        if (key, offset, origin) in seen:
            continue
        seen.add((key, offset, origin))
        if rnd.random() < 0.25:
            out.append(tomb(key, offset, origin))
        else:
            out.append(put(key, rnd.randbytes(rnd.choice([0, 10, 100])), offset, origin))
    return out


async def _apply_shuffled(store: RedisStore, changes: list[Change], seed: int) -> None:
    rnd = random.Random(seed)
    delivery = changes + rnd.sample(changes, len(changes) // 3)  # duplicates
    rnd.shuffle(delivery)
    while delivery:
        size = rnd.randrange(1, 40)
        batch, delivery = delivery[:size], delivery[size:]
        statuses = await store.apply_batch(batch)
        assert len(statuses) == len(batch)


def _expected_winners(changes: list[Change]) -> dict[str, Change]:
    winners: dict[str, Change] = {}
    for change in changes:
        best = winners.get(change.key)
        if best is None or change_order(change) > change_order(best):
            winners[change.key] = change
    return winners


async def _assert_converged(a: RedisStore, b: RedisStore, changes: list[Change]) -> None:
    assert await a.merkle_root() == await b.merkle_root()
    assert await items_of(a) == await items_of(b)
    state = await state_of(a)
    assert state == await state_of(b)
    winners = _expected_winners(changes)
    assert {k: (w.hlc, w.origin, w.tombstone) for k, w in winners.items()} == {
        k: (hlc, origin, tombstone) for k, (hlc, origin, tombstone, _, _) in state.items()
    }
    await assert_tree_matches_model(a)
    await assert_tree_matches_model(b)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_two_prefixes_converge_under_any_order_and_duplicates(
    redis_server: RedisHandle, open_store: StoreFactory, seed: int
) -> None:
    changes = _random_changes(seed)
    a = await open_store(redis_server.url, prefix="a:", node_id="node-x")
    b = await open_store(redis_server.url, prefix="b:", node_id="node-y")
    await _apply_shuffled(a, changes, seed * 100 + 1)
    await _apply_shuffled(b, changes, seed * 100 + 2)
    await _assert_converged(a, b, changes)


async def test_two_servers_converge_under_any_order_and_duplicates(
    redis_factory: RedisFactory, open_store: StoreFactory
) -> None:
    changes = _random_changes(42)
    a = await open_store(redis_factory().url, node_id="node-x")
    b = await open_store(redis_factory().url, node_id="node-y")
    await _apply_shuffled(a, changes, 1)
    await _apply_shuffled(b, changes, 2)
    await _assert_converged(a, b, changes)


async def test_an_apply_after_the_script_cache_was_flushed_loads_the_script_again(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    """A Redis restarted without persistence, or ``SCRIPT FLUSH``, forgets the apply script:
    the next apply loads it again and applies, instead of refusing the batch."""
    store = await open_store(redis_server.url)
    assert await store.apply_batch([put("k1", b"v1", 10)]) == [ApplyStatus.APPLIED]
    direct = redis_server.client()
    try:
        direct.script_flush()
        assert await store.apply_batch([put("k2", b"v2", 20)]) == [ApplyStatus.APPLIED]
        item = await store.get("k2")
        assert item is not None and item.value == b"v2"
        stats = direct.info("commandstats")
        loads = stats.get("cmdstat_script|load") or stats.get("cmdstat_script") or {}
        assert loads.get("calls", 0) >= 1  # 6.2 counts SCRIPT's subcommands together
    finally:
        direct.close()


# ---------------------------------------------------------------------------- last writer wins


@pytest.mark.parametrize("order", ["put-first", "tomb-first"])
async def test_tombstone_beats_older_put_and_loses_to_newer(
    redis_server: RedisHandle, open_store: StoreFactory, order: str
) -> None:
    store = await open_store(redis_server.url)
    older_put, tombstone, newer_put = put("k", b"old", 10), tomb("k", 20), put("k", b"new", 30)
    first, second = (older_put, tombstone) if order == "put-first" else (tombstone, older_put)
    await store.apply_batch([first])
    await store.apply_batch([second])
    assert await store.get("k") is None
    assert (await store.get_version("k")).tombstone  # type: ignore[union-attr]

    first, second = (tombstone, newer_put) if order == "put-first" else (newer_put, tombstone)
    await store.apply_batch([first])
    await store.apply_batch([second])
    item = await store.get("k")
    assert item is not None and item.value == b"new"


@pytest.mark.parametrize("order", [0, 1])
async def test_equal_hlc_is_won_by_the_greater_origin(
    redis_server: RedisHandle, open_store: StoreFactory, order: int
) -> None:
    store = await open_store(redis_server.url)
    low, high = put("k", b"from a", 5, origin="node-a"), put("k", b"from b", 5, origin="node-b")
    assert low.hlc == high.hlc
    batch = [low, high] if order == 0 else [high, low]
    statuses = await store.apply_batch(batch)
    assert statuses == (
        [ApplyStatus.APPLIED, ApplyStatus.APPLIED]
        if order == 0
        else [ApplyStatus.APPLIED, ApplyStatus.STALE]
    )
    item = await store.get("k")
    assert item is not None and item.origin == "node-b" and item.value == b"from b"


async def test_apply_statuses(redis_server: RedisHandle, open_store: StoreFactory) -> None:
    store = await open_store(redis_server.url)
    current = put("k", b"v2", 20)
    assert await store.apply_batch([current]) == [ApplyStatus.APPLIED]
    # The same version again is a duplicate delivery.
    assert await store.apply_batch([current]) == [ApplyStatus.SKIPPED]
    # An older version of the same content is also just a duplicate...
    assert await store.apply_batch([put("k", b"v2", 10)]) == [ApplyStatus.SKIPPED]
    # ...while older different content, or an older tombstone, is stale.
    assert await store.apply_batch([put("k", b"v1", 10), tomb("k", 15)]) == [
        ApplyStatus.STALE,
        ApplyStatus.STALE,
    ]
    # A version at or below this store's claim about its origin is known here: held, superseded,
    # or deleted and collected. It is never applied, so a replay cannot bring a dead value back.
    await claim(store, {"node-b": clock.pack(NOW_MS + 30, 0)})
    ancient = put("gone", b"deleted and collected long ago", 25)
    assert await store.apply_batch([ancient]) == [ApplyStatus.KNOWN]
    assert await store.get_version("gone") is None
    fresh = put("new", b"after the claim", 31)
    assert await store.apply_batch([fresh]) == [ApplyStatus.APPLIED]
    assert await store.apply_batch([]) == []
    item = await store.get("k")
    assert item is not None and item.value == b"v2" and item.hlc == current.hlc


async def test_apply_emits_cdc_entry_only_when_applied(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url, node_id="relay")
    change = Change.put(
        "k",
        b"payload",
        hlc=clock.pack(NOW_MS + 50, 3),
        origin="node-origin",
        content_type="json",
        version=7,
        trace_parent=TRACE_PARENT,
    )
    assert await store.apply_batch([change]) == [ApplyStatus.APPLIED]
    entries = await cdc_entries(store)
    assert len(entries) == 1
    sid, fields = entries[0]
    decoded = decode_entry(sid, fields, default_origin="relay")
    assert decoded.origin == "node-origin"
    assert decoded.hlc == change.hlc
    assert (decoded.version, decoded.updated_at) == (7, change.updated_at)
    assert decoded.trace_parent == TRACE_PARENT

    await claim(store, {"node-b": clock.pack(2_000, 0)})
    await store.apply_batch(
        [
            change,
            put("k", b"older", 1),
            Change.delete("gone", hlc=clock.pack(1_000, 0), origin="node-b"),  # known here
        ]
    )
    assert len(await cdc_entries(store)) == 1


async def test_apply_without_relay_writes_no_cdc_entry_and_the_same_tree(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    relaying = await open_store(redis_server.url, prefix="on:")
    quiet = await open_store(redis_server.url, prefix="off:")
    batch = [put(f"k{i}", b"v%d" % i, i + 1) for i in range(20)]
    assert await relaying.apply_batch(batch) == [ApplyStatus.APPLIED] * 20
    assert await quiet.apply_batch(batch, relay=False) == [ApplyStatus.APPLIED] * 20
    assert len(await cdc_entries(relaying)) == 20
    assert await cdc_entries(quiet) == []
    assert await quiet.merkle_root() == await relaying.merkle_root()
    assert (await quiet.get("k3")).value == b"v3"  # type: ignore[union-attr]


async def test_a_batch_sent_out_of_its_turn_is_applied_only_after_the_one_before_it(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    """A tailer sends a batch while the one before it may still be applying (mode ``n``).
    Until the store's anchor shows that one applied, the batch is answered out of turn and
    nothing of it is written: no item, no leaf, no anchor. Once it is, the batch applies as a
    contiguous one and the anchor stays set."""
    store = await open_store(redis_server.url)
    await store.open_record(mode="mesh", relay=False)
    first, second = (
        StreamBatch("b", "tok", sid(0), sid(1), "f"),
        StreamBatch("b", "tok", sid(1), sid(2), "n"),
    )
    later = store.prepare_apply([put("late", b"v", 2)], relay=False)
    root = await store.merkle_root()
    result = await store.apply_prepared(later, second)
    assert result.out_of_turn and result.statuses == [ApplyStatus.REJECTED]
    assert await store.get("late") is None and await store.merkle_root() == root
    record = await store.record()
    assert record is not None and "b" not in record.anchors
    applied = await store.apply_prepared(store.prepare_apply([put("early", b"v", 1)]), first)
    assert applied.anchored and not applied.out_of_turn
    other_token = dataclasses.replace(second, token="another")
    assert (await store.apply_prepared(later, other_token)).out_of_turn
    result = await store.apply_prepared(later, second)
    assert not result.out_of_turn and result.anchored
    assert result.statuses == [ApplyStatus.APPLIED]
    record = await store.record()
    assert record is not None and record.anchors["b"].anchored
    assert record.anchors["b"].position == sid(2)


def sid(ms: int) -> str:
    """A fixed-width stream id, as a tailer's batch gives it."""
    return f"{ms:020d}-{0:020d}"


async def test_stream_is_capped(redis_server: RedisHandle, open_store: StoreFactory) -> None:
    maxlen = 50
    store = await open_store(redis_server.url, stream_maxlen=maxlen)
    for i in range(1_000):
        await store.put(f"k{i % 30}", b"v")
    # MAXLEN ~ trims whole stream nodes, so up to one node's worth may remain above the cap.
    node_entries = int(
        (await store.redis.config_get("stream-node-max-entries"))["stream-node-max-entries"]
    )
    length = await store.redis.xlen(store.keys.cdc)
    assert maxlen <= length <= maxlen + node_entries


# ---------------------------------------------------------------------------- opening a store


async def test_reopen_with_other_geometry_names_both(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    await open_store(redis_server.url, prefix="g:", fanout=16, depth=3)
    with pytest.raises(GeometryError) as info:
        await RedisStore.connect(redis_server.url, node_id="node-a", prefix="g:")
    message = str(info.value)
    assert Geometry(16, 3).describe() in message
    assert Geometry(256, 2).describe() in message
    # The same geometry opens fine, and other prefixes are independent.
    await open_store(redis_server.url, prefix="g:", fanout=16, depth=3)
    await open_store(redis_server.url, prefix="h:")


async def test_a_store_opened_without_limits_keeps_the_ones_its_engine_set(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    # The engine opens the store with the operator's local.stream_maxlen; an application then
    # opens it as the README shows, without one. The functions trim the stream by the meta's
    # maxlen, so the application must not put the default back.
    engine_side = await open_store(redis_server.url, prefix="m:", stream_maxlen=500_000)
    app = await open_store(redis_server.url, prefix="m:")
    meta = engine_side.keys.part_meta
    assert redis_server.client().hmget(meta, "maxlen", "max_payload") == [
        b"500000",
        str(codec.DEFAULT_MAX_PAYLOAD).encode(),
    ]
    assert (app.stream_maxlen, app.max_payload) == (500_000, codec.DEFAULT_MAX_PAYLOAD)
    # One given explicitly is still the one written: the engine's, changed between starts.
    await open_store(redis_server.url, prefix="m:", stream_maxlen=2_000)
    assert redis_server.client().hget(meta, "maxlen") == b"2000"


async def test_hlc_survives_reconnect(redis_server: RedisHandle, open_store: StoreFactory) -> None:
    first = await open_store(redis_server.url)
    last = 0
    for i in range(5):
        last = await first.put(f"k{i}", b"v")
    await first.close()
    stuck = await open_store(redis_server.url, hlc=HLC(ManualClock(1_000)))
    assert await stuck.put("k0", b"later") > last
    assert await stuck.delete("k1") > last


async def test_script_clock_rolls_the_counter_into_ms(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    """The Lua clock alone (a writer whose Python clock never loaded it) still moves forward."""
    seeded = await open_store(redis_server.url)
    remote = clock.pack(NOW_MS + 60_000, clock.MAX_COUNTER)
    await seeded.apply_batch([Change.put("r", b"v", hlc=remote, origin="node-b")])
    # Built without connect(): its HLC has not observed the stored clock.
    blind = RedisStore(make_client(redis_server.url), node_id="node-c", hlc=HLC(ManualClock(1_000)))
    try:
        assert await blind.put("k", b"v") == clock.pack(NOW_MS + 60_001, 0)
        assert await blind.put("k", b"w") == clock.pack(NOW_MS + 60_001, 1)
    finally:
        await blind.close()  # its own connections, and the client's


async def test_local_writes_order_after_applied_future_clock(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(
        redis_server.url, hlc=HLC(ManualClock(NOW_MS)), max_clock_offset_sec=7200
    )
    future = clock.pack(NOW_MS + 3_600_000, 9)
    await store.apply_batch([Change.put("k", b"from the future", hlc=future, origin="node-z")])
    assert await store.put("k", b"mine") > future
    item = await store.get("k")
    assert item is not None and item.value == b"mine"


async def test_follower_refuses_local_writes(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    follower = await open_store(redis_server.url, read_only=True)
    with pytest.raises(ReadOnlyStoreError):
        await follower.put("k", b"v")
    with pytest.raises(ReadOnlyStoreError):
        await follower.delete("k")
    assert await follower.redis.exists(follower.keys.item("k")) == 0
    # It still takes replicated versions.
    assert await follower.apply_batch([put("k", b"v", 1)]) == [ApplyStatus.APPLIED]


# ---------------------------------------------------------------------------- awkward keys


AWKWARD_KEYS = [
    "a",
    "ab",
    "a:b",
    "a:",
    "a.b",
    "a b",
    " lead",
    "trail ",
    "ключ",
    "🎉:x",
    "a*",
    "[x]",
    "item:nested",
    "mk:root",
    "a\\b",
    "?",
]


@pytest.mark.parametrize("prefix", ["", "app:", "a*[x]:", "пре фикс."])
async def test_awkward_keys_and_prefixes(
    redis_server: RedisHandle, open_store: StoreFactory, prefix: str
) -> None:
    store = await open_store(redis_server.url, prefix=prefix)
    for key in AWKWARD_KEYS:
        await store.put(key, key.encode())
    await store.delete("ab")
    for key in AWKWARD_KEYS:
        item = await store.get(key)
        if key == "ab":
            assert item is None
        else:
            assert item is not None and item.value == key.encode(), key
    assert set((await items_of(store)).keys()) == set(AWKWARD_KEYS) - {"ab"}
    assert set((await state_of(store)).keys()) == set(AWKWARD_KEYS)
    await assert_tree_matches_model(store)


async def test_glob_characters_in_prefix_do_not_leak_other_stores(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    globby = await open_store(redis_server.url, prefix="a*[x]:")
    # Matches the *unescaped* pattern 'a*[x]:{0}item:*': 'a' + anything + 'x' + ':'.
    neighbour = await open_store(redis_server.url, prefix="aQQx:")
    await globby.put("mine", b"1")
    await neighbour.put("theirs", b"2")
    unescaped = [k async for k in globby.redis.scan_iter(match="a*[x]:{0}item:*")]
    assert b"aQQx:{0}item:theirs" in unescaped  # the trap is real
    assert set((await items_of(globby)).keys()) == {"mine"}
    assert set((await items_of(neighbour)).keys()) == {"theirs"}


# ---------------------------------------------------------------------------- upkeep


async def test_collect_tombstones_takes_exactly_those_at_or_below_the_stable_frontier(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url)
    for i in range(20):
        await store.put(f"k{i}", b"v")
    deleted = {f"k{i}" for i in range(0, 20, 2)}
    for key in sorted(deleted):
        await store.delete(key)
    await store.delete("k0")  # deleted twice: still one tombstone
    await store.put("k2", b"revived")  # a put after the delete is not a tombstone any more
    deleted.discard("k2")
    stable = max([(await store.get_version(k)).hlc for k in deleted])  # type: ignore[union-attr]
    await store.delete("later")  # after the stable frontier: every member may not hold it

    assert await collect(store, stable) == len(deleted)

    for key in deleted:
        assert await store.get_version(key) is None
    later = await store.get_version("later")
    assert later is not None and later.tombstone
    assert await store.redis.zcard(store.keys.tombs) == 1
    assert set((await items_of(store)).keys()) == {f"k{i}" for i in range(20)} - deleted
    await assert_tree_matches_model(store)
    assert await collect(store, stable) == 0
    record = await store.record()
    assert record is not None and record.collected == stable  # the collected horizon


async def test_collect_tombstones_is_bounded_per_call(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url)
    for i in range(12):
        await store.delete(f"k{i}")
    stable = store.clock.last
    assert await collect(store, stable, limit=5) == 5
    assert await collect(store, stable, limit=5) == 5
    assert await collect(store, stable, limit=5) == 2
    await assert_tree_matches_model(store)


async def test_collection_does_nothing_when_the_store_went_back_since_the_frontier_was_read(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url)
    await store.open_record(mode="mesh", relay=False)
    await store.delete("k")
    record = await store.record()
    assert record is not None
    # The record is replaced (a restore, a wipe and re-creation): another incarnation.
    await store.redis.delete(store.keys.record)
    await store.open_record(mode="mesh", relay=False)

    done = await store.collect_tombstones(
        store.clock.last, incarnation=record.incarnation, cert=record.cert
    )

    assert done == -1
    assert (await store.get_version("k")) is not None


async def test_a_written_off_version_is_replaced_outright_whatever_the_claims_say(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    """The cold path's rule for a version a peer's claims cover while it holds an older one
    (docs/DELETES.md, "Written off"): the older version replaces exactly the one named."""
    store = await open_store(redis_server.url)
    older = Change.put("k", b"older", hlc=clock.pack(NOW_MS, 0), origin="node-b")
    newer = Change.put("k", b"newer", hlc=clock.pack(NOW_MS + 5, 0), origin="node-c")
    assert await store.apply_batch([older, newer], relay=False) == [
        ApplyStatus.APPLIED,
        ApplyStatus.APPLIED,
    ]
    await claim(store, {"node-b": older.hlc, "node-c": newer.hlc})
    assert await store.apply_batch([older], relay=False) == [ApplyStatus.KNOWN]

    wrong = store.prepare_apply([older], relay=False, replaces={0: (newer.hlc, "node-x")})
    assert (await store.apply_prepared(wrong)).statuses == [ApplyStatus.KNOWN]
    prepared = store.prepare_apply([older], relay=False, replaces={0: (newer.hlc, "node-c")})
    assert (await store.apply_prepared(prepared)).statuses == [ApplyStatus.APPLIED]

    held = await store.get("k")
    assert held is not None and (held.value, held.hlc) == (b"older", older.hlc)
    await assert_tree_matches_model(store)


async def test_claiming_a_forgotten_node_s_writes_needs_an_unmoved_record(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url)
    await store.open_record(mode="mesh", relay=False)
    before = await store.record()
    assert before is not None
    await store.redis.delete(store.keys.record)  # a wipe: another incarnation
    await store.open_record(mode="mesh", relay=False)
    assert not await store.claim_all_writes(
        ["node-z"], incarnation=before.incarnation, cert=before.cert
    )
    now = await store.record()
    assert now is not None and now.claim("node-z") == 0

    assert await store.claim_all_writes(["node-z"], incarnation=now.incarnation, cert=now.cert)
    now = await store.record()
    assert now is not None and now.claim("node-z") == ALL_WRITES
    late = Change.put("k", b"a write of z's", hlc=clock.pack(NOW_MS, 0), origin="node-z")
    assert await store.apply_batch([late], relay=False) == [ApplyStatus.KNOWN]


async def test_should_accept_writes_turns_false_under_memory_pressure(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url, max_memory_ratio=0.9)
    admin = store.redis
    assert await store.should_accept_writes()
    used = int((await admin.info("memory"))["used_memory"])
    limit = used + 4 * (1 << 20)
    await admin.config_set("maxmemory", limit)
    try:
        chunk = b"x" * (64 * 1024)
        for i in range(200):
            if int((await admin.info("memory"))["used_memory"]) >= limit * 0.95:
                break
            try:
                await admin.set(f"fill:{i}", chunk)
            except redis.exceptions.ResponseError:  # OOM: full enough
                break
        # The answer is cached for a second; wait for the next real check, with a deadline.
        await async_wait_until(
            lambda: _is_refusing(store), timeout=5, message="store refuses writes when full"
        )
        await admin.delete(*[f"fill:{i}" for i in range(200)])
        await async_wait_until(
            store.should_accept_writes, timeout=5, message="store accepts writes when freed"
        )
    finally:
        await admin.config_set("maxmemory", 0)


async def _is_refusing(store: RedisStore) -> bool:
    return not await store.should_accept_writes()


# ---------------------------------------------------------------------------- CDC format


def _same_entry(written: dict[bytes, bytes], expected: dict[str, bytes]) -> None:
    got = {k.decode(): v for k, v in written.items()}
    assert set(got) == set(expected)
    for name in ("op", "key", "hash", "data"):
        assert got.get(name) == expected.get(name), name
    assert json.loads(got["meta"]) == json.loads(expected["meta"])


async def test_script_cdc_entries_match_codec(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url, prefix="cdc:", node_id="node-a")
    expected: list[Change] = []

    async def record(key: str) -> None:
        version = await store.get_version(key)
        assert version is not None
        expected.append(version)

    await store.put("small", b"tiny", content_type="text")
    await record("small")
    await store.put("big", b"compress me " * 100, content_type="json")
    await record("big")
    await store.put("magic", b"\x28\xb5\x2f\xfd raw")
    await record("magic")
    span = NonRecordingSpan(
        SpanContext(
            trace_id=TRACE_ID,
            span_id=SPAN_ID,
            is_remote=False,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
    )
    with trace.use_span(span):
        await store.put("traced", b"with trace")
    await record("traced")
    assert expected[-1].trace_parent == TRACE_PARENT
    await store.delete("small")
    await record("small")
    remote = [
        Change.put(
            "remote",
            b"from b " * 20,
            hlc=clock.pack(NOW_MS + 10, 2),
            origin="node-b",
            content_type="json",
            version=4,
            trace_parent=TRACE_PARENT,
        ),
        Change.delete("remote-del", hlc=clock.pack(NOW_MS + 11, 0), origin="node-c", version=2),
    ]
    assert await store.apply_batch(remote) == [ApplyStatus.APPLIED] * 2
    expected += remote

    entries = await cdc_entries(store)
    assert len(entries) == len(expected)
    for (sid, fields), change in zip(entries, expected, strict=True):
        _same_entry(fields, encode_entry(change))
        decoded = decode_entry(sid, fields, default_origin="wrong")
        assert decoded.key == change.key
        assert decoded.hlc == change.hlc
        assert decoded.origin == change.origin
        assert decoded.tombstone == change.tombstone
        assert decoded.content_hash == change.content_hash
        assert decoded.data == change.data
        assert decoded.version == change.version
        assert decoded.updated_at == change.updated_at
        assert decoded.trace_parent == change.trace_parent


async def test_relayed_entry_with_large_updated_at_decodes(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url)
    # A legacy writer stamping microseconds, accepted by decode_entry as a valid integer.
    change = Change.put(
        "k", b"v", hlc=clock.pack(NOW_MS, 0), origin="node-b", updated_at=NOW_MS * 1000, version=3
    )
    assert await store.apply_batch([change]) == [ApplyStatus.APPLIED]
    ((sid, fields),) = await cdc_entries(store)
    decoded = decode_entry(sid, fields, default_origin="node-b")
    assert decoded.updated_at == change.updated_at


# ---------------------------------------------------------------------------- skewed clocks


async def test_far_future_remote_clock_does_not_brick_local_writes(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url)
    bogus = Change.put("x", b"v", hlc=clock.MAX_HLC - 1, origin="broken-peer")
    await store.apply_batch([bogus])
    for i in range(5):
        await store.put(f"k{i}", b"still writable")


async def test_a_skewed_peer_clock_cannot_make_tombstones_collectable(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    year_ms = 365 * 86_400_000
    store = await open_store(redis_server.url, max_clock_offset_sec=2 * year_ms / 1000)
    await store.delete("fresh")
    skewed = Change.put("y", b"v", hlc=clock.pack(NOW_MS + year_ms, 0), origin="skewed-peer")
    assert await store.apply_batch([skewed]) == [ApplyStatus.APPLIED]
    # Only knowledge makes a tombstone collectable: a frontier below it collects nothing,
    # however far the store clock was dragged.
    fresh = await store.get_version("fresh")
    assert fresh is not None
    assert await collect(store, fresh.hlc - 1) == 0
    version = await store.get_version("fresh")
    assert version is not None and version.tombstone


async def test_version_stamped_beyond_the_clock_offset_is_rejected(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url, max_clock_offset_sec=60)
    ahead = Change.put(
        "k", b"from a broken clock", hlc=clock.pack(NOW_MS + 3_600_000, 0), origin="broken-peer"
    )
    fine = Change.put("j", b"ok", hlc=clock.pack(NOW_MS, 0), origin="good-peer")
    assert await store.apply_batch([ahead, fine]) == [ApplyStatus.REJECTED, ApplyStatus.APPLIED]
    assert await store.get("k") is None
    assert clock.physical_ms(await store.put("mine", b"v")) < NOW_MS + 3_600_000


# ---------------------------------------------------------------------------- nothing can wedge


async def test_an_item_whose_key_or_leaf_holds_the_wrong_type_is_refused_alone(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url, prefix="w:")
    # Made by hand under the prefix: an item key and a leaf bucket of the wrong type.
    await store.redis.set(store.keys.item("bad-item"), b"somestring")
    bad_leaf = store.geometry.leaf_path("bad-leaf")
    await store.redis.set(store.keys.node(bad_leaf), b"not a hash")
    batch = [
        put("before", b"1", 10),
        put("bad-item", b"2", 10),
        put("middle", b"3", 10),
        put("bad-leaf", b"4", 10),
        put("after", b"5", 10),
    ]

    result = await store.apply_prepared(store.prepare_apply(batch))

    assert result.statuses == [
        ApplyStatus.APPLIED,
        ApplyStatus.REFUSED,
        ApplyStatus.APPLIED,
        ApplyStatus.REFUSED,
        ApplyStatus.APPLIED,
    ]
    assert "WRONGTYPE" in result.refused[1]
    assert store.keys.node(bad_leaf) in result.refused[3] and "WRONGTYPE" in result.refused[3]
    assert set((await items_of(store)).keys()) == {"before", "middle", "after"}
    assert len(await cdc_entries(store)) == 3
    # Nothing of a refused item was written: the tree equals one rebuilt from its leaves.
    await store.redis.delete(store.keys.item("bad-item"), store.keys.node(bad_leaf))
    await assert_tree_matches_model(store)


async def test_a_local_write_over_a_wrong_typed_key_fails_naming_the_key_and_writes_nothing(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url, prefix="w:")
    await store.put("fine", b"v")
    await store.redis.set(store.keys.item("x"), b"somestring")
    root = await store.merkle_root()

    with pytest.raises(StoreKeyError, match="WRONGTYPE") as refused:
        await store.put("x", b"v")

    assert refused.value.key == store.keys.item("x")
    assert await store.merkle_root() == root and len(await cdc_entries(store)) == 1
    await assert_tree_matches_model(store)


async def test_a_store_wide_key_of_the_wrong_type_fails_the_whole_call_before_any_write(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url, prefix="w:")
    await store.redis.hset(store.keys.cdc, "not", "a stream")

    with pytest.raises(StoreKeyError, match=r"store key w:\{0\}cdc") as refused:
        await store.apply_batch([put("k", b"v", 10)])

    assert refused.value.key == store.keys.cdc
    assert await store.get_version("k") is None
    assert await store.merkle_root() == ZERO


async def test_a_batch_is_cut_into_calls_of_bounded_bytes(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    # Redis refuses any single argument over proto-max-bulk-len (512 MB by default, 1 MB here):
    # a batch of values each well under it but together over it must still apply.
    client = make_client(redis_server.url)
    await client.config_set("proto-max-bulk-len", str(1024 * 1024))
    await client.aclose()
    store = await open_store(redis_server.url, max_batch_bytes=256 * 1024)
    values = [random.Random(i).randbytes(150_000) for i in range(12)]
    batch = [put(f"big:{i}", value, 10) for i, value in enumerate(values)]

    prepared = store.prepare_apply(batch)

    assert len(prepared.chunks) >= 6
    assert all(len(packed) <= 1024 * 1024 for _s, _e, packed in prepared.chunks)
    result = await store.apply_prepared(prepared)
    assert result.statuses == [ApplyStatus.APPLIED] * 12
    for i, value in enumerate(values):
        item = await store.get(f"big:{i}")
        assert item is not None and item.value == value
    await assert_tree_matches_model(store)


@pytest.mark.parametrize(
    ("key", "value", "content_type", "expected"),
    [
        ("big", b"x" * 2049, "binary", "over the payload limit"),
        ("k" * 4097, b"v", "binary", "limit 4096"),
        ("", b"v", "binary", "key is empty"),
        ("k", b"v", "t" * 257, "content_type"),
        # 129 characters, 258 bytes: the function counts bytes.
        ("k", b"v", "\u00e9" * 129, "at most 256 bytes"),
        ("k", b"v", "a\udcff", "content_type is text that UTF-8 cannot encode"),
        ("k", "a\udcff", "binary", "value is text that UTF-8 cannot encode"),
        ("k", 42, "binary", "value must be bytes or text, not int"),
    ],
)
async def test_a_local_write_no_peer_would_accept_is_refused_and_nothing_is_written(
    redis_server: RedisHandle,
    open_store: StoreFactory,
    key: str,
    value: Any,
    content_type: str,
    expected: str,
) -> None:
    store = await open_store(redis_server.url, max_payload=2048)

    with pytest.raises(InvalidWriteError, match=expected):
        await store.put(key, value, content_type)
    with pytest.raises(InvalidWriteError, match=expected):
        await store.put_many([("ok", b"fine", "binary"), (key, value, content_type)])

    assert await store.merkle_root() == ZERO
    assert await cdc_entries(store) == []


async def test_bytes_like_values_are_written_and_a_refused_put_leaves_others_their_replies(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url)
    await store.put("ba", bytearray(b"from a bytearray"))
    await store.put("mv", memoryview(b"from a memoryview"))
    with pytest.raises(InvalidWriteError):
        await store.put("k", b"v", content_type="a\udcff")
    # Concurrent puts on the shared connection after the refusal: each its own HLC and value.
    keys = [f"p{i}" for i in range(5)]
    hlcs = await asyncio.gather(*(store.put(k, k.encode()) for k in keys))
    for key, hlc in zip(keys, hlcs, strict=True):
        version = await store.get_version(key)
        assert version is not None and version.hlc == hlc, key
    got = {k: await store.get(k) for k in ("ba", "mv")}
    assert {k: item.value for k, item in got.items() if item} == {
        "ba": b"from a bytearray",
        "mv": b"from a memoryview",
    }


async def test_a_peer_version_near_the_top_of_the_range_cannot_overflow_local_versions(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url)
    top = 2**53 - 1
    huge = Change.put("k", b"v", hlc=clock.pack(NOW_MS, 0), origin="peer", version=top)
    assert await store.apply_batch([huge]) == [ApplyStatus.APPLIED]

    await store.put("k", b"mine")

    version = await store.get_version("k")
    assert version is not None and version.version == top  # held at the top, never negative
    # A peer's entry beyond it is refused on decode (and so quarantined by a tailer).
    fields = encode_entry(Change.put("j", b"v", hlc=clock.pack(NOW_MS, 0), origin="p"))
    fields["meta"] = fields["meta"].replace(b'"version":1', b'"version":9223372036854775807')
    with pytest.raises(CodecError, match=r"meta\.version"):
        decode_entry("1-0", fields, default_origin="p")


async def test_a_write_with_the_clock_at_the_end_of_its_range_fails_cleanly(
    redis_server: RedisHandle, open_store: StoreFactory
) -> None:
    store = await open_store(redis_server.url)
    await store.put("k", b"v")
    await store.redis.set(store.keys.hlc, b"ffffffffffffffff")
    root = await store.merkle_root()

    with pytest.raises(StoreKeyError, match="HLC exhausted"):
        await store.put("j", b"v")

    assert await store.redis.get(store.keys.hlc) == b"ffffffffffffffff"
    assert await store.merkle_root() == root
    assert await store.get_version("j") is None


@pytest.mark.parametrize("tombstone_second", [False, True])
async def test_versions_tied_on_hlc_and_origin_converge_in_any_order(
    redis_server: RedisHandle, open_store: StoreFactory, tombstone_second: bool
) -> None:
    hlc = clock.pack(NOW_MS, 7)
    first = Change.put("k", b"one content", hlc=hlc, origin="twin")
    second = (
        Change.delete("k", hlc=hlc, origin="twin")
        if tombstone_second
        else Change.put("k", b"another content", hlc=hlc, origin="twin")
    )
    forward = await open_store(redis_server.url, prefix="f:")
    backward = await open_store(redis_server.url, prefix="b:")

    await forward.apply_batch([first])
    await forward.apply_batch([second])
    await backward.apply_batch([second])
    await backward.apply_batch([first])

    assert await forward.merkle_root() == await backward.merkle_root()
    held = await forward.get_version("k")
    assert held is not None
    winner = max((first, second), key=change_order)
    assert (held.tombstone, held.content_hash) == (winner.tombstone, winner.content_hash)
    if tombstone_second:
        assert held.tombstone, "at equal (hlc, origin) a tombstone wins"


async def test_the_write_api_raises_the_packages_retryable_error_when_redis_is_down(
    redis_factory: RedisFactory, open_store: StoreFactory
) -> None:
    """An embedder catches ``ReplicationError`` and asks ``retryable``; redis-py's error is the
    cause, and code that caught ``ConnectionError`` still does."""
    server = redis_factory()
    store = await open_store(server.url)
    await store.put("k", b"before")
    server.kill()
    writes: list[Callable[[], Awaitable[Any]]] = [
        lambda: store.put("k", b"v"),
        lambda: store.delete("k"),
        lambda: store.put_many([("k", b"v", "binary")]),
    ]
    for write in writes:
        with pytest.raises(ReplicationError) as caught:
            await write()
        assert isinstance(caught.value, StoreUnavailableError), caught.value
        assert caught.value.retryable
        assert isinstance(caught.value, ConnectionError)
        assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
        assert "nothing was acknowledged" in str(caught.value)
    server.restart()
    await async_wait_until(
        lambda: store.put("k", b"after"),
        timeout=10,
        ignore=(StoreUnavailableError,),
        message="a write once Redis is back",
    )
    item = await store.get("k")
    assert item is not None and item.value == b"after"


async def test_a_write_can_wait_for_the_redis_replicas(redis_factory: RedisFactory) -> None:
    """``replicas=N`` returns once N replicas of the store's Redis have the write (``WAIT`` on
    the connection that made it), and says so when they do not: the write stays made."""
    master = redis_factory()
    replica = redis_factory(extra_args=["--replicaof", master.host, str(master.port)])

    def synced() -> bool:
        with replica.client() as client:
            return bool(client.info("replication").get("master_link_status") == "up")

    await async_wait_until(synced, timeout=30, message="replica synced")
    store = await RedisStore.connect(master.url, node_id="a", prefix="app:")
    try:
        await store.put("k", b"v", replicas=1)
        with replica.client() as client:
            assert client.hget(store.keys.item("k"), "h") is not None
        await store.delete("k", replicas=1)
        assert len(await store.put_many([("a", b"1", "t"), ("b", b"2", "t")], replicas=1)) == 2
        with pytest.raises(NotReplicatedError) as caught:
            await store.put("k", b"v", replicas=2, replica_timeout_sec=0.2)
        assert caught.value.replicas == 1
        replica.pause()
        try:
            with pytest.raises(NotReplicatedError) as paused:
                await store.delete("a", replicas=1, replica_timeout_sec=0.2)
        finally:
            replica.resume()
        assert paused.value.replicas == 0
        assert (await store.get_version("a")).tombstone  # type: ignore[union-attr]
        with pytest.raises(InvalidWriteError):
            await store.put("k", b"v", replicas=-1)
    finally:
        await store.close()
