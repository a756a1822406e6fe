"""Redis clients for the local store and for peers, built one way.

TLS (``rediss://``) verifies the server by default. Credentials can come from the URL or from
separate settings, so secrets need not sit in a config file; a setting replaces the URL's part
(:func:`connection_kwargs`). Nothing here logs a URL: callers use :func:`redact_url` for anything
a person will read.

Every client made here delivers a cancellation that lands while a command is being written (see
:class:`_CancelSafeSend`), so code built on these clients needs no guard of its own for it,
closes the idle connections a server hung up on (see :class:`_Pool`), so a Redis restart leaves
no descriptor behind, and reads replies within the bounds a Wire reads them in (see
:class:`_BoundedReplies`), so no server can make it allocate what a reply's header declares.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from redis._parsers import _AsyncHiredisParser
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.exceptions import (
    AskError,
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ClusterDownError,
    InvalidResponse,
    MasterDownError,
    MovedError,
    NoPermissionError,
    ReadOnlyError,
    RedisClusterUnreachableError,
    RedisError,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from replication_engine.wire import bound_reader

try:  # redis-py >= 7
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # pragma: no cover - older redis-py sends no such handshake
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]

__all__ = [
    "Failure",
    "TlsOptions",
    "address_problem",
    "client_maker",
    "connection_kwargs",
    "failure",
    "make_client",
    "make_cluster_client",
    "node_of",
    "on_one_connection",
    "parse_address",
]

# How often, at most, a pool looks over its idle connections for ones the server hung up on.
# The look is done by a borrow, costs about 0.15 us per idle connection and no I/O; once a
# second keeps it off the command path while closing a restart's dead sockets within a second
# of the client's next use.
IDLE_CHECK_INTERVAL_S = 1.0


class Failure(StrEnum):
    """What a failed Redis call says about retrying it: the one place that decides.

    The store turns each kind into its own error, the peers count ``UNAVAILABLE``, ``DENIED``
    and ``MALFORMED`` against their breaker; neither looks at redis-py's classes itself.
    """

    UNAVAILABLE = "unavailable"  # no answer, loading, failing over: waiting alone may fix it
    DENIED = "denied"  # credentials or ACL: an operator must change something
    # The reply was not RESP, broke a bound (wire.MAX_REPLY_ELEMENTS), or was not of the shape
    # its command returns: the server's fault, not the caller's. The connection is dropped.
    MALFORMED = "malformed"
    REFUSED = "refused"  # the server answered with an error about this command


# redis-py's step that reads a reply and makes it into values (its response callbacks), on a
# client, a pipeline and a cluster node alike. An error that is not redis-py's own, raised
# under it (a KeyError in parse_xinfo_stream, a ValueError in int()), was raised by a reply.
_PARSE_STEP = "parse_response"


def _raised_reading_reply(exc: BaseException) -> bool:
    """Whether ``exc`` was raised under redis-py's :data:`_PARSE_STEP`."""
    tb = exc.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        module = str(frame.f_globals.get("__name__"))
        if frame.f_code.co_name == _PARSE_STEP and module.startswith("redis."):
            return True
        tb = tb.tb_next
    return False


def failure(exc: BaseException) -> Failure | None:
    """The kind of a failed Redis call, or None when ``exc`` is not one (a bug of ours).

    A reply that is not RESP, or breaks the bounds replies are read in, is ``MALFORMED``; so
    is an error of another kind than redis-py's raised as redis-py makes a reply into values
    (its response callbacks), and no other: the same error raised in our own code is a bug.
    """
    # Order matters: redis-py derives its authentication errors from its ConnectionError,
    # and the failover states (READONLY, MASTERDOWN, TRYAGAIN) from ResponseError. A
    # PermissionError is an OSError, so it comes first too: the store's StoreAccessError is one,
    # and so is a socket file this user may not open; either needs an operator.
    if isinstance(
        exc, AuthenticationError | AuthorizationError | NoPermissionError | PermissionError
    ):
        return Failure.DENIED
    if isinstance(
        exc,
        RedisConnectionError
        | RedisTimeoutError
        | BusyLoadingError
        | MasterDownError
        | ReadOnlyError
        | TryAgainError
        # A Redis Cluster none of whose nodes answers, one that says it is down, or one in
        # which no master serves the slot: redis-py raises these (the first and last not even
        # as RedisError) where one Redis would give a connection error.
        | RedisClusterUnreachableError
        | ClusterDownError
        | SlotNotCoveredError
        | OSError,  # sockets, and the built-in ConnectionError and TimeoutError
    ):
        return Failure.UNAVAILABLE
    if isinstance(exc, InvalidResponse):
        return Failure.MALFORMED
    if isinstance(exc, RedisError):
        return Failure.REFUSED
    if isinstance(exc, Exception) and _raised_reading_reply(exc):
        return Failure.MALFORMED
    return None


