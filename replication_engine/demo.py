"""`replication-engine demo`: a local mesh that converges before your eyes.

Starts real redis-server processes, a store and an engine per node, drives conflicting writes
and deletes on every node, injects faults (a Redis killed with -9 and restarted; a stream trimmed
so the hot path misses entries) and shows the cold path healing what the hot path missed. With
``cluster``, the first node's store is a Redis Cluster of three masters with a replica each,
every store is laid out in 16 partitions (so that node's data spreads over the masters), and the
first fault kills the master that holds partition 0: the cluster promotes its replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from replication_engine.config import EngineConfig
from replication_engine.engine import ReplicationEngine
from replication_engine.store.layout import text
from replication_engine.store.partitioned import PartitionedStore
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import awaiting_frames
from replication_engine.testing.cluster import (
    Cluster,
    redis_cli_binary,
    slot_owner,
    start_cluster,
)
from replication_engine.testing.redis_proc import RedisHandle, RedisProcess

PREFIX = "demo:"
# Seconds past --duration after which a demo that has not finished is stuck (a bug): set-up,
# a cluster failover (up to 30 s), the trimmed-stream fault (up to 10 s) and the convergence
# wait (60 s) fit well inside it.
STUCK_AFTER_SEC = 150.0
# The layout of every store when one node is a cluster: 16 partitions, 4096 leaf buckets.
SPLIT: dict[str, Any] = {"fanout": 16, "depth": 3, "partitions": 16}


@dataclass
class Node:
    node_id: str
    redis: RedisHandle  # a cluster node's: the cluster's seed
    cursor_path: Path
    config: EngineConfig
    store: RedisStore | PartitionedStore | None = None
    engine: ReplicationEngine | None = None
    writes: int = 0
    failed_writes: int = 0


@dataclass
class DemoResult:
    converged: bool
    nodes: int
    writes: int
    failed_writes: int
    replicated: int
    repaired: int
    gaps: int
    quarantined: int
    lag_steady_p50_ms: float | None
    lag_steady_p99_ms: float | None
    lag_all_p99_ms: float | None
    converge_sec: float | None
    events: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


class Demo:
    def __init__(
        self,
        *,
        nodes: int,
        duration: float,
        rate: float,
        keys: int,
        faults: bool,
        out: TextIO,
        seed: int,
        workdir: Path,
        cluster: bool = False,
    ) -> None:
        if nodes < 2:
            raise ValueError("the demo needs at least 2 nodes")
        if cluster and redis_cli_binary() is None:
            raise ValueError("--cluster needs redis-cli (beside redis-server or on PATH)")
        self.cluster: Cluster | None = None
        self.with_cluster = cluster
        self._servers: list[RedisProcess] = []  # every server started, for the teardown
        self.n = nodes
        self.duration = duration
        self.rate = rate
        self.keys = keys
        self.faults = faults
        self.out = out
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.nodes: list[Node] = []
        self.events: list[str] = []
        self.started = time.monotonic()
        self.first_fault_at: float | None = None
        self.last_fault_at: float | None = None
        self._stop_writes = asyncio.Event()
        self._tty = out.isatty()

    # ------------------------------------------------------------------------ set-up

    def _config(self, i: int) -> EngineConfig:
        me = self.nodes[i]
        return EngineConfig.model_validate(
            {
                "local_node_id": me.node_id,
                "local": {
                    "redis_url": me.redis.url,
                    "prefix": PREFIX,
                    "cluster": self._clustered(me),
                },
                "settings": {
                    # With a cluster node every store is in 16 partitions, so that node's data
                    # spreads over the cluster's three masters (a mesh uses one layout).
                    "merkle": SPLIT if self.with_cluster else {},
                    "hot_path": {
                        "block_timeout_sec": "500ms",
                        "batch_size": 100,
                        "min_batch_size": 10,
                        "max_batch_size": 1000,
                        "shutdown_timeout_sec": "5s",
                        # A mesh node's default is off; on here because each node's stream then
                        # records when it applied every write, which is how the demo measures lag.
                        "relay": True,
                    },
                    "cold_path": {
                        "interval_sec": 2,
                        "max_items_per_cycle": 5000,
                        "backoff_base_sec": 0.5,
                        "backoff_max_sec": 4,
                    },
                    "peer_health": {"ping_interval_sec": 1, "idle_threshold_sec": 2},
                },
                "peers": [
                    {
                        "node_id": other.node_id,
                        "redis_url": other.redis.url,
                        "cluster": self._clustered(other),
                        "start_from": "beginning",
                        "circuit_failure_threshold": 3,
                        "circuit_reset_timeout_sec": 1,
                    }
                    for other in self.nodes
                    if other is not me
                ],
                "cursor": {"sqlite_path": str(me.cursor_path)},
                "http": {"enabled": False},
            }
        )

    def _clustered(self, node: Node) -> bool:
        return self.cluster is not None and node is self.nodes[0]

    def _server(self, data_dir: Path, **options: Any) -> RedisProcess:
        """A started redis-server with an AOF fsynced at every write, killed at teardown."""
        server = RedisProcess(data_dir=data_dir, appendonly=True, appendfsync="always", **options)
        self._servers.append(server)  # before start, so a half-started server is killed too
        server.start()
        return server

    def _start_cluster(self, data: Path) -> Cluster:
        made = itertools.count()

        def make(**options: Any) -> RedisHandle:
            return self._server(data / f"cluster-{next(made)}", **options)

        return start_cluster(make, masters=3, replicas=1)

    async def setup(self) -> None:
        for i in range(self.n):
            data = self.workdir / f"node-{i}"
            data.mkdir(parents=True, exist_ok=True)
            redis: RedisHandle
            if i == 0 and self.with_cluster:
                self.cluster = await asyncio.to_thread(self._start_cluster, data)
                redis = self.cluster.seed
            else:
                redis = self._server(data / "redis")
            self.nodes.append(Node(f"node-{i}", redis, data / "cursors.db", None))  # type: ignore[arg-type]
        for i, node in enumerate(self.nodes):
            node.config = self._config(i)
            await self._start_node(node)
        self.say(
            f"started {self.n} nodes: "
            + ", ".join(f"{n.node_id}@{n.redis.port}" for n in self.nodes)
            + (" (node-0: a Redis Cluster, 3 masters and 3 replicas)" if self.cluster else "")
        )

    async def _start_node(self, node: Node) -> None:
        if node.store is None:
            options: dict[str, Any] = {"node_id": node.node_id, "prefix": PREFIX}
            options["cluster"] = self._clustered(node)
            if self.with_cluster:
                node.store = await PartitionedStore.connect(node.redis.url, **SPLIT, **options)
            else:
                node.store = await RedisStore.connect(node.redis.url, **options)
        node.engine = ReplicationEngine(node.config, store=node.store)
        await node.engine.start()

    async def teardown(self) -> None:
        for node in self.nodes:
            if node.engine is not None:
                with contextlib.suppress(Exception):
                    await node.engine.shutdown(timeout=5)
            if node.store is not None:
                with contextlib.suppress(Exception):
                    await node.store.close()
        for server in self._servers:
            server.kill()

    # ------------------------------------------------------------------------ workload

    async def _writer(self, node: Node) -> None:
        interval = self.n / self.rate
        next_at = time.monotonic()
        while not self._stop_writes.is_set():
            key = f"user:{self.rng.randrange(self.keys)}"
            assert node.store is not None
            try:
                if self.rng.random() < 0.15:
                    await node.store.delete(key)
                else:
                    payload = {"by": node.node_id, "n": node.writes, "score": self.rng.random()}
                    await node.store.put(key, json.dumps(payload).encode(), content_type="json")
                node.writes += 1
            except Exception:
                node.failed_writes += 1  # the node's Redis is down: the write is not acknowledged
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                next_at = time.monotonic()
                await asyncio.sleep(0)

    # ------------------------------------------------------------------------ faults

    async def _faults(self) -> None:
        await asyncio.sleep(self.duration * 0.3)
        self.first_fault_at = time.monotonic()
        if self.cluster is not None:
            await self._failover(self.cluster, self.nodes[0])
        else:
            victim = self.nodes[-1]
            self.say(f"FAULT kill -9 of {victim.node_id}'s Redis")
            victim.redis.kill()
            await asyncio.sleep(min(3.0, self.duration * 0.1))
            victim.redis.restart()
            self.say(
                f"      {victim.node_id}'s Redis restarted (appendonly: acknowledged writes kept)"
            )
        await asyncio.sleep(self.duration * 0.2)
        source, lagging = self.nodes[0], self.nodes[1]
        self.say(
            f"FAULT {lagging.node_id}'s engine stopped; {source.node_id}'s stream trimmed "
            "while it is away"
        )
        assert lagging.engine is not None and source.store is not None
        await lagging.engine.shutdown()
        written = source.writes
        deadline = time.monotonic() + 10
        # Polls the writers' counter, which has no event to wait on; bounded by the deadline.
        while source.writes < written + 200 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for part in _parts(source.store):
            await part.redis.xtrim(part.keys.cdc, maxlen=0, approximate=False)
        await self._start_node(lagging)
        self.last_fault_at = time.monotonic()
        self.say(
            f"      {lagging.node_id}'s engine restarted: it must detect the gap and the "
            "cold path must repair"
        )

    async def _failover(self, cluster: Cluster, node: Node) -> None:
        """Kill the master that holds partition 0 of ``node``'s data (and the partitions that
        share it); the cluster promotes its replica."""
        assert node.store is not None
        parts = _parts(node.store)
        slot = parts[0].partition_slot()
        master = slot_owner(cluster, slot)
        held = [
            p.keys.partition
            for p in parts
            if slot_owner(cluster, p.partition_slot()).port == master.port
        ]
        self.say(
            f"FAULT kill -9 of {node.node_id}'s master for partitions {','.join(held)} of "
            f"{len(parts)} (port {master.port})"
        )
        master.kill()
        deadline = time.monotonic() + 30
        # The cluster's own failure detection has no event to wait on; bounded by the deadline.
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                promoted = await asyncio.to_thread(slot_owner, cluster, slot)
                if promoted.port != master.port:
                    self.say(f"      its replica (port {promoted.port}) was promoted")
                    break
            await asyncio.sleep(0.2)
        await asyncio.to_thread(master.restart)
        self.say(f"      the old master (port {master.port}) is back, as a replica")

    # ------------------------------------------------------------------------ display

    def say(self, text: str) -> None:
        stamp = f"{time.monotonic() - self.started:6.1f}s"
        line = f"[{stamp}] {text}"
        self.events.append(line)
        print(line, file=self.out, flush=True)

    async def _rows(self) -> list[str]:
        rows = [
            f"{'node':<8} {'writes':>7} {'applied':>8} {'repaired':>8} {'lag ms':>7} "
            f"{'circuits':<12} {'root':<10}"
        ]
        for node in self.nodes:
            applied = repaired = 0
            lag = 0
            circuits = "-"
            engine = node.engine
            if engine is not None and engine.state == "running":
                status = engine.status()
                peers = status["peers"].values()
                applied = sum(_applied(p) for p in peers)
                lag = max([p.get("lag_ms") or 0 for p in peers] or [0])
                opened = sum(1 for p in peers if p["circuit"] != "closed")
                circuits = "all closed" if not opened else f"{opened} not closed"
                repaired = int(_sample_sum(engine, "replication_repair_items_applied_total"))
            else:
                circuits = "engine down"
            try:
                assert node.store is not None
                root = (await asyncio.wait_for(node.store.merkle_root(), 1)).hex()[:8]
            except Exception:
                root = "(down)"
            rows.append(
                f"{node.node_id:<8} {node.writes:>7} {applied:>8} {repaired:>8} "
                f"{lag:>7} {circuits:<12} {root:<10}"
            )
        return rows

    async def _display(self) -> None:
        while True:
            rows = await self._rows()
            if self._tty:
                print("\n".join(rows) + "\n", file=self.out, flush=True)
            else:
                print("\n".join("    " + r for r in rows), file=self.out, flush=True)
            await asyncio.sleep(2.0)

    # ------------------------------------------------------------------------ run

    async def run(self) -> DemoResult:
        await self.setup()
        self.say(
            f"workload: {self.rate:.0f} writes/s over {self.keys} keys for "
            f"{self.duration:.0f}s, 15% deletes, every node writing the same keys"
        )
        display = asyncio.create_task(self._display(), name="demo.display")
        try:
            # A writer or the fault injector that fails ends the others and the demo with it.
            async with asyncio.TaskGroup() as group:
                for node in self.nodes:
                    group.create_task(self._writer(node), name=f"demo.writer.{node.node_id}")
                faults = (
                    group.create_task(self._faults(), name="demo.faults") if self.faults else None
                )
                await asyncio.sleep(self.duration)
                if faults is not None:
                    await faults
                self._stop_writes.set()
            self.say("writes stopped; waiting for the mesh to converge")
            converged_at = await self._wait_converged(timeout=60.0)
        finally:
            display.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await display
        for row in await self._rows():
            print("    " + row, file=self.out)
        return await self._result(converged_at)

    async def _roots(self) -> set[bytes]:
        roots = set()
        for node in self.nodes:
            assert node.store is not None
            roots.add(await node.store.merkle_root())
        return roots

    async def _wait_converged(self, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if len(await self._roots()) == 1:
                    return time.monotonic()
            await asyncio.sleep(0.25)
        return None

    async def _lags(self) -> tuple[list[int], list[int]]:
        """Write-to-apply delay of every replicated entry, from each node's own stream.

        An applied entry is re-emitted with the writer's ``updated_at``; its own stream id is
        the apply time, so the difference is the replication delay at millisecond resolution.
        """
        steady: list[int] = []
        every: list[int] = []
        cutoff_ms = None
        if self.first_fault_at is not None:
            cutoff_ms = int((time.time() - (time.monotonic() - self.first_fault_at)) * 1000)
        for node in self.nodes:
            assert node.store is not None
            async for chunk in _stream_chunks(node.store):
                for sid, fields in chunk:
                    meta = json.loads(fields.get(b"meta", b"{}"))
                    if meta.get("origin") == node.node_id:
                        continue
                    applied_ms = int(sid.split(b"-")[0])
                    lag = max(0, applied_ms - int(meta.get("updated_at", applied_ms)))
                    every.append(lag)
                    if cutoff_ms is None or applied_ms < cutoff_ms:
                        steady.append(lag)
        return steady, every

    async def _result(self, converged_at: float | None) -> DemoResult:
        steady, every = await self._lags()
        replicated = gaps = quarantined = repaired = 0
        for node in self.nodes:
            if node.engine is None:
                continue
            for peer in node.engine.status()["peers"].values():
                replicated += _applied(peer)
            engine = node.engine
            gaps += int(_sample_sum(engine, "replication_stream_gaps_total"))
            repaired += int(_sample_sum(engine, "replication_repair_items_applied_total"))
            for reason in ("bad_zstd", "hash_mismatch", "unknown_op", "missing_field"):
                quarantined += int(
                    _sample_sum(engine, "replication_cdc_events_quarantined_total", reason=reason)
                )
        return DemoResult(
            converged=converged_at is not None,
            nodes=self.n,
            writes=sum(n.writes for n in self.nodes),
            failed_writes=sum(n.failed_writes for n in self.nodes),
            replicated=replicated,
            repaired=repaired,
            gaps=gaps,
            quarantined=quarantined,
            lag_steady_p50_ms=_pct(steady, 50),
            lag_steady_p99_ms=_pct(steady, 99),
            lag_all_p99_ms=_pct(every, 99),
            converge_sec=(converged_at - (self.last_fault_at or self.started))
            if converged_at
            else None,
            events=self.events,
        )


async def _stream_chunks(store: RedisStore | PartitionedStore) -> Any:
    for part in _parts(store):
        start = "-"
        while True:
            entries = await part.redis.xrange(part.keys.cdc, min=start, max="+", count=1000)
            if not entries:
                break
            yield entries
            start = f"({text(entries[-1][0])}"
            if len(entries) < 1000:
                break


def _parts(store: RedisStore | PartitionedStore) -> list[RedisStore]:
    """A node's store partition by partition."""
    return list(store.partitions.values()) if isinstance(store, PartitionedStore) else [store]


