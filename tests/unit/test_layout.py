"""Which keys under a node's prefix belong to the format (``verify --deep``'s stray check)."""

from __future__ import annotations

import pytest

from replication_engine.store.layout import Keyspace, key_problem

WIDTH, DEPTH = 2, 2  # fanout 256, depth 2: tree paths "", "ab", "ab3f"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("app:{0}cdc", "stream"),
        ("app:meta", "hash"),
        ("app:{0}meta", "hash"),
        ("app:{0}hlc", "string"),
        ("app:{0}mk:root", "string"),
        ("app:{0}tombs", "zset"),
        ("app:{0}node", "hash"),
        ("app:{0}item:any key at all", "hash"),
        ("app:{0}item:", "hash"),
        ("app:{0}mk:", "hash"),
        ("app:{0}mk:ab", "hash"),
        ("app:{0}mk:ab3f", "hash"),
        ("other:anything", "string"),  # outside the prefix
    ],
)
def test_keys_of_the_format_belong(name: str, kind: str) -> None:
    assert key_problem(Keyspace("app:"), WIDTH, DEPTH, name, kind) is None


@pytest.mark.parametrize(
    ("name", "kind", "problem"),
    [
        ("app:{0}notes", "string", "not a key of the format"),
        ("app:{0}mk:ab3f00", "hash", "not a key of the format"),  # deeper than the tree
        ("app:{0}mk:a", "hash", "not a key of the format"),  # not a whole level
        ("app:{0}mk:AB", "hash", "not a key of the format"),  # paths are lower-case hex
        ("app:{0}item:x", "string", "wrong type: string, the format has a hash"),
        ("app:{0}cdc", "list", "wrong type: list, the format has a stream"),
        ("app:{0}mk:ab", "string", "wrong type: string, the format has a hash"),
    ],
)
def test_other_keys_under_the_prefix_are_stray(name: str, kind: str, problem: str) -> None:
    assert key_problem(Keyspace("app:"), WIDTH, DEPTH, name, kind) == problem


def test_an_empty_prefix_shares_the_keyspace_so_only_format_keys_are_checked() -> None:
    keys = Keyspace("")
    assert key_problem(keys, WIDTH, DEPTH, "someone-elses-key", "list") is None
    assert key_problem(keys, WIDTH, DEPTH, "{0}item:x", "string") is not None


def test_a_prefix_with_a_brace_is_refused_since_it_would_take_the_partitions_hash_tag() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        Keyspace("app{x}:")


def test_in_a_store_of_many_partitions_every_partitions_keys_belong_and_no_others() -> None:
    """Partitions of one store may share a Redis: the stray check of one must not call the
    others' keys stray, nor accept a tag that is no partition of the store."""
    keys = Keyspace("app:", "3f")
    names = ["00", "3f", "ff"]
    assert key_problem(keys, WIDTH, DEPTH, "app:{ff}item:x", "hash", names) is None
    assert key_problem(keys, WIDTH, DEPTH, "app:{00}mk:00a1", "hash", names) is None
    assert key_problem(keys, WIDTH, DEPTH, "app:{0}item:x", "hash", names) is not None
    assert key_problem(keys, WIDTH, DEPTH, "app:{ab}item:x", "hash", names) is not None
    assert key_problem(keys, WIDTH, DEPTH, "app:{ff}item:x", "string", names) is not None


def test_a_partition_is_named_in_hex_and_its_keys_carry_it_as_their_hash_tag() -> None:
    assert Keyspace("app:", "3f").item("k") == "app:{3f}item:k"
    assert Keyspace("app:").of("a").record == "app:{a}node"
    with pytest.raises(ValueError, match="partition"):
        Keyspace("app:", "x}")
