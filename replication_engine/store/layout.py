"""Where everything lives in Redis, for a given key prefix.

One place computes key names, so the local store, the peer reader and the docs cannot drift.
``docs/FORMAT.md`` documents each key.

Format 2 keeps a store's data in partitions. Every key a partition holds starts with the prefix
and the partition's hash tag (``P{0}``), so one script call touches one Redis Cluster slot; only
``Pmeta``, which says how the store is laid out, is outside every partition. A store has one
partition, ``{0}``, or one per child of the tree's root (``merkle.Geometry.partitions``); a
``Keyspace`` names the keys of one of them.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass


def text(raw: object) -> str:
    """Text of a Redis reply (bytes, since every client here has ``decode_responses=False``)."""
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


_HEX = frozenset("0123456789abcdef")


def glob_escape(literal: str) -> str:
    """``literal`` as a SCAN ``MATCH`` pattern that matches only itself."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in literal)


@dataclass(frozen=True, slots=True)
class Keyspace:
    prefix: str = ""
    partition: str = "0"

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            # Redis Cluster hashes a key by its first {...}: a brace in the prefix would take
            # the place of the partition's tag.
            raise ValueError(f"key prefix {self.prefix!r} must not contain '{{' or '}}'")
        if not self.partition or set(self.partition) - _HEX:
            raise ValueError(f"partition {self.partition!r} is not a partition's name (hex)")

    def of(self, partition: str) -> Keyspace:
        """The same store's keys in another partition."""
        return Keyspace(self.prefix, partition)

    @property
    def part(self) -> str:
        """What every key of the partition starts with: the prefix and the hash tag."""
        return f"{self.prefix}{{{self.partition}}}"

    @property
    def meta(self) -> str:
        """How the store is laid out (format, geometry, partitions): the one key outside
        every partition, read first by anyone opening the store."""
        return f"{self.prefix}meta"

    @property
    def part_meta(self) -> str:
        """The partition's copy of the layout, with the node id and stream bound: what the
        store's functions read, in their own slot, to place and stamp a write."""
        return f"{self.part}meta"

    @property
    def cdc(self) -> str:
        return f"{self.part}cdc"

    @property
    def hlc(self) -> str:
        return f"{self.part}hlc"

    @property
    def root(self) -> str:
        return f"{self.part}mk:root"

    @property
    def tombs(self) -> str:
        return f"{self.part}tombs"

    @property
    def record(self) -> str:
        """This store's record: its claims, anchors, membership and state (docs/DELETES.md)."""
        return f"{self.part}node"

    def item(self, key: str) -> str:
        return f"{self.part}item:{key}"

    @property
    def item_pattern(self) -> str:
        """A SCAN ``MATCH`` pattern for every item key of the partition, and nothing else."""
        return f"{glob_escape(self.item(''))}*"

    def node(self, path: str) -> str:
        """A tree node's children map (interior) or key->digest map (leaf bucket)."""
        return f"{self.part}mk:{path}"


# Redis's TYPE of every key the format defines (docs/FORMAT.md, "Keys"), after the partition's
# prefix ("P{0}"); the store's "Pmeta" is checked by name.
_FIXED_TYPES = {"cdc": "stream", "meta": "hash", "hlc": "string", "mk:root": "string"}
_FIXED_TYPES |= {"tombs": "zset", "node": "hash"}


def key_problem(
    keys: Keyspace,
    width: int,
    depth: int,
    name: str,
    kind: str,
    partitions: Collection[str] = ("0",),
) -> str | None:
    """Why a key under the prefix does not belong there, or None when it does.

    ``width`` and ``depth`` are the tree's hex characters per level and its levels: a tree node
    is ``mk:`` and a path of whole levels; ``partitions`` names the store's partitions (any of
    them may share this Redis). With an empty prefix the keyspace is shared with whatever else
    the Redis holds, so only names the format defines are checked (their type); with a prefix,
    every other name under it is stray.
    """
    if not name.startswith(keys.prefix):
        return None
    if name == keys.meta:
        return None if kind == "hash" else f"wrong type: {kind}, the format has a hash"
    tag, brace, rest = name[len(keys.prefix) :].partition("}")
    if not brace or tag[:1] != "{" or tag[1:] not in partitions:
        return "not a key of the format" if keys.prefix else None
    expected = _FIXED_TYPES.get(rest)
    if expected is None and rest.startswith("item:"):
        expected = "hash"
    elif expected is None and rest.startswith("mk:"):
        path = rest[3:]
        if len(path) % width == 0 and len(path) // width <= depth and set(path) <= _HEX:
            expected = "hash"
    if expected is None:
        return "not a key of the format" if keys.prefix else None
    if kind != expected:
        return f"wrong type: {kind}, the format has a {expected}"
    return None
