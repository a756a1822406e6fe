"""ReplicationEngine: owns every connection and task of one node's replication.

Embedded by a parent daemon (``await engine.start()`` / ``await engine.shutdown()``) or run by the
CLI as a sidecar. It owns what it starts: a crashed tailer is logged, counted and restarted with
backoff, and shutdown stops reading, drains the batches in hand, saves cursors and closes
everything within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import functools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from replication_engine.clock import HLC, offset_problem, wall_clock_ms
from replication_engine.codec import StreamId
from replication_engine.config import ColdPathConfig, EngineConfig, ScrubConfig
from replication_engine.connection import TlsOptions, credentials_refused
from replication_engine.cursor import CursorStore
from replication_engine.errors import ReplicationError
from replication_engine.hot_path import CursorSaveFailed, Tailer, TailerMode, TailerSettings
from replication_engine.membership import UNREAD_NOTE, Membership
from replication_engine.merkle import Geometry, GeometryError
from replication_engine.observability.http import HttpServer
from replication_engine.observability.metrics import ENGINE_STATES, Metrics
from replication_engine.peer import Peer
from replication_engine.redaction import redact_url
from replication_engine.resilience import Backoff, breaker_state, make_breaker, sleep_or_stop
from replication_engine.scrub import Scrub
from replication_engine.store.partitioned import PartitionedStore
from replication_engine.store.protocol import RecordKeeper
from replication_engine.store.redis_store import RedisStore, StoreOwnershipError

if TYPE_CHECKING:
    from replication_engine.cold_path import ColdPath, RepairStats

log = logging.getLogger(__name__)
_Shared = TypeVar("_Shared", ColdPathConfig, ScrubConfig)

_RESTART_BASE_SEC = 0.5
_RESTART_MAX_SEC = 30.0
# The cursor database's meta entry naming the node it belongs to (see _claim_cursor_database).
META_NODE_ID = "node_id"
# abort(): how long each round waits for cancelled tasks, and how many rounds it tries. A task
# can need a second cancel on 3.11 (see abort()), never forty.
_ABORT_ROUND_SEC = 0.5
_ABORT_ROUNDS = 40


class EngineError(ReplicationError, RuntimeError):
    """The engine cannot start as configured; the message says what to fix."""


class EngineState(StrEnum):
    """Where the engine is in its life (status "state", metric replication_engine_state)."""

    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class PeerHealth:
    """What this node knows of one peer's link, as status reports it and readiness judges it:
    one set of facts, so the two cannot tell different stories."""

    connected: bool
    stalled: bool
    mode: TailerMode | None  # None without a tailer (hot path off)
    lag_ms: int | None  # None while not known: no read yet, or the peer unreachable
    lag_events: int | None
    problem: str | None = None  # what to fix, for a mode that only a config change ends


@dataclass(eq=False)
class Partition:
    """One partition's replication (docs/FORMAT.md, "Partitions"): its store, its view of each
    peer's same partition, its tailers, repair, membership and scrub. A node of one partition
    has one; a node of many runs one per partition side by side, sharing the peers' links,
    the cursor database, the metrics and the local store's breaker. Every claim, anchor and
    cursor is a partition's: a partition is the unit of knowledge, because what a store
    claims is written atomically with its data, in its slot."""

    name: str
    store: RecordKeeper
    peers: dict[str, Peer]
    cursors: CursorStore
    metrics: Metrics
    # "" for a node of one partition, else "{<name>}": what its task names and its status
    # keys carry after the peer's id ("tailer:b{3}").
    suffix: str
    tailers: dict[str, Tailer] = field(default_factory=dict)
    cold_path: ColdPath | None = None
    membership: Membership | None = None
    scrub: Scrub | None = None

    def lane(self, peer_id: str) -> str:
        return peer_id + self.suffix


class ReplicationEngine:
    def __init__(
        self,
        config: EngineConfig,
        store: RecordKeeper | PartitionedStore | None = None,
        *,
        metrics: Metrics | None = None,
        clock: HLC | None = None,
    ) -> None:
        self.config = config
        self.node_id = config.local_node_id
        self.geometry = Geometry(
            config.settings.merkle.fanout,
            config.settings.merkle.depth,
            config.settings.merkle.partitions,
        )
        partitioned = self.geometry.partitions > 1
        self.metrics = metrics or Metrics(partitioned=partitioned)
        if self.metrics.partitioned != partitioned:
            raise EngineError(
                f"metrics: a node of {self.geometry.partitions} partition(s) needs "
                f"Metrics(partitioned={partitioned})"
            )
        # The node's store, as an embedder writes and reads it: the store of its one partition,
        # or a PartitionedStore routing each key to its partition.
        self.store: RecordKeeper | PartitionedStore | None = store
        self._owns_store = store is None
        self._clock = clock
        self.cursors: CursorStore | None = None
        self.peers: dict[str, Peer] = {}
        self.parts: dict[str, Partition] = {}
        self.http: HttpServer | None = None
        self.local_breaker = make_breaker(
            name="local-store",
            failures=config.local.circuit_failure_threshold,
            longest_open_sec=config.local.circuit_reset_timeout_sec,
        )
        self.metrics.watch_circuit(
            self.metrics.local_circuit, lambda: breaker_state(self.local_breaker)
        )
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self._state = EngineState.STOPPED
        self._started_at: float | None = None
        self._shutdown_lock = asyncio.Lock()
        self.tailer_restarts: dict[str, int] = {}
        self.tailer_errors: dict[str, str] = {}
        self._set_state(EngineState.STOPPED)

    # ------------------------------------------------------------------------ partitions

    @property
    def partitioned(self) -> bool:
        return self.geometry.partitions > 1

    @property
    def tailers(self) -> dict[str, Tailer]:
        """Every tailer, by peer id (``<peer>{<partition>}`` on a node of many partitions)."""
        if len(self.parts) == 1:
            return next(iter(self.parts.values())).tailers
        return {
            part.lane(pid): t for part in self.parts.values() for pid, t in part.tailers.items()
        }

    def _single(self) -> Partition | None:
        return next(iter(self.parts.values())) if len(self.parts) == 1 else None

    @property
    def cold_path(self) -> ColdPath | None:
        """The repair of a node of one partition (a node of many has one per partition, in
        ``parts``)."""
        single = self._single()
        return single.cold_path if single is not None else None

    @property
    def membership(self) -> Membership | None:
        single = self._single()
        return single.membership if single is not None else None

    @property
    def scrub(self) -> Scrub | None:
        single = self._single()
        return single.scrub if single is not None else None

    # ------------------------------------------------------------------------ state

    @property
    def state(self) -> EngineState:
        return self._state

    def _set_state(self, state: EngineState) -> None:
        self._state = state
        self.metrics.engine_state.set(ENGINE_STATES[state])

    # ------------------------------------------------------------------------ start

    async def start(self) -> None:
        """Connect and start every task. Fails before anything runs on a bad setup."""
        if self._state is not EngineState.STOPPED:
            raise EngineError(f"start() called while the engine is {self._state}")
        self._set_state(EngineState.STARTING)
        self._stop = asyncio.Event()
        try:
            await self._open()
        except BaseException:
            await self._close_resources()
            self._set_state(EngineState.STOPPED)
            raise
        self._started_at = time.monotonic()
        self._spawn_tasks()
        # One turn of the loop: every task has begun (tailers exist) when start() returns.
        await asyncio.sleep(0)
        self._set_state(EngineState.RUNNING)
        log.info(
            "engine.started",
            extra={
                "node": self.node_id,
                "peers": list(self.peers),
                "partitions": self.geometry.partitions,
                "relay": self.config.relay,
                "relay_why": self.config.relay_reason(),
            },
        )

    async def _open(self) -> None:
        cfg = self.config
        geometry = self.geometry
        self.parts = {}
        if self.store is None:
            self.store = await self._connect_store()
        else:
            if self.store.node_id != cfg.local_node_id:
                raise EngineError(
                    f"store node_id {self.store.node_id!r} differs from local_node_id "
                    f"{cfg.local_node_id!r}"
                )
            if self.store.geometry != geometry:
                raise EngineError(
                    f"store geometry {self.store.geometry.describe()} differs from "
                    f"settings.merkle: {geometry.describe()}"
                )
        if isinstance(self.store, PartitionedStore):
            stores: dict[str, Any] = dict(self.store.partitions)
        else:
            stores = {"0": self.store}
        for store in stores.values():
            if not isinstance(store, RecordKeeper):
                raise EngineError(
                    f"the engine needs a store that keeps its record (claims, certification, "
                    f"tombstone collection: store.protocol.RecordKeeper, docs/DELETES.md), got "
                    f"{type(store).__name__}"
                )
            if cfg.mode == "follower":
                store.read_only = True  # a follower takes writes only from its upstream
            # A store handed in by a parent daemon applies in calls no bigger than configured.
            store.max_batch_bytes = min(
                store.max_batch_bytes, cfg.settings.hot_path.max_batch_bytes
            )
        await self._check_clock(next(iter(stores.values())))
        try:
            self.cursors = await CursorStore.open(
                cfg.cursor.sqlite_path,
                wal_mode=cfg.cursor.wal_mode,
                quarantine_max_rows=cfg.cursor.quarantine_max_rows,
                quarantine_max_value_bytes=cfg.cursor.quarantine_max_value_bytes,
            )
        except Exception as exc:
            raise EngineError(f"cursor.sqlite_path: {exc}") from exc
        await self._claim_cursor_database()
        # Rows trimmed at open, for a quarantine_max_rows lowered since the file was written.
        self.metrics.quarantine_evicted.inc(self.cursors.evicted)
        hot = cfg.settings.hot_path
        for peer_cfg in sorted(cfg.peers, key=lambda p: p.priority):
            password = peer_cfg.password.get_secret_value() if peer_cfg.password else None
            self.peers[peer_cfg.node_id] = Peer(
                peer_cfg.node_id,
                peer_cfg.redis_url,
                prefix=peer_cfg.effective_prefix(cfg.local.prefix),
                metrics=self.metrics,
                username=peer_cfg.username,
                password=password,
                tls=TlsOptions(
                    peer_cfg.tls.ca_file,
                    peer_cfg.tls.cert_file,
                    peer_cfg.tls.key_file,
                    peer_cfg.tls.verify,
                ),
                priority=peer_cfg.priority,
                failure_threshold=peer_cfg.circuit_failure_threshold,
                reset_timeout_sec=peer_cfg.circuit_reset_timeout_sec,
                op_timeout_sec=max(1.0, cfg.settings.slo.max_peer_op_latency_ms / 1000 * 10),
                block_timeout_sec=hot.block_timeout_sec,
                start_from=peer_cfg.start_from,
                cluster=peer_cfg.cluster,
                cluster_addresses=peer_cfg.cluster_addresses,
                partitions=geometry.partitions,
                wall_ms=self._wall_ms(),
                max_clock_offset_sec=cfg.local.max_clock_offset_sec,
            )
        split = self.partitioned
        for name, store in stores.items():
            part = Partition(
                name=name,
                store=store,
                peers={
                    pid: peer.partition(name) if split else peer for pid, peer in self.peers.items()
                },
                cursors=self.cursors.scoped(name) if split else self.cursors,
                metrics=self.metrics.partition(name),
                suffix=f"{{{name}}}" if split else "",
            )
            part.metrics.declare_peers(p.node_id for p in cfg.peers)
            # Always: with cold_path.enabled false it still runs the repairs that are requested
            # (quarantined entries, gaps, a recovery), just no periodic cycles.
            part.cold_path = self._new_cold_path(part)
            self.parts[name] = part
        if not cfg.settings.cold_path.enabled:
            log.info(
                "engine.periodic_repair_off",
                extra={
                    "node": self.node_id,
                    "hint": "settings.cold_path.enabled is false: no periodic repair cycles; "
                    "requested repairs (quarantined entries, stream gaps, a recovery) still run",
                },
            )
        # Listening before the record is opened: a second sidecar started with this config
        # (a duplicate unit, a manual start) fails on the port before it writes a nonce into the
        # store, which would send the running one into recovery.
        if cfg.http.enabled:
            self.http = HttpServer(self, cfg.http.host, cfg.http.port)
            try:
                await self.http.start()
            except OSError as exc:
                raise EngineError(f"http.listen {cfg.http.listen!r}: {exc}") from exc
        await asyncio.gather(*(self._open_membership(part) for part in self.parts.values()))

    async def _connect_store(self) -> RecordKeeper | PartitionedStore:
        cfg = self.config
        geometry = self.geometry
        options: dict[str, Any] = {
            "node_id": cfg.local_node_id,
            "prefix": cfg.local.prefix,
            "username": cfg.local.username,
            "password": cfg.local.password.get_secret_value() if cfg.local.password else None,
            "fanout": geometry.fanout,
            "depth": geometry.depth,
            "stream_maxlen": cfg.local.stream_maxlen,
            "max_memory_ratio": cfg.local.max_memory_ratio,
            "max_clock_offset_sec": cfg.local.max_clock_offset_sec,
            "max_batch_bytes": cfg.settings.hot_path.max_batch_bytes,
            "read_only": cfg.mode == "follower",
            "hlc": self._clock,
            "cluster": cfg.local.cluster,
            "cluster_addresses": cfg.local.cluster_addresses,
        }
        try:
            if self.partitioned:
                return await PartitionedStore.connect(
                    cfg.local.redis_url, partitions=geometry.partitions, **options
                )
            return await RedisStore.connect(cfg.local.redis_url, **options)
        except GeometryError as exc:
            raise EngineError(f"local store: {exc}") from exc
        except StoreOwnershipError:
            raise  # it names what to fix; it is not an outage
        except Exception as exc:
            refused = credentials_refused(exc)
            if refused is not None:
                # It answered: what it needs is another user or password, not a network fix.
                raise EngineError(
                    f"the local Redis at {_redacted(cfg.local.redis_url)} refused the user or "
                    f"password: {type(refused).__name__}: {_redacted(str(refused))}"
                ) from exc
            raise EngineError(
                f"local store at {_redacted(cfg.local.redis_url)} "
                f"is unreachable: {type(exc).__name__}: {_redacted(str(exc))}"
            ) from exc

    def _new_cold_path(self, part: Partition) -> ColdPath:
        from replication_engine.cold_path import ColdPath

        return ColdPath(
            part.store,
            list(part.peers.values()),
            part.cursors,
            self._share(self.config.settings.cold_path, part),
            part.metrics,
            is_catching_up=self._any_catching_up,
            local_breaker=self.local_breaker,
            relay=self.config.relay,
            is_forgotten=functools.partial(self._is_forgotten, part),
            on_complete=functools.partial(self._on_repair_complete, part),
        )

    def _share(self, settings: _Shared, part: Partition) -> _Shared:
        """A partition's share of the node's budgets: the rates, the repair budget and the
        parallel drills are the node's, so a node of 16 partitions does not copy, repair or
        re-read 16 times as fast as configured. The stray-key scan walks the whole keyspace
        whatever the partition, so one partition runs it."""
        count = self.geometry.partitions
        if count == 1:
            return settings
        if isinstance(settings, ColdPathConfig):
            return settings.model_copy(
                update={
                    "max_items_per_cycle": max(1, settings.max_items_per_cycle // count),
                    "drill_concurrency": max(1, settings.drill_concurrency // count),
                    "bootstrap_rate_limit_per_sec": settings.bootstrap_rate_limit_per_sec / count,
                }
            )
        first = part.name == self.geometry.partition_names[0]
        return settings.model_copy(
            update={
                "payload_items_per_sec": settings.payload_items_per_sec / count,
                "stray_scan": settings.stray_scan and first,
            }
        )

    async def _claim_cursor_database(self) -> None:
        """Refuse another node's cursor database (copied by mistake, or a path two configs
        share): its cursors are that node's positions in its peers' streams, and its nonces
        that node's, which would send this one into a recovery blamed on a second engine."""
        assert self.cursors is not None
        owner = await self.cursors.meta_get(META_NODE_ID)
        if owner is None:
            await self.cursors.meta_set(META_NODE_ID, self.node_id)
        elif owner != self.node_id:
            raise EngineError(
                f"cursor.sqlite_path: {self.config.cursor.sqlite_path} is node {owner}'s cursor "
                f"database, not node {self.node_id}'s (copied from it, or two configs share the "
                f"path): give this node a file of its own (a new path starts from its store's "
                f"positions)"
            )

    async def _check_clock(self, store: Any) -> None:
        """Refuse to start where this process's clock and its Redis's disagree by more than
        ``local.max_clock_offset_sec``.

        This process stamps the store's writes and judges peers' versions by its clock: an hour
        behind, it sets every peer's new write aside as clock skew; an hour ahead, it stamps
        this node's writes ahead of every other node's (the store clock never goes back). Two
        clocks on one machine, or two that NTP keeps together, never differ by that much: one
        of them is wrong, and which one, only an operator can tell.
        """
        redis = getattr(store, "redis", None)
        if redis is None:
            return
        wall = self._wall_ms()
        before = wall()
        try:
            reply = await redis.time()
            if isinstance(reply, dict):  # a cluster client answers per node
                reply = next(iter(reply.values()))
            seconds, micros = reply
        except Exception as exc:  # the check is no reason not to start; the store says more
            error = _redacted(f"{type(exc).__name__}: {exc}")[:500]
            log.warning("engine.clock_unchecked", extra={"error": error})
            return
        after = wall()
        server_ms = int(seconds) * 1000 + int(micros) // 1000
        bound_ms = self.config.local.max_clock_offset_sec * 1000
        problem = offset_problem(before, after, server_ms, bound_ms)
        if problem is not None:
            raise EngineError(
                f"{problem} (TIME read at {_redacted(self.config.local.redis_url)}). Put the "
                f"wrong clock right (NTP) and start again"
            )

    def _wall_ms(self) -> Callable[[], int]:
        # The store's clock, so that "too far ahead" is judged as its writes are stamped.
        return self.store.clock.wall if self.store is not None else wall_clock_ms

    @staticmethod
    def _is_forgotten(part: Partition, peer_id: str) -> bool:
        return part.membership is not None and part.membership.is_forgotten(peer_id)

    @staticmethod
    def _on_repair_complete(part: Partition, peer_id: str, began: float) -> None:
        if part.membership is not None:
            part.membership.on_repair_complete(peer_id, began)

    async def _open_membership(self, part: Partition) -> None:
        """Open a partition's record and certify it before anything runs (docs/DELETES.md).

        A store that may have lost writes (restored, wiped, new) goes into recovery here, and
        the HLC floor is restored before start() returns.
        """
        cfg = self.config
        cold_path = part.cold_path
        assert cold_path is not None
        part.membership = Membership(
            node_id=self.node_id,
            mode=cfg.mode,
            relay=cfg.relay,
            store=part.store,
            cursors=part.cursors,
            peers=list(part.peers.values()),
            metrics=part.metrics,
            interval_sec=cfg.settings.membership.interval_sec,
            gc_batch=cfg.settings.membership.gc_batch,
            scrub_per_tick=cfg.settings.membership.scrub_per_tick,
            request_repair=lambda peer_id, reason: cold_path.request_repair(peer_id, reason=reason),
            on_forgotten=functools.partial(self._on_forgotten, part),
            max_clock_offset_ms=int(cfg.local.max_clock_offset_sec * 1000),
        )
        part.scrub = Scrub(
            part.store,
            part.cursors,
            part.metrics,
            self._share(cfg.settings.scrub, part),
            heal=cold_path.heal,
        )
        try:
            await part.membership.open()
        except StoreOwnershipError:
            raise
        except Exception as exc:
            where = f" (partition {part.name})" if part.suffix else ""
            raise EngineError(
                f"opening this node's record in the local store{where} failed: "
                f"{type(exc).__name__}: {_redacted(str(exc))}"
            ) from exc

    def _spawn_tasks(self) -> None:
        cfg = self.config
        for part in self.parts.values():
            self._spawn_partition(part)
        if cfg.settings.peer_health.enabled:
            for peer_id in self.peers:
                self._tasks[f"health:{peer_id}"] = asyncio.create_task(
                    self._health_loop(self.peers[peer_id]), name=f"re-health-{peer_id}"
                )

    def _spawn_partition(self, part: Partition) -> None:
        cfg, at = self.config, part.suffix
        if cfg.settings.hot_path.enabled:
            for peer_id in part.peers:
                if self._is_forgotten(part, peer_id):
                    continue
                self._tasks[f"tailer:{part.lane(peer_id)}"] = asyncio.create_task(
                    self._supervise_tailer(part, peer_id), name=f"re-tailer-{part.lane(peer_id)}"
                )
        if part.cold_path is not None:
            self._tasks[f"cold_path{at}"] = asyncio.create_task(
                self._supervise(f"cold_path{at}", part.cold_path.run), name=f"re-cold-path{at}"
            )
        if part.membership is not None:
            membership = part.membership
            self._tasks[f"membership{at}"] = asyncio.create_task(
                self._supervise(f"membership{at}", lambda: membership.run(self._stop)),
                name=f"re-membership{at}",
            )
        if part.scrub is not None:
            scrub = part.scrub
            self._tasks[f"scrub{at}"] = asyncio.create_task(
                self._supervise(f"scrub{at}", lambda: scrub.run(self._stop)), name=f"re-scrub{at}"
            )

    # ------------------------------------------------------------------------ tasks

    def _new_tailer(self, part: Partition, peer_id: str) -> Tailer:
        cold = part.cold_path
        tailer = Tailer(
            part.peers[peer_id],
            part.store,
            part.cursors,
            local_node_id=self.node_id,
            settings=TailerSettings.from_config(self.config),
            metrics=part.metrics,
            local_breaker=self.local_breaker,
            on_gap=functools.partial(self._on_gap, part),
            on_unanchored=functools.partial(self._on_unanchored, part),
            on_quarantine=functools.partial(self._on_quarantine, part),
            repair_pending=cold.has_pending if cold is not None else (lambda peer_id: False),
            bootstrap=functools.partial(self._bootstrap, part) if cold is not None else None,
            wall_ms=self._wall_ms(),
        )
        part.tailers[peer_id] = tailer
        return tailer

    async def _supervise_tailer(self, part: Partition, peer_id: str) -> None:
        backoff = Backoff(_RESTART_BASE_SEC, _RESTART_MAX_SEC)
        while not self._stop.is_set():
            tailer = self._new_tailer(part, peer_id)
            try:
                await tailer.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._record_crash(f"tailer:{part.lane(peer_id)}", exc, peer=(part, peer_id))
                if isinstance(exc, CursorSaveFailed):
                    tailer.mode = TailerMode.CURSOR_SAVE_FAILED
                elif isinstance(exc, GeometryError):  # a layout, a tree, an identity
                    tailer.mode = TailerMode.PEER_MISMATCH  # not ready until the config is
                if await sleep_or_stop(self._stop, backoff.next_delay()):
                    return

    async def _supervise(self, name: str, body: Callable[[], Any]) -> None:
        backoff = Backoff(_RESTART_BASE_SEC, _RESTART_MAX_SEC)
        while not self._stop.is_set():
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._record_crash(name, exc)
                if await sleep_or_stop(self._stop, backoff.next_delay()):
                    return

    def _record_crash(
        self, name: str, exc: BaseException, *, peer: tuple[Partition, str] | None = None
    ) -> None:
        message = _redacted(f"{type(exc).__name__}: {exc}")[:500]
        self.tailer_errors[name] = message
        self.tailer_restarts[name] = self.tailer_restarts.get(name, 0) + 1
        if peer is not None:
            part, peer_id = peer
            part.metrics.tailer_restarts.labels(peer_id).inc()
        # A peer that is not what the config says is the operator's to fix: its message says
        # what to change, and a traceback per restart would bury it.
        mismatch = isinstance(exc, GeometryError)  # PeerLayoutError, PeerIdentityError too
        log.error(
            "engine.task_crashed",
            exc_info=None if mismatch else exc,
            extra={
                "task": name,
                "error": message,
                "hint": "fix the peer's config; retrying with backoff"
                if mismatch
                else "restarting with backoff",
            },
        )

    async def _health_loop(self, peer: Peer) -> None:
        """Ping a peer that has been quiet, so a dead one is flagged even with no traffic."""
        health = self.config.settings.peer_health
        interval = health.ping_interval_sec
        quiet = min(health.idle_threshold_sec, interval)
        while True:
            # Publish before pinging: a hung peer holds the ping for the op timeout.
            self._publish_stalled(peer, 2 * interval)
            if peer.stalled(quiet):
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(interval):
                        await peer.ping()
            self._publish_stalled(peer, 2 * interval)
            if await sleep_or_stop(self._stop, interval):
                return

    def _publish_stalled(self, peer: Peer, after_sec: float) -> None:
        stalled = peer.stalled(after_sec)
        self.metrics.peer_stalled.labels(peer.node_id).set(int(stalled))
        if stalled or not peer.connected:
            for part in self.parts.values():
                tailer = part.tailers.get(peer.node_id)
                if tailer is not None:
                    tailer.publish_unread_lag()

    def _any_catching_up(self) -> bool:
        """Whether a tailer is working through a backlog, or has not read its peer yet.

        The periodic repair cycle waits for both: what it would fetch is on its way by the
        stream, and drilling into a peer far ahead (every interior node of its tree) costs the
        catch-up it would duplicate. A tailer that starts at the head is past this after its
        first read.
        """
        return any(
            t.catching_up and t.mode in (TailerMode.STARTING, TailerMode.CATCHING_UP)
            for t in self.tailers.values()
        )

    @staticmethod
    def _on_gap(part: Partition, peer_id: str) -> None:
        if part.cold_path is not None:
            part.cold_path.request_repair(peer_id, reason="gap")

    @staticmethod
    def _on_unanchored(part: Partition, peer_id: str) -> None:
        cold = part.cold_path
        if cold is not None and not cold.is_requested(peer_id, "anchor"):
            cold.request_repair(peer_id, reason="anchor")

    @staticmethod
    def _on_quarantine(part: Partition, peer_id: str, keys: Sequence[str], reason: str) -> None:
        if part.cold_path is not None:
            part.cold_path.request_repair(peer_id, reason=reason, keys=keys)

    @staticmethod
    def _on_forgotten(part: Partition, peer_id: str) -> None:
        """A configured peer became forgotten: stop reading it (its task ends on its own)."""
        tailer = part.tailers.get(peer_id)
        if tailer is not None:
            tailer.stop()

    async def _bootstrap(self, part: Partition, peer: Peer) -> StreamId:
        assert part.cold_path is not None
        log.info("engine.bootstrap_started", extra={"peer": peer.node_id, "partition": part.name})
        tail = await part.cold_path.bootstrap(peer)
        log.info(
            "engine.bootstrap_complete",
            extra={"peer": peer.node_id, "cursor": str(tail), "partition": part.name},
        )
        return tail

    # ------------------------------------------------------------------------ operations

    async def repair_once(self) -> RepairStats:
        """One cold-path cycle now, whatever the schedule (of every partition, summed; each
        peer's detail is under ``<peer>{<partition>}`` on a node of many partitions)."""
        from replication_engine.cold_path import RepairStats

        paths = [(part, part.cold_path) for part in self.parts.values()]
        colds = [cold for _part, cold in paths if cold is not None]
        if not colds or len(colds) < len(paths):
            raise EngineError("the cold path is not configured (settings.cold_path.enabled)")
        if len(colds) == 1:
            return await colds[0].repair_once(force=True)
        cycles = await asyncio.gather(*(cold.repair_once(force=True) for cold in colds))
        total = RepairStats()
        for (part, _cold), stats in zip(paths, cycles, strict=True):
            for peer_id, repair in stats.peers.items():
                total.add(repair)
                total.peers[part.lane(peer_id)] = total.peers.pop(peer_id)
            for peer_id, why in stats.peers_skipped.items():
                total.peers_skipped[part.lane(peer_id)] = why
            total.duration_sec = max(total.duration_sec, stats.duration_sec)
            total.skipped_reason = total.skipped_reason or stats.skipped_reason
        return total

    async def reset_peer(self, peer_id: str) -> None:
        """Forget a peer's cursor so its next start re-bootstraps (operator request).

        The store keeps its own position in the peer's stream (docs/DELETES.md), so the next
        start resumes there unless the store has none; a copy is a repair and removes nothing.
        """
        for part in self.parts.values():
            await part.cursors.delete(peer_id)

    async def forget(self, node_id: str) -> None:
        """Forget a member gone for good: collection stops waiting for it, nothing is read
        from it any more (docs/DELETES.md, "Membership"). Spreads to every node through the
        records; to bring the machine back, wipe its store and give it a new node id.

        Raises:
            EngineError: the engine is not running, or ``node_id`` is this node.
        """
        memberships = [part.membership for part in self.parts.values()]
        if not memberships or self._state is not EngineState.RUNNING:
            raise EngineError(f"forget({node_id!r}) needs a running engine")
        try:
            # Every partition keeps its own record, so each is told; one that fails is told
            # again by a repeated forget (it is idempotent).
            for membership in memberships:
                assert membership is not None
                await membership.forget(node_id)
        except ValueError as exc:
            raise EngineError(str(exc)) from None

    def task_names(self) -> list[str]:
        """Names of the engine's tasks that are still running, for tests and operators that
        want to crash one part: ``tailer:<peer>``, ``health:<peer>``, ``cold_path``,
        ``membership``, ``scrub``. Empty before start() and after shutdown()."""
        return sorted(name for name, task in self._tasks.items() if not task.done())

    async def abort(self, names: str | Iterable[str] | None = None) -> int:
        """Cancel running tasks where they stand, as a crash would stop them.

        Nothing is asked to stop first: no stop signal, no drain, no final cursor save. Only
        what a task does on cancellation happens (a shielded commit already under way ends),
        so a tailer is cut mid-read, mid-apply or mid-save. An aborted task is not restarted;
        the engine keeps its state, and ``shutdown()`` afterwards releases connections and the
        cursor database as the operating system would for a dead process. This is the seam
        for crash tests, which must not reach into the engine's task table.

        A task is cancelled again until it ends: on Python 3.11 ``asyncio.wait_for`` (which
        redis-py uses when sending) can lose a cancellation that lands as its send completes.

        Args:
            names: task names as :meth:`task_names` lists them, or ``fnmatch`` patterns of
                them (``"tailer:*"``); a single string is one name or pattern. None aborts
                every task.

        Returns:
            How many extra rounds of cancellation the tasks needed (0 when one was enough).

        Raises:
            EngineError: a name or pattern matches no running task, or a task survived every
                round of cancellation.
        """
        running = {name: task for name, task in self._tasks.items() if not task.done()}
        chosen = _matching(running, names)
        tasks = [running[name] for name in chosen]
        rounds = 0
        while pending := [task for task in tasks if not task.done()]:
            if rounds == _ABORT_ROUNDS:
                survivors = sorted(name for name in chosen if not running[name].done())
                raise EngineError(
                    f"tasks {survivors} survived {_ABORT_ROUNDS} cancellations "
                    f"{_ABORT_ROUND_SEC} s apart"
                )
            rounds += 1
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=_ABORT_ROUND_SEC)
        return max(0, rounds - 1)

    # ------------------------------------------------------------------------ shutdown

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop reading, drain batches in hand, save cursors, close. Idempotent and bounded."""
        async with self._shutdown_lock:
            if self._state is EngineState.STOPPED:
                return
            self._set_state(EngineState.STOPPING)
            bound = (
                timeout
                if timeout is not None
                else (self.config.settings.hot_path.shutdown_timeout_sec + 5.0)
            )
            self._stop.set()
            for tailer in self.tailers.values():
                tailer.stop()
            for part in self.parts.values():
                if part.cold_path is not None:
                    part.cold_path.stop()
            tasks = list(self._tasks.values())
            if tasks:
                _done, pending = await asyncio.wait(tasks, timeout=bound)
                for task in pending:
                    log.warning(
                        "engine.task_stop_timeout",
                        extra={
                            "task": task.get_name(),
                            "timeout_seconds": bound,
                            "hint": "the task did not stop in time; cancelling it",
                        },
                    )
                    task.cancel()
                if pending:
                    await asyncio.wait(pending, timeout=bound)
            for task in tasks:
                if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
                    log.error(
                        "engine.task_failed",
                        exc_info=exc,
                        extra={
                            "task": task.get_name(),
                            "error": _redacted(f"{type(exc).__name__}: {exc}")[:500],
                        },
                    )
            self._tasks.clear()
            await self._close_resources()
            self._set_state(EngineState.STOPPED)
            log.info("engine.stopped", extra={"node": self.node_id})

    async def _close_resources(self) -> None:
        if self.http is not None:
            with contextlib.suppress(Exception):
                await self.http.stop()
            self.http = None
        for peer in self.peers.values():
            await peer.close()
        self.peers.clear()
        if self.cursors is not None:
            with contextlib.suppress(Exception):
                await self.cursors.close()
            self.cursors = None
        if self._owns_store and self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()
            self.store = None

    async def __aenter__(self) -> ReplicationEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # ------------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """Per-peer replication state; safe to publish (no credentials). On a node of many
        partitions each peer's figures are over its partitions (the worst mode, the largest
        lag, the events behind summed), with each partition's own under ``partitions``."""
        slo = self.config.settings.slo
        peers: dict[str, Any] = {}
        for peer_id, peer in self.peers.items():
            health = self._peer_health(peer_id)
            entry: dict[str, Any] = {
                "url": peer.display_url,
                "connected": health.connected,
                "stalled": health.stalled,
                "circuit": peer.circuit_state,
                "latency_ms": _round(peer.latency_ms),
                "last_activity": peer.last_ok_wall,
                "last_error": peer.last_error,
                # False while the last read found nothing under the peer's prefix (log
                # peer.no_store says why that may be).
                "store_found": not peer.no_store,
            }
            single = self._single()
            if single is not None:
                entry.update(self._lane_status(single, peer_id, health))
            else:
                lanes = {
                    name: self._lane_status(part, peer_id, self._lane_health(part, peer_id))
                    for name, part in self.parts.items()
                }
                if any(part.tailers.get(peer_id) for part in self.parts.values()):
                    entry.update(
                        mode=health.mode,
                        lag_ms=health.lag_ms,
                        lag_events=health.lag_events,
                        restarts=sum(lane.get("restarts", 0) for lane in lanes.values()),
                    )
                entry["partitions"] = lanes
            peers[peer_id] = entry
        return {
            "node_id": self.node_id,
            "state": self._state,
            "mode": self.config.mode,
            "uptime_sec": _round(time.monotonic() - self._started_at) if self._started_at else 0,
            "local_circuit": breaker_state(self.local_breaker),
            "partitions": self.geometry.partitions,
            # Certification, recovery, members and tombstone collection (docs/DELETES.md).
            "membership": self._per_part(lambda part: part.membership),
            # Payloads re-hashed and healed, stray keys under the prefix (README).
            "scrub": self._per_part(lambda part: part.scrub),
            "hot_path": self.config.settings.hot_path.enabled,
            "cold_path": self.config.settings.cold_path.enabled,
            "max_replication_lag_sec": slo.max_replication_lag_sec,
            "max_replication_lag_events": slo.max_replication_lag_events,
            "peers": peers,
        }

    def _per_part(self, of: Callable[[Partition], Membership | Scrub | None]) -> Any:
        """A partition's part's status, or each partition's by name on a node of many."""
        statuses = {
            name: (None if (what := of(part)) is None else what.status())
            for name, part in self.parts.items()
        }
        if len(statuses) == 1:
            return next(iter(statuses.values()))
        return statuses or None

    def _lane_status(self, part: Partition, peer_id: str, health: PeerHealth) -> dict[str, Any]:
        """One partition's reading of one peer: its tailer and its repair."""
        entry: dict[str, Any] = {}
        tailer = part.tailers.get(peer_id)
        name = f"tailer:{part.lane(peer_id)}"
        if tailer is not None:
            peer = part.peers[peer_id]
            entry.update(
                mode=health.mode,
                cursor=str(tailer.cursor) if tailer.cursor else None,
                tail=str(tailer.tail) if tailer.tail else None,
                lag_ms=health.lag_ms,
                lag_events=health.lag_events,
                # What was known when the peer was last reachable: after a peer dies, the
                # writes it had not yet replicated here are those after `cursor`, about
                # this many (the exposure of a failover to this node).
                last_known_lag_ms=_exposure_ms(tailer, peer),
                last_known_lag_events=_exposure_events(tailer, peer),
                exposed_after=str(tailer.cursor) if tailer.cursor else None,
                batch_size=tailer.sizer.size,
                last_batch_at=tailer.last_batch_at,
                last_gap_at=tailer.last_gap_at,
                restarts=self.tailer_restarts.get(name, 0),
                error=self.tailer_errors.get(name),
                **{f"events_{k}": v for k, v in vars_of(tailer.stats).items()},
            )
        if part.cold_path is not None:
            entry["repair"] = part.cold_path.status()["peers"].get(peer_id)
        return entry

    def _lane_health(self, part: Partition, peer_id: str) -> PeerHealth:
        peer, tailer = self.peers[peer_id], part.tailers.get(peer_id)
        stall_after = 2 * self.config.settings.peer_health.ping_interval_sec
        stalled = peer.stalled(stall_after) if self._state is EngineState.RUNNING else False
        lag_known = tailer is not None and peer.connected and not stalled
        return PeerHealth(
            connected=peer.connected,
            stalled=stalled,
            mode=tailer.mode if tailer is not None else None,
            lag_ms=tailer.lag_ms if lag_known and tailer is not None else None,
            lag_events=tailer.lag_events if lag_known and tailer is not None else None,
            problem=self.tailer_errors.get(f"tailer:{part.lane(peer_id)}")
            if tailer is not None and tailer.mode is TailerMode.PEER_MISMATCH
            else None,
        )

    def _peer_health(self, peer_id: str) -> PeerHealth:
        """The peer's link as this node reads it: over every partition, the worst."""
        lanes = [self._lane_health(part, peer_id) for part in self.parts.values()]
        if len(lanes) == 1:
            return lanes[0]
        if not lanes:  # between start() failing part way and the peers' closing
            return PeerHealth(self.peers[peer_id].connected, False, None, None, None)
        modes = [lane.mode for lane in lanes if lane.mode is not None]
        mode = next((m for m in modes if not m.vouches), None)
        if mode is None:
            mode = TailerMode.CATCHING_UP if TailerMode.CATCHING_UP in modes else None
        if mode is None and modes:
            mode = modes[0]
        lags = [lane.lag_ms for lane in lanes]
        counts = [lane.lag_events for lane in lanes]
        return PeerHealth(
            connected=lanes[0].connected,
            stalled=lanes[0].stalled,
            mode=mode,
            lag_ms=None if None in lags else max(lag for lag in lags if lag is not None),
            lag_events=None if None in counts else sum(n for n in counts if n is not None),
            problem=next((lane.problem for lane in lanes if lane.problem), None),
        )

    def render_metrics(self) -> bytes:
        """The Prometheus exposition of this engine's registry (the HTTP server's /metrics)."""
        return self.metrics.render()

    def readiness(self) -> tuple[bool, list[str]]:
        """Whether a load balancer should send reads here, and why not."""
        if self._state is not EngineState.RUNNING:
            return False, [f"engine is {self._state}"]
        health = {peer_id: self._peer_health(peer_id) for peer_id in self.peers}
        reasons: list[str] = []
        for part in self.parts.values():
            recovering = part.membership.not_ready_reason() if part.membership else None
            if recovering is not None:
                where = f"partition {part.name}: " if part.suffix else ""
                reasons.append(where + recovering)
        if health and not any(h.connected for h in health.values()):
            reasons.append("all peers are disconnected")
        for peer_id, h in health.items():
            reasons.extend(f"peer {peer_id}: {why}" for why in self._not_ready(h))
        if reasons:
            return False, reasons
        stall_after = 2 * self.config.settings.peer_health.ping_interval_sec
        notes = [
            f"peer {peer_id}: stalled (no answer for {self._silent_for(peer_id, stall_after)})"
            for peer_id, h in health.items()
            if h.stalled
        ]
        # Ready (a peer whose engine has not started yet looks the same), but said: a wrong
        # prefix or address is a split that nothing else reports.
        notes += [
            f"peer {peer_id}: no store under prefix {peer.keys.prefix!r} (peer.no_store)"
            for peer_id, peer in self.peers.items()
            if peer.no_store
        ]
        if any(p.membership is not None and p.membership.unread for p in self.parts.values()):
            notes.append(f"this node: {UNREAD_NOTE} (membership.unread)")
        # Said once, however many partitions say it: each partition keeps its own record.
        for note in (n for p in self.parts.values() if p.membership for n in p.membership.notes()):
            if note not in notes:
                notes.append(note)
        return True, notes

    def _silent_for(self, peer_id: str, at_least: float) -> str:
        """How long the peer has not answered, as readiness says it: measured from its last
        answer, or "over N s" (the stall threshold) when it never answered."""
        last = self.peers[peer_id].last_ok
        if last is None:
            return f"over {at_least:.0f}s"
        return f"{time.monotonic() - last:.0f}s"

    def _not_ready(self, h: PeerHealth) -> list[str]:
        """Why one peer's link keeps this node from being vouched for (empty: it does not)."""
        slo = self.config.settings.slo
        max_lag_ms, max_events = slo.max_replication_lag_sec * 1000, slo.max_replication_lag_events
        reasons = []
        if h.mode is not None and not h.mode.vouches:
            reasons.append(f"{h.mode}: {h.problem}" if h.problem else str(h.mode))
        elif h.mode is not None and h.connected and h.lag_ms is None:
            reasons.append("lag not known yet")
        if h.lag_ms is not None and h.lag_ms > max_lag_ms:
            reasons.append(f"lag {h.lag_ms} ms exceeds {max_lag_ms:.0f} ms")
        if max_events is not None and h.lag_events is not None and h.lag_events > max_events:
            reasons.append(f"lag {h.lag_events} events exceeds {max_events}")
        return reasons


