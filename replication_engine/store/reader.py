"""Reads of a store's tree and items over any Redis connection.

The cold path reads its own store and every peer's through this one class, so both sides of a
comparison are read the same way. A batch of nodes or items is one round trip: one call of the
store's read-only function ``re_hashes`` where the server has it and the user may call it,
otherwise a pipeline of ``HGETALL``s, which costs the client several times more per hash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from replication_engine import clock
from replication_engine.codec import DEFAULT_MAX_PAYLOAD, Change, CodecError, change_from_parts
from replication_engine.connection import Failure, failure
from replication_engine.knowledge import NodeRecord
from replication_engine.merkle import ZERO, Geometry, GeometryError
from replication_engine.store.functions import MAX_KEYS_PER_CALL
from replication_engine.store.layout import Keyspace, text

log = logging.getLogger(__name__)

# How long a reader keeps to pipelines after ``re_hashes`` failed it (Redis 6.2, an older
# library, a user without FCALL_RO, a function of that name that is not ours) before it tries
# again: a peer may be upgraded meanwhile.
BULK_RETRY_SEC = 600.0
_BYTES = {bytes}  # the one type every part of a re_hashes reply must have


class _Malformed(Exception):
    """A reply of ``re_hashes`` that is not a list of flat field/value lists."""


@dataclass(frozen=True, slots=True)
class StoredItem:
    """One key's item as read: its fields as stored (empty where absent or not a hash), kept
    for the quarantine, and what they decode to (None where absent, CodecError where
    unreadable)."""

    key: str
    fields: Mapping[bytes, bytes]
    decoded: Change | CodecError | None


@dataclass(slots=True)
class ReadCounter:
    """Round trips and bytes read, for repair statistics and benchmarks."""

    round_trips: int = 0
    bytes_read: int = 0


def item_from_hash(key: str, fields: Mapping[Any, Any], *, max_payload: int) -> Change:
    """Rebuild a verified :class:`Change` from a stored item hash (raises CodecError)."""
    try:
        hlc = clock.from_hex(fields[b"hlc"])
        origin = fields[b"o"].decode("utf-8")
        tomb = fields.get(b"del", b"0") == b"1"
        meta = {
            "hlc": clock.to_hex(hlc),
            "origin": origin,
            "version": int(fields.get(b"v", b"0")),
            "updated_at": int(fields.get(b"ts", b"0")),
            "content_type": fields.get(b"ct", b"binary").decode("utf-8"),
        }
        if b"tp" in fields:
            meta["trace_parent"] = fields[b"tp"].decode("utf-8")
        hash_hex = fields.get(b"h", b"").decode("ascii")
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise CodecError(f"stored item {key!r} is malformed: {exc!r}", reason="bad_item") from None
    return change_from_parts(
        key,
        tomb,
        fields.get(b"d", b""),
        hash_hex,
        meta,
        default_origin=origin,
        max_payload=max_payload,
    )


class TreeReader:
    def __init__(
        self,
        redis: Redis,
        keyspace: Keyspace,
        *,
        counter: ReadCounter | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self.redis = redis
        self.keys = keyspace
        self.counter = counter or ReadCounter()
        self.max_payload = max_payload
        self._pipeline_until = 0.0  # monotonic time until which hashes are read by pipeline

    async def geometry(self) -> Geometry | None:
        raw = await self.redis.hgetall(self.keys.meta)
        self.counter.round_trips += 1
        if not raw:
            return None
        fields = {text(k): text(v) for k, v in raw.items()}
        try:
            return Geometry.from_fields(fields)
        except GeometryError:
            raise
        except Exception as exc:
            raise GeometryError(f"stored geometry is unreadable: {fields!r}") from exc

    async def root(self) -> bytes:
        raw = await self.redis.get(self.keys.root)
        self.counter.round_trips += 1
        if raw is None:
            return ZERO
        self.counter.bytes_read += len(raw)
        return bytes.fromhex(text(raw))

    async def nodes(self, paths: Sequence[str]) -> list[dict[str, str]]:
        """Children maps (or leaf key->digest maps) for many nodes in one round trip.

        Raises:
            RedisError: the read failed, or a node cannot be read (a key of another type):
                without it the drill cannot go on.
        """
        names = [self.keys.node(path) for path in paths]
        out: list[dict[str, str]] = []
        for name, raw in zip(names, await self._hashes(names), strict=True):
            if isinstance(raw, RedisError):
                raise type(raw)(f"tree node {name!r}: {raw}") from raw
            out.append(
                {
                    k.decode("utf-8", "surrogateescape"): v.decode("ascii", "replace")
                    for k, v in raw.items()
                }
            )
        return out

    async def items(self, keys: Sequence[str]) -> list[Change | CodecError | None]:
        """Stored versions of ``keys`` (None where absent, CodecError where unreadable)."""
        return [item.decoded for item in await self.stored_items(keys)]

    async def stored_items(self, keys: Sequence[str]) -> list[StoredItem]:
        """``keys`` as stored: each one's fields and what they decode to (see :meth:`items`).

        An item that cannot be read at all (its key holds another type) is unreadable alone,
        a ``bad_item`` with no fields, as one whose fields do not parse is: the rest of the
        batch reads as usual.
        """
        names = [self.keys.item(key) for key in keys]
        out: list[StoredItem] = []
        for key, raw in zip(keys, await self._hashes(names), strict=True):
            if isinstance(raw, RedisError):
                error = CodecError(f"stored item {key!r} is unreadable: {raw}", reason="bad_item")
                out.append(StoredItem(key, {}, error))
            elif not raw:
                out.append(StoredItem(key, raw, None))
            else:
                try:
                    decoded: Change | CodecError = item_from_hash(
                        key, raw, max_payload=self.max_payload
                    )
                except CodecError as exc:
                    decoded = exc
                out.append(StoredItem(key, raw, decoded))
        return out

    async def _hashes(self, names: Sequence[str]) -> list[dict[bytes, bytes] | RedisError]:
        """``HGETALL`` of each of ``names`` (all in one partition), in one round trip.

        A hash that cannot be read (its key holds another type) answers with its own error,
        in its place; a failure of the read itself raises.

        The function is only a faster way to read the same, and a call of it fails as a whole
        when one of its hashes cannot be read (``HGETALL`` raises inside it). So whenever it
        fails other than by the server being unavailable (which the pipeline would meet too),
        the batch is read again by pipeline, where each hash answers alone, and the built-in
        commands decide. Only when the pipeline read every hash was the failure the
        function's own, and the reader keeps to pipelines a while.
        """
        if not names:
            return []
        failed: RedisError | _Malformed | None = None
        if time.monotonic() >= self._pipeline_until:
            try:
                return list(await self._hashes_by_function(names))
            except (RedisError, _Malformed) as exc:
                if isinstance(exc, RedisError) and failure(exc) is Failure.UNAVAILABLE:
                    raise
                failed = exc
        raws = await self._hashes_by_pipeline(names)
        if failed is not None and (
            isinstance(failed, _Malformed) or not any(isinstance(r, RedisError) for r in raws)
        ):
            self._pipeline_until = time.monotonic() + BULK_RETRY_SEC
            log.info(
                "reader.pipelined",
                extra={"why": str(failed)[:200], "retry_in_sec": BULK_RETRY_SEC},
            )
        return raws

    async def _hashes_by_pipeline(
        self, names: Sequence[str]
    ) -> list[dict[bytes, bytes] | RedisError]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(name)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        self.counter.round_trips += 1
        out: list[dict[bytes, bytes] | RedisError] = []
        for reply in replies:
            if isinstance(reply, RedisError):
                # The hash's own error (WRONGTYPE) is its answer; one that says the server
                # cannot answer now (failing over, loading) or this user may not read it is
                # the whole read's, as it was when the pipeline raised on the first error.
                if failure(reply) is not Failure.REFUSED:
                    raise reply
                out.append(reply)
                continue
            self.counter.bytes_read += sum(map(len, reply)) + sum(map(len, reply.values()))
            out.append(reply)
        return out

    async def _hashes_by_function(self, names: Sequence[str]) -> list[dict[bytes, bytes]]:
        out: list[dict[bytes, bytes]] = []
        for start in range(0, len(names), MAX_KEYS_PER_CALL):
            chunk = names[start : start + MAX_KEYS_PER_CALL]
            replies = await self.redis.fcall_ro("re_hashes", len(chunk), *chunk)
            self.counter.round_trips += 1
            if type(replies) is not list or len(replies) != len(chunk):
                raise _Malformed(f"re_hashes answered {type(replies).__name__}")
            for flat in replies:
                if type(flat) is not list or len(flat) % 2 or not set(map(type, flat)) <= _BYTES:
                    raise _Malformed("re_hashes answered a hash that is not field/value pairs")
                self.counter.bytes_read += sum(map(len, flat))
                pairs = iter(flat)
                out.append(dict(zip(pairs, pairs, strict=True)))
        return out

    async def node_record(self) -> NodeRecord | None:
        """The store's record (``Pnode``), or None when it has none (new, or wiped).

        Peers read it with every stream read and before every repair: its claims are what
        they may take over, and what tombstone collection waits for (docs/DELETES.md).
        """
        raw = await self.redis.hgetall(self.keys.record)
        self.counter.round_trips += 1
        return NodeRecord.from_fields({text(k): text(v) for k, v in raw.items()})
