"""The configuration schema: frozen pydantic sections, their field types and validators.

Secrets never reach an error message, a repr or a log line: passwords are ``SecretStr`` and every
URL or value that might embed one goes through :func:`redact_url` before it is printed. Reading a
file, environment overrides and turning validation errors into a ``ConfigError`` live in
:mod:`replication_engine.config.loading`; this module only says what a valid configuration is.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import typing
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal, Self
from urllib.parse import unquote, urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    model_validator,
)

from replication_engine.codec import NODE_ID_RULE, is_node_id
from replication_engine.config.errors import _FieldProblems, _number, _Problem
from replication_engine.connection import address_problem
from replication_engine.merkle import Geometry
from replication_engine.redaction import redact_url, register_secret

log = logging.getLogger(__name__)

# Node ids end up in Redis keys and metric labels, so they stay short and shell/URL safe.
_URL_SCHEMES = ("redis", "rediss", "unix")
_URL_EXPECTED = "expected a redis://, rediss:// or unix:// URL"
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)\s*", re.IGNORECASE)
_DURATION_EXPECTED = "expected a duration like '5s', '100ms', '2m', '1h' or a number of seconds"
# The sidecar runs beside a monitoring stack, so not 9090-9094 (Prometheus, Pushgateway,
# Alertmanager), 9100 (node exporter) or 3000 (Grafana); 9636 was a free slot in Prometheus's
# list of default exporter ports.
DEFAULT_HTTP_PORT = 9636


# --------------------------------------------------------------------------------------------
# Scalar parsing and redaction


def parse_duration(value: object) -> float:
    """Convert a human duration to float seconds.

    Operators write ``5s`` or ``100ms``; the code works in float seconds only, so the conversion
    happens once, here.

    Args:
        value: ``int``/``float`` seconds, a numeric string, or a string of one or more
            ``<number><unit>`` parts with unit ``ms``, ``s``, ``m`` or ``h`` (``"1m30s"``).

    Returns:
        The duration in seconds.

    Raises:
        ValueError: the value is not a duration, is negative, or is not finite.
    """
    if isinstance(value, bool):
        raise ValueError(_DURATION_EXPECTED)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_duration_text(value)
    else:
        raise ValueError(_DURATION_EXPECTED)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{_DURATION_EXPECTED}, not negative or infinite")
    return seconds


def _parse_duration_text(text: str) -> float:
    stripped = text.strip()
    if not stripped:
        raise ValueError(_DURATION_EXPECTED)
    try:
        return float(stripped)
    except ValueError:
        pass
    total = 0.0
    position = 0
    while position < len(stripped):
        match = _DURATION_PART_RE.match(stripped, position)
        if match is None:
            raise ValueError(_DURATION_EXPECTED)
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
        position = match.end()
    return total


# --------------------------------------------------------------------------------------------
# Field types


def _duration_field(value: object) -> float:
    return parse_duration(value)


def _duration_ms_field(value: object) -> float:
    """A ``_ms`` field takes the same forms as any duration; a bare number is milliseconds,
    as the name says."""
    if isinstance(value, str) and not _is_number_text(value):
        return parse_duration(value) * 1000
    return parse_duration(value)


def _is_number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _check_node_id(value: str) -> str:
    if not is_node_id(value):
        raise ValueError(f"expected {NODE_ID_RULE}")
    return value


def _check_prefix(value: str) -> str:
    if "{" in value or "}" in value:
        # Every key of a partition starts with the prefix and the partition's {tag}; a brace
        # in the prefix would become the tag Redis Cluster hashes by (docs/FORMAT.md).
        raise ValueError("expected a key prefix without '{' or '}'")
    return value


def _check_redis_url(value: str) -> str:
    try:
        parts = urlsplit(value)
    except ValueError:
        raise ValueError(_URL_EXPECTED) from None
    scheme = parts.scheme.lower()
    if scheme not in _URL_SCHEMES:
        raise ValueError(_URL_EXPECTED)
    if scheme == "unix":
        if not parts.path:
            raise ValueError("expected a socket path, e.g. unix:///run/redis.sock")
        return value
    if not parts.hostname:
        raise ValueError("expected a host, e.g. redis://host:6379/0")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("expected a port in 1..65535, e.g. redis://host:6379/0")
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        raise ValueError("expected a database number as the URL path, e.g. /0")
    return value


def _check_listen(listen: str) -> str:
    _split_listen(listen)
    return listen


def _split_listen(listen: str) -> tuple[str, int]:
    expected = (
        "expected host:port with port 0..65535, "
        f"e.g. 127.0.0.1:{DEFAULT_HTTP_PORT} or [::1]:{DEFAULT_HTTP_PORT}"
    )
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65_535:
        raise ValueError(expected)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(ch.isspace() for ch in host) or (":" in host and "[" not in listen):
        raise ValueError(expected)
    return host, int(port_text)


# Every duration field names its unit (``_sec`` or ``_ms``) and takes the same forms: a number
# in that unit, or text such as '5s', '100ms', '2m', '1h'.
Duration = Annotated[float, BeforeValidator(_duration_field), Field(gt=0)]
DurationOrZero = Annotated[float, BeforeValidator(_duration_field), Field(ge=0)]
DurationMs = Annotated[float, BeforeValidator(_duration_ms_field), Field(gt=0)]
NodeId = Annotated[str, AfterValidator(_check_node_id)]
KeyPrefix = Annotated[str, AfterValidator(_check_prefix)]
RedisUrl = Annotated[str, AfterValidator(_check_redis_url)]
ListenAddress = Annotated[str, AfterValidator(_check_listen)]


class _Section(BaseModel):
    # Frozen so a component cannot change a setting another component already read; forbid so a
    # misspelt option is an error instead of a silently ignored line; inputs hidden from
    # pydantic's own messages, which would quote a URL's password (ConfigError quotes values
    # itself, masked).
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)
    # Old name -> new name of fields renamed to carry their unit. The old name is still read
    # (a config written for an older release keeps working) and logged as renamed.
    _RENAMED: typing.ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _take_renamed(cls, data: Any) -> Any:
        if not cls._RENAMED or not isinstance(data, Mapping):
            return data
        out = dict(data)
        for old, new in cls._RENAMED.items():
            if old not in out:
                continue
            if new in out:
                raise ValueError(f"{old} and {new} are the same setting: keep only {new}")
            out[new] = out.pop(old)
            log.warning("config.renamed_field", extra={"field": old, "use": new})
        return out


def _redacted_repr_args(model: BaseModel) -> Iterator[tuple[str | None, Any]]:
    for name, value in BaseModel.__repr_args__(model):
        if name == "redis_url" and isinstance(value, str):
            yield name, redact_url(value)
        else:
            yield name, value


def default_of(section: type[BaseModel], name: str) -> Any:
    """A field's default as the configuration declares it: what a component's constructor
    uses for the same setting, so there is one source of defaults."""
    return section.model_fields[name].get_default(call_default_factory=True)


# --------------------------------------------------------------------------------------------
# Sections


def _cluster_field() -> Any:
    """The `cluster` setting, the same for the local store and a peer."""
    return Field(
        default=False,
        description=(
            "redis_url is one node of a Redis Cluster: the store is reached through a cluster "
            "client, which finds the other nodes and follows failovers and slot moves."
        ),
    )


def _cluster_addresses_field() -> Any:
    """The `cluster_addresses` setting, the same for the local store and a peer."""
    return Field(
        default_factory=dict,
        description=(
            "For a Redis Cluster whose nodes announce addresses this engine cannot reach (NAT, "
            "containers, a tunnel): announced 'host:port' -> the 'host:port' to connect to "
            "instead. Addresses not listed are used as announced."
        ),
    )


class LocalConfig(_Section):
    """This node's own Redis, the only one the engine writes to."""

    redis_url: RedisUrl = Field(default="redis://127.0.0.1:6379/0", description="Local store.")
    prefix: KeyPrefix = Field(
        default="", description="Prefix of every key the store and engine use."
    )
    username: str | None = Field(default=None, description="ACL user; overrides one in redis_url.")
    password: SecretStr | None = Field(
        default=None, description="Password; overrides one in redis_url."
    )
    cluster: bool = _cluster_field()
    cluster_addresses: dict[str, str] = _cluster_addresses_field()
    stream_maxlen: int = Field(default=100_000, ge=1, description="Local CDC stream MAXLEN.")
    max_clock_offset_sec: Duration = Field(
        default=300.0,
        description="Remote versions stamped further ahead of the local clock are refused.",
    )
    max_memory_ratio: float = Field(
        default=0.9, gt=0, le=1, description="Share of Redis maxmemory above which applies wait."
    )
    circuit_failure_threshold: int = Field(
        default=5,
        ge=1,
        description="Consecutive local store failures before applies stop and wait (breaker).",
    )
    circuit_reset_timeout_sec: Duration = Field(
        default=5.0,
        description=(
            "Longest the local store breaker stays open (s): 1 s at first, doubling while "
            "trials fail."
        ),
    )

    @model_validator(mode="after")
    def _check_cluster(self) -> Self:
        problems = _cluster_problems(self.cluster, self.redis_url, self.cluster_addresses)
        return _FieldProblems.check(self, problems)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        return _redacted_repr_args(self)


