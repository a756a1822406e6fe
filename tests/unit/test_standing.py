"""The standing record and the decisions drawn from it (pure: no Redis, no clock)."""

from __future__ import annotations

import pytest

from replication_engine.config import ConfigError, EngineConfig
from replication_engine.rebootstrap import HEARTBEAT_MAX_SEC, discard_limit, heartbeat_interval_sec
from replication_engine.standing import (
    IN_MESH,
    NEEDS_REBOOTSTRAP,
    REBOOTSTRAPPING,
    VERIFYING,
    Standing,
    elected,
    initial_state,
    is_authority,
    out_of_mesh_reason,
)

GRACE_MS = 60_000
NOW_MS = 1_700_000_000_000


def fresh(**extra: object) -> Standing:
    return Standing(contact_ms=NOW_MS - 1000, **extra)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ record


def test_a_missing_record_reads_as_none() -> None:
    assert Standing.from_fields({}) is None


def test_an_in_mesh_record_carries_only_its_contact() -> None:
    record = Standing(contact_ms=5, state=IN_MESH, since_ms=3, reason="ignored")
    assert record.as_fields() == {"contact_ms": "5"}


def test_a_stale_record_round_trips() -> None:
    record = Standing(contact_ms=5, state=NEEDS_REBOOTSTRAP, since_ms=7, reason="gap on b")
    assert Standing.from_fields(record.as_fields()) == record


def test_garbage_numbers_read_as_unknown_not_as_an_error() -> None:
    record = Standing.from_fields({"contact_ms": "soon", "since_ms": ""})
    assert record == Standing(contact_ms=None, state=IN_MESH)


# ------------------------------------------------------------------------------------ peers


def test_a_peer_without_a_record_is_pulled_from() -> None:
    # An engine from before records, or a fresh store: refusing it would stall mixed meshes.
    assert out_of_mesh_reason(None, NOW_MS, GRACE_MS) is None


def test_a_peer_in_contact_within_the_grace_is_pulled_from() -> None:
    assert out_of_mesh_reason(fresh(), NOW_MS, GRACE_MS) is None


def test_a_peer_silent_for_longer_than_the_grace_is_not_pulled_from() -> None:
    # Its engine is down, but its Redis, with old data, answers.
    silent = Standing(contact_ms=NOW_MS - GRACE_MS - 1)
    reason = out_of_mesh_reason(silent, NOW_MS, GRACE_MS)
    assert reason is not None and "grace" in reason and "60.0s" in reason


@pytest.mark.parametrize("state", [VERIFYING, NEEDS_REBOOTSTRAP, REBOOTSTRAPPING, "from-v9"])
def test_a_peer_that_says_it_is_stale_is_not_pulled_from(state: str) -> None:
    reason = out_of_mesh_reason(fresh(state=state, reason="why"), NOW_MS, GRACE_MS)
    assert reason == f"{state}: why"


def test_only_a_peer_with_a_fresh_in_mesh_record_is_an_authority() -> None:
    assert is_authority(fresh(), NOW_MS, GRACE_MS)
    assert not is_authority(None, NOW_MS, GRACE_MS)  # a fresh, possibly empty, node
    assert not is_authority(Standing(), NOW_MS, GRACE_MS)
    assert not is_authority(fresh(state=VERIFYING), NOW_MS, GRACE_MS)
    assert not is_authority(Standing(contact_ms=NOW_MS - 2 * GRACE_MS), NOW_MS, GRACE_MS)


# ------------------------------------------------------------------------------------ start


def test_a_node_back_within_the_grace_is_in_the_mesh() -> None:
    assert initial_state(fresh(), None, NOW_MS, GRACE_MS, store_empty=False) == (IN_MESH, None)


def test_a_node_back_after_the_grace_verifies_first() -> None:
    old = Standing(contact_ms=NOW_MS - GRACE_MS - 5000)
    state, reason = initial_state(old, None, NOW_MS, GRACE_MS, store_empty=False)
    assert state == VERIFYING and reason is not None and "65.0s" in reason


def test_without_a_record_the_cursor_database_tells_the_age() -> None:
    stale_db = NOW_MS - 3 * GRACE_MS
    assert initial_state(None, stale_db, NOW_MS, GRACE_MS, store_empty=False)[0] == VERIFYING
    # The record travels with the data and wins: a Redis restored from an old backup is stale
    # even when the engine's database is recent.
    old = Standing(contact_ms=stale_db)
    assert initial_state(old, NOW_MS, NOW_MS, GRACE_MS, store_empty=False)[0] == VERIFYING


def test_a_node_with_no_known_contact_is_new_not_stale() -> None:
    # Treating it as stale would throw away data a parent daemon loaded before the first run.
    assert initial_state(None, None, NOW_MS, GRACE_MS, store_empty=False) == (IN_MESH, None)


