"""Fuzz config loading from arbitrary YAML: a bad file must fail with ``ConfigError`` only.

An operator's typo must end in a clear message, never a traceback from PyYAML or pydantic.
Input: first byte picks the form (file through ``load_config``, or a parsed mapping through
``EngineConfig.from_mapping``); the rest is the YAML text. A few bytes may also become
``REPLICATION_ENGINE__*`` environment overrides.

``replication_engine.config`` is imported lazily: while it does not exist yet, the target says
so and exits 0.

Run: ``python fuzz/fuzz_config.py -max_total_time=30 fuzz/corpus/config``
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

import atheris

try:
    # Our modules and the pure-Python YAML parser; not pydantic, redis and the rest.
    with atheris.instrument_imports(include=["replication_engine", "yaml"]):
        import yaml

        from replication_engine import config as _config
except ImportError as exc:  # the module is someone else's, and may not exist yet
    _config = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

ENV_PATHS = [
    "LOCAL__PASSWORD",
    "LOCAL__PREFIX",
    "PEERS__0__PASSWORD",
    "PEERS__0__REDIS_URL",
    "SETTINGS__MERKLE__FANOUT",
    "MODE",
    "PEERS__9__NODE_ID",
    "HTTP__LISTEN",
    "X__Y",
]

_fd, _PATH = tempfile.mkstemp(prefix="fuzz-config-", suffix=".yaml")
os.close(_fd)


def _env(data: bytes) -> dict[str, str]:
    # Byte 1 selects which overrides exist; their values come from the YAML text itself.
    mask = data[1] if len(data) > 1 else 0
    text = data[2:34].decode("utf-8", "replace")
    return {
        f"REPLICATION_ENGINE__{path}": text
        for i, path in enumerate(ENV_PATHS[:8])
        if mask & (1 << i)
    }


def TestOneInput(data: bytes) -> None:
    assert _config is not None
    mode = data[0] if data else 0
    env = _env(data) if mode & 2 else {}
    body = data[2:] if mode & 2 else data[1:]
    if mode & 1:
        try:
            document: Any = yaml.safe_load(body)
        except (yaml.YAMLError, RecursionError, UnicodeDecodeError, ValueError):
            return  # not YAML: nothing for from_mapping to see
        if not isinstance(document, dict):
            return
        try:
            _config.EngineConfig.from_mapping(document, env=env)
        except _config.ConfigError as exc:
            assert str(exc)
        return
    with open(_PATH, "wb") as handle:
        handle.write(body)
    try:
        loaded = _config.load_config(_PATH, env=env)
    except _config.ConfigError as exc:
        assert str(exc)
        return
    # A loaded config can always be shown to an operator.
    loaded.redacted_dict()


def main() -> None:
    if _config is None:
        print(
            f"fuzz_config: replication_engine.config is not importable yet ({_IMPORT_ERROR}); "
            "nothing to fuzz"
        )
        sys.exit(0)
    atheris.Setup(sys.argv, TestOneInput)
    try:
        atheris.Fuzz()
    finally:
        os.unlink(_PATH)


if __name__ == "__main__":
    main()
