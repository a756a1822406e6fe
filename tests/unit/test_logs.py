"""What the sidecar's log handler writes for lines from libraries it runs."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from replication_engine.observability import logs


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The sidecar's logging set up on a buffer; the root logger put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    monkeypatch.setattr(logs.sys, "stderr", out)
    logs.setup_logging("INFO", json_format=True)
    try:
        yield out
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_failed_cluster_topology_refresh_is_a_warning_with_a_hint(
    captured: io.StringIO,
) -> None:
    """redis-py logs it at ERROR during every failover, while it goes on serving from the
    topology it has: an expected, transient line must not read as a failure of the engine."""
    cluster = logging.getLogger("redis.asyncio.cluster")
    cluster.error("Topology refresh failed, keeping the current one: Redis Cluster cannot be ...")
    (line,) = lines(captured)
    assert line["level"] == "warning", line
    assert "failover" in str(line["hint"])


def test_other_errors_keep_their_level(captured: io.StringIO) -> None:
    logging.getLogger("redis.asyncio.cluster").error("something else broke")
    logging.getLogger("replication_engine.hot_path").error(
        "tailer.apply_failed", extra={"peer": "b"}
    )
    logging.getLogger("elsewhere").error("Topology refresh failed: not redis-py's line")
    assert [line["level"] for line in lines(captured)] == ["error"] * 3
