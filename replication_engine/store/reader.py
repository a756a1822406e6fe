"""Reads of a store's tree and items over any Redis connection.

The cold path reads its own store and every peer's through this one class, so both sides of a
comparison are read the same way. Reads are pipelined: one round trip per batch of nodes or items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from replication_engine import clock
from replication_engine.codec import DEFAULT_MAX_PAYLOAD, Change, CodecError, change_from_parts
from replication_engine.knowledge import NodeRecord
from replication_engine.merkle import ZERO, Geometry, GeometryError
from replication_engine.store.layout import Keyspace, text


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
        """Children maps (or leaf key->digest maps) for many nodes in one round trip."""
        if not paths:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for path in paths:
                pipe.hgetall(self.keys.node(path))
            raw_maps = await pipe.execute()
        self.counter.round_trips += 1
        out = []
        for raw in raw_maps:
            decoded = {}
            for k, v in raw.items():
                self.counter.bytes_read += len(k) + len(v)
                decoded[k.decode("utf-8", "surrogateescape")] = v.decode("ascii", "replace")
            out.append(decoded)
        return out

    async def items(self, keys: Sequence[str]) -> list[Change | CodecError | None]:
        """Stored versions of ``keys`` (None where absent, CodecError where unreadable)."""
        if not keys:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(self.keys.item(key))
            raws = await pipe.execute()
        self.counter.round_trips += 1
        out: list[Change | CodecError | None] = []
        for key, raw in zip(keys, raws, strict=True):
            if not raw:
                out.append(None)
                continue
            self.counter.bytes_read += sum(len(k) + len(v) for k, v in raw.items())
            try:
                out.append(item_from_hash(key, raw, max_payload=self.max_payload))
            except CodecError as exc:
                out.append(exc)
        return out

    async def node_record(self) -> NodeRecord | None:
        """The store's record (``Pnode``), or None when it has none (new, or wiped).

        Peers read it with every stream read and before every repair: its claims are what
        they may take over, and what tombstone collection waits for (docs/DELETES.md).
        """
        raw = await self.redis.hgetall(self.keys.record)
        self.counter.round_trips += 1
        return NodeRecord.from_fields({text(k): text(v) for k, v in raw.items()})
