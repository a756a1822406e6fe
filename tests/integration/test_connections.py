"""No socket descriptor outlives a Redis restart: an engine and a bare client against real
redis-server processes that are killed (-9) and started again on the same port.

Descriptors are counted from ``/proc/self/fd`` and matched against the kernel's TCP tables
(``/proc/net/tcp``, ``/proc/net/tcp6``): a socket a restart left behind shows there as
CLOSE_WAIT, or not at all once a keepalive probe met a reset, while its descriptor stays open.
Servers restart with an AOF fsynced on every write, so a kill -9 loses nothing and each round
ends the way a real restart does: the engine reconnects and replicates a new write.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from harness.mesh import Mesh, MeshNode, open_mesh
from replication_engine.connection import make_client
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisFactory, async_wait_until

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="descriptors are read from Linux's /proc"
)

# kill -9 and restart of both servers, as the operability issue's soak did (it ran eight).
RESTARTS = 5
# Concurrent calls made on each client before every kill, as a repair's drill makes them
# (settings.cold_path.drill_concurrency defaults to 8): each pool holds this many connections
# when its server dies, and the engine's steady use afterwards needs one or two of them.
BURST = 8
# Sockets allowed above the baseline once the engine is back: one more connection than at the
# baseline for each client in use (the local store's, the peer's query and stream clients),
# since which calls overlap at the moment of counting varies from round to round.
SLACK = 3
# Deadline for a server to take a write again, for a write to replicate, and for the idle
# sockets of a restart to be closed (within a second of each client's next use).
DEADLINE_S = 30.0
# Descriptors and reconnection come back fast with the engine's retry timers kept short.
FAST_RECOVERY = {
    "local": {"circuit_reset_timeout_sec": 0.2},
    "settings": {
        "peer_health": {"ping_interval_sec": 0.5, "idle_threshold_sec": 0.5},
        "membership": {"interval_sec": 0.5},
    },
}
DURABLE = {"appendonly": True, "appendfsync": "always"}
TRANSIENT = (RedisConnectionError, RedisTimeoutError, OSError)
# /proc/net/tcp's state codes (include/net/tcp_states.h) that a reader needs to see named.
TCP_STATES = {"01": "ESTABLISHED", "06": "TIME_WAIT", "08": "CLOSE_WAIT", "0A": "LISTEN"}


# ------------------------------------------------------------------------------------ sockets


@dataclass(frozen=True, slots=True)
class TcpSocket:
    state: str
    local: str
    remote: str

    @property
    def is_live(self) -> bool:
        return self.state in ("ESTABLISHED", "LISTEN")


def socket_fds() -> dict[int, str]:
    """This process's socket descriptors: ``fd -> inode``."""
    out: dict[int, str] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # closed between listing and reading
            continue
        if target.startswith("socket:["):
            out[int(name)] = target[len("socket:[") : -1]
    return out


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    if len(host) == 8:  # IPv4, as four little-endian bytes
        text = ".".join(str(b) for b in reversed(bytes.fromhex(host)))
    else:
        text = f"[{host}]"
    return f"{text}:{int(port, 16)}"


def tcp_sockets() -> dict[str, TcpSocket]:
    """Every TCP socket the kernel knows of: ``inode -> state and addresses``."""
    out: dict[str, TcpSocket] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                state = TCP_STATES.get(fields[3], f"state {fields[3]}")
                out[fields[9]] = TcpSocket(state, _address(fields[1]), _address(fields[2]))
    return out


def unix_socket_inodes() -> set[str]:
    with open("/proc/net/unix") as lines:
        next(lines)
        return {fields[6] for fields in (line.split() for line in lines) if len(fields) > 6}