def _cluster_problems(cluster: bool, url: str, addresses: Mapping[str, str]) -> list[_Problem]:
    """A cluster is reached over TCP and has one database; an address table needs a cluster
    and maps host:port to host:port."""
    problems: list[_Problem] = []
    if not cluster:
        if addresses:
            expected = "is set, so cluster must be true (it maps a Redis Cluster's node addresses)"
            problems.append(_Problem(("cluster_addresses",), expected, dict(addresses)))
        return problems
    parsed = urlsplit(url)
    if parsed.scheme.lower() not in ("redis", "rediss"):
        expected = "must be redis:// or rediss:// when cluster is true (a cluster is TCP only)"
        problems.append(_Problem(("redis_url",), expected, redact_url(url)))
    elif parsed.path.strip("/") not in ("", "0"):
        expected = "must name database 0 (or none) when cluster is true: a cluster has one"
        problems.append(_Problem(("redis_url",), expected, redact_url(url)))
    for announced, reachable in addresses.items():
        for text in (announced, reachable):
            problem = address_problem(text)
            if problem:
                problems.append(_Problem(("cluster_addresses", announced), problem, text))
    return problems


class HotPathConfig(_Section):
    """Per-peer CDC stream tailing."""

    _RENAMED: typing.ClassVar[Mapping[str, str]] = {
        "block_timeout": "block_timeout_sec",
        "shutdown_timeout": "shutdown_timeout_sec",
        "min_read_interval": "min_read_interval_sec",
    }

    enabled: bool = Field(default=True, description="Tail peers' CDC streams.")
    batch_size: int = Field(default=100, ge=1, description="Initial XREAD COUNT (entries).")
    block_timeout_sec: Duration = Field(default=5.0, description="XREAD BLOCK time (seconds).")
    adaptive_batch_size: bool = Field(default=True, description="Adjust the batch size (AIMD).")
    min_batch_size: int = Field(default=50, ge=1, description="AIMD lower bound (entries).")
    # Bounded so that one read's reply stays far inside the reply bounds a peer is held to
    # (replication_engine.wire.MAX_REPLY_ELEMENTS), and one apply call stays short.
    max_batch_size: int = Field(
        default=1000, ge=1, le=100_000, description="AIMD upper bound (entries)."
    )
    rate_limit_enabled: bool = Field(default=False, description="Limit the apply rate per peer.")
    rate_limit_per_sec: float = Field(default=10_000.0, gt=0, description="Sustained events/s.")
    rate_limit_burst: int = Field(default=1000, ge=1, description="Events allowed above the rate.")
    shutdown_timeout_sec: Duration = Field(default=10.0, description="Drain time on shutdown (s).")
    min_read_interval_sec: DurationOrZero = Field(
        default=0.005,
        description=(
            "At the head of a peer's stream, the least time between two reads: writes arriving "
            "within it are applied together (adds at most this much lag; 0 reads at once)."
        ),
    )
    max_batch_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description=(
            "Bytes of entries one read aims at and one apply call carries at most (Redis "
            "refuses a single argument over 512 MB)."
        ),
    )
    relay: bool | None = Field(
        default=None,
        description=(
            "Re-emit applied remote writes on this node's stream (hot and cold path), so nodes "
            "that tail only this one get them: needed in chains and follower trees, redundant in "
            "a full mesh. Unset: by the node's role, off for mode mesh, on for mode follower "
            "(EngineConfig.relay); a mesh node that others follow or that sits in a chain sets "
            "it to true."
        ),
    )

    @model_validator(mode="after")
    def _check_batch_bounds(self) -> Self:
        problems = []
        if self.min_batch_size > self.batch_size:
            expected = f"must be <= batch_size ({self.batch_size})"
            problems.append(_Problem(("min_batch_size",), expected, self.min_batch_size))
        if self.max_batch_size < self.batch_size:
            expected = f"must be >= batch_size ({self.batch_size})"
            problems.append(_Problem(("max_batch_size",), expected, self.max_batch_size))
        return _FieldProblems.check(self, problems)


