"""Config loading: defaults, both file shapes, environment overrides and error reporting.

Most assertions are on the error text itself, because naming the field path and never leaking a
password are the contract of this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from replication_engine.config import (
    ConfigError,
    EngineConfig,
    PeerConfig,
    load_config,
    parse_duration,
)
from replication_engine.redaction import redact_url

REPO_ROOT = Path(__file__).resolve().parents[2]
SECRET = "hunter2-Very-Secret"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(data: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_mapping(data, env=env or {})
    return str(info.value)


def peer(node_id: str = "b", **extra: Any) -> dict[str, Any]:
    return {"node_id": node_id, "redis_url": f"redis://{node_id}.internal:6379/0", **extra}


# ------------------------------------------------------------------------------------------------
# Defaults and shapes


def test_minimal_config_takes_every_default() -> None:
    config = EngineConfig.from_mapping({"local_node_id": "node-a"}, env={})

    assert config.local_node_id == "node-a"
    assert config.mode == "mesh"
    assert config.local.redis_url == "redis://127.0.0.1:6379/0"
    assert config.local.prefix == ""
    assert config.local.stream_maxlen == 100_000
    assert (config.settings.membership.interval_sec, config.settings.membership.gc_batch) == (
        2.0,
        500,
    )
    assert config.local.max_memory_ratio == 0.9
    hot = config.settings.hot_path
    assert (hot.enabled, hot.batch_size, hot.block_timeout_sec) == (True, 100, 5.0)
    assert (hot.adaptive_batch_size, hot.min_batch_size, hot.max_batch_size) == (True, 50, 1000)
    assert (hot.rate_limit_enabled, hot.rate_limit_per_sec, hot.rate_limit_burst) == (
        False,
        10_000,
        1000,
    )
    assert hot.shutdown_timeout_sec == 10.0
    cold = config.settings.cold_path
    assert (cold.enabled, cold.interval_sec, cold.max_items_per_cycle) == (True, 60, 1000)
    assert (cold.backoff_base_sec, cold.backoff_max_sec) == (5, 300)
    assert (cold.drill_concurrency, cold.fetch_batch_size, cold.root_cache_ttl_sec) == (8, 200, 5)
    assert cold.bootstrap_rate_limit_per_sec == 50_000
    health = config.settings.peer_health
    assert (health.enabled, health.ping_interval_sec, health.idle_threshold_sec) == (True, 30, 60)
    slo = config.settings.slo
    assert slo.max_stream_read_latency_ms == 100
    assert slo.max_peer_op_latency_ms == 500
    assert slo.max_batch_flush_latency_ms == 200
    assert slo.max_replication_lag_sec == 30
    assert slo.max_replication_lag_events is None
    assert (config.settings.merkle.fanout, config.settings.merkle.depth) == (256, 2)
    assert config.peers == []
    assert config.cursor.sqlite_path == "replication_cursors.db"
    assert config.cursor.wal_mode is True
    assert config.cursor.quarantine_max_rows == 10_000
    assert config.http.enabled is True
    assert (config.http.listen, config.http.host, config.http.port) == (
        "127.0.0.1:9636",
        "127.0.0.1",
        9636,
    )


def test_peer_defaults_and_helpers() -> None:
    config = EngineConfig.from_mapping(
        {
            "local_node_id": "a",
            "local": {"prefix": "app:"},
            "peers": [peer("b"), peer("c", prefix="other:")],
        },
        env={},
    )
    b, c = config.peers
    assert (b.priority, b.circuit_failure_threshold, b.circuit_reset_timeout_sec) == (0, 5, 30)
    assert b.start_from == "snapshot"
    assert (b.username, b.password, b.prefix) == (None, None, None)
    assert (b.tls.ca_file, b.tls.cert_file, b.tls.key_file, b.tls.verify) == (
        None,
        None,
        None,
        True,
    )
    assert b.effective_prefix(config.local.prefix) == "app:"
    assert c.effective_prefix(config.local.prefix) == "other:"


def test_plain_model_validate_works_on_the_inner_mapping() -> None:
    config = EngineConfig.model_validate({"local_node_id": "a", "peers": [peer("b")]})
    assert config.peers[0].node_id == "b"
    with pytest.raises(ValidationError):
        EngineConfig.model_validate({"local_node_id": "a", "bogus": 1})


def test_config_is_frozen() -> None:
    config = EngineConfig.from_mapping({"local_node_id": "a"}, env={})
    with pytest.raises(ValidationError):
        config.local_node_id = "b"
    with pytest.raises(ValidationError):
        config.settings.hot_path.batch_size = 5


def test_file_with_replication_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
replication:
  local_node_id: node-a
  settings:
    hot_path:
      block_timeout_sec: 250ms
  peers:
    - node_id: node-b
      redis_url: redis://127.0.0.1:6380/0
""",
    )
    config = load_config(path, env={})
    assert config.local_node_id == "node-a"
    assert config.settings.hot_path.block_timeout_sec == pytest.approx(0.25)
    assert config.peers[0].node_id == "node-b"


