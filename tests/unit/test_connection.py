"""Clients from ``make_client``: what their connections are built with, a cancellation that
lands as a command write completes, and a connection whose server hung up.

Credentials: a ``username`` or ``password`` setting replaces the URL's, which redis-py's own
``from_url`` would not do; checked on the pool's keyword arguments, with no server.

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
from urllib.parse import quote

import pytest
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.exceptions import (
    ClusterDownError,
    InvalidResponse,
    RedisClusterUnreachableError,
    ResponseError,
    SlotNotCoveredError,
)

from replication_engine import StoreAccessError, StoreUnavailableError
from replication_engine.connection import (
    Failure,
    TlsOptions,
    _address_remap,
    _BoundedHiredisParser,
    connection_kwargs,
    failure,
    make_client,
    parse_address,
)
from replication_engine.testing import async_wait_until

# What the fake write sends nowhere but is checked against: one PING.
PING = b"*1\r\n$4\r\nPING\r\n"
# Distinctive secrets, with characters a URL must percent-encode.
URL_PASSWORD = "url-S3cret/@:%-1f"
SETTING_PASSWORD = "setting-S3cret/@:%-2e"
ENCODED_URL_PASSWORD = quote(URL_PASSWORD, safe="")


def _url(userinfo: str = "", query: str = "") -> str:
    return f"redis://{userinfo}10.0.0.7:6380/2{query}"


# ------------------------------------------------------------------------------------ credentials


def test_a_password_setting_replaces_the_urls_password_and_keeps_its_user() -> None:
    kwargs = connection_kwargs(_url(f"engine:{ENCODED_URL_PASSWORD}@"), password=SETTING_PASSWORD)
    assert kwargs["password"] == SETTING_PASSWORD
    assert kwargs["username"] == "engine"
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("10.0.0.7", 6380, 2)


def test_a_username_setting_replaces_the_urls_user_and_keeps_its_password() -> None:
    kwargs = connection_kwargs(_url("engine:pw@"), username="replicator")
    assert (kwargs["username"], kwargs["password"]) == ("replicator", "pw")


def test_both_settings_replace_both_parts_of_the_urls_userinfo() -> None:
    kwargs = connection_kwargs(
        _url(f"engine:{ENCODED_URL_PASSWORD}@"), username="replicator", password=SETTING_PASSWORD
    )
    assert (kwargs["username"], kwargs["password"]) == ("replicator", SETTING_PASSWORD)


def test_a_password_setting_replaces_a_password_given_as_a_query_option() -> None:
    kwargs = connection_kwargs(_url(query="?password=query-pw"), password=SETTING_PASSWORD)
    assert kwargs["password"] == SETTING_PASSWORD


def test_without_settings_the_urls_credentials_are_used_percent_decoded() -> None:
    kwargs = connection_kwargs(_url(f"us%40er:{ENCODED_URL_PASSWORD}@"))
    assert (kwargs["username"], kwargs["password"]) == ("us@er", URL_PASSWORD)


def test_settings_apply_to_a_url_without_credentials() -> None:
    kwargs = connection_kwargs(_url(), username="engine", password=SETTING_PASSWORD)
    assert (kwargs["username"], kwargs["password"]) == ("engine", SETTING_PASSWORD)
    assert "username" not in connection_kwargs(_url())
    assert "password" not in connection_kwargs(_url())


def test_an_empty_setting_counts_as_unset() -> None:
    kwargs = connection_kwargs(_url("engine:pw@"), username="", password="")
    assert (kwargs["username"], kwargs["password"]) == ("engine", "pw")


def test_a_url_query_option_wins_over_a_timeout_argument_as_with_from_url() -> None:
    kwargs = connection_kwargs(_url(query="?socket_timeout=2.5"), socket_timeout=10.0)
    assert kwargs["socket_timeout"] == 2.5
    assert kwargs["socket_connect_timeout"] == 5.0


def test_tls_options_apply_to_a_rediss_url_only() -> None:
    tls = TlsOptions(ca_file="ca.pem", cert_file="c.pem", key_file="k.pem", verify=False)
    secure = connection_kwargs("rediss://10.0.0.7:6380/0", tls=tls)
    assert issubclass(secure["connection_class"], SSLConnection)
    assert secure["ssl_cert_reqs"] == "none"
    assert secure["ssl_check_hostname"] is False
    assert (secure["ssl_ca_certs"], secure["ssl_certfile"], secure["ssl_keyfile"]) == (
        "ca.pem",
        "c.pem",
        "k.pem",
    )
    assert not any(name.startswith("ssl_") for name in connection_kwargs(_url(), tls=tls))
    verified = connection_kwargs("rediss://10.0.0.7:6380/0")
    assert (verified["ssl_cert_reqs"], verified["ssl_check_hostname"]) == ("required", True)


def test_a_bad_query_value_is_refused_without_quoting_the_url() -> None:
    with pytest.raises(ValueError) as raised:
        connection_kwargs(_url(f"engine:{ENCODED_URL_PASSWORD}@", "?db=x"))
    assert "S3cret" not in str(raised.value)


async def test_a_clients_connections_get_the_setting_and_its_pool_shows_neither_password() -> None:
    client = make_client(_url(f"engine:{ENCODED_URL_PASSWORD}@"), password=SETTING_PASSWORD)
    try:
        pool = client.connection_pool
        assert pool.connection_kwargs["password"] == SETTING_PASSWORD
        assert pool.make_connection().password == SETTING_PASSWORD
        for text in (repr(pool), repr(client), repr(pool.make_connection())):
            assert "S3cret" not in text
    finally:
        await client.aclose()


# ------------------------------------------------------------------------------------ classes


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


# ------------------------------------------------------------------------------------ sockets


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


async def test_a_connection_whose_server_closed_its_end_has_hung_up() -> None:
    client = make_client("redis://127.0.0.1:1/0")
    connection = client.connection_pool.make_connection()
    try:
        assert not connection.has_hung_up()  # type: ignore[attr-defined]  # not connected
        async with _connected(connection) as other_end:
            assert not connection.has_hung_up()  # type: ignore[attr-defined]
            other_end.close()
            await async_wait_until(
                connection.has_hung_up,  # type: ignore[attr-defined]
                timeout=5.0,
                message="the end of stream seen by the idle connection",
            )
    finally:
        await client.aclose()


# ------------------------------------------------------------------------------------------------
# Failures and cluster addresses


@pytest.mark.parametrize(
    "exc",
    [
        RedisClusterUnreachableError("Redis Cluster cannot be connected"),
        ClusterDownError("CLUSTERDOWN The cluster is down"),
        SlotNotCoveredError("slot 42 is not covered by the cluster"),
    ],
)
def test_a_cluster_that_cannot_serve_is_unavailable_like_a_redis_that_is_down(
    exc: Exception,
) -> None:
    """Not REFUSED, and not an unknown error: the peer is down, its breaker counts it, and
    the tailer waits for it rather than failing."""
    assert failure(exc) is Failure.UNAVAILABLE


def test_a_command_error_is_still_refused() -> None:
    assert failure(ResponseError("WRONGTYPE Operation against a key")) is Failure.REFUSED


def test_a_reply_that_is_not_resp_or_breaks_the_bounds_is_malformed() -> None:
    assert failure(InvalidResponse("Bad integer value")) is Failure.MALFORMED
    assert failure(InvalidResponse("Multi-bulk length out of range")) is Failure.MALFORMED


class _Replying:
    """What redis-py's parse step needs of a connection: a reply to read."""

    _resp2_fallback = False

    def __init__(self, reply: object) -> None:
        self.reply = reply

    async def read_response(self, **options: object) -> object:
        return self.reply