class ColdPathConfig(_Section):
    """Merkle anti-entropy: finds and repairs whatever the hot path missed."""

    enabled: bool = Field(default=True, description="Run anti-entropy cycles.")
    interval_sec: Duration = Field(default=60.0, description="Seconds between cycles.")
    max_items_per_cycle: int = Field(default=1000, ge=1, description="Repair budget per cycle.")
    backoff_base_sec: Duration = Field(default=5.0, description="First backoff (s).")
    backoff_max_sec: Duration = Field(default=300.0, description="Longest backoff (s).")
    drill_concurrency: int = Field(default=8, ge=1, description="Branches drilled in parallel.")
    fetch_batch_size: int = Field(default=200, ge=1, description="Items per peer round trip.")
    root_cache_ttl_sec: DurationOrZero = Field(default=5.0, description="Peer root reuse time (s).")
    bootstrap_rate_limit_per_sec: float = Field(
        default=50_000.0, gt=0, description="Items per second applied during a bootstrap."
    )

    @model_validator(mode="after")
    def _check_backoff(self) -> Self:
        problems = []
        if self.backoff_base_sec > self.backoff_max_sec:
            expected = f"must be <= backoff_max_sec ({_number(self.backoff_max_sec)})"
            problems.append(_Problem(("backoff_base_sec",), expected, self.backoff_base_sec))
        return _FieldProblems.check(self, problems)


