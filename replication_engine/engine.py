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
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from replication_engine.clock import HLC, wall_clock_ms
from replication_engine.codec import StreamId
from replication_engine.config import EngineConfig
from replication_engine.connection import TlsOptions
from replication_engine.cursor import CursorStore
from replication_engine.errors import ReplicationError
from replication_engine.hot_path import CursorSaveFailed, Tailer, TailerMode, TailerSettings
from replication_engine.membership import Membership
from replication_engine.merkle import Geometry, GeometryError
from replication_engine.observability.metrics import ENGINE_STATES, Metrics
from replication_engine.peer import Peer
from replication_engine.redaction import redact_url
from replication_engine.resilience import Backoff, breaker_state, make_breaker, sleep_or_stop
from replication_engine.scrub import Scrub
from replication_engine.store.protocol import RecordKeeper
from replication_engine.store.redis_store import RedisStore

if TYPE_CHECKING:
    from replication_engine.cold_path import ColdPath, RepairStats
    from replication_engine.observability.http import HttpServer

log = logging.getLogger(__name__)

_RESTART_BASE_SEC = 0.5
_RESTART_MAX_SEC = 30.0
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


class ReplicationEngine:
    def __init__(
        self,
        config: EngineConfig,
        store: RecordKeeper | None = None,
        *,
        metrics: Metrics | None = None,
        clock: HLC | None = None,
    ) -> None:
        self.config = config
        self.node_id = config.local_node_id
        self.metrics = metrics or Metrics()
        self.store: RecordKeeper | None = store
        self._owns_store = store is None
        self._clock = clock
        self.cursors: CursorStore | None = None
        self.peers: dict[str, Peer] = {}
        self.tailers: dict[str, Tailer] = {}
        self.cold_path: ColdPath | None = None
        self.membership: Membership | None = None
        self.scrub: Scrub | None = None
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
                "relay": self.config.relay,
                "relay_why": self.config.relay_reason(),
            },
        )

    async def _open(self) -> None:
        cfg = self.config
        geometry = Geometry(cfg.settings.merkle.fanout, cfg.settings.merkle.depth)
        if self.store is None:
            try:
                self.store = await RedisStore.connect(
                    cfg.local.redis_url,
                    node_id=cfg.local_node_id,
                    prefix=cfg.local.prefix,
                    username=cfg.local.username,
                    password=(
                        cfg.local.password.get_secret_value() if cfg.local.password else None
                    ),
                    fanout=geometry.fanout,
                    depth=geometry.depth,
                    stream_maxlen=cfg.local.stream_maxlen,
                    max_memory_ratio=cfg.local.max_memory_ratio,
                    max_clock_offset_sec=cfg.local.max_clock_offset_sec,
                    max_batch_bytes=cfg.settings.hot_path.max_batch_bytes,
                    read_only=cfg.mode == "follower",
                    hlc=self._clock,
                    cluster=cfg.local.cluster,
                    cluster_addresses=cfg.local.cluster_addresses,
                )
            except GeometryError as exc:
                raise EngineError(f"local store: {exc}") from exc
            except Exception as exc:
                raise EngineError(
                    f"local store at {_redacted(cfg.local.redis_url)} "
                    f"is unreachable: {type(exc).__name__}: {_redacted(str(exc))}"
                ) from exc
        else:
            if self.store.node_id != cfg.local_node_id:
                raise EngineError(
                    f"store node_id {self.store.node_id!r} differs from local_node_id "
                    f"{cfg.local_node_id!r}"
                )
            if self.store.geometry != geometry:
                raise EngineError(
                    f"store geometry fanout={self.store.geometry.fanout} "
                    f"depth={self.store.geometry.depth} differs from settings.merkle "
                    f"fanout={geometry.fanout} depth={geometry.depth}"
                )
        if not isinstance(self.store, RecordKeeper):
            raise EngineError(
                f"the engine needs a store that keeps its record (claims, certification, "
                f"tombstone collection: store.protocol.RecordKeeper, docs/DELETES.md), got "
                f"{type(self.store).__name__}"
            )
        if cfg.mode == "follower":
            self.store.read_only = True  # a follower takes writes only from its upstream
        # A store handed in by a parent daemon applies in calls no bigger than configured.
        self.store.max_batch_bytes = min(
            self.store.max_batch_bytes, cfg.settings.hot_path.max_batch_bytes
        )
        try:
            self.cursors = await CursorStore.open(
                cfg.cursor.sqlite_path,
                wal_mode=cfg.cursor.wal_mode,
                quarantine_max_rows=cfg.cursor.quarantine_max_rows,
            )
        except Exception as exc:
            raise EngineError(f"cursor.sqlite_path: {exc}") from exc
        # Rows trimmed at open, for a quarantine_max_rows lowered since the file was written.
        self.metrics.quarantine_evicted.inc(self.cursors.evicted)
        self.metrics.declare_peers(p.node_id for p in cfg.peers)
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
            )
        # Always: with cold_path.enabled false it still runs the repairs that are requested
        # (quarantined entries, gaps, a recovery), just no periodic cycles.
        self.cold_path = self._new_cold_path()
        if not cfg.settings.cold_path.enabled:
            log.info(
                "engine.periodic_repair_off",
                extra={
                    "node": self.node_id,
                    "hint": "settings.cold_path.enabled is false: no periodic repair cycles; "
                    "requested repairs (quarantined entries, stream gaps, a recovery) still run",
                },
            )
        await self._open_membership()
        if cfg.http.enabled:
            # Imported only when serving: aiohttp is about 0.1 s of an embedder's start-up.
            from replication_engine.observability.http import HttpServer

            self.http = HttpServer(self, cfg.http.host, cfg.http.port)
            try:
                await self.http.start()
            except OSError as exc:
                raise EngineError(f"http.listen {cfg.http.listen!r}: {exc}") from exc

    def _new_cold_path(self) -> ColdPath:
        from replication_engine.cold_path import ColdPath

        assert self.store is not None and self.cursors is not None
        return ColdPath(
            self.store,
            list(self.peers.values()),
            self.cursors,
            self.config.settings.cold_path,
            self.metrics,
            is_catching_up=self._any_catching_up,
            local_breaker=self.local_breaker,
            relay=self.config.relay,
            is_forgotten=self._is_forgotten,
            on_complete=self._on_repair_complete,
        )

    def _wall_ms(self) -> Callable[[], int]:
        # The store's clock, so that "too far ahead" is judged as its writes are stamped.
        return self.store.clock.wall if self.store is not None else wall_clock_ms

    def _is_forgotten(self, peer_id: str) -> bool:
        return self.membership is not None and self.membership.is_forgotten(peer_id)

    def _on_repair_complete(self, peer_id: str, began: float) -> None:
        if self.membership is not None:
            self.membership.on_repair_complete(peer_id, began)

    async def _open_membership(self) -> None:
        """Open this store's record and certify it before anything runs (docs/DELETES.md).

        A store that may have lost writes (restored, wiped, new) goes into recovery here, and
        the HLC floor is restored before start() returns.
        """
        cfg = self.config
        assert self.store is not None and self.cursors is not None
        cold_path = self.cold_path
        assert cold_path is not None
        self.membership = Membership(
            node_id=self.node_id,
            mode=cfg.mode,
            relay=cfg.relay,
            store=self.store,
            cursors=self.cursors,
            peers=list(self.peers.values()),
            metrics=self.metrics,
            interval_sec=cfg.settings.membership.interval_sec,
            gc_batch=cfg.settings.membership.gc_batch,
            scrub_per_tick=cfg.settings.membership.scrub_per_tick,
            request_repair=lambda peer_id, reason: cold_path.request_repair(peer_id, reason=reason),
            on_forgotten=self._on_forgotten,
        )
        self.scrub = Scrub(
            self.store,
            self.cursors,
            self.metrics,
            cfg.settings.scrub,
            heal=cold_path.heal,
        )
        try:
            await self.membership.open()
        except Exception as exc:
            raise EngineError(
                f"opening this node's record in the local store failed: "
                f"{type(exc).__name__}: {_redacted(str(exc))}"
            ) from exc

    def _spawn_tasks(self) -> None:
        cfg = self.config
        if cfg.settings.hot_path.enabled:
            for peer_id in self.peers:
                if self._is_forgotten(peer_id):
                    continue
                self._tasks[f"tailer:{peer_id}"] = asyncio.create_task(
                    self._supervise_tailer(peer_id), name=f"re-tailer-{peer_id}"
                )
        if self.cold_path is not None:
            self._tasks["cold_path"] = asyncio.create_task(
                self._supervise("cold_path", self.cold_path.run), name="re-cold-path"
            )
        if cfg.settings.peer_health.enabled:
            for peer_id in self.peers:
                self._tasks[f"health:{peer_id}"] = asyncio.create_task(
                    self._health_loop(self.peers[peer_id]), name=f"re-health-{peer_id}"
                )
        if self.membership is not None:
            membership = self.membership
            self._tasks["membership"] = asyncio.create_task(
                self._supervise("membership", lambda: membership.run(self._stop)),
                name="re-membership",
            )
        if self.scrub is not None:
            scrub = self.scrub
            self._tasks["scrub"] = asyncio.create_task(
                self._supervise("scrub", lambda: scrub.run(self._stop)), name="re-scrub"
            )

    # ------------------------------------------------------------------------ tasks

    def _new_tailer(self, peer_id: str) -> Tailer:
        assert self.store is not None and self.cursors is not None
        cold = self.cold_path
        tailer = Tailer(
            self.peers[peer_id],
            self.store,
            self.cursors,
            local_node_id=self.node_id,
            settings=TailerSettings.from_config(self.config),
            metrics=self.metrics,
            local_breaker=self.local_breaker,
            on_gap=self._on_gap,
            on_unanchored=self._on_unanchored,
            on_quarantine=self._on_quarantine,
            repair_pending=cold.has_pending if cold is not None else (lambda peer_id: False),
            bootstrap=self._bootstrap if cold is not None else None,
            wall_ms=self._wall_ms(),
        )
        self.tailers[peer_id] = tailer
        return tailer

    async def _supervise_tailer(self, peer_id: str) -> None:
        backoff = Backoff(_RESTART_BASE_SEC, _RESTART_MAX_SEC)
        while not self._stop.is_set():
            tailer = self._new_tailer(peer_id)
            try:
                await tailer.run()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._record_crash(f"tailer:{peer_id}", exc, peer_id=peer_id)
                if isinstance(exc, CursorSaveFailed):
                    tailer.mode = TailerMode.CURSOR_SAVE_FAILED
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

    def _record_crash(self, name: str, exc: BaseException, *, peer_id: str | None = None) -> None:
        message = _redacted(f"{type(exc).__name__}: {exc}")[:500]
        self.tailer_errors[name] = message
        self.tailer_restarts[name] = self.tailer_restarts.get(name, 0) + 1
        if peer_id is not None:
            self.metrics.tailer_restarts.labels(peer_id).inc()
        log.error(
            "engine.task_crashed",
            exc_info=exc,
            extra={"task": name, "error": message, "hint": "restarting with backoff"},
        )

    async def _health_loop(self, peer: Peer) -> None:
        """Ping a peer that has been quiet, so a dead one is flagged even with no traffic."""
        health = self.config.settings.peer_health
        interval = health.ping_interval_sec
        quiet = min(health.idle_threshold_sec, interval)
        while True:
            # Publish before pinging: a hung peer holds the ping for the op timeout.
            self.metrics.peer_stalled.labels(peer.node_id).set(int(peer.stalled(2 * interval)))
            if peer.stalled(quiet):
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(interval):
                        await peer.ping()
            self.metrics.peer_stalled.labels(peer.node_id).set(int(peer.stalled(2 * interval)))
            if await sleep_or_stop(self._stop, interval):
                return

    def _any_catching_up(self) -> bool:
        return any(
            t.catching_up and t.mode is TailerMode.CATCHING_UP for t in self.tailers.values()
        )

    def _on_gap(self, peer_id: str) -> None:
        if self.cold_path is not None:
            self.cold_path.request_repair(peer_id, reason="gap")

    def _on_unanchored(self, peer_id: str) -> None:
        if self.cold_path is not None and not self.cold_path.is_requested(peer_id, "anchor"):
            self.cold_path.request_repair(peer_id, reason="anchor")

    def _on_quarantine(self, peer_id: str, keys: Sequence[str], reason: str) -> None:
        if self.cold_path is not None:
            self.cold_path.request_repair(peer_id, reason=reason, keys=keys)

    def _on_forgotten(self, peer_id: str) -> None:
        """A configured peer became forgotten: stop reading it (its task ends on its own)."""
        tailer = self.tailers.get(peer_id)
        if tailer is not None:
            tailer.stop()

    async def _bootstrap(self, peer: Peer) -> StreamId:
        assert self.cold_path is not None
        log.info("engine.bootstrap_started", extra={"peer": peer.node_id})
        tail = await self.cold_path.bootstrap(peer)
        log.info("engine.bootstrap_complete", extra={"peer": peer.node_id, "cursor": str(tail)})
        return tail

    # ------------------------------------------------------------------------ operations

    async def repair_once(self) -> RepairStats:
        """One cold-path cycle now, whatever the schedule."""
        if self.cold_path is None:
            raise EngineError("the cold path is not configured (settings.cold_path.enabled)")
        return await self.cold_path.repair_once(force=True)

    async def reset_peer(self, peer_id: str) -> None:
        """Forget a peer's cursor so its next start re-bootstraps (operator request).

        The store keeps its own position in the peer's stream (docs/DELETES.md), so the next
        start resumes there unless the store has none; a copy is a repair and removes nothing.
        """
        assert self.cursors is not None
        await self.cursors.delete(peer_id)

    async def forget(self, node_id: str) -> None:
        """Forget a member gone for good: collection stops waiting for it, nothing is read
        from it any more (docs/DELETES.md, "Membership"). Spreads to every node through the
        records; to bring the machine back, wipe its store and give it a new node id.

        Raises:
            EngineError: the engine is not running, or ``node_id`` is this node.
        """
        if self.membership is None or self._state is not EngineState.RUNNING:
            raise EngineError(f"forget({node_id!r}) needs a running engine")
        try:
            await self.membership.forget(node_id)
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
            if self.cold_path is not None:
                self.cold_path.stop()
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
        """Per-peer replication state; safe to publish (no credentials)."""
        slo = self.config.settings.slo
        peers: dict[str, Any] = {}
        for peer_id, peer in self.peers.items():
            tailer = self.tailers.get(peer_id)
            health = self._peer_health(peer_id)
            entry: dict[str, Any] = {
                "url": peer.display_url,
                "connected": health.connected,
                "stalled": health.stalled,
                "circuit": peer.circuit_state,
                "latency_ms": _round(peer.latency_ms),
                "last_activity": peer.last_ok_wall,
                "last_error": peer.last_error,
            }
            if tailer is not None:
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
                    restarts=self.tailer_restarts.get(f"tailer:{peer_id}", 0),
                    error=self.tailer_errors.get(f"tailer:{peer_id}"),
                    **{f"events_{k}": v for k, v in vars_of(tailer.stats).items()},
                )
            if self.cold_path is not None:
                entry["repair"] = self.cold_path.status()["peers"].get(peer_id)
            peers[peer_id] = entry
        return {
            "node_id": self.node_id,
            "state": self._state,
            "mode": self.config.mode,
            "uptime_sec": _round(time.monotonic() - self._started_at) if self._started_at else 0,
            "local_circuit": breaker_state(self.local_breaker),
            # Certification, recovery, members and tombstone collection (docs/DELETES.md).
            "membership": self.membership.status() if self.membership is not None else None,
            # Payloads re-hashed and healed, stray keys under the prefix (README).
            "scrub": self.scrub.status() if self.scrub is not None else None,
            "hot_path": self.config.settings.hot_path.enabled,
            "cold_path": self.config.settings.cold_path.enabled,
            "max_replication_lag_sec": slo.max_replication_lag_sec,
            "max_replication_lag_events": slo.max_replication_lag_events,
            "peers": peers,
        }

    def _peer_health(self, peer_id: str) -> PeerHealth:
        peer, tailer = self.peers[peer_id], self.tailers.get(peer_id)
        stall_after = 2 * self.config.settings.peer_health.ping_interval_sec
        stalled = peer.stalled(stall_after) if self._state is EngineState.RUNNING else False
        lag_known = tailer is not None and peer.connected and not stalled
        return PeerHealth(
            connected=peer.connected,
            stalled=stalled,
            mode=tailer.mode if tailer is not None else None,
            lag_ms=tailer.lag_ms if lag_known and tailer is not None else None,
            lag_events=tailer.lag_events if lag_known and tailer is not None else None,
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
        recovering = self.membership.not_ready_reason() if self.membership is not None else None
        if recovering is not None:
            reasons.append(recovering)
        if health and not any(h.connected for h in health.values()):
            reasons.append("all peers are disconnected")
        for peer_id, h in health.items():
            reasons.extend(f"peer {peer_id}: {why}" for why in self._not_ready(h))
        if reasons:
            return False, reasons
        stall_after = 2 * self.config.settings.peer_health.ping_interval_sec
        notes = [
            f"peer {peer_id}: stalled (no answer for {stall_after:.0f}s)"
            for peer_id, h in health.items()
            if h.stalled
        ]
        return True, notes

    def _not_ready(self, h: PeerHealth) -> list[str]:
        """Why one peer's link keeps this node from being vouched for (empty: it does not)."""
        slo = self.config.settings.slo
        max_lag_ms, max_events = slo.max_replication_lag_sec * 1000, slo.max_replication_lag_events
        reasons = []
        if h.mode is not None and not h.mode.vouches:
            reasons.append(str(h.mode))
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
