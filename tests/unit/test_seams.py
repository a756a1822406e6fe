"""The package's seams stay where they are drawn: shared types and capabilities in the store's
protocol module, the HTTP server reading the engine through a narrow interface, one home for
URL redaction. Each is checked on the source's imports, so a shortcut across a seam fails here
rather than in review."""

from __future__ import annotations

import ast
from pathlib import Path

from redis.asyncio import Redis

from replication_engine.engine import EngineState
from replication_engine.observability.http import ALIVE_STATES
from replication_engine.store.protocol import RecordKeeper, Scrubbable, Store
from replication_engine.store.redis_store import RedisStore

PACKAGE = Path(__file__).resolve().parents[2] / "replication_engine"


def imports_of(module: str) -> set[str]:
    """Every module a source file imports (``from a.b import c`` counts as a.b and a.b.c)."""
    tree = ast.parse((PACKAGE / module).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_store_protocol_depends_on_no_implementation() -> None:
    assert not {m for m in imports_of("store/protocol.py") if "redis" in m.split(".")[-1]}


def test_the_http_server_does_not_import_the_engine() -> None:
    assert not {m for m in imports_of("observability/http.py") if "engine" in m.split(".")}


def test_the_engine_names_capabilities_not_the_redis_store_class() -> None:
    source = (PACKAGE / "engine.py").read_text(encoding="utf-8")
    assert "isinstance(self.store, RedisStore)" not in source
    # It still opens a RedisStore from the config when none is given: that is the only use.
    assert source.count("RedisStore") == 2, "import and RedisStore.connect only"


def test_the_redis_store_has_every_capability_the_engine_needs() -> None:
    store = RedisStore(Redis(), node_id="a")
    assert isinstance(store, Store)
    assert isinstance(store, Scrubbable)
    assert isinstance(store, RecordKeeper)


def test_url_redaction_has_one_home() -> None:
    defines = [
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if "def redact_url(" in path.read_text(encoding="utf-8")
    ]
    assert defines == ["redaction.py"]
    for module in ("config/models.py", "connection.py", "peer.py", "store/redis_store.py"):
        imported = {m for m in imports_of(module) if m.endswith(".redact_url")}
        assert imported <= {"replication_engine.redaction.redact_url"}, module


def test_health_calls_alive_every_engine_state_but_stopped() -> None:
    assert set(ALIVE_STATES) == {s.value for s in EngineState} - {EngineState.STOPPED.value}