def leftover_sockets(baseline: Mapping[int, str], slack: int) -> str | None:
    """Why the process's sockets are not back to ``baseline`` (None when they are).

    Back means: at most ``slack`` more socket descriptors than the baseline had, and every one
    not in the baseline is a live TCP connection (or a Unix socket), none a dead one.
    """
    now = socket_fds()
    tcp = tcp_sockets()
    unix = unix_socket_inodes()
    known = set(baseline.values())
    dead: list[str] = []
    new: list[str] = []
    for fd, inode in sorted(now.items()):
        entry = tcp.get(inode)
        if entry is not None:
            what = f"TCP {entry.state} {entry.local} -> {entry.remote}"
        elif inode in unix:
            what = "Unix socket"
        else:
            what = "no TCP connection (gone from the kernel's table, descriptor still open)"
        line = f"fd {fd} socket:[{inode}]: {what}"
        if inode in known:
            continue
        new.append(line)
        if inode not in unix and (entry is None or not entry.is_live):
            dead.append(line)
    if not dead and len(now) <= len(baseline) + slack:
        return None
    return (
        f"{len(now)} socket descriptors, baseline {len(baseline)} (+{slack} allowed); "
        f"{len(dead)} belong to no live connection:\n  "
        + "\n  ".join(dead or ["(none)"])
        + "\nnew since the baseline:\n  "
        + "\n  ".join(new or ["(none)"])
    )


async def wait_back_to_baseline(
    baseline: Mapping[int, str], slack: int, use: Callable[[], Awaitable[object]] | None = None
) -> None:
    """Wait until :func:`leftover_sockets` finds nothing, calling ``use`` before each look.

    Idle connections a restart killed are closed when their client is next used (within a
    second), so the look waits on the engine's own use of its clients, or on ``use``.
    """

    async def back() -> bool:
        if use is not None:
            try:
                await use()
            except TRANSIENT:
                return False
        return leftover_sockets(baseline, slack) is None

    try:
        await async_wait_until(
            back, timeout=DEADLINE_S, interval=0.1, message="socket descriptors back to baseline"
        )
    except AssertionError:
        report = leftover_sockets(baseline, slack)
        if report is None:  # back just after the deadline
            return
        raise AssertionError(f"after {DEADLINE_S}s: {report}") from None


# ------------------------------------------------------------------------------------ helpers


async def _put(store: RedisStore, key: str) -> bool:
    try:
        await store.put(key, key.encode())
    except TRANSIENT:
        return False
    return True


async def _holds(store: RedisStore, key: str) -> bool:
    try:
        return await store.get(key) is not None
    except TRANSIENT:
        return False


async def replicate(mesh: Mesh, key: str) -> None:
    """Write ``key`` on b once b takes writes, and wait until a's engine has copied it."""
    await async_wait_until(
        lambda: _put(mesh["b"].store, key), timeout=DEADLINE_S, message=f"b taking {key!r}"
    )
    await async_wait_until(
        lambda: _holds(mesh["a"].store, key),
        timeout=DEADLINE_S,
        interval=0.05,
        message=f"{key!r} replicated from b to a",
    )


async def restart(nodes: list[MeshNode]) -> None:
    """kill -9 every node's Redis, then start each again on its port."""
    for node in nodes:
        node.server.kill()
    for node in nodes:
        await asyncio.to_thread(node.server.restart)


# ------------------------------------------------------------------------------------ restarts


async def test_socket_descriptors_return_to_baseline_after_five_redis_restarts(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(
        redis_factory,
        tmp_path,
        {"a": ["b"], "b": []},
        common=FAST_RECOVERY,
        peer_options={"*": {"circuit_reset_timeout_sec": 0.2}},
        redis_options={"*": DURABLE},
    ) as mesh:
        a, b = mesh["a"], mesh["b"]
        peer = a.running().peers["b"]
        await replicate(mesh, "k:0")
        await mesh.wait_idle()
        baseline = socket_fds()
        for round_ in range(1, RESTARTS + 1):
            # A burst before each kill, as a repair's drill makes: each pool holds BURST
            # connections when its server dies.
            await asyncio.gather(*(peer.ping() for _ in range(BURST)))
            await asyncio.gather(*(a.store.get("k:0") for _ in range(BURST)))
            await restart([a, b])
            await replicate(mesh, f"k:{round_}")
        await wait_back_to_baseline(baseline, SLACK)


async def test_a_client_closes_its_idle_connections_to_a_restarted_server(
    redis_factory: RedisFactory,
) -> None:
    server = redis_factory()
    client = make_client(server.url)
    try:
        assert await client.ping()
        baseline = socket_fds()
        await asyncio.gather(*(client.ping() for _ in range(BURST)))
        server.kill()
        await asyncio.to_thread(server.restart)

        # One command at a time, as a quiet client runs: one connection is all it needs.
        await wait_back_to_baseline(baseline, 0, use=client.ping)
    finally:
        await client.aclose()
    # Closing the client leaves nothing open either.
    assert leftover_sockets(baseline, 0) is None
