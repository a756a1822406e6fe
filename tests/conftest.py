"""Suite-wide fixtures: real Redis servers started and torn down per test.

Tests start their own servers (see STYLE.md, "Real servers, started by fixtures") so a clean
checkout runs without a Redis someone else started. By default these are local ``redis-server``
processes; with ``RE_TEST_BACKEND=docker`` and a reachable Docker engine they are containers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis

from replication_engine.testing import (
    RedisFactory,
    RedisHandle,
    RedisProcess,
    async_wait_until,
    free_port,
    wait_until,
)

__all__ = ["DockerRedis", "RedisFactory", "async_wait_until", "wait_until"]

# Selects where test servers run: "local" (default) or "docker".
BACKEND_ENV = "RE_TEST_BACKEND"
# Image for the docker backend; 7.x so the Redis Functions path is covered there too.
DOCKER_IMAGE_ENV = "RE_TEST_REDIS_IMAGE"
DOCKER_DEFAULT_IMAGE = "redis:7"
# Port Redis listens on inside the container.
CONTAINER_PORT = 6379


def _docker_is_reachable() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


class DockerRedis:
    """A Redis container behind the same attributes tests use on ``RedisProcess``.

    The host port is bound explicitly so ``restart()`` comes back on the same port, and the
    container (with its ``/data``) survives ``kill()``, so an AOF survives like a local one.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        maxmemory: int | None = None,
        extra_args: Sequence[str] = (),
        password: str | None = None,
        **unsupported: Any,
    ) -> None:
        given = sorted(name for name, value in unsupported.items() if value is not None)
        if given:
            pytest.skip(f"docker backend does not support RedisProcess options {given}")
        try:
            from testcontainers.community.redis import RedisContainer
        except ImportError:
            from testcontainers.redis import RedisContainer

        self.port = port if port is not None else free_port()
        self.password = password
        command = ["redis-server", "--appendonly", "yes" if appendonly else "no"]
        command += ["--appendfsync", appendfsync]
        if not appendonly:
            command += ["--save", ""]
        if maxmemory is not None:
            command += ["--maxmemory", str(maxmemory)]
        if password:
            command += ["--requirepass", password]
        command += list(extra_args)
        image = os.environ.get(DOCKER_IMAGE_ENV, DOCKER_DEFAULT_IMAGE)
        self._container = RedisContainer(image, password=password)
        self._container.with_command(command).with_bind_ports(CONTAINER_PORT, self.port)
        self._container.start()
        self.host = self._container.get_container_host_ip()

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def client_kwargs(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "password": self.password}

    def client(self, **overrides: Any) -> redis.Redis:
        return redis.Redis(decode_responses=False, **{**self.client_kwargs(), **overrides})

    def _wrapped(self) -> Any:
        return self._container.get_wrapped_container()

    def kill(self) -> None:
        if self.is_running():
            self._wrapped().kill()

    def stop(self) -> None:
        self._container.stop()

    def restart(self, timeout: float = 10.0) -> None:
        self._wrapped().start()
        probe = self.client(socket_timeout=1.0, socket_connect_timeout=1.0)
        try:
            wait_until(
                probe.ping,
                timeout=timeout,
                message=f"container {self.host}:{self.port} answering PING after restart",
                ignore=(redis.exceptions.ConnectionError, redis.exceptions.TimeoutError),
            )
        finally:
            probe.close()

    def pause(self) -> None:
        self._wrapped().pause()

    def resume(self) -> None:
        self._wrapped().unpause()

    def is_running(self) -> bool:
        container = self._wrapped()
        container.reload()
        return bool(container.status in ("running", "paused"))


@pytest.fixture(scope="session")
def redis_backend() -> str:
    """``"docker"`` only when asked for and reachable; otherwise local processes."""
    if os.environ.get(BACKEND_ENV, "local") == "docker" and _docker_is_reachable():
        return "docker"
    return "local"


@pytest.fixture
def redis_factory(
    redis_backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[RedisFactory]:
    """Start real Redis servers on demand; every one is killed at teardown, pass or fail.

    Call it with ``RedisProcess`` keyword arguments. A local server's data directory defaults
    to a fresh directory under ``tmp_path``, so its log and AOF are kept with the test's files.
    Unit tests may not ask for one: tests/unit runs without any server.
    """
    if "unit" in request.node.path.relative_to(Path(__file__).parent).parts[:1]:
        pytest.fail("a unit test asked for a redis-server: it belongs in tests/integration")
    made: list[RedisHandle] = []

    def make(**kwargs: Any) -> RedisHandle:
        if redis_backend == "docker":
            kwargs.pop("data_dir", None)
            docker_server = DockerRedis(**kwargs)
            made.append(docker_server)
            return docker_server
        kwargs.setdefault("data_dir", tmp_path / f"redis-{len(made)}")
        server = RedisProcess(**kwargs)
        # Registered before start so a half-started server is still torn down.
        made.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        errors: list[Exception] = []
        for server in reversed(made):
            try:
                if isinstance(server, DockerRedis):
                    server.stop()
                else:
                    server.kill()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
def redis_server(redis_factory: RedisFactory) -> RedisHandle:
    """One started server with default options."""
    return redis_factory()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist (``-n 2 --dist loadgroup``, as CI runs), the heavy tests (the chaos
    runs and those marked slow) go to one worker, one after another: each keeps a mesh of real
    processes busy for tens of seconds, and two at once on a 2-core machine stretch each other
    past their deadlines (a 100k-key join beside a chaos run did). The rest spreads over the
    workers; most of their time is spent waiting on real servers, not computing."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    chaos = Path(__file__).parent / "chaos"
    for item in items:
        if chaos in item.path.parents or item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.xdist_group("heavy"))
