"""Where everything lives in Redis, for a given key prefix.

One place computes key names, so the local store, the peer reader and the docs cannot drift.
``docs/FORMAT.md`` documents each key.
"""

from __future__ import annotations

from dataclasses import dataclass


def text(raw: object) -> str:
    """Text of a Redis reply (bytes, since every client here has ``decode_responses=False``)."""
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


@dataclass(frozen=True, slots=True)
class Keyspace:
    prefix: str = ""

    @property
    def cdc(self) -> str:
        return f"{self.prefix}cdc"

    @property
    def meta(self) -> str:
        return f"{self.prefix}meta"

    @property
    def hlc(self) -> str:
        return f"{self.prefix}hlc"

    @property
    def root(self) -> str:
        return f"{self.prefix}mk:root"

    @property
    def tombs(self) -> str:
        return f"{self.prefix}tombs"

    @property
    def record(self) -> str:
        """This store's record: its claims, anchors, membership and state (docs/DELETES.md)."""
        return f"{self.prefix}node"

    def item(self, key: str) -> str:
        return f"{self.prefix}item:{key}"

    def node(self, path: str) -> str:
        """A tree node's children map (interior) or key->digest map (leaf bucket)."""
        return f"{self.prefix}mk:{path}"


# Redis's TYPE of every key the format defines (docs/FORMAT.md, "Keys").
_FIXED_TYPES = {"cdc": "stream", "meta": "hash", "hlc": "string", "mk:root": "string"}
_FIXED_TYPES |= {"tombs": "zset", "node": "hash"}
_HEX = frozenset("0123456789abcdef")


def key_problem(keys: Keyspace, width: int, depth: int, name: str, kind: str) -> str | None:
    """Why a key under the prefix does not belong there, or None when it does.

    ``width`` and ``depth`` are the tree's hex characters per level and its levels: a tree node
    is ``mk:`` and a path of whole levels. With an empty prefix the keyspace is shared with
    whatever else the Redis holds, so only names the format defines are checked (their type);
    with a prefix, every other name under it is stray.
    """
    if not name.startswith(keys.prefix):
        return None
    rest = name[len(keys.prefix) :]
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
