"""Local stores: the protocol the engine needs and the default Redis implementation."""

from replication_engine.knowledge import ApplyStatus
from replication_engine.store.layout import Keyspace
from replication_engine.store.partitioned import PartitionedStore
from replication_engine.store.protocol import Item, RecordKeeper, Scrubbable, Store
from replication_engine.store.reader import ReadCounter, TreeReader
from replication_engine.store.redis_store import ReadOnlyStoreError, RedisStore

__all__ = [
    "ApplyStatus",
    "Item",
    "Keyspace",
    "PartitionedStore",
    "ReadCounter",
    "ReadOnlyStoreError",
    "RecordKeeper",
    "RedisStore",
    "Scrubbable",
    "Store",
    "TreeReader",
]
