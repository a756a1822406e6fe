"""Prometheus metrics, one registry per engine.

A registry per engine (rather than the process-global one) lets a parent daemon or a test run
several engines in one process without their per-peer series colliding.

Names follow https://prometheus.io/docs/practices/naming/: base units (seconds, bytes),
``_total`` on counters only (prometheus_client appends it to the names below), and a count of
things is named for the things (``replication_lag_events``), never with a unit suffix.
"""

from __future__ import annotations

import copy
import platform
from collections.abc import Callable, Collection, Iterable
from importlib import metadata
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

ENGINE_STATES = {"stopped": 0, "starting": 1, "running": 2, "stopping": 3}
CIRCUIT_STATES = {"closed": 0, "half-open": 1, "open": 2}

# Every reason a CDC entry is quarantined for: the codec's (codec.CodecError.reason), a clock
# too far ahead, a refusal by the local store. Their series exist from start (at 0), so that
# increase() sees the first quarantine after a restart; a reason added without being listed
# here still counts, only from its first occurrence.
QUARANTINE_REASONS = (
    "bad_encoding",
    "bad_hash",
    "bad_key",
    "bad_meta",
    "bad_stream_id",
    "bad_zstd",
    "clock_skew",
    "hash_mismatch",
    "malformed",
    "missing_field",
    "refused",
    "too_large",
    "unknown_op",
)
# The SLOs the hot path checks (settings.slo), as the `slo` label of slo_breaches.
SLOS = ("stream_read_latency", "batch_flush_latency")
# How a cold-path cycle ends, as the `result` label of repair_cycles.
REPAIR_RESULTS = ("ok", "error", "skipped")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_REPAIR_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)


