"""What each node knows about the mesh's writes, and the rules that act on it (pure, no I/O).

docs/DELETES.md is the design; this module is its executable form, the specification the Lua
scripts and the engine are tested against (as :class:`replication_engine.merkle.MerkleModel` is
for the tree). It decides; :mod:`replication_engine.membership`, the tailers and the cold path
read and write Redis.

- :func:`order` is the total order of two versions of a key (last-writer-wins with a
  deterministic tiebreak), and :func:`decide` the apply rule built on it.
- :class:`NodeRecord` is a store's ``Pnode`` hash: its claims, anchors, membership and state.
- :func:`frontier`, :func:`stable_frontier` and :func:`derive_members` compute what tombstone
  collection waits for; :func:`is_dead_by_absence` is the rule that drops a version a peer
  proves dead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from replication_engine.clock import MAX_HLC

__all__ = [
    "ALL_WRITES",
    "RECOVERING",
    "SERVING",
    "Anchor",
    "ApplyStatus",
    "NodeRecord",
    "decide",
    "derive_members",
    "frontier",
    "hlc_hex",
    "is_dead_by_absence",
    "order",
    "parse_hlc_hex",
    "sid_key",
    "stable_frontier",
]

# Record states: serving (claims certified) or recovering (the store may have lost writes).
SERVING = "ok"
RECOVERING = "recovering"
# A claim about every write of a node: what a store claims about a forgotten node once it has
# had a complete repair from every peer since it learned of the forget.
ALL_WRITES = MAX_HLC
# Separators in the record's list and anchor fields: node ids never contain them (config
# restricts ids to A-Z a-z 0-9 . _ -).
_LIST_SEP = ","
_ANCHOR_SEP = "|"
# Fields as the scripts write them: an HLC as 16 lowercase hex digits, a stream id as two
# 20-digit numbers (see sid_key).
_HEX16 = re.compile(r"[0-9a-f]{16}")
_SID = re.compile(r"[0-9]{20}-[0-9]{20}")


class ApplyStatus(StrEnum):
    """What the apply path did with one remote version."""

    APPLIED = "applied"
    SKIPPED = "skipped"  # the same version is held here: a duplicate delivery
    STALE = "stale"  # older than the version held here
    KNOWN = "known"  # at or below this store's claim for its origin: held, superseded or dead
    REJECTED = "rejected"  # stamped too far in the future: the origin's clock is wrong
    REFUSED = "refused"  # the store refused it (a wrong-typed key, an oversized batch)


# ---------------------------------------------------------------------------- versions


def order(hlc: int, origin: str, tombstone: bool, content_hash: str) -> tuple[int, bytes, int, str]:
    """The last-writer-wins key of a version: greater wins.

    HLC first, then origin (byte-wise, as the Lua compares it), then a tombstone over a value,
    then the greater content hash. The last two only matter for two versions with the same HLC
    and origin, which one store never issues twice, but a wiped store or a hostile writer can:
    every node must still pick the same one.
    """
    return (hlc, origin.encode("utf-8"), 1 if tombstone else 0, content_hash)


def decide(
    local: tuple[int, str, bool, str] | None,
    remote: tuple[int, str, bool, str],
    claim: int,
) -> ApplyStatus:
    """The apply rule for one remote version against the version held here.

    Args:
        local: ``(hlc, origin, tombstone, content_hash)`` held here, or None.
        remote: the same for the arriving version.
        claim: this store's claim about the remote version's origin (0 when it has none).

    Returns:
        APPLIED; SKIPPED (not newer, and the same content and tombstone flag are held here:
        a duplicate delivery, or the same content written again); STALE (older than what is
        held, with other content); or KNOWN (at or below the claim: already held, superseded,
        or deleted and collected; applying it could only bring a dead value back). A claim
        of 0 is no claim, as an absent ``c:`` field is to the scripts.
    """
    if claim and remote[0] <= claim:
        return ApplyStatus.KNOWN
    if local is None:
        return ApplyStatus.APPLIED
    if order(*remote) > order(*local):
        return ApplyStatus.APPLIED
    same = (remote[2], remote[3]) == (local[2], local[3])
    return ApplyStatus.SKIPPED if same else ApplyStatus.STALE


# ---------------------------------------------------------------------------- wire forms


def hlc_hex(hlc: int) -> str:
    return f"{hlc:016x}"


def parse_hlc_hex(raw: str | None) -> int:
    """A 16-hex HLC field, as the scripts write and compare it (lowercase, fixed width); 0
    when absent or unreadable (a claim of nothing). ``int(raw, 16)`` alone would also take a
    sign, ``0x`` or underscores, which the scripts would compare byte-wise differently."""
    if not raw or not _HEX16.fullmatch(raw):
        return 0
    return int(raw, 16)


def sid_key(ms: int, seq: int) -> str:
    """A stream id as fixed-width text, so the Lua can order two ids byte by byte."""
    return f"{ms:020d}-{seq:020d}"


@dataclass(frozen=True, slots=True)
class Anchor:
    """Where a store stands in one peer's stream (the record's ``p:<peer>`` field).

    ``position`` is the last entry applied (fixed width, see :func:`sid_key`); ``anchored``
    says whether everything up to it was applied contiguously from a known start, under the
    stream ``token``, so that the stream's claims may be taken.
    """

    token: str
    position: str
    anchored: bool
    since: str = ""  # unanchored: applied contiguously again from this position on

    @classmethod
    def parse(cls, raw: str | None) -> Anchor | None:
        """None for an absent or unreadable field (as ``read_anchor`` in the scripts)."""
        if not raw:
            return None
        parts = raw.split(_ANCHOR_SEP)
        if len(parts) not in (3, 4) or parts[2] not in ("0", "1"):
            return None
        if not _SID.fullmatch(parts[1]) or (
            len(parts) == 4 and parts[3] and not _SID.fullmatch(parts[3])
        ):
            return None
        return cls(parts[0], parts[1], parts[2] == "1", parts[3] if len(parts) == 4 else "")

    def render(self) -> str:
        flag = "1" if self.anchored else "0"
        parts = (self.token, self.position, flag) + (() if self.anchored else (self.since,))
        return _ANCHOR_SEP.join(parts)

    @property
    def stream_id(self) -> tuple[int, int]:
        ms, _, seq = self.position.partition("-")
        return int(ms), int(seq)


# ---------------------------------------------------------------------------- the record


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A store's ``Pnode`` hash, as peers and its own engine read it (docs/FORMAT.md)."""

    node_id: str = ""
    mode: str = "mesh"
    relay: bool = False
    incarnation: str = ""
    epoch: str = ""
    genesis: str = ""
    run_id: str = ""
    nonce: str = ""
    cert: int = 0
    self_claim: int = 0
    claims: Mapping[str, int] = field(default_factory=dict)
    anchors: Mapping[str, Anchor] = field(default_factory=dict)
    collected: int = 0
    members: frozenset[str] = frozenset()
    forgotten: frozenset[str] = frozenset()
    state: str = SERVING
    reason: str = ""

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> NodeRecord | None:
        """None for an absent record (a new store, or one whose Redis was wiped)."""
        if not fields.get("inc"):
            return None
        claims: dict[str, int] = {}
        anchors: dict[str, Anchor] = {}
        for name, value in fields.items():
            if name.startswith("c:"):
                claims[name[2:]] = parse_hlc_hex(value)
            elif name.startswith("p:"):
                anchor = Anchor.parse(value)
                if anchor is not None:
                    anchors[name[2:]] = anchor
        return cls(
            node_id=fields.get("id", ""),
            mode=fields.get("mode", "mesh"),
            relay=fields.get("relay") == "1",
            incarnation=fields.get("inc", ""),
            epoch=fields.get("epoch", ""),
            genesis=fields.get("genesis", ""),
            run_id=fields.get("run", ""),
            nonce=fields.get("nonce", ""),
            cert=_int(fields.get("cert")),
            self_claim=parse_hlc_hex(fields.get("self")),
            claims=claims,
            anchors=anchors,
            collected=parse_hlc_hex(fields.get("collected")),
            members=_ids(fields.get("members")),
            forgotten=_ids(fields.get("forgotten")),
            state=fields.get("state") or SERVING,
            reason=fields.get("reason", ""),
        )

    @property
    def token(self) -> str:
        """Identifies the stream a reader is anchored in: a new incarnation (a wiped store),
        a new epoch (recovery finished) or a relay change each start a new one."""
        return f"{self.incarnation}.{self.epoch}.{1 if self.relay else 0}"

    @property
    def holds_whole_stream(self) -> bool:
        """Whether the stream holds everything :meth:`stream_claims` covers from its first
        entry on, so that a reader from its start may take them (``apply.lua`` mode ``f``).

        True only in the epoch the store's record was created in. A recovery fetches writes
        back without emitting them, and while relay was off applied versions were not
        emitted: after either (each starts a new epoch), the stream's start proves nothing.
        """
        return bool(self.genesis) and self.genesis == self.epoch

    @property
    def recovering(self) -> bool:
        return self.state != SERVING

    def claim(self, origin: str) -> int:
        """This store's claim about ``origin``'s writes (its certified ``self`` for itself)."""
        if origin == self.node_id:
            return self.self_claim
        return self.claims.get(origin, 0)

    def stream_claims(self) -> dict[str, int]:
        """What a reader that applied this store's whole stream may claim from it.

        The store's own writes are all in its stream. Everything else it holds is there too
        only when it relays what it applies; then its claims about other origins carry over.
        """
        claims = dict(self.claims) if self.relay else {}
        claims[self.node_id] = self.self_claim
        return claims

    def all_claims(self) -> dict[str, int]:
        """What a store that holds everything this one holds may claim (a complete repair)."""
        claims = dict(self.claims)
        claims[self.node_id] = self.self_claim
        return claims


