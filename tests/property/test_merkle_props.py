"""Merkle invariants: incremental updates equal a rebuild, and the diff planner is exact.

Incremental XOR updates are what the Lua write path does; a rebuild from scratch is what a peer
effectively compares against. If the two ever disagree, anti-entropy repairs forever. Tiny
geometries put many keys in one bucket, which is where bookkeeping mistakes show.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from replication_engine.merkle import (
    ZERO_HEX,
    DrillPlan,
    Geometry,
    MerkleModel,
    combine,
    diff_children,
    diff_leaf,
    leaf_digest,
    leaf_digest_words,
)


@st.composite
def valid_geometries(draw: st.DrawFn) -> Geometry:
    depth = draw(st.integers(1, 4))
    bits = draw(st.integers(1, min(16, 32 // depth)))
    return Geometry(1 << bits, depth)


any_geometry = (
    st.sampled_from(
        [
            Geometry(2, 1),
            Geometry(2, 3),
            Geometry(4, 2),
            Geometry(8, 3),
            Geometry(16, 2),
            Geometry(256, 2),
            Geometry(65536, 1),
        ]
    )
    | valid_geometries()
)

# A small key space so that sequences revisit keys (overwrite, delete, re-create).
key_space = st.sampled_from([f"k{i}" for i in range(40)] + ["", "a:b", "ключ", "a b", "🎉"])
digests = st.integers(0, (1 << 128) - 1).map(lambda n: f"{n:032x}") | st.just(ZERO_HEX)
operations = st.lists(st.tuples(key_space, st.none() | digests), max_size=120)


def _assert_same(a: MerkleModel, b: MerkleModel) -> None:
    assert a.root == b.root
    assert a.nodes == b.nodes
    assert a.leaves == b.leaves


@settings(max_examples=200)
@given(any_geometry, operations)
def test_incremental_set_equals_build(
    geometry: Geometry, ops: list[tuple[str, str | None]]
) -> None:
    model = MerkleModel(geometry)
    truth: dict[str, str] = {}
    for key, digest in ops:
        model.set(key, digest)
        if digest is None:
            truth.pop(key, None)
        else:
            truth[key] = digest
    _assert_same(model, MerkleModel.build(truth, geometry))
    assert model.root == combine(truth.values())


@settings(max_examples=100)
@given(any_geometry, st.dictionaries(key_space, digests, max_size=40), st.randoms())
def test_insertion_order_does_not_matter(
    geometry: Geometry, truth: dict[str, str], rnd: random.Random
) -> None:
    items = list(truth.items())
    rnd.shuffle(items)
    model = MerkleModel(geometry)
    for key, digest in items:
        model.set(key, digest)
    _assert_same(model, MerkleModel.build(truth, geometry))


@given(valid_geometries(), st.text(max_size=30))
def test_leaf_path_is_consistent(geometry: Geometry, key: str) -> None:
    bucket = geometry.bucket(key)
    assert 0 <= bucket < geometry.leaf_count
    segments = geometry.segments(bucket)
    assert len(segments) == geometry.depth
    rebuilt = 0
    for segment in segments:
        assert len(segment) == geometry.width
        assert int(segment, 16) < geometry.fanout
        rebuilt = (rebuilt << geometry.bits_per_level) | int(segment, 16)
    assert rebuilt == bucket
    assert geometry.leaf_path(key) == "".join(segments)
    assert geometry.is_leaf(geometry.leaf_path(key))


# ---------------------------------------------------------------------------- diff planning

children_maps = st.dictionaries(
    st.sampled_from([f"{i:02x}" for i in range(8)]), digests, max_size=8
)


@given(children_maps, children_maps)
def test_diff_children_is_symmetric_and_zero_is_absent(
    a: dict[str, str], b: dict[str, str]
) -> None:
    diff = diff_children(a, b)
    assert diff == diff_children(b, a)
    assert diff == sorted(diff)
    nonzero_a = {k: v for k, v in a.items() if v != ZERO_HEX}
    nonzero_b = {k: v for k, v in b.items() if v != ZERO_HEX}
    assert (diff == []) == (nonzero_a == nonzero_b)
    assert set(diff) == {k for k in set(a) | set(b) if nonzero_a.get(k) != nonzero_b.get(k)}


@given(children_maps, children_maps)
def test_diff_leaf_never_fetches_local_only_keys(
    local: dict[str, str], remote: dict[str, str]
) -> None:
    fetched = diff_leaf(local, remote)
    assert set(fetched) <= set(remote)
    assert set(fetched) == {k for k, v in remote.items() if local.get(k) != v}


# Versions are realistic leaf digests, so XOR cancellation between different contents is
# cryptographically unlikely; with arbitrary digests the planner can be fooled by design.
versions = st.tuples(
    st.integers(0, 1 << 20), st.sampled_from(["", "aa" * 16, "bb" * 16]), st.booleans()
)
version_maps = st.dictionaries(key_space, versions, max_size=45)


def _digests(store: dict[str, tuple[int, str, bool]]) -> dict[str, str]:
    return {k: leaf_digest(k, hlc, h, tomb) for k, (hlc, h, tomb) in store.items()}


@settings(max_examples=200)
@given(any_geometry, version_maps, version_maps, version_maps)
def test_planner_finds_exactly_the_keys_to_fetch(
    geometry: Geometry,
    common: dict[str, tuple[int, str, bool]],
    local_extra: dict[str, tuple[int, str, bool]],
    remote_extra: dict[str, tuple[int, str, bool]],
) -> None:
    local_digests = _digests({**common, **local_extra})
    remote_digests = _digests({**common, **remote_extra})
    local = MerkleModel.build(local_digests, geometry)
    remote = MerkleModel.build(remote_digests, geometry)

    fetched: list[str] = []
    plan = DrillPlan(geometry, chunk_paths=16)
    while (chunk := plan.next_chunk()) is not None:
        here = [local.node(branch.path) for branch in chunk]
        fetched += plan.compared(chunk, here, [remote.node(b.path) for b in chunk]).fetch

    expected = {k for k, d in remote_digests.items() if local_digests.get(k) != d}
    assert len(fetched) == len(set(fetched))  # no key is fetched twice
    assert set(fetched) == expected
    assert (local.root == remote.root) == (local_digests == remote_digests)


@given(
    st.text(min_size=1, max_size=40),
    st.integers(0, (1 << 64) - 1),
    st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
    st.booleans(),
)
def test_leaf_digest_words_are_the_digest_cut_in_four(
    key: str, hlc: int, content_hash: str, tombstone: bool
) -> None:
    """The apply path sends a leaf's digest twice, as hex and as the four 32-bit words the
    scripts XOR; a word that disagreed with the hex would move a tree off its items."""
    digest, *words = leaf_digest_words(key, hlc, content_hash, tombstone)
    assert digest == leaf_digest(key, hlc, content_hash, tombstone)
    assert len(digest) == 32
    assert words == [int(digest[i : i + 8], 16) for i in range(0, 32, 8)]
