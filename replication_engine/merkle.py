"""Merkle tree geometry, digests and diff planning (pure, no I/O).

The tree is balanced and hash-partitioned: a key's leaf bucket comes from a hash of the key, not
its name, so drill-down cost does not depend on how keys are named. Interior values are the XOR
of their children, so a write changes ``depth + 1`` nodes in constant time each and the order of
writes never matters.

Node names are hex paths: each level contributes a fixed number of hex characters (the child
index), the root is the empty path, a leaf bucket is a path of ``depth`` segments. The Lua write
path and this module must agree byte for byte; ``docs/FORMAT.md`` pins both.

Diff planning is :class:`DrillPlan`: every walk down trees (the cold path's drill, ``verify``'s
diff, a store listing the keys under a node) asks it which nodes to read next and what a
comparison found; the walkers only read.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from replication_engine.errors import ReplicationError

DIGEST_BYTES = 16
DIGEST_HEX = DIGEST_BYTES * 2
ZERO_HEX = "0" * DIGEST_HEX
ZERO = bytes(DIGEST_BYTES)
LEAF_HASH = "sha1-128/v1"
# The leaf bucket of a key: the top bits of SHA-1 of its UTF-8 bytes. SHA-1 because Lua inside
# Redis computes it natively (``redis.sha1hex``), so the write path decides placement itself and
# no client, in any language, can put an item in the wrong bucket (format 1 used xxh3-64, which
# only clients could compute, and trusted them).
BUCKET_HASH = "sha1-32"
# The store layout (docs/FORMAT.md). Format 1 stores are converted by ``replication-engine
# migrate``; nothing else reads them.
FORMAT = 2
# Partitions are the unit a Redis Cluster places on a shard. Each is read, certified and
# collected on its own, which costs an idle node about 0.35% of a core per partition at the
# default intervals (README, "Known limitations"): 256 saturate a core doing nothing.
MAX_PARTITIONS = 64


class GeometryError(ReplicationError, ValueError):
    """Two nodes (or a store and its config) disagree on the tree's shape."""


class FormatError(GeometryError):
    """A store laid out in another format than this engine's (docs/FORMAT.md, "Format 1")."""

    def __init__(self, found: str, *, at: str | None = None) -> None:
        self.found = found
        if found == "1":
            why = (
                "is in format 1, which this version no longer opens; convert it in place with "
                "`replication-engine migrate --config FILE` (docs/FORMAT.md, 'Migrating')"
            )
        elif found == "migrating":
            why = (
                "is part way through a migration to format 2; finish it with "
                "`replication-engine migrate --config FILE`"
            )
        else:
            why = f"is in format {found}, newer than this version's format {FORMAT}; upgrade"
        where = "" if at is None else f" at prefix {at!r}"
        super().__init__(f"store{where} {why}")


