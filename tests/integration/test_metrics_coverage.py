"""Every metric the engine declares moves in some scenario, on real processes.

The metrics are enumerated from a fresh ``Metrics`` registry, not listed by hand, so a metric
added and never set, or set only where no code path reaches, fails here. Each scenario runs
real ``redis-server`` processes and real engines through one condition (a peer down, the local
Redis down, a corrupt entry, a gap, a repair, a bootstrap, a tombstone collected, a recovery,
...), and the registries of its engines are read at the moments that condition holds. A metric
*moved* when one of its samples differs from what a fresh registry holds (absent counts as 0).
The table metric -> scenarios that moved it is printed (``pytest -s``) and is in the failure
message.

Waits are on the metrics themselves, with deadlines: a scenario that cannot make its metric
move fails on that wait, naming it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from harness.chaos import open_chaos_mesh
from harness.mesh import (
    WriteLog,
    append_raw,
    metric,
    open_mesh,
)
from replication_engine import clock, codec
from replication_engine.codec import Change
from replication_engine.engine import ReplicationEngine
from replication_engine.hot_path import Tailer
from replication_engine.observability.metrics import CIRCUIT_STATES, Metrics
from replication_engine.testing import RedisFactory, async_wait_until

# Deadline for one metric to move (breakers, backoff, recoveries on a loaded 2-core machine).
SETTLE_S = 60.0
# Membership ticks (certify, read records, collect, scrub) in these scenarios.
TICK_S = 0.1
# Settings that make deletes by knowledge quick (as in tests/integration/test_deletes.py).
DELETES_SETTINGS: dict[str, Any] = {
    "hot_path": {"relay": False},
    "cold_path": {"interval_sec": 0.5},
    "membership": {"interval_sec": TICK_S},
}
FAST_MEMBERSHIP = {"settings": {"membership": {"interval_sec": TICK_S}}}

# Metrics that no scenario can move, each with the reason. Keep it tiny.
NOT_MOVING = {
    # Constant by design: 1, with the versions as labels, from construction on.
    # tests/unit/test_metrics.py checks its labels.
    "replication_build_info": "constant",
}

Sample = tuple[str, tuple[tuple[str, str], ...]]


# ------------------------------------------------------------------------------------ watch


def exported_name(name: str, kind: str) -> str:
    return name + {"counter": "_total", "info": "_info"}.get(kind, "")


def samples(metrics: Metrics) -> dict[Sample, tuple[str, float]]:
    """Every sample of the engine's own families: (name, labels) -> (family, value).

    ``_created`` samples are left out: a counter's creation time is not a movement.
    """
    out: dict[Sample, tuple[str, float]] = {}
    for family in metrics.registry.collect():
        if not family.name.startswith("replication_"):
            continue  # the process, platform and GC collectors of prometheus_client
        name = exported_name(family.name, family.type)
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = (sample.name, tuple(sorted(sample.labels.items())))
            out[key] = (name, sample.value)
    return out


class MetricWatch:
    """Which declared metrics moved, and in which scenario first."""

    def __init__(self) -> None:
        fresh = Metrics()
        self.declared = sorted(
            exported_name(f.name, f.type)
            for f in fresh.registry.collect()
            if f.name.startswith("replication_")
        )
        self.baseline = {key: value for key, (_, value) in samples(fresh).items()}
        self.moved: dict[str, list[str]] = {}  # metric -> scenarios that moved it, in order
        self.scenario = ""

    def observe(self, engines: Iterable[ReplicationEngine]) -> None:
        for engine in engines:
            for key, (family, value) in samples(engine.metrics).items():
                if value != self.baseline.get(key, 0.0):
                    seen = self.moved.setdefault(family, [])
                    if self.scenario not in seen:
                        seen.append(self.scenario)

    def table(self) -> str:
        width = max(len(name) for name in self.declared)
        rows = [f"{'metric':<{width}}  scenario that moved it first (+ how many others did)"]
        for name in self.declared:
            if name in self.moved:
                first, *others = self.moved[name]
                where = first + (f"  (+{len(others)})" if others else "")
            elif name in NOT_MOVING:
                where = f"not moved, allowed: {NOT_MOVING[name]}"
            else:
                where = "NOT MOVED"
            rows.append(f"{name:<{width}}  {where}")
        return "\n".join(rows)


def engines_of(mesh: Iterable[Any]) -> list[ReplicationEngine]:
    """Every engine each node of a mesh (``Mesh`` or ``ChaosMesh``) has run."""
    return [engine for node in mesh for engine in node.engines]


async def wait_metric(
    engine: ReplicationEngine,
    name: str,
    predicate: Callable[[float], bool],
    **labels: str,
) -> None:
    try:
        await async_wait_until(
            lambda: predicate(metric(engine, name, **labels)),
            timeout=SETTLE_S,
            interval=0.02,
            message=f"{name}{labels or ''} on {engine.node_id}",
        )
    except AssertionError as exc:
        # What the engine was doing when its metric did not move: its repairs, membership
        # and tailers (a failure on a loaded CI machine is otherwise hard to read).
        cycle = engine.cold_path.status()["last_cycle"] if engine.cold_path else None
        status = json.dumps({"last_cycle": cycle, **engine.status()}, indent=1, default=str)
        raise AssertionError(f"{exc}; value {metric(engine, name, **labels)}\n{status}") from None


def positive(value: float) -> bool:
    return value > 0


def is_value(expected: float) -> Callable[[float], bool]:
    return lambda value: value == expected


def assert_circuit_metric_matches_status(engine: ReplicationEngine) -> None:
    state = engine.status()["local_circuit"]
    assert metric(engine, "replication_local_circuit_state") == CIRCUIT_STATES[state], state


def corrupt_entry(key: str, **fields: bytes) -> dict[str, bytes]:
    """A PUT entry from node 'b' with some fields replaced."""
    hlc = clock.pack(clock.wall_clock_ms(), 0)
    entry = codec.encode_entry(Change.put(key, f"value of {key}".encode(), hlc=hlc, origin="b"))
    entry.update(fields)
    return entry


# ------------------------------------------------------------------------------------ scenarios


async def replication_in_a_relaying_mesh(
    watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """Three nodes relaying: echoes, duplicates, SLO breaches (tiny SLOs), a collection."""
    common = {
        "settings": {
            "hot_path": {"relay": True},
            "slo": {"max_batch_flush_latency_ms": 0.001, "max_stream_read_latency_ms": 0.001},
            "membership": {"interval_sec": TICK_S},
        }
    }
    topology = {n: [p for p in "abc" if p != n] for n in "abc"}
    async with open_mesh(redis_factory, tmp_path, topology, common=common) as mesh:
        log = WriteLog()
        for node in "abc":
            for i in range(5):
                await log.put(mesh[node], f"{node}:{i}", b"v")
        await log.delete(mesh["a"], "a:0")
        await mesh.wait_converged()
        a = mesh["a"].running()
        await wait_metric(a, "replication_cdc_echoes_total", positive, peer="b")
        await wait_metric(a, "replication_tombstones_collected_total", positive)
        watch.observe(engines_of(mesh))


async def a_peer_down(watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path) -> None:
    """The peer's Redis is killed: disconnected, stalled, its breaker open."""
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        overrides={"a": {"settings": {"peer_health": {"ping_interval_sec": 0.2}}}},
        peer_options={"a": {"circuit_failure_threshold": 2, "circuit_reset_timeout_sec": 60}},
    ) as mesh:
        a = mesh["a"].running()
        await WriteLog().put(mesh["b"], "k", b"v")
        await mesh.wait_converged()
        mesh["b"].server.kill()
        await wait_metric(a, "replication_peer_circuit_state", is_value(2), peer="b")
        await wait_metric(a, "replication_peer_stalled", is_value(1), peer="b")
        assert a.status()["peers"]["b"]["circuit"] == "open"
        watch.observe(engines_of(mesh))