def _int(raw: str | None) -> int:
    try:
        return int(raw) if raw else 0
    except ValueError:
        return 0


def _ids(raw: str | None) -> frozenset[str]:
    return frozenset(part for part in (raw or "").split(_LIST_SEP) if part)


def render_ids(ids: Iterable[str]) -> str:
    return _LIST_SEP.join(sorted(set(ids)))


# ---------------------------------------------------------------------------- membership


def derive_members(
    *,
    node_id: str,
    mode: str,
    peers: Iterable[str],
    own: NodeRecord | None,
    records: Mapping[str, NodeRecord | None],
    forgotten: Iterable[str] = (),
) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The member set this node publishes, the set collection waits for, and the forgotten.

    A member, once seen, stays until it is forgotten: the published set is this node's own
    (if it is a mesh node), its peers whose records say ``mode: mesh``, every member its peers
    publish, and the members its own record already lists. Collection also waits for a
    configured mesh node's peer whose record is not readable yet: it may be a member.

    Args:
        node_id, mode: this node.
        peers: the configured peers.
        own: this store's record (its sticky ``members`` and ``forgotten``).
        records: each peer's record as last read (None: not read yet, or absent).
        forgotten: ids forgotten here (operator verb) and not yet in ``own``.

    Returns:
        ``(published, waited_for, forgotten)``.
    """
    gone = set(forgotten)
    known: set[str] = set()
    if own is not None:
        gone |= own.forgotten
        known |= own.members
    if mode == "mesh":
        known.add(node_id)
    unknown: set[str] = set()
    for peer in peers:
        record = records.get(peer)
        if record is None:
            if mode == "mesh":
                unknown.add(peer)
            continue
        gone |= record.forgotten
        known |= record.members
        if record.mode == "mesh":
            known.add(peer)
    published = frozenset(known - gone)
    return published, frozenset((known | unknown) - gone), frozenset(gone)


def frontier(
    record: NodeRecord | None, members: Iterable[str], forgotten: Iterable[str] = ()
) -> int:
    """The HLC up to which ``record``'s store holds every member's writes, and every forgotten
    node's (0 for no record)."""
    if record is None:
        return 0
    writers = [*members, *forgotten]
    return min((record.claim(writer) for writer in writers), default=record.self_claim)


