"""Chaos scenarios on real redis-server processes: each test injects one named fault into a
running mesh (or the checker's whole schedule), then checks what the fault must not break.

Every mesh comes from :mod:`harness.chaos`: nodes on real Redis
(appendonly yes, appendfsync always), engines with both paths on, every engine reaching each
peer through its own TCP proxy. The end of most tests is the convergence checker
(:func:`judge`): same Merkle root and versions everywhere, every key at the last-writer-wins
winner of the acknowledged writes, nothing lost, nothing resurrected. Waits are on conditions
with deadlines; the only fixed waits are fault durations (how long a fault lasts is the fault).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from harness.chaos import ChaosMesh, ChaosNode, Workload, open_chaos_mesh
from harness.faults import FAULT_KINDS, MEMBERSHIP_KINDS, run_chaos
from harness.judge import judge, unexplained_drops
from harness.mesh import Unacknowledged, Version, Write, change_order, lww_winner
from replication_engine import codec, knowledge
from replication_engine.clock import physical_ms
from replication_engine.cursor import QUARANTINE_ENTRY_MAX_BYTES, CursorError
from replication_engine.engine import EngineError
from replication_engine.testing import RedisFactory, async_wait_until
from replication_engine.testing.cluster import redis_cli_binary

# Deadline for the mesh to converge once a fault is over.
CONVERGE_S = 60.0
# Deadline for conditions that depend on breakers, backoff and reconnects.
RECOVERY_S = 30.0
# Peer circuit reset in the chaos settings (seconds): a pause must outlast it.
CIRCUIT_RESET_S = 1.0
# Peer op timeout in the chaos settings (seconds).
OP_TIMEOUT_S = 1.0
# Seed of the CI-sized full checker run.
CI_SEED = 20_240_611


# ------------------------------------------------------------------------------------ helpers


async def more_writes(workload: Workload, count: int, *, node: str | None = None) -> None:
    """Wait until ``count`` more writes (by ``node``, or anywhere) are acknowledged."""

    def acknowledged() -> int:
        return sum(1 for w in workload.writes if node is None or w.node == node)

    target = acknowledged() + count
    await async_wait_until(
        lambda: acknowledged() >= target,
        timeout=RECOVERY_S,
        interval=0.02,
        message=f"{count} more writes on {node or 'any node'}",
    )


async def converge_and_judge(mesh: ChaosMesh, workload: Workload) -> None:
    """Stop the workload, wait for convergence and run the checker on every write made."""
    await workload.stop()
    await mesh.wait_converged(CONVERGE_S)
    verdict = judge(mesh.converged_states, workload.writes, workload.unacknowledged)
    problems = verdict.lost + verdict.resurrections + verdict.phantoms + verdict.divergent
    assert verdict.ok, "\n".join(problems[:30])
    assert verdict.acknowledged > 0


async def holds(node: ChaosNode, write: Write) -> bool:
    """The node holds exactly this write's version of its key."""
    version = await node.store.get_version(write.key)
    if version is None:
        return False
    value = None if version.tombstone else version.value
    return (value, version.hlc, version.origin) == write.version


def stream_versions(
    entries: Sequence[tuple[Any, dict[bytes, bytes]]], origin: str
) -> list[tuple[str, int, str]]:
    out = []
    for raw_id, fields in entries:
        change = codec.decode_entry(raw_id, fields, default_origin=origin)
        out.append((change.key, change.hlc, change.origin))
    return out


def workload_rng(seed: int) -> random.Random:
    return random.Random(seed)


def circuit(mesh: ChaosMesh, node: str, peer: str) -> str:
    return mesh[node].running().peers[peer].circuit_state


# ------------------------------------------------------------------------------------ checker


def test_judge_accepts_the_lww_winner_and_a_landed_unacknowledged_write() -> None:
    writes = [
        Write("a", "k", b"1", 10),
        Write("b", "k", b"2", 10),
        Write("a", "d", b"x", 5),
        Write("b", "d", None, 7),
    ]
    landed = Unacknowledged("a", "k", b"3", "ConnectionError")
    states = {n: {"k": (b"3", 11, "a"), "d": (None, 7, "b")} for n in "ab"}
    verdict = judge(states, writes, [landed])
    assert verdict.ok and verdict.unacknowledged_landed == 1
    # Without the landed write the same state must be the tie winner (b beats a at hlc 10).
    states = {n: {"k": (b"2", 10, "b"), "d": (None, 7, "b")} for n in "ab"}
    assert judge(states, writes).ok


