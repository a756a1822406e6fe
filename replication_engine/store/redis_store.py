"""The default store: items, Merkle tree and CDC stream in one Redis, changed only by Lua scripts.

Every change (a local put or delete, or a remote version applied by the engine) is one script
call that updates the item, its leaf and every ancestor, and appends the CDC entry; Redis runs a
script atomically, and each script checks every key it will write before its first write, so the
tree, the data and the stream never disagree. The store's record (``Pnode``: its claims, anchors
and certification, docs/DELETES.md) changes in the same calls as the data it describes.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import replace
from typing import Any, Concatenate, NoReturn, ParamSpec, TypeVar

import msgpack
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ExecAbortError,
    MasterDownError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)

from replication_engine import clock, codec
from replication_engine.clock import HLC
from replication_engine.codec import Change
from replication_engine.connection import (
    Failure,
    TlsOptions,
    client_maker,
    failure,
    node_of,
    on_one_connection,
)
from replication_engine.errors import ReplicationError
from replication_engine.knowledge import ApplyStatus, NodeRecord, hlc_hex
from replication_engine.merkle import (
    DrillPlan,
    FormatError,
    Geometry,
    GeometryError,
    leaf_digest_words,
)
from replication_engine.observability.tracing import current_trace_parent
from replication_engine.redaction import redact_url
from replication_engine.store import functions
from replication_engine.store.layout import Keyspace, glob_escape, key_problem, text
from replication_engine.store.protocol import (
    ApplyResult,
    Certification,
    DeepCheck,
    Item,
    PreparedApply,
    StreamBatch,
    UnreadableItem,
)
from replication_engine.store.reader import ReadCounter, TreeReader, item_from_hash
from replication_engine.wire import Wire

__all__ = [
    "InvalidWriteError",
    "ReadOnlyStoreError",
    "RedisStore",
    "StoreAccessError",
    "StoreError",
    "StoreKeyError",
    "StoreUnavailableError",
]

P = ParamSpec("P")
T = TypeVar("T")

_WALK_CHUNK = 500
_SCAN_PAGE = 1000  # keys per SCAN call of a deep check
_PRESSURE_TTL_SEC = 1.0
_GC_BATCH = 500
# Bytes of item data in one apply call. Redis refuses any single argument over 512 MB
# (proto-max-bulk-len), and one bounded call keeps the server's pause and memory bounded too.
DEFAULT_MAX_BATCH_BYTES = 64 * 1024 * 1024
# The stream bound of a new store opened without one (config: local.stream_maxlen).
DEFAULT_STREAM_MAXLEN = 100_000
# Longest content type, in UTF-8 bytes, that the write function takes (a peer takes as many
# characters, codec.change_from_parts): refused at put, before anything is sent.
MAX_CONTENT_TYPE_BYTES = 256
# Prefix of the error a script raises when a store-wide key (clock, root, stream, record,
# tombstone index) holds the wrong type: no single item is to blame, so nothing is isolated.
_STORE_KEY_ERROR = "WRONGTYPE store key"
# What open.lua answers for a record that names another node.
_NOT_OURS = "this store belongs to node"
# Refusals that concern the server or the connection, never one item: not isolated by splitting.
_STORE_WIDE = (
    AuthenticationError,
    AuthorizationError,
    BusyLoadingError,
    ExecAbortError,
    MasterDownError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
)


class StoreError(ReplicationError):
    """Base of the local store's errors: what its API raises when Redis fails it.

    Raised as itself only for a refusal the store cannot explain (an error reply that is not a
    wrong-typed key, a failover state or an ACL denial); the message carries Redis's words.
    """


class StoreAccessError(StoreError, PermissionError):
    """The local Redis refused this user: wrong credentials, or an ACL that does not allow a
    command or key the store needs (deploy/ has a working ACL). Fix the user, then retry."""


class ReadOnlyStoreError(StoreError, RuntimeError):
    """A local write on a follower (followers only take writes from their upstream), or on a
    node the mesh forgot (every member drops its writes)."""


class StoreUnavailableError(StoreError, ConnectionError):
    """The local store cannot take the write now: its Redis did not answer (the redis-py error
    is the ``__cause__``), or local writes are paused while the store's HLC floor is restored
    after it lost its clock. Retry after a moment; nothing was acknowledged.
    """

    retryable = True


class InvalidWriteError(StoreError, ValueError):
    """A local write no peer would accept (too large, a bad key or content type); nothing
    was written."""


class NotReplicatedError(StoreError, RuntimeError):
    """The write was made, but fewer of the Redis's own replicas than asked confirmed it in
    time (``WAIT``). It is acknowledged by the master alone: a failover now could lose it,
    unless a peer has read it first. Redis does not undo it; a retry, once the replicas are
    back, writes it again and waits anew.

    Attributes:
        hlcs: the HLCs of the writes made, in order (for ``put_many``, of the calls made up
            to and including the one not confirmed).
        replicas: how many replicas confirmed that call.
    """

    retryable = True

    def __init__(self, message: str, hlcs: list[int], replicas: int) -> None:
        super().__init__(message)
        self.hlcs = hlcs
        self.replicas = replicas


class StoreKeyError(StoreError, RuntimeError):
    """A key the store must write holds the wrong type (made by hand under the prefix).

    Attributes:
        key: the Redis key, when the message names one.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class StoreOwnershipError(StoreKeyError):
    """The local store's record names another node: ``local.redis_url`` or ``local.prefix``
    points at another node's store, or ``local_node_id`` is wrong. An engine on it would take
    that node's writes for its own, so it does not start; nothing was written."""


class _OutOfTurn(Exception):
    """The apply script's answer to a batch sent behind one it has not applied (mode ``n``)."""


# The apply script returns one status letter per item, as one string.
_STATUS = {
    ord("a"): ApplyStatus.APPLIED,
    ord("d"): ApplyStatus.SKIPPED,
    ord("s"): ApplyStatus.STALE,
    ord("k"): ApplyStatus.KNOWN,
    ord("w"): ApplyStatus.REFUSED,
}


def _stored_version(fields: Mapping[bytes, bytes]) -> tuple[int, str] | None:
    try:
        return clock.from_hex(fields[b"hlc"]), fields[b"o"].decode("utf-8")
    except (KeyError, ValueError, UnicodeDecodeError):
        return None


