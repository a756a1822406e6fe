"""A node's store of many partitions: one Redis Cluster slot each, so it can spread over shards.

Each partition is a whole format-2 store of its own (docs/FORMAT.md, "Partitions"): its items,
its Merkle subtree, its stream, its clock and its record, all under its hash tag. That is what
lets every write stay atomic on a cluster (a script touches one slot) and what makes a
partition the unit of everything the engine knows: claims and anchors are written in the same
step as the data they describe, so they must live in the same slot (docs/DELETES.md). A
``RedisStore`` is one partition; this class is the local API over all of them, routing each
key to the partition the store's functions place it in.

A store of one partition needs none of this: ``RedisStore.connect`` opens it whole.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from replication_engine.clock import HLC
from replication_engine.codec import Change
from replication_engine.connection import TlsOptions
from replication_engine.merkle import Geometry
from replication_engine.store.protocol import Item
from replication_engine.store.redis_store import RedisStore, _as_store_errors, store_client


class PartitionedStore:
    """The partitions of one node's store, sharing one client and one clock."""

    def __init__(self, partitions: Mapping[str, RedisStore]) -> None:
        if not partitions:
            raise ValueError("a store has at least one partition")
        self.partitions = dict(partitions)
        first = self._first = next(iter(self.partitions.values()))
        self.redis = first.redis
        self.node_id = first.node_id
        self.geometry = first.geometry
        self.clock = first.clock
        if sorted(self.partitions) != self.geometry.partition_names:
            raise ValueError(
                f"a store of {self.geometry.partitions} partitions needs every one of them, "
                f"got {sorted(self.partitions)[:4]}..."
            )

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        node_id: str,
        prefix: str = "",
        fanout: int = 256,
        depth: int = 2,
        partitions: int = 1,
        username: str | None = None,
        password: str | None = None,
        tls: TlsOptions | None = None,
        cluster: bool = False,
        cluster_addresses: Mapping[str, str] | None = None,
        hlc: HLC | None = None,
        **options: Any,
    ) -> PartitionedStore:
        """Open (or on first use lay out) every partition; options as for
        ``RedisStore.connect``. The layout, including the number of partitions, is fixed when
        the store is first opened: a store opened with another refuses, naming both."""
        with _as_store_errors(node_id):
            geometry = Geometry(fanout, depth, partitions)
            redis = store_client(
                url,
                node_id=node_id,
                username=username,
                password=password,
                tls=tls,
                cluster=cluster,
                cluster_addresses=cluster_addresses,
            )
            shared = hlc or HLC()
            parts = {
                name: RedisStore(
                    redis,
                    node_id=node_id,
                    prefix=prefix,
                    partition=name,
                    geometry=geometry,
                    hlc=shared,
                    **options,
                )
                for name in geometry.partition_names
            }
            try:
                first, *rest = parts.values()
                # The first records the layout (or refuses a store laid out otherwise) and
                # loads the library (on every master of a cluster) before the rest open.
                loaded = await first.prepare()
                await asyncio.gather(*(part.prepare(loaded) for part in rest))
            except BaseException:
                await redis.aclose()
                raise
            return cls(parts)

    def part_of(self, key: str) -> RedisStore:
        """The partition ``key`` lives in. A key no store could hold (not UTF-8) goes to the
        first, whose checks refuse it as one partition's would."""
        try:
            return self.partitions[self.geometry.partition_of(key)]
        except UnicodeEncodeError:
            return self._first

    async def close(self) -> None:
        for store in self.partitions.values():
            store.close_wire()
        await self.redis.aclose()

    # ------------------------------------------------------------------------ writes

    async def put(
        self,
        key: str,
        value: bytes | str,
        content_type: str = "binary",
        *,
        replicas: int = 0,
        replica_timeout_sec: float = 1.0,
    ) -> int:
        """As ``RedisStore.put``, in the key's partition."""
        return await self.part_of(key).put(
            key, value, content_type, replicas=replicas, replica_timeout_sec=replica_timeout_sec
        )

    async def put_many(
        self,
        writes: Sequence[tuple[str, bytes | str, str]],
        *,
        replicas: int = 0,
        replica_timeout_sec: float = 1.0,
    ) -> list[int]:
        """As ``RedisStore.put_many``; the HLCs in the order of ``writes``.

        The writes are split by partition and each partition's share is written at the same
        time as the others' (on a cluster, by different shards). Each share is all-or-nothing
        per call, as in one partition; when one fails the others may have been written, and the
        first failure is raised once every share has finished.
        """
        # Checked whole before any partition is written (the checks are the same everywhere).
        self._first.check_writes(writes)
        positions: dict[str, list[int]] = {}
        shares: dict[str, list[tuple[str, bytes | str, str]]] = {}
        for at, write in enumerate(writes):
            name = self.geometry.partition_of(write[0])
            positions.setdefault(name, []).append(at)
            shares.setdefault(name, []).append(write)
        names = list(shares)
        results = await asyncio.gather(
            *(
                self.partitions[name].put_many(
                    shares[name], replicas=replicas, replica_timeout_sec=replica_timeout_sec
                )
                for name in names
            ),
            return_exceptions=True,
        )
        hlcs = [0] * len(writes)
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            for at, hlc in zip(positions[name], result, strict=True):
                hlcs[at] = hlc
        return hlcs

    async def delete(self, key: str, *, replicas: int = 0, replica_timeout_sec: float = 1.0) -> int:
        """As ``RedisStore.delete``, in the key's partition."""
        return await self.part_of(key).delete(
            key, replicas=replicas, replica_timeout_sec=replica_timeout_sec
        )

    # ------------------------------------------------------------------------ reads

    async def get(self, key: str) -> Item | None:
        return await self.part_of(key).get(key)

    async def get_version(self, key: str) -> Change | None:
        return await self.part_of(key).get_version(key)

    async def merkle_root(self) -> bytes:
        """The node's root: the XOR of its partitions' roots, which is the root one partition
        holding the same versions would have."""
        roots = await asyncio.gather(*(part.merkle_root() for part in self.partitions.values()))
        acc = 0
        for root in roots:
            acc ^= int.from_bytes(root, "big")
        return acc.to_bytes(len(roots[0]), "big")

    async def versions(self, *, include_tombstones: bool = True) -> AsyncIterator[Change]:
        for part in self.partitions.values():
            async for change in part.versions(include_tombstones=include_tombstones):
                yield change

    async def items(self) -> AsyncIterator[Item]:
        for part in self.partitions.values():
            async for item in part.items():
                yield item