def credentials_refused(exc: BaseException) -> BaseException | None:
    """The Redis error in ``exc``'s chain of causes that refused the user or password (or
    an ACL that refused the user a command), or None when there is none.

    The chain, not ``exc`` alone: an engine's start failure wraps the store's error, which
    wraps redis-py's; the innermost is the one that carries Redis's own words.
    """
    cause: BaseException | None = exc
    found = None
    while cause is not None:  # the innermost: Redis's own words, not a wrapper's
        if failure(cause) is Failure.DENIED:
            found = cause
        cause = cause.__cause__
    return found


@dataclass(frozen=True, slots=True)
class TlsOptions:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True


def connection_kwargs(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    tls: TlsOptions | None = None,
    socket_timeout: float | None = 10.0,
    connect_timeout: float = 5.0,
    client_name: str | None = None,
) -> dict[str, Any]:
    """The keyword arguments a client's pool is built with, from a URL and settings.

    The URL gives the address, database and any options in its query string, which win over
    the timeouts given here, as with redis-py's ``from_url``. Credentials go the other way: a
    ``username`` or ``password`` setting replaces the URL's user or password (its userinfo, or a
    ``?username=`` / ``?password=`` query), each on its own, so a URL's user can go with a
    password from the environment. An empty setting counts as unset. redis-py's ``from_url``
    lets the URL win over everything, which is why the URL is parsed here and not there.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://``, percent-encoded as usual.
        username: ACL user; replaces the URL's.
        password: replaces the URL's.
        tls: CA, client certificate and verification for ``rediss://`` (ignored otherwise).
        socket_timeout: seconds a command's read or write may take (None: no limit).
        connect_timeout: seconds a connect (TCP, TLS, AUTH) may take.
        client_name: sent with ``CLIENT SETNAME`` on each connection.

    Returns:
        Pool keyword arguments, ``connection_class`` included. They hold the password: never
        log them, log :func:`redact_url` of the URL instead.

    Raises:
        ValueError: the URL's scheme is not one of the three, or a query value is not of its
            option's type; the message quotes neither the URL nor a secret.
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
    from_url: dict[str, Any] = dict(parse_url(url))
    base = from_url.pop("connection_class", Connection)
    kwargs.update(from_url)
    kwargs["connection_class"] = _CANCEL_SAFE[base]
    if username:
        kwargs["username"] = username
    if password:
        kwargs["password"] = password
    if base is SSLConnection:
        tls = tls or TlsOptions()
        kwargs["ssl_cert_reqs"] = "required" if tls.verify else "none"
        kwargs["ssl_check_hostname"] = tls.verify
        if tls.ca_file:
            kwargs["ssl_ca_certs"] = tls.ca_file
        if tls.cert_file:
            kwargs["ssl_certfile"] = tls.cert_file
        if tls.key_file:
            kwargs["ssl_keyfile"] = tls.key_file
    return kwargs


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
    concurrent writers that turns load into errors. Arguments are those of
    :func:`connection_kwargs`, plus the pool's size.

    Resource handling: the pool opens connections as concurrent callers need them and keeps
    them, up to ``max_connections``; ``aclose()`` on the client closes them all. An idle one
    the server has closed (a restart) is closed within :data:`IDLE_CHECK_INTERVAL_S` of the
    client's next use (see :class:`_Pool`).
    """
    kwargs = connection_kwargs(
        url,
        username=username,
        password=password,
        tls=tls,
        socket_timeout=socket_timeout,
        connect_timeout=connect_timeout,
        client_name=client_name,
    )
    # Defaults only: a URL's ?max_connections= or ?timeout= wins, as with from_url.
    kwargs.setdefault("max_connections", max_connections)
    kwargs.setdefault("timeout", connect_timeout + (socket_timeout or 0))
    return Redis.from_pool(_Pool(**kwargs))


