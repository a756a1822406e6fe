"""A node back from an absence longer than the tombstone grace, on real redis-server processes.

The end-to-end case, where a node is away, its deletes are collected and it comes back, is in
tests/chaos (test_a_node_offline_past_the_tombstone_grace_does_not_resurrect_deleted_keys).
This file covers the parts: the store's discard, the cursor database's meta table, the cold
path's refusal to pull from a stale peer, the discard limit, a whole mesh back after the grace,
and a fresh node's preloaded data.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from replication_engine.clock import pack, wall_clock_ms
from replication_engine.codec import Change
from replication_engine.cold_path import ColdPath
from replication_engine.config import ColdPathConfig, EngineConfig
from replication_engine.cursor import CursorStore
from replication_engine.observability.metrics import Metrics
from replication_engine.peer import Peer, PeerUnavailable
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisFactory, async_wait_until
from replication_engine.testing.chaos import ChaosMesh, Workload

PREFIX = "rb:"
# Tombstone grace of the mesh tests (seconds): short, so an absence past it is quick.
GRACE_S = 0.3
# Deadline for a mesh to converge or a node to change its standing.
SETTLE_S = 60.0
# Grace of the cold-path tests (seconds): long, so only the records decide.
LONG_GRACE_S = 60.0


@contextlib.asynccontextmanager
async def chaos_mesh(
    redis_factory: RedisFactory, tmp_path: Path, ids: Sequence[str] = ("a", "b"), **options: Any
) -> AsyncIterator[ChaosMesh]:
    mesh = await ChaosMesh.open(list(ids), tmp_path / "mesh", redis_factory, **options)
    try:
        yield mesh
    except BaseException:
        await mesh.aclose()
        raise
    errors = await mesh.aclose()
    if errors:
        raise errors[0]


def old_value(key: str, origin: str, *, age_s: float) -> Change:
    """A value written ``age_s`` seconds ago."""
    hlc = pack(wall_clock_ms() - int(age_s * 1000), 0)
    return Change.put(key, f"{key} from {origin}".encode(), hlc=hlc, origin=origin)


# ------------------------------------------------------------------------------------ store


async def test_discard_removes_only_the_named_versions_and_tells_no_one(
    redis_factory: RedisFactory,
) -> None:
    server = redis_factory()
    store = await RedisStore.connect(server.url, node_id="b", prefix=PREFIX)
    reference = await RedisStore.connect(server.url, node_id="r", prefix="ref:")
    try:
        changes = [old_value(k, "a", age_s=5) for k in ("x", "y", "z")]
        await store.apply_batch(changes)
        await reference.apply_batch(changes[1:])  # what b must look like without x
        stream_before = await store.redis.xlen(store.keys.cdc)

        x, y, _ = changes
        removed = await store.discard_versions(
            [(x.key, x.hlc, x.origin), (y.key, y.hlc + 1, y.origin)]  # y changed since: kept
        )

        assert removed == 1
        assert await store.get_version("x") is None
        assert await store.get_version("y") is not None
        assert await store.merkle_root() == await reference.merkle_root()
        assert await store.redis.xlen(store.keys.cdc) == stream_before, "no CDC entry"
        assert await store.discard_versions([]) == 0
    finally:
        await store.close()
        await reference.close()


async def test_a_cursor_database_from_before_the_meta_table_gains_it(tmp_path: Path) -> None:
    path = tmp_path / "cursors.db"
    cursors = await CursorStore.open(path)
    await cursors.save("a", "5-0")
    await cursors.close()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("DROP TABLE meta")  # the schema as the engine before records wrote it
        db.commit()

    cursors = await CursorStore.open(path)
    try:
        assert await cursors.meta_get("last_contact_ms") is None
        assert (await cursors.newest_save_ms() or 0) > 0
        await cursors.meta_set("last_contact_ms", "42")
        await cursors.meta_set("last_contact_ms", "43")
        assert await cursors.meta_get("last_contact_ms") == "43"
        assert await cursors.get("a") == "5-0"
    finally:
        await cursors.close()


# ------------------------------------------------------------------------------------ cold path


@contextlib.asynccontextmanager
async def pair(
    redis_factory: RedisFactory, tmp_path: Path
) -> AsyncIterator[tuple[RedisStore, RedisStore, Peer, ColdPath]]:
    """``a`` repairing from peer ``b``, which holds a key ``a`` lacks."""
    server_a, server_b = redis_factory(), redis_factory()
    a = await RedisStore.connect(server_a.url, node_id="a", prefix=PREFIX)
    b = await RedisStore.connect(server_b.url, node_id="b", prefix=PREFIX)
    peer = Peer("b", server_b.url, prefix=PREFIX, metrics=Metrics())
    cursors = await CursorStore.open(tmp_path / "a.db")
    cold = ColdPath(
        a,
        [peer],
        cursors,
        ColdPathConfig(),
        Metrics(),
        tombstone_grace_sec=LONG_GRACE_S,
    )
    try:
        await b.apply_batch([old_value("stale", "b", age_s=LONG_GRACE_S * 2)])
        yield a, b, peer, cold
    finally:
        await peer.close()
        await cursors.close()
        await a.close()
        await b.close()


@pytest.mark.parametrize(
    "record",
    [
        {"contact_ms": "1", "state": "needs_rebootstrap", "since_ms": "1", "reason": "gap"},
        {"contact_ms": "1"},  # its engine has been silent for decades
    ],
)
async def test_the_cold_path_does_not_pull_from_a_peer_out_of_the_mesh(
    redis_factory: RedisFactory, tmp_path: Path, record: dict[str, str]
) -> None:
    async with pair(redis_factory, tmp_path) as (a, b, peer, cold):
        await b.write_mesh_record(record)
        cold.request_repair("b", reason="gap", keys=["stale"])

        stats = await cold.repair_once(force=True)

        assert await a.get_version("stale") is None
        repair = stats.peers["b"]
        assert repair.out_of_mesh is not None and repair.items_fetched == 0
        assert stats.peers_skipped == {"b": "out_of_mesh"}
        assert cold.status()["peers"]["b"]["out_of_mesh"] == repair.out_of_mesh
        assert cold.status()["peers"]["b"]["repair_requested"] == ["gap"], "kept for later"
        exported = cold.metrics.render().decode()
        assert 'replication_peer_out_of_mesh{peer="b"} 1.0' in exported
        with pytest.raises(PeerUnavailable, match="out of the mesh"):
            await cold.bootstrap(peer)

        # Back in the mesh: the pending request and the drill go ahead.
        await b.write_mesh_record(
            {"contact_ms": str(b.clock.wall())}, clear=("state", "since_ms", "reason")
        )
        stats = await cold.repair_once(force=True)
        assert stats.peers["b"].out_of_mesh is None
        assert await a.get_version("stale") is not None
        assert cold.status()["peers"]["b"]["out_of_mesh"] is None


async def test_a_peer_without_a_record_is_pulled_from_as_before(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with pair(redis_factory, tmp_path) as (a, _b, _peer, cold):
        await cold.repair_once(force=True)
        assert await a.get_version("stale") is not None


# ------------------------------------------------------------------------------------ engine


async def test_a_rebootstrap_that_would_discard_too_much_waits_for_an_operator(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    config = {
        "local": {"tombstone_grace_sec": GRACE_S},
        "settings": {"rebootstrap": {"max_discard_items": 0}},
    }
    async with chaos_mesh(redis_factory, tmp_path, config=config) as mesh:
        a, b = mesh["a"], mesh["b"]
        workload = Workload(mesh, seed=5, keys=5)
        assert await workload.write("a", "doomed", b"deleted while b is away") is not None
        await mesh.wait_converged(SETTLE_S)
        await mesh.stop_engine("b")
        mesh.partition("a", "b")
        assert await workload.write("a", "doomed", None) is not None
        await async_wait_until(
            a.store.collect_tombstones, timeout=SETTLE_S, interval=0.05, message="collected"
        )
        await workload.write("a", "later", b"after the delete")
        await mesh.trim("a", 1)
        mesh.heal("a", "b")
        # Before b's engine runs, a reads b's old record and holds off.
        await a.wait_holding_off("b", SETTLE_S, "a holding off from b before b's engine starts")
        engine = await mesh.start_engine("b")

        await async_wait_until(
            lambda: "max_discard_items" in str(engine.status()["standing"]["error"]),
            timeout=SETTLE_S,
            interval=0.05,
            message="b refusing to discard",
        )
        standing = engine.status()["standing"]
        assert standing["state"] == "needs_rebootstrap" and standing["discarded"] == 0
        ready, reasons = engine.readiness()
        assert not ready and any("needs_rebootstrap" in r for r in reasons), reasons
        assert await b.store.get_version("doomed") is not None, "nothing discarded"
        assert await a.store.get_version("doomed") is None, "a never pulled it back"
        assert b.metric_total("replication_rebootstraps_total", outcome="refused") == 1
        assert b.metric_total("replication_standing_state") == 2
        record = await b.store.reader.mesh_record()
        assert record["state"] == "needs_rebootstrap"


async def test_a_whole_mesh_back_after_the_grace_proves_itself_from_its_streams(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with chaos_mesh(
        redis_factory, tmp_path, ("a", "b", "c"), config={"local": {"tombstone_grace_sec": GRACE_S}}
    ) as mesh:
        workload = Workload(mesh, seed=6, keys=10)
        for node in ("a", "b", "c"):
            assert await workload.write(node, f"k:{node}", node.encode()) is not None
        assert await workload.write("a", "k:b", None) is not None
        await mesh.wait_converged(SETTLE_S)
        for node in ("a", "b", "c"):
            await mesh.stop_engine(node)
        await asyncio.sleep(GRACE_S * 3)  # sync-ok: the outage itself, past the grace

        engines = []
        for node in ("a", "b", "c"):
            engines.append(await mesh.start_engine(node))
            assert engines[-1].status()["standing"]["state"] == "verifying", node
        await async_wait_until(
            lambda: all(e.status()["standing"]["state"] == "in_mesh" for e in engines),
            timeout=SETTLE_S,
            interval=0.05,
            message="every node proven by its peers' streams",
        )
        await async_wait_until(
            lambda: all(e.readiness()[0] for e in engines),
            timeout=SETTLE_S,
            interval=0.05,
            message="every node ready",
        )
        await mesh.wait_converged(SETTLE_S)
        for node in mesh:
            assert node.metric_total("replication_rebootstraps_total") == 0
            assert node.metric_total("replication_standing_changes_total", state="verifying") == 1


async def test_data_loaded_before_a_fresh_nodes_first_run_is_kept(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    config = {"local": {"tombstone_grace_sec": GRACE_S}}
    async with chaos_mesh(redis_factory, tmp_path, config=config, start_engines=False) as mesh:
        # Loaded by b's parent daemon long ago; no engine has run on b yet.
        await mesh["b"].store.apply_batch([old_value("preloaded", "b", age_s=3600)])
        engine_b = await mesh.start_engine("b")
        engine_a = await mesh.start_engine("a")

        assert engine_b.status()["standing"]["state"] == "in_mesh"
        await mesh.wait_converged(SETTLE_S)
        assert await mesh["a"].store.get_version("preloaded") is not None
        assert engine_a.status()["standing"]["discarded"] == 0
        assert engine_b.status()["standing"]["discarded"] == 0


async def test_a_node_whose_engine_was_down_past_the_grace_is_held_off_then_rebootstrapped(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # b's Redis stays up and reachable the whole time; only its engine is down. Without the
    # hot path b cannot prove anything from streams, so it goes straight to a re-bootstrap.
    config = {"local": {"tombstone_grace_sec": GRACE_S}}
    async with chaos_mesh(redis_factory, tmp_path, config=config) as mesh:
        a, b = mesh["a"], mesh["b"]
        workload = Workload(mesh, seed=7, keys=5)
        assert await workload.write("a", "doomed", b"deleted while b's engine is down") is not None
        await mesh.wait_converged(SETTLE_S)
        await mesh.stop_engine("b")
        assert await workload.write("a", "doomed", None) is not None
        await async_wait_until(
            a.store.collect_tombstones, timeout=SETTLE_S, interval=0.05, message="collected"
        )
        # b's record is older than the grace: a's cold path must not pull b's stale copy.
        await a.wait_holding_off("b", SETTLE_S, "a holding off from b")
        assert await a.store.get_version("doomed") is None
        data = b.config.model_dump()
        data["settings"]["hot_path"]["enabled"] = False
        b.config = EngineConfig.model_validate(data)

        engine = await mesh.start_engine("b")

        assert engine.status()["standing"]["state"] in ("needs_rebootstrap", "rebootstrapping")
        await async_wait_until(
            lambda: engine.status()["standing"]["state"] == "in_mesh",
            timeout=SETTLE_S,
            interval=0.05,
            message="b re-bootstrapped",
        )
        assert b.metric_total("replication_standing_changes_total", state="verifying") == 1
        assert b.metric_total("replication_standing_changes_total", state="needs_rebootstrap") == 1
        assert engine.status()["standing"]["discarded"] == 1
        await mesh.wait_converged(SETTLE_S)
        assert await a.store.get_version("doomed") is None
        assert await b.store.get_version("doomed") is None


async def test_an_engine_whose_redis_is_down_at_start_decides_once_it_answers(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # A grace long enough for the restart, short enough for a quick heartbeat (2 s).
    config = {"local": {"tombstone_grace_sec": 8.0}}
    async with chaos_mesh(redis_factory, tmp_path, config=config) as mesh:
        await mesh.stop_engine("b")
        mesh.kill_redis("b")

        engine = await mesh.start_engine("b")  # starts: its tailers wait for the store

        standing = engine.status()["standing"]
        assert standing["state"] == "verifying" and "could not be read" in standing["reason"]
        assert not engine.readiness()[0]
        await mesh.restart_redis("b")
        await async_wait_until(
            lambda: engine.status()["standing"]["state"] == "in_mesh",
            timeout=SETTLE_S,
            interval=0.05,
            message="b's standing decided once its Redis answered",
        )
        assert mesh["b"].metric_total("replication_rebootstraps_total") == 0
