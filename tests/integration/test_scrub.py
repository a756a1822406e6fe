"""The background scrub on real Redis: a payload edited by hand is found and healed from a peer,
one no peer can heal is kept and listed, and keys that do not belong under the prefix are
counted and sampled while replication goes on.

The Merkle tree covers content hashes, not bytes, so none of these shows in a root comparison:
only the scrub finds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from harness.mesh import DEFAULT_PREFIX, metric, open_mesh
from replication_engine.codec import CodecError
from replication_engine.config import ScrubConfig
from replication_engine.cursor import CursorStore
from replication_engine.observability.metrics import Metrics
from replication_engine.scrub import UNREADABLE_REASON, Scrub
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisFactory, RedisHandle, async_wait_until

SETTLE_S = 20.0
# A fast scrub: every subtree of these small stores each tick (an empty subtree counts as one
# item: 1,000 a tick covers the 256 of the default geometry and the items of these stores).
# A budget in the millions made a tick of a near-empty store tens of thousands of calls, and
# the stray scan, one page a tick after them, could take longer than a test waits.
SCRUB = {"settings": {"scrub": {"interval_sec": 0.05, "payload_items_per_sec": 20_000}}}
NO_SCRUB = {"settings": {"scrub": {"payload_items_per_sec": 0, "stray_scan": False}}}


async def test_a_tick_checks_each_subtree_at_most_once_whatever_the_budget(
    redis_server: RedisHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty subtree counts as one item, so on a store far smaller than the budget the
    budget alone would have a tick re-check the same subtrees, one call each, thousands of
    times over: a busy loop on the local Redis. A tick stops after one whole pass."""
    store = await RedisStore.connect(redis_server.url, node_id="a")
    cursors = await CursorStore.open(tmp_path / "cursors.db")
    try:
        await store.put("k", b"v")
        settings = ScrubConfig(interval_sec=1.0, payload_items_per_sec=1e6, stray_scan=False)
        scrub = Scrub(store, cursors, Metrics(), settings, heal=None)
        verify = store.verify_items
        calls: list[str] = []

        async def counted(parent: str) -> Any:
            calls.append(parent)
            if len(calls) > ticks[0] * len(store.leaf_parents()):
                raise AssertionError(f"a tick went on past a whole pass ({len(calls)} calls)")
            return await verify(parent)

        ticks = [1]
        monkeypatch.setattr(store, "verify_items", counted)
        await scrub.tick()
        assert len(calls) == len(set(calls)) == len(store.leaf_parents())
        assert scrub.passes == 1 and scrub.items_checked == 1
        ticks[0] = 2
        await scrub.tick()  # the next tick starts the next pass, no budget carried over
        assert scrub.passes == 2 and len(calls) == 2 * len(store.leaf_parents())
    finally:
        await cursors.close()
        await store.close()


def scrub_status(node: Any) -> dict[str, Any]:
    status = node.running().status()["scrub"]
    assert status is not None
    return dict(status)


