"""Which keys under a node's prefix belong to the format (``verify --deep``'s stray check)."""

from __future__ import annotations

import pytest

from replication_engine.store.layout import Keyspace, key_problem

WIDTH, DEPTH = 2, 2  # fanout 256, depth 2: tree paths "", "ab", "ab3f"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("app:cdc", "stream"),
        ("app:meta", "hash"),
        ("app:hlc", "string"),
        ("app:mk:root", "string"),
        ("app:tombs", "zset"),
        ("app:node", "hash"),
        ("app:item:any key at all", "hash"),
        ("app:item:", "hash"),
        ("app:mk:", "hash"),
        ("app:mk:ab", "hash"),
        ("app:mk:ab3f", "hash"),
        ("other:anything", "string"),  # outside the prefix
    ],
)
def test_keys_of_the_format_belong(name: str, kind: str) -> None:
    assert key_problem(Keyspace("app:"), WIDTH, DEPTH, name, kind) is None


@pytest.mark.parametrize(
    ("name", "kind", "problem"),
    [
        ("app:notes", "string", "not a key of the format"),
        ("app:mk:ab3f00", "hash", "not a key of the format"),  # deeper than the tree
        ("app:mk:a", "hash", "not a key of the format"),  # not a whole level
        ("app:mk:AB", "hash", "not a key of the format"),  # paths are lower-case hex
        ("app:item:x", "string", "wrong type: string, the format has a hash"),
        ("app:cdc", "list", "wrong type: list, the format has a stream"),
        ("app:mk:ab", "string", "wrong type: string, the format has a hash"),
    ],
)
def test_other_keys_under_the_prefix_are_stray(name: str, kind: str, problem: str) -> None:
    assert key_problem(Keyspace("app:"), WIDTH, DEPTH, name, kind) == problem


def test_an_empty_prefix_shares_the_keyspace_so_only_format_keys_are_checked() -> None:
    keys = Keyspace("")
    assert key_problem(keys, WIDTH, DEPTH, "someone-elses-key", "list") is None
    assert key_problem(keys, WIDTH, DEPTH, "item:x", "string") is not None
