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
