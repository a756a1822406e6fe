"""What the engine needs from a store.

The engine drives any store with these methods; :class:`RedisStore` is the default. A store must
apply each change atomically and decide by last-writer-wins on ``(hlc, origin)``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from replication_engine.codec import Change

if TYPE_CHECKING:
    from replication_engine.merkle import Geometry
    from replication_engine.store.layout import Keyspace
    from replication_engine.store.reader import TreeReader
    from replication_engine.store.redis_store import ApplyStatus, Item, PreparedApply


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
    def prepare_apply(self, changes: Sequence[Change], *, relay: bool = True) -> PreparedApply: ...
    async def apply_prepared(self, prepared: PreparedApply) -> list[ApplyStatus]: ...
    async def should_accept_writes(self) -> bool: ...
    async def close(self) -> None: ...