def _applied(peer: dict[str, Any]) -> int:
    """Events applied from one peer (over its partitions, on a node of many)."""
    lanes = peer.get("partitions")
    if lanes:
        return sum(int(lane.get("events_applied", 0)) for lane in lanes.values())
    return int(peer.get("events_applied", 0))


def _sample_sum(engine: ReplicationEngine, name: str, **labels: str) -> float:
    """A metric summed over every series carrying ``labels`` (every peer and partition)."""
    return sum(
        sample.value
        for family in engine.metrics.registry.collect()
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _pct(values: list[int], pct: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return float(values[0])
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1])


def summary(result: DemoResult) -> str:
    def ms(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.0f} ms"

    lines = [
        "",
        "=" * 64,
        f" converged:            {'YES' if result.converged else 'NO'} "
        f"({result.nodes} nodes, identical Merkle roots)"
        if result.converged
        else f" converged:            NO ({result.nodes} nodes still differ)",
        f" writes acknowledged:  {result.writes}  (refused while a Redis was down: "
        f"{result.failed_writes})",
        f" events replicated:    {result.replicated}  (hot path applies)",
        f" items repaired:       {result.repaired}  (cold path applies)",
        f" stream gaps detected: {result.gaps}",
        f" lag before faults:    p50 {ms(result.lag_steady_p50_ms)}, "
        f"p99 {ms(result.lag_steady_p99_ms)}",
        f" lag incl. repairs:    p99 {ms(result.lag_all_p99_ms)}",
        " converged after last fault: "
        + ("n/a" if result.converge_sec is None else f"{result.converge_sec:.1f} s"),
        "=" * 64,
    ]
    return "\n".join(lines)