class PeerHealthConfig(_Section):
    """Pings of peers that have been quiet, so a dead peer is noticed before data is needed."""

    enabled: bool = Field(default=True, description="Ping idle peers.")
    ping_interval_sec: Duration = Field(default=30.0, description="Seconds between pings.")
    idle_threshold_sec: Duration = Field(default=60.0, description="Quiet time before a ping.")


class SloConfig(_Section):
    """Thresholds above which the engine warns and reports itself degraded."""

    max_stream_read_latency_ms: DurationMs = Field(default=100.0, description="One XREAD.")
    max_peer_op_latency_ms: DurationMs = Field(default=500.0, description="Any peer call.")
    max_batch_flush_latency_ms: DurationMs = Field(default=200.0, description="Batch apply.")
    max_replication_lag_sec: Duration = Field(default=30.0, description="Lag behind a peer.")
    max_replication_lag_events: int | None = Field(
        default=None, ge=1, description="Lag in stream entries; None disables the check."
    )


class MerkleConfig(_Section):
    """Merkle tree geometry; every node of a mesh must use the same one."""

    fanout: int = Field(default=256, description="Children per interior node (power of two).")
    depth: int = Field(default=2, description="Levels below the root (1-4).")
    partitions: int = Field(
        default=1,
        description=(
            "1, or the fanout (at most 64): one partition per child of the tree's root, each a "
            "whole store in its own Redis Cluster slot, so a node on a cluster spreads over its "
            "shards (README, 'A node on a Redis Cluster'). Fixed when the store is created."
        ),
    )

    @model_validator(mode="after")
    def _check_geometry(self) -> Self:
        """Geometry's own rules, so the config and the store can never disagree on them."""
        problems = [
            _Problem((name,), expected, getattr(self, name))
            for name, expected in Geometry.problems(self.fanout, self.depth, self.partitions)
        ]
        return _FieldProblems.check(self, problems)


