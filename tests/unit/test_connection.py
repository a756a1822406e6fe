"""Clients from ``make_client`` raise a cancellation that lands as a command write completes.

redis-py writes under ``asyncio.wait_for`` when a socket timeout is set, and on CPython 3.11
``wait_for`` returns normally if its task is cancelled just as the write finishes (gh-86296). The
race is made deterministic here: the write itself cancels the calling task as it completes, over
a socket pair, so no server is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator, Iterable

import pytest
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)

from replication_engine.connection import make_client

# What the fake write sends nowhere but is checked against: one PING.
PING = b"*1\r\n$4\r\nPING\r\n"


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("redis://127.0.0.1:1/0", Connection),
        ("rediss://127.0.0.1:1/0", SSLConnection),
        ("unix:///tmp/none.sock", UnixDomainSocketConnection),
    ],
)
async def test_every_scheme_gets_the_cancel_safe_variant_of_its_connection_class(
    url: str, base: type[AbstractConnection]
) -> None:
    client = make_client(url)
    try:
        connection_class = client.connection_pool.connection_class
        assert issubclass(connection_class, base)
        assert connection_class is not base
        assert connection_class.__name__.startswith("_CancelSafe")
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _connected(connection: AbstractConnection) -> AsyncIterator[socket.socket]:
    """Attach ``connection`` to one end of a socket pair; yields the other end."""
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=ours)
    connection._reader = reader
    connection._writer = writer
    try:
        yield theirs
    finally:
        await connection.disconnect(nowait=True)
        theirs.close()


async def _send_cancelled_as_write_completes(connection: AbstractConnection) -> asyncio.Task[None]:
    """Send a PING whose write, as it completes, cancels the sending task; returns the task.

    The cancel lands while redis-py's ``wait_for`` waits for the finished write to wake it.
    """
    task = asyncio.create_task(connection.send_packed_command(PING, check_health=False))
    real = connection._send_packed_command

    async def write(command: Iterable[bytes]) -> None:
        await real(command)
        task.cancel()

    connection._send_packed_command = write  # type: ignore[method-assign]
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return task


async def test_a_cancel_landing_as_the_write_completes_is_raised_and_drops_the_connection() -> None:
    client = make_client("redis://127.0.0.1:1/0", socket_timeout=5.0)
    connection = client.connection_pool.make_connection()
    try:
        async with _connected(connection) as other_end:
            task = await _send_cancelled_as_write_completes(connection)
            assert task.cancelled()
            # The command went out, but its reply would be left for the next borrower.
            assert other_end.recv(64) == PING
            assert not connection.is_connected
    finally:
        await client.aclose()


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="gh-86296 is fixed in CPython 3.12")
async def test_a_plain_redis_py_connection_swallows_that_cancel_on_python_3_11() -> None:
    """The bug the cancel-safe variant exists for; when this fails, the variant can go."""
    connection = Connection(host="127.0.0.1", port=1, socket_timeout=5.0)
    async with _connected(connection):
        task = await _send_cancelled_as_write_completes(connection)
        assert not task.cancelled()
        assert task.cancelling() == 1  # requested, never delivered
        assert connection.is_connected


async def test_a_send_without_a_cancel_keeps_the_connection() -> None:
    client = make_client("redis://127.0.0.1:1/0", socket_timeout=5.0)
    connection = client.connection_pool.make_connection()
    try:
        async with _connected(connection) as other_end:
            await connection.send_packed_command(PING, check_health=False)
            assert other_end.recv(64) == PING
            assert connection.is_connected
    finally:
        await client.aclose()
