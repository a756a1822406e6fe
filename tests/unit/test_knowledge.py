"""The knowledge rules: version order, the apply decision, records, membership and frontiers.

:mod:`replication_engine.knowledge` is the specification the Lua scripts and the engine are
held to (docs/DELETES.md), so its rules are checked here on their own. Hypothesis covers the
invariants: two different versions are applied in exactly one direction, nothing not newer is
ever applied, and the stable frontier never runs ahead of any member's claim.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from replication_engine.clock import MAX_HLC
from replication_engine.knowledge import (
    ALL_WRITES,
    RECOVERING,
    SERVING,
    Anchor,
    ApplyStatus,
    NodeRecord,
    decide,
    derive_members,
    frontier,
    hlc_hex,
    is_dead_by_absence,
    order,
    parse_hlc_hex,
    sid_key,
    stable_frontier,
)

Version = tuple[int, str, bool, str]

# Small values as well as the whole range, so that ties on each field of the order are common.
hlcs = st.one_of(st.integers(0, 3), st.integers(0, MAX_HLC))
versions = st.tuples(
    hlcs, st.sampled_from(["a", "ab", "B"]), st.booleans(), st.sampled_from(["00", "0f", "ff"])
)
NODES = ["a", "b", "c", "d"]
GONE = ["x", "y"]
Mesh = tuple[set[str], dict[str, NodeRecord | None], set[str], set[str]]


def _rec(node_id: str, self_claim: int = 0, **claims: int) -> NodeRecord:
    return NodeRecord(node_id=node_id, self_claim=self_claim, claims=claims)


# ---------------------------------------------------------------------------- order / decide


@pytest.mark.parametrize(
    ("local", "claim"),
    [((5, "a", False, "ff"), 0), (None, 0), (None, 5)],
    ids=["newer-than-held", "none-held", "just-above-the-claim"],
)
def test_decide_applies_a_newer_version_or_one_where_none_is_held(
    local: Version | None, claim: int
) -> None:
    assert decide(local, (6, "a", False, "00"), claim) is ApplyStatus.APPLIED


@pytest.mark.parametrize(
    ("local", "remote"),
    [
        ((7, "a", False, "0f"), (7, "a", False, "0f")),  # identical
        ((10, "b", False, "0f"), (3, "z", False, "0f")),  # older HLC, other origin
        ((10, "b", True, "0f"), (10, "a", True, "0f")),  # same HLC, lower origin, tombstones
    ],
)
def test_decide_skips_a_not_newer_version_with_the_same_content_and_tombstone_flag(
    local: Version, remote: Version
) -> None:
    assert decide(local, remote, 0) is ApplyStatus.SKIPPED


@pytest.mark.parametrize(
    "remote",
    [(9, "b", False, "00"), (9, "b", False, "0f")],
    ids=["other-hash", "same-hash-but-value-under-a-tombstone"],
)
def test_decide_reports_an_older_version_with_other_content_as_stale(remote: Version) -> None:
    assert decide((10, "b", True, "0f"), remote, 0) is ApplyStatus.STALE


def test_a_claim_of_zero_is_no_claim_even_for_a_version_at_hlc_zero() -> None:
    assert decide(None, (0, "b", False, "ff"), 0) is ApplyStatus.APPLIED


@pytest.mark.parametrize(
    ("winner", "loser"),
    [
        ((6, "a", False, "00"), (5, "z", True, "ff")),
        ((5, "a", False, "00"), (5, "B", True, "ff")),
        ((5, "ab", False, "00"), (5, "a", True, "ff")),
        ((5, "a", True, "00"), (5, "a", False, "ff")),
        ((5, "a", False, "ff"), (5, "a", False, "0f")),
    ],
    ids=["hlc", "origin-bytes-case", "origin-bytes-prefix", "tombstone-over-hash", "hash"],
)
def test_the_tie_break_winner_is_applied_over_the_loser_and_never_back(
    winner: Version, loser: Version
) -> None:
    assert order(*winner) > order(*loser)
    assert decide(loser, winner, 0) is ApplyStatus.APPLIED
    assert decide(winner, loser, 0) is ApplyStatus.STALE


@given(versions, versions)
def test_exactly_one_direction_applies_unless_the_versions_are_equal_in_order(
    a: Version, b: Version
) -> None:
    applied = [decide(a, b, 0), decide(b, a, 0)].count(ApplyStatus.APPLIED)
    assert applied == (0 if order(*a) == order(*b) else 1)


@given(versions, versions, st.one_of(st.just(0), hlcs))
def test_decide_never_applies_a_remote_not_above_the_local_in_order(
    local: Version, remote: Version, claim: int
) -> None:
    assume(order(*remote) <= order(*local))
    assert decide(local, remote, claim) is not ApplyStatus.APPLIED


@given(st.none() | versions, versions, st.integers(1, 3) | st.integers(1, MAX_HLC))
def test_decide_is_known_exactly_at_or_below_a_nonzero_claim_whatever_is_held(
    local: Version | None, remote: Version, claim: int
) -> None:
    assert (decide(local, remote, claim) is ApplyStatus.KNOWN) == (remote[0] <= claim)


# ---------------------------------------------------------------------------- anchors


@given(
    token=st.text(st.characters(codec="ascii", exclude_characters="|"), max_size=12),
    ms=st.integers(0, 2**48),
    seq=st.integers(0, 2**20),
    since=st.one_of(st.just(""), st.builds(sid_key, st.integers(0, 2**48), st.integers(0, 9))),
    anchored=st.booleans(),
)
def test_an_anchor_round_trips_through_render_and_parse(
    token: str, ms: int, seq: int, since: str, anchored: bool
) -> None:
    anchor = Anchor(token, sid_key(ms, seq), anchored, "" if anchored else since)
    assert Anchor.parse(anchor.render()) == anchor
    assert anchor.stream_id == (ms, seq)


def test_an_unanchored_anchor_renders_its_since_and_an_anchored_one_does_not() -> None:
    pos, since = sid_key(9, 1), sid_key(4, 0)
    assert Anchor("t", pos, False, since).render() == f"t|{pos}|0|{since}"
    assert Anchor("t", pos, True).render() == f"t|{pos}|1"
    assert Anchor.parse(f"t|{pos}|0|{since}") == Anchor("t", pos, False, since)


@pytest.mark.parametrize("raw", [None, "", "t", "t|pos", "t|pos|1|since|extra"])
def test_anchor_parse_returns_none_for_a_malformed_field(raw: str | None) -> None:
    assert Anchor.parse(raw) is None


@pytest.mark.parametrize("raw", ["t|not-an-id|1", "t||0|", f"t|{sid_key(1, 0)}|2"])
def test_anchor_parse_returns_none_for_a_bad_position_or_flag(raw: str) -> None:
    assert Anchor.parse(raw) is None


# ---------------------------------------------------------------------------- records


# Every field a record can hold, with one unreadable claim ("c:c") and anchor ("p:c").
FULL_FIELDS = (
    {"id": "a", "mode": "follower", "relay": "1", "inc": "i1", "epoch": "e2"}
    | {"genesis": "e1", "run": "r", "nonce": "n", "cert": "7", "self": hlc_hex(50)}
    | {"collected": hlc_hex(20), "c:b": hlc_hex(40), "c:c": "not-hex", "p:c": "garbage"}
    | {"p:b": f"tok|{sid_key(3, 4)}|1", "members": "a,b,,c", "forgotten": "x,y"}
    | {"state": RECOVERING, "reason": "run_id changed"}
)


@pytest.mark.parametrize("fields", [{}, {"id": "a", "self": hlc_hex(5)}, {"id": "a", "inc": ""}])
def test_from_fields_returns_none_without_an_incarnation(fields: dict[str, str]) -> None:
    assert NodeRecord.from_fields(fields) is None


def test_from_fields_reads_claims_anchors_lists_state_and_genesis() -> None:
    record = NodeRecord.from_fields(FULL_FIELDS)
    assert record is not None
    assert (record.node_id, record.mode, record.relay) == ("a", "follower", True)
    assert (record.incarnation, record.epoch, record.genesis) == ("i1", "e2", "e1")
    assert (record.run_id, record.nonce, record.cert) == ("r", "n", 7)
    assert (record.self_claim, record.collected) == (50, 20)
    assert record.claims == {"b": 40, "c": 0}
    assert record.anchors == {"b": Anchor("tok", sid_key(3, 4), True)}
    assert record.members == frozenset({"a", "b", "c"})
    assert record.forgotten == frozenset({"x", "y"})
    assert (record.state, record.reason, record.recovering) == (RECOVERING, "run_id changed", True)


def test_from_fields_defaults_to_a_serving_mesh_record_without_relay() -> None:
    record = NodeRecord.from_fields({"inc": "i1", "state": ""})
    assert record is not None
    assert (record.mode, record.relay, record.state) == ("mesh", False, SERVING)
    assert not record.recovering
    assert (record.members, record.forgotten, record.genesis) == (frozenset(), frozenset(), "")


def test_token_names_incarnation_epoch_and_relay() -> None:
    record = NodeRecord(incarnation="i1", epoch="e2", relay=True)
    assert record.token == "i1.e2.1"
    assert NodeRecord(incarnation="i1", epoch="e2").token == "i1.e2.0"


def test_claim_about_itself_is_the_certified_self_claim() -> None:
    record = _rec("a", 5, a=99, b=7)
    assert (record.claim("a"), record.claim("b"), record.claim("z")) == (5, 7, 0)


def test_stream_claims_without_relay_hold_only_the_nodes_own_claim() -> None:
    assert _rec("a", 5, a=99, b=7).stream_claims() == {"a": 5}


def test_stream_claims_with_relay_also_carry_the_other_claims() -> None:
    record = NodeRecord(node_id="a", relay=True, self_claim=5, claims={"a": 99, "b": 7})
    assert record.stream_claims() == {"a": 5, "b": 7}


def test_all_claims_hold_every_claim_with_relay_off() -> None:
    assert _rec("a", 5, a=99, b=7, c=3).all_claims() == {"a": 5, "b": 7, "c": 3}


@pytest.mark.parametrize(
    ("genesis", "epoch", "whole"),
    [("e1", "e1", True), ("e1", "e2", False), ("", "", False), ("", "e1", False)],
    ids=["creation-epoch", "epoch-changed", "no-genesis-no-epoch", "no-genesis"],
)
def test_holds_whole_stream_only_in_the_epoch_the_record_was_created_in(
    genesis: str, epoch: str, whole: bool
) -> None:
    assert NodeRecord(incarnation="i", genesis=genesis, epoch=epoch).holds_whole_stream is whole


# ---------------------------------------------------------------------------- hlc fields


@pytest.mark.parametrize("raw", [None, "", "1", "0" * 15, "0" * 17, "zzzzzzzzzzzzzzzz"])
def test_parse_hlc_hex_reads_absent_wrong_length_or_non_hex_as_zero(raw: str | None) -> None:
    assert parse_hlc_hex(raw) == 0


@pytest.mark.parametrize(
    "raw",
    ["-000000000000001", "0x00000000000001", "0000_0000_0000_1", " 00000000000001 "],
)
def test_parse_hlc_hex_reads_sixteen_non_hex_characters_as_zero(raw: str) -> None:
    assert parse_hlc_hex(raw) == 0


@given(st.integers(0, MAX_HLC))
def test_parse_hlc_hex_reads_back_what_hlc_hex_writes(hlc: int) -> None:
    assert parse_hlc_hex(hlc_hex(hlc)) == hlc


# ---------------------------------------------------------------------------- membership


def test_derive_members_keeps_sticky_members_and_adds_mesh_peers_and_their_members() -> None:
    own = NodeRecord(node_id="a", incarnation="i", members=frozenset({"a", "old"}))
    records = {"b": NodeRecord(node_id="b", members=frozenset({"b", "far"}))}
    published, waited, gone = derive_members(
        node_id="a", mode="mesh", peers=["b"], own=own, records=records
    )
    assert published == waited == frozenset({"a", "old", "b", "far"})
    assert gone == frozenset()


def test_a_follower_is_not_a_member() -> None:
    records = {"b": NodeRecord(members=frozenset({"b"})), "f": NodeRecord(mode="follower")}
    published, waited, _ = derive_members(
        node_id="a", mode="mesh", peers=["b", "f"], own=None, records=records
    )
    assert published == waited == frozenset({"a", "b"})
    follower_published, _, _ = derive_members(
        node_id="f", mode="follower", peers=["b"], own=None, records=records
    )
    assert follower_published == frozenset({"b"})


def test_an_unreadable_peer_of_a_mesh_node_is_waited_for_but_not_published() -> None:
    published, waited, _ = derive_members(
        node_id="a", mode="mesh", peers=["b"], own=None, records={"b": None}
    )
    assert (published, waited) == (frozenset({"a"}), frozenset({"a", "b"}))
    _, follower_waited, _ = derive_members(
        node_id="f", mode="follower", peers=["b"], own=None, records={}
    )
    assert follower_waited == frozenset()


def test_forgotten_ids_from_every_source_are_removed_from_both_sets_and_returned() -> None:
    own = NodeRecord(node_id="a", members=frozenset({"a", "x"}), forgotten=frozenset({"x"}))
    records = {"b": NodeRecord(members=frozenset({"b", "y"}), forgotten=frozenset({"y"}))}
    published, waited, gone = derive_members(
        node_id="a", mode="mesh", peers=["b", "z"], own=own, records=records, forgotten=["z"]
    )
    assert published == waited == frozenset({"a", "b"})
    assert gone == frozenset({"x", "y", "z"})


# ---------------------------------------------------------------------------- frontiers


def test_frontier_is_the_lowest_claim_over_members_and_forgotten_and_zero_without_record() -> None:
    record = _rec("a", 50, b=30, x=20)
    assert frontier(record, ["a", "b"]) == 30
    assert frontier(record, ["a", "b"], ["x"]) == 20
    assert frontier(record, ["a", "c"]) == 0
    assert frontier(None, ["a"]) == 0


def test_stable_frontier_of_no_members_is_zero_with_no_one_to_blame() -> None:
    assert stable_frontier([], {"a": _rec("a", 5)}) == (0, None)


def test_a_member_without_a_record_holds_the_stable_frontier_at_zero_and_is_blamed() -> None:
    records = {"a": _rec("a", 90, b=80, c=70), "b": _rec("b", 90, a=90, c=90), "c": None}
    assert stable_frontier(["a", "b", "c"], records) == (0, "c")


def test_stable_frontier_is_the_lowest_claim_about_a_member_or_a_forgotten_node() -> None:
    records = {"a": _rec("a", 90, b=60, x=75), "b": _rec("b", 90, a=90, x=55)}
    assert stable_frontier(["a", "b"], records)[0] == 60
    assert stable_frontier(["a", "b"], records, forgotten=["x"])[0] == 55


# The lowest claim is a's about b (40); who is blamed depends on what b and a show.
@pytest.mark.parametrize(
    ("b_self", "unreadable", "blamed"),
    [(100, ["b"], "b"), (40, [], "b"), (100, [], "a"), (40, ["a"], "a")],
    ids=["origin-down", "origin-stopped-certifying", "claimant-behind", "claimant-down"],
)
def test_stable_frontier_blames_the_member_an_operator_must_look_at(
    b_self: int, unreadable: list[str], blamed: str
) -> None:
    records = {"a": _rec("a", 100, b=40), "b": _rec("b", b_self, a=100)}
    assert stable_frontier(["a", "b"], records, unreadable) == (40, blamed)


def test_a_member_whose_own_certified_claim_is_lowest_is_blamed() -> None:
    records = {"a": _rec("a", 100, b=100), "b": _rec("b", 30, a=100)}
    assert stable_frontier(["a", "b"], records) == (30, "b")


def test_a_member_behind_on_a_forgotten_node_is_blamed_itself() -> None:
    records = {"a": _rec("a", 100, b=100, x=100), "b": _rec("b", 100, a=100, x=10)}
    assert stable_frontier(["a", "b"], records, unreadable=["x"], forgotten=["x"]) == (10, "b")


@st.composite
def meshes(draw: st.DrawFn) -> Mesh:
    members = draw(st.sets(st.sampled_from(NODES), min_size=1))
    low = st.integers(0, 5)
    claims = st.dictionaries(st.sampled_from(NODES + GONE), low)
    records: dict[str, NodeRecord | None] = {
        m: draw(
            st.none() | st.builds(NodeRecord, node_id=st.just(m), self_claim=low, claims=claims)
        )
        for m in members
    }
    unreadable = draw(st.sets(st.sampled_from(NODES)))
    forgotten = draw(st.sets(st.sampled_from(NODES + GONE)))
    return members, records, unreadable, forgotten


@given(meshes())
def test_stable_frontier_never_exceeds_a_members_claim_about_a_member_or_forgotten_node(
    mesh: Mesh,
) -> None:
    members, records, unreadable, forgotten = mesh
    value, blamed = stable_frontier(members, records, unreadable, forgotten)
    every_claim = [
        0 if (record := records[claimant]) is None else record.claim(origin)
        for claimant in members
        for origin in members | forgotten
    ]
    assert value == min(every_claim)
    assert blamed in members


# ---------------------------------------------------------------------------- absence


@pytest.mark.parametrize(
    "authority",
    [None, NodeRecord(node_id="p", state=RECOVERING, claims={"b": ALL_WRITES})],
    ids=["no-record", "recovering"],
)
def test_no_authority_or_a_recovering_one_proves_nothing_dead(authority: NodeRecord | None) -> None:
    assert is_dead_by_absence((1, "b"), authority) is False


@given(st.integers(1, MAX_HLC), hlcs, st.sampled_from(["p", "b"]))
def test_a_version_is_dead_by_absence_iff_the_authoritys_claim_covers_it(
    hlc: int, claim: int, origin: str
) -> None:
    authority = NodeRecord(node_id="p", self_claim=claim, claims={"b": claim})
    assert is_dead_by_absence((hlc, origin), authority) is (claim >= hlc)


def test_an_authority_without_a_claim_about_the_origin_proves_nothing_dead() -> None:
    assert is_dead_by_absence((0, "b"), NodeRecord(node_id="p", incarnation="i")) is False


# ---------------------------------------------------------------------------- ALL_WRITES


def test_all_writes_is_the_greatest_64_bit_hlc() -> None:
    assert ALL_WRITES == MAX_HLC == 2**64 - 1
    assert hlc_hex(ALL_WRITES) == "f" * 16
    assert parse_hlc_hex(hlc_hex(ALL_WRITES)) == ALL_WRITES


@given(st.one_of(st.none(), versions), versions)
def test_a_claim_of_all_writes_covers_every_version(local: Version | None, remote: Version) -> None:
    assert decide(local, remote, ALL_WRITES) is ApplyStatus.KNOWN
    authority = NodeRecord(node_id="p", claims={remote[1]: ALL_WRITES})
    assert is_dead_by_absence((remote[0], remote[1]), authority) is True