def test_file_without_replication_key(tmp_path: Path) -> None:
    path = write(tmp_path, "local_node_id: node-a\nmode: follower\n")
    config = load_config(str(path), env={})
    assert (config.local_node_id, config.mode) == ("node-a", "follower")


def test_sibling_sections_of_a_shared_file_are_ignored(tmp_path: Path) -> None:
    path = write(tmp_path, "daemon:\n  workers: 4\nreplication:\n  local_node_id: a\n")
    assert load_config(path, env={}).local_node_id == "a"


def test_from_mapping_accepts_both_shapes() -> None:
    inner = {"local_node_id": "a"}
    assert EngineConfig.from_mapping(inner, env={}) == EngineConfig.from_mapping(
        {"replication": inner}, env={}
    )


def test_example_file_loads() -> None:
    config = load_config(REPO_ROOT / "config.example.yaml", env={})
    assert config.local_node_id == "node-a"
    assert config.local.redis_url == "redis://127.0.0.1:6379/0"
    assert config.local.prefix == "app:"
    assert [p.node_id for p in config.peers] == ["node-b"]
    assert config.peers[0].redis_url == "redis://127.0.0.1:6380/0"
    assert config.peers[0].effective_prefix(config.local.prefix) == "app:"


def test_example_file_documents_every_option() -> None:
    text = (REPO_ROOT / "config.example.yaml").read_text(encoding="utf-8")
    config = EngineConfig.from_mapping({"local_node_id": "a", "peers": [peer("b")]}, env={})
    dumped = config.model_dump()
    names: set[str] = set()

    def collect(value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                names.add(key)
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)

    collect(dumped)
    missing = sorted(name for name in names if f"{name}:" not in text)
    assert missing == []


# ------------------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("given_value", "seconds"),
    [
        ("5s", 5.0),
        ("100ms", 0.1),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        (" 10 s ", 10.0),
        ("7", 7.0),
        ("0.25", 0.25),
        (3, 3.0),
        (2.5, 2.5),
        ("0s", 0.0),
    ],
)
def test_parse_duration(given_value: object, seconds: float) -> None:
    assert parse_duration(given_value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad", ["", "5x", "s", "5 sec", "-1s", -1, "inf", float("nan"), True, None, [5], "1h-5m"]
)
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_duration_fields_accept_numbers_and_text() -> None:
    config = EngineConfig.from_mapping(
        {
            "local_node_id": "a",
            "settings": {"hot_path": {"block_timeout_sec": 2, "shutdown_timeout_sec": "1m"}},
        },
        env={},
    )
    assert config.settings.hot_path.block_timeout_sec == 2.0
    assert config.settings.hot_path.shutdown_timeout_sec == 60.0


def test_zero_block_timeout_is_rejected() -> None:
    text = problems_of(
        {"local_node_id": "a", "settings": {"hot_path": {"block_timeout_sec": "0s"}}}
    )
    assert "settings.hot_path.block_timeout_sec: must be > 0, got '0s'" in text


def test_every_duration_field_names_its_unit_and_takes_the_same_forms() -> None:
    """A field whose type is a duration ends in _sec or _ms, and takes '2m' as well as a
    number in its unit; a rate (_per_sec) is not a duration."""
    from replication_engine.config import models

    durations = []
    sections = [models.SettingsConfig, models.LocalConfig, models.PeerConfig]
    while sections:
        section = sections.pop()
        for name, info in section.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, models._Section):
                sections.append(annotation)
                continue
            if any(
                getattr(m, "func", None) in (models._duration_field, models._duration_ms_field)
                for m in info.metadata
            ):
                durations.append((section.__name__, name))
                assert name.endswith(("_sec", "_ms")), f"{section.__name__}.{name} has no unit"
            elif name.endswith("_sec") and not name.endswith("per_sec"):
                raise AssertionError(f"{section.__name__}.{name} does not take duration text")
    assert len(durations) >= 15, durations
    config = EngineConfig.from_mapping(
        {
            "local_node_id": "a",
            "settings": {
                "cold_path": {"interval_sec": "2m", "root_cache_ttl_sec": "0s"},
                "slo": {"max_batch_flush_latency_ms": "1s", "max_peer_op_latency_ms": 250},
            },
        },
        env={},
    )
    assert config.settings.cold_path.interval_sec == 120.0
    assert config.settings.cold_path.root_cache_ttl_sec == 0.0
    assert config.settings.slo.max_batch_flush_latency_ms == 1000.0
    assert config.settings.slo.max_peer_op_latency_ms == 250.0


def test_a_field_renamed_for_its_unit_is_still_read_under_its_old_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING"):
        config = EngineConfig.from_mapping(
            {
                "local_node_id": "a",
                "settings": {"hot_path": {"block_timeout": "2s", "min_read_interval": 0}},
            },
            env={},
        )
    assert config.settings.hot_path.block_timeout_sec == 2.0
    assert config.settings.hot_path.min_read_interval_sec == 0.0
    renamed = [r for r in caplog.records if r.getMessage() == "config.renamed_field"]
    assert {(r.field, r.use) for r in renamed} == {  # type: ignore[attr-defined]
        ("block_timeout", "block_timeout_sec"),
        ("min_read_interval", "min_read_interval_sec"),
    }


