"""The hot path against real Redis servers: convergence, exactly-once effect, failures.

Every test runs real ``redis-server`` processes and real engines (see ``mesh.py``). Waits are
on conditions with deadlines; the only fixed-length waits are the CPU measurement windows,
which measure what an idle or blocked engine costs over a given time.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import xxhash
import zstandard
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from harness.mesh import (
    EXACT_STREAM_FACTS,
    Mesh,
    MeshNode,
    WriteLog,
    append_raw,
    cpu_seconds_over,
    expected_snapshot,
    full_mesh,
    lww_winner,
    metric,
    open_mesh,
    raw_entries,
    read_stream,
    snapshot,
    stream_version,
    xread_calls,
)
from harness.proxy import TcpProxy
from replication_engine import clock, codec, hot_path
from replication_engine.codec import STREAM_START, ZSTD_MAGIC, Change, StreamId
from replication_engine.cursor import CursorStore
from replication_engine.engine import ReplicationEngine
from replication_engine.observability.metrics import Metrics
from replication_engine.peer import Peer
from replication_engine.store.layout import Keyspace
from replication_engine.store.protocol import ApplyResult, PreparedApply, StreamBatch
from replication_engine.testing import RedisFactory, async_wait_until, find_redis_server
from replication_engine.testing.redis_proc import redis_server_version

# Mesh nodes re-emit what they apply only when told to (a mesh node's default is off): the
# tests that count relayed entries, echoes or a chain's hops say so.
RELAYING = {"settings": {"hot_path": {"relay": True}}}

# Budget for a whole idle-CPU window: an engine that spins shows up as a full core (~2 s).
IDLE_CPU_BUDGET_S = 0.5
# Length of each CPU measurement window.
CPU_WINDOW_S = 2.0
# Deadline for conditions that depend on breakers, backoff and reconnects.
RECOVERY_TIMEOUT_S = 30.0


# ------------------------------------------------------------------------------------ helpers


async def concurrent_workload(
    mesh: Mesh, log: WriteLog, rng: random.Random, *, rounds: int, keys: int = 15
) -> None:
    """Rounds in which every node writes or deletes the same key at once, plus private keys.

    Each round is one ``asyncio.gather`` across nodes, so the writes race each other and the
    tailers; some nodes also write the shared key twice in the same round.
    """
    nodes = list(mesh)
    shared = [f"shared:{i}" for i in range(keys)]
    for round_no in range(rounds):
        key = rng.choice(shared)
        ops: list[Awaitable[Any]] = []
        for node in nodes:
            for _ in range(rng.choice((1, 1, 2))):
                if rng.random() < 0.3:
                    ops.append(log.delete(node, key))
                else:
                    ops.append(log.put(node, key, f"{node.node_id}:{round_no}".encode()))
            own = f"own:{node.node_id}:{round_no % 5}"
            ops.append(log.put(node, own, rng.randbytes(rng.choice((10, 100, 2000)))))
        await asyncio.gather(*ops)


async def paced_writer(
    node: MeshNode, log: WriteLog, rng: random.Random, stop: asyncio.Event, *, keys: int = 40
) -> None:
    """Writes (10% deletes) on ``node`` until ``stop`` is set."""
    n = 0
    while not stop.is_set():
        key = f"flow:{rng.randrange(keys)}"
        if rng.random() < 0.1:
            await log.delete(node, key)
        else:
            await log.put(node, key, f"{node.node_id}:{n}".encode() * rng.choice((1, 20)))
        n += 1
        # Pacing, not synchronisation: keeps the load near 400 writes/s per writer.
        await asyncio.sleep(0.0025)  # sync-ok


@contextlib.asynccontextmanager
async def writers(nodes: list[MeshNode], log: WriteLog, seed: int) -> AsyncIterator[None]:
    """Run a paced writer per node for the block's duration; they are stopped and awaited."""
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(
            paced_writer(n, log, random.Random(seed + i), stop), name=f"writer[{n.node_id}]"
        )
        for i, n in enumerate(nodes)
    ]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def progressed(engine: ReplicationEngine, batches: int) -> Callable[[], bool]:
    """A predicate: the engine's tailers applied ``batches`` batches between them."""
    return lambda: sum(t.stats.batches for t in engine.tailers.values()) >= batches


async def wait_writes(log: WriteLog, count: int) -> None:
    await async_wait_until(
        lambda: len(log.writes) >= count, timeout=30, message=f"{count} acknowledged writes"
    )


async def saved_cursors(path: Path) -> dict[str, StreamId]:
    """The cursors on disk, read through a fresh connection (the engine's may be closed)."""
    cursors = await CursorStore.open(path)
    try:
        return {peer: codec.parse_stream_id(sid) for peer, sid in (await cursors.all()).items()}
    finally:
        await cursors.close()


async def put_many(
    log: WriteLog, node: MeshNode, keys: list[str], *, concurrency: int = 20
) -> None:
    """Put each key (its own name as the value), ``concurrency`` at a time."""
    for start in range(0, len(keys), concurrency):
        chunk = keys[start : start + concurrency]
        await asyncio.gather(*(log.put(node, k, k.encode()) for k in chunk))


def bad_entry(key: str, **fields: bytes | None) -> dict[str, bytes]:
    """A well-formed PUT entry from node 'b' with some fields replaced (None removes one)."""
    value = f"value of {key}".encode()
    hlc = clock.pack(clock.wall_clock_ms(), 0)
    entry = codec.encode_entry(Change.put(key, value, hlc=hlc, origin="b"))
    for name, replacement in fields.items():
        if replacement is None:
            entry.pop(name, None)
        else:
            entry[name] = replacement
    return entry