class MembershipConfig(_Section):
    """Certification, membership and tombstone collection (docs/DELETES.md)."""

    interval_sec: Duration = Field(
        default=2.0,
        description=(
            "Seconds between ticks: certify this store's own writes, read the members' "
            "records, collect the tombstones every member is known to hold."
        ),
    )
    gc_batch: int = Field(
        default=500, ge=1, le=10_000, description="Tombstones collected per script call."
    )
    scrub_per_tick: int = Field(
        default=1,
        ge=0,
        le=256,
        description=(
            "Parents of leaf buckets checked against their leaves per tick, and rebuilt if they "
            "disagree (0 = never): defence in depth for the Merkle tree."
        ),
    )


class ScrubConfig(_Section):
    """The background scrub of stored data (README, "Stray and corrupt data")."""

    interval_sec: Duration = Field(default=5.0, description="Seconds between scrub ticks.")
    payload_items_per_sec: float = Field(
        default=0.0,
        ge=0,
        description=(
            "Stored payloads re-read and verified against their content hash per second, on "
            "average (0 = off). One that does not verify is kept in the quarantine and replaced "
            "by a peer's copy that does. Each tick checks whole subtrees, so a tick can exceed "
            "its share by one subtree, and checks each subtree at most once."
        ),
    )
    stray_scan: bool = Field(
        default=True,
        description=(
            "Scan the keys under the prefix, one SCAN page per tick, for keys the format does "
            "not define or that have the wrong type (counted, sampled in /status, never used)."
        ),
    )


class SettingsConfig(_Section):
    """Tuning of the engine's two paths and its health and SLO checks."""

    hot_path: HotPathConfig = Field(default_factory=HotPathConfig)
    cold_path: ColdPathConfig = Field(default_factory=ColdPathConfig)
    peer_health: PeerHealthConfig = Field(default_factory=PeerHealthConfig)
    slo: SloConfig = Field(default_factory=SloConfig)
    merkle: MerkleConfig = Field(default_factory=MerkleConfig)
    membership: MembershipConfig = Field(default_factory=MembershipConfig)
    scrub: ScrubConfig = Field(default_factory=ScrubConfig)


class TlsConfig(_Section):
    """TLS material for a rediss:// peer; the system trust store is used when ca_file is unset."""

    ca_file: str | None = Field(default=None, description="PEM bundle of CAs to trust.")
    cert_file: str | None = Field(default=None, description="Client certificate (mutual TLS).")
    key_file: str | None = Field(default=None, description="Client private key (mutual TLS).")
    verify: bool = Field(default=True, description="Verify the server certificate and name.")

    def is_customised(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file)) or not self.verify