# The error codes scripts/api.lua refuses every local write with (a follower's store, a
# forgotten node's).
_REFUSED_WRITES_CODES = frozenset({"FOLLOWER", "FORGOTTEN"})


@contextlib.contextmanager
def _as_store_errors(node_id: str) -> Iterator[None]:
    """Redis's failures as the store's own errors, so that an embedder catches the package's
    errors and not redis-py's (``connection.failure`` decides what each one is)."""
    try:
        yield
    except ReplicationError:
        raise
    except Exception as exc:
        kind = failure(exc)
        if kind is None:
            raise  # not Redis's failure: a bug of ours, with its own traceback
        words = f"{type(exc).__name__}: {redact_url(str(exc))}"
        if kind is Failure.UNAVAILABLE:
            raise StoreUnavailableError(
                f"node {node_id!r}: the local Redis did not answer: {words}; nothing was "
                "acknowledged"
            ) from exc
        if kind is Failure.DENIED:
            raise StoreAccessError(
                f"node {node_id!r}: the local Redis refused this user: {words}"
            ) from exc
        code, _, said = str(exc).partition(" ")
        if code in _REFUSED_WRITES_CODES:
            # The functions' refusal of every local write (scripts/api.lua): a follower's
            # store, or a node the mesh forgot.
            raise ReadOnlyStoreError(
                f"node {node_id!r}: local writes are refused: {redact_url(said)}"
            ) from exc
        if _is_refusal(exc):
            raise _store_error(exc) from exc
        raise StoreError(f"node {node_id!r}: the local Redis refused the call: {words}") from exc