def test_a_renamed_field_given_under_both_names_is_an_error_naming_both() -> None:
    text = problems_of(
        {
            "local_node_id": "a",
            "settings": {"hot_path": {"block_timeout": "2s", "block_timeout_sec": "3s"}},
        }
    )
    assert "block_timeout and block_timeout_sec are the same setting" in text


# ------------------------------------------------------------------------------------------------
# Environment overrides


def test_env_overrides_scalars_with_yaml_typing() -> None:
    config = EngineConfig.from_mapping(
        {"local_node_id": "a"},
        env={
            "REPLICATION_ENGINE__LOCAL__REDIS_URL": "redis://10.0.0.5:6379/1",
            "REPLICATION_ENGINE__SETTINGS__HOT_PATH__BATCH_SIZE": "500",
            "REPLICATION_ENGINE__SETTINGS__HOT_PATH__MAX_BATCH_SIZE": "5000",
            "REPLICATION_ENGINE__SETTINGS__HOT_PATH__ADAPTIVE_BATCH_SIZE": "false",
            "REPLICATION_ENGINE__SETTINGS__HOT_PATH__BLOCK_TIMEOUT": "5s",
            "REPLICATION_ENGINE__SETTINGS__SLO__MAX_REPLICATION_LAG_EVENTS": "1000",
            "UNRELATED": "ignored",
        },
    )
    assert config.local.redis_url == "redis://10.0.0.5:6379/1"
    assert config.settings.hot_path.batch_size == 500
    assert config.settings.hot_path.max_batch_size == 5000
    assert config.settings.hot_path.adaptive_batch_size is False
    assert config.settings.hot_path.block_timeout_sec == 5.0
    assert config.settings.slo.max_replication_lag_events == 1000


def test_env_override_beats_file_value(tmp_path: Path) -> None:
    path = write(tmp_path, "replication:\n  local_node_id: a\n  local:\n    prefix: 'file:'\n")
    config = load_config(path, env={"REPLICATION_ENGINE__LOCAL__PREFIX": "env:"})
    assert config.local.prefix == "env:"


def test_env_names_are_case_insensitive() -> None:
    config = EngineConfig.from_mapping(
        {"local_node_id": "a"}, env={"replication_engine__Local__Stream_MaxLen": "42"}
    )
    assert config.local.stream_maxlen == 42


def test_env_peer_password_by_index_stays_text() -> None:
    config = EngineConfig.from_mapping(
        {"local_node_id": "a", "peers": [peer("b"), peer("c")]},
        env={
            "REPLICATION_ENGINE__PEERS__1__PASSWORD": "012345",
            "REPLICATION_ENGINE__PEERS__1__USERNAME": "yes",
            "REPLICATION_ENGINE__PEERS__0__PRIORITY": "3",
        },
    )
    password = config.peers[1].password
    assert isinstance(password, SecretStr)
    assert password.get_secret_value() == "012345"
    assert config.peers[1].username == "yes"
    assert config.peers[0].priority == 3


def test_env_can_set_the_required_node_id_and_nested_sections() -> None:
    config = EngineConfig.from_mapping(
        {},
        env={
            "REPLICATION_ENGINE__LOCAL_NODE_ID": "from-env",
            "REPLICATION_ENGINE__CURSOR__SQLITE_PATH": "/var/lib/re/cursors.db",
        },
    )
    assert config.local_node_id == "from-env"
    assert config.cursor.sqlite_path == "/var/lib/re/cursors.db"


def test_env_for_missing_peer_index_names_the_variable() -> None:
    text = problems_of(
        {"local_node_id": "a", "peers": [peer("b")]},
        env={"REPLICATION_ENGINE__PEERS__3__PASSWORD": SECRET},
    )
    assert "REPLICATION_ENGINE__PEERS__3__PASSWORD" in text
    assert "peers[3] does not exist" in text
    assert SECRET not in text


def test_env_for_peer_when_no_peers_configured() -> None:
    text = problems_of(
        {"local_node_id": "a"}, env={"REPLICATION_ENGINE__PEERS__0__REDIS_URL": "redis://x:1"}
    )
    assert "REPLICATION_ENGINE__PEERS__0__REDIS_URL: peers[0] does not exist" in text


def test_env_with_unknown_field_is_an_error_naming_the_variable() -> None:
    text = problems_of(
        {"local_node_id": "a"}, env={"REPLICATION_ENGINE__SETTINGS__HOT_PATH__BATCH_SIZ": "5"}
    )
    assert "settings.hot_path.batch_siz: unknown field (did you mean 'batch_size'?" in text
    assert "(from REPLICATION_ENGINE__SETTINGS__HOT_PATH__BATCH_SIZ)" in text


