"""/health, /ready, /metrics and /status over HTTP (aiohttp).

``/health`` answers whether the process is alive (a supervisor restarts it otherwise);
``/ready`` whether a load balancer should send it reads (replication is caught up within the
configured lag). Keeping the two apart stops a lagging node from being restarted in a loop.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from replication_engine.engine import ReplicationEngine


class HttpServer:
    def __init__(self, engine: ReplicationEngine, host: str, port: int) -> None:
        self.engine = engine
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/status", self._status)
        self._app = app

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        runner = web.AppRunner(self._app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        for address in runner.addresses:  # the real port when configured with port 0
            self.port = int(address[1])
            break

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, _request: web.Request) -> web.Response:
        state = self.engine.state
        alive = state in ("starting", "running", "stopping")
        return _json({"status": "ok" if alive else "down", "state": state}, 200 if alive else 503)

    async def _ready(self, _request: web.Request) -> web.Response:
        ready, reasons = self.engine.readiness()
        body = {"ready": ready, "reasons" if not ready else "notes": reasons}
        return _json(body, 200 if ready else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self.engine.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _status(self, _request: web.Request) -> web.Response:
        return _json(self.engine.status(), 200)


def _json(body: Any, status: int) -> web.Response:
    return web.Response(
        text=json.dumps(body, indent=2, default=str), status=status, content_type="application/json"
    )