@dataclass(frozen=True, slots=True)
class Geometry:
    """The shape of a store: its Merkle tree, and how many partitions hold its keys.

    ``partitions`` is 1 (every key in partition ``0``) or ``fanout``: then a key's partition is
    the first level of its leaf path, so each partition holds one subtree of the root map and a
    partition's root is the root map's field for it (docs/FORMAT.md, "Partitions").
    """

    fanout: int = 256
    depth: int = 2
    partitions: int = 1

    def __post_init__(self) -> None:
        problems = Geometry.problems(self.fanout, self.depth, self.partitions)
        if problems:
            raise GeometryError(
                "; ".join(
                    f"{name} {expected}, got {getattr(self, name)}" for name, expected in problems
                )
            )

    @staticmethod
    def problems(fanout: int, depth: int, partitions: int = 1) -> list[tuple[str, str]]:
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
        if partitions != 1 and (partitions != fanout or fanout > MAX_PARTITIONS):
            found.append(
                (
                    "partitions",
                    f"expected 1 or the fanout ({fanout}), at most {MAX_PARTITIONS}: a key's "
                    f"partition is the first level of its leaf path",
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

    @property
    def partition_names(self) -> list[str]:
        """Each partition's name, which is its hash tag (``{<name>}``) in every key it holds."""
        return self.all_children() if self.partitions > 1 else ["0"]

    def partition_of(self, key: str) -> str:
        """The partition ``key`` belongs in: what the store's functions place it by."""
        if self.partitions == 1:
            return "0"
        return self.leaf_path(key)[: self.width]

    def describe(self) -> str:
        # Partitions named even when 1: a refusal between 16 and 1 must name both sides.
        return (
            f"format={FORMAT} fanout={self.fanout} depth={self.depth} "
            f"partitions={self.partitions} leaf={LEAF_HASH} bucket={BUCKET_HASH}"
        )

    def as_fields(self) -> dict[str, str]:
        return {
            "format": str(FORMAT),
            "fanout": str(self.fanout),
            "depth": str(self.depth),
            "leaf_hash": LEAF_HASH,
            "bucket_hash": BUCKET_HASH,
            "partitions": str(self.partitions),
        }

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Geometry:
        """The geometry a store recorded; a store of another format is refused by name."""
        found = "migrating" if "migrating" in fields else fields.get("format", "1")
        if found != str(FORMAT):
            raise FormatError(found)
        try:
            geometry = cls(
                int(fields["fanout"]), int(fields["depth"]), int(fields.get("partitions", ""))
            )
        except (KeyError, ValueError) as exc:
            raise GeometryError(f"stored geometry is unreadable: {dict(fields)!r}") from exc
        if fields.get("leaf_hash") != LEAF_HASH or fields.get("bucket_hash") != BUCKET_HASH:
            raise GeometryError(f"stored geometry uses other hashes: {dict(fields)!r}")
        return geometry

    def bucket(self, key: str) -> int:
        bits = self.depth * self.bits_per_level
        top = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:4], "big")
        return top >> (32 - bits)

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
    return _leaf_bytes(key, hlc, content_hash, tombstone).hex()


def leaf_digest_words(
    key: str, hlc: int, content_hash: str, tombstone: bool
) -> tuple[str, int, int, int, int]:
    """:func:`leaf_digest` and the same 128 bits as four big-endian 32-bit words, the form in
    which the store's scripts XOR digests into the tree (the apply path sends both)."""
    raw = _leaf_bytes(key, hlc, content_hash, tombstone)
    return (raw.hex(), *_WORDS.unpack(raw))


_WORDS = struct.Struct(">IIII")


def _leaf_bytes(key: str, hlc: int, content_hash: str, tombstone: bool) -> bytes:
    raw = key.encode("utf-8")
    text = b"%d:%s|%016x|%d|%s" % (len(raw), raw, hlc, 1 if tombstone else 0, content_hash.encode())
    return hashlib.sha1(text).digest()[:DIGEST_BYTES]


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


class Branch(NamedTuple):
    """A tree node waiting to be compared.

    ``empty_here`` is set when this side's parent lacks the child: the subtree is empty here,
    so a reader can skip reading it here (half the reads of a copy into an empty store).
    """

    path: str
    empty_here: bool = False


@dataclass(frozen=True, slots=True)
class LeafDiff:
    """How one leaf bucket differs between this side ("here") and the other ("there").

    ``fetch`` is :func:`diff_leaf`'s answer, split into ``only_there`` and ``different`` for a
    report; ``only_here`` keeps the order this side listed its keys in.
    """

    path: str
    fetch: list[str]
    only_here: list[str]
    only_there: list[str]
    different: list[str]


def compare_leaf(path: str, here: Mapping[str, str], there: Mapping[str, str]) -> LeafDiff:
    fetch = diff_leaf(here, there)
    return LeafDiff(
        path,
        fetch,
        only_here=[key for key in here if key not in there],
        only_there=[key for key in fetch if key not in here],
        different=[key for key in fetch if key in here],
    )


@dataclass(frozen=True, slots=True)
class Step:
    """What comparing one chunk found: its leaf buckets (none for an interior chunk), the keys
    to fetch from them within the plan's limit, and the keys only this side holds.

    ``cut`` is set when the limit left some of the keys to fetch out of ``fetch``.
    """

    leaves: list[LeafDiff]
    fetch: list[str]
    only_here: list[str]
    cut: bool = False