class Metrics:
    """Every metric the engine exports, registered on one registry.

    Args:
        registry: where to register; a fresh one by default. The process, platform and GC
            collectors prometheus_client puts on its global registry are added too, unless the
            registry exports them already (the global one does).
    """

    def __init__(
        self, registry: CollectorRegistry | None = None, *, partitioned: bool = False
    ) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        peer = ["peer"]
        # A node of many partitions runs a tailer, a repair, a membership and a scrub per
        # partition: what they publish carries a last label, `partition`, through the view
        # each is handed (partition()). The peer links, the engine and the local store's
        # breaker are the node's own.
        self.partitioned = partitioned
        self._per_partition: list[str] = []

        def part(names: list[str]) -> list[str]:
            return [*names, "partition"] if partitioned else names

        self.build_info = Info(
            "replication_build",
            "Versions this engine runs: the package, Python and redis-py",
            registry=r,
        )
        self.build_info.info(_build_labels())
        self.events_read = Counter(
            "replication_cdc_events_read", "CDC entries read from peers", part(peer), registry=r
        )
        self.events_applied = Counter(
            "replication_cdc_events_applied",
            "Entries that changed the local store",
            part(peer),
            registry=r,
        )
        self.events_deduped = Counter(
            "replication_cdc_events_deduped",
            "Entries skipped as duplicates or older than local",
            part(peer),
            registry=r,
        )
        self.events_quarantined = Counter(
            "replication_cdc_events_quarantined",
            "Entries rejected and kept for inspection",
            part(["peer", "reason"]),
            registry=r,
        )
        self.quarantine_evicted = Counter(
            "replication_quarantine_evicted",
            "Quarantined entries dropped (oldest first) to keep the quarantine within its bound",
            registry=r,
        )
        self.echoes = Counter(
            "replication_cdc_echoes",
            "Entries dropped because this node wrote them",
            part(peer),
            registry=r,
        )
        self.batch_flushes = Counter(
            "replication_batch_flush", "Batches applied", part(peer), registry=r
        )
        self.batch_flush_seconds = Histogram(
            "replication_batch_flush_duration_seconds",
            "Time to apply one batch",
            part(peer),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Gauge(
            "replication_batch_size_entries",
            "Entries the next read from the peer asks for (AIMD batch size)",
            part(peer),
            registry=r,
        )
        self.lag = Gauge(
            "replication_lag_seconds",
            "Age of the newest entry of the peer's stream not yet applied here; while the "
            "peer cannot be read, that at the last read plus the time since (how far behind "
            "this node may be by now)",
            part(peer),
            registry=r,
        )
        self.lag_events = Gauge(
            "replication_lag_events", "Entries not yet applied (estimate)", part(peer), registry=r
        )
        self.tailer_mode = Gauge(
            "replication_tailer_mode",
            "1 for the mode the peer's tailer is in (tailing, catching_up, bootstrapping, "
            "waiting_for_peer, backpressure, local_store_unavailable, ...), 0 for the others",
            part(["peer", "mode"]),
            registry=r,
        )
        self.stream_gaps = Counter(
            "replication_stream_gaps",
            "Peer streams trimmed past our cursor",
            part(peer),
            registry=r,
        )
        self.backpressure_pauses = Counter(
            "replication_backpressure_pauses",
            "Pauses because the local store is under memory pressure",
            registry=r,
        )
        self.repair_cycles = Counter(
            "replication_repair_cycles", "Cold-path cycles", part(["result"]), registry=r
        )
        self.repair_failures = Counter(
            "replication_repair_failures",
            "Cold-path repairs of a peer that failed",
            part(peer),
            registry=r,
        )
        self.repair_items_fetched = Counter(
            "replication_repair_items_fetched",
            "Items fetched by the cold path",
            part(peer),
            registry=r,
        )
        self.repair_items_applied = Counter(
            "replication_repair_items_applied",
            "Items the cold path changed locally",
            part(peer),
            registry=r,
        )
        self.repair_items_corrupt = Counter(
            "replication_repair_items_corrupt",
            "Peer items the cold path could not decode, each version once (quarantined)",
            part(peer),
            registry=r,
        )
        self.repair_items_refused = Counter(
            "replication_repair_items_refused",
            "Peer items the cold path fetched that this store would not hold (stamped beyond "
            "the clock offset, a wrong-typed key here), each version once (quarantined)",
            part(peer),
            registry=r,
        )
        self.merkle_divergences = Counter(
            "replication_merkle_divergences",
            "Root comparisons that differed",
            part(peer),
            registry=r,
        )
        self.repair_seconds = Histogram(
            "replication_repair_duration_seconds",
            "Duration of one cold-path cycle",
            part([]),
            buckets=_REPAIR_BUCKETS,
            registry=r,
        )
        self.bootstraps = Counter(
            "replication_bootstraps",
            "Copies of a peer's data completed (a new node, or a peer whose cursor was reset)",
            part(peer),
            registry=r,
        )
        self.peer_connected = Gauge(
            "replication_peer_connected", "1 when the peer answers", peer, registry=r
        )
        self.peer_stalled = Gauge(
            "replication_peer_stalled",
            "1 when the peer has not answered within two ping intervals",
            peer,
            registry=r,
        )
        self.peer_circuit = Gauge(
            "replication_peer_circuit_state", "0 closed, 1 half-open, 2 open", peer, registry=r
        )
        self.peer_latency = Histogram(
            "replication_peer_latency_seconds",
            "Latency of peer operations",
            peer,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.engine_state = Gauge(
            "replication_engine_state", "0 stopped, 1 starting, 2 running, 3 stopping", registry=r
        )
        self.slo_breaches = Counter(
            "replication_slo_breaches", "SLO threshold breaches", ["slo"], registry=r
        )
        self.tailer_restarts = Counter(
            "replication_tailer_restarts",
            "Tailer tasks restarted after a crash",
            part(peer),
            registry=r,
        )
        self.local_circuit = Gauge(
            "replication_local_circuit_state",
            "Local store breaker: 0 closed, 1 half-open, 2 open",
            registry=r,
        )

        # Deletes by knowledge (docs/DELETES.md).
        self.tombstones = Gauge(
            "replication_tombstones",
            "Tombstones held in the local store (collected once every member holds them)",
            part([]),
            registry=r,
        )
        self.oldest_tombstone_age = Gauge(
            "replication_oldest_tombstone_age_seconds",
            "Age of the oldest tombstone held here (0 when none is held)",
            part([]),
            registry=r,
        )
        self.tombstones_collected = Counter(
            "replication_tombstones_collected",
            "Tombstones collected here, below the mesh's stable frontier",
            part([]),
            registry=r,
        )
        self.tombstone_collection_failures = Counter(
            "replication_tombstone_collection_failures",
            "Membership ticks whose tombstone collection failed (tombstones then pile up)",
            part([]),
            registry=r,
        )
        self.members = Gauge(
            "replication_members", "Members of the mesh this node knows of", part([]), registry=r
        )
        self.forgotten_members = Gauge(
            "replication_forgotten_members",
            "Nodes forgotten by an operator (replication-engine forget): never read again",
            part([]),
            registry=r,
        )
        self.stable_frontier_age = Gauge(
            "replication_stable_frontier_age_seconds",
            "How far behind now the mesh's stable frontier is: every member is known to hold "
            "every write older than this",
            part([]),
            registry=r,
        )
        self.member_holding = Gauge(
            "replication_member_holding_collection_seconds",
            "For how long this member has been the one whose knowledge holds the oldest "
            "tombstone back from collection (0: it is not)",
            part(["member"]),
            registry=r,
        )
        self.recovering = Gauge(
            "replication_recovering",
            "1 while this node recovers a store that may have lost writes (restored, wiped, "
            "restarted without its data)",
            part([]),
            registry=r,
        )
        self.recovery_pending = Gauge(
            "replication_recovery_pending",
            "1 while this node's recovery waits for a complete repair from the peer",
            part(peer),
            registry=r,
        )
        self.recoveries = Counter(
            "replication_recoveries", "Recoveries entered by this node", part([]), registry=r
        )
        self.tree_repairs = Counter(
            "replication_tree_repairs",
            "Merkle tree nodes found disagreeing with their children and rebuilt by the scrub",
            part([]),
            registry=r,
        )
        self.absence_drops = Counter(
            "replication_absence_drops",
            "Versions dropped here because a peer lacks them while its claims cover them "
            "(deleted and collected while this store was behind)",
            part(peer),
            registry=r,
        )
        self.written_off = Counter(
            "replication_written_off",
            "Versions here replaced by a peer's older one because its claims cover them: "
            "lost to a recovery and brought back by a restore (kept in the quarantine)",
            part(peer),
            registry=r,
        )
        self.scrub_items_checked = Counter(
            "replication_scrub_items_checked",
            "Stored items whose payload the scrub re-read and verified against its content hash",
            part([]),
            registry=r,
        )
        self.scrub_unreadable = Counter(
            "replication_scrub_unreadable",
            "Stored items found by the scrub whose payload does not verify (bit rot, a hand "
            "edit): each kept in the quarantine and replaced by a peer's copy that verifies",
            part([]),
            registry=r,
        )
        self.scrub_healed = Counter(
            "replication_scrub_healed",
            "Unreadable stored items replaced by a peer's copy that verifies",
            part([]),
            registry=r,
        )
        self.scrub_unhealed = Gauge(
            "replication_scrub_unhealed_items",
            "Unreadable stored items no peer could replace yet (retried every scrub pass)",
            part([]),
            registry=r,
        )
        self.scrub_passes = Counter(
            "replication_scrub_passes",
            "Complete passes of the payload scrub over the local store",
            part([]),
            registry=r,
        )
        self.stray_keys = Gauge(
            "replication_stray_keys",
            "Keys under the prefix that the format does not define or that have the wrong "
            "type, as counted by the last complete scan (a sample is in /status)",
            part([]),
            registry=r,
        )
        _register_runtime_collectors(r)
        if partitioned:
            self._per_partition = [
                name
                for name, value in vars(self).items()
                if isinstance(value, MetricWrapperBase) and "partition" in value._labelnames
            ]

    def partition(self, name: str) -> Metrics:
        """What one partition's tailers, repairs, membership and scrub publish through: the
        same registry, each per-partition family labelled ``partition=name``. The engine's
        own metrics when it has one partition."""
        if not self.partitioned:
            return self
        view = copy.copy(self)
        for attr in self._per_partition:
            setattr(view, attr, _Labelled(getattr(self, attr), name))
        return view

    def declare_peers(self, peer_ids: Iterable[str]) -> None:
        """Create every per-peer counter and histogram series at 0.

        A series born at its first increment has no earlier sample, so ``increase()`` and
        ``rate()`` miss that first gap or quarantine after a restart; created at start, it has.
        Gauges are left alone: a lag of 0 before the first read would claim a caught-up peer.
        """
        per_peer = (
            self.events_read,
            self.events_applied,
            self.events_deduped,
            self.echoes,
            self.batch_flushes,
            self.batch_flush_seconds,
            self.stream_gaps,
            self.repair_failures,
            self.repair_items_fetched,
            self.repair_items_applied,
            self.repair_items_corrupt,
            self.repair_items_refused,
            self.merkle_divergences,
            self.bootstraps,
            self.peer_latency,
            self.tailer_restarts,
            self.absence_drops,
            self.written_off,
        )
        for peer_id in peer_ids:
            for metric in per_peer:
                metric.labels(peer_id)
            for reason in QUARANTINE_REASONS:
                self.events_quarantined.labels(peer_id, reason)
        for slo in SLOS:
            self.slo_breaches.labels(slo)
        for result in REPAIR_RESULTS:
            self.repair_cycles.labels(result)

    def publish_tailer_mode(self, peer_id: str, mode: str, modes: Collection[str]) -> None:
        """Set ``mode`` to 1 and every other of ``modes`` to 0 for the peer's tailer."""
        for each in modes:
            self.tailer_mode.labels(peer_id, each).set(1 if each == mode else 0)

    def watch_circuit(self, gauge: Gauge, state: Callable[[], str]) -> None:
        """Make ``gauge`` report ``state()`` (a key of CIRCUIT_STATES) whenever it is read.

        Read at scrape time rather than set on pybreaker's transitions: pybreaker moves an
        open breaker to half-open only on the next call, while ``state`` (see
        ``resilience.breaker_state``) says half-open as soon as the reset timeout has passed,
        as ``/status`` does. The two cannot disagree.
        """
        gauge.set_function(lambda: float(CIRCUIT_STATES[state()]))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def names(self) -> set[str]:
        """Every exported sample family name (``_total`` for counters, ``_info`` for infos)."""
        suffix = {"counter": "_total", "info": "_info"}
        return {f.name + suffix.get(f.type, "") for f in self.registry.collect()}


class _Labelled:
    """A metric family with its last label (the partition) filled in."""

    def __init__(self, family: MetricWrapperBase, value: str) -> None:
        self._family = family
        self._value = value

    def labels(self, *values: str) -> Any:
        return self._family.labels(*values, self._value)

    def __getattr__(self, name: str) -> Any:
        # inc(), set(), observe() of a family whose only label is the partition.
        return getattr(self._family.labels(self._value), name)


def _build_labels() -> dict[str, str]:
    # Read here, not at import: the package's own __init__ imports this module before it
    # defines __version__.
    from replication_engine import __version__

    try:
        redis_py = metadata.version("redis")
    except metadata.PackageNotFoundError:
        redis_py = "unknown"
    return {"version": __version__, "python": platform.python_version(), "redis_py": redis_py}


def _register_runtime_collectors(registry: CollectorRegistry) -> None:
    """Add the process, platform and GC collectors, unless ``registry`` exports them already.

    Each engine's registry gets its own (they only read /proc and the interpreter, so several
    engines in one process each export the same figures). A registry handed in may have them
    (the process-global one does); a registry only detects a duplicate when it was made with
    ``auto_describe``, so what it exports is read instead, once, here.
    """
    exported = {family.name for family in registry.collect()}
    for collector, family in (
        (ProcessCollector, "process_cpu_seconds"),
        (PlatformCollector, "python_info"),
        (GCCollector, "python_gc_objects_collected"),
    ):
        if family not in exported:
            collector(registry=registry)