async def the_local_redis_down(
    watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """The node's own Redis is killed while its peer writes: the local breaker opens, goes
    half-open, the lag grows; the Redis comes back (a restart: the node recovers) and closes it."""
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": ["a"]},
        common=FAST_MEMBERSHIP,
        overrides={
            "a": {"local": {"circuit_failure_threshold": 2, "circuit_reset_timeout_sec": 1.0}}
        },
        redis_options={"a": {"appendonly": True, "appendfsync": "always"}},
    ) as mesh:
        a = mesh["a"].running()
        log = WriteLog()
        for i in range(5):
            await log.put(mesh["b"], f"before:{i}", b"v")
        await mesh.wait_converged()
        mesh["a"].server.kill()
        for i in range(5):
            await log.put(mesh["b"], f"during:{i}", b"v")
        await wait_metric(a, "replication_local_circuit_state", is_value(2))
        assert_circuit_metric_matches_status(a)
        await wait_metric(a, "replication_lag_seconds", positive, peer="b")
        await wait_metric(a, "replication_lag_events", positive, peer="b")
        watch.observe(engines_of(mesh))
        # Half-open once the reset timeout has passed, whether or not a call has tried it.
        await wait_metric(a, "replication_local_circuit_state", is_value(1))
        watch.observe(engines_of(mesh))
        await mesh.restart_redis("a")
        await mesh.wait_converged(timeout=SETTLE_S)
        await wait_metric(a, "replication_local_circuit_state", is_value(0))
        assert_circuit_metric_matches_status(a)
        await wait_metric(a, "replication_recoveries_total", positive)
        watch.observe(engines_of(mesh))


