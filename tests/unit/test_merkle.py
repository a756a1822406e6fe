"""Merkle geometry, digests, the reference model and diff planning.

The Lua scripts are tested against :class:`MerkleModel`, and every node compares trees built by
those scripts, so the model and the path arithmetic must be right on their own first.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication_engine.merkle import (
    BUCKET_HASH,
    DIGEST_HEX,
    LEAF_HASH,
    ZERO_HEX,
    DrillPlan,
    FormatError,
    Geometry,
    GeometryError,
    MerkleModel,
    combine,
    diff_children,
    diff_leaf,
    leaf_digest,
    xor_hex,
)

KEYS = [f"key:{i}" for i in range(300)] + ["", "ключ", "a b", "a.b:c", "🎉"]


def _digest(n: int) -> str:
    return leaf_digest(f"k{n}", n, f"{n:032x}", n % 3 == 0)


# ---------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("fanout", "depth"),
    [
        (1, 2),
        (0, 1),
        (-2, 1),
        (3, 2),
        (6, 1),
        (100, 2),
        (131072, 1),
        (2, 0),
        (2, 5),
        (256, 5),
        (65536, 3),
        (256, 5),
        (4096, 3),
    ],
)
def test_geometry_rejects_invalid_shapes(fanout: int, depth: int) -> None:
    with pytest.raises(GeometryError):
        Geometry(fanout, depth)


@pytest.mark.parametrize(
    ("fanout", "depth", "width", "leaves"),
    [
        (2, 1, 1, 2),
        (2, 4, 1, 16),
        (16, 3, 1, 4096),
        (256, 2, 2, 65536),
        (256, 4, 2, 1 << 32),
        (32, 2, 2, 1024),
        (65536, 2, 4, 1 << 32),
        (65536, 1, 4, 65536),
    ],
)
def test_geometry_accepts_valid_shapes(fanout: int, depth: int, width: int, leaves: int) -> None:
    g = Geometry(fanout, depth)
    assert g.width == width
    assert g.leaf_count == leaves
    assert g.bits_per_level * depth <= 32


def test_default_geometry_is_256_by_2() -> None:
    assert Geometry() == Geometry(256, 2)


def test_geometry_fields_round_trip() -> None:
    g = Geometry(16, 3)
    fields = g.as_fields()
    assert fields == {
        "format": "2",
        "fanout": "16",
        "depth": "3",
        "leaf_hash": LEAF_HASH,
        "bucket_hash": BUCKET_HASH,
        "partitions": "1",
    }
    assert Geometry.from_fields(fields) == g


def test_a_store_of_fanout_partitions_records_them_and_reads_them_back() -> None:
    g = Geometry(16, 2, 16)
    assert g.as_fields()["partitions"] == "16"
    assert Geometry.from_fields(g.as_fields()) == g
    assert g != Geometry(16, 2)  # a peer with another partition count is another layout
    assert "partitions=16" in g.describe()


@pytest.mark.parametrize(
    ("fanout", "partitions"), [(16, 4), (16, 256), (256, 16), (256, 256), (1024, 1024)]
)
def test_partitions_other_than_one_or_the_fanout_are_refused_by_name(
    fanout: int, partitions: int
) -> None:
    with pytest.raises(GeometryError, match="partitions expected 1 or the fanout"):
        Geometry(fanout, 1, partitions)


@given(st.text(min_size=1, max_size=30))
def test_a_keys_partition_is_the_first_level_of_its_leaf_path(key: str) -> None:
    split = Geometry(16, 3, 16)
    assert split.partition_of(key) == split.leaf_path(key)[:1]
    assert split.partition_of(key) in split.partition_names
    assert Geometry(16, 3).partition_of(key) == "0"


def test_a_format_1_store_is_refused_with_the_command_that_converts_it() -> None:
    # What format 1 recorded: no format field, xxh3 buckets.
    v1 = {"fanout": "256", "depth": "2", "leaf_hash": LEAF_HASH, "bucket_hash": "xxh3-64"}
    with pytest.raises(FormatError, match="replication-engine migrate --config FILE"):
        Geometry.from_fields(v1)
    with pytest.raises(FormatError, match="newer than this version"):
        Geometry.from_fields({**v1, "format": "3"})


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"fanout": "16"},
        {"fanout": "x", "depth": "2"},
        {"fanout": "3", "depth": "2"},
        {"fanout": "16", "depth": "3", "leaf_hash": "md5"},
        {"fanout": "16", "depth": "3", "bucket_hash": "crc32"},
    ],
)
def test_geometry_from_bad_fields(fields: dict[str, str]) -> None:
    with pytest.raises(GeometryError):
        Geometry.from_fields(fields)


def test_describe_names_the_shape() -> None:
    text = Geometry(16, 3).describe()
    assert "fanout=16" in text and "depth=3" in text


@pytest.mark.parametrize(
    ("fanout", "depth"),
    [
        (2, 1),
        (2, 3),
        (4, 4),
        (8, 2),
        (16, 3),
        (32, 2),
        (256, 2),
        (256, 4),
        (1024, 3),
        (65536, 1),
        (65536, 2),
    ],
)
def test_bucket_segments_and_leaf_path_agree(fanout: int, depth: int) -> None:
    g = Geometry(fanout, depth)
    children = set(g.all_children())
    for key in KEYS:
        bucket = g.bucket(key)
        assert 0 <= bucket < g.leaf_count
        segments = g.segments(bucket)
        assert len(segments) == depth
        assert all(len(s) == g.width for s in segments)
        assert all(int(s, 16) < fanout for s in segments)
        # Reassembling the segments gives the bucket back: each level holds exactly its bits.
        rebuilt = 0
        for s in segments:
            rebuilt = (rebuilt << g.bits_per_level) | int(s, 16)
        assert rebuilt == bucket
        path = g.leaf_path(key)
        assert path == "".join(segments)
        assert g.is_leaf(path)
        assert not g.is_leaf(path[: -g.width])
        assert all(s in children for s in segments)


def test_bucket_is_the_top_bits_of_the_key_hash() -> None:
    # A deeper tree refines a shallower one with the same fanout: the prefix of the path agrees.
    shallow, deep = Geometry(16, 2), Geometry(16, 4)
    for key in KEYS:
        assert deep.leaf_path(key).startswith(shallow.leaf_path(key))


def test_all_children_lists_fanout_fixed_width_names() -> None:
    g = Geometry(32, 2)
    children = g.all_children()
    assert len(children) == 32 and len(set(children)) == 32
    assert children[0] == "00" and children[-1] == "1f"


# ---------------------------------------------------------------------------- digests


def test_leaf_digest_is_128_bit_hex() -> None:
    d = leaf_digest("k", 1, "ab" * 16, False)
    assert len(d) == DIGEST_HEX
    int(d, 16)


def test_leaf_digest_depends_on_every_input() -> None:
    base = ("key", 5, "ab" * 16, False)
    variants = [
        ("kez", 5, "ab" * 16, False),
        ("key", 6, "ab" * 16, False),
        ("key", 5, "ac" * 16, False),
        ("key", 5, "ab" * 16, True),
    ]
    digests = {leaf_digest(*base)} | {leaf_digest(*v) for v in variants}
    assert len(digests) == 5


def test_leaf_digest_length_prefix_separates_keys_containing_separators() -> None:
    # Without the length prefix "a|" + hlc... and "a" + "|"... could produce one text.
    assert leaf_digest("a|0000000000000001", 1, "", False) != leaf_digest("a", 1, "", False)
    assert leaf_digest("1:a", 0, "", False) != leaf_digest("a", 0, "", False)


def test_xor_and_combine() -> None:
    a, b = _digest(1), _digest(2)
    assert xor_hex(a, a) == ZERO_HEX
    assert xor_hex(a, ZERO_HEX) == a
    assert xor_hex(a, b) == xor_hex(b, a)
    assert combine([]) == ZERO_HEX
    assert combine([a, b, a]) == b
    assert len(combine([a, b])) == DIGEST_HEX


# ---------------------------------------------------------------------------- model


@pytest.mark.parametrize("geometry", [Geometry(2, 3), Geometry(4, 2), Geometry(256, 2)])
def test_incremental_equals_build(geometry: Geometry) -> None:
    digests = {key: leaf_digest(key, i, f"{i:032x}", False) for i, key in enumerate(KEYS)}
    model = MerkleModel(geometry)
    for key, digest in digests.items():
        model.set(key, digest)
    for key in KEYS[::3]:
        model.set(key, None)
        del digests[key]
    built = MerkleModel.build(digests, geometry)
    assert model.root == built.root
    assert model.nodes == built.nodes
    assert model.leaves == built.leaves


def test_empty_model_has_zero_root_and_no_nodes() -> None:
    model = MerkleModel(Geometry(4, 2))
    assert model.root == ZERO_HEX
    model.set("a", _digest(1))
    model.set("a", None)
    assert model.root == ZERO_HEX
    assert model.nodes == {} and model.leaves == {}
    assert MerkleModel.build({}).root == ZERO_HEX


def test_removing_an_absent_key_changes_nothing() -> None:
    model = MerkleModel(Geometry(4, 2))
    model.set("a", _digest(1))
    before = (model.root, dict(model.nodes), dict(model.leaves))
    model.set("never-set", None)
    assert (model.root, model.nodes, model.leaves) == before


def test_root_is_xor_of_all_leaf_digests() -> None:
    digests = {f"k{i}": _digest(i) for i in range(50)}
    assert MerkleModel.build(digests, Geometry(16, 2)).root == combine(digests.values())


def test_interior_nodes_hold_xor_of_their_children() -> None:
    g = Geometry(4, 3)
    model = MerkleModel.build({f"k{i}": _digest(i) for i in range(100)}, g)
    for path, children in model.nodes.items():
        for child, value in children.items():
            sub = path + child
            expected = (
                combine(model.leaves[sub].values())
                if g.is_leaf(sub)
                else combine(model.nodes[sub].values())
            )
            assert value == expected


def test_root_does_not_depend_on_geometry() -> None:
    digests = {f"k{i}": _digest(i) for i in range(64)}
    roots = {MerkleModel.build(digests, Geometry(f, d)).root for f, d in [(2, 1), (2, 4), (256, 2)]}
    assert len(roots) == 1


# ---------------------------------------------------------------------------- diffs


def test_diff_children_absent_equals_zero() -> None:
    a = _digest(1)
    assert diff_children({"00": a, "01": ZERO_HEX}, {"00": a}) == []
    assert diff_children({}, {"05": ZERO_HEX}) == []
    assert diff_children({"00": a}, {}) == ["00"]
    assert diff_children({}, {"00": a}) == ["00"]


def test_diff_children_lists_every_differing_child_sorted() -> None:
    a, b, c = _digest(1), _digest(2), _digest(3)
    local = {"03": a, "01": b, "02": c}
    remote = {"03": a, "01": c, "04": b}
    assert diff_children(local, remote) == ["01", "02", "04"]
    assert diff_children(remote, local) == ["01", "02", "04"]


def test_diff_leaf_fetches_remote_only_and_changed_never_local_only() -> None:
    a, b, c = _digest(1), _digest(2), _digest(3)
    local = {"same": a, "changed": b, "local-only": c}
    remote = {"same": a, "changed": c, "remote-only": a}
    assert diff_leaf(local, remote) == ["changed", "remote-only"]
    assert diff_leaf(remote, local) == ["changed", "local-only"]
    assert diff_leaf(local, {}) == []
    assert diff_leaf(local, local) == []


def test_planner_descends_only_into_differing_branches() -> None:
    g = Geometry(4, 3)
    common = {f"k{i}": _digest(i) for i in range(200)}
    remote_digests = dict(common)
    remote_digests["k5"] = _digest(1005)  # changed on the peer
    remote_digests["new"] = _digest(2000)  # only the peer has it
    local_digests = dict(common)
    local_digests["mine"] = _digest(3000)  # only we have it: never fetched
    local, remote = MerkleModel.build(local_digests, g), MerkleModel.build(remote_digests, g)

    visited: list[str] = []
    fetched: list[str] = []
    plan = DrillPlan(g, chunk_paths=1)
    while (chunk := plan.next_chunk()) is not None:
        visited += [branch.path for branch in chunk]
        here = [local.node(branch.path) for branch in chunk]
        fetched += plan.compared(chunk, here, [remote.node(b.path) for b in chunk]).fetch
    assert sorted(fetched) == ["k5", "new"]
    # At most three branches differ per level, so the walk stays far from the whole tree.
    assert len(visited) <= 1 + 3 + 3 + 3


def test_equal_trees_diff_to_nothing() -> None:
    digests = {f"k{i}": _digest(i) for i in range(50)}
    a = MerkleModel.build(digests, Geometry(16, 2))
    b = MerkleModel(Geometry(16, 2))
    for key, digest in reversed(list(digests.items())):
        b.set(key, digest)
    assert a.root == b.root
    assert diff_children(a.nodes.get("", {}), b.nodes.get("", {})) == []


def test_xor_cancellation_is_possible_only_with_crafted_digests() -> None:
    # Documents the limit of an XOR tree: swapping two digests within a bucket is invisible.
    g = Geometry(2, 1)
    same_bucket = [k for k in (f"k{i}" for i in range(100)) if g.leaf_path(k) == "0"][:2]
    a, b = _digest(1), _digest(2)
    x = MerkleModel.build({same_bucket[0]: a, same_bucket[1]: b}, g)
    y = MerkleModel.build({same_bucket[0]: b, same_bucket[1]: a}, g)
    assert x.root == y.root
    assert x.leaves != y.leaves
    assert list(itertools.chain(*x.leaves.values())) == list(itertools.chain(*y.leaves.values()))


@pytest.mark.parametrize(
    ("fanout", "depth"), [(2, 1), (2, 4), (8, 3), (16, 2), (32, 4), (256, 2), (4096, 2), (65536, 1)]
)
@given(key=st.text(min_size=1, max_size=40))
def test_leaf_path_is_the_segments_of_the_bucket_for_every_geometry(
    fanout: int, depth: int, key: str
) -> None:
    geometry = Geometry(fanout, depth)
    assert geometry.leaf_path(key) == "".join(geometry.segments(geometry.bucket(key)))
