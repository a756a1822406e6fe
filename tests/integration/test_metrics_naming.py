"""Metric names against Prometheus's naming rules, on a live scrape of a real engine.

``promtool check metrics`` (Debian package ``prometheus``) lints the ``/metrics`` text of a
running engine when it is on PATH. The same rules, as far as a name can break them, are checked
in Python (``metric_rules.py``) on the same scrape whatever is installed, so a bad name cannot
pass on a machine without promtool.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiohttp
import pytest
from integration.metric_rules import naming_problems
from prometheus_client.parser import text_string_to_metric_families

from harness.mesh import WriteLog, open_mesh
from replication_engine.testing import RedisFactory

HTTP_ON_A = {"a": {"http": {"enabled": True, "listen": "127.0.0.1:0"}}}
# Seconds promtool may take to lint one scrape.
PROMTOOL_TIMEOUT_S = 30.0


async def live_scrape(redis_factory: RedisFactory, tmp_path: Path) -> str:
    """/metrics of an engine that has replicated a few writes, read over HTTP."""
    async with open_mesh(
        redis_factory, tmp_path, {"a": ["b"], "b": []}, overrides=HTTP_ON_A
    ) as mesh:
        engine = mesh["a"].running()
        log = WriteLog()
        for i in range(10):
            await log.put(mesh["b"], f"k{i}", b"v")
        await mesh.wait_converged(nodes=["a", "b"])
        assert engine.http is not None
        url = f"http://127.0.0.1:{engine.http.port}/metrics"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(url) as resp:
                assert resp.status == 200
                return await resp.text()


# ------------------------------------------------------------------------------------ tests


async def test_a_live_scrape_follows_the_naming_rules(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    text = await live_scrape(redis_factory, tmp_path)
    names = {family.name for family in text_string_to_metric_families(text)}
    assert {"replication_lag_seconds", "replication_build_info", "process_cpu_seconds"} <= names
    assert naming_problems(text) == []


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not on PATH (Debian package prometheus); the same rules are checked "
    "in Python by test_a_live_scrape_follows_the_naming_rules",
)
async def test_a_live_scrape_passes_promtool_check_metrics(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    text = await live_scrape(redis_factory, tmp_path)
    promtool = shutil.which("promtool")
    assert promtool is not None
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(PROMTOOL_TIMEOUT_S):
        output, _ = await proc.communicate(text.encode())
    assert proc.returncode == 0 and not output.strip(), output.decode()
