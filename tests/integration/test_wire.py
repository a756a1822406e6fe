"""A Wire against real redis-server processes: replies in order with errors in their place, the
client's ACL user and TLS, and no reply ever read by the wrong pipeline (cancelled, timed out,
or cut off by a restart)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from replication_engine.connection import Failure, TlsOptions, failure, make_client
from replication_engine.testing import (
    RedisFactory,
    async_wait_until,
    find_redis_server,
    make_test_ca,
    redis_supports_tls,
)
from replication_engine.wire import Wire


@contextlib.asynccontextmanager
async def wired(url: str, *, timeout: float, **client: Any) -> AsyncIterator[tuple[Redis, Wire]]:
    """A client made as the engine makes its clients, and a Wire on it; both closed after."""
    redis = make_client(url, **client)
    wire = Wire(redis, timeout=timeout)
    try:
        yield redis, wire
    finally:
        wire.close()
        await redis.aclose()


async def _wire_clients(direct: Redis) -> list[dict[str, object]]:
    """The server's clients other than ``direct`` itself."""
    me = await direct.client_id()
    return [c for c in await direct.client_list() if int(c["id"]) != me]


async def test_a_pipeline_gets_each_reply_in_order_with_an_error_in_its_place(
    redis_factory: RedisFactory,
) -> None:
    server = redis_factory()
    async with wired(server.url, timeout=5.0) as (client, wire):
        await client.set("text", b"v")
        value = bytes(range(256)) * 8  # every byte value, and more than one TCP segment's worth
        for i in range(300):
            await client.xadd("s", {"n": i, "blob": value})
        replies = await wire.execute(
            [
                ("GET", "text"),
                ("HGETALL", "text"),  # WRONGTYPE
                ("XRANGE", "s", "-", "+"),
                ("INCRBY", "n", 7),
                ("GET", "missing"),
            ]
        )
        assert replies[0] == b"v"
        assert isinstance(replies[1], ResponseError) and "WRONGTYPE" in str(replies[1])
        assert failure(replies[1]) is Failure.REFUSED
        assert len(replies[2]) == 300
        assert [fields[fields.index(b"blob") + 1] for _id, fields in replies[2]] == [value] * 300
        assert replies[3:] == [7, None]
        # The same connection again: one open, its replies all read.
        assert await wire.execute([("GET", "text")]) == [b"v"]
        assert len(await _wire_clients(client)) == 1


async def test_a_cancelled_pipeline_leaves_the_ones_behind_it_their_own_replies(
    redis_factory: RedisFactory,
) -> None:
    """Callers share a wire (a partition's tailers share its apply connection): one giving up
    must neither fail the others' pipelines nor hand them its replies."""
    server = redis_factory()
    async with wired(server.url, timeout=10.0) as (client, wire):
        assert await wire.execute([("SET", "k", 0)]) in ([b"OK"], [True])
        (before,) = await _wire_clients(client)
        server.pause()  # SIGSTOP: both pipelines are sent, neither is answered
        try:
            given_up = asyncio.create_task(wire.execute([("INCR", "k"), ("INCR", "k")]))
            behind = asyncio.create_task(wire.execute([("GET", "k")]))
            await async_wait_until(lambda: wire.in_flight == 2, timeout=10, message="both sent")
            given_up.cancel()
            with pytest.raises(asyncio.CancelledError):
                await given_up
        finally:
            server.resume()
        # The abandoned INCRs ran and their replies were dropped in their place.
        assert await behind == [b"2"]
        assert await wire.execute([("INCR", "k")]) == [3]
        assert wire.in_flight == 0
        (after,) = await _wire_clients(client)
        assert after["id"] == before["id"], "the connection was closed for a cancelled caller"


async def test_a_pipeline_that_cannot_be_sent_fails_alone(redis_factory: RedisFactory) -> None:
    """An argument the protocol cannot carry fails its own call, before anything is sent or any
    reply is expected: the calls after it on the shared connection get their own replies."""
    server = redis_factory()
    async with wired(server.url, timeout=2.0) as (client, wire):
        assert await wire.execute([("SET", "k", 0)]) in ([b"OK"], [True])
        with pytest.raises(TypeError):
            await wire.execute([("INCR", "k"), ("SET", "other", object())])
        assert wire.in_flight == 0
        replies = await asyncio.gather(*(wire.execute([("INCR", "k")]) for _ in range(3)))
        assert sorted(r[0] for r in replies) == [1, 2, 3], replies
        assert await client.exists("other") == 0