def test_an_empty_store_is_never_stale() -> None:
    old = Standing(contact_ms=0, state=NEEDS_REBOOTSTRAP, reason="gap")
    assert initial_state(old, 0, NOW_MS, GRACE_MS, store_empty=True) == (IN_MESH, None)


@pytest.mark.parametrize("left", [NEEDS_REBOOTSTRAP, REBOOTSTRAPPING])
def test_an_unfinished_rebootstrap_is_resumed(left: str) -> None:
    record = fresh(state=left, reason="gap on a")
    assert initial_state(record, None, NOW_MS, GRACE_MS, store_empty=False) == (
        NEEDS_REBOOTSTRAP,
        "gap on a",
    )


# ------------------------------------------------------------------------------------ election


def stale(contact_ms: int | None) -> Standing:
    return Standing(contact_ms=contact_ms, state=NEEDS_REBOOTSTRAP, reason="split")


def test_the_node_with_the_newest_contact_becomes_the_reference() -> None:
    peers = {"b": stale(100), "c": stale(200)}
    assert elected("a", 300, peers)
    assert not elected("a", 150, peers)


def test_a_tie_goes_to_the_smallest_node_id() -> None:
    assert elected("a", 100, {"b": stale(100)})
    assert not elected("b", 100, {"a": stale(100)})


def test_a_node_that_saw_a_gap_never_wins_over_one_that_only_lacked_a_peer() -> None:
    # b saw its stream trimmed past an old cursor: its deletes are lost for good. a only could
    # not reach b to verify; its contact time may be older by a heartbeat, but it is the truth.
    assert elected("a", 100, {"b": stale(200)}, own_confirmed=False)
    unconfirmed = Standing(contact_ms=100, state=NEEDS_REBOOTSTRAP, confirmed=False)
    assert not elected("b", 200, {"a": unconfirmed}, own_confirmed=True)


def test_an_unconfirmed_need_is_verified_again_after_a_restart() -> None:
    record = fresh(state=NEEDS_REBOOTSTRAP, reason="b unreachable", confirmed=False)
    assert Standing.from_fields(record.as_fields()) == record
    state, reason = initial_state(record, None, NOW_MS, GRACE_MS, store_empty=False)
    assert (state, reason) == (VERIFYING, "b unreachable")


def test_no_election_while_a_peer_may_still_clear_itself_or_is_unknown() -> None:
    assert not elected("a", 300, {"b": stale(100), "c": Standing(contact_ms=1, state=VERIFYING)})
    assert not elected("a", 300, {"b": None})
    assert not elected("a", 300, {"b": Standing(contact_ms=1)})


# ------------------------------------------------------------------------------------ config


def test_the_heartbeat_is_a_quarter_of_the_grace_within_bounds() -> None:
    assert heartbeat_interval_sec(2.0) == 0.5
    assert heartbeat_interval_sec(86_400) == HEARTBEAT_MAX_SEC
    assert heartbeat_interval_sec(0.001) > 0


def test_new_settings_keep_the_former_defaults() -> None:
    config = EngineConfig.from_mapping({"local_node_id": "a"}, env={})
    assert config.local.tombstone_gc_interval_sec == 60.0
    assert config.local.circuit_failure_threshold == 5
    assert config.local.circuit_reset_timeout_sec == 5.0
    assert config.settings.rebootstrap.max_discard_items == 10_000


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"local": {"tombstone_gc_interval_sec": 0}},
            "local.tombstone_gc_interval_sec: must be > 0",
        ),
        (
            {"local": {"circuit_failure_threshold": 0}},
            "local.circuit_failure_threshold: must be >= 1",
        ),
        (
            {"local": {"circuit_reset_timeout_sec": -1}},
            "local.circuit_reset_timeout_sec: must be > 0",
        ),
        (
            {"settings": {"rebootstrap": {"max_discard_items": -1}}},
            "settings.rebootstrap.max_discard_items: must be >= 0",
        ),
        (
            {"settings": {"rebootstrap": {"max_discards": 5}}},
            "settings.rebootstrap.max_discards: unknown field (did you mean 'max_discard_items'?",
        ),
    ],
)
def test_errors_in_the_new_settings_name_the_field(data: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        EngineConfig.from_mapping({"local_node_id": "a", **data}, env={})
    assert expected in str(info.value)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, 10_000),
        ({"settings": {"rebootstrap": {"max_discard_items": 50}}}, 50),
        ({"cursor": {"quarantine_max_rows": 200}}, 200),
        (
            {
                "settings": {"rebootstrap": {"max_discard_items": 0}},
                "cursor": {"quarantine_max_rows": 5},
            },
            0,
        ),
    ],
)
def test_the_discard_limit_never_exceeds_what_the_quarantine_keeps(
    settings: dict[str, object], expected: int
) -> None:
    config = EngineConfig.from_mapping({"local_node_id": "a", **settings}, env={})
    assert discard_limit(config) == expected
