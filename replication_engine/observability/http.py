"""/health, /ready, /metrics and /status over HTTP (aiohttp).

``/health`` answers whether the process is alive (a supervisor restarts it otherwise);
``/ready`` whether a load balancer should send it reads (replication is caught up within the
configured lag). Keeping the two apart stops a lagging node from being restarted in a loop.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

# Engine states in which the process is alive: a supervisor restarts it in any other.
ALIVE_STATES = ("starting", "running", "stopping")


class Probed(Protocol):
    """What the endpoints read: the engine answers these, and nothing else of it is reachable
    from here (the server neither imports nor drives the engine)."""

    @property
    def state(self) -> str: ...

    def readiness(self) -> tuple[bool, list[str]]: ...

    def status(self) -> dict[str, Any]: ...

    def render_metrics(self) -> bytes: ...


class HttpServer:
    def __init__(self, probed: Probed, host: str, port: int) -> None:
        self.probed = probed
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
        state = self.probed.state
        alive = state in ALIVE_STATES
        return _json({"status": "ok" if alive else "down", "state": state}, 200 if alive else 503)

    async def _ready(self, _request: web.Request) -> web.Response:
        ready, reasons = self.probed.readiness()
        body = {"ready": ready, "reasons" if not ready else "notes": reasons}
        return _json(body, 200 if ready else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(
            body=self.probed.render_metrics(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _status(self, _request: web.Request) -> web.Response:
        return _json(self.probed.status(), 200)


def _json(body: Any, status: int) -> web.Response:
    return web.Response(
        text=json.dumps(body, indent=2, default=str), status=status, content_type="application/json"
    )