async def test_a_cancelled_blocking_pipeline_closes_its_connection(
    redis_factory: RedisFactory,
) -> None:
    """A caller that gives up on a blocked read must not leave the connection blocked (the
    next pipeline would wait behind it) nor owing a reply: the connection is closed."""
    server = redis_factory()
    async with wired(server.url, timeout=5.0) as (client, wire):
        await client.set("k", b"mine")
        blocked = asyncio.create_task(
            wire.execute([("XREAD", "BLOCK", 0, "STREAMS", "s", "$")], timeout=60.0, blocking=True)
        )

        async def reading() -> bool:
            return any(c["cmd"] == "xread" for c in await _wire_clients(client))

        await async_wait_until(reading, timeout=10, message="the XREAD blocks on the server")
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked

        async def closed() -> bool:
            return not await reading()

        await async_wait_until(closed, timeout=10, message="the blocked connection closed")
        await client.xadd("s", {"would": "be misread"})
        assert await wire.execute([("GET", "k")]) == [b"mine"]


async def test_a_timeout_is_redis_timeout_and_the_next_call_connects_afresh(
    redis_factory: RedisFactory,
) -> None:
    server = redis_factory()
    async with wired(server.url, timeout=0.3) as (client, wire):
        await client.set("k", b"1")
        assert await wire.execute([("GET", "k")]) == [b"1"]
        (before,) = await _wire_clients(client)
        server.pause()  # SIGSTOP: the connection stays up, nothing answers
        try:
            with pytest.raises(RedisTimeoutError) as raised:
                await wire.execute([("INCR", "k")])
            assert failure(raised.value) is Failure.UNAVAILABLE
        finally:
            server.resume()
        # The INCR ran once the server woke; its late reply went nowhere.
        assert await wire.execute([("GET", "k")], timeout=5.0) == [b"2"]
        (after,) = await _wire_clients(client)
        assert after["id"] != before["id"], "the timed-out connection was used again"


async def test_a_restart_fails_the_waiting_call_as_unavailable_then_the_wire_reconnects(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    server = redis_factory(appendonly=True, appendfsync="always")
    async with wired(server.url, timeout=30.0, socket_timeout=2.0, connect_timeout=2.0) as (
        client,
        wire,
    ):
        waiting = asyncio.create_task(wire.execute([("BLPOP", "never", 0)], timeout=30.0))

        async def blocking() -> bool:
            return any(c["cmd"] == "blpop" for c in await _wire_clients(client))

        await async_wait_until(blocking, timeout=10, message="the BLPOP blocks on the server")
        server.kill()
        with pytest.raises(RedisConnectionError) as raised:
            await asyncio.wait_for(waiting, 10)  # failed by the closed socket, not its timeout
        assert failure(raised.value) is Failure.UNAVAILABLE
        with pytest.raises((RedisConnectionError, OSError)):
            await wire.execute([("PING",)])
        server.restart()
        assert await wire.execute([("PING",)]) in ([b"PONG"], [True])


async def test_the_wire_speaks_as_the_clients_acl_user(redis_factory: RedisFactory) -> None:
    server = redis_factory()
    admin = server.client()
    admin.acl_setuser(
        "reader",
        enabled=True,
        passwords=["+s3cret"],
        keys=["app:*"],
        commands=["+get", "+acl|whoami"],
    )
    async with wired(server.url, timeout=5.0, username="reader", password="s3cret") as (_, wire):
        admin.set("app:k", b"v")
        replies = await wire.execute([("ACL", "WHOAMI"), ("GET", "app:k"), ("SET", "app:k", 1)])
        assert replies[:2] == [b"reader", b"v"]
        assert isinstance(replies[2], NoPermissionError)
        assert failure(replies[2]) is Failure.DENIED
    admin.close()


async def test_the_wire_speaks_over_the_clients_verified_tls(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to generate test certificates")
    if not redis_supports_tls(find_redis_server()):
        pytest.skip(f"{find_redis_server()} was built without TLS")
    ca = make_test_ca(tmp_path / "ca")
    server = redis_factory(tls=ca)
    async with wired(server.url, timeout=5.0, tls=TlsOptions(ca_file=str(ca.ca_cert))) as (
        client,
        wire,
    ):
        await client.set("k", b"over tls")
        assert await wire.execute([("GET", "k")]) == [b"over tls"]
        assert len(await _wire_clients(client)) == 1
