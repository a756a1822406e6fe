"""The drill planner, walked over random pairs of trees, finds exactly what differs.

Every tree walk in the package (the cold path's drill, ``verify``'s diff, a store listing the
keys under a node) goes where :class:`DrillPlan` says; if it missed a branch, anti-entropy
would leave a difference for good, and if it wandered into equal branches a repair would cost
what the store holds instead of what differs. The trees are :class:`MerkleModel`, the spec the
Lua write path is tested against. Digests are realistic leaf digests: with crafted ones XOR
cancellation can hide a difference by design.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from replication_engine.merkle import Branch, DrillPlan, Geometry, MerkleModel, leaf_digest

geometries = st.sampled_from(
    [Geometry(2, 1), Geometry(2, 3), Geometry(4, 2), Geometry(8, 3), Geometry(16, 2)]
)
keys = st.sampled_from([f"k{i}" for i in range(60)] + ["", "a:b", "ключ", "🎉"])
versions = st.dictionaries(keys, st.integers(0, 3), max_size=40)
chunk_sizes = st.integers(1, 9)


def _tree(geometry: Geometry, held: dict[str, int]) -> tuple[MerkleModel, dict[str, str]]:
    digests = {key: leaf_digest(key, n, f"{n:032x}", n == 0) for key, n in held.items()}
    return MerkleModel.build(digests, geometry), digests


@dataclass
class Walk:
    chunks: list[list[Branch]] = field(default_factory=list)
    fetch: list[str] = field(default_factory=list)
    only_here: list[str] = field(default_factory=list)
    only_there: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)


def _walk(plan: DrillPlan, here: MerkleModel, there: MerkleModel | None) -> Walk:
    walk = Walk()
    while (chunk := plan.next_chunk()) is not None:
        walk.chunks.append(chunk)
        theirs = None if there is None else [there.node(b.path) for b in chunk]
        step = plan.compared(chunk, [here.node(b.path) for b in chunk], theirs)
        walk.fetch += step.fetch
        walk.only_here += step.only_here
        for leaf in step.leaves:
            walk.only_there += leaf.only_there
            walk.different += leaf.different
    return walk


@settings(max_examples=300)
@given(geometries, versions, versions, versions, chunk_sizes, st.booleans())
def test_the_walk_finds_exactly_the_differing_keys_and_reads_only_differing_nodes(
    geometry: Geometry,
    common: dict[str, int],
    mine: dict[str, int],
    theirs: dict[str, int],
    chunk_paths: int,
    deepest_first: bool,
) -> None:
    here, ours = _tree(geometry, {**common, **mine})
    there, peers = _tree(geometry, {**common, **theirs})
    plan = DrillPlan(geometry, chunk_paths=chunk_paths, deepest_first=deepest_first)
    walk = _walk(plan, here, there)

    assert sorted(walk.fetch) == sorted(k for k, d in peers.items() if ours.get(k) != d)
    assert sorted(walk.only_here) == sorted(set(ours) - set(peers))
    assert sorted(walk.only_there) == sorted(set(peers) - set(ours))
    assert sorted(walk.different) == sorted(
        k for k in set(ours) & set(peers) if ours[k] != peers[k]
    )
    assert len(walk.fetch) == len(set(walk.fetch)) and not plan.is_unfinished
    visited = [branch for chunk in walk.chunks for branch in chunk]
    assert len(visited) == len({b.path for b in visited})  # no node is read twice
    for branch in visited[1:]:  # below the root only branches that differ are read
        assert here.node(branch.path) != there.node(branch.path)
        if branch.empty_here:  # and one marked empty here is: reading it here is skipped
            assert here.node(branch.path) == {}
    assert all(0 < len(chunk) <= chunk_paths for chunk in walk.chunks)


@settings(max_examples=200)
@given(geometries, versions, versions, chunk_sizes, st.integers(0, 30))
def test_a_limit_fetches_no_more_and_leaves_the_walk_unfinished_only_when_keys_remain(
    geometry: Geometry,
    mine: dict[str, int],
    theirs: dict[str, int],
    chunk_paths: int,
    limit: int,
) -> None:
    here, ours = _tree(geometry, mine)
    there, peers = _tree(geometry, theirs)
    differing = {k for k, d in peers.items() if ours.get(k) != d}
    plan = DrillPlan(geometry, chunk_paths=chunk_paths, limit=limit)
    walk = _walk(plan, here, there)

    assert len(walk.fetch) == min(limit, len(differing)) == plan.found
    assert set(walk.fetch) <= differing
    if len(differing) > limit:
        assert plan.is_unfinished
    if not plan.is_unfinished:
        assert set(walk.fetch) == differing


@settings(max_examples=200)
@given(geometries, versions, chunk_sizes, st.booleans())
def test_compared_with_an_empty_tree_the_walk_lists_every_key_once(
    geometry: Geometry, held: dict[str, int], chunk_paths: int, deepest_first: bool
) -> None:
    tree, digests = _tree(geometry, held)
    plan = DrillPlan(geometry, chunk_paths=chunk_paths, deepest_first=deepest_first)
    walk = _walk(plan, tree, None)
    assert sorted(walk.only_here) == sorted(digests) and walk.fetch == []
    # Every node that holds something is read, and nothing else below the root.
    read = {branch.path for chunk in walk.chunks for branch in chunk} - {""}
    assert read == (set(tree.nodes) | set(tree.leaves)) - {""}
