"""What the engine needs from a store.

The engine drives a store with these methods; :class:`RedisStore` is the implementation. A
store must apply each change atomically, decide by last-writer-wins on ``(hlc, origin)`` with
the tiebreak of :func:`replication_engine.knowledge.order`, and keep its record (claims,
anchors, certification; docs/DELETES.md) in the same atomic steps as its data.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from replication_engine.codec import Change

if TYPE_CHECKING:
    from replication_engine.knowledge import ApplyStatus, NodeRecord
    from replication_engine.merkle import Geometry
    from replication_engine.store.layout import Keyspace
    from replication_engine.store.reader import TreeReader
    from replication_engine.store.redis_store import (
        ApplyResult,
        Item,
        PreparedApply,
        StreamBatch,
    )


@runtime_checkable
class Store(Protocol):
    node_id: str
    geometry: Geometry
    keys: Keyspace
    reader: TreeReader

    async def put(self, key: str, value: bytes | str, content_type: str = ...) -> int: ...
    async def delete(self, key: str) -> int: ...
    async def get(self, key: str) -> Item | None: ...
    async def merkle_root(self) -> bytes: ...
    def items(self) -> AsyncIterator[Item]: ...
    async def apply_batch(
        self, changes: Sequence[Change], *, relay: bool = True
    ) -> list[ApplyStatus]: ...
    def prepare_apply(
        self,
        changes: Sequence[Change],
        *,
        relay: bool = True,
        replaces: Mapping[int, tuple[int, str]] | None = None,
    ) -> PreparedApply: ...
    async def apply_prepared(
        self, prepared: PreparedApply, source: StreamBatch | None = None
    ) -> ApplyResult: ...
    async def should_accept_writes(self) -> bool: ...
    async def record(self) -> NodeRecord | None: ...
    async def inherit(
        self,
        *,
        peer: str,
        token: str,
        tail: str,
        incarnation: str,
        cert: int,
        claims: Mapping[str, int],
    ) -> int: ...
    async def discard_versions(
        self, versions: Sequence[tuple[str, int, str]], *, incarnation: str, cert: int
    ) -> int: ...
    async def add_to_record(
        self, *, members: Iterable[str] = ..., forgotten: Iterable[str] = ...
    ) -> tuple[frozenset[str], frozenset[str]]: ...
    async def close(self) -> None: ...
