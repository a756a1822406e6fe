"""A whole mesh under deletes by knowledge, in memory: the specification the engine is held to.

docs/DELETES.md is the design, :mod:`replication_engine.knowledge` its rules and the Lua scripts
their atomic form. This model runs them for every node of a mesh at once, the way
:class:`replication_engine.merkle.MerkleModel` runs the tree: pure Python, no I/O, no asyncio.
Every decision goes through the same functions the engine uses (:func:`knowledge.decide`,
:meth:`NodeRecord.stream_claims` and ``all_claims``, :func:`stable_frontier`,
:func:`derive_members`, :func:`is_dead_by_absence`, :func:`merkle.leaf_digest`), or mirrors the
script line by line where the rule lives only in Lua (the anchor and claim logic of ``apply.lua``
and ``inherit.lua``, collection in ``gc.lua``, certification in ``certify.lua``). Each such
place names the script it mirrors.

What a node is, split the way a real one is split:

- its **Redis** (:class:`RedisState`): items, record (``Pnode``), CDC stream and store clock
  (``Phlc``). A backup copies it, a restore brings a copy back, a wipe empties it;
- its **engine** (:class:`Engine`): tailer cursors, the HLC it issues writes with, the
  certification memory (whether the store can still be trusted), the recovery it is in and the
  peers' records it last read. Restores and wipes do not touch it.

The model also keeps the ground truth the property test judges by: every acknowledged write,
and which of them an operator destroyed (restored, wiped or forgotten away while no other node
had them). A write's effect is *covered* by a node that holds it or a newer version of its key,
or holds nothing for the key while its claim about the write's origin covers the write (the
claim's own definition). Operator actions mark as lost what was covered before and is covered
nowhere after; nothing else may lose a write. A lost write may still come back (a later restore
of a backup that holds it), so a key may end as its surviving winner or as a lost write newer
than that (see :meth:`MeshModel.allowed`).

:class:`Rules` switches four rules between the code as it stands (the default) and the rule as
first coded, which the model found a counterexample to; tests/property/test_mesh_model.py keeps
each counterexample as a test that the old rule fails it and the current one does not.

Time is a logical wall clock in milliseconds that the test advances by hand. Stream positions
come from one counter shared by all nodes: like Redis's time-based ids, a position is never
reused, even by a stream restored from a backup.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from replication_engine import clock, codec
from replication_engine.knowledge import (
    RECOVERING,
    SERVING,
    Anchor,
    ApplyStatus,
    NodeRecord,
    decide,
    derive_members,
    frontier,
    is_dead_by_absence,
    order,
    sid_key,
    stable_frontier,
)
from replication_engine.merkle import MerkleModel, leaf_digest

__all__ = [
    "ALL",
    "Backup",
    "MeshModel",
    "ModelError",
    "Record",
    "Rules",
    "Source",
    "Version",
    "Write",
    "anchor_batch",
    "inherit_claims",
]

# A claim about a forgotten node once every peer was repaired from (Rules.forget_barrier).
END_OF_TIME = clock.MAX_HLC
# A read count no stream reaches: a tail that reads to the end in one batch.
ALL = 1 << 30
# Rounds quiesce() runs before it gives up: every round moves a claim or a version, and a
# handful of nodes with a handful of keys settles in a few.
MAX_QUIESCE_ROUNDS = 60


class ModelError(AssertionError):
    """The mesh did not settle, or an operation was asked of a node that cannot do it."""


class Version(NamedTuple):
    """One version of a key: the four fields the total order compares."""

    hlc: int
    origin: str
    tombstone: bool
    content_hash: str

    def digest(self, key: str) -> str:
        """The Merkle leaf digest, exactly what the cold path compares (it leaves out origin)."""
        return leaf_digest(key, self.hlc, self.content_hash, self.tombstone)

    def same_content(self, other: Version | None) -> bool:
        """Equal as the tree sees it: same HLC, tombstone flag and content."""
        return other is not None and (self.hlc, self.tombstone, self.content_hash) == (
            other.hlc,
            other.tombstone,
            other.content_hash,
        )

    def describe(self) -> str:
        ms, counter = clock.unpack(self.hlc)
        what = "DEL" if self.tombstone else f"PUT#{self.content_hash[:6]}"
        return f"{what}@{ms}.{counter}/{self.origin}"


def newer(a: Version, b: Version | None) -> bool:
    """True when ``a`` beats ``b`` in the total order (``common.lua``'s ``newer``)."""
    return b is None or order(*a) > order(*b)


class StreamEntry(NamedTuple):
    position: int
    key: str
    version: Version


@dataclass(slots=True)
class Stream:
    """A node's CDC stream: entries in position order, and what XINFO tells a reader."""

    entries: list[StreamEntry] = field(default_factory=list)
    last_generated: int = 0  # XINFO last-generated-id: survives trimming, not a wipe
    max_trimmed: int = 0  # the newest position ever trimmed away (0: never trimmed)

    def trimmed_past(self, cursor: int) -> bool:
        """A gap: an entry after ``cursor`` was trimmed before it was read. Exact, where
        ``StreamInfo.trimmed_past`` may over-report (over-reporting only costs a repair)."""
        return self.max_trimmed > cursor


@dataclass(slots=True)
class Record:
    """A store's ``Pnode`` hash. ``incarnation == ""`` is a hash without ``inc``: a wiped store
    whose engine has not reopened it yet, where apply.lua may already have written anchors and
    claims, and which peers read as no record at all."""

    node_id: str
    mode: str = "mesh"
    relay: bool = False
    incarnation: str = ""
    epoch: str = ""
    cert: int = 0
    self_claim: int = 0
    claims: dict[str, int] = field(default_factory=dict)
    anchors: dict[str, Anchor] = field(default_factory=dict)
    collected: int = 0
    members: set[str] = field(default_factory=set)
    forgotten: set[str] = field(default_factory=set)
    state: str = SERVING
    # Not in the real record (see Rules): the token the store's stream started under, and per
    # forgotten node the peers still owing this store a complete repair before it may claim
    # all of that node's writes (kept with the data it describes, like every claim).
    genesis: str = ""
    barrier: dict[str, set[str]] = field(default_factory=dict)

    @property
    def present(self) -> bool:
        return bool(self.incarnation)

    @property
    def token(self) -> str:
        return f"{self.incarnation}.{self.epoch}.{1 if self.relay else 0}"

    def claim(self, origin: str) -> int:
        """``claim_of`` in common.lua: ``self`` for this node's own writes, else ``c:<origin>``."""
        if origin == self.node_id:
            return self.self_claim
        return self.claims.get(origin, 0)

    def view(self) -> NodeRecord | None:
        """The record as ``NodeRecord.from_fields`` reads it (None without ``inc``)."""
        if not self.present:
            return None
        return NodeRecord(
            node_id=self.node_id,
            mode=self.mode,
            relay=self.relay,
            incarnation=self.incarnation,
            epoch=self.epoch,
            cert=self.cert,
            self_claim=self.self_claim,
            claims=dict(self.claims),
            anchors=dict(self.anchors),
            collected=self.collected,
            members=frozenset(self.members),
            forgotten=frozenset(self.forgotten),
            state=self.state,
        )


@dataclass(slots=True)
class RedisState:
    """Everything in one node's Redis: what a backup holds and a wipe empties."""

    store: dict[str, Version]
    record: Record
    stream: Stream
    phlc: int = 0

    @classmethod
    def empty(cls, node_id: str, mode: str, relay: bool) -> RedisState:
        return cls({}, Record(node_id, mode=mode, relay=relay), Stream())


@dataclass(slots=True)
class Engine:
    """What the engine process keeps outside Redis (the cursor database and its memory)."""

    relay: bool
    peers: set[str]
    cursors: dict[str, int | None]  # saved tailer cursor per peer; None: tailer not started
    start_from: dict[str, str]  # per peer: beginning, latest or snapshot
    hlc_last: int = 0  # the RedisStore's HLC: the newest it issued or observed
    floor: int = 0  # the HLC floor saved at every certification
    store_moved: bool = False  # the store went back since the last certification
    state: str = SERVING
    pending: set[str] = field(default_factory=set)  # peers still owing a complete repair
    records: dict[str, NodeRecord | None] = field(default_factory=dict)  # as last read
    members: frozenset[str] = frozenset()
    waited_for: frozenset[str] = frozenset()
    forgotten: frozenset[str] = frozenset()


@dataclass(slots=True)
class Node:
    node_id: str
    mode: str
    redis: RedisState
    engine: Engine


@dataclass(frozen=True, slots=True)
class Write:
    """An acknowledged local write."""

    wid: int
    node: str
    key: str
    version: Version


@dataclass(frozen=True, slots=True)
class Backup:
    node_id: str
    state: RedisState


@dataclass(frozen=True, slots=True)
class Source:
    """``StreamBatch``: where a tailer's batch came from and what it may claim."""

    peer: str
    token: str
    first: str
    last: str
    mode: str  # c, f or g (apply.lua)
    claims: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Rules:
    """Which form of four rules the model runs. The defaults are the code as it stands; each
    switch turned off brings back the rule as first coded, which the model found a
    counterexample to (test_mesh_model.py keeps each one as a test that the old rule fails).

    Attributes:
        fresh_anchor_needs_genesis: a read from the start of a stream anchors (mode ``f``) only
            while the stream is in the epoch its record was created in
            (``NodeRecord.holds_whole_stream``; the tailer reads on with mode ``c`` otherwise).
            Off: any never-trimmed stream's start anchors, though a stream restarted by a wipe,
            or carried on by a store that recovered or changed its relay setting, does not hold
            everything its record's claims cover (the writes a recovery fetched back, or that
            were applied while relay was off, were never emitted).
        forget_barrier: a store that learns of a forget claims every write of the forgotten
            node once it has had a complete repair from every peer, and the stable frontier
            waits for every member's claim about every forgotten node. Off: collection waits
            for the members' claims about the members' writes only, so a version a forgotten
            node wrote is protected by nothing: its tombstone can be collected while a member
            still holds an older value, and no claim covers that value for rule F or absence
            by knowledge.
        drop_written_off: a repair replaces a version held here that the peer's claim covers
            while the peer holds an older one (it was lost and written off by a recovery, and a
            restore brought it back), whatever this store's own claims say. Off: last-writer-
            wins only; nobody accepts the restored version again, and the mesh stays split.
        new_store_floor: a new store (no record, and nobody knows a write of it) raises its
            clock to every reachable peer's before it serves. Off: its first writes can be
            stamped below a tombstone the mesh collected before it joined, and then nothing
            orders them after the delete.
    """

    fresh_anchor_needs_genesis: bool = True
    forget_barrier: bool = True
    drop_written_off: bool = True
    new_store_floor: bool = True

    @classmethod
    def as_first_coded(cls) -> Rules:
        """Every rule as first coded, before the model's counterexamples."""
        return cls(
            fresh_anchor_needs_genesis=False,
            forget_barrier=False,
            drop_written_off=False,
            new_store_floor=False,
        )


def _sid(position: int) -> str:
    return sid_key(position, 0)


def _position(anchor: Anchor) -> int:
    return anchor.stream_id[0]


class MeshModel:
    """A mesh of nodes, the links between them, and every acknowledged write.

    Args:
        members: the initial nodes, a full mesh of mesh-mode members that start empty and serving
            (as after their first recovery), every tailer at the start of every stream.
        relay: whether each node re-emits what it applies (``hot_path.relay``).
        rules: see :class:`Rules`.
        start_ms: the logical wall clock at the start.
    """

    def __init__(
        self,
        members: Sequence[str],
        *,
        relay: bool = False,
        rules: Rules | None = None,
        start_ms: int = 1_000,
    ) -> None:
        if len(set(members)) != len(members) or not members:
            raise ValueError(f"members must be distinct and not empty: {members!r}")
        self.relay = relay
        self.rules = rules or Rules()
        self.wall_ms = start_ms
        self.nodes: dict[str, Node] = {}
        self.removed: set[str] = set()
        self.blocked: set[tuple[str, str]] = set()  # (reader, source): reader cannot read source
        self.writes: list[Write] = []
        self.lost: set[int] = set()  # wids destroyed by an operator action
        self.values: dict[str, bytes] = {}  # content hash -> value, for messages
        self._positions = 0
        self._tokens = 0
        for node_id in members:
            peers = [p for p in members if p != node_id]
            node = Node(
                node_id,
                "mesh",
                RedisState.empty(node_id, "mesh", relay),
                Engine(
                    relay=relay,
                    peers=set(peers),
                    cursors=dict.fromkeys(peers, 0),
                    start_from=dict.fromkeys(peers, "beginning"),
                ),
            )
            self._open_record(node)
            node.redis.record.state = SERVING
            node.redis.record.members = set(members)
            self.nodes[node_id] = node

    # ------------------------------------------------------------------------ clocks

    def wall_hlc(self) -> int:
        return clock.pack(self.wall_ms, 0)

    def advance(self, ms: int) -> None:
        if ms < 0:
            raise ValueError("the wall clock does not go back in this model")
        self.wall_ms += ms

    def live(self) -> list[str]:
        return sorted(self.nodes)

    # ------------------------------------------------------------------------ links

    def can_read(self, reader: str, source: str) -> bool:
        """Whether ``reader`` reaches ``source``'s Redis (a forgotten node is gone for good)."""
        return (
            reader in self.nodes and source in self.nodes and (reader, source) not in self.blocked
        )

    def cut(self, reader: str, source: str) -> None:
        """A one-direction partition: ``reader`` cannot read ``source``."""
        self.blocked.add((reader, source))

    def mend(self, reader: str, source: str) -> None:
        self.blocked.discard((reader, source))

    def heal(self) -> None:
        self.blocked.clear()

    def _reaches_peer(self, reader: str, source: str) -> bool:
        if reader == source or not self.can_read(reader, source):
            return False
        engine = self.nodes[reader].engine
        return source in engine.peers and source not in engine.forgotten

    # ------------------------------------------------------------------------ local writes

    def write(
        self, node_id: str, key: str, value: bytes | None, *, fresh_writer: bool = False
    ) -> Version | None:
        """A local put (``value``) or delete (None); returns the acknowledged version.

        The proposal comes from the writer's HLC (``RedisStore.clock``), which is the engine's
        and survives the store going back; ``fresh_writer`` models a writer process that just
        connected and proposes the bare wall clock. write.lua then stamps
        ``max(proposal, Phlc + 1)``. A follower refuses (None).
        """
        node = self.nodes[node_id]
        if node.mode != "mesh":
            return None
        redis, engine = node.redis, node.engine
        wall = self.wall_hlc()
        if fresh_writer:
            proposed = wall
        else:
            engine.hlc_last = wall if wall > engine.hlc_last else engine.hlc_last + 1
            proposed = engine.hlc_last
        hlc = proposed if proposed > redis.phlc else redis.phlc + 1
        redis.phlc = hlc
        if not fresh_writer:
            engine.hlc_last = max(engine.hlc_last, hlc)
        if value is None:
            version = Version(hlc, node_id, True, "")
        else:
            version = Version(hlc, node_id, False, codec.content_hash(value))
            self.values[version.content_hash] = value
        redis.store[key] = version
        self._emit(redis, key, version)
        self.writes.append(Write(len(self.writes), node_id, key, version))
        return version

    def _emit(self, redis: RedisState, key: str, version: Version) -> None:
        self._positions += 1
        redis.stream.entries.append(StreamEntry(self._positions, key, version))
        redis.stream.last_generated = self._positions

    def trim(self, node_id: str, keep: int) -> None:
        """Drop all but the newest ``keep`` entries of the node's stream (MAXLEN)."""
        stream = self.nodes[node_id].redis.stream
        if len(stream.entries) <= keep:
            return
        dropped = stream.entries[: len(stream.entries) - keep]
        stream.max_trimmed = max(stream.max_trimmed, dropped[-1].position)
        stream.entries = stream.entries[len(dropped) :]

    # ------------------------------------------------------------------------ the apply path

    def _apply(
        self, node: Node, changes: Sequence[tuple[str, Version]], source: Source | None
    ) -> list[ApplyStatus]:
        """apply.lua: the apply rule per item, then the anchor and the claims."""
        redis, engine = node.redis, node.engine
        record = redis.record
        statuses: list[ApplyStatus] = []
        applied = False
        newest = max((version.hlc for _, version in changes), default=0)
        for key, version in changes:
            status = decide(redis.store.get(key), version, record.claim(version.origin))
            if status is ApplyStatus.APPLIED:
                applied = True
                redis.store[key] = version
                if engine.relay:
                    self._emit(redis, key, version)
            statuses.append(status)
        if applied:
            redis.phlc = max(redis.phlc, newest)  # hlc_observe(ARGV[6])
        engine.hlc_last = max(engine.hlc_last, newest)  # apply_prepared observes prepared.newest
        if source is not None:
            self._anchor(record, source)
        return statuses

    def _anchor(self, record: Record, source: Source) -> None:
        anchor_batch(record, source)

    # ------------------------------------------------------------------------ the hot path

    def tail(self, reader: str, source: str, max_entries: int = ALL) -> int:
        """One tailer batch: ``source``'s record, then up to ``max_entries`` entries after the
        reader's cursor, applied with what the read proves. Returns the entries read."""
        if not self._reaches_peer(reader, source):
            return 0
        node, peer = self.nodes[reader], self.nodes[source]
        cursor = node.engine.cursors.get(source)
        if cursor is None:
            cursor = self._initial_cursor(node, peer)
            node.engine.cursors[source] = cursor
        record = peer.redis.record.view()  # read first, in the same pipeline
        stream = peer.redis.stream
        gap = stream.trimmed_past(cursor)
        entries = [e for e in stream.entries if e.position > cursor][:max_entries]
        last = entries[-1].position if entries else cursor
        coalesced: dict[str, Version] = {}
        for entry in entries:
            if entry.version.origin == reader:
                continue  # an echo of this node's own write
            coalesced.pop(entry.key, None)
            coalesced[entry.key] = entry.version
        reached_end = len(entries) < max_entries
        batch = self._stream_source(peer, record, cursor, last, gap, reached_end)
        if entries or batch is not None:
            if coalesced or batch is not None:
                self._apply(node, list(coalesced.items()), batch)
            node.engine.cursors[source] = last
        return len(entries)

    def _initial_cursor(self, node: Node, peer: Node) -> int:
        """``Tailer._initial_cursor`` for a tailer without a saved cursor."""
        anchor = node.redis.record.anchors.get(peer.node_id)
        if anchor is not None:
            return _position(anchor)
        how = node.engine.start_from.get(peer.node_id, "beginning")
        if how == "snapshot":
            tail = peer.redis.stream.last_generated
            self.repair(node.node_id, peer.node_id)  # a bootstrap is a complete repair
            return tail
        if how == "latest":
            return peer.redis.stream.last_generated  # STREAM_START for an empty stream
        return 0

    def _stream_source(
        self,
        peer: Node,
        record: NodeRecord | None,
        first: int,
        last: int,
        gap: bool,
        may_claim: bool,
    ) -> Source | None:
        """``Tailer._source``."""
        if record is None:
            return None
        whole = peer.redis.record.genesis == record.token
        fresh = first == 0 and (whole or not self.rules.fresh_anchor_needs_genesis)
        mode = "g" if gap else ("f" if fresh else "c")
        claims = record.stream_claims() if may_claim else {}
        if first == last and mode != "f" and not claims:
            return None
        return Source(
            peer.node_id,
            record.token,
            _sid(first),
            _sid(last),
            mode,
            claims,
        )

    # ------------------------------------------------------------------------ the cold path

    def repair(self, reader: str, source: str) -> bool:
        """A complete cold-path repair of ``reader`` from ``source`` (``RepairCycle.repair_peer``
        and ``Claims.conclude``): facts first, then the drill, absence by knowledge, inheritance."""
        if not self._reaches_peer(reader, source):
            return False
        node, peer = self.nodes[reader], self.nodes[source]
        own = node.redis.record.view()
        record = peer.redis.record.view()
        tail = _sid(peer.redis.stream.last_generated)
        fetch: list[tuple[str, Version]] = []
        absent: list[str] = []
        for key in sorted(set(peer.redis.store) | set(node.redis.store)):
            theirs, ours = peer.redis.store.get(key), node.redis.store.get(key)
            if theirs is None:
                absent.append(key)
            elif ours is None or theirs.digest(key) != ours.digest(key):
                if (
                    self.rules.drop_written_off
                    and ours is not None
                    and record is not None
                    and newer(ours, theirs)
                    and is_dead_by_absence((ours.hlc, ours.origin), record)
                ):
                    # Written off: the peer's claim covers ours, yet it holds an older version.
                    # Ours goes and the peer's takes its place whatever this store's own claims
                    # say (they may cover the peer's version only because ours superseded it).
                    node.redis.store[key] = theirs
                    if node.engine.relay:
                        self._emit(node.redis, key, theirs)
                    continue
                fetch.append((key, theirs))
        if fetch:
            self._apply(node, fetch, None)
        if record is None:
            # A peer without a record claims nothing and holds none of a recovery's writes.
            node.engine.pending.discard(source)
            return True
        if own is None:
            return True
        if absent and not record.recovering:
            self._drop_dead(node, record, absent)
        self._inherit(node, source, record, tail)
        node.engine.pending.discard(source)
        barrier = node.redis.record.barrier
        for gone in sorted(barrier):
            barrier[gone].discard(source)
            if not barrier[gone]:
                del barrier[gone]
                _raise_claims(node.redis.record, {gone: END_OF_TIME})
        return True

    def _drop_dead(self, node: Node, authority: NodeRecord, keys: Iterable[str]) -> None:
        """``Claims._drop_dead`` then discard.lua: versions the authority lacks and its claims
        cover."""
        for key in keys:
            held = node.redis.store.get(key)
            if held is not None and is_dead_by_absence((held.hlc, held.origin), authority):
                del node.redis.store[key]

    def _inherit(self, node: Node, source: str, record: NodeRecord, tail: str) -> None:
        inherit_claims(node.redis.record, source, record.token, tail, record.all_claims())

    # ------------------------------------------------------------------------ certification

    def certify(self, node_id: str) -> None:
        """One membership tick's certification (``Membership._certify``, certify.lua)."""
        node = self.nodes[node_id]
        redis, engine = node.redis, node.engine
        wall = self.wall_hlc()
        redis.phlc = max(redis.phlc, wall)  # certify.lua observes the engine's clock
        engine.hlc_last = max(engine.hlc_last, wall)
        record = redis.record
        if not record.present:
            self._open_record(node)  # 'absent': the engine reopens the store and recovers
            self._enter_recovery(node)
        elif engine.store_moved:
            self._enter_recovery(node)  # 'moved': a restart, a restore, a rewrite
        elif engine.state == RECOVERING and not engine.pending:
            record.self_claim = max(record.self_claim, redis.phlc)
            record.epoch = self._token("e")
            engine.state = SERVING
        elif engine.state == SERVING:
            record.self_claim = max(record.self_claim, redis.phlc)
        engine.store_moved = False
        record.state = engine.state
        record.cert += 1
        engine.floor = max(engine.floor, redis.phlc, engine.hlc_last)

    def _open_record(self, node: Node) -> None:
        """open.lua for a store without a record: a new incarnation, in recovery. Fields the
        apply path wrote meanwhile (anchors, claims) stay."""
        record = node.redis.record
        record.node_id = node.node_id
        record.mode = node.mode
        record.relay = node.engine.relay
        record.incarnation = self._token("i")
        record.epoch = self._token("e")
        record.cert = 0
        record.state = RECOVERING
        record.genesis = record.token

    def _enter_recovery(self, node: Node) -> None:
        """``Membership._enter_recovery``: every peer owes a complete repair; the HLC floor
        is restored from the engine's memory and every reachable peer's clock."""
        engine = node.engine
        engine.state = RECOVERING
        engine.pending = {p for p in engine.peers if p not in engine.forgotten}
        self._raise_floor(node)

    def _raise_floor(self, node: Node) -> None:
        """``Membership._restore_floor``: the store clock goes above every HLC the engine knew
        and every reachable peer's clock."""
        engine, redis = node.engine, node.redis
        floor = max(engine.floor, engine.hlc_last)
        for peer in engine.peers:
            if self.can_read(node.node_id, peer):
                floor = max(floor, self.nodes[peer].redis.phlc)
        redis.phlc = max(redis.phlc, floor)
        engine.hlc_last = max(engine.hlc_last, floor)

    def _token(self, kind: str) -> str:
        self._tokens += 1
        return f"{kind}{self._tokens}"

    def set_relay(self, node_id: str, relay: bool) -> None:
        """The engine restarts with another relay setting: open.lua starts a new epoch."""
        node = self.nodes[node_id]
        node.engine.relay = relay
        record = node.redis.record
        if record.present and record.relay != relay:
            record.relay = relay
            record.epoch = self._token("e")

    # ------------------------------------------------------------------------ membership

    def collect(self, node_id: str) -> int:
        """The rest of a membership tick: read the peers' records, publish the members,
        collect the tombstones at or below the stable frontier. Returns how many went."""
        node = self.nodes[node_id]
        engine = node.engine
        for peer in sorted(engine.peers):
            if self.can_read(node_id, peer):
                engine.records[peer] = self.nodes[peer].redis.record.view()
        self._publish_members(node)
        own = node.redis.record.view()
        records: dict[str, NodeRecord | None] = dict(engine.records)
        records[node_id] = own
        stable = self._stable(node, records)
        if own is None or stable <= 0:
            return 0
        record, store = node.redis.record, node.redis.store
        record.collected = max(record.collected, stable)
        dead = [key for key, v in store.items() if v.tombstone and v.hlc <= stable]
        for key in dead:
            del store[key]
        return len(dead)

    def _publish_members(self, node: Node) -> None:
        """``Membership._publish_members`` and members.lua."""
        engine, record = node.engine, node.redis.record
        published, waited, gone = derive_members(
            node_id=node.node_id,
            mode=node.mode,
            peers=sorted(engine.peers),
            own=record.view(),
            records=engine.records,
        )
        record.forgotten |= gone
        record.members = (record.members | published) - record.forgotten
        newly = gone - engine.forgotten
        engine.members, engine.waited_for, engine.forgotten = published, waited - gone, gone
        engine.pending -= newly
        if self.rules.forget_barrier:
            for forgotten in gone:
                if forgotten not in record.barrier and record.claim(forgotten) < END_OF_TIME:
                    record.barrier[forgotten] = {p for p in engine.peers if p not in gone}

    def stable(self, node_id: str) -> int:
        """The stable frontier ``node_id`` would collect at now (from what it last read)."""
        node = self.nodes[node_id]
        records: dict[str, NodeRecord | None] = dict(node.engine.records)
        records[node_id] = node.redis.record.view()
        return self._stable(node, records)

    def _stable(self, node: Node, records: Mapping[str, NodeRecord | None]) -> int:
        """``Membership._collect``'s S, and with Rules.forget_barrier the members' claims
        about every forgotten node too."""
        engine = node.engine
        gone = engine.forgotten if self.rules.forget_barrier else frozenset()
        if node.mode != "mesh":
            return frontier(records.get(node.node_id), engine.waited_for, gone)
        stable, _holder = stable_frontier(engine.waited_for, records, forgotten=gone)
        return stable

    def add_member(self, node_id: str, start_from: str = "snapshot") -> None:
        """A new, empty mesh node joins: every live node becomes its peer and it theirs.

        Its tailers start as ``start_from`` says (``snapshot``: a complete repair, then the
        stream from the tail it read; ``latest``: the stream's current last id, which for an
        empty stream is its start; ``beginning``). The existing nodes read it from the
        beginning. Nobody knows a write of the new store, so it does not recover: it serves
        (and certifies) at once.
        """
        if node_id in self.nodes or node_id in self.removed:
            raise ModelError(f"node id {node_id!r} is taken")
        if start_from not in ("snapshot", "latest", "beginning"):
            raise ValueError(f"start_from {start_from!r}")
        peers = self.live()
        node = Node(
            node_id,
            "mesh",
            RedisState.empty(node_id, "mesh", self.relay),
            Engine(
                relay=self.relay,
                peers=set(peers),
                cursors=dict.fromkeys(peers),
                start_from=dict.fromkeys(peers, start_from),
            ),
        )
        for other in peers:
            engine = self.nodes[other].engine
            engine.peers.add(node_id)
            engine.cursors[node_id] = None
            engine.start_from[node_id] = "beginning"
        self.nodes[node_id] = node
        # Membership.open(): the record is created; no engine memory and no peer knows a write
        # of this node, so it is a new store with nothing to recover, serving at once.
        self._open_record(node)
        node.engine.state = SERVING
        if self.rules.new_store_floor:
            self._raise_floor(node)
        self.certify(node_id)

    def forget(self, node_id: str, at: str) -> None:
        """An operator forgets ``node_id`` on ``at``: the node is gone for good (its Redis is
        unreachable from now on); the forgotten list spreads through the records."""
        if at == node_id or at not in self.nodes:
            raise ModelError(f"cannot forget {node_id!r} on {at!r}")

        def remove() -> None:
            del self.nodes[node_id]
            self.removed.add(node_id)

        self._by_operator(remove)
        holder = self.nodes[at]
        holder.redis.record.forgotten.add(node_id)
        holder.redis.record.members.discard(node_id)
        self._publish_members(holder)

    # ------------------------------------------------------------------------ operators

    def backup(self, node_id: str) -> Backup:
        """A copy of the node's Redis (items, record, stream, clock)."""
        return Backup(node_id, copy.deepcopy(self.nodes[node_id].redis))

    def restore(self, node_id: str, backup: Backup) -> None:
        """The node's Redis is restored from ``backup``; its engine keeps running.

        The next certification finds the store moved and starts a recovery; each tailer goes
        back to the store's anchor when that is behind its cursor (``_initial_cursor``).
        """
        if backup.node_id != node_id:
            raise ModelError(f"backup of {backup.node_id!r} restored onto {node_id!r}")
        node = self.nodes[node_id]

        def restore() -> None:
            node.redis = copy.deepcopy(backup.state)

        self._by_operator(restore)
        node.engine.store_moved = True
        for peer, cursor in node.engine.cursors.items():
            anchor = node.redis.record.anchors.get(peer)
            if cursor is not None and anchor is not None and _position(anchor) < cursor:
                node.engine.cursors[peer] = _position(anchor)

    def wipe(self, node_id: str) -> None:
        """The node's Redis comes back empty (a restart without persistence)."""
        node = self.nodes[node_id]

        def wipe() -> None:
            node.redis = RedisState.empty(node_id, node.mode, node.engine.relay)

        self._by_operator(wipe)
        node.engine.store_moved = True

    def _by_operator(self, action: Callable[[], None]) -> None:
        """Run an operator action; what only it held is lost by the operator.

        A lost write stays lost even if a later restore brings a store back that holds it: it
        may then come back or stay lost, and both are correct (see :meth:`allowed`).
        """
        before = {w.wid for w in self.surviving_writes() if self.is_covered(w)}
        action()
        for w in self.surviving_writes():
            if w.wid in before and not self.is_covered(w):
                self.lost.add(w.wid)

    # ------------------------------------------------------------------------ settling

    def quiesce(self, max_rounds: int = MAX_QUIESCE_ROUNDS, *, strict: bool = True) -> int:
        """Rounds of certify, tail to the end, repair and collect on every node and pair until
        a round changes nothing. Returns the rounds run.

        Under a partition the mesh may churn for good (a recovering store that cannot reach
        every peer re-fetches its own dead versions from one peer and drops them again by
        another's claims, every round); ``strict=False`` then stops after ``max_rounds``.

        Raises:
            ModelError: ``strict`` and still changing after ``max_rounds``.
        """
        for rounds in range(1, max_rounds + 1):
            before = self.fingerprint()
            for node in self.live():
                self.certify(node)
            for reader in self.live():
                for source in self.live():
                    self.tail(reader, source)
            for reader in self.live():
                for source in self.live():
                    self.repair(reader, source)
            for node in self.live():
                self.collect(node)
            if self.fingerprint() == before:
                return rounds
        if not strict:
            return max_rounds
        raise ModelError(f"the mesh did not settle in {max_rounds} rounds")

    def fingerprint(self) -> tuple[object, ...]:
        """Everything a round can change, comparable."""
        parts: list[object] = []
        for node_id in self.live():
            node = self.nodes[node_id]
            redis, engine, record = node.redis, node.engine, node.redis.record
            parts.append(
                (
                    node_id,
                    tuple(sorted(redis.store.items())),
                    redis.phlc,
                    tuple(redis.stream.entries),
                    redis.stream.max_trimmed,
                    record.incarnation,
                    record.epoch,
                    record.self_claim,
                    tuple(sorted(record.claims.items())),
                    tuple(sorted(record.anchors.items())),
                    record.collected,
                    tuple(sorted(record.members)),
                    tuple(sorted(record.forgotten)),
                    record.state,
                    tuple(sorted((p, c or 0) for p, c in engine.cursors.items())),
                    engine.state,
                    tuple(sorted(engine.pending)),
                    tuple(sorted(engine.waited_for)),
                    tuple(sorted((p, _gist(r)) for p, r in engine.records.items())),
                )
            )
        return tuple(parts)

    # ------------------------------------------------------------------------ ground truth

    def surviving_writes(self) -> list[Write]:
        """Acknowledged writes that no operator action destroyed."""
        return [w for w in self.writes if w.wid not in self.lost]

    def covers(self, node_id: str, write: Write) -> bool:
        """Whether the node's state accounts for ``write``: it holds it or a newer version of
        the key, or holds nothing for the key while its claim about the origin covers it.

        In the full order, origin included: a version equal to the write as the tree sees it
        (same HLC and content) from another origin orders differently against a third version
        of the same HLC, so it does not stand in for the write. (A delete on c and one on a at
        the same HLC, with a put from b between them in the order: once c's is destroyed, the
        put beats a's, and the mesh rightly ends with the put.)"""
        redis = self.nodes[node_id].redis
        held = redis.store.get(write.key)
        if held is not None:
            return not newer(write.version, held)
        return redis.record.claim(write.version.origin) >= write.version.hlc

    def is_covered(self, write: Write) -> bool:
        return any(self.covers(node_id, write) for node_id in self.nodes)

    def winners(self) -> dict[str, Write]:
        """Per key, the last-writer-wins winner among the surviving acknowledged writes."""
        best: dict[str, Write] = {}
        for w in self.surviving_writes():
            current = best.get(w.key)
            if current is None or newer(w.version, current.version):
                best[w.key] = w
        return best

    def allowed(self, key: str) -> tuple[Write | None, list[Write]]:
        """What ``key`` may end as: its surviving winner, or a lost write newer than that one
        (an operator's restore may have brought it back). Returns both."""
        winner = self.winners().get(key)
        comeback = [
            w
            for w in self.writes
            if w.wid in self.lost
            and w.key == key
            and (winner is None or newer(w.version, winner.version))
        ]
        return winner, comeback

    def violations(self) -> list[str]:
        """What may never be true at any moment (checked after every step).

        - A surviving live winner is held by no node, nor superseded by a version some node
          holds: it was lost.
        - A node holds nothing for a key while its claim about the origin of the key's live
          winner covers it: it would refuse the winner as known, and as an authority for
          absence by knowledge it would drop it everywhere.

        A node that holds an older version than one its claims cover is not flagged here: a
        store recovering from a restore may take claims from a peer that is recovering too,
        which absence by knowledge does not consult, and hold a dead version under them until
        a serving peer drops it. Whatever of that outlives a settled mesh is a divergence or a
        resurrection that :meth:`convergence_problems` reports.
        """
        found: list[str] = []
        winners = self.winners()
        for key, w in sorted(winners.items()):
            if w.version.tombstone or self.allowed(key)[1]:
                # A lost write newer than the winner may displace it: the fate is open, and
                # only the final check judges it.
                continue
            if not any(_reaches(n.redis.store.get(key), w.version) for n in self.nodes.values()):
                found.append(f"lost: live winner {w.version.describe()} of {key!r} is held nowhere")
            for node_id in self.live():
                redis = self.nodes[node_id].redis
                if key not in redis.store and redis.record.claim(w.version.origin) >= w.version.hlc:
                    found.append(
                        f"false claim: {node_id} holds nothing for {key!r} while its claim "
                        f"about {w.version.origin} covers the live winner {w.version.describe()}"
                    )
        return found

    def live_values(self, node_id: str) -> dict[str, Version]:
        return {k: v for k, v in self.nodes[node_id].redis.store.items() if not v.tombstone}

    def merkle_root(self, node_id: str) -> str:
        """The root of a tree over the node's live values (tombstones left out)."""
        values = self.live_values(node_id)
        return MerkleModel.build({k: v.digest(k) for k, v in values.items()}).root

    def convergence_problems(self) -> list[str]:
        """What must hold once the mesh is healed and quiet: every node holds the same live
        values, each key's live value is its surviving winner, and no delete was undone."""
        found: list[str] = []
        nodes = self.live()
        first = nodes[0]
        reference = {k: (v.hlc, v.content_hash) for k, v in self.live_values(first).items()}
        for node_id in nodes[1:]:
            values = {k: (v.hlc, v.content_hash) for k, v in self.live_values(node_id).items()}
            if values != reference:
                found.append(f"diverged: {first} holds {reference}, {node_id} holds {values}")
            if self.merkle_root(node_id) != self.merkle_root(first):
                found.append(f"diverged: Merkle roots of {first} and {node_id} differ")
        keys = {k for n in nodes for k in self.nodes[n].redis.store} | {w.key for w in self.writes}
        for key in sorted(keys):
            winner, comeback = self.allowed(key)
            for node_id in nodes:
                problem = _judge(self.nodes[node_id].redis.store.get(key), winner, comeback)
                if problem:
                    found.append(f"{problem} (node {node_id}, key {key!r})")
        return found


def _reaches(held: Version | None, version: Version) -> bool:
    """``held`` is ``version`` (as the tree sees it) or newer."""
    return held is not None and (not newer(version, held) or version.same_content(held))


def _judge(held: Version | None, winner: Write | None, comeback: list[Write]) -> str | None:
    """Why ``held`` is not an allowed final state of its key (None when it is)."""
    if held is not None and not held.tombstone:
        if winner is not None and winner.version.same_content(held):
            return None
        if any(w.version == held for w in comeback):
            return None
        if winner is None or winner.version.tombstone:
            why = "never written" if winner is None else f"deleted by {winner.version.describe()}"
            return f"resurrected: {held.describe()} is held, {why}"
        return f"lost: {held.describe()} is held, the winner is {winner.version.describe()}"
    if winner is None or winner.version.tombstone:
        return None
    if any(w.version.tombstone for w in comeback):
        return None
    return f"lost: nothing is held, the winner is {winner.version.describe()} from {winner.node}"


def _gist(record: NodeRecord | None) -> object:
    """A last-read record without its certification count, which grows every tick."""
    if record is None:
        return None
    return (
        record.token,
        record.self_claim,
        tuple(sorted(record.claims.items())),
        tuple(sorted(record.members)),
        tuple(sorted(record.forgotten)),
        record.state,
    )


def anchor_batch(record: Record, source: Source) -> None:
    """The end of apply.lua: move the anchor in ``source.peer``'s stream, and raise the claims
    the batch carries only when it was applied contiguously (or from a fresh stream's start).

    An unanchored anchor keeps ``since``, the position from which the stream has been applied
    contiguously again, so that a repair that began at or after it can anchor it.
    """
    current = record.anchors.get(source.peer)
    same = current is not None and current.token == source.token
    contiguous = (
        source.mode == "c" and current is not None and same and not source.first > current.position
    )
    fresh = source.mode == "f"
    anchored = fresh or (contiguous and current is not None and current.anchored)
    position = source.last
    if current is not None and same and current.position > source.last:
        position = current.position
    since = source.last
    if contiguous and current is not None and not current.anchored and current.since:
        since = current.since
    record.anchors[source.peer] = Anchor(
        source.token, position, anchored, "" if anchored else since
    )
    if anchored:
        _raise_claims(record, source.claims)


def inherit_claims(
    record: Record, peer: str, token: str, tail: str, claims: Mapping[str, int]
) -> int:
    """inherit.lua: anchor at the peer's tail, unless already further on under the same token;
    a tailer further on but unanchored is anchored where it stands when it has applied the
    stream contiguously since a position at or before that tail. Then take the claims.

    Returns 2 (anchored) or 1 (the tailer stays unanchored), as the script does.
    """
    current = record.anchors.get(peer)
    anchored = True
    if not (current is not None and current.token == token and current.position > tail):
        record.anchors[peer] = Anchor(token, tail, True)
    elif not current.anchored and current.since and not current.since > tail:
        record.anchors[peer] = Anchor(token, current.position, True)
    else:
        anchored = current.anchored
    _raise_claims(record, claims)
    return 2 if anchored else 1


def _raise_claims(record: Record, claims: Mapping[str, int]) -> None:
    """``raise_claims`` in common.lua: claims only grow, never about this node itself, and a
    claim of 0 is never written."""
    for origin, hlc in sorted(claims.items()):
        if origin == record.node_id or hlc == 0:  # a claim of 0 is no claim
            continue
        if origin not in record.claims or hlc > record.claims[origin]:
            record.claims[origin] = hlc
