"""A peer's record as input: what no engine writes in it is left out, never acted on.

A peer's record says what its store holds (claims) and who the members are. A claim lets this
node drop what the peer lacks, a member list holds collection back until that member is heard
from: a record broken or edited by hand would, taken whole, drop live writes on every node it
spreads to, or hold every delete forever. What no engine could have written is left out
(``Peer._plausible``); the rest of the record is used as before.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import pytest

from harness.mesh import MeshNode, open_mesh
from replication_engine import clock, merkle
from replication_engine.testing import RedisFactory, async_wait_until

SETTLE_S = 30.0
# The cold path on, quickly: the path that drops a version a peer's claims prove dead.
COLD = {
    "settings": {
        "cold_path": {"enabled": True, "interval_sec": 0.3},
        "membership": {"interval_sec": 0.2},
    }
}


async def hand_edit_record(node: MeshNode, **fields: str | bytes) -> None:
    """Open the node's record as its engine would, set it serving (a new record starts in
    recovery, and a recovering peer is never asked what it holds), then set ``fields``."""
    await node.store.open_record(mode="mesh", relay=False)
    serving: dict[str, str | bytes] = {"state": "ok", "reason": ""}
    await node.store.redis.hset(node.store.keys.record, mapping={**serving, **fields})


@pytest.mark.parametrize(
    "claim",
    [
        "ffffffffffffffff",  # every write, about a node the record does not list as forgotten
        f"{clock.pack(clock.wall_clock_ms() + 3_600_000, 0):016x}",  # an hour past any clock
    ],
    ids=["all-writes", "an-hour-ahead"],
)
async def test_a_claim_past_any_clock_drops_nothing(
    redis_factory: RedisFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    claim: str,
) -> None:
    # h holds none of a's writes but claims to hold all of them: taken at its word, the cold
    # path would drop every one of them from a as deleted and collected on h.
    caplog.set_level(logging.WARNING, logger="replication_engine.peer")
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["h"], "h": []}, common=COLD, engines=[]
    ) as mesh:
        a, h = mesh["a"], mesh["h"]
        await hand_edit_record(h, **{"c:a": claim})
        for i in range(20):
            await a.store.put(f"k{i}", b"written on a")
        await mesh.start_engine("a")
        cycles = functools.partial(a.metric_total, "replication_repair_cycles_total")
        begun = cycles()
        await async_wait_until(
            lambda: cycles() >= begun + 3,
            timeout=SETTLE_S,
            message="three repair cycles against h",
        )
        assert [await a.store.get(f"k{i}") is not None for i in range(20)] == [True] * 20
        said = [r for r in caplog.records if r.getMessage() == "peer.record_implausible"]
        assert len(said) == 1, "said once, not once per read"
        assert f"claim about a at {claim}: past this node's clock" in said[0].problems  # type: ignore[attr-defined]


async def test_a_forgotten_nodes_all_writes_claim_is_still_taken(
    redis_factory: RedisFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # What a store writes about a node the mesh forgot, once its forget barrier closed: every
    # write of it. That one claim past every clock is an engine's, and stays in use.
    caplog.set_level(logging.WARNING, logger="replication_engine.peer")
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["h"], "h": []}, common=COLD, engines=[]
    ) as mesh:
        await hand_edit_record(mesh["h"], **{"c:z": "ffffffffffffffff", "forgotten": "z"})
        await mesh.start_engine("a")
        record = await mesh["a"].running().peers["h"].record()
        assert record is not None and record.claims["z"] == clock.MAX_HLC
        assert record.forgotten == {"z"}
        assert not [r for r in caplog.records if r.getMessage() == "peer.record_implausible"]


async def test_ids_that_are_no_node_ids_do_not_spread_into_the_mesh(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # A member never heard from holds collection back on every node that lists it, and a
    # member list only grows: one garbage id would hold every delete of the mesh forever.
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["h"], "h": []}, common=COLD, engines=[]
    ) as mesh:
        a, h = mesh["a"], mesh["h"]
        await hand_edit_record(
            h, members="a,h,g\x00\xff,,x y", forgotten="a b,\x01", **{"c:\x02": "0" * 16}
        )
        await mesh.start_engine("a")

        async def published() -> frozenset[str] | None:
            record = await a.store.record()
            return record.members if record is not None and "h" in record.members else None

        members = await async_wait_until(published, timeout=SETTLE_S, message="a lists h")
        assert members == {"a", "h"}
        own = await a.store.record()
        assert own is not None and own.forgotten == frozenset()
        assert set(own.claims) <= {"a", "h"}


async def unlist(node: MeshNode, key: str) -> None:
    """Take ``key`` out of the node's Merkle tree, leaf to root, and leave its item stored: a
    tree damaged or edited by hand that is still consistent with itself."""
    store = node.store
    leaf = store.geometry.leaf_path(key)
    digest = await store.redis.hget(store.keys.node(leaf), key)
    assert digest is not None, f"{key} is not in its leaf {leaf}"
    width = store.geometry.width
    async with store.redis.pipeline(transaction=True) as pipe:
        pipe.hdel(store.keys.node(leaf), key)
        for start in range(0, len(leaf), width):
            path, child = leaf[:start], leaf[start : start + width]
            held = await store.redis.hget(store.keys.node(path), child)
            pipe.hset(store.keys.node(path), child, merkle.xor_hex(held.decode(), digest.decode()))
        root = await store.redis.get(store.keys.root)
        pipe.set(store.keys.root, merkle.xor_hex(root.decode(), digest.decode()))
        await pipe.execute()


async def test_a_key_missing_from_a_peers_tree_but_held_there_is_not_dropped(
    redis_factory: RedisFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # h holds k3 and claims a's writes past it, but its tree no longer lists k3: taken at its
    # tree's word, h "lacks" a version its claims cover, which a would drop as deleted and
    # collected. A drop rests on the item's absence, read on the peer.
    caplog.set_level(logging.WARNING, logger="replication_engine.cold_path")
    async with open_mesh(redis_factory, tmp_path, {"a": ["h"], "h": ["a"]}, common=COLD) as mesh:
        a, h = mesh["a"], mesh["h"]
        for i in range(10):
            await a.store.put(f"k{i}", b"written on a")
        await mesh.wait_converged()
        k3 = await a.store.get("k3")
        assert k3 is not None

        async def h_claims_k3() -> bool:
            record = await h.store.record()
            return record is not None and record.claims.get("a", 0) >= k3.hlc

        await async_wait_until(h_claims_k3, timeout=SETTLE_S, message="h claims a's k3")
        await mesh.stop_engine("h")
        await unlist(h, "k3")

        def last_repair() -> dict[str, Any]:
            return a.running().status()["peers"]["h"]["repair"]["last_repair"] or {}

        async def concluded() -> bool:
            """a drew its conclusion about k3: dropped it, or found h holds it unlisted."""
            return last_repair().get("unlisted_on_peer", 0) > 0 or await a.store.get("k3") is None

        await async_wait_until(concluded, timeout=SETTLE_S, message="a's repair from h concluded")
        for node in (a, h):
            held = await node.store.get("k3")
            assert held is not None and held.value == b"written on a", node.node_id
        assert not last_repair()["complete"], last_repair()
        said = [r for r in caplog.records if r.getMessage() == "repair.unlisted_on_peer"]
        assert said and said[0].keys == ["k3"], said  # type: ignore[attr-defined]


async def test_a_plausible_claim_a_peer_does_not_hold_drops_nothing_above_our_own_frontier(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # h's engine is stopped, and its record says, by hand, that h holds every write of a up to
    # now: a plausible claim, at the present time. h lacks a's new writes, so taken at its
    # word h "lost them to a collection". But no collection can have covered them: a's own
    # claim about h stopped where h stopped, so a's frontier is below them, and every
    # collection anywhere waits for a's frontier.
    async with open_mesh(redis_factory, tmp_path, {"a": ["h"], "h": ["a"]}, common=COLD) as mesh:
        a, h = mesh["a"], mesh["h"]
        await a.store.put("before", b"seen by h")
        await mesh.wait_converged()
        await mesh.stop_engine("h")
        for i in range(10):
            await a.store.put(f"k{i}", b"written on a")
        newest = await a.store.get("k9")
        assert newest is not None
        await h.store.redis.hset(h.store.keys.record, "c:a", f"{newest.hlc:016x}")

        def last_repair() -> dict[str, Any]:
            return a.running().status()["peers"]["h"]["repair"]["last_repair"] or {}

        async def concluded() -> bool:
            """a drew its conclusion about k0..k9: dropped them, or kept them for now."""
            return last_repair().get("drops_deferred", 0) > 0 or await a.store.get("k0") is None

        await async_wait_until(concluded, timeout=SETTLE_S, message="a's repair from h concluded")
        assert [await a.store.get(f"k{i}") is not None for i in range(10)] == [True] * 10
        assert last_repair()["drops_deferred"] == 10, last_repair()
