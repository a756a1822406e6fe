"""The metrics registry: names by the rules, series that exist from start, runtime collectors.

Pure: a ``Metrics`` registry is built and rendered in memory, and the package's sources are
read to find every quarantine reason and tailer mode the code can set. The same naming rules
run on a live scrape in ``tests/integration/test_metrics_naming.py``.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import redis
from integration.metric_rules import naming_problems
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.metrics import MetricWrapperBase

from replication_engine import __version__
from replication_engine.hot_path import TailerMode
from replication_engine.observability.metrics import (
    QUARANTINE_REASONS,
    REPAIR_RESULTS,
    SLOS,
    Metrics,
)

PACKAGE = Path(__file__).resolve().parents[2] / "replication_engine"


def test_the_rules_catch_each_kind_of_bad_name() -> None:
    bad = """\
# HELP replication_lag_ms Age of the newest unapplied entry
# TYPE replication_lag_ms gauge
replication_lag_ms{peer="b"} 3
# HELP replication_lag_milliseconds Age of the newest unapplied entry
# TYPE replication_lag_milliseconds gauge
replication_lag_milliseconds 3
# HELP replication_flush_duration Time to apply one batch
# TYPE replication_flush_duration gauge
replication_flush_duration 0.1
# HELP replication_batches Batches applied
# TYPE replication_batches counter
replication_batches 4
# HELP replication_items_count Items held
# TYPE replication_items_count gauge
replication_items_count 2
# HELP replication_evicted_total Rows evicted
# TYPE replication_evicted_total gauge
replication_evicted_total 1
# HELP replication_peer_gauge Peers
# TYPE replication_peer_gauge gauge
replication_peer_gauge 1
# HELP other_thing Not ours
# TYPE other_thing gauge
other_thing 1
# TYPE replication_undocumented gauge
replication_undocumented 1
"""
    problems = "\n".join(naming_problems(bad))
    for expected in (
        "replication_lag_ms: abbreviated unit 'ms'",
        "replication_lag_milliseconds: 'milliseconds' is not a base unit",
        "replication_flush_duration: a duration or an age is in seconds",
        "replication_batches: a counter's name ends in _total",
        "replication_items_count: _count is for histograms",
        "replication_evicted_total: only counters end in _total",
        "replication_peer_gauge: the metric type 'gauge' is in the name",
        "other_thing: the engine's metrics are named replication_*",
        "replication_undocumented: no help text",
    ):
        assert expected in problems, f"{expected!r} not reported in:\n{problems}"


def test_every_metric_the_engine_declares_follows_the_rules() -> None:
    metrics = Metrics()
    metrics.declare_peers(["b"])
    assert naming_problems(metrics.render().decode()) == []


def test_every_per_peer_counter_exists_at_zero_for_each_configured_peer_from_start() -> None:
    metrics = Metrics()
    metrics.declare_peers(["b", "c"])
    per_peer = [
        m
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase)
        and m._type in ("counter", "histogram")
        and "peer" in m._labelnames
    ]
    assert len(per_peer) >= 15, [m._name for m in per_peer]
    for wrapper in per_peer:
        for family in wrapper.collect():
            found = {s.labels["peer"] for s in family.samples if not s.name.endswith("_created")}
            assert found == {"b", "c"}, family.name
            assert all(
                s.value == 0 for s in family.samples if s.name.endswith(("_total", "_count"))
            )
    # Gauges are not: a lag of 0 before the first read would claim a caught-up peer.
    assert metrics.registry.get_sample_value("replication_lag_seconds", {"peer": "b"}) is None
    for slo in SLOS:
        assert (
            metrics.registry.get_sample_value("replication_slo_breaches_total", {"slo": slo}) == 0
        )
    for result in REPAIR_RESULTS:
        value = metrics.registry.get_sample_value(
            "replication_repair_cycles_total", {"result": result}
        )
        assert value == 0, result


def test_the_build_info_names_the_versions_it_runs() -> None:
    labels = {
        "version": __version__,
        "python": platform.python_version(),
        "redis_py": redis.__version__,
    }
    assert Metrics().registry.get_sample_value("replication_build_info", labels) == 1.0


def test_engines_in_one_process_each_export_the_process_metrics_without_colliding() -> None:
    engines = [Metrics(), Metrics()]
    # A registry that exports them already (as the process-global one does) keeps its own.
    shared = CollectorRegistry()
    ProcessCollector(registry=shared)
    engines.append(Metrics(shared))
    for metrics in engines:
        assert metrics.registry.get_sample_value("process_cpu_seconds_total") is not None
        assert {"python_info", "python_gc_objects_collected_total"} <= metrics.names()
        types = [line for line in metrics.render().decode().splitlines() if "TYPE" in line]
        assert len(types) == len(set(types)), "a family exported twice"


def test_every_quarantine_reason_the_code_gives_has_its_series_from_start() -> None:
    given: set[str] = set()
    for module in ("codec.py", "hot_path.py"):
        source = (PACKAGE / module).read_text(encoding="utf-8")
        given |= set(re.findall(r"reason\s*=\s*\"([a-z_]+)\"", source))  # also exc.reason = "..."
    assert given, "no reason found: the pattern no longer matches the code"
    given |= {"refused", "clock_skew"}  # Tailer._count sets these aside by name
    missing = given - set(QUARANTINE_REASONS)
    assert not missing, f"add to metrics.QUARANTINE_REASONS: {sorted(missing)}"
    metrics = Metrics()
    metrics.declare_peers(["b"])
    for reason in QUARANTINE_REASONS:
        value = metrics.registry.get_sample_value(
            "replication_cdc_events_quarantined_total", {"peer": "b", "reason": reason}
        )
        assert value == 0.0, reason


def test_every_tailer_mode_is_published_and_none_is_set_as_bare_text() -> None:
    """A mode is a TailerMode (mypy holds the setter to it); a string set by hand would be a
    mode no series exists for. Publishing one mode writes every member's series."""
    for module in PACKAGE.rglob("*.py"):
        source = module.read_text(encoding="utf-8")
        assert not re.findall(r"\.mode\s*=\s*\"", source), f"{module.name} sets a mode as text"
    metrics = Metrics()
    metrics.publish_tailer_mode("b", TailerMode.TAILING, tuple(TailerMode))
    published = {
        mode: metrics.registry.get_sample_value(
            "replication_tailer_mode", {"peer": "b", "mode": mode.value}
        )
        for mode in TailerMode
    }
    assert published == {mode: float(mode is TailerMode.TAILING) for mode in TailerMode}
