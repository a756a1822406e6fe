"""The drill planner: which tree nodes a walk reads next, and what each comparison found.

Every walk down the tree (the cold path's drill, ``verify``'s diff, a store listing its keys)
goes where :class:`DrillPlan` says, so these examples pin the decisions the walkers rely on:
what is fetched, what is marked empty here, the order of levels, the chunks, and the limit.
"""

from __future__ import annotations

from replication_engine.merkle import Branch, DrillPlan, Geometry, MerkleModel, leaf_digest

G = Geometry(4, 2)


def _digest(key: str, n: int = 1) -> str:
    return leaf_digest(key, n, f"{n:032x}", False)


def _model(versions: dict[str, int], geometry: Geometry = G) -> MerkleModel:
    return MerkleModel.build({key: _digest(key, n) for key, n in versions.items()}, geometry)


def _walk(
    plan: DrillPlan, here: MerkleModel, there: MerkleModel | None = None
) -> tuple[list[list[Branch]], list[str], list[str]]:
    """Drive ``plan`` over two in-memory trees: the chunks read, keys to fetch, keys only here."""
    chunks: list[list[Branch]] = []
    fetch: list[str] = []
    only_here: list[str] = []
    while (chunk := plan.next_chunk()) is not None:
        chunks.append(chunk)
        theirs = None if there is None else [there.node(b.path) for b in chunk]
        step = plan.compared(chunk, [here.node(b.path) for b in chunk], theirs)
        fetch += step.fetch
        only_here += step.only_here
    return chunks, fetch, only_here


def _keys_in_distinct_branches(count: int, level: int = G.depth) -> list[str]:
    """``count`` keys, no two under one node of ``level`` (the leaf level by default)."""
    keys: dict[str, str] = {}
    for i in range(10_000):
        keys.setdefault(G.leaf_path(f"k{i}")[: level * G.width], f"k{i}")
        if len(keys) == count:
            break
    return list(keys.values())


def test_equal_trees_compare_the_root_and_nothing_else() -> None:
    versions = {f"k{i}": i for i in range(20)}
    plan = DrillPlan(G, chunk_paths=8)
    chunks, fetch, only_here = _walk(plan, _model(versions), _model(versions))
    assert chunks == [[Branch("")]]
    assert fetch == only_here == []


def test_the_walk_fetches_what_the_peer_holds_differently_never_what_only_we_hold() -> None:
    common = {f"k{i}": i for i in range(30)}
    here = _model({**common, "mine": 1})
    there = _model({**common, "k3": 99, "theirs": 1})
    plan = DrillPlan(G, chunk_paths=64)
    _chunks, fetch, only_here = _walk(plan, here, there)
    assert sorted(fetch) == ["k3", "theirs"]
    assert only_here == ["mine"]
    assert plan.found == 2 and not plan.is_unfinished


def test_a_leaf_diff_splits_the_keys_to_fetch_and_keeps_our_order_for_ours() -> None:
    plan = DrillPlan(Geometry(2, 1), ["0"], chunk_paths=1)
    leaf = Branch("0")
    assert plan.next_chunk() == [leaf]
    here = {"z": "1" * 32, "same": "2" * 32, "a": "3" * 32, "changed": "4" * 32}
    there = {"same": "2" * 32, "changed": "5" * 32, "new": "6" * 32}
    step = plan.compared([leaf], [here], [there])
    (diff,) = step.leaves
    assert diff.fetch == step.fetch == ["changed", "new"]
    assert diff.only_there == ["new"] and diff.different == ["changed"]
    assert diff.only_here == step.only_here == ["z", "a"]


def test_a_branch_missing_here_is_marked_empty_here_and_so_are_its_children() -> None:
    key = "theirs"
    plan = DrillPlan(G, chunk_paths=64)
    chunks, fetch, _ = _walk(plan, MerkleModel(G), _model({key: 1}))
    leaf = G.leaf_path(key)
    assert chunks == [[Branch("")], [Branch(leaf[:1], True)], [Branch(leaf, True)]]
    assert fetch == [key]