async def corrupt_entries_in_a_peer_stream(
    watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """Undecodable entries are quarantined; a quarantine of one row evicts the older ones."""
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        overrides={"a": {"cursor": {"quarantine_max_rows": 1}}},
    ) as mesh:
        a = mesh["a"].running()
        log = WriteLog()
        await log.put(mesh["b"], "good:0", b"v")
        await append_raw(mesh["b"].store, corrupt_entry("bad:op", op=b"MERGE"))
        wrong = codec.content_hash(b"other").encode()
        await append_raw(mesh["b"].store, corrupt_entry("bad:hash", hash=wrong))
        await append_raw(mesh["b"].store, corrupt_entry("bad:zstd", data=codec.ZSTD_MAGIC + b"x"))
        await log.put(mesh["b"], "good:1", b"v")
        await wait_metric(a, "replication_quarantine_evicted_total", is_value(2))
        for reason in ("unknown_op", "hash_mismatch", "bad_zstd"):
            await wait_metric(
                a, "replication_cdc_events_quarantined_total", is_value(1), peer="b", reason=reason
            )
        watch.observe(engines_of(mesh))


async def repairs_from_a_peer(
    watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """A repair fetches what differs, skips the peer's corrupt items and one stamped beyond
    a's clock offset (which b's wider offset let in); then, with the peer down, a repair
    fails."""
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        overrides={
            "a": {"settings": {"hot_path": {"enabled": False}}},
            "b": {"local": {"max_clock_offset_sec": 86_400}},
        },
        # The breaker stays closed, so the repair tries the dead peer and fails.
        peer_options={"a": {"circuit_failure_threshold": 1000}},
    ) as mesh:
        a = mesh["a"].running()
        b = mesh["b"].store
        log = WriteLog()
        for i in range(20):
            await log.put(mesh["b"], f"k:{i:02d}", b"v")
        await b.redis.hset(b.keys.item("k:00"), "h", "00" * 16)  # hash mismatch
        await b.redis.hset(b.keys.item("k:01"), "d", codec.ZSTD_MAGIC + b"garbage")
        ahead = clock.pack(clock.wall_clock_ms() + 3_600_000, 0)
        await b.apply_batch([Change.put("k:ahead", b"v", hlc=ahead, origin="c")])
        stats = await a.repair_once()
        assert stats.peers["b"].items_corrupt == 2 and stats.peers["b"].items_applied == 18
        assert metric(a, "replication_repair_items_corrupt_total", peer="b") == 2
        assert metric(a, "replication_repair_items_refused_total", peer="b") == 1
        watch.observe(engines_of(mesh))
        mesh["b"].server.kill()
        stats = await a.repair_once()
        assert stats.peers["b"].error is not None
        assert metric(a, "replication_repair_failures_total", peer="b") >= 1
        watch.observe(engines_of(mesh))