def _matching(running: Mapping[str, object], names: str | Iterable[str] | None) -> list[str]:
    """The running tasks that ``names`` (names or fnmatch patterns; None: all) picks out."""
    if names is None:
        return list(running)
    wanted = [names] if isinstance(names, str) else list(names)
    unmatched = [w for w in wanted if not fnmatch.filter(running, w)]
    if unmatched:
        raise EngineError(
            f"abort({unmatched!r}): no running task matches; running: {sorted(running)}"
        )
    return [n for n in running if any(fnmatch.fnmatchcase(n, w) for w in wanted)]


def _exposure_ms(tailer: Tailer, peer: Peer) -> int | None:
    """Age of the peer's newest write not yet applied here, as best known.

    While the peer is unreachable this grows with the time since it was last heard from: writes
    it took after that are unreplicated too.
    """
    if tailer.lag_ms is None or tailer.cursor is None:
        return tailer.lag_ms
    if peer.connected:
        return tailer.lag_ms
    # It may have taken writes until the moment it failed, which is at most now.
    return max(tailer.lag_ms, int(time.time() * 1000) - tailer.cursor.ms)


def _exposure_events(tailer: Tailer, peer: Peer) -> int | None:
    """Entries not applied here: exact at the last read, extrapolated while unreachable."""
    if tailer.lag_events is None or peer.connected or tailer.last_read_at is None:
        return tailer.lag_events
    silent = max(0.0, time.monotonic() - tailer.last_read_at)
    return tailer.lag_events + round((tailer.growth_per_sec or 0.0) * silent)


def vars_of(stats: Any) -> dict[str, int]:
    return {name: getattr(stats, name) for name in stats.__slots__}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _redacted(text: str) -> str:
    return redact_url(text)
