"""Typed engine configuration: YAML plus environment overrides, validated once at load time.

- :mod:`.models`: the schema (pydantic sections, field types, validators).
- :mod:`.loading`: :func:`load_config`, environment overrides, and the one ``ConfigError`` that
  lists every problem by field path.
- :mod:`.errors`: ``ConfigError`` and the problem records the two modules above share.

The loader depends on the schema, never the reverse (``EngineConfig.from_mapping`` imports the
loader when called). Import from this package; the split is an implementation detail.
"""

from replication_engine.config.errors import ConfigError
from replication_engine.config.loading import ENV_PREFIX, load_config
from replication_engine.config.models import (
    ColdPathConfig,
    CursorConfig,
    EngineConfig,
    HotPathConfig,
    HttpConfig,
    LocalConfig,
    MembershipConfig,
    MerkleConfig,
    PeerConfig,
    PeerHealthConfig,
    ScrubConfig,
    SettingsConfig,
    SloConfig,
    TlsConfig,
    default_of,
    parse_duration,
)

__all__ = [
    "ENV_PREFIX",
    "ColdPathConfig",
    "ConfigError",
    "CursorConfig",
    "EngineConfig",
    "HotPathConfig",
    "HttpConfig",
    "LocalConfig",
    "MembershipConfig",
    "MerkleConfig",
    "PeerConfig",
    "PeerHealthConfig",
    "ScrubConfig",
    "SettingsConfig",
    "SloConfig",
    "TlsConfig",
    "default_of",
    "load_config",
    "parse_duration",
]