def test_env_with_bad_value_names_field_and_variable() -> None:
    text = problems_of(
        {"local_node_id": "a"}, env={"REPLICATION_ENGINE__SETTINGS__HOT_PATH__BATCH_SIZE": "many"}
    )
    assert "settings.hot_path.batch_size: expected an integer, got 'many'" in text
    assert "REPLICATION_ENGINE__SETTINGS__HOT_PATH__BATCH_SIZE" in text


def test_env_with_empty_segment_is_an_error() -> None:
    text = problems_of({"local_node_id": "a"}, env={"REPLICATION_ENGINE__LOCAL____PREFIX": "x"})
    assert "REPLICATION_ENGINE__LOCAL____PREFIX" in text


def test_env_into_a_scalar_is_an_error() -> None:
    text = problems_of({"local_node_id": "a"}, env={"REPLICATION_ENGINE__LOCAL_NODE_ID__X": "1"})
    assert "REPLICATION_ENGINE__LOCAL_NODE_ID__X: local_node_id is not a mapping" in text


def test_env_defaults_to_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICATION_ENGINE__HTTP__LISTEN", "0.0.0.0:0")
    config = EngineConfig.from_mapping({"local_node_id": "a"})
    assert (config.http.host, config.http.port) == ("0.0.0.0", 0)


def test_explicit_empty_env_ignores_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPLICATION_ENGINE__HTTP__LISTEN", "0.0.0.0:0")
    assert EngineConfig.from_mapping({"local_node_id": "a"}, env={}).http.port == 9636


# ------------------------------------------------------------------------------------------------
# Validation errors name the field path


def test_batch_bounds_name_the_fields() -> None:
    text = problems_of(
        {
            "local_node_id": "a",
            "settings": {"hot_path": {"min_batch_size": 500, "max_batch_size": 60}},
        }
    )
    assert "settings.hot_path.min_batch_size: must be <= batch_size (100), got 500" in text
    assert "settings.hot_path.max_batch_size: must be >= batch_size (100), got 60" in text


def test_max_batch_size_is_bounded() -> None:
    text = problems_of(
        {"local_node_id": "a", "settings": {"hot_path": {"max_batch_size": 10_000_000}}}
    )
    assert "settings.hot_path.max_batch_size: must be <= 100000, got 10000000" in text


def test_min_batch_size_must_be_positive() -> None:
    text = problems_of({"local_node_id": "a", "settings": {"hot_path": {"min_batch_size": 0}}})
    assert "settings.hot_path.min_batch_size: must be >= 1, got 0" in text


def test_cold_path_backoff_order_and_positives() -> None:
    text = problems_of({"local_node_id": "a", "settings": {"cold_path": {"backoff_base_sec": 600}}})
    lines = [line.strip() for line in text.splitlines()]
    assert "settings.cold_path.backoff_base_sec: must be <= backoff_max_sec (300), got 600" in lines
    text = problems_of(
        {
            "local_node_id": "a",
            "settings": {"cold_path": {"interval_sec": 0, "drill_concurrency": 0}},
        }
    )
    assert "settings.cold_path.interval_sec: must be > 0, got 0" in text
    assert "settings.cold_path.drill_concurrency: must be >= 1, got 0" in text


@pytest.mark.parametrize(
    ("merkle", "expected"),
    [
        ({"fanout": 100}, "settings.merkle.fanout: expected a power of two in 2..65536, got 100"),
        ({"fanout": 1}, "settings.merkle.fanout: expected a power of two in 2..65536, got 1"),
        ({"fanout": 131072}, "settings.merkle.fanout: expected a power of two"),
        ({"depth": 0}, "settings.merkle.depth: expected 1..4, got 0"),
        ({"depth": 5}, "settings.merkle.depth: expected 1..4, got 5"),
        (
            {"fanout": 65536, "depth": 3},
            "settings.merkle.depth: must satisfy depth * log2(fanout) <= 32",
        ),
    ],
)
def test_merkle_geometry(merkle: dict[str, int], expected: str) -> None:
    assert expected in problems_of({"local_node_id": "a", "settings": {"merkle": merkle}})


def test_merkle_geometry_limits_accepted() -> None:
    for fanout, depth in [(2, 4), (65536, 2), (256, 4), (16, 1)]:
        config = EngineConfig.from_mapping(
            {"local_node_id": "a", "settings": {"merkle": {"fanout": fanout, "depth": depth}}},
            env={},
        )
        assert config.settings.merkle.fanout == fanout


def test_peer_url_scheme_error_matches_documented_form() -> None:
    text = problems_of(
        {"local_node_id": "a", "peers": [peer("b"), {"node_id": "c", "redis_url": "http://x"}]}
    )
    assert (
        "peers[1].redis_url: expected a redis://, rediss:// or unix:// URL, got 'http://x'" in text
    )