def test_judge_reports_loss_resurrection_phantom_and_divergence() -> None:
    writes = [
        Write("a", "k", b"1", 10),
        Write("b", "k", b"2", 12),
        Write("a", "d", b"x", 5),
        Write("b", "d", None, 7),
    ]
    states = {
        "a": {"k": (b"1", 10, "a"), "d": (b"x", 5, "a"), "p": (b"?", 3, "c")},
        "b": {"k": (b"2", 12, "b"), "d": (b"x", 5, "a"), "p": (b"?", 3, "c")},
    }
    verdict = judge(states, writes)
    assert not verdict.ok
    assert [p.split(":")[0] for p in verdict.divergent] == ["k"]
    assert any(p.startswith("d:") for p in verdict.resurrections)
    assert any(p.startswith("k:") for p in verdict.lost)  # node a's view is the reference
    assert any(p.startswith("p:") for p in verdict.phantoms)


def test_judge_lets_a_delete_excused_as_lost_to_an_operator_have_spread() -> None:
    """A write excused as lost to an operator (only its origin held it when the fault was
    prepared) may still have reached a peer before the origin's store lost it. A delete that
    did, and was collected, leaves its key gone everywhere: that is no loss of the older value
    it superseded. An excused delete older than the value excuses nothing."""
    value, delete = Write("e", "k", b"v", 10), Write("a", "k", None, 12)
    excused = [("k", 12, "a")]
    gone: dict[str, dict[str, Version]] = {n: {} for n in "ae"}
    assert judge(gone, [value, delete], lost_to_operator=excused).ok
    kept = {n: {"k": value.version} for n in "ae"}
    assert judge(kept, [value, delete], lost_to_operator=excused).ok
    older = Write("a", "k", None, 8)
    verdict = judge(gone, [value, older], lost_to_operator=[("k", 8, "a")])
    assert [p.split(":")[0] for p in verdict.lost] == ["k"]


def test_an_absence_drop_needs_a_delete_above_it() -> None:
    """A node drops a value by absence only when a peer's claims cover it while the peer lacks
    the key: a delete at or above it was collected there. A drop that no delete explains is a
    claim that went too far, reported even where a later write hides it from the end state."""
    writes = [
        Write("a", "k", b"v", 10),
        Write("b", "k", None, 12),
        Write("a", "j", b"v", 10),
        Write("b", "j", None, 8),
        Write("a", "j", b"w", 20),
    ]
    maybe = [Unacknowledged("c", "m", None, "ConnectionError")]
    drops = {"a": [("k", 10, "a"), ("m", 5, "b")], "b": [("k", 12, "b")], "c": [("j", 10, "a")]}
    assert unexplained_drops(drops, writes, maybe) == [
        "c dropped j@000000000000000a/a, which no delete explains"
    ]
    assert unexplained_drops({"a": [("m", 5, "b")]}, writes) == [
        "a dropped m@0000000000000005/b, which no delete explains"
    ]


def test_the_checker_judges_by_the_packages_order() -> None:
    """One LWW rule for the tests, the store's own: at equal HLC and origin (a wiped store can
    issue a clock twice) a tombstone beats a value, and the greater content hash beats a
    smaller one."""
    value, tomb = Write("a", "k", b"v", 10), Write("a", "k", None, 10)
    assert value.order == knowledge.order(10, "a", False, codec.content_hash(b"v"))
    assert lww_winner([value, tomb])["k"] is tomb
    assert lww_winner([tomb, value])["k"] is tomb
    x, y = Write("a", "j", b"x", 10), Write("a", "j", b"y", 10)
    greater = max((x, y), key=lambda w: codec.content_hash(w.value or b""))
    assert lww_winner([x, y])["j"] is greater and lww_winner([y, x])["j"] is greater
    states = {n: {"k": tomb.version} for n in "ab"}
    assert judge(states, [value, tomb]).ok
    states = {n: {"k": value.version} for n in "ab"}
    assert not judge(states, [value, tomb]).ok