def zstd_bomb(inflated: int) -> tuple[bytes, str]:
    """A zstd frame of ``inflated`` zero bytes (a few KiB on the wire) and its true xxh3-128."""
    chunk = bytes(1 << 20)
    out = io.BytesIO()
    digest = xxhash.xxh3_128()
    with zstandard.ZstdCompressor(level=3).stream_writer(
        out, size=inflated, closefd=False
    ) as writer:
        for _ in range(inflated // len(chunk)):
            writer.write(chunk)
            digest.update(chunk)
    return out.getvalue(), digest.hexdigest()


# ------------------------------------------------------------------------------------ convergence


async def test_full_mesh_concurrent_writes_and_deletes_converge_to_lww_winner(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    rng = random.Random(101)
    async with open_mesh(redis_factory, tmp_path, full_mesh(["a", "b", "c"])) as mesh:
        log = WriteLog()
        await concurrent_workload(mesh, log, rng, rounds=60)
        await mesh.wait_converged()

        winners = lww_winner(log.writes)
        expected = expected_snapshot(log.writes)
        assert any(w.value is None for w in winners.values()), "workload has no deleted winner"
        roots = {await node.store.merkle_root() for node in mesh}
        assert len(roots) == 1
        for node in mesh:
            assert await snapshot(node.store) == expected, node.node_id
            for key, winner in winners.items():
                item = await node.store.get(key)
                if winner.value is None:
                    assert item is None, (node.node_id, key)
                else:
                    assert item is not None, (node.node_id, key)
                    assert (item.value, item.hlc, item.origin) == winner.version


async def test_chain_topology_relays_writes_end_to_end(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    chain = {"a": ["b"], "b": ["a", "c"], "c": ["b"]}
    async with open_mesh(redis_factory, tmp_path, chain, common=RELAYING) as mesh:
        assert set(mesh["a"].running().peers) == {"b"}
        assert set(mesh["c"].running().peers) == {"b"}
        log = WriteLog()
        await concurrent_workload(mesh, log, random.Random(202), rounds=40)
        await mesh.wait_converged()

        expected = expected_snapshot(log.writes)
        for node in mesh:
            assert await snapshot(node.store) == expected, node.node_id
        # a's and c's writes reached each other only through b.
        on_c = await snapshot(mesh["c"].store)
        on_a = await snapshot(mesh["a"].store)
        assert any(origin == "a" for _, _, origin in on_c.values())
        assert any(origin == "c" for _, _, origin in on_a.values())


async def test_no_write_applied_twice_and_streams_stop_growing(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory, tmp_path, full_mesh(["a", "b", "c"]), common=RELAYING
    ) as mesh:
        log = WriteLog()
        await concurrent_workload(mesh, log, random.Random(303), rounds=50)
        await mesh.wait_idle()
        await mesh.wait_converged()

        acknowledged = {(w.key, *w.version) for w in log.writes}
        lengths: dict[str, int] = {}
        for node in mesh:
            entries = [change for _, change in await read_stream(node.store)]
            own = [c for c in entries if c.origin == node.node_id]
            relayed = [(c.key, *stream_version(c)) for c in entries if c.origin != node.node_id]
            # Every apply appends exactly one entry to the local stream, every local write one.
            # Applies are the tailers' and, on Redis 6.2, the repair that a tailer's first read
            # asks for (it cannot tell the stream's start from a trim: see below).
            applied = node.total("applied") + sum(
                metric(node.running(), "replication_repair_items_applied_total", peer=p)
                for p in node.peer_ids
            )
            assert len(own) == len(log.by_node(node.node_id)), node.node_id
            assert applied == len(relayed), node.node_id
            assert applied <= len(log.not_by(node.node_id)), node.node_id
            assert len(set(relayed)) == len(relayed), f"{node.node_id} applied a version twice"
            assert set(relayed) <= acknowledged, f"{node.node_id} applied an unknown version"
            lengths[node.node_id] = await node.store.redis.xlen(node.store.keys.cdc)
            assert lengths[node.node_id] == len(own) + applied
            # None in an untrimmed stream. On Redis 6.2, at most one per tailer: at its start,
            # if its first read from the beginning already found entries.
            gaps = 0 if EXACT_STREAM_FACTS else len(node.peer_ids)
            assert node.total("gaps") <= gaps, f"{node.node_id} saw a gap in an untrimmed stream"

        # No replication loop: with everyone idle, further reads add nothing to any stream.
        for node in mesh:
            readers = sum(1 for other in mesh if node.node_id in other.peer_ids)
            await mesh.wait_more_reads(node.node_id, reads=2 * readers)
        assert await mesh.idle()
        for node in mesh:
            assert await node.store.redis.xlen(node.store.keys.cdc) == lengths[node.node_id]


async def test_echoes_counted_in_three_node_mesh(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory, tmp_path, full_mesh(["a", "b", "c"]), common=RELAYING
    ) as mesh:
        log = WriteLog()
        await concurrent_workload(mesh, log, random.Random(404), rounds=30)
        await mesh.wait_idle()

        streams = {node.node_id: await read_stream(node.store) for node in mesh}
        total = 0
        for node in mesh:
            engine = node.running()
            for peer_id, tailer in engine.tailers.items():
                own_in_peer = sum(1 for _, c in streams[peer_id] if c.origin == node.node_id)
                assert tailer.stats.echoes == own_in_peer, (node.node_id, peer_id)
                assert engine.status()["peers"][peer_id]["events_echoes"] == own_in_peer
                assert metric(engine, "replication_cdc_echoes_total", peer=peer_id) == own_in_peer
                assert tailer.stats.read == len(streams[peer_id])
                total += own_in_peer
        assert total > 0


# ------------------------------------------------------------------------------------ restarts


async def test_restarted_engine_resumes_from_its_cursor_and_applies_only_missing_writes(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory, tmp_path, full_mesh(["a", "b", "c"]), common=RELAYING
    ) as mesh:
        c = mesh["c"]
        log = WriteLog()
        await put_many(log, c, [f"c:{i}" for i in range(20)])
        async with writers([mesh["a"], mesh["b"]], log, seed=505):
            await async_wait_until(
                lambda: all(c.stat(p, "applied") >= 30 for p in ("a", "b")),
                timeout=30,
                message="c applied writes from both peers",
            )
            stopped = await mesh.stop_engine("c")  # writes keep flowing on a and b
            saved = await saved_cursors(c.cursor_path)
            assert set(saved) == {"a", "b"}
            for peer_id, cursor in saved.items():
                assert cursor > STREAM_START, peer_id
                assert stopped.tailers[peer_id].cursor == cursor, peer_id
            before = [change for _, change in await read_stream(c.store)]
            written_at_stop = len(log.writes)
            await wait_writes(log, written_at_stop + 150)

        engine = await mesh.start_engine("c")
        await mesh.wait_idle()
        await mesh.wait_converged()

        for peer_id in ("a", "b"):
            peer_stream = await read_stream(mesh[peer_id].store)
            after_cursor = [sid for sid, _ in peer_stream if sid > saved[peer_id]]
            # It read exactly the entries past its cursor: not the stream from the start.
            assert engine.tailers[peer_id].stats.read == len(after_cursor), peer_id
            assert 0 < len(after_cursor) < len(peer_stream), peer_id
        after = [change for _, change in await read_stream(c.store)]
        assert after[: len(before)] == before
        new = [(ch.key, *stream_version(ch)) for ch in after[len(before) :]]
        old = {(ch.key, *stream_version(ch)) for ch in before}
        assert new, "nothing was missing, so the restart proved nothing"
        assert len(set(new)) == len(new), "a version was applied twice"
        assert not set(new) & old, "a version c already had was applied again"
        assert all(origin != "c" for *_, origin in new)
        assert c.total("applied") == len(new)
        assert c.total("gaps") == 0, "resuming inside an untrimmed stream reported a gap"
        assert await snapshot(c.store) == expected_snapshot(log.writes)


async def test_tailers_cancelled_at_random_points_lose_and_duplicate_nothing(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    rng = random.Random(606)
    async with open_mesh(redis_factory, tmp_path, full_mesh(["a", "b", "c"])) as mesh:
        c = mesh["c"]
        log = WriteLog()
        previous: dict[str, StreamId] = {}
        kinds: list[str] = []
        async with writers([mesh["a"], mesh["b"]], log, seed=607):
            for _cycle in range(20):
                engine = c.engine or await mesh.start_engine("c")
                await async_wait_until(
                    progressed(engine, rng.randint(1, 4)),
                    timeout=30,
                    message="c's tailers made progress",
                )
                # A random interleaving point: the cancel lands mid-read, mid-apply or mid-save.
                for _ in range(rng.randint(0, 40)):
                    await asyncio.sleep(0)  # sync-ok
                tailers = [name for name in engine.task_names() if name.startswith("tailer:")]
                kind = rng.choice(("one_tailer", "all_tailers", "shutdown"))
                kinds.append(kind)
                if kind == "shutdown":
                    closing = asyncio.create_task(engine.shutdown())
                    for _ in range(rng.randint(0, 20)):
                        await asyncio.sleep(0)  # sync-ok
                    closing.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await closing
                else:
                    victims = tailers if kind == "all_tailers" else [rng.choice(tailers)]
                    await engine.abort(victims)  # raises if a tailer outlives the cancellations
                    assert not set(victims) & set(engine.task_names())
                await mesh.stop_engine("c")
                assert engine.state == "stopped" and engine.task_names() == []
                saved = await saved_cursors(c.cursor_path)
                for peer_id, cursor in saved.items():
                    assert cursor >= previous.get(peer_id, STREAM_START), "cursor went back"
                previous = saved

        await mesh.start_engine("c")
        await mesh.wait_idle()
        await mesh.wait_converged()
        assert set(kinds) == {"one_tailer", "all_tailers", "shutdown"}
        expected = expected_snapshot(log.writes)
        for node in mesh:
            assert await snapshot(node.store) == expected, node.node_id
        relayed = [(ch.key, *stream_version(ch)) for _, ch in await read_stream(c.store)]
        assert len(set(relayed)) == len(relayed), "c applied a version twice"


# ------------------------------------------------------------------------------------ bad input


async def stop_after_first_writes(mesh: Mesh, log: WriteLog) -> StreamId:
    """Node 'a' applies 5 writes of 'b', then its engine stops; returns a's saved cursor."""
    a, b = mesh["a"], mesh["b"]
    await put_many(log, b, [f"early:{i}" for i in range(5)])
    await async_wait_until(lambda: a.total("applied") == 5, timeout=30)
    await mesh.stop_engine("a")
    return (await saved_cursors(a.cursor_path))["b"]


async def assert_gap_reported(node: MeshNode, peer_id: str) -> None:
    status = node.peer_status(peer_id)
    assert status["events_gaps"] > 0
    assert status["last_gap_at"] is not None
    assert metric(node.running(), "replication_stream_gaps_total", peer=peer_id) > 0
    assert node.running().state == "running"


async def assert_gap_repaired(node: MeshNode, key: str) -> None:
    """The cold path repaired a key the stream lost, though periodic cycles are off."""
    assert not node.running().config.settings.cold_path.enabled

    async def arrived() -> bool:
        return await node.store.get(key) is not None

    await async_wait_until(arrived, timeout=RECOVERY_TIMEOUT_S, message=f"{key} repaired")
    assert metric(node.running(), "replication_repair_items_applied_total", peer="b") > 0


async def test_trimmed_peer_stream_is_reported_as_a_gap(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        overrides={"b": {"local": {"stream_maxlen": 10}}},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        log = WriteLog()
        cursor = await stop_after_first_writes(mesh, log)
        for i in range(500):
            await log.put(b, f"late:{i}", f"value {i}".encode())
        info = await b.store.redis.xinfo_stream(b.store.keys.cdc)
        first = codec.parse_stream_id(info["first-entry"][0])
        assert info["length"] < 500
        assert first > cursor.next(), "nothing after a's cursor was trimmed"

        await mesh.start_engine("a")
        await mesh.wait_idle()
        # What is still in the stream is applied; the gap is reported and the cold path repairs
        # the rest, at once, though its periodic cycles are off here.
        assert await a.store.get("late:499") is not None
        await assert_gap_reported(a, "b")
        await assert_gap_repaired(a, "late:0")


@pytest.mark.skipif(
    not EXACT_STREAM_FACTS,
    reason="Redis < 7 has no max-deleted-entry-id, so an XDEL ahead of a cursor goes unseen",
)
async def test_entries_deleted_from_peer_stream_are_reported_as_a_gap(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}) as mesh:
        a, b = mesh["a"], mesh["b"]
        log = WriteLog()
        await stop_after_first_writes(mesh, log)
        for i in range(20):
            await log.put(b, f"late:{i}", f"value {i}".encode())
        entries = await raw_entries(b.store)
        lost = [raw_id for raw_id, fields in entries if fields[b"key"].startswith(b"late:")][:10]
        assert await b.store.redis.xdel(b.store.keys.cdc, *lost) == 10

        await mesh.start_engine("a")
        await mesh.wait_idle()
        assert await a.store.get("late:19") is not None
        await assert_gap_reported(a, "b")
        await assert_gap_repaired(a, "late:0")


@pytest.mark.parametrize("ids", ["above the cursor", "below the cursor"])
async def test_a_peer_stream_deleted_and_written_again_is_a_gap(
    redis_factory: RedisFactory, tmp_path: Path, ids: str
) -> None:
    # An operator's DEL of the stream (or a restore of it alone): the new stream holds nothing
    # it lost, so only the cursor's own entry being gone, or the stream's ids being below the
    # cursor, says that entries past the cursor were missed.
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}) as mesh:
        a, b = mesh["a"], mesh["b"]
        log = WriteLog()
        cursor = await stop_after_first_writes(mesh, log)
        for i in range(20):
            await log.put(b, f"late:{i}", f"value {i}".encode())
        (_, kept), *_ = await raw_entries(b.store, start=f"({cursor}")
        assert await b.store.redis.delete(b.store.keys.cdc) == 1
        if ids == "above the cursor":
            await log.put(b, "after", b"written to the new stream")
        else:
            await b.store.redis.xadd(b.store.keys.cdc, kept, id="1-1")  # type: ignore[arg-type]
        info = await b.store.redis.xinfo_stream(b.store.keys.cdc)
        assert info["length"] == 1

        await mesh.start_engine("a")
        await mesh.wait_idle()
        await assert_gap_reported(a, "b")
        await assert_gap_repaired(a, "late:0")
        for i in range(20):
            assert await a.store.get(f"late:{i}") is not None, i


async def test_a_trim_between_the_commands_of_one_read_is_seen_as_a_gap(
    redis_factory: RedisFactory,
) -> None:
    """A read's commands can reach the peer's Redis apart (behind a middlebox that re-segments
    the pipeline), with other clients' commands run in between. A trim that runs between them
    is a gap in what the read returns: its entries follow the cursor without a hole, or its
    stream facts say that the stream was trimmed past the cursor. Here the trim runs just after
    the first of the read's two stream commands, whichever that is."""
    server = redis_factory()
    keys = Keyspace("app:")
    direct = Redis.from_url(server.url)
    ids = [codec.parse_stream_id(await direct.xadd(keys.cdc, {"n": i})) for i in range(10)]
    cursor = ids[1]
    trimmed: list[bytes] = []

    async def trim_after_first_stream_command(request: bytes, address: tuple[str, int]) -> None:
        name = request.split(b"\r\n")[2].lower()
        if trimmed or name not in (b"xrange", b"xinfo"):
            return

        async def executed() -> bool:
            for client in await direct.client_list():
                if client["addr"] == f"{address[0]}:{address[1]}":
                    return str(client["cmd"]).startswith(name.decode())
            return False

        await async_wait_until(executed, timeout=10, message=f"{name!r} run by the server")
        await direct.xtrim(keys.cdc, minid=str(ids[5]), approximate=False)  # 4 after the cursor
        trimmed.append(name)

    proxy = TcpProxy(server.host, server.port)
    await proxy.start()
    peer = Peer("b", proxy.url_for(), prefix="app:", metrics=Metrics())
    try:
        proxy.split_requests(0.0, between=trim_after_first_stream_command)
        _record, info, entries = await peer.read_batch(cursor, 3, block_ms=None)
    finally:
        await peer.close()
        await proxy.stop()
        await direct.aclose()
    assert trimmed, "the read sent no stream command through the proxy"
    read = [codec.parse_stream_id(raw_id) for raw_id, _fields in entries]
    assert read == ids[2:5] or info.trimmed_past(cursor), (
        f"the read returned {[str(i) for i in read]} after {cursor} with facts {info} that "
        f"show no gap, though {[str(i) for i in ids[2:5]]} came first (trimmed after "
        f"{trimmed[0]!r})"
    )


async def test_corrupt_entries_are_quarantined_and_good_ones_apply(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    bomb, bomb_hash = zstd_bomb(100 * (1 << 20))
    corrupt = {
        "bad_zstd": bad_entry(
            "bad:zstd",
            data=ZSTD_MAGIC + b"not a zstd frame at all",
            hash=codec.content_hash(b"x" * 100).encode(),
        ),
        "hash_mismatch": bad_entry("bad:hash", hash=codec.content_hash(b"other").encode()),
        "unknown_op": bad_entry("bad:op", op=b"MERGE"),
        "missing_field": bad_entry("bad:fields", hash=None, data=None, meta=None),
        "too_large": bad_entry("bad:bomb", data=bomb, hash=bomb_hash.encode()),
    }
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}) as mesh:
        a, b = mesh["a"], mesh["b"]
        log = WriteLog()
        bad_ids: dict[str, str] = {}
        for i, (reason, fields) in enumerate(corrupt.items()):
            await log.put(b, f"good:{i}", f"good {i}".encode())
            bad_ids[reason] = str(await append_raw(b.store, fields))
        await log.put(b, "good:last", b"after every bad entry")

        await mesh.wait_converged()
        await mesh.wait_idle()
        engine = a.running()
        assert await snapshot(a.store) == expected_snapshot(log.writes)
        for key in ("bad:zstd", "bad:hash", "bad:op", "bad:fields", "bad:bomb"):
            assert await a.store.get(key) is None
        status = a.peer_status("b")
        assert status["events_quarantined"] == len(corrupt)
        assert status["restarts"] == 0 and status["error"] is None
        assert engine.state == "running"
        for reason in corrupt:
            assert (
                metric(engine, "replication_cdc_events_quarantined_total", peer="b", reason=reason)
                == 1
            ), reason
        assert engine.cursors is not None
        records = await engine.cursors.quarantine_list(peer_id="b")
        assert {r.stream_id for r in records} == set(bad_ids.values())
        assert {r.key for r in records} == {
            "bad:zstd",
            "bad:hash",
            "bad:op",
            "bad:fields",
            "bad:bomb",
        }


async def test_poison_entry_at_stream_tail_is_quarantined_once_without_spinning(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}) as mesh:
        a, b = mesh["a"], mesh["b"]
        log = WriteLog()
        await put_many(log, b, [f"k{i}" for i in range(10)])
        poison = bad_entry(
            "poison", data=ZSTD_MAGIC + b"garbage", hash=codec.content_hash(b"p").encode()
        )
        poison_id = await append_raw(b.store, poison)

        await async_wait_until(
            lambda: (
                a.peer_status("b").get("events_quarantined") == 1
                and a.peer_status("b")["cursor"] == str(poison_id)
                and a.peer_status("b")["mode"] == "tailing"
            ),
            timeout=30,
            message="poison quarantined and tailer past it",
        )
        batches = a.peer_status("b")["events_batches"]
        await mesh.wait_more_reads("b", reads=5)

        reads_before = await xread_calls(b.store)
        cpu = await cpu_seconds_over(CPU_WINDOW_S)
        reads = await xread_calls(b.store) - reads_before

        status = a.peer_status("b")
        assert status["events_quarantined"] == 1
        assert status["events_batches"] == batches, "idle reads re-applied something"
        engine = a.running()
        assert engine.cursors is not None
        assert await engine.cursors.quarantine_count() == 1
        # Block reads of 0.2 s: about 10 in 2 s. A loop re-reading the poison would be thousands.
        assert reads <= 4 * CPU_WINDOW_S / 0.2, reads
        assert cpu < IDLE_CPU_BUDGET_S, cpu
        assert await snapshot(a.store) == expected_snapshot(log.writes)