def _store_api(
    method: Callable[Concatenate[RedisStore, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[RedisStore, P], Coroutine[Any, Any, T]]:
    """Marks a coroutine of the store's public API: it raises only the store's errors."""

    async def call(self: RedisStore, /, *args: P.args, **kwargs: P.kwargs) -> T:
        with _as_store_errors(self.node_id):
            return await method(self, *args, **kwargs)

    functools.update_wrapper(call, method)
    return call


def store_client(
    url: str,
    *,
    node_id: str,
    username: str | None,
    password: str | None,
    tls: TlsOptions | None,
    cluster: bool,
    cluster_addresses: Mapping[str, str] | None,
) -> Redis:
    """The client a store talks to its Redis through (one for all of a node's partitions),
    named for the node in ``CLIENT LIST``."""
    return client_maker(cluster, cluster_addresses)(
        url, username=username, password=password, tls=tls, client_name=f"re-store-{node_id}"
    )


class RedisStore:
    """A node's data in its own Redis. Also the API a parent daemon writes through."""

    def __init__(
        self,
        redis: Redis,
        *,
        node_id: str,
        prefix: str = "",
        partition: str = "0",
        geometry: Geometry | None = None,
        stream_maxlen: int | None = None,
        max_memory_ratio: float = 0.9,
        read_only: bool = False,
        hlc: HLC | None = None,
        max_payload: int | None = None,
        max_clock_offset_sec: float = 300.0,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        if not node_id:
            raise ValueError("node_id must not be empty")
        self.redis = redis
        self.node_id = node_id
        self.keys = Keyspace(prefix, partition)
        self.geometry = geometry or Geometry()
        if partition not in self.geometry.partition_names:
            raise ValueError(
                f"partition {partition!r} is not one of the store's: "
                f"{self.geometry.describe()} has {self.geometry.partition_names[:4]}..."
            )
        # None: what the partition's meta says (its engine's setting), else the default. An
        # application that opens the store without them must not reset its engine's: the
        # functions trim the stream by the meta's maxlen.
        self._settings_given = (stream_maxlen is not None, max_payload is not None)
        self.stream_maxlen = DEFAULT_STREAM_MAXLEN if stream_maxlen is None else stream_maxlen
        self.max_memory_ratio = max_memory_ratio
        self.read_only = read_only
        self.clock = hlc or HLC()
        self.max_payload = codec.DEFAULT_MAX_PAYLOAD if max_payload is None else max_payload
        self.max_clock_offset_ms = int(max_clock_offset_sec * 1000)
        self.max_batch_bytes = max_batch_bytes
        # Why local writes are paused (the engine restoring the HLC floor), or None.
        self.writes_paused: str | None = None
        # Why local writes are refused for good (the mesh forgot this node), or None.
        self.writes_refused: str | None = None
        self.reader = TreeReader(
            redis, self.keys, counter=ReadCounter(), max_payload=self.max_payload
        )
        self._apply = redis.register_script(functions.script_source("apply.lua"))
        # The apply script's calls and the local writes, each one write and one read
        # (replication_engine.wire), each on its own connection: the hot path makes one apply
        # per batch, and a write that times out closes only the writes' connection. A
        # cluster's go through its client, routed by slot.
        self._wire: Wire | None = None
        writes: Wire | None = None
        if not isinstance(redis, RedisCluster):
            timeout = redis.connection_pool.connection_kwargs.get("socket_timeout")
            self._wire, writes = Wire(redis, timeout=timeout), Wire(redis, timeout=timeout)
        self._api = functions.Api(redis, wire=writes)
        self._gc = redis.register_script(functions.script_source("gc.lua"))
        self._discard = redis.register_script(functions.script_source("discard.lua"))
        self._inherit = redis.register_script(functions.script_source("inherit.lua"))
        self._certify = redis.register_script(functions.script_source("certify.lua"))
        self._open = redis.register_script(functions.script_source("open.lua"))
        self._clock = redis.register_script(functions.script_source("clock.lua"))
        self._members = redis.register_script(functions.script_source("members.lua"))
        self._scrub = redis.register_script(functions.script_source("scrub.lua"))
        geometry_arg = f"{self.geometry.fanout}/{self.geometry.depth}"
        self._base_args = [self.keys.part, geometry_arg, node_id]
        # What each of the engine's scripts declares: the partition's record, whose hash tag
        # every key the script touches shares, so a Cluster routes the call to its slot.
        self._declared = [self.keys.record]
        self._pressure_checked = 0.0
        self._accepting = True

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        node_id: str,
        prefix: str = "",
        fanout: int = 256,
        depth: int = 2,
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
        cluster: bool = False,
        cluster_addresses: Mapping[str, str] | None = None,
        **options: Any,
    ) -> RedisStore:
        """Open a store, checking (or on first use recording) the tree geometry.

        With ``cluster``, ``url`` names one node of a Redis Cluster, and the store's calls are
        routed by the keys they declare; ``cluster_addresses`` maps node addresses the cluster
        announces to those to connect to (see ``make_cluster_client``).
        """
        with _as_store_errors(node_id):
            return await cls._connect(
                url,
                node_id=node_id,
                prefix=prefix,
                geometry=Geometry(fanout, depth),
                username=username,
                password=password,
                tls=tls,
                cluster=cluster,
                cluster_addresses=cluster_addresses,
                **options,
            )

    @classmethod
    async def _connect(
        cls,
        url: str,
        *,
        node_id: str,
        prefix: str,
        geometry: Geometry,
        username: str | None,
        password: str | None,
        tls: TlsOptions | None,
        cluster: bool,
        cluster_addresses: Mapping[str, str] | None,
        **options: Any,
    ) -> RedisStore:
        redis = store_client(
            url,
            node_id=node_id,
            username=username,
            password=password,
            tls=tls,
            cluster=cluster,
            cluster_addresses=cluster_addresses,
        )
        store = cls(redis, node_id=node_id, prefix=prefix, geometry=geometry, **options)
        try:
            await store.prepare()
        except BaseException:
            await redis.aclose()
            raise
        return store

    async def prepare(self, loaded: functions.Loaded | None = None) -> functions.Loaded:
        """Make the store ready for calls: check (or record) its layout and write the
        partition's meta, load the function library unless ``loaded`` says another partition
        of the same store just did, and start the clock past the partition's."""
        await self.check_geometry()
        if loaded is None:
            loaded = await self.load_functions()
        else:
            self._api.use(loaded)
        await self._load_clock()
        return loaded

    def partition_slot(self) -> int:
        """The Redis Cluster slot of the store's partition: every key of it hashes there."""
        return int(key_slot(self.keys.record.encode()))

    @_store_api
    async def check_geometry(self) -> None:
        """Check the store's layout against this node's (recording it in a new store), and
        write the partition's meta, which the store's functions place and stamp writes by."""
        try:
            stored = await self.reader.geometry()
        except FormatError as exc:
            raise FormatError(exc.found, at=self.keys.prefix) from None
        if stored is None:
            await self.redis.hset(self.keys.meta, mapping=dict[Any, Any](self.geometry.as_fields()))
        elif stored != self.geometry:
            raise GeometryError(
                f"store at prefix {self.keys.prefix!r} was built with Merkle geometry "
                f"{stored.describe()}, but this node is configured with "
                f"{self.geometry.describe()}; use the stored geometry or rebuild the store"
            )
        # Written only when it changes, so a user that may only read the store can open it,
        # and never over another node's: the id there is the origin its functions stamp on
        # every write, so a store opened on another node's Redis would write as that node.
        raw = await self.redis.hgetall(self.keys.part_meta)
        current = {text(k): text(v) for k, v in raw.items()}
        maxlen_given, payload_given = self._settings_given
        if not maxlen_given and current.get("maxlen", "").isdigit():
            self.stream_maxlen = int(current["maxlen"])
        if not payload_given and current.get("max_payload", "").isdigit():
            self.max_payload = self.reader.max_payload = int(current["max_payload"])
        fields = self.geometry.as_fields() | {
            "part": self.keys.partition,
            "id": self.node_id,
            "maxlen": str(self.stream_maxlen),
            "max_payload": str(self.max_payload),
        }
        owner = current.get("id", self.node_id)
        if owner != self.node_id:
            raise StoreOwnershipError(
                f"node {self.node_id!r}: the store at prefix {self.keys.prefix!r} belongs to node "
                f"{owner!r}; local.redis_url or local.prefix names another node's store, or "
                f"local_node_id is wrong; nothing was written",
                self.keys.part_meta,
            )
        if current != fields:
            await self.redis.hset(self.keys.part_meta, mapping=dict[Any, Any](fields))

    @_store_api
    async def load_functions(self) -> functions.Loaded:
        """Load (or upgrade) the store's function library: see :mod:`.functions`."""
        loaded = await functions.ensure_loaded(self.redis, self.keys.record)
        self._api.use(loaded)
        return loaded

    async def _load_clock(self) -> None:
        raw = await self.redis.get(self.keys.hlc)
        if raw is not None:
            self.clock.observe(clock.from_hex(raw))

    async def close(self) -> None:
        self.close_wire()
        await self.redis.aclose()

    def close_wire(self) -> None:
        """Close this partition's own connections, for applies and for writes (the client's are
        closed with the client)."""
        if self._wire is not None:
            self._wire.close()
        self._api.close()

    # ------------------------------------------------------------------------ local writes

    @_store_api
    async def put(
        self,
        key: str,
        value: bytes | str,
        content_type: str = "binary",
        *,
        replicas: int = 0,
        replica_timeout_sec: float = 1.0,
    ) -> int:
        """Write ``value`` under ``key``; returns the write's HLC.

        With ``replicas``, the call returns once that many of the store's Redis replicas have
        the write (``WAIT``, on the connection that made it), so a failover of the master
        cannot lose it; after ``replica_timeout_sec`` without them it raises
        :class:`NotReplicatedError`.

        Raises:
            InvalidWriteError: a value over ``max_payload``, a key no peer would accept
                (empty, over 4096 bytes), a value that is neither bytes nor text, or a content
                type that is not text of at most 256 bytes in UTF-8.
            ReadOnlyStoreError: the store is a follower's.
            StoreUnavailableError: the local Redis did not answer, or writes are paused while
                the HLC floor is restored (retryable; nothing was acknowledged).
            StoreKeyError: a key the write needs holds the wrong type.
            NotReplicatedError: made, but not on ``replicas`` replicas in time.
        """
        hlcs = await self.put_many(
            [(key, value, content_type)],
            replicas=replicas,
            replica_timeout_sec=replica_timeout_sec,
        )
        return hlcs[0]

    @_store_api
    async def put_many(
        self,
        writes: Sequence[tuple[str, bytes | str, str]],
        *,
        replicas: int = 0,
        replica_timeout_sec: float = 1.0,
    ) -> list[int]:
        """Several ``(key, value, content_type)`` puts; their HLCs, in order.

        Written by the store's ``re_write`` function, as any other client's writes are, in
        calls of at most ``max_batch_bytes``. Every write is checked (as :meth:`put`) before
        any is sent, and each call writes all of its items or, refused, none; a failure part
        way leaves earlier calls' items written, and raises. ``replicas`` as for :meth:`put`,
        waited for after each call.
        """
        self.check_writes(writes)
        keys: list[str] = []
        args: list[Any] = []
        for key, value, content_type in writes:
            data = self._checked_value(value, content_type)
            keys.append(self._item_key(key))
            args += self._write_args(
                codec.encode_payload(data), codec.content_hash(data), content_type
            )
        hlcs: list[int] = []
        weights = [len(key) + len(args[6 * i]) + 256 for i, key in enumerate(keys)]
        wait = _replica_wait(replicas, replica_timeout_sec)
        for start, end in self._ranges(weights, most=functions.MAX_KEYS_PER_CALL):
            replies, confirmed = await self._call_api(
                "re_write", keys[start:end], args[6 * start : 6 * end], wait=wait
            )
            hlcs += [clock.from_hex(hlc_hex) for hlc_hex, _sid in replies]
            self._check_replicated(hlcs, wait, confirmed)
        if hlcs:
            self.clock.observe(max(hlcs))
        return hlcs

    def check_writes(self, writes: Sequence[tuple[str, bytes | str, str]]) -> None:
        """Raise what :meth:`put_many` would raise before sending anything: a caller that
        splits writes over partitions checks them all before any partition is written."""
        self._check_writable()
        for key, value, content_type in writes:
            self._item_key(key)
            self._checked_value(value, content_type)

    @_store_api
    async def delete(self, key: str, *, replicas: int = 0, replica_timeout_sec: float = 1.0) -> int:
        """Write a tombstone (deletes replicate like values); returns its HLC. ``replicas`` as
        for :meth:`put`."""
        self._check_writable()
        wait = _replica_wait(replicas, replica_timeout_sec)
        (hlc_hex, _sid), confirmed = await self._call_api(
            "re_del", [self._item_key(key)], [current_trace_parent() or ""], wait=wait
        )
        hlc = clock.from_hex(hlc_hex)
        self.clock.observe(hlc)
        self._check_replicated([hlc], wait, confirmed)
        return hlc

    def _check_replicated(
        self, hlcs: list[int], wait: tuple[int, int] | None, confirmed: int
    ) -> None:
        if wait is not None and confirmed < wait[0]:
            if hlcs:
                self.clock.observe(max(hlcs))
            raise NotReplicatedError(
                f"node {self.node_id!r}: the write was made, but {confirmed} of the "
                f"{wait[0]} replica(s) asked confirmed it within {wait[1]} ms; a failover of "
                f"the master now could lose it",
                hlcs,
                confirmed,
            )

    async def _call_api(
        self,
        name: str,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        wait: tuple[int, int] | None = None,
    ) -> tuple[Any, int]:
        """Call one of the store's functions; returns its reply and, with ``wait``, how many
        replicas confirmed it (else 0). A Redis that lost them (restarted without
        persistence, flushed, replaced by a failover to a replica that never had them) or lost
        the partition's meta gets each back, and the call is made again; a store built without
        :meth:`connect` learns here whether its Redis has functions at all.

        With ``wait`` (replicas, milliseconds), the call is followed by ``WAIT`` on its own
        connection.
        """
        fixed: set[str] = set()
        while True:
            try:
                if wait is None:
                    return await self._api.call(name, keys, args), 0
                reply, confirmed = await on_one_connection(
                    self.redis, keys[0], [self._api.command(name, keys, args), ("WAIT", *wait)]
                )
                if isinstance(reply, Exception):
                    raise reply
                return reply, int(confirmed)
            except ResponseError as exc:
                words = str(exc)
                # No library there (lost, or never loaded on a store built without connect()),
                # or a Redis without functions (6.2, where the same code runs as a script).
                missing = "Function not found" in words or "unknown command `FCALL`" in words
                if missing and "functions" not in fixed:
                    fixed.add("functions")
                    await self.load_functions()
                elif words.startswith("no store partition at") and "meta" not in fixed:
                    fixed.add("meta")
                    await self.check_geometry()
                else:
                    raise

    def _item_key(self, key: str) -> str:
        try:
            codec.decode_key(key.encode("utf-8"))
        except (codec.CodecError, UnicodeEncodeError) as exc:
            raise InvalidWriteError(f"{exc}; nothing was written") from None
        return self.keys.item(key)

    def _checked_value(self, value: bytes | str, content_type: str) -> bytes:
        """The value's bytes, or InvalidWriteError: whatever would fail later (on the wire, in
        the function, at a peer) is refused here, before anything of the write is sent."""
        value = _as_bytes(value, "value")
        if len(value) > self.max_payload:
            raise InvalidWriteError(
                f"value of {len(value)} bytes is over the payload limit of {self.max_payload} "
                f"bytes that every peer enforces; nothing was written"
            )
        # Bytes, as the function counts them: a content type of 200 'é' is 400 of them.
        if (
            not isinstance(content_type, str)
            or len(_as_bytes(content_type, "content_type")) > MAX_CONTENT_TYPE_BYTES
        ):
            raise InvalidWriteError(
                f"content_type must be text of at most {MAX_CONTENT_TYPE_BYTES} bytes in UTF-8; "
                f"nothing was written"
            )
        return value

    def _check_writable(self) -> None:
        if self.read_only:
            self._refuse_local_write()
        if self.writes_refused is not None:
            raise ReadOnlyStoreError(
                f"node {self.node_id!r}: local writes are refused: {self.writes_refused}"
            )
        if self.writes_paused is not None:
            raise StoreUnavailableError(
                f"node {self.node_id!r}: local writes are paused: {self.writes_paused}"
            )

    def _refuse_local_write(self) -> NoReturn:
        raise ReadOnlyStoreError(
            f"node {self.node_id!r} is a follower: local writes are refused; "
            "write to the primary and let it replicate here"
        )

    def _write_args(self, data: bytes, content_hash: str, content_type: str) -> list[Any]:
        """``re_write``'s six arguments for one write: the proposal is this process's clock,
        which the store's clock then orders after every write it has seen."""
        proposed = self.clock.now()
        return [
            data,
            content_hash,
            content_type,
            clock.to_hex(proposed),
            clock.physical_ms(proposed),
            current_trace_parent() or "",
        ]

    # ------------------------------------------------------------------------ the apply path

    async def apply_batch(
        self, changes: Sequence[Change], *, relay: bool = True
    ) -> list[ApplyStatus]:
        """Apply remote versions in one round trip, each atomically, last-writer-wins.

        Duplicates, older versions and versions at or below this store's claim for their
        origin are skipped. With ``relay``, an applied version is re-emitted on this node's
        stream with its original origin and HLC, so that a node tailing only this one (a
        chain, a tree of followers) gets it too, and loops die out at the dedup. In a full
        mesh every node tails every origin directly and relaying only multiplies stream
        writes and reads; see docs/TOPOLOGIES.md.
        """
        result = await self.apply_prepared(self.prepare_apply(changes, relay=relay))
        return result.statuses

    def prepare_apply(
        self,
        changes: Sequence[Change],
        *,
        relay: bool = True,
        replaces: Mapping[int, tuple[int, str]] | None = None,
    ) -> PreparedApply:
        """The client-side half of :meth:`apply_batch`: no I/O, so a pipelined caller can
        pack batch N+1 while this store's server is still applying batch N.

        ``replaces`` maps the position of a change to the ``(hlc, origin)`` of a written-off
        version held here that it replaces outright (the cold path's rule, docs/DELETES.md).

        Everything the script would otherwise derive per item is computed here, off the
        single-threaded server, bar the leaf path, which the script decides itself: the digest
        (also as four 32-bit words) and, when relaying, the stream entry's meta JSON. The
        batch is packed in chunks of at most ``max_batch_bytes`` of data, one script call each.
        """
        # A version stamped far ahead of our wall clock would drag this store's clock (and so
        # every later local write) into the future, possibly to the end of the HLC range.
        future = self.clock.wall() + self.max_clock_offset_ms
        items: list[list[Any]] = []
        data: list[bytes] = []
        accepted: list[int] = []
        newest = 0
        for i, c in enumerate(changes):
            hlc = c.hlc
            if hlc >> clock.COUNTER_BITS > future:
                continue
            if not 0 <= hlc <= clock.MAX_HLC:
                raise ValueError(f"HLC out of range: {hlc}")
            accepted.append(i)
            digest, w1, w2, w3, w4 = leaf_digest_words(c.key, hlc, c.content_hash, c.tombstone)
            data.append(c.data)
            items.append(
                [
                    c.key,
                    "",
                    "1" if c.tombstone else "0",
                    "",  # the data goes as an argument of its own (see apply.lua)
                    c.content_hash,
                    f"{hlc:016x}",
                    c.origin,
                    c.content_type,
                    str(c.version),
                    str(c.updated_at),
                    c.trace_parent or "",
                    digest,
                    w1,
                    w2,
                    w3,
                    w4,
                    codec.encode_meta(c) if relay else b"",
                ]
            )
            if replaces and i in replaces:
                held_hlc, held_origin = replaces[i]
                items[-1] += [clock.to_hex(held_hlc), held_origin]
            if hlc > newest:
                newest = hlc
        chunks = [(start, end, _pack(items[start:end])) for start, end in self._chunk(items, data)]
        return PreparedApply(len(changes), accepted, newest, items, chunks, relay, data)

    def _chunk(self, items: list[list[Any]], data: list[bytes]) -> list[tuple[int, int]]:
        """Consecutive ranges of ``items`` holding at most ``max_batch_bytes`` of data each."""
        return self._ranges(
            [len(d) + len(it[16]) + len(it[0]) + 256 for it, d in zip(items, data, strict=True)]
        )

    def _ranges(self, weights: Sequence[int], most: int | None = None) -> list[tuple[int, int]]:
        """Consecutive ranges whose weights add up to at most ``max_batch_bytes`` (a range of
        one may weigh more), and of at most ``most`` items: one script or function call each."""
        ranges: list[tuple[int, int]] = []
        start, size = 0, 0
        for i, weight in enumerate(weights):
            full = most is not None and i - start >= most
            if i > start and (full or size + weight > self.max_batch_bytes):
                ranges.append((start, i))
                start, size = i, 0
            size += weight
        if start < len(weights):
            ranges.append((start, len(weights)))
        return ranges

    async def apply_prepared(
        self, prepared: PreparedApply, source: StreamBatch | None = None
    ) -> ApplyResult:
        """The server-side half of :meth:`apply_batch`, in order of the changes.

        A chunk the script fails on (an error no check foresaw) is split in halves until the
        failing item is alone; that item is REFUSED with Redis's message and the rest applies.
        ``source`` (a tailer's batch) is anchored and its claims taken with the last chunk, so
        a failure part way leaves the anchor where it was and the whole batch is retried.

        Raises:
            StoreKeyError: a store-wide key (clock, root, stream, record, tombstone index)
                holds the wrong type; nothing was applied by the failing call.
        """
        result = ApplyResult([ApplyStatus.REJECTED] * prepared.size)
        statuses: list[ApplyStatus] = []
        refused: dict[int, str] = {}
        chunks = prepared.chunks or ([(0, 0, b"")] if source is not None else [])
        if source is not None and source.mode == "n" and len(chunks) > 1:
            # The script checks the turn of the call that carries the source, the last one.
            raise ValueError("a batch sent out of its turn (mode n) must fit in one call")
        for n, (start, end, packed) in enumerate(chunks):
            last = n == len(chunks) - 1
            try:
                anchored = await self._apply_range(
                    prepared, start, end, packed, source if last else None, statuses, refused
                )
            except _OutOfTurn:
                result.out_of_turn = True
                return result
            if last:
                result.anchored = anchored
        if prepared.newest:
            self.clock.observe(prepared.newest)
        for position, status in enumerate(statuses):
            index = prepared.accepted[position]
            result.statuses[index] = status
            if position in refused:
                result.refused[index] = refused[position]
        return result

    async def _apply_range(
        self,
        prepared: PreparedApply,
        start: int,
        end: int,
        packed: bytes | None,
        source: StreamBatch | None,
        statuses: list[ApplyStatus],
        refused: dict[int, str],
    ) -> bool | None:
        """Apply one chunk; returns the anchor state when ``source`` was given to the script
        (None otherwise)."""
        if packed is None:
            packed = _pack(prepared.items[start:end])
        if source is not None and refused:
            # An item of this batch was refused: it is not held here, so the batch proves
            # nothing about its origin. The anchor still moves (the stream was read on).
            source = replace(source, claims={})
        try:
            reply = await self._run_apply(
                self._apply_args(prepared, packed, prepared.data[start:end], source)
            )
        except ResponseError as exc:
            # A state of the server (loading, failing over, a cluster down or resharding) is
            # no item's fault: the whole batch waits for it. Only a refusal is narrowed down.
            if isinstance(exc, _STORE_WIDE) or failure(exc) is not Failure.REFUSED:
                raise
            if str(exc).startswith(_STORE_KEY_ERROR) or start == end:
                raise _store_error(exc) from exc
            if end - start > 1:
                middle = (start + end) // 2
                await self._apply_range(prepared, start, middle, None, None, statuses, refused)
                return await self._apply_range(
                    prepared, middle, end, None, source, statuses, refused
                )
            statuses.append(ApplyStatus.REFUSED)
            refused[len(statuses) - 1] = _describe(exc)
            if source is not None:
                return await self._apply_range(prepared, end, end, b"", source, statuses, refused)
            return None
        for letter in reply[0]:
            statuses.append(_STATUS[letter])
        for i in range(2, len(reply) - 1, 2):
            refused[start + int(reply[i]) - 1] = text(reply[i + 1])
        anchor = text(reply[1])
        if anchor == "x":
            raise _OutOfTurn
        return None if not anchor else anchor == "1"

    async def _run_apply(self, args: list[Any]) -> Any:
        """The apply script's reply; its errors raised as redis-py raises them."""
        if self._wire is None:
            return await self._apply(keys=self._declared, args=args)
        try:
            return await self._wire.call(
                ("EVALSHA", self._apply.sha, len(self._declared), *self._declared, *args)
            )
        except NoScriptError:  # a restarted or flushed Redis: load it again
            return await self._apply(keys=self._declared, args=args)

    @property
    def applies_in_order(self) -> bool:
        """One connection carries this store's applies; a cluster's are routed by its client."""
        return self._wire is not None

    def _apply_args(
        self,
        prepared: PreparedApply,
        packed: bytes,
        data: list[bytes],
        source: StreamBatch | None,
    ) -> list[Any]:
        args: list[Any] = [
            *self._base_args,
            self.stream_maxlen,
            "1" if prepared.relay else "0",
            clock.to_hex(prepared.newest),
            packed,
        ]
        if source is None:
            return [*args, "", "", "", "", "", *data]
        args += [source.peer, source.token, source.first, source.last, source.mode, *data]
        for origin, hlc in sorted(source.claims.items()):
            args += [origin, hlc_hex(hlc)]
        return args

    async def take_stream_claims(self, source: StreamBatch) -> None:
        """Anchor and claim for a read that brought no entries (the head of an idle stream)."""
        empty = PreparedApply(0, [], 0, [], [], False)
        await self.apply_prepared(empty, source)

    # ------------------------------------------------------------------------ reads

    @_store_api
    async def get(self, key: str) -> Item | None:
        """The live value, or None when missing or deleted (tombstones stay hidden)."""
        change = await self.get_version(key)
        if change is None or change.tombstone:
            return None
        return _item(change)

    @_store_api
    async def get_version(self, key: str) -> Change | None:
        """The stored version including tombstones (what replication compares)."""
        raw = await self.redis.hgetall(self.keys.item(key))
        if not raw:
            return None
        return item_from_hash(key, raw, max_payload=self.max_payload)

    @_store_api
    async def merkle_root(self) -> bytes:
        return await self.reader.root()

    async def versions(self, *, include_tombstones: bool = True) -> AsyncIterator[Change]:
        """Every stored version, for export and verification.

        Walks the Merkle tree rather than SCAN: SCAN may return a key twice, while every key is
        in exactly one leaf bucket, and the walk reads only non-empty branches.
        """
        with _as_store_errors(self.node_id):
            async for batch in self._tree_keys():
                for change in await self.reader.items(batch):
                    if isinstance(change, Change) and (include_tombstones or not change.tombstone):
                        yield change

    async def items(self) -> AsyncIterator[Item]:
        async for change in self.versions(include_tombstones=False):
            yield _item(change)

    async def _tree_keys(self, under: str = "") -> AsyncIterator[list[str]]:
        """The keys in the leaf buckets below the tree node ``under`` (the root by default),
        a chunk at a time.

        The walk goes where ``DrillPlan`` says, as every tree walk does: compared with an empty
        tree, every child that holds something differs, level by level.
        """
        plan = DrillPlan(self.geometry, [under], chunk_paths=_WALK_CHUNK, deepest_first=False)
        while (chunk := plan.next_chunk()) is not None:
            nodes = await self.reader.nodes([branch.path for branch in chunk])
            keys = plan.compared(chunk, nodes).only_here
            for at in range(0, len(keys), _WALK_CHUNK):
                yield keys[at : at + _WALK_CHUNK]

    @_store_api
    async def stream_tail(self) -> str | None:
        entries = await self.redis.xrevrange(self.keys.cdc, count=1)
        return text(entries[0][0]) if entries else None

    # ------------------------------------------------------------------------ the record

    @_store_api
    async def record(self) -> NodeRecord | None:
        """This store's record (docs/DELETES.md), or None when it has none yet."""
        return await self.reader.node_record()

    async def open_record(self, *, mode: str, relay: bool) -> tuple[str, str, str]:
        """Create the record if there is none, or open it: ``(outcome, incarnation, epoch)``.

        ``outcome`` is ``created`` for a store without a record (new, or wiped). A changed
        relay setting starts a new epoch.

        Raises:
            StoreOwnershipError: the record belongs to another node.
            StoreKeyError: the record is not a hash.
        """
        try:
            outcome, inc, epoch = await self._open(
                keys=self._declared,
                args=[*self._base_args, mode, "1" if relay else "0", _token(16), _token(8)],
            )
        except ResponseError as exc:
            error = _store_error(exc)
            if _NOT_OURS in str(exc):
                raise StoreOwnershipError(
                    f"node {self.node_id!r}: {_describe(exc)}; local.redis_url or local.prefix "
                    f"names another node's store, or local_node_id is wrong; nothing was written",
                    error.key,
                ) from exc
            raise error from exc
        return text(outcome), text(inc), text(epoch)

    async def certify(
        self,
        *,
        expected_run: str,
        expected_nonces: Sequence[str],
        nonce: str,
        advance: bool,
        new_epoch: str = "",
        state: str,
        reason: str = "",
    ) -> Certification:
        """Run the certify script (see ``scripts/certify.lua`` and docs/DELETES.md)."""
        known = [n for n in expected_nonces if n][:2]
        nonces = [*known, "", ""][:2]
        try:
            raw = await self._certify(
                keys=self._declared,
                args=[
                    *self._base_args,
                    expected_run,
                    nonces[0],
                    nonces[1] or nonces[0],
                    nonce,
                    "1" if advance else "0",
                    new_epoch,
                    state,
                    reason[:500],
                    clock.to_hex(self.clock.now()),
                ],
            )
        except ResponseError as exc:
            raise _store_error(exc) from exc
        outcome, run, recorded, cert, self_claim, store_clock, server_ms = (
            text(part) for part in raw
        )
        return Certification(
            outcome,
            run,
            recorded,
            int(cert),
            int(self_claim, 16) if len(self_claim) == 16 else 0,
            int(store_clock, 16) if len(store_clock) == 16 else 0,
            int(server_ms),
        )

    async def raise_clock(self, hlc: int) -> int:
        """Raise the store clock to at least ``hlc``; returns the store clock after."""
        try:
            raw = await self._clock(keys=self._declared, args=[*self._base_args, clock.to_hex(hlc)])
        except ResponseError as exc:
            raise _store_error(exc) from exc
        self.clock.observe(hlc)
        return clock.from_hex(raw) if raw else 0

    async def inherit(
        self,
        *,
        peer: str,
        token: str,
        tail: str,
        incarnation: str,
        cert: int,
        claims: Mapping[str, int],
    ) -> int:
        """Take ``peer``'s claims after a complete repair from it.

        Returns 2 (taken, and this store is anchored in the peer's stream), 1 (taken, but a
        tailer ahead of the repair stays unanchored until a later repair) or 0 (nothing done:
        this store's record went back meanwhile).
        """
        args: list[Any] = [*self._base_args, peer, token, tail, incarnation, cert]
        for origin, hlc in sorted(claims.items()):
            args += [origin, hlc_hex(hlc)]
        try:
            return int(await self._inherit(keys=self._declared, args=args))
        except ResponseError as exc:
            raise _store_error(exc) from exc

    async def add_to_record(
        self, *, members: Iterable[str] = (), forgotten: Iterable[str] = ()
    ) -> tuple[frozenset[str], frozenset[str]]:
        """Add to the record's member and forgotten lists (they only grow); returns both."""
        listed, gone, _ = await self._run_members(members, forgotten, [])
        return listed, gone

    async def claim_all_writes(
        self, origins: Iterable[str], *, incarnation: str, cert: int
    ) -> bool:
        """Claim every write of ``origins`` (forgotten nodes whose forget barrier closed).

        False (nothing done) when this store's record went back since ``incarnation`` and
        ``cert`` were read.
        """
        extra = [incarnation, cert, *sorted(origins)]
        _, _, claimed = await self._run_members((), (), extra)
        return claimed

    async def _run_members(
        self, members: Iterable[str], forgotten: Iterable[str], extra: list[Any]
    ) -> tuple[frozenset[str], frozenset[str], bool]:
        try:
            raw = await self._members(
                keys=self._declared,
                args=[
                    *self._base_args,
                    ",".join(sorted(members)),
                    ",".join(sorted(forgotten)),
                    *extra,
                ],
            )
        except ResponseError as exc:
            raise _store_error(exc) from exc
        listed, gone, claimed = (text(part) for part in raw)
        return (
            frozenset(filter(None, listed.split(","))),
            frozenset(filter(None, gone.split(","))),
            claimed == "1",
        )

    # ------------------------------------------------------------------------ upkeep

    async def tombstone_count(self) -> int:
        return int(await self.redis.zcard(self.keys.tombs))

    async def oldest_tombstone_ms(self) -> int | None:
        """Wall-clock ms of the oldest tombstone's HLC, or None without tombstones."""
        oldest = await self.redis.zrange(self.keys.tombs, 0, 0, withscores=True)
        return int(oldest[0][1]) if oldest else None

    async def collect_tombstones(
        self, stable: int, *, incarnation: str, cert: int, limit: int = _GC_BATCH
    ) -> int:
        """Collect up to ``limit`` tombstones at or below the stable frontier ``stable``.

        Returns how many were collected; -1 when this store's record went back since
        ``incarnation`` and ``cert`` were read (nothing done).
        """
        keys = await self.redis.zrangebyscore(
            self.keys.tombs, "-inf", clock.physical_ms(stable), start=0, num=limit
        )
        args: list[Any] = [*self._base_args, clock.to_hex(stable), incarnation, cert]
        for raw in keys:
            key = text(raw)
            args.append(key)
        try:
            return int(await self._gc(keys=self._declared, args=args))
        except ResponseError as exc:
            raise _store_error(exc) from exc

    async def discard_versions(
        self, versions: Sequence[tuple[str, int, str]], *, incarnation: str, cert: int
    ) -> int:
        """Remove ``(key, hlc, origin)`` versions from this store only; returns how many went.

        No tombstone and no CDC entry are written: the versions are dead by a peer's claims
        (docs/DELETES.md, "Absence by knowledge"), and telling peers anything would be wrong.
        A key whose version is no longer the given one is left alone. -1 when this store's
        record went back since ``incarnation`` and ``cert`` were read (nothing done).
        """
        if not versions:
            return 0
        args: list[Any] = [*self._base_args, incarnation, cert]
        for key, hlc, origin in versions:
            args += [key, clock.to_hex(hlc), origin]
        try:
            return int(await self._discard(keys=self._declared, args=args))
        except ResponseError as exc:
            raise _store_error(exc) from exc

    async def deep_check(self, *, sample: int = 20, strays: bool = True) -> DeepCheck:
        """Re-read every stored item and verify its payload against its content hash, and list
        the keys under the prefix that do not belong there.

        The Merkle tree covers each item's content hash, not its bytes: a payload edited by
        hand (or rotted) leaves every digest equal, so only re-hashing the payload finds it.
        Strays are found by ``SCAN`` (a key twice is counted twice; this is a report, not a
        ledger). Reads only; costs one pass over the store.
        """
        found = DeepCheck()
        for parent in self.leaf_parents():
            checked, unreadable = await self.verify_items(parent)
            found.items += checked
            found.unreadable += len(unreadable)
            room = sample - len(found.unreadable_sample)
            found.unreadable_sample += [(u.key, u.why) for u in unreadable[: max(0, room)]]
        cursor = None if strays else 0
        while cursor != 0:
            cursor, stray = await self.stray_page(cursor or 0)
            found.stray += len(stray)
            found.stray_sample += stray[: max(0, sample - len(found.stray_sample))]
        return found

    async def verify_items(self, under: str) -> tuple[int, list[UnreadableItem]]:
        """Re-read the items in the leaf buckets below tree node ``under`` and verify each
        payload against its content hash; returns how many were read and those that fail.

        Bounded by the subtree: the scrub calls it for one parent of leaf buckets at a time.
        """
        checked = 0
        unreadable: list[UnreadableItem] = []
        async for keys in self._tree_keys(under):
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(self.keys.item(key))
                raws = await pipe.execute()
            for key, raw in zip(keys, raws, strict=True):
                if not raw:
                    continue  # deleted since the walk read its leaf
                checked += 1
                try:
                    item_from_hash(key, raw, max_payload=self.max_payload)
                except codec.CodecError as exc:
                    unreadable.append(UnreadableItem(key, raw, _stored_version(raw), str(exc)))
        return checked, unreadable

    async def stray_page(self, cursor: int) -> tuple[int, list[tuple[str, str]]]:
        """One ``SCAN`` page of the keys under the prefix: the next cursor (0 when the pass is
        over) and the keys on it that do not belong, each with why."""
        pattern = glob_escape(self.keys.prefix) + "*"
        # On a cluster, the partition's node only: a stray key on another shard is not seen.
        cursor, names = await self.redis.scan(
            cursor, match=pattern, count=_SCAN_PAGE, **await node_of(self.redis, self.keys.record)
        )
        stray: list[tuple[str, str]] = []
        if names:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.type(name)
                kinds = await pipe.execute()
            width, depth = self.geometry.width, self.geometry.depth
            partitions = self.geometry.partition_names
            for name, kind in zip(names, kinds, strict=True):
                if text(kind) == "none":
                    continue  # removed between SCAN and TYPE
                problem = key_problem(self.keys, width, depth, text(name), text(kind), partitions)
                if problem is not None:
                    stray.append((text(name), problem))
        return int(cursor), stray

    def leaf_parents(self) -> list[str]:
        """Paths of the tree nodes whose children are leaf buckets, in order (what
        :meth:`scrub` checks one at a time)."""
        parents, levels = [""], self.geometry.depth - 1
        if self.geometry.partitions > 1 and levels > 0:
            # A partition's subtree is the root map's child named after it.
            parents, levels = [self.keys.partition], levels - 1
        for _level in range(levels):
            parents = [p + child for p in parents for child in self.geometry.all_children()]
        return parents

    async def scrub(self, parent: str, *, fix: bool) -> int:
        """Check one parent of leaf buckets, and its ancestors and the root, against their
        children; with ``fix``, rebuild what disagrees. Returns how many nodes disagreed.

        Every script keeps the tree consistent by itself; this is defence in depth against a
        tree left inconsistent by a failure no check foresaw, or by a hand edit.
        """
        try:
            return int(
                await self._scrub(
                    keys=self._declared,
                    args=[*self._base_args, parent, self.geometry.fanout, "1" if fix else "0"],
                )
            )
        except ResponseError as exc:
            raise _store_error(exc) from exc

    async def should_accept_writes(self) -> bool:
        """False while Redis memory use is above ``max_memory_ratio`` of ``maxmemory``.

        Cached for a second: the hot path asks before every batch.
        """
        now = time.monotonic()
        if now - self._pressure_checked < _PRESSURE_TTL_SEC:
            return self._accepting
        self._pressure_checked = now
        info = await self.redis.info("memory", **await node_of(self.redis, self.keys.record))
        limit = int(info.get("maxmemory", 0) or 0)
        used = int(info.get("used_memory", 0) or 0)
        self._accepting = limit <= 0 or used < limit * self.max_memory_ratio
        return self._accepting


def _replica_wait(replicas: int, timeout_sec: float) -> tuple[int, int] | None:
    """``WAIT``'s arguments for ``replicas`` (None: no wait)."""
    if replicas < 0 or timeout_sec <= 0:
        raise InvalidWriteError(
            "replicas must be >= 0 and replica_timeout_sec > 0; nothing was written"
        )
    return (replicas, max(1, int(timeout_sec * 1000))) if replicas else None


def _as_bytes(value: object, name: str) -> bytes:
    """Bytes-like values as they are, text as UTF-8; anything else is the caller's mistake."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidWriteError(
                f"{name} is text that UTF-8 cannot encode ({exc.reason} at position "
                f"{exc.start}); nothing was written"
            ) from None
    raise InvalidWriteError(
        f"{name} must be bytes or text, not {type(value).__name__}; nothing was written"
    )


def _pack(items: Iterable[list[Any]]) -> bytes:
    listed = list(items)
    return msgpack.packb(listed, use_bin_type=False) if listed else b""


def _token(chars: int) -> str:
    import secrets

    return secrets.token_hex(chars // 2)


def _describe(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__)[:500]


def _is_refusal(exc: BaseException) -> bool:
    """A script's own refusal (a wrong-typed key, the clock at its end), not a server state."""
    message = str(exc)
    return message.startswith(("WRONGTYPE", "ERR HLC exhausted", "HLC exhausted")) or (
        "(key " in message
    )


def _store_error(exc: BaseException) -> StoreKeyError:
    message = _describe(exc)
    key = None
    marker = "(key "
    if marker in message and message.endswith(")"):
        key = message[message.rindex(marker) + len(marker) : -1]
    elif message.startswith(_STORE_KEY_ERROR):
        key = message[len(_STORE_KEY_ERROR) :].strip().split(" ", 1)[0]
    return StoreKeyError(f"local store refused the write: {message}", key)


def _item(change: Change) -> Item:
    return Item(
        key=change.key,
        value=change.value if change.value is not None else b"",
        content_hash=change.content_hash,
        hlc=change.hlc,
        origin=change.origin,
        content_type=change.content_type,
    )