async def a_gap(watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path) -> None:
    """The peer's stream is trimmed below the cursor while the node is stopped: a gap, and
    the repair it asks for."""
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        overrides={"b": {"local": {"stream_maxlen": 10}}},
    ) as mesh:
        log = WriteLog()
        for i in range(3):
            await log.put(mesh["b"], f"first:{i}", b"v")
        await mesh.wait_converged()
        await mesh.wait_idle()
        await mesh.stop_engine("a")
        for i in range(300):
            await log.put(mesh["b"], f"late:{i}", b"v")
        a = await mesh.start_engine("a")
        await wait_metric(a, "replication_stream_gaps_total", positive, peer="b")
        await mesh.wait_converged(timeout=SETTLE_S)
        await wait_metric(a, "replication_repair_items_applied_total", positive, peer="b")
        watch.observe(engines_of(mesh))


async def a_bootstrap(watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path) -> None:
    """A new node copies its peer's data before tailing it."""
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        engines=[],
        peer_options={"a": {"start_from": "snapshot"}},
    ) as mesh:
        log = WriteLog()
        for i in range(50):
            await log.put(mesh["b"], f"k:{i}", b"v")
        a = await mesh.start_engine("a")
        await wait_metric(a, "replication_bootstraps_total", is_value(1), peer="b")
        await mesh.wait_converged()
        watch.observe(engines_of(mesh))


async def memory_pressure(watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path) -> None:
    """The local Redis is over its memory limit: applies pause."""
    async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}, engines=[]) as mesh:
        await WriteLog().put(mesh["b"], "k", b"v")
        await mesh["a"].store.redis.config_set("maxmemory", 1)
        a = await mesh.start_engine("a")
        await wait_metric(a, "replication_backpressure_pauses_total", positive)
        watch.observe(engines_of(mesh))
        await mesh["a"].store.redis.config_set("maxmemory", 0)
        await mesh.wait_converged()


async def a_tailer_crash(watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path) -> None:
    """A tailer fails once (an injected error) and is restarted."""
    original = Tailer._decode
    crashed = False

    async def crash_once(self: Tailer, *args: Any) -> Any:
        nonlocal crashed
        if not crashed:
            crashed = True
            raise RuntimeError("injected decode failure")
        return await original(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Tailer, "_decode", crash_once)
        async with open_mesh(redis_factory, tmp_path, {"a": ["b"], "b": []}) as mesh:
            await WriteLog().put(mesh["b"], "k", b"v")
            a = mesh["a"].running()
            await wait_metric(a, "replication_tailer_restarts_total", is_value(1), peer="b")
            await mesh.wait_converged()
            watch.observe(engines_of(mesh))


async def a_tree_node_out_of_step(
    watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """A Merkle tree node edited by hand is found by the scrub and rebuilt."""
    scrub = {"settings": {"membership": {"interval_sec": TICK_S, "scrub_per_tick": 256}}}
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": []}, overrides={"a": scrub}
    ) as mesh:
        store = mesh["a"].store
        for i in range(20):
            await store.put(f"k:{i}", b"v")
        parent = store.keys.node(store.geometry.leaf_path("k:1")[: store.geometry.width])
        child = next(iter(await store.redis.hkeys(parent)))
        await store.redis.hset(parent, child, "0" * 31 + "1")
        await wait_metric(mesh["a"].running(), "replication_tree_repairs_total", positive)
        watch.observe(engines_of(mesh))


async def tombstone_collection_fails(
    watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """The tombstone index made a string by hand: every tick's collection fails, and says so."""
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": ["a"]}, common=FAST_MEMBERSHIP
    ) as mesh:
        store = mesh["a"].store
        await store.redis.delete(store.keys.tombs)
        await store.redis.set(store.keys.tombs, "not a sorted set")
        await wait_metric(
            mesh["a"].running(), "replication_tombstone_collection_failures_total", positive
        )
        watch.observe(engines_of(mesh))