# ------------------------------------------------------------------------------------ peer faults


async def test_peer_killed_opens_breaker_then_recovers_and_catches_up(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        redis_options={"b": {"appendonly": True, "appendfsync": "always"}},
        peer_options={"a": {"circuit_failure_threshold": 2, "circuit_reset_timeout_sec": 2}},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        engine = a.running()
        log = WriteLog()
        await put_many(log, b, [f"before:{i}" for i in range(20)])
        await mesh.wait_converged()

        b.server.kill()
        await async_wait_until(
            lambda: (
                a.peer_status("b")["circuit"] == "open"
                or metric(engine, "replication_peer_circuit_state", peer="b") == 2
            ),
            timeout=RECOVERY_TIMEOUT_S,
            message="breaker open on b",
        )
        assert a.peer_status("b")["connected"] is False
        cpu = await cpu_seconds_over(CPU_WINDOW_S)
        assert cpu < IDLE_CPU_BUDGET_S, cpu

        await mesh.restart_redis("b")
        await put_many(log, b, [f"after:{i}" for i in range(20)])
        await mesh.wait_converged(timeout=RECOVERY_TIMEOUT_S)
        assert await snapshot(a.store) == expected_snapshot(log.writes)
        status = a.peer_status("b")
        assert status["connected"] is True and status["circuit"] == "closed"


async def test_a_peer_redis_restart_is_read_again_within_seconds_not_the_breakers_open_time(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """With the default 30 s breaker, a peer whose Redis is down for a few seconds is read
    again within seconds of its return: the breaker's first openings are short, and only a
    peer that stays down is left alone for the whole reset timeout."""
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        redis_options={"b": {"appendonly": True, "appendfsync": "always"}},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        assert a.config.peers[0].circuit_reset_timeout_sec == 30
        log = WriteLog()
        await put_many(log, b, [f"before:{i}" for i in range(20)])
        await mesh.wait_converged()

        b.server.kill()
        await async_wait_until(
            lambda: a.peer_status("b")["circuit"] == "open",
            timeout=RECOVERY_TIMEOUT_S,
            message="breaker open on b",
        )
        breaker = a.running().peers["b"].breaker
        # The outage goes on until two trials have failed (after about 1 + 2 s).
        await async_wait_until(
            lambda: breaker.reset_timeout >= 4,
            timeout=RECOVERY_TIMEOUT_S,
            message="two failed trials on b",
        )
        assert breaker.reset_timeout <= 8, breaker.reset_timeout
        await mesh.restart_redis("b")
        await put_many(log, b, [f"after:{i}" for i in range(20)])
        # Well inside the 30 s a breaker at its reset timeout would wait.
        await mesh.wait_converged(timeout=20)
        assert await snapshot(a.store) == expected_snapshot(log.writes)
        assert a.peer_status("b")["circuit"] == "closed"


async def test_peer_paused_past_circuit_timeout_then_resumed_recovers(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        # Peer calls time out after 1 s (op timeout = max(1 s, 10 x this SLO)).
        overrides={"a": {"settings": {"slo": {"max_peer_op_latency_ms": 100}}}},
        peer_options={"a": {"circuit_failure_threshold": 2, "circuit_reset_timeout_sec": 1}},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        engine = a.running()
        log = WriteLog()
        await put_many(log, b, [f"before:{i}" for i in range(20)])
        await mesh.wait_converged()

        b.server.pause()
        try:
            await async_wait_until(
                lambda: (
                    a.peer_status("b")["circuit"] == "open"
                    or metric(engine, "replication_peer_circuit_state", peer="b") == 2
                ),
                timeout=RECOVERY_TIMEOUT_S,
                message="breaker open on paused b",
            )
            cpu = await cpu_seconds_over(CPU_WINDOW_S)  # longer than the 1 s circuit timeout
        finally:
            b.server.resume()
        assert cpu < IDLE_CPU_BUDGET_S, cpu
        await put_many(log, b, [f"after:{i}" for i in range(20)])
        await mesh.wait_converged(timeout=RECOVERY_TIMEOUT_S)
        assert await snapshot(a.store) == expected_snapshot(log.writes)
        await async_wait_until(lambda: a.peer_status("b")["circuit"] == "closed", timeout=10)
        assert a.peer_status("b")["connected"] is True


async def test_peer_down_at_start_is_reported_then_caught_up(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        engines=[],
        redis_options={"b": {"appendonly": True, "appendfsync": "always"}},
        # The breaker that opens while b is down retries after this, not the default 30 s:
        # the catch-up, not the breaker's schedule, is under test.
        peer_options={"a": {"circuit_reset_timeout_sec": 1}},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        log = WriteLog()
        await put_many(log, b, [f"before:{i}" for i in range(10)])
        b.server.kill()

        async with asyncio.timeout(10):
            await mesh.start_engine("a")
        await async_wait_until(
            lambda: a.peer_status("b")["last_error"] is not None,
            timeout=10,
            message="a tried b and failed",
        )
        assert a.peer_status("b")["connected"] is False
        assert await snapshot(a.store) == {}

        await mesh.restart_redis("b")
        await put_many(log, b, [f"after:{i}" for i in range(10)])
        await mesh.wait_converged(timeout=RECOVERY_TIMEOUT_S)
        assert await snapshot(a.store) == expected_snapshot(log.writes)
        assert a.peer_status("b")["connected"] is True


async def test_shutdown_while_blocked_in_xread_is_bounded(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        overrides={"a": {"settings": {"hot_path": {"block_timeout_sec": 5}}}},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]

        async def blocked() -> bool:
            clients = await b.store.redis.info("clients")
            tailing = a.peer_status("b").get("mode") == "tailing"
            return tailing and int(clients["blocked_clients"]) >= 1

        await async_wait_until(blocked, timeout=30, message="a blocked in XREAD on b")
        engine = a.running()
        started = time.monotonic()
        await mesh.stop_engine("a")
        elapsed = time.monotonic() - started
        assert elapsed < 3.0, elapsed
        assert engine.state == "stopped"


async def test_keys_with_separators_spaces_unicode_and_shared_prefixes_replicate(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    keys = [
        "a",
        "ab",
        "abc",
        "a:b",
        "a:b:c",
        "a.b",
        "a.b.c",
        "a b",
        " leading",
        "trailing ",
        "tab\there",
        "new\nline",
        "ключ",
        "キー",
        "🔑:emoji",
        "item:a",
        "cdc",
        "mk:root",
        "glob*",
        "glob?",
        "glob[1]",
        "back\\slash",
        "%s{x}",
        "x" * 4096,
    ]
    async with open_mesh(redis_factory, tmp_path, full_mesh(["a", "b", "c"])) as mesh:
        log = WriteLog()
        nodes = list(mesh)
        for i, key in enumerate(keys):
            await log.put(nodes[i % 3], key, f"value of {key!r}".encode())
        await log.delete(nodes[1], "ab")
        await mesh.wait_converged()

        expected = expected_snapshot(log.writes)
        assert "ab" not in expected and len(expected) == len(keys) - 1
        for node in mesh:
            assert await snapshot(node.store) == expected, node.node_id
            for key, (value, _, _) in expected.items():
                item = await node.store.get(key)
                assert item is not None and item.value == value, (node.node_id, key)


# ------------------------------------------------------------------------------------ local faults


async def test_failed_apply_keeps_cursor_and_retries_until_local_store_returns(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        redis_options={"a": {"appendonly": True, "appendfsync": "always"}},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        engine = a.running()
        assert engine.cursors is not None
        log = WriteLog()
        await put_many(log, b, [f"before:{i}" for i in range(10)])
        await mesh.wait_converged()
        await mesh.wait_idle()
        cursor = await engine.cursors.get("b")
        assert cursor is not None

        a.server.kill()
        await put_many(log, b, [f"during:{i}" for i in range(20)])
        await async_wait_until(
            lambda: a.stat("b", "apply_failures") >= 3,
            timeout=RECOVERY_TIMEOUT_S,
            message="apply failing",
        )
        assert await engine.cursors.get("b") == cursor
        assert str(a.tailer("b").cursor) == cursor
        assert a.tailer("b").stats.applied == 10

        await mesh.restart_redis("a")
        await mesh.wait_converged(timeout=RECOVERY_TIMEOUT_S)
        assert await snapshot(a.store) == expected_snapshot(log.writes)
        await mesh.wait_idle()
        assert await engine.cursors.get("b") == await b.store.stream_tail()


@pytest.mark.parametrize("fault", ["local_store_down", "memory_pressure"])
async def test_shutdown_with_an_unappliable_batch_does_not_spin(
    redis_factory: RedisFactory, tmp_path: Path, fault: str
) -> None:
    drain_s = 2.0
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        engines=[],
        overrides={"a": {"settings": {"hot_path": {"shutdown_timeout_sec": drain_s}}}},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        log = WriteLog()
        await put_many(log, b, [f"k{i}" for i in range(10)])
        counter = "apply_failures" if fault == "local_store_down" else "backpressure_pauses"
        if fault == "local_store_down":
            a.server.kill()
        else:
            await a.store.redis.config_set("maxmemory", 1)
        await mesh.start_engine("a")
        await async_wait_until(
            lambda: a.stat("b", counter) >= 2,
            timeout=RECOVERY_TIMEOUT_S,
            message=f"batch held back by {fault}",
        )
        tailer = a.tailer("b")
        attempts_before = getattr(tailer.stats, counter)

        cpu_started, started = time.process_time(), time.monotonic()
        await mesh.stop_engine("a")
        cpu = time.process_time() - cpu_started
        elapsed = time.monotonic() - started

        assert tailer.cursor == STREAM_START, "cursor advanced past an unapplied batch"
        attempts = getattr(tailer.stats, counter) - attempts_before
        # Backoff (or giving up at once: the batch is re-read next start) allows a handful.
        assert attempts <= 20, attempts
        assert cpu < IDLE_CPU_BUDGET_S * max(1.0, elapsed / CPU_WINDOW_S), (cpu, elapsed)


async def test_batch_of_highly_compressible_entries_is_not_held_inflated(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    inflated, entries = 48 * (1 << 20), 8
    frame, digest = zstd_bomb(inflated)
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}, engines=[]) as mesh:
        a, b = mesh["a"], mesh["b"]
        for i in range(entries):
            fields = bad_entry(f"big:{i}", data=frame, hash=digest.encode())
            await append_raw(b.store, fields)
        tracemalloc.start()
        try:
            await mesh.start_engine("a")
            await async_wait_until(
                lambda: a.total("applied") == entries, timeout=60, message="large entries applied"
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert a.peer_status("b")["events_quarantined"] == 0
        # Verifying one entry at a time needs about two copies of one payload.
        assert peak < 4 * inflated, f"peak {peak / (1 << 20):.0f} MiB for {entries} entries"


@pytest.mark.skipif(
    not EXACT_STREAM_FACTS,
    reason="Redis 6.2 cannot tell a stream's start from a trim (no entries-added): a tailer's "
    "first read from the beginning reports a gap and the cold path copies the backlog, which "
    "the hot path's rate limit does not pace",
)
async def test_rate_limit_spreads_applies_over_time(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    limited = {
        "settings": {
            "hot_path": {
                "rate_limit_enabled": True,
                "rate_limit_per_sec": 200,
                "rate_limit_burst": 50,
            }
        }
    }
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "c": ["b"], "b": []},
        overrides={"a": limited},
        engines=[],
    ) as mesh:
        log = WriteLog()
        await put_many(log, mesh["b"], [f"k{i}" for i in range(400)])

        async def time_to_apply(node_id: str) -> float:
            started = time.monotonic()
            await mesh.start_engine(node_id)
            await async_wait_until(
                lambda: mesh[node_id].total("applied") == 400,
                timeout=30,
                interval=0.02,
                message=f"{node_id} applied 400 events",
            )
            return time.monotonic() - started

        limited_s, unlimited_s = await asyncio.gather(time_to_apply("a"), time_to_apply("c"))
        # 50 events of burst, then 350 at 200/s: at least 1.75 s.
        assert limited_s >= 1.5, limited_s
        assert unlimited_s < limited_s, (unlimited_s, limited_s)
        await mesh.wait_converged()


async def test_reads_at_the_head_are_spaced_by_the_min_read_interval(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """A steady trickle of writes is applied in one batch per interval, not one per write."""
    interval = 0.25
    spaced = {"settings": {"hot_path": {"min_read_interval_sec": interval}}}
    eager = {"settings": {"hot_path": {"min_read_interval_sec": 0}}}
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "c": ["b"], "b": []},
        overrides={"a": spaced, "c": eager},
    ) as mesh:

        def tailing() -> bool:
            found = [mesh[n].running().tailers.get("b") for n in ("a", "c")]
            return all(t is not None and t.mode == "tailing" for t in found)

        await async_wait_until(
            tailing, timeout=RECOVERY_TIMEOUT_S, message="both tailers at the head of b's stream"
        )
        tailers = {n: mesh[n].running().tailers["b"] for n in ("a", "c")}
        before = {n: t.stats.batches for n, t in tailers.items()}
        started = time.monotonic()
        writes = 60
        for i in range(writes):
            await mesh["b"].store.put(f"trickle:{i}", b"v")
            await asyncio.sleep(0.01)  # sync-ok: the workload is a steady trickle
        # Applied, or found already there: on Redis 6.2 (no entries-added count) a stream that
        # did not exist when a tailer started reads as a possible gap at its first entry, and
        # the repair that asks for can copy some of the trickle before the tailer applies it.
        await async_wait_until(
            lambda: all(
                mesh[n].total("applied") + mesh[n].total("deduped") >= writes for n in tailers
            ),
            timeout=RECOVERY_TIMEOUT_S,
            message="both nodes read and applied the trickle",
        )
        elapsed = time.monotonic() - started
        batches = {n: t.stats.batches - before[n] for n, t in tailers.items()}
        assert batches["a"] <= elapsed / interval + 2, (batches, elapsed)
        assert batches["c"] > batches["a"], batches
        await mesh.wait_converged()


async def test_a_read_at_the_head_waits_only_when_the_stream_is_quiet(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """While a stream grows steadily, a read at the head goes straight to the batch; while it is
    quiet, each read first blocks until an entry arrives (no empty reads in a loop)."""
    interval = 0.05
    spaced = {"settings": {"hot_path": {"min_read_interval_sec": interval}}}
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": []}, overrides={"a": spaced}
    ) as mesh:
        await async_wait_until(
            lambda: mesh["a"].running().tailers["b"].mode == "tailing",
            timeout=RECOVERY_TIMEOUT_S,
            message="a's tailer at the head of b's stream",
        )
        peer = mesh["b"].store.redis

        async def reads() -> tuple[int, int]:
            """(blocking waits, batch reads) b's Redis has answered so far."""
            stats = await peer.info("commandstats")
            return (
                stats.get("cmdstat_xread", {}).get("calls", 0),
                stats.get("cmdstat_xrange", {}).get("calls", 0),
            )

        async def write_and_wait(count: int, gap: float, tag: str) -> tuple[int, int]:
            before = await reads()
            applied = mesh["a"].total("applied")
            for i in range(count):
                await mesh["b"].store.put(f"{tag}:{i}", b"v")
                await asyncio.sleep(gap)  # sync-ok: the workload is a paced series of writes
            await async_wait_until(
                lambda: mesh["a"].total("applied") >= applied + count,
                timeout=RECOVERY_TIMEOUT_S,
                message=f"a applied the {tag} writes",
            )
            after = await reads()
            return after[0] - before[0], after[1] - before[1]

        # Quiet: a write every 0.3 s, six intervals apart. Each read waits for its entry.
        waits, batches = await write_and_wait(8, 0.3, "quiet")
        assert batches >= 8 and waits >= batches - 1, (waits, batches)

        # Steady: 200 writes/s, 10 per interval. Reads go straight to the batch.
        waits, batches = await write_and_wait(300, 0.005, "steady")
        assert batches >= 10 and waits <= batches // 3, (waits, batches)
        await mesh.wait_converged()


async def test_backpressure_pauses_applies_until_memory_is_available(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}, engines=[]) as mesh:
        a, b = mesh["a"], mesh["b"]
        log = WriteLog()
        await put_many(log, b, [f"k{i}" for i in range(50)])
        await a.store.redis.config_set("maxmemory", 1)
        assert await a.store.should_accept_writes() is False

        engine = await mesh.start_engine("a")
        await async_wait_until(
            lambda: (
                a.peer_status("b").get("mode") == "backpressure"
                and a.peer_status("b")["events_backpressure_pauses"] >= 2
            ),
            timeout=30,
            message="tailer paused for memory",
        )
        assert a.peer_status("b")["events_applied"] == 0
        assert metric(engine, "replication_backpressure_pauses_total") >= 2
        assert await snapshot(a.store) == {}
        assert engine.cursors is not None
        assert await engine.cursors.get("b") is None

        await a.store.redis.config_set("maxmemory", 0)
        await mesh.wait_converged()
        assert await snapshot(a.store) == expected_snapshot(log.writes)
        await mesh.wait_idle()


async def test_a_node_upgraded_to_the_relay_default_keeps_the_mesh_converging(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """A mesh that relayed (the default before relay followed the role) upgrades one node to
    the new default while every node writes: that node's stream starts a new epoch, its peers
    re-anchor, and nothing written is lost or applied twice."""
    async with open_mesh(
        redis_factory, tmp_path, full_mesh(["a", "b", "c"]), common=RELAYING
    ) as mesh:
        a = mesh["a"]
        log = WriteLog()
        async with writers([mesh["a"], mesh["b"], mesh["c"]], log, seed=808):
            await wait_writes(log, 150)
            await mesh.stop_engine("a")
            before = await a.store.record()
            hot_path = a.config.settings.hot_path.model_copy(update={"relay": None})
            settings = a.config.settings.model_copy(update={"hot_path": hot_path})
            a.config = a.config.model_copy(update={"settings": settings})
            assert a.config.relay is False
            restarted_at = await a.store.redis.xlen(a.store.keys.cdc)
            await mesh.start_engine("a")
            await wait_writes(log, len(log.writes) + 150)
        await mesh.wait_idle()
        await mesh.wait_converged()
        after = await a.store.record()
        assert before is not None and after is not None
        assert (before.relay, after.relay) == (True, False)
        assert after.epoch != before.epoch, "a relay change starts a new epoch of the stream"
        for node in mesh:
            assert await snapshot(node.store) == expected_snapshot(log.writes), node.node_id
        # a re-emits nothing now: since the restart its stream holds only its own writes.
        since = [change for _, change in await read_stream(a.store)][restarted_at:]
        assert since and all(change.origin == "a" for change in since)


# ------------------------------------------------------------------------------------ cursor saves


def a_reads_b_in_batches_of_25(
    redis_factory: RedisFactory, tmp_path: Path
) -> contextlib.AbstractAsyncContextManager[Mesh[MeshNode]]:
    """Node a tailing b in batches of exactly 25, no engine started yet."""
    fixed = {"batch_size": 25, "min_batch_size": 25, "max_batch_size": 25}
    return open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        engines=[],
        common={"settings": {"hot_path": {**fixed, "adaptive_batch_size": False}}},
    )


async def test_claims_read_with_a_batch_wait_for_the_refusals_of_the_batch_before_it(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """A batch's claims are decided when it is read and decoded, which can be while the batch
    before it is still being applied; that apply may refuse an entry (here its key holds a
    string). The refused write waits for its repair, and until then the store claims nothing
    that covers it: not even through a batch read before the refusal was known."""
    async with a_reads_b_in_batches_of_25(redis_factory, tmp_path) as mesh:
        a, b = mesh["a"], mesh["b"]
        # b's record, and its claim to every write in its stream, as its engine would make them.
        await b.store.open_record(mode="mesh", relay=False)
        writes = [(f"before:{i}", b"v", "text/plain") for i in range(10)]
        writes += [("blocked", b"v", "text/plain")]
        writes += [(f"after:{i}", b"v", "text/plain") for i in range(29)]  # 40 in a few batches
        hlcs = await b.store.put_many(writes)
        await b.store.certify(
            expected_run="", expected_nonces=[], nonce="n", advance=True, state="ok"
        )
        await a.store.redis.set(a.store.keys.item("blocked"), "not a hash")
        await mesh.start_engine("a")
        await mesh.wait_idle()
        tailer = a.tailer("b")
        if redis_server_version(find_redis_server())[0] < 7:
            # Redis 6.2 takes a read from a stream's start for a gap (no entries-added count):
            # the repair it asks for may apply some writes before the tailer reads them, which
            # the tailer then finds applied already.
            assert tailer.stats.applied + tailer.stats.deduped == 39, tailer.stats
        else:
            assert tailer.stats.applied == 39, tailer.stats
        assert tailer.stats.refused == 1, tailer.stats
        record = await a.store.record()
        assert record is not None
        assert record.claim("b") < hlcs[10], "a claims b's write it refused"


async def test_a_batch_sent_behind_one_that_fails_waits_its_turn_and_the_anchor_stays_set(
    redis_factory: RedisFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While catching up, a batch's apply goes out while the one before it is still being
    applied. Here that one fails (held until the next one was answered, then lost as a dropped
    connection loses it). The next one must not land ahead of it: it is answered out of turn
    and sent again once the failed one is applied, and every apply that lands leaves the store
    anchored in the peer's stream, so no repair is needed to take the peer's claims. Only that
    one batch goes out of turn: the next waits for it instead of being sent ahead of its resend
    (which made every later batch of the catch-up go out of turn once, and be sent twice)."""
    async with a_reads_b_in_batches_of_25(redis_factory, tmp_path) as mesh:
        a, b = mesh["a"], mesh["b"]
        await b.store.open_record(mode="mesh", relay=False)
        await b.store.put_many([(f"k:{i:03d}", b"v%d" % i, "text/plain") for i in range(100)])
        apply = a.store.apply_prepared
        seen: list[tuple[str, bool, bool | None]] = []  # (mode, out of turn, anchored after)
        held = asyncio.Event()
        answered = asyncio.Event()

        async def first_held_then_lost(
            prepared: PreparedApply, source: StreamBatch | None = None
        ) -> ApplyResult:
            if source is not None and not held.is_set():
                held.set()
                # The first batch: its read was full, so the next one is read, decoded and
                # sent meanwhile. Once that one is answered, this one is lost, unapplied.
                await asyncio.wait_for(answered.wait(), RECOVERY_TIMEOUT_S)
                raise RedisConnectionError("injected: the apply was lost with its connection")
            result = await apply(prepared, source)
            if source is not None:  # the tailer's, not a repair's
                seen.append((source.mode, result.out_of_turn, result.anchored))
                if source.mode == "n":
                    answered.set()
            return result

        monkeypatch.setattr(a.store, "apply_prepared", first_held_then_lost)
        await mesh.start_engine("a")
        await mesh.wait_idle()
        tailer = a.tailer("b")
        assert seen[0] == ("n", True, None), f"the batch behind the held one: {seen}"
        assert tailer.stats.apply_failures == 1, tailer.stats
        assert a.peer_status("b")["events_out_of_turn"] == 1, seen  # as status shows it
        assert await snapshot(a.store) == await snapshot(b.store)
        if redis_server_version(find_redis_server())[0] < 7:
            # Redis 6.2 has no entries-added count, so a read from a stream's start is taken
            # for a gap (StreamInfo.trimmed_past) and nothing is anchored before a repair: only
            # the order of the applies can be checked there, and the repair the gap asks for
            # may apply some writes before the tailer reads them (it then finds them applied).
            assert tailer.stats.applied + tailer.stats.deduped == 100, tailer.stats
            return
        assert tailer.stats.applied == 100, tailer.stats
        assert all(anchored for _, out_of_turn, anchored in seen if not out_of_turn), seen
        record = await a.store.record()
        assert record is not None and record.anchors["b"].anchored


async def test_a_busy_stream_saves_its_cursor_once_a_second_and_a_pause_saves_it_by_then(
    redis_factory: RedisFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the head of a stream that grows by more than an entry per read interval, the cursor
    is saved at most about once per CURSOR_SAVE_EVERY_SEC, never past what is applied; when the
    stream pauses, the save is due by then, not when the blocking read (10 s here) gives up;
    a stop saves what was applied."""
    saves: list[tuple[float, StreamId, StreamId | None]] = []
    watched: list[Any] = []  # a's tailer of b, once it runs
    original = CursorStore.save

    async def counting(self: CursorStore, peer_id: str, stream_id: str) -> None:
        applied = watched[0].cursor if watched else None
        saves.append((time.monotonic(), codec.parse_stream_id(stream_id), applied))
        await original(self, peer_id, stream_id)

    monkeypatch.setattr(CursorStore, "save", counting)
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        common={"settings": {"hot_path": {"block_timeout_sec": 10.0}}},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        log = WriteLog()
        await put_many(log, b, ["warm-up"])
        await mesh.wait_idle()
        tailer = a.tailer("b")
        watched.append(tailer)
        batches, started = tailer.stats.batches, time.monotonic()
        deadline = started + 3.0
        rounds = 0
        while time.monotonic() < deadline:  # ~400 writes/s: 8 per 20 ms read interval
            await put_many(log, b, [f"busy:{rounds}:{i}" for i in range(8)], concurrency=8)
            rounds += 1
            await asyncio.sleep(0.02)  # sync-ok: load pacing
        # The stream's rate is known after a window or two of reads (0.2 s each); from then
        # on the busy stream is saved about once a second.
        settled = started + 0.5
        busy_saves = [t for t, _, _ in saves if t >= settled]
        busy_batches = tailer.stats.batches - batches
        assert busy_batches >= 60, f"only {busy_batches} batches: the stream was not busy"
        spread = time.monotonic() - settled
        assert len(busy_saves) <= spread / hot_path.CURSOR_SAVE_EVERY_SEC + 1, busy_saves
        assert all(saved <= applied for _, saved, applied in saves if applied is not None)

        paused = time.monotonic()
        tail = await b.store.stream_tail()
        await async_wait_until(
            lambda: str(a.saved_cursor("b")) == tail,
            timeout=hot_path.CURSOR_SAVE_EVERY_SEC + 2.0,
            message="the cursor saved after the stream paused",
        )
        assert time.monotonic() - paused < 10.0
        await put_many(log, b, ["last"])
        await mesh.wait_idle()
        applied = tailer.cursor
        await mesh.stop_engine("a")
        assert a.saved_cursor("b") == applied
