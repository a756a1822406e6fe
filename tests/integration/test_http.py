"""The sidecar's HTTP endpoints against a real engine and real redis-server processes.

``/health`` (liveness), ``/ready`` (readiness with reasons), ``/status`` (JSON) and ``/metrics``
(Prometheus text) are read over real HTTP from an engine listening on an ephemeral port, and
every place an operator can read is checked for a peer's password.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.mesh import (
    CONVERGE_TIMEOUT_S,
    Mesh,
    WriteLog,
    build_config,
    open_mesh,
)
from replication_engine.clock import HLC
from replication_engine.codec import Change
from replication_engine.engine import EngineError, ReplicationEngine
from replication_engine.observability.logs import JsonFormatter
from replication_engine.observability.metrics import Metrics
from replication_engine.testing import RedisFactory, async_wait_until, free_port

SECRET = "s3cret-pw"
HTTP_ON_A = {"a": {"http": {"enabled": True, "listen": "127.0.0.1:0"}}}
# Readiness threshold in the lag tests, in stream entries.
MAX_LAG_EVENTS = 50
SETUP_CHUNK = 1000


# ------------------------------------------------------------------------------------ helpers


class Http:
    """GETs against one engine's HTTP server."""

    def __init__(self, session: aiohttp.ClientSession, engine: ReplicationEngine) -> None:
        assert engine.http is not None, "the engine was configured without HTTP"
        assert engine.http.port != 0, "the bound port is known once started"
        self.session = session
        self.base = f"http://127.0.0.1:{engine.http.port}"

    async def get(self, path: str) -> tuple[int, str, str]:
        """(status, body, content type)."""
        async with self.session.get(self.base + path) as resp:
            return resp.status, await resp.text(), resp.headers.get("Content-Type", "")

    async def json(self, path: str) -> tuple[int, dict[str, Any]]:
        status, body, ctype = await self.get(path)
        assert ctype.startswith("application/json"), ctype
        return status, json.loads(body)

    async def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by (name, sorted labels)."""
        status, body, _ = await self.get("/metrics")
        assert status == 200
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        yield client


async def preload(mesh: Mesh, node_id: str, count: int) -> None:
    """``count`` stream entries on a node (distinct keys, origin "seed")."""
    hlc = HLC()
    for start in range(0, count, SETUP_CHUNK):
        await mesh[node_id].store.apply_batch(
            [
                Change.put(f"pre:{i:06d}", b"v", hlc=hlc.now(), origin="seed")
                for i in range(start, min(count, start + SETUP_CHUNK))
            ]
        )


def peer_b(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    return samples.get((name, (("peer", "b"),)), 0.0)


# ------------------------------------------------------------------------------------ endpoints


async def test_health_ready_status_and_metrics_of_a_running_engine(
    redis_factory: RedisFactory, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": []}, overrides=HTTP_ON_A
    ) as mesh:
        engine = mesh["a"].running()
        http = Http(session, engine)
        log = WriteLog()
        for i in range(20):
            await log.put(mesh["b"], f"k{i}", b"v")
        await mesh.wait_converged(nodes=["a", "b"])
        await mesh.wait_idle()

        status, health = await http.json("/health")
        assert (status, health) == (200, {"status": "ok", "state": "running"})

        status, ready = await http.json("/ready")
        assert status == 200 and ready["ready"] is True, ready

        status, body = await http.json("/status")
        assert status == 200
        assert body["node_id"] == "a" and body["state"] == "running"
        peer = body["peers"]["b"]
        assert peer["connected"] is True
        assert peer["circuit"] == "closed"
        assert peer["cursor"] == str(mesh["a"].tailer("b").cursor)
        assert peer["cursor"] == await mesh["b"].store.stream_tail()
        assert peer["lag_ms"] == 0 and peer["lag_events"] == 0
        assert peer["events_applied"] == 20

        status, text, ctype = await http.get("/metrics")
        assert status == 200
        assert ctype.startswith("text/plain"), ctype
        declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
        missing = Metrics().names() - declared
        assert not missing, f"metric families missing from /metrics: {sorted(missing)}"


async def test_metrics_counters_move_between_scrapes_during_replication(
    redis_factory: RedisFactory, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": []}, overrides=HTTP_ON_A
    ) as mesh:
        http = Http(session, mesh["a"].running())
        log = WriteLog()
        await log.put(mesh["b"], "first", b"v")
        await mesh.wait_converged(nodes=["a", "b"])
        await mesh.wait_idle()
        before = await http.samples()

        for i in range(25):
            await log.put(mesh["b"], f"k{i}", b"v")
        await mesh.wait_converged(nodes=["a", "b"])
        await mesh.wait_idle()
        after = await http.samples()

        for name in ("replication_cdc_events_read_total", "replication_cdc_events_applied_total"):
            assert peer_b(after, name) - peer_b(before, name) == 25, name
        assert peer_b(after, "replication_batch_flush_total") > peer_b(
            before, "replication_batch_flush_total"
        )
        assert peer_b(after, "replication_batch_flush_duration_seconds_count") > peer_b(
            before, "replication_batch_flush_duration_seconds_count"
        )
        assert peer_b(after, "replication_batch_size_entries") > 0
        assert (("replication_lag_seconds", (("peer", "b"),))) in after
        assert peer_b(after, "replication_lag_events") == 0
        assert after[("replication_engine_state", ())] == 2


async def test_ready_is_503_with_reasons_while_lagging_and_200_once_caught_up(
    redis_factory: RedisFactory, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        engines=[],
        overrides=HTTP_ON_A,
        common={
            "settings": {
                "slo": {"max_replication_lag_events": MAX_LAG_EVENTS},
                # 500 events/s in fixed batches of 100: the 2,000-entry backlog takes ~4 s.
                "hot_path": {
                    "rate_limit_enabled": True,
                    "rate_limit_per_sec": 500,
                    "rate_limit_burst": 50,
                    "batch_size": 100,
                    "max_batch_size": 100,
                    "adaptive_batch_size": False,
                },
            }
        },
    ) as mesh:
        await preload(mesh, "b", 2000)
        http = Http(session, await mesh.start_engine("a"))

        async def lagging() -> dict[str, Any] | None:
            status, body = await http.json("/ready")
            # Not "lag not known yet" (before the first read): the backlog's measured lag.
            lag = [
                r
                for r in body.get("reasons", [])
                if r.startswith("peer b: lag ") and " exceeds " in r
            ]
            return body if status == 503 and lag else None

        body = await async_wait_until(
            lagging, timeout=CONVERGE_TIMEOUT_S, interval=0.05, message="/ready 503 naming b's lag"
        )
        assert body["ready"] is False
        assert any(f"events exceeds {MAX_LAG_EVENTS}" in r for r in body["reasons"]), body
        status, _health = await http.json("/health")
        assert status == 200, "a lagging node is alive: liveness must not fail with readiness"

        async def ready() -> bool:
            return (await http.json("/ready"))[0] == 200

        await async_wait_until(
            ready, timeout=CONVERGE_TIMEOUT_S, interval=0.1, message="/ready 200 once caught up"
        )
        status, body = await http.json("/status")
        assert body["peers"]["b"]["lag_events"] <= MAX_LAG_EVENTS


async def test_ready_is_503_when_all_peers_are_disconnected(
    redis_factory: RedisFactory, tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": []}, overrides=HTTP_ON_A
    ) as mesh:
        http = Http(session, mesh["a"].running())
        await mesh.wait_idle()
        assert (await http.json("/ready"))[0] == 200
        mesh["b"].server.kill()

        async def disconnected() -> dict[str, Any] | None:
            status, body = await http.json("/ready")
            return body if status == 503 else None

        body = await async_wait_until(
            disconnected,
            timeout=CONVERGE_TIMEOUT_S,
            interval=0.05,
            message="/ready 503 after b died",
        )
        assert "all peers are disconnected" in body["reasons"], body
        status, health = await http.json("/health")
        assert status == 200 and health["state"] == "running"
        status, info = await http.json("/status")
        assert info["peers"]["b"]["connected"] is False
        assert info["peers"]["b"]["lag_ms"] is None


# ------------------------------------------------------------------------------------ secrets


async def test_peer_password_never_appears_in_status_metrics_logs_repr_or_errors(
    redis_factory: RedisFactory,
    tmp_path: Path,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        overrides=HTTP_ON_A,
        redis_options={"b": {"password": SECRET}},
    ) as mesh:
        a = mesh["a"]
        engine = a.running()
        assert f":{SECRET}@" in a.config.peers[0].redis_url, "the peer URL carries the password"
        http = Http(session, engine)
        log = WriteLog()
        await log.put(mesh["b"], "k", b"v")
        await mesh.wait_converged(nodes=["a", "b"])  # authenticated replication works

        mesh["b"].server.kill()  # errors now name the peer's URL and connection
        await async_wait_until(
            lambda: a.peer_status("b")["last_error"],
            timeout=CONVERGE_TIMEOUT_S,
            message="b's failure recorded",
        )
        await async_wait_until(
            lambda: any(
                r.name == "replication_engine.peer" and r.levelno >= logging.WARNING
                for r in caplog.records
            ),
            timeout=CONVERGE_TIMEOUT_S,
            message="b's failure logged",
        )

        pages = {
            path: (await http.get(path))[1] for path in ("/status", "/metrics", "/ready", "/health")
        }
        assert "redis://:***@" in pages["/status"], "the peer URL is shown, masked"
        for path, body in pages.items():
            assert SECRET not in body, f"{path} shows the password"
        assert SECRET not in repr(a.config)
        assert SECRET not in str(a.config)
        assert SECRET not in json.dumps(a.config.redacted_dict())

    formatter = JsonFormatter()
    assert caplog.records, "nothing was logged"
    for record in caplog.records:
        line = formatter.format(record)
        assert SECRET not in line, f"JSON log line shows the password: {line}"
        # Unformatted too: an embedding daemon's own handler does not redact anything.
        raw = {k: v for k, v in vars(record).items() if k != "exc_info"}
        assert SECRET not in repr(raw), f"log record carries the password: {raw}"
    assert SECRET not in caplog.text

    # A failed start names the unreachable URL, masked.
    dead = f"redis://:{SECRET}@127.0.0.1:{free_port()}/0"
    config = build_config("c", {"c": dead, "b": mesh["b"].server.url}, ["b"], tmp_path / "c.db")
    with pytest.raises(EngineError) as caught:
        await ReplicationEngine(config).start()
    assert "redis://:***@127.0.0.1" in str(caught.value)
    assert SECRET not in str(caught.value)
    chain = "".join(traceback.format_exception(caught.value))
    assert SECRET not in chain, "the exception chain shows the password"