async def a_payload_rots_and_a_stray_key_appears(
    watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """The scrub re-hashes a payload edited by hand, heals it from the peer, and counts a key
    under the prefix that the format does not define."""
    scrub = {"settings": {"scrub": {"interval_sec": TICK_S, "payload_items_per_sec": 100_000}}}
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": ["a"]}, overrides={"a": scrub}
    ) as mesh:
        await mesh["b"].store.put("k", b"v")
        await mesh.wait_converged()
        store = mesh["a"].store
        await store.redis.hset(store.keys.item("k"), "d", b"edited by hand")
        await store.redis.set(f"{store.keys.prefix}notes", "stray")
        engine = mesh["a"].running()
        await wait_metric(engine, "replication_scrub_healed_total", positive)
        await wait_metric(engine, "replication_stray_keys", positive)
        await wait_metric(engine, "replication_scrub_passes_total", positive)
        watch.observe(engines_of(mesh))
        # The unhealed gauge moves when no peer can heal: both copies rotten.
        for node in (mesh["a"], mesh["b"]):
            await node.store.redis.hset(node.store.keys.item("k"), "d", b"rotten")
        await wait_metric(engine, "replication_scrub_unhealed_items", positive)
        watch.observe(engines_of(mesh))


async def collection_held_back_then_forgotten(
    watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """A tombstone is collected; then a member goes away and holds collection back, until an
    operator forgets it."""
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": ["a"]}, common=FAST_MEMBERSHIP
    ) as mesh:
        a = mesh["a"].running()
        log = WriteLog()
        for i in range(5):
            await log.put(mesh["a"], f"k:{i}", b"v")
        await mesh.wait_converged()
        await log.delete(mesh["a"], "k:0")
        await wait_metric(a, "replication_tombstones_collected_total", positive)
        await mesh.stop_engine("b")
        mesh["b"].server.kill()
        await log.delete(mesh["a"], "k:1")
        await wait_metric(a, "replication_tombstones", is_value(1))
        await wait_metric(a, "replication_oldest_tombstone_age_seconds", positive)
        await wait_metric(a, "replication_member_holding_collection_seconds", positive, member="b")
        watch.observe(engines_of(mesh))
        await a.forget("b")
        await wait_metric(a, "replication_forgotten_members", is_value(1))
        await wait_metric(a, "replication_tombstones", is_value(0))
        watch.observe(engines_of(mesh))


async def a_recovery_waiting_for_a_peer(
    watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """The node's Redis restarts empty while its peer is down: it recovers, waiting for that
    peer, and serves again once the peer is back and has given it a complete repair."""
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": ["a"]},
        common=FAST_MEMBERSHIP,
        redis_options={"b": {"appendonly": True, "appendfsync": "always"}},
    ) as mesh:
        a = mesh["a"].running()
        log = WriteLog()
        for node in "ab":
            for i in range(5):
                await log.put(mesh[node], f"{node}:{i}", b"v")
        await mesh.wait_converged()
        mesh["b"].server.kill()
        await mesh.restart_redis("a")  # no persistence: it comes back empty
        await wait_metric(a, "replication_recovering", is_value(1))
        await wait_metric(a, "replication_recovery_pending", is_value(1), peer="b")
        watch.observe(engines_of(mesh))
        await mesh.restart_redis("b")
        await wait_metric(a, "replication_recovering", is_value(0))
        await wait_metric(a, "replication_recovery_pending", is_value(0), peer="b")
        watch.observe(engines_of(mesh))