async def test_ci_sized_full_checker_run_with_every_fault_kind(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    report = await run_chaos(
        CI_SEED, tmp_path / "run", redis_factory, nodes=3, duration_s=50.0, converge_timeout_s=90.0
    )
    print(report.render())  # the figures, in the CI log (pytest -rA / on failure)
    assert report.ok, report.render()
    assert set(report.faults_by_kind()) == set(FAULT_KINDS) | set(MEMBERSHIP_KINDS)
    summary = report.summary()
    assert summary["writes_acknowledged"] > 500
    assert summary["writes_lost"] == 0 and summary["resurrections"] == 0
    assert summary["trims_below_cursor"] == summary["trims_with_gap_reported"] > 0
    assert summary["corrupt_entries_injected"] > 0


async def test_ci_sized_checker_run_over_a_large_key_space(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """The checker over 100,000 keys, 30,000 of them written before the faults: a level-1 tree
    node then holds about 90 children (the default 40 keys never fill one), which the apply
    path keeps as a hash table, and with so few writes per key a lost or wrongly dropped
    version is rarely hidden by a later write. Restores and wipes bring back versions whose
    deletes were collected meanwhile, and every value dropped by absence is checked against
    the deletes made."""
    report = await run_chaos(
        CI_SEED,
        tmp_path / "run",
        redis_factory,
        nodes=3,
        duration_s=30.0,
        converge_timeout_s=120.0,
        keys=100_000,
        rate_per_node=100.0,
        preload=30_000,
    )
    print(report.render())
    assert report.ok, report.render()
    summary = report.summary()
    assert summary["keys"] >= 30_000 and summary["writes_acknowledged"] > 30_000
    assert summary["writes_lost"] == 0 and summary["resurrections"] == 0


@pytest.mark.skipif(redis_cli_binary() is None, reason="no redis-cli binary to create a cluster")
async def test_ci_sized_checker_run_with_a_cluster_node(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """The same checker with node a on a Redis Cluster: its Redis kills and pauses are
    failovers of the master holding its data, its writes wait for a replica, so none it
    acknowledged may be lost, and the links to it are cut and blackholed like any other."""
    report = await run_chaos(
        CI_SEED,
        tmp_path / "run",
        redis_factory,
        nodes=3,
        duration_s=30.0,
        converge_timeout_s=90.0,
        cluster_node=True,
    )
    print(report.render())
    assert report.ok, report.render()
    summary = report.summary()
    assert summary["writes_acknowledged"] > 300
    assert summary["writes_lost"] == 0 and summary["resurrections"] == 0
    assert any(f.node == "a" and f.kind in ("redis_kill", "redis_pause") for f in report.faults)
    # Links to the cluster node are cut too: each reader reaches every cluster node through a
    # proxy (its peer entry's cluster_addresses), so no connection slips past the fault.
    assert any(f.other == "a" and f.kind == "link_one_way" for f in report.faults)
    assert any("a" in (f.node, f.other) and f.kind == "partition_cut" for f in report.faults)


async def test_ci_sized_checker_run_with_every_node_in_sixteen_partitions(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """The checker over a mesh whose stores are each 16 partitions: every partition is read,
    anchored, certified, recovered and collected on its own, so a restore, a wipe, a lost
    cursor database or a member joining and leaving must still lose and resurrect nothing,
    and every delete must still be collected. (Trim and corrupt act on one stream and are
    left out.)"""
    kinds = [k for k in FAULT_KINDS if k not in ("trim", "corrupt")]
    report = await run_chaos(
        CI_SEED,
        tmp_path / "run",
        redis_factory,
        nodes=3,
        duration_s=30.0,
        kinds=kinds,
        converge_timeout_s=90.0,
        config={"settings": {"merkle": {"fanout": 16, "depth": 2, "partitions": 16}}},
    )
    print(report.render())
    assert report.ok, report.render()
    summary = report.summary()
    assert summary["writes_acknowledged"] > 300
    assert summary["writes_lost"] == 0 and summary["resurrections"] == 0
    assert {"redis_restore", "redis_wipe", "cursor_loss"} <= set(report.faults_by_kind())


# ------------------------------------------------------------------------------------ node faults


async def test_redis_kill_9_keeps_every_acknowledged_write_and_converges(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_chaos_mesh(redis_factory, tmp_path / "mesh") as mesh:
        workload = Workload(mesh, seed=11, keys=20, rate_per_node=60)
        workload.start()
        await more_writes(workload, 60, node="b")
        mesh.kill_redis("b")
        acknowledged_by_b = [w for w in workload.writes if w.node == "b"]
        failed_before = sum(1 for u in workload.unacknowledged if u.node == "b")
        # The others keep writing while b is down; b's own writes fail and are not acknowledged.
        await more_writes(workload, 80, node="a")
        await async_wait_until(
            lambda: sum(1 for u in workload.unacknowledged if u.node == "b") > failed_before,
            timeout=RECOVERY_S,
            message="a write to b's dead Redis failed",
        )
        await mesh.restart_redis("b")

        # appendfsync always: whatever b acknowledged before the kill survived it.
        restarted = {
            key: await mesh["b"].store.get_version(key)
            for key in {w.key for w in acknowledged_by_b}
        }
        record = await mesh["b"].store.record()
        assert record is not None, "the record survived too"
        for write in acknowledged_by_b:
            held = restarted[write.key]
            if held is None:
                # Deleted (by this write or a newer one) and collected before the kill: the
                # collected horizon, written with the collection, covers it.
                assert record.collected >= write.hlc, write
                continue
            assert change_order(held) >= write.order, write
        await converge_and_judge(mesh, workload)


async def test_engine_killed_mid_stream_resumes_from_its_cursor_and_duplicates_nothing(
    redis_factory: RedisFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="replication_engine")
    async with open_chaos_mesh(redis_factory, tmp_path / "mesh") as mesh:
        b = mesh["b"]
        caplog.clear()  # the first start bootstrapped; the restarts must not
        workload = Workload(mesh, seed=12, keys=20, rate_per_node=60)
        workload.start()
        resumed_from: dict[str, codec.StreamId] = {}
        for _round in range(3):
            await more_writes(workload, 40)
            await mesh.kill_engine("b")
            saved = b.saved_cursors()
            await more_writes(workload, 60, node="a")
            assert b.saved_cursors() == saved, "a dead engine's cursors moved"
            await mesh.start_engine("b")
            resumed_from = saved
        await converge_and_judge(mesh, workload)
        # The new engines started from the cursors on disk, not from a snapshot...
        resumes = [r for r in caplog.records if r.getMessage() == "tailer.resumed_from_cursor"]
        assert len(resumes) >= 3 * 2
        assert not [r for r in caplog.records if "bootstrap" in r.getMessage()]

        # It read only what came after the cursors it resumed from.
        engine = b.running()
        for peer_id, tailer in engine.tailers.items():
            peer_store = mesh[peer_id].store
            after = await peer_store.redis.xrange(
                peer_store.keys.cdc, min=f"({resumed_from[peer_id]}", max="+"
            )
            assert tailer.stats.read <= len(after), peer_id
        # Effectively once: every remote version b applied was appended to its stream once.
        entries = await b.store.redis.xrange(b.store.keys.cdc)
        relayed = [v for v in stream_versions(entries, "b") if v[2] != "b"]
        assert len(relayed) == len(set(relayed)), "b applied a version twice"


async def test_sigstop_of_a_peer_beyond_the_circuit_timeout_opens_then_recloses_breakers(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_chaos_mesh(redis_factory, tmp_path / "mesh") as mesh:
        workload = Workload(mesh, seed=13, keys=20, rate_per_node=40)
        workload.start()
        await more_writes(workload, 60)
        mesh.pause_redis("c")
        paused_at = asyncio.get_running_loop().time()
        try:
            for node in ("a", "b"):
                await async_wait_until(
                    lambda n=node: circuit(mesh, n, "c") == "open",
                    timeout=RECOVERY_S,
                    interval=0.02,
                    message=f"{node}'s breaker for paused c open",
                )
                assert "Timeout" in (mesh[node].running().peers["c"].last_error or "")
            # A hung peer does not hold the others up: a's write reaches b meanwhile.
            probe = await workload.write("a", "probe:pause", b"while c is stopped")
            assert probe is not None
            await async_wait_until(
                lambda: holds(mesh["b"], probe),
                timeout=RECOVERY_S,
                message="a's write on b while c is paused",
            )
            # The fault: stopped for longer than op timeout + circuit reset.
            left = (
                OP_TIMEOUT_S
                + CIRCUIT_RESET_S
                + 1.0
                - (asyncio.get_running_loop().time() - paused_at)
            )
            if left > 0:
                await asyncio.sleep(left)  # sync-ok: the fault lasts this long by design
        finally:
            mesh.resume_redis("c")
        for node in ("a", "b"):
            await async_wait_until(
                lambda n=node: circuit(mesh, n, "c") == "closed",
                timeout=RECOVERY_S,
                interval=0.02,
                message=f"{node}'s breaker for c closed again",
            )
        await converge_and_judge(mesh, workload)


# ------------------------------------------------------------------------------------ network


@pytest.mark.parametrize("how", ["cut", "blackhole"])
async def test_partition_isolating_a_node_then_heal_converges(
    redis_factory: RedisFactory, tmp_path: Path, how: str
) -> None:
    async with open_chaos_mesh(redis_factory, tmp_path / "mesh") as mesh:
        workload = Workload(mesh, seed=14, keys=20, rate_per_node=40)
        workload.start()
        await more_writes(workload, 60)
        mesh.partition("a", "b", how=how)
        mesh.partition("a", "c", how=how)
        island = await workload.write("a", "probe:island", b"written inside the partition")
        mainland = await workload.write("b", "probe:mainland", b"written outside it")
        assert island is not None and mainland is not None
        # b and c still replicate between themselves...
        await async_wait_until(
            lambda: holds(mesh["c"], mainland),
            timeout=RECOVERY_S,
            message="b's write on c during the partition",
        )
        # ...while a is cut off both ways, and knows it.
        for peer in ("b", "c"):
            await async_wait_until(
                lambda p=peer: circuit(mesh, "a", p) == "open",
                timeout=RECOVERY_S,
                interval=0.02,
                message=f"a's breaker for {peer} open",
            )
            error = mesh["a"].running().peers[peer].last_error or ""
            # A cut resets connections; a blackhole only shows as the op timeout expiring.
            expected = "TimeoutError" if how == "blackhole" else "ConnectionError"
            assert expected in error, error
        assert not await holds(mesh["b"], island) and not await holds(mesh["c"], island)
        assert not await holds(mesh["a"], mainland)
        mesh.heal("a", "b")
        mesh.heal("a", "c")
        await async_wait_until(
            lambda: holds(mesh["b"], island),
            timeout=RECOVERY_S,
            message="the island's write on b after healing",
        )
        await converge_and_judge(mesh, workload)


# ------------------------------------------------------------------------------------ streams


async def test_stream_trimmed_below_a_lagging_cursor_counts_a_gap_and_the_cold_path_heals(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_chaos_mesh(redis_factory, tmp_path / "mesh") as mesh:
        workload = Workload(mesh, seed=15, keys=20)
        await workload.burst("a", 5, workload_rng(15))
        await mesh.wait_converged(CONVERGE_S)
        await mesh.stop_engine("b")
        cursors = mesh["b"].saved_cursors()
        burst = [
            w
            for w in [
                await workload.write("a", f"trimmed:{i}", f"v{i}".encode()) for i in range(30)
            ]
            if w is not None
        ]
        assert len(burst) == 30
        # c relays a's writes into its own stream: wait for that, then trim both streams, so
        # the hot path cannot deliver the burst to b from anywhere.
        for write in burst:
            await async_wait_until(lambda w=write: holds(mesh["c"], w), timeout=RECOVERY_S)
        for node in ("a", "c"):
            first = await mesh.trim(node, 2)
            assert first is not None and first > cursors[node].next(), node
        engine = await mesh.start_engine("b")
        for peer in ("a", "c"):
            await async_wait_until(
                lambda p=peer: (
                    (
                        engine.metrics.registry.get_sample_value(
                            "replication_stream_gaps_total", {"peer": p}
                        )
                        or 0
                    )
                    > 0
                ),
                timeout=RECOVERY_S,
                interval=0.02,
                message=f"gap from {peer} counted on b",
            )
            assert engine.status()["peers"][peer]["last_gap_at"] is not None
        await converge_and_judge(mesh, workload)
        repaired = mesh["b"].metric_total("replication_repair_items_applied_total")
        assert repaired >= len(burst) - 4, "the burst did not come through the cold path"


async def test_stream_trimmed_to_empty_below_a_lagging_cursor_counts_a_gap(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_chaos_mesh(
        redis_factory, tmp_path / "mesh", ("a", "b"), topology={"a": [], "b": ["a"]}
    ) as mesh:
        workload = Workload(mesh, seed=16, keys=20)
        await workload.burst("a", 5, workload_rng(16))
        await mesh.wait_converged(CONVERGE_S)
        await mesh.stop_engine("b")
        await workload.burst("a", 20, workload_rng(17))
        assert await mesh.trim("a", 0) is None
        engine = await mesh.start_engine("b")
        await converge_and_judge(mesh, workload)  # healed by the cold path either way
        # The cold path's first cycle can heal b before its tailer's first read: the gap is
        # counted by that read, so wait for it rather than assume it came first.
        await async_wait_until(
            lambda: (
                (
                    engine.metrics.registry.get_sample_value(
                        "replication_stream_gaps_total", {"peer": "a"}
                    )
                    or 0
                )
                > 0
            ),
            timeout=RECOVERY_S,
            message="20 entries past b's cursor were trimmed away and no gap was counted",
        )


# ------------------------------------------------------------------------------------ clocks


async def test_skewed_clocks_order_causally_and_converge_to_the_hlc_winner(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_chaos_mesh(redis_factory, tmp_path / "mesh") as mesh:
        mesh["a"].skew_ms = 2_000
        mesh["b"].skew_ms = -2_000
        workload = Workload(mesh, seed=17, keys=10, rate_per_node=60)
        ahead = await workload.write("a", "probe:skew", b"from a, 2 s ahead")
        assert ahead is not None
        await async_wait_until(
            lambda: holds(mesh["b"], ahead), timeout=RECOVERY_S, message="a's write on b"
        )
        # b's wall clock is 4 s behind a's, yet a write b makes after seeing a's orders after it.
        behind = await workload.write("b", "probe:skew", b"from b, 2 s behind")
        assert behind is not None and behind.hlc > ahead.hlc
        assert physical_ms(behind.hlc) >= physical_ms(ahead.hlc)
        workload.start()
        await more_writes(workload, 300)
        await converge_and_judge(mesh, workload)
        for node in mesh:
            assert await holds(node, behind), node.node_id


# ------------------------------------------------------------------------------------ local store


async def test_local_redis_down_while_peers_write_opens_the_breaker_and_loses_nothing(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_chaos_mesh(redis_factory, tmp_path / "mesh") as mesh:
        a = mesh["a"]
        workload = Workload(mesh, seed=18, keys=20, rate_per_node=40)
        workload.start()
        await more_writes(workload, 60)
        mesh.kill_redis("a")
        await async_wait_until(
            lambda: a.running().status()["local_circuit"] == "open",
            timeout=RECOVERY_S,
            interval=0.02,
            message="a's local-store breaker open",
        )
        held = a.saved_cursors()
        await more_writes(workload, 100, node="b")
        await more_writes(workload, 20, node="c")
        # Nothing could be applied, so no cursor moved.
        assert a.saved_cursors() == held
        assert a.running().state == "running"
        await mesh.restart_redis("a")
        await converge_and_judge(mesh, workload)
        # Each tailer applies on from its cursor once its own retry comes round (the mesh can
        # converge first: relaying, either stream carries both peers' writes).
        await async_wait_until(
            lambda: all(a.saved_cursors()[p] > held[p] for p in ("b", "c")),
            timeout=RECOVERY_S,
            message=f"a's cursors moved past {held}",
        )


# ------------------------------------------------------------------------------------ cursor db


async def test_deleted_cursor_db_resumes_from_the_stores_own_positions_and_skips_nothing(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    # Periodic anti-entropy off: only the tailers can bring the missed writes.
    async with open_chaos_mesh(
        redis_factory, tmp_path / "mesh", settings={"cold_path": {"enabled": False}}
    ) as mesh:
        a = mesh["a"]
        workload = Workload(mesh, seed=19, keys=30, rate_per_node=40)
        workload.start()
        await more_writes(workload, 60)
        await async_wait_until(
            lambda: a.running().status()["membership"]["state"] == "ok",
            timeout=RECOVERY_S,
            message="a serving (not recovering) before its engine stops",
        )
        await mesh.stop_engine("a")
        await more_writes(workload, 100, node="b")
        await more_writes(workload, 50, node="c")
        a.delete_cursor_db()
        engine = await mesh.start_engine("a")
        await converge_and_judge(mesh, workload)
        # The store recorded how far it applied each peer's stream, in the same step as the
        # data: the new engine read on from there, without copying anything.
        # Counted on the restarted engine only: the first one may have recovered at the
        # mesh's start (a new store that could not ask a peer in time does, and copies).
        fetched = sum(
            engine.metrics.registry.get_sample_value(
                "replication_repair_items_fetched_total", {"peer": peer}
            )
            or 0
            for peer in ("b", "c")
        )
        membership = engine.membership
        assert membership is not None
        assert fetched == 0, f"state {membership.state}, reason {membership.reason!r}"
        assert all(t.stats.read > 0 for t in engine.tailers.values())
        assert set(a.saved_cursors()) == {"b", "c"}


async def test_corrupted_cursor_db_fails_start_with_a_cursor_error_naming_the_file(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_chaos_mesh(redis_factory, tmp_path / "mesh", ("a", "b")) as mesh:
        a = mesh["a"]
        await mesh.stop_engine("a")
        a.delete_cursor_db()
        a.cursor_path.write_bytes(b"\x00garbage, not a database\xff" * 400)
        with pytest.raises(EngineError) as raised:
            await mesh.start_engine("a")
        cause = raised.value.__cause__
        assert isinstance(cause, CursorError), repr(cause)
        assert cause.path == str(a.cursor_path)
        assert str(a.cursor_path) in str(raised.value)
        assert "not a readable SQLite database" in str(cause)
        assert a.engines[-1].state == "stopped"
        assert a.cursor_path.read_bytes().startswith(b"\x00garbage"), "the file was replaced"


class _DiskFull:
    """What ``Connection.execute`` returns while the disk is 'full': fails when used."""

    def __init__(self) -> None:
        self.error = sqlite3.OperationalError("database or disk is full")

    async def __aenter__(self) -> Any:
        raise self.error

    async def __aexit__(self, *exc: object) -> None:
        return None

    def __await__(self) -> Iterator[Any]:
        raise self.error
        yield  # a generator, as __await__ must be


async def test_cursor_save_failure_stops_applying_past_it_and_recovers(
    redis_factory: RedisFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_chaos_mesh(redis_factory, tmp_path / "mesh", ("a", "b")) as mesh:
        a = mesh["a"]
        workload = Workload(mesh, seed=20, keys=20)
        await workload.burst("b", 10, workload_rng(20))
        await mesh.wait_converged(CONVERGE_S)
        engine = a.running()
        db = engine.cursors._db  # type: ignore[union-attr]
        real_execute, real_fetchall = db.execute, db.execute_fetchall
        failures = 0

        # The disk is full for a cursor write, whichever of aiosqlite's calls carries it.
        def full_for_cursors(real: Callable[..., Any]) -> Callable[..., Any]:
            def call(sql: str, parameters: Any = None) -> Any:
                nonlocal failures
                if sql.startswith("INSERT INTO cursors"):
                    failures += 1
                    return _DiskFull()
                return real(sql, parameters)

            return call

        before = a.saved_cursor("b")
        monkeypatch.setattr(db, "execute", full_for_cursors(real_execute))
        monkeypatch.setattr(db, "execute_fetchall", full_for_cursors(real_fetchall))
        await workload.burst("b", 30, workload_rng(21))
        await async_wait_until(
            lambda: engine.tailer_restarts.get("tailer:b", 0) >= 2,
            timeout=RECOVERY_S,
            message="a's tailer for b stopped twice",
        )
        error = engine.status()["peers"]["b"]["error"] or ""
        assert "could not be saved" in error and "disk is full" in error, error
        assert failures >= 2
        # The cursor on disk never moved, and no tailer ran ahead of it in memory either.
        assert a.saved_cursor("b") == before
        assert engine.tailers["b"].cursor is None or engine.tailers["b"].cursor <= before
        monkeypatch.setattr(db, "execute", real_execute)
        monkeypatch.setattr(db, "execute_fetchall", real_fetchall)
        await converge_and_judge(mesh, workload)
        tail = await mesh["b"].store.stream_tail()
        await async_wait_until(
            lambda: str(a.saved_cursor("b")) == tail,
            timeout=RECOVERY_S,
            message="a's cursor for b at b's tail after recovery",
        )


# ------------------------------------------------------------------------------------ bad input

MIB = 1024 * 1024


async def test_huge_garbage_entries_are_quarantined_bounded_and_the_engine_carries_on(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_chaos_mesh(redis_factory, tmp_path / "mesh", ("a", "b")) as mesh:
        a = mesh["a"]
        workload = Workload(mesh, seed=22, keys=10)
        huge = b"\xfe" * MIB
        garbage = [
            {"op": b"PUT", "key": b"k:1", "hash": b"0" * 32, "data": huge, "meta": b"{}"},
            {
                "op": b"PUT",
                "key": b"k:2",
                "hash": b"0" * 32,
                "meta": b"{}",
                "data": codec.ZSTD_MAGIC + huge,
            },
            {"op": b"DEL", "key": b"k" * MIB, "meta": b"{}"},
            {"op": b"DEL", "key": b"k:3", "meta": b"{" + b" " * MIB + b"}"},
            {"op": b"X" * MIB, "key": b"k:4"},
            {f"f{i}": b"y" * 1024 for i in range(1024)},  # a thousand 1 KiB fields
        ]
        ids = await mesh.append_corrupt("b", garbage)
        after = await workload.write("b", "after:garbage", b"a good write after the garbage")
        assert after is not None
        await async_wait_until(
            lambda: holds(a, after),
            timeout=RECOVERY_S,
            message="the write after the garbage replicated",
        )
        # The cold path may deliver that write before the tailer gets past the garbage: wait
        # for the tailer itself to have moved its cursor to b's tail.
        raw_tail = await mesh["b"].store.stream_tail()
        assert raw_tail is not None
        tail = codec.parse_stream_id(raw_tail)
        await async_wait_until(
            lambda: (a.saved_cursor("b") or codec.STREAM_START) >= tail,
            timeout=RECOVERY_S,
            message="a's tailer of b past the garbage",
        )
        rows = [r for r in a.quarantined() if r[0] == "b"]
        assert sorted(codec.parse_stream_id(sid) for _, sid, _ in rows) == sorted(ids)
        quarantined = a.metric_total("replication_cdc_events_quarantined_total", peer="b")
        assert quarantined == len(garbage)
        with contextlib.closing(sqlite3.connect(a.cursor_path)) as db:
            sizes = [len(raw) for (raw,) in db.execute("SELECT raw FROM quarantine")]
        assert max(sizes) <= QUARANTINE_ENTRY_MAX_BYTES * 2, sizes
        engine = a.running()
        assert engine.state == "running" and engine.tailer_restarts.get("tailer:b", 0) == 0
        assert engine.status()["peers"]["b"]["events_quarantined"] == len(garbage)
        await converge_and_judge(mesh, workload)


QUARANTINE_BOUND = 1000
GARBAGE_ENTRIES = 10_000


async def test_ten_thousand_quarantined_entries_keep_the_quarantine_bounded(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_chaos_mesh(
        redis_factory,
        tmp_path / "mesh",
        ("a", "b"),
        topology={"a": ["b"], "b": []},
        config={"cursor": {"quarantine_max_rows": QUARANTINE_BOUND}},
    ) as mesh:
        a = mesh["a"]
        store = mesh["b"].store
        async with store.redis.pipeline(transaction=False) as pipe:
            for i in range(GARBAGE_ENTRIES):
                pipe.xadd(
                    store.keys.cdc,
                    {"op": b"NOPE", "key": f"k:{i % 7}".encode(), "n": str(i).encode()},
                )
            ids = [codec.parse_stream_id(raw) for raw in await pipe.execute()]
        engine = a.running()
        tailer_cursor: Callable[[], Any] = lambda: engine.tailers["b"].cursor  # noqa: E731
        await async_wait_until(
            lambda: tailer_cursor() is not None and tailer_cursor() >= ids[-1],
            timeout=120,
            interval=0.1,
            message="a read past 10,000 garbage entries",
        )
        assert engine.cursors is not None
        assert await engine.cursors.quarantine_count() == QUARANTINE_BOUND
        assert engine.cursors.evicted == GARBAGE_ENTRIES - QUARANTINE_BOUND
        kept = sorted(codec.parse_stream_id(sid) for _, sid, _ in a.quarantined())
        assert kept == ids[-QUARANTINE_BOUND:], "the newest rows are the ones kept"
        counted = a.metric_total("replication_cdc_events_quarantined_total", peer="b")
        assert counted == GARBAGE_ENTRIES
        assert engine.state == "running" and engine.tailer_restarts.get("tailer:b", 0) == 0


async def test_quarantine_evictions_are_exported_as_a_metric(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_chaos_mesh(
        redis_factory,
        tmp_path / "mesh",
        ("a", "b"),
        topology={"a": ["b"], "b": []},
        config={"cursor": {"quarantine_max_rows": 1}},
    ) as mesh:
        a = mesh["a"]
        ids = await mesh.append_corrupt("b", [{"op": b"NOPE", "key": b"k"}] * 3)
        engine = a.running()
        await async_wait_until(
            lambda: (engine.tailers["b"].cursor or codec.STREAM_START) >= ids[-1],
            timeout=RECOVERY_S,
        )
        assert engine.cursors is not None and engine.cursors.evicted == 2
        exported = engine.metrics.render().decode()
        evictions = [
            line
            for line in exported.splitlines()
            if "quarantine" in line and "evict" in line and not line.startswith("#")
        ]
        assert evictions and evictions[0].rstrip().endswith(" 2.0"), evictions
