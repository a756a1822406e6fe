"""Prometheus metrics, one registry per engine.

A registry per engine (rather than the process-global one) lets a parent daemon or a test run
several engines in one process without their per-peer series colliding.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ENGINE_STATES = {"stopped": 0, "starting": 1, "running": 2, "stopping": 3}
CIRCUIT_STATES = {"closed": 0, "half-open": 1, "open": 2}

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_REPAIR_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        peer = ["peer"]
        self.events_read = Counter(
            "replication_cdc_events_read", "CDC entries read from peers", peer, registry=r
        )
        self.events_applied = Counter(
            "replication_cdc_events_applied",
            "Entries that changed the local store",
            peer,
            registry=r,
        )
        self.events_deduped = Counter(
            "replication_cdc_events_deduped",
            "Entries skipped as duplicates or older than local",
            peer,
            registry=r,
        )
        self.events_quarantined = Counter(
            "replication_cdc_events_quarantined",
            "Entries rejected and kept for inspection",
            ["peer", "reason"],
            registry=r,
        )
        self.quarantine_evicted = Gauge(
            "replication_quarantine_evicted",
            "Quarantined entries dropped (oldest first) to keep the quarantine within its bound",
            registry=r,
        )
        self.echoes = Counter(
            "replication_cdc_echoes",
            "Entries dropped because this node wrote them",
            peer,
            registry=r,
        )
        self.batch_flushes = Counter("replication_batch_flush", "Batches applied", peer, registry=r)
        self.batch_flush_seconds = Histogram(
            "replication_batch_flush_duration_seconds",
            "Time to apply one batch",
            peer,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Gauge(
            "replication_batch_size", "Current read batch size (AIMD)", peer, registry=r
        )
        self.lag_ms = Gauge(
            "replication_lag_ms", "Age of the newest unapplied entry", peer, registry=r
        )
        self.lag_events = Gauge(
            "replication_lag_events", "Entries not yet applied (estimate)", peer, registry=r
        )
        self.stream_gaps = Counter(
            "replication_stream_gaps", "Peer streams trimmed past our cursor", peer, registry=r
        )
        self.backpressure_pauses = Counter(
            "replication_backpressure_pauses",
            "Pauses because the local store is under memory pressure",
            registry=r,
        )
        self.repair_cycles = Counter(
            "replication_repair_cycles", "Cold-path cycles", ["result"], registry=r
        )
        self.repair_failures = Counter(
            "replication_repair_failures",
            "Cold-path repairs of a peer that failed",
            peer,
            registry=r,
        )
        self.repair_items_fetched = Counter(
            "replication_repair_items_fetched", "Items fetched by the cold path", peer, registry=r
        )
        self.repair_items_applied = Counter(
            "replication_repair_items_applied",
            "Items the cold path changed locally",
            peer,
            registry=r,
        )
        self.repair_items_corrupt = Counter(
            "replication_repair_items_corrupt",
            "Peer items the cold path could not decode",
            peer,
            registry=r,
        )
        self.merkle_divergences = Counter(
            "replication_merkle_divergences", "Root comparisons that differed", peer, registry=r
        )
        self.repair_seconds = Histogram(
            "replication_repair_duration_seconds",
            "Duration of one cold-path cycle",
            buckets=_REPAIR_BUCKETS,
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
            "replication_tailer_restarts", "Tailer tasks restarted after a crash", peer, registry=r
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
            registry=r,
        )
        self.tombstones_collected = Counter(
            "replication_tombstones_collected",
            "Tombstones collected here, below the mesh's stable frontier",
            registry=r,
        )
        self.members = Gauge(
            "replication_members", "Members of the mesh this node knows of", registry=r
        )
        self.stable_frontier_age = Gauge(
            "replication_stable_frontier_age_seconds",
            "How far behind now the mesh's stable frontier is: every member is known to hold "
            "every write older than this",
            registry=r,
        )
        self.member_holding = Gauge(
            "replication_member_holding_collection_seconds",
            "For how long this member has been the one whose knowledge holds the oldest "
            "tombstone back from collection (0: it is not)",
            ["member"],
            registry=r,
        )
        self.recovering = Gauge(
            "replication_recovering",
            "1 while this node recovers a store that may have lost writes (restored, wiped, "
            "restarted without its data)",
            registry=r,
        )
        self.recoveries = Counter(
            "replication_recoveries", "Recoveries entered by this node", registry=r
        )
        self.tree_repairs = Counter(
            "replication_tree_repairs",
            "Merkle tree nodes found disagreeing with their children and rebuilt by the scrub",
            registry=r,
        )
        self.absence_drops = Counter(
            "replication_absence_drops",
            "Versions dropped here because a peer lacks them while its claims cover them "
            "(deleted and collected while this store was behind)",
            peer,
            registry=r,
        )
        self.written_off = Counter(
            "replication_written_off",
            "Versions here replaced by a peer's older one because its claims cover them: "
            "lost to a recovery and brought back by a restore (kept in the quarantine)",
            peer,
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def names(self) -> set[str]:
        """Every exported sample family name (with ``_total`` for counters)."""
        out = set()
        for family in self.registry.collect():
            out.add(family.name + ("_total" if family.type == "counter" else ""))
        return out
