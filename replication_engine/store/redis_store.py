"""The default store: items, Merkle tree and CDC stream in one Redis, changed only by Lua scripts.

Every change (a local put or delete, or a remote version applied by the engine) is one script
call that updates the item, its leaf and every ancestor, and appends the CDC entry; Redis runs a
script atomically, so the tree, the data and the stream never disagree.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any, NoReturn

import msgpack
from redis.asyncio import Redis

from replication_engine import clock, codec
from replication_engine.clock import HLC
from replication_engine.codec import Change
from replication_engine.connection import TlsOptions, make_client
from replication_engine.merkle import Geometry, GeometryError, leaf_digest
from replication_engine.observability.tracing import current_trace_parent
from replication_engine.store.layout import Keyspace, text
from replication_engine.store.reader import ReadCounter, TreeReader, item_from_hash

_WALK_CHUNK = 500
_PRESSURE_TTL_SEC = 1.0
_GC_BATCH = 500


class ReadOnlyStoreError(RuntimeError):
    """A local write on a follower: followers only take writes from their upstream."""


class ApplyStatus(StrEnum):
    APPLIED = "applied"
    SKIPPED = "skipped"  # same content, not newer: a duplicate delivery
    STALE = "stale"  # older than the version held here
    EXPIRED = "expired"  # a tombstone past its grace period, already collected here
    REJECTED = "rejected"  # stamped too far in the future: a peer's clock is wrong


@dataclass(frozen=True, slots=True)
class PreparedApply:
    """A batch packed for the apply script (see :meth:`RedisStore.prepare_apply`)."""

    size: int  # changes in the batch, accepted or not
    accepted: list[int]  # their indexes that go to the script (the rest are REJECTED)
    newest: int  # the greatest HLC among the accepted changes
    packed: bytes
    relay: bool  # whether the script re-emits applied versions on this node's stream


# The apply script returns one status letter per item, as one string.
_STATUS = {
    ord("a"): ApplyStatus.APPLIED,
    ord("d"): ApplyStatus.SKIPPED,
    ord("s"): ApplyStatus.STALE,
    ord("x"): ApplyStatus.EXPIRED,
}


@dataclass(frozen=True, slots=True)
class Item:
    key: str
    value: bytes
    content_hash: str
    hlc: int
    origin: str
    content_type: str


def _load_script(name: str) -> str:
    scripts = resources.files("replication_engine.store") / "scripts"
    return (scripts / "common.lua").read_text() + "\n" + (scripts / name).read_text()


class RedisStore:
    """A node's data in its own Redis. Also the API a parent daemon writes through."""

    def __init__(
        self,
        redis: Redis,
        *,
        node_id: str,
        prefix: str = "",
        geometry: Geometry | None = None,
        stream_maxlen: int = 100_000,
        tombstone_grace_sec: float = 86_400.0,
        max_memory_ratio: float = 0.9,
        read_only: bool = False,
        hlc: HLC | None = None,
        max_payload: int = codec.DEFAULT_MAX_PAYLOAD,
        max_clock_offset_sec: float = 300.0,
    ) -> None:
        if not node_id:
            raise ValueError("node_id must not be empty")
        self.redis = redis
        self.node_id = node_id
        self.keys = Keyspace(prefix)
        self.geometry = geometry or Geometry()
        self.stream_maxlen = stream_maxlen
        self.tombstone_grace_ms = int(tombstone_grace_sec * 1000)
        self.max_memory_ratio = max_memory_ratio
        self.read_only = read_only
        self.clock = hlc or HLC()
        self.max_payload = max_payload
        self.max_clock_offset_ms = int(max_clock_offset_sec * 1000)
        self.reader = TreeReader(redis, self.keys, counter=ReadCounter(), max_payload=max_payload)
        self._write = redis.register_script(_load_script("write.lua"))
        self._apply = redis.register_script(_load_script("apply.lua"))
        self._gc = redis.register_script(_load_script("gc.lua"))
        self._discard = redis.register_script(_load_script("discard.lua"))
        self._base_args = [prefix, str(self.geometry.width)]
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
        **options: Any,
    ) -> RedisStore:
        """Open a store, checking (or on first use recording) the tree geometry."""
        redis = make_client(
            url, username=username, password=password, tls=tls, client_name=f"re-store-{node_id}"
        )
        store = cls(
            redis, node_id=node_id, prefix=prefix, geometry=Geometry(fanout, depth), **options
        )
        try:
            await store.check_geometry()
            await store._load_clock()
        except BaseException:
            await redis.aclose()
            raise
        return store

    async def check_geometry(self) -> None:
        stored = await self.reader.geometry()
        if stored is None:
            await self.redis.hset(self.keys.meta, mapping=dict[Any, Any](self.geometry.as_fields()))
            return
        if stored != self.geometry:
            raise GeometryError(
                f"store at prefix {self.keys.prefix!r} was built with Merkle geometry "
                f"{stored.describe()}, but this node is configured with "
                f"{self.geometry.describe()}; use the stored geometry or rebuild the store"
            )

    async def _load_clock(self) -> None:
        raw = await self.redis.get(self.keys.hlc)
        if raw is not None:
            self.clock.observe(clock.from_hex(raw))

    async def close(self) -> None:
        await self.redis.aclose()

    # ------------------------------------------------------------------------ local writes

    async def put(self, key: str, value: bytes | str, content_type: str = "binary") -> int:
        """Write ``value`` under ``key``; returns the write's HLC."""
        if isinstance(value, str):
            value = value.encode("utf-8")
        return await self._local_write(
            key, False, codec.encode_payload(value), codec.content_hash(value), content_type
        )

    async def put_many(self, writes: Sequence[tuple[str, bytes | str, str]]) -> list[int]:
        """Several ``(key, value, content_type)`` puts in one round trip; their HLCs, in order.

        Each write is its own atomic write (as :meth:`put`), not a transaction over all of
        them: a failure part way leaves the earlier ones written, and raises.
        """
        if self.read_only:
            self._refuse_local_write()
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, value, content_type in writes:
                if isinstance(value, str):
                    value = value.encode("utf-8")
                args = self._local_write_args(
                    key,
                    False,
                    codec.encode_payload(value),
                    codec.content_hash(value),
                    content_type,
                )
                await self._write(args=args, client=pipe)
            replies = await pipe.execute()
        hlcs = [clock.from_hex(hlc_hex) for hlc_hex, _sid in replies]
        if hlcs:
            self.clock.observe(max(hlcs))
        return hlcs

    async def delete(self, key: str) -> int:
        """Write a tombstone (deletes replicate like values); returns its HLC."""
        return await self._local_write(key, True, b"", "", "")

    async def _local_write(
        self, key: str, tombstone: bool, data: bytes, content_hash: str, content_type: str
    ) -> int:
        if self.read_only:
            self._refuse_local_write()
        args = self._local_write_args(key, tombstone, data, content_hash, content_type)
        hlc_hex, _sid = await self._write(args=args)
        hlc = clock.from_hex(hlc_hex)
        self.clock.observe(hlc)
        return hlc

    def _refuse_local_write(self) -> NoReturn:
        raise ReadOnlyStoreError(
            f"node {self.node_id!r} is a follower: local writes are refused; "
            "write to the primary and let it replicate here"
        )

    def _local_write_args(
        self, key: str, tombstone: bool, data: bytes, content_hash: str, content_type: str
    ) -> list[Any]:
        codec.decode_key(key.encode("utf-8"))
        proposed = self.clock.now()
        return [
            *self._base_args,
            self.stream_maxlen,
            key,
            self.geometry.leaf_path(key),
            "1" if tombstone else "0",
            data,
            content_hash,
            clock.to_hex(proposed),
            self.node_id,
            content_type,
            clock.physical_ms(proposed),
            current_trace_parent() or "",
        ]

    # ------------------------------------------------------------------------ the apply path

    async def apply_batch(
        self, changes: Sequence[Change], *, relay: bool = True
    ) -> list[ApplyStatus]:
        """Apply remote versions in one round trip, each atomically, last-writer-wins.

        Duplicates and older versions are skipped. With ``relay``, an applied version is
        re-emitted on this node's stream with its original origin and HLC, so that a node
        tailing only this one (a chain, a tree of followers) gets it too, and loops die out at
        the dedup. In a full mesh every node tails every origin directly and relaying only
        multiplies stream writes and reads; see docs/TOPOLOGIES.md.
        """
        return await self.apply_prepared(self.prepare_apply(changes, relay=relay))

    def prepare_apply(self, changes: Sequence[Change], *, relay: bool = True) -> PreparedApply:
        """The client-side half of :meth:`apply_batch`: no I/O, so a pipelined caller can
        pack batch N+1 while this store's server is still applying batch N.

        Everything the script would otherwise derive per item is computed here, off the
        single-threaded server: the leaf path and digest (also as four 32-bit words) and, when
        relaying, the stream entry's meta JSON.
        """
        # A version stamped far ahead of our wall clock would drag this store's clock (and so
        # every later local write) into the future, possibly to the end of the HLC range.
        future = self.clock.wall() + self.max_clock_offset_ms
        items: list[list[str | bytes | int]] = []
        accepted: list[int] = []
        newest = 0
        leaf_path = self.geometry.leaf_path
        for i, c in enumerate(changes):
            if clock.physical_ms(c.hlc) > future:
                continue
            accepted.append(i)
            digest = leaf_digest(c.key, c.hlc, c.content_hash, c.tombstone)
            n = int(digest, 16)
            items.append(
                [
                    c.key,
                    leaf_path(c.key),
                    "1" if c.tombstone else "0",
                    c.data,
                    c.content_hash,
                    clock.to_hex(c.hlc),
                    c.origin,
                    c.content_type,
                    str(c.version),
                    str(c.updated_at),
                    c.trace_parent or "",
                    digest,
                    n >> 96,
                    (n >> 64) & 0xFFFFFFFF,
                    (n >> 32) & 0xFFFFFFFF,
                    n & 0xFFFFFFFF,
                    codec.encode_meta(c) if relay else b"",
                ]
            )
            newest = max(newest, c.hlc)
        packed = msgpack.packb(items, use_bin_type=False) if items else b""
        return PreparedApply(len(changes), accepted, newest, packed, relay)

    async def apply_prepared(self, prepared: PreparedApply) -> list[ApplyStatus]:
        """The server-side half of :meth:`apply_batch`; statuses in the order of the changes."""
        out = [ApplyStatus.REJECTED] * prepared.size
        if not prepared.accepted:
            return out
        horizon = self.clock.wall() - self.tombstone_grace_ms
        statuses = await self._apply(
            args=[
                *self._base_args,
                self.stream_maxlen,
                horizon,
                "1" if prepared.relay else "0",
                clock.to_hex(prepared.newest),
                prepared.packed,
            ]
        )
        self.clock.observe(prepared.newest)
        for i, s in zip(prepared.accepted, statuses, strict=True):
            out[i] = _STATUS[s]
        return out

    # ------------------------------------------------------------------------ reads

    async def get(self, key: str) -> Item | None:
        """The live value, or None when missing or deleted (tombstones stay hidden)."""
        change = await self.get_version(key)
        if change is None or change.tombstone:
            return None
        return _item(change)

    async def get_version(self, key: str) -> Change | None:
        """The stored version including tombstones (what replication compares)."""
        raw = await self.redis.hgetall(self.keys.item(key))
        if not raw:
            return None
        return item_from_hash(key, raw, max_payload=self.max_payload)

    async def merkle_root(self) -> bytes:
        return await self.reader.root()

    async def versions(self, *, include_tombstones: bool = True) -> AsyncIterator[Change]:
        """Every stored version, for export and verification.

        Walks the Merkle tree rather than SCAN: SCAN may return a key twice, while every key is
        in exactly one leaf bucket, and the walk reads only non-empty branches.
        """
        async for batch in self._tree_keys():
            for change in await self.reader.items(batch):
                if isinstance(change, Change) and (include_tombstones or not change.tombstone):
                    yield change

    async def items(self) -> AsyncIterator[Item]:
        async for change in self.versions(include_tombstones=False):
            yield _item(change)

    async def _tree_keys(self) -> AsyncIterator[list[str]]:
        frontier = [""]
        for _level in range(self.geometry.depth):
            children: list[str] = []
            for start in range(0, len(frontier), _WALK_CHUNK):
                paths = frontier[start : start + _WALK_CHUNK]
                for path, node in zip(paths, await self.reader.nodes(paths), strict=True):
                    children.extend(path + child for child in sorted(node))
            frontier = children
        for start in range(0, len(frontier), _WALK_CHUNK):
            paths = frontier[start : start + _WALK_CHUNK]
            keys = [key for leaf in await self.reader.nodes(paths) for key in leaf]
            for at in range(0, len(keys), _WALK_CHUNK):
                yield keys[at : at + _WALK_CHUNK]

    async def stream_tail(self) -> str | None:
        entries = await self.redis.xrevrange(self.keys.cdc, count=1)
        return text(entries[0][0]) if entries else None

    # ------------------------------------------------------------------------ upkeep

    async def collect_tombstones(self, limit: int = _GC_BATCH) -> int:
        """Drop tombstones past the grace period; bounded work per call. Returns how many."""
        horizon = self.clock.wall() - self.tombstone_grace_ms
        keys = await self.redis.zrangebyscore(
            self.keys.tombs, "-inf", f"({horizon}", start=0, num=limit
        )
        if not keys:
            return 0
        args: list[Any] = [*self._base_args, horizon]
        for raw in keys:
            key = text(raw)
            args += [key, self.geometry.leaf_path(key)]
        return int(await self._gc(args=args))

    async def should_accept_writes(self) -> bool:
        """False while Redis memory use is above ``max_memory_ratio`` of ``maxmemory``.

        Cached for a second: the hot path asks before every batch.
        """
        now = time.monotonic()
        if now - self._pressure_checked < _PRESSURE_TTL_SEC:
            return self._accepting
        self._pressure_checked = now
        info = await self.redis.info("memory")
        limit = int(info.get("maxmemory", 0) or 0)
        used = int(info.get("used_memory", 0) or 0)
        self._accepting = limit <= 0 or used < limit * self.max_memory_ratio
        return self._accepting

    # ------------------------------------------------------------------------ mesh standing

    async def write_mesh_record(
        self, fields: Mapping[str, str], *, clear: Sequence[str] = ()
    ) -> None:
        """Set (and drop ``clear``) fields of this node's standing record, in one transaction.

        Peers read the record (``TreeReader.mesh_record``) before pulling from this store; see
        ``replication_engine/rebootstrap.py``.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            if fields:
                pipe.hset(self.keys.mesh, mapping=dict[Any, Any](fields))
            if clear:
                pipe.hdel(self.keys.mesh, *clear)
            await pipe.execute()

    async def discard_versions(self, versions: Sequence[tuple[str, int, str]]) -> int:
        """Remove ``(key, hlc, origin)`` versions from this store only; returns how many went.

        No tombstone and no CDC entry are written: a re-bootstrap drops values that peers
        deleted and collected, and telling peers anything would be wrong (a tombstone would
        delete a copy some other peer may rightly hold). A key whose version is no longer the
        given one is left alone.
        """
        if not versions:
            return 0
        args: list[Any] = list(self._base_args)
        for key, hlc, origin in versions:
            args += [key, self.geometry.leaf_path(key), clock.to_hex(hlc), origin]
        return int(await self._discard(args=args))


def _item(change: Change) -> Item:
    return Item(
        key=change.key,
        value=change.value if change.value is not None else b"",
        content_hash=change.content_hash,
        hlc=change.hlc,
        origin=change.origin,
        content_type=change.content_type,
    )