@pytest.mark.parametrize(
    "url", ["redis://", "redis://h:99999", "redis://h:port", "redis://h:6379/db", "unix://"]
)
def test_malformed_redis_urls(url: str) -> None:
    text = problems_of({"local_node_id": "a", "peers": [{"node_id": "b", "redis_url": url}]})
    assert "peers[0].redis_url: expected" in text


@pytest.mark.parametrize(
    "url", ["redis://h:6379/0", "rediss://u:p@h:6380", "unix:///run/redis.sock", "redis://[::1]:1"]
)
def test_good_redis_urls(url: str) -> None:
    config = EngineConfig.from_mapping(
        {"local_node_id": "a", "peers": [{"node_id": "b", "redis_url": url}]}, env={}
    )
    assert config.peers[0].redis_url == url


def test_peer_ids_unique_and_not_local() -> None:
    text = problems_of(
        {
            "local_node_id": "a",
            "peers": [peer("b"), peer("a"), {"node_id": "b", "redis_url": "redis://other:1/0"}],
        }
    )
    assert "peers[1].node_id: must differ from local_node_id, got 'a'" in text
    assert "peers[2].node_id: must be unique (already used by peers[0]), got 'b'" in text


def test_peer_reading_same_redis_and_prefix_twice() -> None:
    text = problems_of({"local_node_id": "a", "peers": [peer("b"), {**peer("b"), "node_id": "c"}]})
    assert "peers[1].redis_url: must not read the same Redis and prefix as peers[0]" in text


def test_peer_reading_local_redis_with_local_prefix() -> None:
    text = problems_of(
        {"local_node_id": "a", "peers": [{"node_id": "b", "redis_url": "redis://127.0.0.1:6379/0"}]}
    )
    assert "peers[0].redis_url: must not read the same Redis and prefix as local.redis_url" in text


def test_a_prefix_with_a_brace_is_refused_naming_the_field() -> None:
    text = problems_of(
        {
            "local_node_id": "a",
            "local": {"prefix": "app{1}:"},
            "peers": [{**peer("b"), "prefix": "x}"}],
        }
    )
    assert "local.prefix: expected a key prefix without '{' or '}'" in text
    assert "peers[0].prefix: expected a key prefix without '{' or '}'" in text


def test_same_redis_with_other_prefix_is_fine() -> None:
    config = EngineConfig.from_mapping(
        {
            "local_node_id": "a",
            "local": {"prefix": "a:"},
            "peers": [{"node_id": "b", "redis_url": "redis://127.0.0.1:6379/0", "prefix": "b:"}],
        },
        env={},
    )
    assert config.peers[0].prefix == "b:"


def test_required_peer_fields() -> None:
    text = problems_of({"local_node_id": "a", "peers": [{"priority": 1}]})
    assert "peers[0].node_id: required field is missing" in text
    assert "peers[0].redis_url: required field is missing" in text


def test_tls_needs_rediss() -> None:
    text = problems_of({"local_node_id": "a", "peers": [peer("b", tls={"ca_file": "/etc/ca.pem"})]})
    assert "peers[0].tls: is set, so redis_url must be rediss://" in text
    text = problems_of(
        {
            "local_node_id": "a",
            "peers": [
                {"node_id": "b", "redis_url": "rediss://b:6380", "tls": {"key_file": "/k.pem"}}
            ],
        }
    )
    assert "peers[0].tls.cert_file: required when tls.key_file is set" in text


def test_a_cluster_is_reached_over_tcp_with_database_0() -> None:
    text = problems_of(
        {
            "local_node_id": "a",
            "local": {"redis_url": "unix:///run/redis.sock", "cluster": True},
            "peers": [peer("b", redis_url="redis://:hunter2@b:7000/3", cluster=True)],
        }
    )
    assert "local.redis_url: must be redis:// or rediss:// when cluster is true" in text
    assert "peers[0].redis_url: must name database 0 (or none) when cluster is true" in text
    assert "hunter2" not in text
    ok = EngineConfig.from_mapping(
        {
            "local_node_id": "a",
            "local": {"redis_url": "rediss://a:7000", "cluster": True},
            "peers": [peer("b", redis_url="redis://b:7000/0", cluster=True)],
        },
        env={},
    )
    assert ok.local.cluster and ok.peers[0].cluster


def test_a_cluster_address_table_maps_host_port_to_host_port_and_needs_a_cluster() -> None:
    text = problems_of(
        {
            "local_node_id": "a",
            "local": {"cluster_addresses": {"10.0.0.1:7000": "gw:17000"}},
            "peers": [
                peer(
                    "b",
                    cluster=True,
                    cluster_addresses={"10.0.0.2:7000": "gw:x", "10.0.0.3": "gw:17002"},
                )
            ],
        }
    )
    assert "local.cluster_addresses: is set, so cluster must be true" in text
    assert "peers[0].cluster_addresses.10.0.0.2:7000: expected host:port with a port" in text
    assert "got 'gw:x'" in text
    assert "peers[0].cluster_addresses.10.0.0.3: expected host:port (an IPv6 host" in text
    ok = EngineConfig.from_mapping(
        {
            "local_node_id": "a",
            "peers": [
                peer("b", cluster=True, cluster_addresses={"[fe80::1]:7000": "gw.example:17000"})
            ],
        },
        env={},
    )
    assert ok.peers[0].cluster_addresses == {"[fe80::1]:7000": "gw.example:17000"}