class PeerConfig(_Section):
    """One peer whose Redis this node reads (a read-only ACL user is enough)."""

    node_id: NodeId = Field(description="The peer's local_node_id.")
    redis_url: RedisUrl = Field(description="URL of the peer's Redis.")
    prefix: KeyPrefix | None = Field(
        default=None, description="Peer key prefix; None = local.prefix."
    )
    priority: int = Field(default=0, description="Lower numbers are served first.")
    circuit_failure_threshold: int = Field(default=5, ge=1, description="Failures to open.")
    circuit_reset_timeout_sec: Duration = Field(
        default=30.0, description="Longest open time (s): 1 s at first, doubling while trials fail."
    )
    start_from: Literal["snapshot", "beginning", "latest"] = Field(
        default="snapshot", description="Where a peer without a saved cursor is first read from."
    )
    username: str | None = Field(default=None, description="ACL user; overrides redis_url's.")
    password: SecretStr | None = Field(default=None, description="Overrides redis_url's.")
    tls: TlsConfig = Field(default_factory=TlsConfig)
    cluster: bool = _cluster_field()
    cluster_addresses: dict[str, str] = _cluster_addresses_field()

    @model_validator(mode="after")
    def _check_tls(self) -> Self:
        problems = _cluster_problems(self.cluster, self.redis_url, self.cluster_addresses)
        if self.tls.is_customised() and not self.redis_url.lower().startswith("rediss://"):
            expected = "is set, so redis_url must be rediss://"
            problems.append(_Problem(("tls",), expected, self.display_url))
        if self.tls.key_file and not self.tls.cert_file:
            expected = "required when tls.key_file is set"
            problems.append(_Problem(("tls", "cert_file"), expected, None))
        return _FieldProblems.check(self, problems)

    def effective_prefix(self, local_prefix: str) -> str:
        """The peer's key prefix; peers usually share the local one, so None means that."""
        return local_prefix if self.prefix is None else self.prefix

    @property
    def display_url(self) -> str:
        """``redis_url`` with any password masked, for logs and status pages."""
        return redact_url(self.redis_url)

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        return _redacted_repr_args(self)


class CursorConfig(_Section):
    """Where hot-path cursors, bootstrap progress and the quarantine are kept (SQLite)."""

    sqlite_path: str = Field(
        default="replication_cursors.db", min_length=1, description="SQLite file path."
    )
    wal_mode: bool = Field(default=True, description="Use WAL journaling.")
    quarantine_max_rows: int = Field(default=10_000, ge=1, description="Rejected events kept.")
    quarantine_max_value_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=0,
        description=(
            "Bytes of whole values kept of versions this node drops or replaces (a row keeps "
            "4 KiB of each field); the newest first, 0 for none."
        ),
    )


class HttpConfig(_Section):
    """The health, readiness, metrics and status endpoint."""

    enabled: bool = Field(default=True, description="Serve /health, /ready, /metrics, /status.")
    listen: ListenAddress = Field(
        default=f"127.0.0.1:{DEFAULT_HTTP_PORT}", description="host:port; 0 = any."
    )

    @property
    def host(self) -> str:
        return _split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return _split_listen(self.listen)[1]