async def test_a_hand_edited_payload_is_found_kept_and_healed_from_a_peer(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": ["a"]},
        overrides={"a": SCRUB, "b": NO_SCRUB},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        for i in range(40):
            await b.store.put(f"k:{i}", f"value {i}".encode())
        await mesh.wait_idle()
        await mesh.wait_converged()
        root = await a.store.merkle_root()

        await a.store.redis.hset(a.store.keys.item("k:7"), "d", b"edited by hand")
        # Every digest is unchanged: a comparison of roots cannot see it.
        assert await a.store.merkle_root() == root == await b.store.merkle_root()

        async def healed() -> bool:
            try:
                item = await a.store.get("k:7")
            except CodecError:
                return False
            return item is not None and item.value == b"value 7"

        await async_wait_until(healed, timeout=SETTLE_S, message="k:7 healed on a from b")
        engine = a.running()
        assert metric(engine, "replication_scrub_unreadable_total") == 1
        assert metric(engine, "replication_scrub_healed_total") == 1
        assert metric(engine, "replication_scrub_unhealed_items") == 0
        kept = [r for r in await engine.cursors.quarantine_list(limit=10) if r.key == "k:7"]
        assert len(kept) == 1 and kept[0].reason.startswith(UNREADABLE_REASON), kept
        assert kept[0].raw["d"] == "edited by hand"
        payloads = scrub_status(a)["payloads"]
        assert payloads["healed"] == 1 and payloads["unhealed_count"] == 0, payloads
        assert payloads["items_checked"] > 0
        assert await a.store.merkle_root() == root


async def test_an_unreadable_copy_no_peer_can_replace_is_kept_and_listed(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": ["a"]},
        overrides={"a": SCRUB, "b": NO_SCRUB},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        await a.store.put("only", b"the one value")
        await mesh.wait_idle()
        await mesh.wait_converged()
        for node in (a, b):  # both copies rot: there is nothing to heal from
            await node.store.redis.hset(node.store.keys.item("only"), "d", b"rotten")

        await async_wait_until(
            lambda: scrub_status(a)["payloads"]["unhealed_count"] == 1,
            timeout=SETTLE_S,
            message="the unreadable copy listed as unhealed",
        )
        engine = a.running()
        listed = scrub_status(a)["payloads"]["unhealed"]
        assert [u["key"] for u in listed] == ["only"], listed
        assert "hash" in listed[0]["error"], listed
        assert metric(engine, "replication_scrub_unhealed_items") == 1
        # Found once, kept once, however many passes retry it.
        passes = scrub_status(a)["payloads"]["passes"]
        await async_wait_until(
            lambda: scrub_status(a)["payloads"]["passes"] >= passes + 3,
            timeout=SETTLE_S,
            message="three more scrub passes",
        )
        assert metric(engine, "replication_scrub_unreadable_total") == 1
        kept = [r for r in await engine.cursors.quarantine_list(limit=10) if r.key == "only"]
        assert len(kept) == 1, kept

        # Once b's copy is rewritten (a new write), a heals by the ordinary path and the
        # listing clears.
        await b.store.put("only", b"written again")
        await async_wait_until(
            lambda: scrub_status(a)["payloads"]["unhealed_count"] == 0,
            timeout=SETTLE_S,
            message="the listing cleared after a newer write",
        )
        item = await a.store.get("only")
        assert item is not None and item.value == b"written again"


@pytest.mark.parametrize("prefix", [DEFAULT_PREFIX])
async def test_stray_keys_are_counted_and_sampled_and_replication_goes_on(
    redis_factory: RedisFactory, tmp_path: Path, prefix: str
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": ["a"]},
        overrides={"a": SCRUB, "b": NO_SCRUB},
        prefix=prefix,
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        redis = a.store.redis
        await redis.set(f"{prefix}notes", "left by an operator")
        await redis.set(a.store.keys.item("typed-wrongly"), "a string, not a hash")
        await redis.set("elsewhere:key", "outside the prefix")

        await async_wait_until(
            lambda: scrub_status(a)["stray_keys"]["count"] == 2,
            timeout=SETTLE_S,
            message="two stray keys counted on a",
        )
        sample = {s["key"]: s["problem"] for s in scrub_status(a)["stray_keys"]["sample"]}
        assert sample == {
            f"{prefix}notes": "not a key of the format",
            f"{prefix}{{0}}item:typed-wrongly": "wrong type: string, the format has a hash",
        }
        assert metric(a.running(), "replication_stray_keys") == 2

        # Never used, never removed; and a write of that very key on b is refused on a alone
        # (quarantined for repair), while the rest replicates.
        await b.store.put("typed-wrongly", b"from b")
        await b.store.put("after", b"still replicating")

        async def arrived() -> bool:
            item = await a.store.get("after")
            return item is not None

        await async_wait_until(arrived, timeout=SETTLE_S, message="b's next write on a")
        assert await redis.get(f"{prefix}notes") == b"left by an operator"
        assert await redis.type(a.store.keys.item("typed-wrongly")) == b"string"
