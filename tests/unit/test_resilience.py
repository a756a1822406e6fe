"""The AIMD batch sizer: pure logic, unit and property tests."""

from __future__ import annotations

import pybreaker
import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication_engine.resilience import (
    FIRST_OPEN_SEC,
    AimdBatchSizer,
    breaker_remaining,
    make_breaker,
)


def test_full_reads_grow_the_batch_additively_up_to_the_maximum() -> None:
    sizer = AimdBatchSizer(100, 50, 220)
    assert [sizer.observe(sizer.size) for _ in range(4)] == [150, 200, 220, 220]


def test_near_empty_reads_and_slow_flushes_halve_it_down_to_the_minimum() -> None:
    sizer = AimdBatchSizer(400, 50, 1000)
    assert sizer.observe(0) == 200
    assert sizer.observe(200, flush_seconds=0.5, flush_slo_seconds=0.2) == 100
    assert sizer.observe(1) == 50
    assert sizer.observe(0) == 50


def test_a_read_in_between_keeps_the_size() -> None:
    sizer = AimdBatchSizer(400, 50, 1000)
    assert sizer.observe(300) == 400


def test_a_full_read_that_asked_before_the_last_increase_still_counts_as_full() -> None:
    """A pipelined reader asks for batch N+1 before batch N's read grows the size."""
    sizer = AimdBatchSizer(100, 50, 1000)
    assert sizer.observe(100, requested=100) == 150
    assert sizer.observe(100, requested=100) == 200  # asked for 100, got 100: still a backlog
    assert sizer.observe(100) == 200  # without ``requested``, 100 of 200 is not full


def test_a_fixed_size_never_changes() -> None:
    sizer = AimdBatchSizer(300, 50, 1000, adaptive=False)
    assert sizer.observe(300) == sizer.observe(0) == 300


def test_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="min <= initial <= max"):
        AimdBatchSizer(10, 50, 1000)


@given(
    bounds=st.tuples(st.integers(1, 500), st.integers(0, 500), st.integers(0, 2000)).map(
        lambda t: (t[0], t[0] + t[1], t[0] + t[1] + t[2])
    ),
    reads=st.lists(
        st.tuples(
            st.integers(0, 5000), st.none() | st.integers(1, 5000), st.floats(0, 1), st.booleans()
        ),
        max_size=50,
    ),
)
def test_the_size_always_stays_within_its_bounds(
    bounds: tuple[int, int, int], reads: list[tuple[int, int | None, float, bool]]
) -> None:
    minimum, initial, maximum = bounds
    sizer = AimdBatchSizer(initial, minimum, maximum)
    for returned, requested, flush, with_slo in reads:
        size = sizer.observe(
            returned,
            requested=requested,
            flush_seconds=flush,
            flush_slo_seconds=0.5 if with_slo else None,
        )
        assert minimum <= size <= maximum


# ------------------------------------------------------------------------------------------------
# Breakers


def _fail(breaker: pybreaker.CircuitBreaker) -> None:
    def down() -> None:
        raise OSError("down")

    with pytest.raises(OSError):
        breaker.call(down)


def _to_half_open(breaker: pybreaker.CircuitBreaker) -> None:
    """As if the open time had passed: the next call is the trial."""
    breaker.half_open()


def test_a_breaker_first_opens_briefly_then_doubles_while_trials_fail() -> None:
    breaker = make_breaker(name="t", failures=2, longest_open_sec=30)
    _fail(breaker)
    _fail(breaker)
    assert breaker.current_state == pybreaker.STATE_OPEN
    assert breaker.reset_timeout == FIRST_OPEN_SEC
    assert 0 < breaker_remaining(breaker) <= FIRST_OPEN_SEC
    opened = []
    for _ in range(7):
        _to_half_open(breaker)
        _fail(breaker)  # the trial fails: open again, for longer
        opened.append(breaker.reset_timeout)
    assert opened == [2, 4, 8, 16, 30, 30, 30]


def test_a_successful_trial_starts_the_open_time_over() -> None:
    breaker = make_breaker(name="t", failures=1, longest_open_sec=30)
    _fail(breaker)
    for _ in range(3):
        _to_half_open(breaker)
        _fail(breaker)
    assert breaker.reset_timeout == 8
    _to_half_open(breaker)
    assert breaker.call(lambda: "up") == "up"
    assert breaker.current_state == pybreaker.STATE_CLOSED
    _fail(breaker)
    assert breaker.reset_timeout == FIRST_OPEN_SEC


def test_a_reset_timeout_below_the_first_open_time_is_kept() -> None:
    breaker = make_breaker(name="t", failures=1, longest_open_sec=0.2)
    _fail(breaker)
    assert breaker.reset_timeout == 0.2
    _to_half_open(breaker)
    _fail(breaker)
    assert breaker.reset_timeout == 0.2