# What a cluster client takes from a URL's options; anything else a URL asks for is refused.
_CLUSTER_OPTIONS = frozenset(
    {
        "username",
        "password",
        "client_name",
        "decode_responses",
        "health_check_interval",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "maint_notifications_config",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_cert_reqs",
        "ssl_check_hostname",
        "protocol",
    }
)


def address_problem(text: str) -> str | None:
    """What is wrong with ``text`` as ``host:port`` (an IPv6 host in brackets), or None."""
    host, sep, port = text.strip().rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if not sep or not host or "[" in host or "]" in host or (":" in host and not bracketed):
        return "expected host:port (an IPv6 host in brackets, [::1]:7000)"
    if not port.isdigit() or not 0 < int(port) < 65536:
        return "expected host:port with a port in 1..65535"
    return None


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (an IPv6 host in brackets, ``[::1]:7000``) as ``(host, port)``.

    Raises:
        ValueError: not of that form, or the port is not 1..65535.
    """
    problem = address_problem(text)
    if problem:
        raise ValueError(f"{problem}, got {text!r}")
    host, _, port = text.strip().rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _address_remap(
    addresses: Mapping[str, str],
) -> Callable[[tuple[str, int]], tuple[str, int]]:
    """redis-py's ``address_remap`` for a table of announced -> reachable addresses."""
    table = {parse_address(k): parse_address(v) for k, v in addresses.items()}
    return lambda address: table.get((str(address[0]), int(address[1])), address)


def make_cluster_client(
    url: str,
    *,
    username: str | None = None,
    password: str | None = None,
    tls: TlsOptions | None = None,
    socket_timeout: float | None = 10.0,
    connect_timeout: float = 5.0,
    client_name: str | None = None,
    max_connections: int = 64,
    addresses: Mapping[str, str] | None = None,
) -> Redis:
    """A redis-py ``RedisCluster`` seeded by ``url`` (any one node of the cluster).

    It finds the other nodes itself, routes each command by the key it names, follows MOVED and
    ASK, and re-reads the topology after a failover. ``addresses`` maps a node address the
    cluster announces (``host:port``) to the one to connect to instead: a cluster behind NAT,
    in containers or through a tunnel announces addresses only its own network reaches.
    Unlisted addresses are used as announced. Other arguments are those of
    :func:`make_client`; ``max_connections`` is per node. Its connections are the cancel-safe
    ones above: redis-py's cluster client picks its connection class itself, so the class is
    set on its node manager before any node connects. It has no :class:`_Pool`: a node's
    connections are checked as redis-py lends them, and a failover replaces the node.

    Typed as ``Redis``: it speaks the same commands, routed by key; a command with no key to
    route by is sent where :func:`node_of` says.

    Raises:
        ValueError: a ``unix://`` URL, a database other than 0, or a URL option a cluster
            client does not take (named).
    """
    kwargs = connection_kwargs(
        url,
        username=username,
        password=password,
        tls=tls,
        socket_timeout=socket_timeout,
        connect_timeout=connect_timeout,
        client_name=client_name,
    )
    connection_class = kwargs.pop("connection_class")
    if connection_class is _CancelSafeUnixConnection:
        raise ValueError("a Redis Cluster is reached over TCP: redis:// or rediss://, not unix://")
    if int(kwargs.pop("db", 0) or 0) != 0:
        raise ValueError("a Redis Cluster has one database: the URL's database must be 0")
    host, port = kwargs.pop("host"), kwargs.pop("port")
    kwargs.pop("max_connections", None)
    kwargs.pop("timeout", None)  # the blocking pool's wait: a cluster node has no such pool
    unknown = sorted(set(kwargs) - _CLUSTER_OPTIONS)
    if unknown:
        raise ValueError(f"URL option(s) {', '.join(unknown)} not supported for a Redis Cluster")
    client = RedisCluster(
        host=host,
        port=port,
        ssl=connection_class is _CancelSafeSSLConnection,
        max_connections=max_connections,
        address_remap=_address_remap(addresses) if addresses else None,
        **kwargs,
    )
    manager = client.nodes_manager
    manager.connection_kwargs["connection_class"] = connection_class
    for node in manager.startup_nodes.values():
        node.connection_class = connection_class
    return client  # type: ignore[return-value]