def test_start_from_and_mode_literals() -> None:
    text = problems_of(
        {"local_node_id": "a", "mode": "leader", "peers": [peer("b", start_from="middle")]}
    )
    assert "mode: expected 'mesh' or 'follower', got 'leader'" in text
    assert "peers[0].start_from: expected 'snapshot', 'beginning' or 'latest', got 'middle'" in text


@pytest.mark.parametrize("node_id", ["", "has space", "slash/y", "x" * 129])
def test_bad_local_node_id(node_id: str) -> None:
    assert "local_node_id: expected 1-128 characters" in problems_of({"local_node_id": node_id})


def test_missing_local_node_id() -> None:
    assert "local_node_id: required field is missing" in problems_of({})


def test_unknown_field_suggests_the_right_name() -> None:
    text = problems_of({"local_node_id": "a", "cursor": {"sqlite_pth": "x.db"}})
    assert "cursor.sqlite_pth: unknown field (did you mean 'sqlite_path'?" in text


def test_wrong_types_name_the_field() -> None:
    text = problems_of(
        {
            "local_node_id": "a",
            "local": {"stream_maxlen": "lots", "max_memory_ratio": 1.5},
            "settings": {"hot_path": {"enabled": "maybe"}, "peer_health": "on"},
            "peers": {"node_id": "b"},
        }
    )
    assert "local.stream_maxlen: expected an integer, got 'lots'" in text
    assert "local.max_memory_ratio: must be <= 1" in text
    assert "settings.hot_path.enabled: expected true or false, got 'maybe'" in text
    assert "settings.peer_health: expected a mapping, got 'on'" in text
    assert "peers: expected a list, got {'node_id': 'b'}" in text


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("127.0.0.1:9636", "127.0.0.1", 9636),
        ("[::1]:0", "::1", 0),
        ("localhost:65535", "localhost", 65535),
    ],
)
def test_http_listen_forms(listen: str, host: str, port: int) -> None:
    config = EngineConfig.from_mapping({"local_node_id": "a", "http": {"listen": listen}}, env={})
    assert (config.http.host, config.http.port) == (host, port)


@pytest.mark.parametrize("listen", ["9636", ":9636", "host:", "host:65536", "host:-1", "::1:80"])
def test_http_listen_rejects(listen: str) -> None:
    text = problems_of({"local_node_id": "a", "http": {"listen": listen}})
    assert "http.listen: expected host:port with port 0..65535" in text
    assert repr(listen) in text


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_mapping(
            {
                "local_node_id": "a",
                "mode": "x",
                "cursor": {"quarantine_max_rows": 0},
                "http": {"listen": "nope"},
            },
            env={},
        )
    assert len(info.value.problems) == 3
    assert "(3 problems)" in str(info.value)
    assert info.value.source == "<mapping>"
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------------------------------------
# File problems


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read") as info:
        load_config(tmp_path, env={})
    assert str(tmp_path) in str(info.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path, f"replication:\n  local_node_id: a\n  peers: [\n    password: '{SECRET}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = str(info.value)
    assert str(path) in text
    assert "not valid YAML at line" in text
    assert SECRET not in text
    assert info.value.__cause__ is None


def test_yaml_error_line_number_is_the_bad_line(tmp_path: Path) -> None:
    path = write(tmp_path, "local_node_id: a\nlocal:\n  prefix: x\n   bad: indent\n")
    with pytest.raises(ConfigError, match="line 4"):
        load_config(path, env={})


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "local_node_id: a\npeers: []\npeers: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert "duplicate key 'peers'" in str(info.value)
    assert "line 3" in str(info.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_document_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match="expected a mapping at the top level") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_replication_key_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "replication: [1, 2]\n")
    with pytest.raises(ConfigError, match="replication: expected a mapping"):
        load_config(path, env={})