def stable_frontier(
    members: Iterable[str],
    records: Mapping[str, NodeRecord | None],
    unreadable: Iterable[str] = (),
    forgotten: Iterable[str] = (),
) -> tuple[int, str | None]:
    """The mesh's stable frontier, and the member to blame for where it stands.

    Every member's frontier is computed here from its own claims and *this* node's member
    set, so a member that has not yet heard of a newcomer cannot make collection run ahead of
    the newcomer's writes. A member without a readable record holds it at 0.

    Writes of a ``forgotten`` node count too: until every member claims all of them (it does
    once it has had a complete repair from every peer since it learned of the forget, see
    docs/DELETES.md, "Forgetting a member"), a member may still hold an old value of one that
    only a tombstone here supersedes. A member behind on a forgotten node is blamed itself.

    The blame goes to the member an operator must look at. The frontier is the lowest claim of
    some member ``Y`` about some origin ``X``: ``X`` is blamed when its record cannot be read
    now (stopped Redis, cut link) or when ``Y`` already knows everything ``X`` certified (``X``
    is what stopped moving); otherwise ``Y`` is, as it is behind on ``X``'s writes.

    Returns:
        ``(S, member)``: tombstones at or below ``S`` may be collected; ``member`` is the one
        to blame (None for an empty member set).
    """
    names = sorted(members)
    gone = sorted(set(forgotten) - set(names))
    down = set(unreadable)
    lowest: tuple[int, str, str] | None = None  # (claim, claimant, origin)
    for claimant in names:
        record = records.get(claimant)
        for origin in names + gone:
            value = 0 if record is None else record.claim(origin)
            if lowest is None or value < lowest[0]:
                lowest = (value, claimant, origin)
    if lowest is None:
        return 0, None
    value, claimant, origin = lowest
    if claimant in down or records.get(claimant) is None or origin in gone:
        return value, claimant
    source = records.get(origin)
    if origin in down or source is None or origin == claimant or value >= source.self_claim:
        return value, origin
    return value, claimant


def is_dead_by_absence(version: tuple[int, str], authority: NodeRecord | None) -> bool:
    """Whether a version held here is dead because ``authority``'s store holds nothing newer.

    The authority's claim about the version's origin covers the version: it applied it or a
    newer version of the key. So when it lacks the key, it lost it only to a collection of a
    newer tombstone (or to this same rule): the key was deleted and collected. And when it
    holds an *older* version, the version here was written off: lost by a store that
    recovered, and brought back by a restore after the mesh had certified past it (see
    docs/DELETES.md, "Written off"). A store without a record (new, wiped) claims nothing,
    and a recovering one is never asked.
    """
    if authority is None or authority.recovering:
        return False
    hlc, origin = version
    claim = authority.claim(origin)
    return claim > 0 and claim >= hlc