def client_maker(cluster: bool, addresses: Mapping[str, str] | None = None) -> Callable[..., Redis]:
    """:func:`make_client`, or for a Redis Cluster :func:`make_cluster_client` with its
    address table: one choice for every caller that opens a store or a peer."""
    if not cluster:
        return make_client

    def make(url: str, **kwargs: Any) -> Redis:
        return make_cluster_client(url, addresses=addresses, **kwargs)

    return make


async def node_of(client: Redis, key: str) -> dict[str, Any]:
    """Keyword arguments that send a keyless command (``INFO``, ``SCAN``, ``PING``) to the
    node holding ``key``: on a cluster client, the master of its slot, looked up at each call
    so a failover or a slot migration is followed; on any other client, none.

    A cluster client that has not read the topology yet reads it first. When no node serves
    the slot (the cluster is down), none is named, and the command fails as redis-py routes it.
    """
    if not isinstance(client, RedisCluster):
        return {}
    try:
        return {"target_nodes": await _master_of(client, key)}
    except SlotNotCoveredError:
        return {}


async def _master_of(client: RedisCluster, key: str) -> Any:
    """The master serving ``key``'s slot, after reading the topology if not read yet."""
    await client.initialize()
    return client.get_node_from_key(key)


async def on_one_connection(
    client: Redis, key: str, commands: Sequence[tuple[Any, ...]]
) -> list[Any]:
    """Send ``commands`` back to back on one connection, to the node that holds ``key``, and
    return their replies (an error reply as its exception, in place).

    For commands whose meaning depends on the connection: ``WAIT`` counts the replicas that
    have the writes made *on this connection*. A cluster client would spread them (it sends a
    keyless ``WAIT`` to every master), so a connection of the key's master is borrowed from it;
    a ``MOVED`` reply there is returned like any other error.
    """
    if not isinstance(client, RedisCluster):
        async with client.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))
    node = await _master_of(client, key)
    connection = node.acquire_connection()
    try:
        await connection.send_packed_command(connection.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await connection.read_response())
            except ResponseError as exc:
                replies.append(exc)
    except BaseException:
        # A reply may be left unread on it: no later command may read it as its own.
        await connection.disconnect(nowait=True)
        await _reread_topology(client)
        raise
    finally:
        node.release(connection)
    if any(isinstance(r, MovedError | AskError) for r in replies):
        await _reread_topology(client)
    return replies


async def _reread_topology(client: RedisCluster) -> None:
    """After a failure on a connection borrowed past redis-py's routing (which would have done
    it): the slot may have moved (a failover, a migration), so the next call asks the cluster
    again instead of the node that failed."""
    with contextlib.suppress(Exception):
        await client.nodes_manager.initialize()