def test_empty_file_reports_missing_node_id(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    with pytest.raises(ConfigError, match="local_node_id: required field is missing") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"local_node_id: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path, env={})


def test_validation_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "replication:\n  local_node_id: a\n  mode: leader\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert f"in {path}" in str(info.value)
    assert info.value.source == str(path)


# ------------------------------------------------------------------------------------------------
# Secrets


def test_password_never_in_error_text() -> None:
    text = problems_of(
        {
            "local_node_id": "a",
            "local": {"redis_url": f"redis://:{SECRET}@h:99999/0"},
            "peers": [
                {"node_id": "b", "redis_url": f"http://user:{SECRET}@x"},
                {"node_id": "c", "redis_url": "redis://c:1/0", "password": 12345},
                {"node_id": "d", "redis_url": "redis://d:1/0", "passwd": SECRET},
                {"node_id": "e", "redis_url": f"redis://h:1/0?password={SECRET}", "prio": 1},
            ],
        }
    )
    assert SECRET not in text
    assert "12345" not in text
    assert (
        "peers[0].redis_url: expected a redis://, rediss:// or unix:// URL, got 'http://user:***@x'"
        in text
    )
    assert "peers[1].password: expected a string, got '***'" in text
    assert "peers[2].passwd: unknown field (did you mean 'password'?" in text


def test_password_not_in_error_from_env() -> None:
    text = problems_of(
        {"local_node_id": "a", "peers": [peer("b")]},
        env={
            "REPLICATION_ENGINE__PEERS__0__PASSWORD": SECRET,
            "REPLICATION_ENGINE__PEERS__0__REDIS_URL": f"ftp://u:{SECRET}@h",
        },
    )
    assert SECRET not in text
    assert "peers[0].redis_url" in text


def test_password_not_in_error_cause() -> None:
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_mapping(
            {"local_node_id": "a", "peers": [{"node_id": "b", "redis_url": f"x://u:{SECRET}@h"}]},
            env={},
        )
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_repr_str_and_redacted_dict_hide_passwords() -> None:
    config = EngineConfig.from_mapping(
        {
            "local_node_id": "a",
            "local": {"redis_url": f"redis://admin:{SECRET}@127.0.0.1:6379/0"},
            "peers": [
                peer("b", password=SECRET, username="repl"),
                {"node_id": "c", "redis_url": f"rediss://u:{SECRET}@c:6380/0"},
            ],
        },
        env={},
    )
    for text in (repr(config), str(config), repr(config.peers[1]), str(config.redacted_dict())):
        assert SECRET not in text
    redacted = config.redacted_dict()
    assert redacted["peers"][0]["password"] == "***"
    assert redacted["peers"][1]["password"] is None
    assert redacted["peers"][1]["redis_url"] == "rediss://u:***@c:6380/0"
    assert redacted["local"]["redis_url"] == "redis://admin:***@127.0.0.1:6379/0"
    assert config.peers[1].display_url == "rediss://u:***@c:6380/0"
    secret = config.peers[0].password
    assert secret is not None and secret.get_secret_value() == SECRET


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
        ("redis://:pw@host", "redis://:***@host"),
        ("rediss://user@host", "rediss://user@host"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://host/0?password=pw&db=1", "redis://host/0?password=***&db=1"),
        ("unix://u:pw@/run/redis.sock", "unix://u:***@/run/redis.sock"),
        ("redis://u:p@ss/w#rd@host:1", "redis://u:***@host:1"),
        ("u:pw@host", "u:***@host"),
        ("", ""),
        ("not a url", "not a url"),
        # Mistyped schemes, as a config error quotes them.
        ("got 'redis//:typo-pw@h:1/0'", "got 'redis//:***@h:1/0'"),
        ("redis:://:typo-pw@h", "redis:***@h"),
        ("//:typo-pw@h", "//:***@h"),
        # An unescaped blank in the password.
        ("at redis://:two words@h:1/0 failed", "at redis://:***@h:1/0 failed"),
        # Not secrets: a user without a password, a Lua error's position, a cluster node's
        # bus port, a URL without credentials ahead of an address.
        ("rediss://user@host", "rediss://user@host"),
        (
            "ERR (call to f_re_put): @user_script:57: boom",
            "ERR (call to f_re_put): @user_script:57: boom",
        ),
        ("10.0.0.1:6379@16379 master", "10.0.0.1:6379@16379 master"),
        (
            "redis://h:6379 refused; mail ops@example.com",
            "redis://h:6379 refused; mail ops@example.com",
        ),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_a_configured_password_is_masked_wherever_it_shows() -> None:
    secret = "Reg1stered-Only-Here"
    EngineConfig.model_validate(
        {
            "local_node_id": "a",
            "peers": [{"node_id": "b", "redis_url": "redis://h:1/0", "password": secret}],
        }
    )
    shown = redact_url(f"AuthenticationError: invalid password {secret!r} for user default")
    assert secret not in shown and "***" in shown


@given(
    user=st.from_regex(r"[a-z0-9]{0,8}", fullmatch=True),
    password=st.from_regex(r"[A-Z/?#@%!]{6,20}", fullmatch=True),
    host=st.from_regex(r"[a-z0-9.\-]{1,20}", fullmatch=True),
    tail=st.sampled_from(["", ":6379", ":6379/0", "/2?x=1"]),
)
@settings(max_examples=200, deadline=None)
def test_redact_url_hides_any_password(user: str, password: str, host: str, tail: str) -> None:
    # Password characters include the URL delimiters an operator may forget to escape.
    redacted = redact_url(f"redis://{user}:{password}@{host}{tail}")
    assert password not in redacted
    assert redacted.startswith(f"redis://{user}:***@")


@given(st.text(max_size=200))
@settings(max_examples=300, deadline=None)
def test_redact_url_never_raises(text: str) -> None:
    assert isinstance(redact_url(text), str)


# ------------------------------------------------------------------------------------------------
# Robustness: bad input only ever raises ConfigError

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["5s", "redis://h:1/0", "mesh", "a", "b", "0.0.0.0:0"]),
)
_keys = st.one_of(
    st.sampled_from(
        [
            "local_node_id",
            "local",
            "settings",
            "hot_path",
            "peers",
            "node_id",
            "redis_url",
            "password",
            "tls",
            "merkle",
            "fanout",
            "http",
            "listen",
            "cursor",
            "replication",
        ]
    ),
    st.text(max_size=8),
    st.integers(min_value=0, max_value=3),
)
_documents = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_keys, children, max_size=5)
    ),
    max_leaves=25,
)