class EngineConfig(_Section):
    """The engine's whole configuration: the mapping under the top-level ``replication:`` key.

    Build it with :func:`load_config` (file + environment), :meth:`from_mapping` (mapping +
    environment) or plain ``EngineConfig.model_validate(mapping)`` (no environment, pydantic's
    own ``ValidationError`` on bad input).
    """

    local_node_id: NodeId = Field(description="This node's id, unique in the mesh.")
    mode: Literal["mesh", "follower"] = Field(
        default="mesh", description="follower refuses local writes and only pulls from peers."
    )
    local: LocalConfig = Field(default_factory=LocalConfig)
    settings: SettingsConfig = Field(default_factory=SettingsConfig)
    peers: list[PeerConfig] = Field(default_factory=list)
    cursor: CursorConfig = Field(default_factory=CursorConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)

    @model_validator(mode="after")
    def _register_secrets(self) -> Self:
        """Every password this config holds is masked wherever it shows from now on, however
        a message spells the URL around it (redaction.register_secret)."""
        for url, password in [
            (self.local.redis_url, self.local.password),
            *((peer.redis_url, peer.password) for peer in self.peers),
        ]:
            register_secret(password.get_secret_value() if password is not None else None)
            with contextlib.suppress(ValueError):
                in_url = urlsplit(url).password
                register_secret(in_url)
                register_secret(unquote(in_url) if in_url else None)
        return self

    @model_validator(mode="after")
    def _check_peers(self) -> Self:
        problems = []
        seen_ids: dict[str, int] = {}
        # A peer that reads the same Redis and prefix as ourselves or another peer is a
        # copy-paste mistake that would replicate a store into itself.
        seen_sources = {(self.local.redis_url, self.local.prefix): "local.redis_url"}
        for index, peer in enumerate(self.peers):
            if peer.node_id == self.local_node_id:
                expected = "must differ from local_node_id"
                problems.append(_Problem(("peers", index, "node_id"), expected, peer.node_id))
            elif peer.node_id in seen_ids:
                expected = f"must be unique (already used by peers[{seen_ids[peer.node_id]}])"
                problems.append(_Problem(("peers", index, "node_id"), expected, peer.node_id))
            else:
                seen_ids[peer.node_id] = index
            source = (peer.redis_url, peer.effective_prefix(self.local.prefix))
            overlap = next(
                (
                    name
                    for (url, prefix), name in seen_sources.items()
                    if url == source[0]
                    and prefix != source[1]
                    and (prefix.startswith(source[1]) or source[1].startswith(prefix))
                ),
                None,
            )
            if source in seen_sources:
                expected = f"must not read the same Redis and prefix as {seen_sources[source]}"
                problems.append(_Problem(("peers", index, "redis_url"), expected, peer.display_url))
            elif overlap is not None:
                expected = (
                    f"prefix {source[1]!r} overlaps the prefix of {overlap} on the same Redis "
                    f"(one begins with the other, so their keys would collide)"
                )
                problems.append(_Problem(("peers", index, "prefix"), expected, source[1]))
            else:
                seen_sources[source] = f"peers[{index}]"
        return _FieldProblems.check(self, problems)

    @property
    def relay(self) -> bool:
        """Whether this node re-emits the remote writes it applies: as set, else by role."""
        chosen = self.settings.hot_path.relay
        return chosen if chosen is not None else self.mode == "follower"

    def relay_reason(self) -> str:
        """Why :attr:`relay` is what it is, for the startup log."""
        if self.settings.hot_path.relay is not None:
            return "set in settings.hot_path.relay"
        if self.mode == "follower":
            return "mode follower: nodes that follow this one get writes only through it"
        return (
            "mode mesh: every node reads every origin directly; set settings.hot_path.relay: "
            "true on a mesh node that others follow or that sits in a chain"
        )

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> EngineConfig:
        """Validate a mapping the way :func:`load_config` validates a file.

        Args:
            data: the inner mapping, or a document with a top-level ``replication:`` key.
            env: environment to take ``REPLICATION_ENGINE__*`` overrides from; ``None`` means
                ``os.environ``, pass ``{}`` to ignore the environment.

        Raises:
            ConfigError: listing every problem with its field path.
        """
        # Imported here, not at the top: the loader needs this class, so the schema module
        # must not need the loader to be imported.
        from replication_engine.config.loading import _build

        return _build(data, env, source="<mapping>")

    def redacted_dict(self) -> dict[str, Any]:
        """The configuration as plain data with every password and URL secret masked."""
        return typing.cast(dict[str, Any], _mask_dump(self.model_dump(mode="json")))


def _mask_dump(value: object, name: str | None = None) -> object:
    if isinstance(value, dict):
        return {key: _mask_dump(item, key) for key, item in value.items()}
    if isinstance(value, list):
        return [_mask_dump(item) for item in value]
    if name == "password":
        return None if value is None else "***"
    if isinstance(value, str) and name is not None and name.endswith("url"):
        return redact_url(value)
    return value