class _Pool(BlockingConnectionPool):
    """A blocking pool that closes the idle connections whose server hung up.

    When a Redis server goes away (a restart, a kill -9), its kernel closes every connection to
    it. asyncio keeps an idle connection's half-closed socket open (a stream protocol asks for
    that, to go on writing) and stops reading it. redis-py (8.1.0) looks at a pooled connection
    only when it lends it, and lends the most recently returned first, so the connections
    beyond the few in steady use are never looked at again: each holds a descriptor whose TCP
    connection sits in CLOSE_WAIT, then leaves the kernel's table once a keepalive probe meets
    a reset, the descriptor still open. A pool grown by one burst of concurrent calls would
    keep that many dead sockets after every restart. ``health_check_interval`` does not help:
    redis-py checks a connection's health only as it lends it.

    So a borrow first closes the idle connections that have hung up, at most once per
    :data:`IDLE_CHECK_INTERVAL_S`: a restart's dead sockets are gone within that time of the
    client's next use. The connection lent is checked by redis-py itself, which reconnects it.
    A server that vanishes without closing (a partition) is left to TCP keepalive, whose
    failure closes the socket through asyncio.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._next_idle_check = 0.0

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        now = asyncio.get_running_loop().time()
        if now >= self._next_idle_check:
            self._next_idle_check = now + IDLE_CHECK_INTERVAL_S
            await self._close_hung_up()
        connection: AbstractConnection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        return connection

    async def _close_hung_up(self) -> None:
        idle = self._available_connections
        hung_up = [c for c in idle if isinstance(c, _HangUpCheck) and c.has_hung_up()]
        if not hung_up:
            return
        # Out of the pool while they close, so no borrower takes one half closed; back at the
        # bottom afterwards, closed, to be reconnected if a burst needs them again.
        closing = {id(c) for c in hung_up}
        idle[:] = [c for c in idle if id(c) not in closing]
        try:
            for connection in hung_up:
                # nowait: the socket is already dead, there is nothing to flush or wait for.
                await connection.disconnect(nowait=True)
        finally:
            self._available_connections[:0] = hung_up


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


class _HangUpCheck(AbstractConnection):
    """A connection that can tell, without I/O, that its server has closed it."""

    __slots__ = ()

    def has_hung_up(self) -> bool:
        """Connected, but the server closed its end (end of stream) or the transport is closing.

        Either way the connection can carry no command and only holds a descriptor. A
        connection that is not connected holds none, so it has not "hung up".
        """
        reader, writer = self._reader, self._writer
        if reader is None or writer is None:
            return False
        return reader.at_eof() or writer.is_closing()


class _BoundedHiredisParser(_AsyncHiredisParser):
    """redis-py's hiredis parser with its reader bounded as a Wire's is
    (:func:`replication_engine.wire.bound_reader`): it makes a new reader at each connect."""

    __slots__ = ()

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)  # type: ignore[no-untyped-call]
        # redis-py types the reader as None, which it is only until a connect makes it.
        bound_reader(self._reader)  # type: ignore[arg-type]


class _BoundedReplies(AbstractConnection):
    """A connection that reads replies within the bounds a Wire reads them in.

    redis-py's hiredis parser makes a list of the length an aggregate's header declares as it
    reads the header, before any element arrives (hiredis-py 3.5): unbounded, one
    ``*2000000000`` costs 16 GB of address space and seconds of the event loop to free. A
    reply past the bounds is an ``InvalidResponse`` (``MALFORMED``), and redis-py drops the
    connection. redis-py's pure-Python parsers (no hiredis) build lists as elements arrive,
    and need no bound.
    """

    __slots__ = ()

    def set_parser(self, parser_class: type[Any]) -> None:
        if parser_class is _AsyncHiredisParser:
            parser_class = _BoundedHiredisParser
        super().set_parser(parser_class)


class _CancelSafeConnection(_CancelSafeSend, _HangUpCheck, _BoundedReplies, Connection):
    __slots__ = ()


class _CancelSafeSSLConnection(_CancelSafeSend, _HangUpCheck, _BoundedReplies, SSLConnection):
    __slots__ = ()


class _CancelSafeUnixConnection(
    _CancelSafeSend, _HangUpCheck, _BoundedReplies, UnixDomainSocketConnection
):
    __slots__ = ()


# The variant of each connection class a URL's scheme can choose (cancel-safe, hang-up check,
# bounded replies).
_CANCEL_SAFE: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: _CancelSafeConnection,
    SSLConnection: _CancelSafeSSLConnection,
    UnixDomainSocketConnection: _CancelSafeUnixConnection,
}
