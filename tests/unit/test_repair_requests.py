"""Repair requests: what stands until a repair answers it, and what answers it.

The bookkeeping is pure (``cold_path.requests``), so the rules that decide when a tailer may
trust a peer's stream again, and when a recovery or a forget barrier is satisfied, are pinned
here without a store.
"""

from __future__ import annotations

from typing import Any

from replication_engine.cold_path.requests import REQUESTED_KEYS_MAX, RepairRequests
from replication_engine.cold_path.stats import PeerRepair


def _done(**fields: Any) -> PeerRepair:
    """A repair that ended without error; ``complete`` means its claims were taken."""
    return PeerRepair(peer="b", **fields)


def test_nothing_requested_is_false_and_pending_nothing() -> None:
    requests = RepairRequests()
    assert not requests
    assert not requests.has_pending("b") and requests.peers() == set()


def test_a_request_names_its_reason_and_keys_in_order_within_the_budget() -> None:
    requests = RepairRequests()
    assert requests.add("b", "quarantine", ["k2", "k1", "k2"], at=1.0) == 0
    assert requests and requests.peers() == {"b"}
    assert requests.is_requested("b", "quarantine") and not requests.is_requested("b", "gap")
    assert requests.reasons("b") == ["quarantine"] and requests.pending_keys("b") == 2
    assert requests.keys_to_fetch("b", 1) == ["k2"]
    assert requests.keys_to_fetch("b", 0) == []


def test_keys_past_the_bound_are_dropped_and_counted() -> None:
    requests = RepairRequests()
    assert requests.add("b", "quarantine", map(str, range(REQUESTED_KEYS_MAX)), at=1.0) == 0
    assert requests.add("b", "quarantine", ["0", "new", "newer"], at=2.0) == 2
    assert requests.pending_keys("b") == REQUESTED_KEYS_MAX


def test_only_reasons_that_set_keys_aside_make_the_stream_unproven() -> None:
    requests = RepairRequests()
    requests.add("b", "gap", [], at=1.0)
    requests.ask_anchor("b", at=1.0)
    assert not requests.has_pending("b")
    for reason in ("quarantine", "clock_skew", "refused"):
        other = RepairRequests()
        other.add("b", reason, [], at=1.0)
        assert other.has_pending("b"), reason
    requests.keep("b", "refused-key")
    assert requests.has_pending("b")


def test_a_complete_repair_settles_the_reasons_asked_before_it_began() -> None:
    requests = RepairRequests()
    requests.add("b", "gap", ["k"], at=1.0)
    requests.add("b", "recovery", [], at=5.0)
    requests.settle("b", ["k"], _done(complete=True), has_record=True, began=3.0)
    assert requests.reasons("b") == ["recovery"]  # asked after the repair began: stands
    requests.settle("b", [], _done(complete=True), has_record=True, began=6.0)
    assert not requests and requests.pending_keys("b") == 0


def test_keys_that_did_not_land_keep_the_request_standing() -> None:
    requests = RepairRequests()
    requests.add("b", "quarantine", ["k"], at=1.0)
    requests.settle("b", ["k"], _done(complete=True, items_refused=1), has_record=True, began=2.0)
    assert requests.pending_keys("b") == 1 and requests.is_requested("b", "quarantine")
    requests.settle("b", ["k"], _done(items_corrupt=1), has_record=True, began=2.0)
    assert requests.pending_keys("b") == 1


def test_an_incomplete_repair_settles_nothing_but_the_keys_it_fetched() -> None:
    requests = RepairRequests()
    requests.add("b", "gap", ["k1", "k2"], at=1.0)
    requests.settle("b", ["k1"], _done(remaining=True), has_record=True, began=2.0)
    assert requests.keys_to_fetch("b", 10) == ["k2"] and requests.is_requested("b", "gap")


def test_an_anchor_asked_for_stands_until_a_later_repair_takes_it() -> None:
    requests = RepairRequests()
    requests.add("b", "gap", [], at=1.0)
    requests.ask_anchor("b", at=2.0)
    requests.settle("b", [], _done(complete=True), has_record=True, began=3.0)
    assert requests.reasons("b") == ["anchor", "gap"]
    requests.drop_anchor("b")
    requests.settle("b", [], _done(complete=True), has_record=True, began=3.0)
    assert not requests


def test_a_peer_without_a_record_settles_all_but_a_recovery() -> None:
    requests = RepairRequests()
    requests.add("b", "gap", [], at=1.0)
    requests.settle("b", [], _done(), has_record=False, began=2.0)
    assert not requests
    requests.add("b", "recovery", [], at=1.0)
    requests.settle("b", [], _done(), has_record=False, began=2.0)
    assert requests.reasons("b") == ["recovery"]
