"""Merkle tree geometry, digests and diff planning (pure, no I/O).

The tree is balanced and hash-partitioned: a key's leaf bucket comes from a hash of the key, not
its name, so drill-down cost does not depend on how keys are named. Interior values are the XOR
of their children, so a write changes ``depth + 1`` nodes in constant time each and the order of
writes never matters.

Node names are hex paths: each level contributes a fixed number of hex characters (the child
index), the root is the empty path, a leaf bucket is a path of ``depth`` segments. The Lua write
path and this module must agree byte for byte; ``docs/FORMAT.md`` pins both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import xxhash

from replication_engine.errors import ReplicationError

DIGEST_BYTES = 16
DIGEST_HEX = DIGEST_BYTES * 2
ZERO_HEX = "0" * DIGEST_HEX
ZERO = bytes(DIGEST_BYTES)
LEAF_HASH = "sha1-128/v1"
BUCKET_HASH = "xxh3-64"


class GeometryError(ReplicationError, ValueError):
    """Two nodes (or a store and its config) disagree on the tree's shape."""


@dataclass(frozen=True, slots=True)
class Geometry:
    fanout: int = 256
    depth: int = 2

    def __post_init__(self) -> None:
        problems = Geometry.problems(self.fanout, self.depth)
        if problems:
            raise GeometryError(
                "; ".join(
                    f"{name} {expected}, got {getattr(self, name)}" for name, expected in problems
                )
            )

    @staticmethod
    def problems(fanout: int, depth: int) -> list[tuple[str, str]]:
        """``(field, what was expected)`` for each rule a shape breaks: the one statement of
        the rules, which the config's messages use too."""
        found = []
        if fanout < 2 or fanout > 65536 or fanout & (fanout - 1):
            found.append(("fanout", "expected a power of two in 2..65536"))
        if not 1 <= depth <= 4:
            found.append(("depth", "expected 1..4"))
        bits = fanout.bit_length() - 1
        if not found and depth * bits > 32:
            found.append(
                (
                    "depth",
                    f"must satisfy depth * log2(fanout) <= 32 "
                    f"(fanout {fanout} allows depth <= {32 // bits})",
                )
            )
        return found

    @property
    def bits_per_level(self) -> int:
        return self.fanout.bit_length() - 1

    @property
    def width(self) -> int:
        """Hex characters per level."""
        return (self.bits_per_level + 3) // 4

    @property
    def leaf_count(self) -> int:
        return int(self.fanout**self.depth)

    def describe(self) -> str:
        return f"fanout={self.fanout} depth={self.depth} leaf={LEAF_HASH} bucket={BUCKET_HASH}"

    def as_fields(self) -> dict[str, str]:
        return {
            "fanout": str(self.fanout),
            "depth": str(self.depth),
            "leaf_hash": LEAF_HASH,
            "bucket_hash": BUCKET_HASH,
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Geometry:
        try:
            geometry = cls(int(fields["fanout"]), int(fields["depth"]))
        except (KeyError, ValueError) as exc:
            raise GeometryError(f"stored geometry is unreadable: {dict(fields)!r}") from exc
        if (
            fields.get("leaf_hash", LEAF_HASH) != LEAF_HASH
            or fields.get("bucket_hash", BUCKET_HASH) != BUCKET_HASH
        ):
            raise GeometryError(f"stored geometry uses other hashes: {dict(fields)!r}")
        return geometry

    def bucket(self, key: str) -> int:
        bits = self.depth * self.bits_per_level
        return xxhash.xxh3_64_intdigest(key.encode("utf-8")) >> (64 - bits)

    def segments(self, bucket: int) -> list[str]:
        """Child index at each level, root first, as fixed-width hex."""
        mask = self.fanout - 1
        out = []
        for level in range(self.depth):
            shift = (self.depth - 1 - level) * self.bits_per_level
            out.append(f"{(bucket >> shift) & mask:0{self.width}x}")
        return out

    def leaf_path(self, key: str) -> str:
        bucket = self.bucket(key)
        if self.bits_per_level % 4 == 0:  # whole hex digits per level: the bucket in hex
            return f"{bucket:0{self.depth * self.width}x}"
        return "".join(self.segments(bucket))

    def is_leaf(self, path: str) -> bool:
        return len(path) == self.depth * self.width

    def all_children(self) -> list[str]:
        return [f"{i:0{self.width}x}" for i in range(self.fanout)]


def leaf_digest(key: str, hlc: int, content_hash: str, tombstone: bool) -> str:
    """128-bit digest of one key's version; key is length-prefixed so no two inputs collide."""
    raw = key.encode("utf-8")
    text = b"%d:%s|%016x|%d|%s" % (len(raw), raw, hlc, 1 if tombstone else 0, content_hash.encode())
    return hashlib.sha1(text).hexdigest()[:DIGEST_HEX]


def xor_hex(a: str, b: str) -> str:
    return f"{int(a, 16) ^ int(b, 16):0{DIGEST_HEX}x}"


def combine(digests: Iterable[str]) -> str:
    acc = 0
    for digest in digests:
        acc ^= int(digest, 16)
    return f"{acc:0{DIGEST_HEX}x}"


def diff_children(local: Mapping[str, str], remote: Mapping[str, str]) -> list[str]:
    """Children whose digests differ, including those present on one side only.

    Missing children count as the zero digest, which is what an empty subtree XORs to; a child
    explicitly stored as zero therefore equals a missing one.
    """
    out = []
    for child in sorted(set(local) | set(remote)):
        if local.get(child, ZERO_HEX) != remote.get(child, ZERO_HEX):
            out.append(child)
    return out


def diff_leaf(local: Mapping[str, str], remote: Mapping[str, str]) -> list[str]:
    """Keys to fetch from the peer: those it has with a digest we do not.

    Keys only we hold are not listed: absence on a peer never means "delete here"; the peer pulls
    them from us on its own cycle.
    """
    return sorted(key for key, digest in remote.items() if local.get(key) != digest)


class MerkleModel:
    """In-memory reference tree: the specification the Redis scripts are tested against."""

    def __init__(self, geometry: Geometry | None = None) -> None:
        self.geometry = geometry or Geometry()
        self.leaves: dict[str, dict[str, str]] = {}
        self.nodes: dict[str, dict[str, str]] = {}
        self.root = ZERO_HEX

    def set(self, key: str, digest: str | None) -> None:
        """Set (or with ``None`` remove) a key's leaf digest, updating every ancestor by XOR."""
        segments = self.geometry.segments(self.geometry.bucket(key))
        leaf = "".join(segments)
        bucket = self.leaves.setdefault(leaf, {})
        old = bucket.get(key, ZERO_HEX)
        new = digest or ZERO_HEX
        if digest is None:
            bucket.pop(key, None)
            if not bucket:
                del self.leaves[leaf]
        else:
            bucket[key] = digest
        delta = xor_hex(old, new)
        if delta == ZERO_HEX:
            return
        for level in range(len(segments), 0, -1):
            parent = "".join(segments[: level - 1])
            child = segments[level - 1]
            children = self.nodes.setdefault(parent, {})
            value = xor_hex(children.get(child, ZERO_HEX), delta)
            if value == ZERO_HEX:
                children.pop(child, None)
                if not children:
                    del self.nodes[parent]
            else:
                children[child] = value
        self.root = xor_hex(self.root, delta)

    @classmethod
    def build(cls, digests: Mapping[str, str], geometry: Geometry | None = None) -> MerkleModel:
        """From-scratch construction, bottom-up, independent of :meth:`set`."""
        model = cls(geometry)
        g = model.geometry
        for key, digest in digests.items():
            model.leaves.setdefault(g.leaf_path(key), {})[key] = digest
        level_values = {path: combine(keys.values()) for path, keys in model.leaves.items()}
        for _ in range(g.depth):
            parents: dict[str, dict[str, str]] = {}
            for path, value in level_values.items():
                if value != ZERO_HEX:
                    parents.setdefault(path[: -g.width], {})[path[-g.width :]] = value
            model.nodes.update(parents)
            level_values = {path: combine(ch.values()) for path, ch in parents.items()}
        model.root = level_values.get("", ZERO_HEX)
        return model