@given(document=_documents, env_key=st.sampled_from(["", "PEERS__0__PASSWORD", "LOCAL__PREFIX"]))
@settings(max_examples=300, deadline=None)
def test_arbitrary_documents_raise_only_config_error(document: Any, env_key: str) -> None:
    env = {f"REPLICATION_ENGINE__{env_key}": "x"} if env_key else {}
    try:
        EngineConfig.from_mapping(document, env=env)
    except ConfigError:
        pass


def test_peer_config_repr_redacts() -> None:
    peer_config = PeerConfig(node_id="b", redis_url=f"redis://u:{SECRET}@b:1/0")
    assert SECRET not in repr(peer_config)
    assert "redis://u:***@b:1/0" in repr(peer_config)


def test_yaml_alias_that_contains_itself_is_an_error(tmp_path: Path) -> None:
    # Found by fuzz/fuzz_config.py: copying the document recursed until RecursionError.
    path = write(
        tmp_path,
        "base: &b {node_id: *b, redis_url: 'redis://b:0/0'}\n"
        "replication:\n  local_node_id: a\n  peers: [*b]\n",
    )
    with pytest.raises(ConfigError, match=r"peers\[0\]\.node_id.*nested more than") as info:
        load_config(path, env={})
    assert str(path) in str(info.value)


def test_yaml_aliases_expanding_exponentially_are_an_error(tmp_path: Path) -> None:
    # Eight levels of ten aliases each: 10**8 values once copied, a few hundred bytes of YAML.
    lines = ["    l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        lines.append(f"    l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    path = write(tmp_path, "local_node_id: a\nlaughs:\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="more than 100,000 values"):
        load_config(path, env={})


# ------------------------------------------------------------------------------------------------
# Defects found with the deletes audit


def test_model_validate_never_quotes_a_password_in_its_errors() -> None:
    bad = {
        "local_node_id": "a",
        "local": {"redis_url": f"redis://:{SECRET}@host:notaport/0"},
        "peers": [{"node_id": "a", "redis_url": f"redis://:{SECRET}@peer:6379/0"}],
    }
    with pytest.raises(ValidationError) as raised:
        EngineConfig.model_validate(bad)
    assert SECRET not in str(raised.value)
    assert SECRET not in repr(raised.value)


@pytest.mark.parametrize(
    ("local_prefix", "peer_prefix"), [("", "item:"), ("app:", "app:b:"), ("app:b:", "app:")]
)
def test_two_prefixes_on_one_redis_that_overlap_are_refused(
    local_prefix: str, peer_prefix: str
) -> None:
    url = "redis://127.0.0.1:6379/0"
    with pytest.raises(ConfigError, match=r"overlaps the prefix of local\.redis_url") as raised:
        EngineConfig.from_mapping(
            {
                "local_node_id": "a",
                "local": {"redis_url": url, "prefix": local_prefix},
                "peers": [{"node_id": "b", "redis_url": url, "prefix": peer_prefix}],
            },
            env={},
        )
    assert "peers[0].prefix" in str(raised.value)


def test_a_field_removed_with_collection_by_clock_says_why() -> None:
    with pytest.raises(ConfigError) as raised:
        EngineConfig.from_mapping(
            {
                "local_node_id": "a",
                "local": {"tombstone_grace_sec": 86400},
                "settings": {"rebootstrap": {"max_discard_items": 10}},
            },
            env={},
        )
    message = str(raised.value)
    assert "local.tombstone_grace_sec: removed: tombstones are collected once every member" in (
        message
    )
    assert "settings.rebootstrap: removed" in message


@pytest.mark.parametrize(
    ("mode", "relay", "expected"),
    [
        ("mesh", None, False),
        ("follower", None, True),
        ("mesh", True, True),
        ("follower", False, False),
    ],
)
def test_relay_follows_the_role_unless_set(mode: str, relay: bool | None, expected: bool) -> None:
    hot_path = {} if relay is None else {"relay": relay}
    config = EngineConfig.from_mapping(
        {"local_node_id": "a", "mode": mode, "settings": {"hot_path": hot_path}}, env={}
    )
    assert config.relay is expected
    reason = config.relay_reason()
    assert ("set in settings" in reason) is (relay is not None), reason
