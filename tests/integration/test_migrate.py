"""``replication-engine migrate``: a format-1 store converted in place, against real Redis.

The format-1 stores here are live format-2 stores turned back by ``harness.format1`` (keys
without the partition's tag, an xxh3 tree, the old ``meta``), so they carry real claims,
anchors and stream history, as a node upgraded in the field does.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from harness.format1 import to_format1
from harness.mesh import WriteLog, expected_snapshot, full_mesh, open_mesh, snapshot
from replication_engine.merkle import FormatError, Geometry
from replication_engine.migrate import Migration, MigrationError, Outcome
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisFactory, RedisHandle
from replication_engine.tools import migrate

PREFIX = "app:"
_OPENED: list[RedisStore] = []


@pytest.fixture(autouse=True)
async def _close_stores() -> AsyncIterator[None]:
    yield
    while _OPENED:
        await _OPENED.pop().close()


async def _open(url: str, **options: Any) -> RedisStore:
    store = await RedisStore.connect(url, node_id="a", prefix=PREFIX, fanout=16, **options)
    _OPENED.append(store)
    return store


async def _populated(url: str) -> RedisStore:
    store = await _open(url)
    await store.put_many([(f"k{i}", f"value {i}".encode(), "text/plain") for i in range(300)])
    for i in range(0, 300, 7):
        await store.delete(f"k{i}")
    await store.open_record(mode="mesh", relay=False)
    return store


async def _state(store: RedisStore) -> tuple[Any, ...]:
    items = {v.key: v for v in [v async for v in store.versions()]}
    entries = await store.redis.xrange(store.keys.cdc)
    record = await store.redis.hgetall(store.keys.record)
    return await store.merkle_root(), items, entries, record


async def _placed_by_key(store: RedisStore) -> bool:
    """Every item sits in the leaf its key's SHA-1 names, and every tree node is the XOR of its
    children."""
    geometry = store.geometry
    async for version in store.versions():
        leaf = await store.redis.hget(store.keys.node(geometry.leaf_path(version.key)), version.key)
        if leaf is None:
            return False
    wrong = 0
    for parent in store.leaf_parents():
        wrong += await store.scrub(parent, fix=False)
    return wrong == 0


class _Interrupted(Exception):
    pass


class _StopsBeforeTheTree(Migration):
    async def _build_tree(self, geometry: Geometry) -> tuple[int, int]:
        raise _Interrupted


async def test_a_format_1_store_is_refused_then_converted_with_nothing_changed_but_the_layout(
    redis_server: RedisHandle,
) -> None:
    store = await _populated(redis_server.url)
    before = await _state(store)
    await to_format1(store.redis, PREFIX, store.geometry)
    assert await store.redis.exists(f"{PREFIX}item:k1") and not await store.redis.exists(
        store.keys.item("k1")
    )

    with pytest.raises(FormatError, match="replication-engine migrate --config FILE"):
        await _open(redis_server.url)

    said: list[str] = []
    migration = Migration(store.redis, PREFIX, batch=50, say=said.append)
    survey = await migration.survey()
    assert (survey.state, survey.items_to_move) == ("format 1", 300)
    plan = "\n".join(migration.describe(survey))
    assert "rename 300 item keys" in plan and "the root must not change" in plan
    assert await store.redis.exists(f"{PREFIX}item:k1")  # a survey changes nothing

    # Interrupted after the renames: engines refuse the half-converted store, a rerun finishes.
    with pytest.raises(_Interrupted):
        await _StopsBeforeTheTree(store.redis, PREFIX, batch=50, say=said.append).run()
    with pytest.raises(FormatError, match="part way through a migration"):
        await _open(redis_server.url)
    outcome: Outcome = await migration.run()

    assert outcome.root_kept and outcome.placed == 300
    assert any(line.startswith("renamed") for line in said), said
    reopened = await _open(redis_server.url)
    assert await _state(reopened) == before
    assert await _placed_by_key(reopened)
    assert (await migration.survey()).state == "format 2"
    await reopened.put("after", b"written after the conversion")
    assert (await reopened.get("after")) is not None


async def test_a_format_2_key_beside_its_format_1_name_stops_the_conversion_naming_both(
    redis_server: RedisHandle,
) -> None:
    store = await _populated(redis_server.url)
    await to_format1(store.redis, PREFIX, store.geometry)
    await store.redis.hset(store.keys.item("k1"), "d", b"written by a new client meanwhile")

    with pytest.raises(MigrationError, match=r"app:item:k1 and its format-2 name both exist"):
        await Migration(store.redis, PREFIX, say=lambda _: None).run()


async def test_a_node_converted_while_its_peer_keeps_writing_converges_with_the_mesh(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    log = WriteLog()
    async with open_mesh(redis_factory, tmp_path, full_mesh(["a", "b"])) as mesh:
        a, b = mesh["a"], mesh["b"]
        for i in range(200):
            await log.put(a if i % 2 else b, f"k{i}", f"v{i}".encode())
        await mesh.wait_converged()
        await mesh.stop_engine("a")
        await to_format1(a.store.redis, a.config.local.prefix, a.store.geometry)

        stop = asyncio.Event()

        async def keep_writing() -> int:
            n = 0
            while not stop.is_set():
                await log.put(b, f"during:{n}", b"written while a converts")
                if n % 5 == 0:
                    await log.delete(b, f"k{n % 200}")
                n += 1
            return n

        writer = asyncio.create_task(keep_writing())

        # b's cold path checks a's format before any repair, and says why it will not pair.
        await b.running().repair_once()
        refusal = b.peer_status("a")["repair"]["geometry_error"]
        assert "peer 'a': store is in format 1" in refusal and "ours is format=2" in refusal
        out = io.StringIO()
        assert await migrate(a.config, dry_run=True, batch=40, out=out) == 0
        assert "is in format 1" in out.getvalue(), out.getvalue()
        assert await a.store.redis.exists(f"{a.config.local.prefix}item:k0")
        out = io.StringIO()
        assert await migrate(a.config, dry_run=False, batch=40, out=out) == 0
        assert "unchanged, as it must be" in out.getvalue(), out.getvalue()
        await mesh.start_engine("a")
        # The peer keeps writing after the node is back, too.
        back_at = len(log.by_node("b"))

        async def more_written() -> bool:
            return len(log.by_node("b")) >= back_at + 50

        await mesh.wait_for(more_written, timeout=30)
        stop.set()
        assert await writer > 0
        await mesh.wait_converged()
        assert await snapshot(a.store) == expected_snapshot(log.writes)


async def test_a_peer_whose_store_goes_back_to_format_1_is_refused_after_earlier_good_checks(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """The layout of a peer is checked at every drill: one checked once and then replaced
    under the same id (restored from an old backup, say) is refused, not compared."""
    async with open_mesh(redis_factory, tmp_path, full_mesh(["a", "b"]), engines=["b"]) as mesh:
        a, b = mesh["a"], mesh["b"]
        await a.store.put("on-a", b"1")
        await b.store.put("only-on-b", b"2")  # a runs no engine: the roots stay different
        await b.running().repair_once()  # drills, so a's layout is checked and found good
        assert b.peer_status("a")["repair"]["geometry_error"] is None
        await to_format1(a.store.redis, a.config.local.prefix, a.store.geometry)

        await b.running().repair_once()

        refusal = b.peer_status("a")["repair"]["geometry_error"]
        assert refusal is not None and "peer 'a': store is in format 1" in refusal