async def run_demo(
    *,
    nodes: int = 3,
    duration: float = 20.0,
    rate: float = 300.0,
    keys: int = 200,
    faults: bool = True,
    seed: int = 1,
    out: TextIO = sys.stdout,
    cluster: bool = False,
) -> DemoResult:
    with tempfile.TemporaryDirectory(prefix="replication-demo-") as tmp:
        demo = Demo(
            nodes=nodes,
            duration=duration,
            rate=rate,
            keys=keys,
            faults=faults,
            out=out,
            seed=seed,
            workdir=Path(tmp),
            cluster=cluster,
        )
        main = asyncio.current_task()
        assert main is not None
        stuck = False

        async def watchdog() -> None:
            # A demo that stops moving says where it stands instead of hanging silently:
            # printed before the cancel, while every task still waits where it got stuck.
            nonlocal stuck
            await asyncio.sleep(duration + STUCK_AFTER_SEC)
            stuck = True
            print(_where_tasks_wait(), file=sys.stderr, flush=True)
            main.cancel()

        dog = asyncio.create_task(watchdog(), name="demo.watchdog")
        try:
            result = await demo.run()
        except asyncio.CancelledError:
            if not stuck:
                raise
            main.uncancel()
            raise RuntimeError(
                f"the demo was still running {duration + STUCK_AFTER_SEC:.0f} s after it began "
                "(its writes last --duration, then it waits up to 60 s to converge); where each "
                "task waited is printed above"
            ) from None
        finally:
            dog.cancel()
            await demo.teardown()
    print(summary(result), file=out, flush=True)
    return result


def _where_tasks_wait() -> str:
    """Every other task of this loop and where it waits, outermost call first."""
    lines = ["demo: stuck; the tasks and where they wait:"]
    here = asyncio.current_task()
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        if task is here:
            continue
        lines.append(f"  task {task.get_name()}:")
        for frame in awaiting_frames(task):
            code = frame.f_code
            lines.append(f"    {code.co_filename}:{frame.f_lineno} in {code.co_name}")
    return "\n".join(lines)