async def test_an_error_raised_as_redis_py_makes_a_reply_into_values_is_malformed() -> None:
    """The audit's XINFO STREAM without ``last-entry``: redis-py's callback raises KeyError."""
    client = make_client("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(KeyError) as info:
            await client.parse_response(_Replying({b"length": 0}), "XINFO STREAM")
    finally:
        await client.aclose()
    assert failure(info.value) is Failure.MALFORMED


def test_the_same_error_raised_in_our_own_code_is_still_a_bug() -> None:
    """Only the parse step is the server's: a KeyError anywhere else is ours, with its
    traceback."""
    with pytest.raises(KeyError) as info:
        _ = {}["last-entry"]
    assert failure(info.value) is None
    assert failure(KeyError("last-entry")) is None


async def test_every_clients_hiredis_parser_is_bounded() -> None:
    """redis-py's hiredis parser makes a list of the declared length at the header: a
    connection's parser refuses an absurd one instead (no server: the parser is fed)."""
    client = make_client("redis://127.0.0.1:1/0")
    try:
        connection = client.connection_pool.make_connection()
        parser = connection._parser
        assert isinstance(parser, _BoundedHiredisParser)
        parser.on_connect(connection)
        reader = parser._reader
        reader.feed(b"*2000000000\r\n")
        with pytest.raises(InvalidResponse, match="Multi-bulk length out of range"):
            reader.gets()
    finally:
        await client.aclose()


def test_the_stores_own_errors_keep_their_kind() -> None:
    """The store's errors are OSErrors too (StoreAccessError a PermissionError): a tool that
    classifies one must not take a refused password for a Redis that did not answer."""
    assert failure(StoreAccessError("node 'a': the local Redis refused this user")) is (
        Failure.DENIED
    )
    assert failure(StoreUnavailableError("node 'a': the local Redis did not answer")) is (
        Failure.UNAVAILABLE
    )


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("10.0.0.5:7000", ("10.0.0.5", 7000)),
        ("redis-0.cluster.svc:6379", ("redis-0.cluster.svc", 6379)),
        ("[::1]:7000", ("::1", 7000)),
        (" 127.0.0.1:1 ", ("127.0.0.1", 1)),
    ],
)
def test_an_address_is_host_and_port(text: str, address: tuple[str, int]) -> None:
    assert parse_address(text) == address


@pytest.mark.parametrize(
    "text", ["7000", ":7000", "host:", "host:0", "host:65536", "host:x", "::1:7000", "[::1]"]
)
def test_a_malformed_address_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ValueError, match="host:port") as caught:
        parse_address(text)
    assert repr(text) in str(caught.value)


def test_the_address_table_maps_announced_addresses_and_passes_others_through() -> None:
    remap = _address_remap({"10.0.0.5:7000": "gateway:17000", "[fe80::1]:7001": "gateway:17001"})
    assert remap(("10.0.0.5", 7000)) == ("gateway", 17000)
    assert remap(("fe80::1", 7001)) == ("gateway", 17001)
    assert remap(("10.0.0.6", 7000)) == ("10.0.0.6", 7000)
