"""What a repair remembers of the versions it rejected (``cold_path.fetch.Rejections``).

The memory is what makes each rejected version kept in the quarantine and counted once, however
many cycles meet it, within a bound; it is pure, so its rules are pinned here without a store.
"""

from __future__ import annotations

from replication_engine.cold_path.fetch import KEPT_BY_STREAM, Rejections


def test_a_version_held_is_told_apart_from_a_new_version_of_the_same_key() -> None:
    rejections = Rejections()
    rejections.hold("b", "k", ("clock_skew", 7, "c"))
    assert rejections.held("b", "k") == ("clock_skew", 7, "c")
    assert rejections.held("b", "k") != ("clock_skew", 8, "c")
    assert rejections.held("c", "k") is None  # per peer


def test_a_key_no_longer_rejected_is_forgotten_so_a_later_rejection_is_new() -> None:
    rejections = Rejections()
    rejections.hold("b", "k", ("corrupt", b"0a", b"c"))
    rejections.forget("b", "k")
    assert rejections.held("b", "k") is None


def test_keys_the_stream_kept_hold_a_marker_until_a_repair_meets_their_version() -> None:
    rejections = Rejections()
    rejections.hold("b", "k", ("clock_skew", 7, "c"))
    rejections.hold_by_stream("b", ["k", "j"])
    assert rejections.held("b", "k") == KEPT_BY_STREAM
    assert rejections.held("b", "j") == KEPT_BY_STREAM


def test_past_the_bound_the_least_recently_held_is_forgotten_first() -> None:
    rejections = Rejections(limit=2)
    rejections.hold("b", "first", 1)
    rejections.hold("b", "second", 2)
    rejections.hold("b", "first", 3)  # held again: now the newest
    rejections.hold("b", "third", 4)
    assert rejections.held("b", "second") is None
    assert (rejections.held("b", "first"), rejections.held("b", "third")) == (3, 4)
