"""Prometheus's naming rules for metrics, as a pure check of a text exposition.

What ``promtool check metrics`` lints, as far as a name can break it, plus this project's own
rules (STYLE.md, "Logging and metrics"), after https://prometheus.io/docs/practices/naming/:
base units, ``_total`` on counters and only there, no abbreviated units, no
``_count``/``_sum``/``_bucket`` outside histograms and summaries, no type in the name, every
name under ``replication_``. Used on a live scrape where promtool is not installed, and
beside it where it is.
"""

from __future__ import annotations

import re

__all__ = ["naming_problems"]

# Unit abbreviations promtool's linter rejects as name parts, and a few more spellings.
ABBREVIATED_UNITS = frozenset(
    "s ms us ns sec secs msec usec min mins hr hrs h d m b kb mb gb tb pb".split()
)
# Units that are not base units, with the base unit to use instead.
NON_BASE_UNITS = {
    "milliseconds": "seconds",
    "microseconds": "seconds",
    "nanoseconds": "seconds",
    "minutes": "seconds",
    "hours": "seconds",
    "days": "seconds",
    "weeks": "seconds",
    "kilobytes": "bytes",
    "megabytes": "bytes",
    "gigabytes": "bytes",
    "bits": "bytes",
    "percent": "ratio",
}
# Words that make a name a duration or an age, which must then be in seconds ("lag" is not
# one: replication_lag_events is a count).
TIME_WORDS = frozenset({"duration", "latency", "age", "uptime", "timeout", "delay"})
METRIC_TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# Families that collectors of prometheus_client itself export (process, platform, GC).
RUNTIME_PREFIXES = ("process_", "python_")
SNAKE_CASE = re.compile(r"[a-z_][a-z0-9_]*")


def naming_problems(text: str) -> list[str]:
    """What breaks the naming rules in one Prometheus text exposition, one line per problem.

    Names are read from the ``# TYPE`` and ``# HELP`` lines and the samples as written:
    prometheus_client's parser would add ``_total`` to a counter that lacks it.
    """
    types: dict[str, str] = {}
    helps: dict[str, str] = {}
    samples: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            types[name] = kind
        elif line.startswith("# HELP "):
            _, _, name, *words = line.split(" ")
            helps[name] = " ".join(words)
        elif line.strip() and not line.startswith("#"):
            samples.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    problems: list[str] = []
    for name, kind in types.items():
        problems += _family_problems(name, kind, helps.get(name, ""))
    for sample in sorted(samples):
        family = next((f for f in _families_of(sample) if f in types), None)
        if family is None:
            problems.append(f"{sample}: a sample of no declared family (no # TYPE)")
        elif sample != family and types[family] not in ("histogram", "summary"):
            problems.append(f"{sample}: not the name of its {types[family]} family {family}")
    return problems


def _families_of(sample: str) -> list[str]:
    return [sample] + [sample.removesuffix(s) for s in HISTOGRAM_SERIES if sample.endswith(s)]


def _family_problems(name: str, kind: str, help_text: str) -> list[str]:
    problems: list[str] = []
    if not help_text.strip():
        problems.append(f"{name}: no help text")
    if not SNAKE_CASE.fullmatch(name):
        problems.append(f"{name}: not snake_case (a colon is for recording rules)")
    if not name.startswith(("replication_", *RUNTIME_PREFIXES)):
        problems.append(f"{name}: the engine's metrics are named replication_*")
    parts = name.split("_")
    for part in parts:
        if part in ABBREVIATED_UNITS:
            problems.append(f"{name}: abbreviated unit {part!r}; use a base unit in full")
        if part in NON_BASE_UNITS:
            problems.append(f"{name}: {part!r} is not a base unit; use {NON_BASE_UNITS[part]}")
        if part in METRIC_TYPES:
            problems.append(f"{name}: the metric type {part!r} is in the name")
    if kind == "counter" and not name.endswith("_total"):
        problems.append(f"{name}: a counter's name ends in _total")
    if kind != "counter" and name.endswith("_total"):
        problems.append(f"{name}: only counters end in _total ({kind})")
    if kind not in ("histogram", "summary"):
        for suffix in HISTOGRAM_SERIES:
            if name.endswith(suffix):
                problems.append(f"{name}: {suffix} is for histograms and summaries ({kind})")
    counted = name.removesuffix("_created").removesuffix("_total")
    if TIME_WORDS & set(parts) and not counted.endswith("_seconds"):
        problems.append(f"{name}: a duration or an age is in seconds (name it *_seconds)")
    return problems
