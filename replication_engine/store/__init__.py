"""Local stores: the protocol the engine needs and the default Redis implementation."""

from replication_engine.store.layout import Keyspace
from replication_engine.store.protocol import Store
from replication_engine.store.reader import ReadCounter, TreeReader
from replication_engine.store.redis_store import (
    ApplyStatus,
    Item,
    ReadOnlyStoreError,
    RedisStore,
)

__all__ = [
    "ApplyStatus",
    "Item",
    "Keyspace",
    "ReadCounter",
    "ReadOnlyStoreError",
    "RedisStore",
    "Store",
    "TreeReader",
]