async def a_restore_brings_back_deleted_values(
    watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """A Redis restored from a backup older than a collection drops the values the mesh
    deleted meanwhile (its peer's claims prove them dead)."""
    async with open_chaos_mesh(
        redis_factory, tmp_path, ("a", "b"), settings=DELETES_SETTINGS
    ) as mesh:
        for i in range(3):
            await mesh["a"].store.put(f"doomed:{i}", b"deleted after the backup")
        await mesh.wait_converged(SETTLE_S)
        await mesh.backup_redis("b", tmp_path / "backup-b")
        for i in range(3):
            await mesh["a"].store.delete(f"doomed:{i}")

        async def collected() -> bool:
            versions = [await n.store.get_version(f"doomed:{i}") for n in mesh for i in range(3)]
            return all(version is None for version in versions)

        await async_wait_until(collected, timeout=SETTLE_S, message="doomed:* collected")
        await mesh.restore_redis("b", tmp_path / "backup-b")
        b = mesh["b"].running()
        await wait_metric(b, "replication_absence_drops_total", is_value(3), peer="a")
        watch.observe(engines_of(mesh))


async def a_written_off_write_brought_back(
    watch: MetricWatch, redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """c's write reaches only a; a is restored from an older backup and c's Redis is wiped, so
    the mesh writes it off; a later restore of a brings it back, and a takes the surviving
    version (the steps of test_deletes.py's written-off scenario)."""
    async with open_chaos_mesh(
        redis_factory, tmp_path, ("a", "b", "c"), settings=DELETES_SETTINGS
    ) as mesh:
        await mesh.backup_redis("a", tmp_path / "before")
        for other in ("a", "c"):
            mesh.partition("b", other)
        await mesh["b"].store.put("k", b"older")
        newer = await mesh["c"].store.put("k", b"newer")

        async def a_holds_newer() -> bool:
            item = await mesh["a"].store.get("k")
            return item is not None and item.value == b"newer"

        async def certified(node_id: str, hlc: int) -> bool:
            record = await mesh[node_id].store.record()
            return record is not None and record.self_claim >= hlc

        await async_wait_until(a_holds_newer, timeout=SETTLE_S, message="newer at a")
        await async_wait_until(
            lambda: certified("c", newer), timeout=SETTLE_S, message="c certified past it"
        )
        await mesh.backup_redis("a", tmp_path / "with-newer")
        for node in ("a", "c"):
            await mesh.stop_engine(node)
        await mesh.restore_redis("a", tmp_path / "before")
        await mesh.wipe_redis("c")
        mesh.heal_all()
        for node in ("a", "c"):
            await mesh.start_engine(node)
        await mesh.wait_converged(SETTLE_S)

        async def written_off_everywhere() -> bool:
            records = [await n.store.record() for n in mesh]
            return all(r is not None and r.claim("c") >= newer for r in records)

        await async_wait_until(written_off_everywhere, timeout=SETTLE_S, message="claims past it")
        await mesh.restore_redis("a", tmp_path / "with-newer")
        # From whichever peer a repairs first: both hold the surviving version.
        await async_wait_until(
            lambda: mesh["a"].metric_total("replication_written_off_total") > 0,
            timeout=SETTLE_S,
            message="replication_written_off_total on a",
        )
        watch.observe(engines_of(mesh))


Scenario = Callable[[MetricWatch, RedisFactory, Path], Awaitable[None]]
SCENARIOS: Mapping[str, Scenario] = {
    "replication in a relaying mesh": replication_in_a_relaying_mesh,
    "a peer down": a_peer_down,
    "the local Redis down": the_local_redis_down,
    "corrupt entries in a peer's stream": corrupt_entries_in_a_peer_stream,
    "repairs from a peer": repairs_from_a_peer,
    "a gap": a_gap,
    "a bootstrap": a_bootstrap,
    "memory pressure": memory_pressure,
    "a tailer crash": a_tailer_crash,
    "a tree node out of step": a_tree_node_out_of_step,
    "tombstone collection fails": tombstone_collection_fails,
    "a payload rots, a stray key appears": a_payload_rots_and_a_stray_key_appears,
    "collection held back, then forgotten": collection_held_back_then_forgotten,
    "a recovery waiting for a peer": a_recovery_waiting_for_a_peer,
    "a restore brings back deleted values": a_restore_brings_back_deleted_values,
    "a written-off write brought back": a_written_off_write_brought_back,
}


# ------------------------------------------------------------------------------------ test


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_every_declared_metric_moves_in_some_scenario(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    watch = MetricWatch()
    unknown = set(NOT_MOVING) - set(watch.declared)
    assert not unknown, f"NOT_MOVING lists metrics that do not exist: {sorted(unknown)}"
    for n, (name, scenario) in enumerate(SCENARIOS.items()):
        watch.scenario = name
        await scenario(watch, redis_factory, tmp_path / f"scenario-{n}")
    table = watch.table()
    print(f"\n{table}")
    dead = [m for m in watch.declared if m not in watch.moved and m not in NOT_MOVING]
    assert not dead, f"metrics no scenario moved: {dead}\n{table}"
    still = sorted(set(NOT_MOVING) & set(watch.moved))
    assert not still, f"allowed not to move, but moved (drop them from NOT_MOVING): {still}"