def test_a_branch_present_on_both_sides_is_not_marked_empty_here() -> None:
    here = _model({"k1": 1})
    there = _model({"k1": 2})
    chunks, _, _ = _walk(DrillPlan(G, chunk_paths=64), here, there)
    assert all(not branch.empty_here for chunk in chunks for branch in chunk)


def test_deepest_first_reaches_a_leaf_before_the_rest_of_a_level() -> None:
    keys = _keys_in_distinct_branches(3, level=1)
    plan = DrillPlan(G, chunk_paths=1)
    chunks, fetch, _ = _walk(plan, MerkleModel(G), _model(dict.fromkeys(keys, 1)))
    levels = [len(chunk[0].path) for chunk in chunks]
    assert levels == [0, 1, 2, 1, 2, 1, 2]  # each leaf read before the next level-1 node
    assert sorted(fetch) == sorted(keys)


def test_level_order_reads_each_level_completely_before_the_next() -> None:
    keys = _keys_in_distinct_branches(3, level=1)
    plan = DrillPlan(G, chunk_paths=1, deepest_first=False)
    chunks, fetch, _ = _walk(plan, MerkleModel(G), _model(dict.fromkeys(keys, 1)))
    levels = [len(chunk[0].path) for chunk in chunks]
    assert levels == [0, 1, 1, 1, 2, 2, 2]
    assert sorted(fetch) == sorted(keys)


def test_a_chunk_holds_at_most_chunk_paths_nodes_of_one_level() -> None:
    keys = [f"k{i}" for i in range(200)]
    plan = DrillPlan(G, chunk_paths=3)
    chunks, fetch, _ = _walk(plan, MerkleModel(G), _model(dict.fromkeys(keys, 1)))
    assert all(1 <= len(chunk) <= 3 for chunk in chunks)
    assert all(len({len(branch.path) for branch in chunk}) == 1 for chunk in chunks)
    assert sorted(fetch) == sorted(keys)


def test_the_limit_cuts_the_crossing_chunk_and_hands_out_nothing_more() -> None:
    keys = [f"k{i}" for i in range(100)]
    plan = DrillPlan(G, chunk_paths=4, limit=10)
    _chunks, fetch, _ = _walk(plan, MerkleModel(G), _model(dict.fromkeys(keys, 1)))
    assert len(fetch) == 10 == plan.found
    assert plan.is_limit_reached and plan.cut and plan.is_unfinished
    assert plan.next_chunk() is None


def test_a_limit_met_exactly_leaves_the_walk_finished() -> None:
    keys = _keys_in_distinct_branches(3)
    plan = DrillPlan(G, chunk_paths=64, limit=3)
    _chunks, fetch, _ = _walk(plan, MerkleModel(G), _model(dict.fromkeys(keys, 1)))
    assert sorted(fetch) == sorted(keys)
    assert plan.is_limit_reached and not plan.cut and not plan.is_unfinished


def test_a_chunk_handed_out_and_never_compared_leaves_the_walk_unfinished() -> None:
    plan = DrillPlan(G, chunk_paths=64)
    assert plan.next_chunk() == [Branch("")]
    assert plan.is_unfinished
    plan.compared([Branch("")], [{}], [{}])
    assert not plan.is_unfinished


def test_compared_with_an_empty_tree_the_walk_lists_every_key_once() -> None:
    keys = [f"k{i}" for i in range(150)]
    tree = _model(dict.fromkeys(keys, 1))
    plan = DrillPlan(G, chunk_paths=5, deepest_first=False)
    _chunks, fetch, only_here = _walk(plan, tree)
    assert fetch == []
    assert sorted(only_here) == sorted(keys)


def test_a_walk_can_start_below_the_root() -> None:
    keys = [f"k{i}" for i in range(100)]
    tree = _model(dict.fromkeys(keys, 1))
    branch = G.all_children()[2]
    chunks, _, only_here = _walk(DrillPlan(G, [branch], chunk_paths=64), tree)
    assert chunks[0] == [Branch(branch)]
    assert sorted(only_here) == sorted(k for k in keys if G.leaf_path(k).startswith(branch))
    leaf = G.leaf_path(keys[0])
    _, _, in_leaf = _walk(DrillPlan(G, [leaf], chunk_paths=64), tree)
    assert sorted(in_leaf) == sorted(k for k in keys if G.leaf_path(k) == leaf)
