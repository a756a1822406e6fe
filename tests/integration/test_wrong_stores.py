"""An operator's address mistakes: a peer's URL that names the local store (or any other node's),
a node configured onto another node's store, a peer prefix with nothing under it, one node's
engine started twice. Each must be refused with a message naming the problem (or, where it
looks like a normal start, said), and must not cost a write: read as the peer, another node's
store makes a node's own writes look absent from "the peer", and the cold path drops what a
peer does not hold."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ResponseError

from harness.mesh import build_config, connect_store, open_mesh
from replication_engine import ReadOnlyStoreError, ReplicationEngine, StoreOwnershipError
from replication_engine.engine import EngineError
from replication_engine.hot_path import TailerMode
from replication_engine.testing import (
    RedisFactory,
    async_wait_until,
    find_redis_server,
    redis_server_version,
)

SETTLE_S = 30.0
HAS_FUNCTIONS = redis_server_version(find_redis_server())[0] >= 7
# The cold path on, quickly: the path that drops a key a peer does not hold.
COLD = {"settings": {"cold_path": {"enabled": True, "interval_sec": 0.5}}}


def repair_cycles(engine: ReplicationEngine) -> float:
    return sum(
        sample.value
        for family in engine.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "replication_repair_cycles_total"
    )


@contextlib.asynccontextmanager
async def running(config: Any) -> AsyncIterator[tuple[ReplicationEngine, Any]]:
    store = await connect_store(config)
    engine = ReplicationEngine(config, store=store)
    await engine.start()
    try:
        yield engine, store
    finally:
        await engine.shutdown(5.0)
        await store.close()


async def test_a_peer_whose_address_is_the_local_store_is_refused_and_costs_nothing(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    server = redis_factory()
    # The same Redis under another name: no text comparison of URLs can catch it.
    alias = server.url.replace("127.0.0.1", "localhost")
    assert alias != server.url
    config = build_config("a", {"a": server.url, "b": alias}, ["b"], tmp_path / "a.db", common=COLD)
    async with running(config) as (engine, store):
        await store.put("mine", b"only copy")

        def refused_on_both_paths() -> bool:
            peer = engine.status()["peers"]["b"]
            repair = peer.get("repair") or {}
            return peer["mode"] == TailerMode.PEER_MISMATCH and "belongs to node 'a'" in str(
                repair.get("geometry_error")
            )

        await async_wait_until(refused_on_both_paths, timeout=SETTLE_S)
        ready, reasons = engine.readiness()
        # Two more cold-path cycles have run since: the write is still here.
        seen = repair_cycles(engine)
        await async_wait_until(lambda: repair_cycles(engine) >= seen + 2, timeout=SETTLE_S)
        item = await store.get("mine")

    assert not ready
    assert any(
        r.startswith("peer b: peer_mismatch: ") and "belongs to node 'a'" in r for r in reasons
    ), reasons
    assert item is not None and item.value == b"only copy"


async def test_two_nodes_sharing_a_node_id_refuse_each_other_and_keep_their_writes(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    servers = {"a": redis_factory(), "b": redis_factory()}
    urls = {n: s.url for n, s in servers.items()}
    first = build_config("a", urls, ["b"], tmp_path / "1.db", common=COLD)
    # The second node's config copied from the first, with only its addresses changed.
    second = build_config(
        "a", {"a": urls["b"], "b": urls["a"]}, ["b"], tmp_path / "2.db", common=COLD
    )
    async with running(first) as (one, one_store), running(second) as (two, two_store):
        await one_store.put("on-first", b"1")
        await two_store.put("on-second", b"2")
        for engine in (one, two):
            await async_wait_until(
                lambda engine=engine: (
                    engine.status()["peers"]["b"]["mode"] == TailerMode.PEER_MISMATCH
                ),
                timeout=SETTLE_S,
            )
        readiness = [one.readiness(), two.readiness()]
        kept = [await one_store.get("on-first"), await two_store.get("on-second")]
        crossed = [await one_store.get("on-second"), await two_store.get("on-first")]

    assert [ready for ready, _ in readiness] == [False, False]
    assert all(item is not None for item in kept)
    assert crossed == [None, None]  # nothing read from a store that is not the peer's


@pytest.mark.parametrize("how", ["store", "engine"])
async def test_a_node_configured_onto_another_nodes_store_does_not_start(
    redis_factory: RedisFactory, tmp_path: Path, how: str
) -> None:
    server = redis_factory()
    owner = build_config("a", {"a": server.url, "b": server.url}, [], tmp_path / "a.db")
    async with running(owner) as (_engine, store):
        await store.put("k", b"a's")
        root = await store.merkle_root()
        alias = server.url.replace("127.0.0.1", "localhost")
        wrong = build_config("b", {"b": alias}, [], tmp_path / "b.db")
        with pytest.raises(StoreOwnershipError, match="belongs to node 'a'"):
            if how == "store":
                await connect_store(wrong)
            else:
                await ReplicationEngine(wrong).start()
        assert await store.merkle_root() == root


async def test_a_peer_prefix_with_nothing_under_it_is_said_once_and_shown_in_status(
    redis_factory: RedisFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    servers = {"a": redis_factory(), "b": redis_factory()}
    urls = {n: s.url for n, s in servers.items()}
    b_config = build_config("b", urls, ["a"], tmp_path / "b.db")
    # a reads b under a prefix b does not use: it can only see an empty store there.
    a_config = build_config(
        "a", urls, ["b"], tmp_path / "a.db", peer_options={"prefix": "elsewhere:"}
    )
    with caplog.at_level(logging.INFO, logger="replication_engine.peer"):
        async with running(b_config), running(a_config) as (a, _store):
            await async_wait_until(
                lambda: a.status()["peers"]["b"].get("store_found") is False, timeout=SETTLE_S
            )
            assert "peer b: no store under prefix 'elsewhere:' (peer.no_store)" in (
                a.readiness()[1]
            )
    # b's engine may say it of a too, if it reads a before a's store is set up: not this test's.
    said = [
        r
        for r in caplog.records
        if r.getMessage() == "peer.no_store" and getattr(r, "peer", None) == "b"
    ]
    assert len(said) == 1 and said[0].prefix == "elsewhere:", said  # type: ignore[attr-defined]


async def test_a_second_engine_for_one_node_is_named_as_the_likely_cause(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # Started twice by mistake, each with its own cursor database (two hosts, say): each finds
    # the other's certification in the record, which looks like a store put back by hand.
    fast = {"settings": {"membership": {"interval_sec": 0.2}}}
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": ["a"]}, common=fast) as mesh:
        first = mesh["a"].running()
        config = mesh["a"].config
        elsewhere = config.cursor.model_copy(update={"sqlite_path": str(tmp_path / "2.db")})
        second_config = config.model_copy(update={"cursor": elsewhere})
        async with running(second_config) as (second, _store):

            def named() -> bool:
                return any(
                    "another engine for node a runs on this store" in reason
                    for engine in (first, second)
                    for reason in engine.readiness()[1]
                )

            await async_wait_until(named, timeout=SETTLE_S)

            # Each recovery is over in milliseconds, so a probe would rarely land in one: once
            # it has happened twice, a ready node says it in its notes, whenever probed.
            def said_while_ready() -> bool:
                ready, notes = first.readiness()
                return ready and any(
                    "another engine for node a runs on this store: its record was rewritten by"
                    in note
                    for note in notes
                )

            await async_wait_until(said_while_ready, timeout=SETTLE_S)


async def test_a_node_the_mesh_forgot_refuses_writes_instead_of_losing_them(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # Forgotten while it still runs (engine.forget, or the CLI with --force): every member drops
    # its writes from then on, so a write it acknowledged would be a write lost.
    fast = {"settings": {"membership": {"interval_sec": 0.2}}}
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": ["a"]}, common=fast) as mesh:
        await mesh["b"].store.put("before", b"written while a member")
        await mesh["a"].running().forget("b")
        b = mesh["b"].running()

        def told() -> bool:
            return any("the mesh forgot this node" in reason for reason in b.readiness()[1])

        await async_wait_until(told, timeout=SETTLE_S)
        with pytest.raises(ReadOnlyStoreError, match="the mesh forgot this node"):
            await mesh["b"].store.put("after", b"would be dropped everywhere")
        # Every other client writes through the store's functions, and they refuse too: a
        # store opened by another process (which has not heard) and a raw FCALL from another
        # language.
        other = await connect_store(mesh["b"].config)
        try:
            with pytest.raises(ReadOnlyStoreError, match="forgot node b"):
                await other.put("elsewhere", b"would be dropped everywhere")
            with pytest.raises(ReadOnlyStoreError, match="forgot node b"):
                await other.delete("before")
            if HAS_FUNCTIONS:
                with pytest.raises(ResponseError, match=r"^FORGOTTEN the mesh forgot node b"):
                    await other.redis.execute_command(
                        "FCALL", "re_put", 1, other.keys.item("raw"), b"from another language"
                    )
        finally:
            await other.close()
        assert await mesh["b"].store.get("after") is None
        assert await mesh["b"].store.get("elsewhere") is None
        assert await mesh["b"].store.get("raw") is None
        assert await mesh["b"].store.get("before") is not None


@pytest.mark.parametrize("read_back", [False, True], ids=["nobody-reads-d", "a-reads-d"])
async def test_a_node_none_of_its_peers_reads_is_said_in_ready_notes_and_status(
    redis_factory: RedisFactory, tmp_path: Path, read_back: bool
) -> None:
    # d was added to the mesh in its own config only: it reads a and b, neither reads it, and
    # what is written on d reaches no other node while every node answers ready.
    fast = {"settings": {"membership": {"interval_sec": 0.1}}}
    topology = {"a": ["b", "d"] if read_back else ["b"], "b": ["a"], "d": ["a", "b"]}
    async with open_mesh(redis_factory, tmp_path, topology, common=fast) as mesh:
        d = mesh["d"].running()
        note = "this node: no peer lists this node as a member"

        def noted() -> bool:
            return any(n.startswith(note) for n in d.readiness()[1])

        if read_back:
            # Listed by a: never said, however long it runs (20 ticks, four times the grace).
            await async_wait_until(
                lambda: d.status()["membership"]["ticks"] >= 20, timeout=SETTLE_S
            )
            assert not noted() and d.status()["membership"]["unread_by_peers"] is False
        else:
            await async_wait_until(noted, timeout=SETTLE_S, message="d's readiness notes it")
            assert d.readiness()[0] is True  # said, not an outage: d's reads are in sync
            assert d.status()["membership"]["unread_by_peers"] is True


async def test_a_peer_of_another_tree_geometry_is_a_mismatch_said_without_tracebacks(
    redis_factory: RedisFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A new node given another merkle geometry than the mesh's: its bootstrap from each peer
    # cannot compare trees. That is the config's to fix, as a layout mismatch is: said, and
    # not ready, without a traceback per restart.
    servers = {"a": redis_factory(), "b": redis_factory()}
    urls = {n: s.url for n, s in servers.items()}
    async with running(build_config("b", urls, [], tmp_path / "b.db")):
        pass  # b's store laid out in the default geometry
    a_config = build_config(
        "a",
        urls,
        ["b"],
        tmp_path / "a.db",
        common={"settings": {"merkle": {"fanout": 16, "depth": 3}}},
        peer_options={"start_from": "snapshot"},
    )
    with caplog.at_level(logging.ERROR, logger="replication_engine.engine"):
        async with running(a_config) as (engine, _store):
            await async_wait_until(
                lambda: engine.status()["peers"]["b"]["mode"] == TailerMode.PEER_MISMATCH,
                timeout=SETTLE_S,
            )
            ready, reasons = engine.readiness()
    assert not ready
    assert any(r.startswith("peer b: peer_mismatch: ") and "geometry" in r for r in reasons), (
        reasons
    )
    crashed = [r for r in caplog.records if r.getMessage() == "engine.task_crashed"]
    assert crashed and not any(r.exc_info for r in crashed), crashed


@pytest.mark.parametrize("key", ["cdc", "record"])
async def test_a_peer_stream_or_record_of_the_wrong_type_is_a_mismatch_naming_the_key(
    redis_factory: RedisFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture, key: str
) -> None:
    # A SET by hand on the peer's stream (or record) key: its store is what is wrong, not the
    # link. Said with the key's name, not ready, no traceback; mended once the key is.
    servers = {"a": redis_factory(), "b": redis_factory()}
    urls = {n: s.url for n, s in servers.items()}
    async with running(build_config("b", urls, [], tmp_path / "b.db")) as (_b, b_store):
        name = getattr(b_store.keys, key)
        saved = await b_store.redis.dump(name)
        await b_store.redis.delete(name)
        await b_store.redis.set(name, "set by hand")
        with caplog.at_level(logging.ERROR, logger="replication_engine.engine"):
            async with running(build_config("a", urls, ["b"], tmp_path / "a.db")) as (a, _s):
                await async_wait_until(
                    lambda: a.status()["peers"]["b"]["mode"] == TailerMode.PEER_MISMATCH,
                    timeout=SETTLE_S,
                )
                ready, reasons = a.readiness()
                assert not ready
                assert any(f"{name} holds another type" in r for r in reasons), reasons
                await b_store.redis.delete(name)
                if saved is not None:
                    await b_store.redis.restore(name, 0, saved)
                await async_wait_until(
                    lambda: a.status()["peers"]["b"]["mode"] == TailerMode.TAILING,
                    timeout=SETTLE_S,
                )
    crashed = [r for r in caplog.records if r.getMessage() == "engine.task_crashed"]
    assert crashed and not any(r.exc_info for r in crashed), crashed


async def test_another_nodes_cursor_database_is_refused_at_start(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # b's cursor file copied to c (a restore of the wrong host's volume, say): its cursors are
    # b's positions and its nonces b's, which sent c into a recovery blamed on a second engine.
    servers = {n: redis_factory() for n in ("a", "b", "c")}
    urls = {n: s.url for n, s in servers.items()}
    async with running(build_config("b", urls, ["a"], tmp_path / "b.db")):
        pass
    c_config = build_config("c", urls, ["a"], tmp_path / "b.db")
    store = await connect_store(c_config)
    try:
        engine = ReplicationEngine(c_config, store=store)
        with pytest.raises(EngineError, match=r"b\.db is node b's cursor database, not node c's"):
            await engine.start()
        assert await store.record() is None, "c wrote nothing with b's file"
    finally:
        await store.close()
    async with running(build_config("c", urls, ["a"], tmp_path / "c.db")) as (engine, _store):
        assert engine.state == "running"  # a file of its own


async def test_a_member_this_node_does_not_peer_with_is_noted_while_ready(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # c taken out of a's peer list without a forget (or never added): a does not read c's
    # writes, and its collection waits for c, while /ready said nothing of it.
    fast = {"settings": {"membership": {"interval_sec": 0.2}}}
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": ["a", "c"], "c": ["b"]}, common=fast
    ) as mesh:
        a = mesh["a"].running()

        def noted() -> bool:
            ready, notes = a.readiness()
            return ready and any(
                note.startswith("member(s) c not among this node's peers") for note in notes
            )

        await async_wait_until(noted, timeout=SETTLE_S, message="a notes c")
        assert not any("not among" in n for n in mesh["b"].running().readiness()[1])