class DrillPlan:
    """Where a walk down two trees goes next: the pure half of every tree walk.

    The cold path's drill, ``verify``'s diff and a store listing the keys under a node (a walk
    compared with an empty tree) all descend the same way: compare a chunk of nodes on both
    sides, queue the children whose digests differ, and at the leaf level list the keys that
    differ. This class holds that decision and the queue; the walkers do the reads, with
    whatever concurrency and read skipping suits them, and hand each chunk's maps back to
    :meth:`compared`.

    Args:
        geometry: the shape both trees share.
        starts: the nodes to begin at (the root by default); each is compared, not assumed
            to differ.
        chunk_paths: nodes per chunk (at least 1), which a walker reads in one round trip.
        limit: stop handing out chunks once this many keys to fetch were found; the keys of
            the chunk that crosses it are cut to fit.
        deepest_first: hand out the deepest queued level first, so leaf keys (and their
            fetches) start early and the queue stays small; otherwise level by level, each
            level read completely before the next.
    """

    def __init__(
        self,
        geometry: Geometry,
        starts: Iterable[str] = ("",),
        *,
        chunk_paths: int,
        limit: int | None = None,
        deepest_first: bool = True,
    ) -> None:
        self.geometry = geometry
        self.chunk_paths = chunk_paths
        self.limit = limit
        self.found = 0
        self.cut = False
        self._in_flight = 0
        self._queues: list[deque[Branch]] = [deque() for _ in range(geometry.depth + 1)]
        for path in starts:
            self._queues[len(path) // geometry.width].append(Branch(path))
        depth = geometry.depth
        self._order = range(depth, -1, -1) if deepest_first else range(depth + 1)

    @property
    def is_limit_reached(self) -> bool:
        return self.limit is not None and self.found >= self.limit

    @property
    def is_unfinished(self) -> bool:
        """Whether the walk left something unvisited: keys cut by the limit, chunks handed out
        and never compared, or nodes still queued."""
        return self.cut or self._in_flight > 0 or any(self._queues)

    def next_chunk(self) -> list[Branch] | None:
        """The next nodes to compare (all on one level), or None when nothing is queued or the
        limit is reached. Nodes handed out count as unfinished until :meth:`compared`."""
        if self.is_limit_reached:
            return None
        queue = next((self._queues[level] for level in self._order if self._queues[level]), None)
        if queue is None:
            return None
        self._in_flight += 1
        return [queue.popleft() for _ in range(min(self.chunk_paths, len(queue)))]

    def compared(
        self,
        chunk: Sequence[Branch],
        here: Sequence[Mapping[str, str]],
        there: Sequence[Mapping[str, str]] | None = None,
    ) -> Step:
        """Take the maps read for ``chunk`` (children maps, or key to digest maps at the leaf
        level), one per node on each side; ``there`` None compares with an empty tree."""
        self._in_flight -= 1
        others: Sequence[Mapping[str, str]] = there if there is not None else [{}] * len(chunk)
        level = len(chunk[0].path) // self.geometry.width
        if level < self.geometry.depth:
            below = self._queues[level + 1]
            for branch, mine, theirs in zip(chunk, here, others, strict=True):
                below.extend(
                    Branch(branch.path + child, branch.empty_here or child not in mine)
                    for child in diff_children(mine, theirs)
                )
            return Step([], [], [])
        leaves = [
            compare_leaf(branch.path, mine, theirs)
            for branch, mine, theirs in zip(chunk, here, others, strict=True)
        ]
        fetch = [key for leaf in leaves for key in leaf.fetch]
        cut = False
        if self.limit is not None and self.found + len(fetch) > self.limit:
            fetch = fetch[: self.limit - self.found]
            self.cut = cut = True
        self.found += len(fetch)
        return Step(leaves, fetch, [key for leaf in leaves for key in leaf.only_here], cut)


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

    def node(self, path: str) -> dict[str, str]:
        """What a store's ``TreeReader.nodes`` reads at ``path``: the children's digests, or at
        a leaf bucket each key's digest ({} where nothing is stored)."""
        held = self.leaves if self.geometry.is_leaf(path) else self.nodes
        return held.get(path, {})

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
