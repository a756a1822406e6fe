"""Redis clients for the local store and for peers, built one way.

TLS (``rediss://``) verifies the server by default; credentials can come from the URL or from
separate settings so secrets need not sit in a config file. Nothing here logs a URL: callers use
:func:`redact_url` for anything a person will read.

Every client made here delivers a cancellation that lands while a command is being written (see
:class:`_CancelSafeSend`), so code built on these clients needs no guard of its own for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)

from replication_engine.config import redact_url

try:  # redis-py >= 7
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py sends no such handshake
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]

__all__ = ["TlsOptions", "make_client", "redact_url"]


@dataclass(frozen=True, slots=True)
class TlsOptions:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True


def make_client(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    tls: TlsOptions | None = None,
    socket_timeout: float | None = 10.0,
    connect_timeout: float = 5.0,
    client_name: str | None = None,
    max_connections: int = 64,
) -> Redis:
    """A client whose pool makes callers wait for a free connection rather than fail.

    redis-py's default pool raises once ``max_connections`` are busy; under a burst of
    concurrent writers that turns load into errors.
    """
    kwargs: dict[str, Any] = {
        "decode_responses": False,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "health_check_interval": 0,
    }
    if MaintNotificationsConfig is not None:
        # redis-py's default ("auto") sends CLIENT MAINT_NOTIFICATIONS on every RESP3 connect,
        # for cluster endpoints that move. A standalone store has none, and a least-privilege
        # user may not run it: Redis 6.2 then logs an ACL denial for every connection.
        kwargs["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    if client_name:
        kwargs["client_name"] = client_name
    if username:
        kwargs["username"] = username
    if password:
        kwargs["password"] = password
    if url.startswith("rediss://"):
        tls = tls or TlsOptions()
        kwargs["ssl_cert_reqs"] = "required" if tls.verify else "none"
        kwargs["ssl_check_hostname"] = tls.verify
        if tls.ca_file:
            kwargs["ssl_ca_certs"] = tls.ca_file
        if tls.cert_file:
            kwargs["ssl_certfile"] = tls.cert_file
        if tls.key_file:
            kwargs["ssl_keyfile"] = tls.key_file
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=connect_timeout + (socket_timeout or 0),
        **kwargs,
    )
    # from_url picks the class from the URL's scheme (its choice overrides a connection_class
    # argument), so the cancel-safe variant is swapped in before the pool makes a connection.
    pool.connection_class = _CANCEL_SAFE[pool.connection_class]
    return Redis.from_pool(pool)


class _CancelSafeSend(AbstractConnection):
    """A connection whose command writes never swallow a cancellation.

    With a socket timeout set, redis-py (8.1.0, ``AbstractConnection.send_packed_command`` in
    ``redis/asyncio/connection.py``) writes each command under ``asyncio.wait_for``. On
    CPython 3.11 ``wait_for`` returns normally when its task is cancelled just as the write
    completes (gh-86296, fixed in 3.12): the cancel request is used up and never raised, so the
    call reads its reply and returns, and a cancelled tailer or health loop runs on. Every
    other await on the command path (pool wait, connect, read) uses ``asyncio.timeout`` and
    raises as it should.

    So a write that returns while a cancel request newer than the call is pending raises it
    here. The command is on the wire but its reply will not be read, so the connection is
    closed first, as redis-py does for a write interrupted by any other exception: a reply left
    on the socket would be read by the next command that borrows the connection.
    """

    __slots__ = ()

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        task = asyncio.current_task()
        requested = task.cancelling() if task is not None else 0
        await super().send_packed_command(command, check_health)
        if task is not None and task.cancelling() > requested:
            await self.disconnect(nowait=True)
            raise asyncio.CancelledError


class _CancelSafeConnection(_CancelSafeSend, Connection):
    __slots__ = ()


class _CancelSafeSSLConnection(_CancelSafeSend, SSLConnection):
    __slots__ = ()


class _CancelSafeUnixConnection(_CancelSafeSend, UnixDomainSocketConnection):
    __slots__ = ()


# The cancel-safe variant of each connection class redis-py's from_url can choose.
_CANCEL_SAFE: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _CancelSafeConnection,
    SSLConnection: _CancelSafeSSLConnection,
    UnixDomainSocketConnection: _CancelSafeUnixConnection,
}
