"""replication-engine: keeps a mesh of Redis-backed store nodes in sync.

Hot path: tail each peer's CDC stream. Cold path: compare Merkle trees and repair what differs.
"""

from replication_engine.clock import HLC
from replication_engine.codec import Change, CodecError
from replication_engine.config import ConfigError, EngineConfig, load_config
from replication_engine.cursor import CursorError
from replication_engine.engine import EngineError, ReplicationEngine
from replication_engine.errors import ReplicationError
from replication_engine.merkle import FormatError, Geometry, GeometryError
from replication_engine.migrate import MigrationError
from replication_engine.peer import PeerIdentityError, PeerLayoutError, PeerUnavailable
from replication_engine.store import (
    ApplyStatus,
    Item,
    PartitionedStore,
    ReadOnlyStoreError,
    RedisStore,
)
from replication_engine.store.redis_store import (
    InvalidWriteError,
    NotReplicatedError,
    StoreAccessError,
    StoreError,
    StoreKeyError,
    StoreOwnershipError,
    StoreUnavailableError,
)

__all__ = [
    "HLC",
    "ApplyStatus",
    "Change",
    "CodecError",
    "ConfigError",
    "CursorError",
    "EngineConfig",
    "EngineError",
    "FormatError",
    "Geometry",
    "GeometryError",
    "InvalidWriteError",
    "Item",
    "MigrationError",
    "NotReplicatedError",
    "PartitionedStore",
    "PeerIdentityError",
    "PeerLayoutError",
    "PeerUnavailable",
    "ReadOnlyStoreError",
    "RedisStore",
    "ReplicationEngine",
    "ReplicationError",
    "StoreAccessError",
    "StoreError",
    "StoreKeyError",
    "StoreOwnershipError",
    "StoreUnavailableError",
    "load_config",
]
__version__ = "0.1.0"
