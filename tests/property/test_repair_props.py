"""Anti-entropy converges to last-writer-wins whatever was written and whatever was lost.

Random histories of puts and deletes on 2-4 stores, each write delivered to a random subset of
the other stores (the rest is "lost", as if the hot path never saw it). Running every store's
cold path against all the others until quiet must leave every Merkle root equal and every key
at its LWW winner: the write with the greatest (hlc, origin).

All stores live on one redis-server (one key prefix each), started once for the module and
flushed before each example.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from harness.mesh import Write as Acknowledged
from harness.mesh import lww_winner
from replication_engine.cold_path import ColdPath
from replication_engine.config import ColdPathConfig
from replication_engine.cursor import CursorStore
from replication_engine.observability.metrics import Metrics
from replication_engine.peer import Peer
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisProcess

KEYS = [f"k{i}" for i in range(6)]  # few keys, so writes collide and LWW has work to do
MAX_STORES = 4


@dataclass(frozen=True)
class Write:
    origin: int
    key: str
    value: bytes | None  # None: a delete
    delivered_to: frozenset[int]


writes = st.builds(
    Write,
    origin=st.integers(0, MAX_STORES - 1),
    key=st.sampled_from(KEYS),
    value=st.one_of(st.none(), st.binary(max_size=100)),
    delivered_to=st.frozensets(st.integers(0, MAX_STORES - 1)),
)


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(data_dir=tmp_path_factory.mktemp("repair-props-redis"))
    server.start()
    try:
        yield server
    finally:
        server.kill()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stores=st.integers(2, MAX_STORES), history=st.lists(writes, max_size=30))
def test_repair_converges_to_the_lww_winner_despite_lost_writes(
    shared_redis: RedisProcess, stores: int, history: list[Write]
) -> None:
    asyncio.run(_run_example(shared_redis.url, stores, history))


async def _run_example(url: str, count: int, history: list[Write]) -> None:
    flusher = Redis.from_url(url)
    try:
        await flusher.flushall()  # the previous example's stores
    finally:
        await flusher.aclose()
    stores = [await RedisStore.connect(url, node_id=f"s{i}", prefix=f"s{i}:") for i in range(count)]
    peers: list[Peer] = []
    cursors: list[CursorStore] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            expected = await _write_history(stores, history)
            colds = []
            for i, store in enumerate(stores):
                mine = [
                    Peer(f"s{j}", url, prefix=f"s{j}:", metrics=Metrics())
                    for j in range(count)
                    if j != i
                ]
                peers += mine
                cursor_store = await CursorStore.open(Path(tmp) / f"c{i}.db")
                cursors.append(cursor_store)
                colds.append(ColdPath(store, mine, cursor_store, ColdPathConfig(), Metrics()))

            rounds = 0
            while len({await store.merkle_root() for store in stores}) > 1:
                # One round lets the first store gather every winner and the rest copy it.
                assert rounds < 3, f"roots still differ after {rounds} rounds"
                for cold in colds:
                    stats = await cold.repair_once(force=True)
                    assert all(r.error is None for r in stats.peers.values()), stats
                rounds += 1

            for key, winner in lww_winner(expected).items():
                for store in stores:
                    item = await store.get(key)
                    if winner.value is None:
                        assert item is None, (key, store.node_id)
                    else:
                        assert item is not None and item.value == winner.value, (key, store.node_id)
        finally:
            for peer in peers:
                await peer.close()
            for cursor_store in cursors:
                await cursor_store.close()
            for store in stores:
                await store.close()


async def _write_history(stores: list[RedisStore], history: list[Write]) -> list[Acknowledged]:
    """Apply each write at its origin, then to the stores it was delivered to."""
    expected: list[Acknowledged] = []
    for write in history:
        origin = stores[write.origin % len(stores)]
        if write.value is None:
            hlc = await origin.delete(write.key)
        else:
            hlc = await origin.put(write.key, write.value)
        expected.append(Acknowledged(origin.node_id, write.key, write.value, hlc))
        change = await origin.get_version(write.key)
        assert change is not None and change.hlc == hlc
        for target in write.delivered_to:
            if target < len(stores) and stores[target] is not origin:
                await stores[target].apply_batch([change])
    return expected
