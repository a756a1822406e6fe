"""A store laid out as format 1 (the layout before partitions), for the migration's tests.

Format 1 and format 2 hold the same data: keys under the prefix without a partition's hash tag
(``Pitem:k`` rather than ``P{0}item:k``), a tree whose buckets come from xxh3-64 of the key,
and a ``Pmeta`` without ``format``. :func:`to_format1` turns a live format-2 store back into
exactly that, so a test migrates a store with real claims, anchors and stream history rather
than one made up by hand.
"""

from __future__ import annotations

from collections import defaultdict

import xxhash
from redis.asyncio import Redis

from replication_engine.merkle import LEAF_HASH, Geometry, combine
from replication_engine.store.layout import Keyspace, glob_escape, text

FORMAT1_BUCKET_HASH = "xxh3-64"


def format1_leaf_path(geometry: Geometry, key: str) -> str:
    bits = geometry.depth * geometry.bits_per_level
    return "".join(geometry.segments(xxhash.xxh3_64_intdigest(key.encode("utf-8")) >> (64 - bits)))


async def to_format1(redis: Redis, prefix: str, geometry: Geometry) -> None:
    """Rewrite the format-2 store at ``prefix`` in place as format 1 wrote it."""
    keys = Keyspace(prefix)
    for old, new in (("cdc", keys.cdc), ("hlc", keys.hlc), ("tombs", keys.tombs)):
        if await redis.exists(new):
            await redis.rename(new, prefix + old)
    if await redis.exists(keys.record):
        await redis.rename(keys.record, prefix + "node")
    leaves: dict[str, dict[str, str]] = defaultdict(dict)
    async for raw in redis.scan_iter(match=keys.item_pattern, count=1000):
        key = text(raw)[len(keys.part) + len("item:") :]
        digest = text(await redis.hget(raw, "g"))
        leaves[format1_leaf_path(geometry, key)][key] = digest
        await redis.rename(raw, f"{prefix}item:{key}")
    async for raw in redis.scan_iter(match=f"{glob_escape(keys.part)}mk:*", count=1000):
        await redis.unlink(raw)
    await redis.unlink(keys.part_meta)
    # The tree, level by level from the leaves up: each node maps a child to its digest.
    level: dict[str, str] = {}
    for path, content in leaves.items():
        await redis.hset(f"{prefix}mk:{path}", mapping=content)  # type: ignore[arg-type]
        level[path] = combine(content.values())
    width = geometry.width
    while level and len(next(iter(level))) > 0:
        parents: dict[str, dict[str, str]] = defaultdict(dict)
        for path, digest in level.items():
            parents[path[:-width]][path[-width:]] = digest
        level = {}
        for path, content in parents.items():
            await redis.hset(f"{prefix}mk:{path}", mapping=content)  # type: ignore[arg-type]
            level[path] = combine(content.values())
    root = level.get("", "0" * 32)
    await redis.set(f"{prefix}mk:root", root)
    await redis.delete(keys.meta)
    await redis.hset(
        keys.meta,
        mapping={
            "fanout": str(geometry.fanout),
            "depth": str(geometry.depth),
            "leaf_hash": LEAF_HASH,
            "bucket_hash": FORMAT1_BUCKET_HASH,
        },
    )
