"""Redis clients for the local store and for peers, built one way.

TLS (``rediss://``) verifies the server by default; credentials can come from the URL or from
separate settings so secrets need not sit in a config file. Nothing here logs a URL: callers use
:func:`redact_url` for anything a person will read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis

from replication_engine.config import redact_url

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
    return Redis.from_pool(pool)
