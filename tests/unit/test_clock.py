"""HLC packing, hex form and monotonicity.

The HLC is what last-writer-wins orders by, on every node and inside the Lua scripts, so its
encoding must be exact at the edges (48/16-bit split, 16-hex width) and it must never issue a
value at or below one it has issued or observed.
"""

from __future__ import annotations

import itertools

import pytest

from replication_engine import clock
from replication_engine.clock import HLC


class FakeSource:
    """A wall clock the test moves by hand, including backwards."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


# ---------------------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize(
    ("ms", "counter"),
    [(0, 0), (1, 0), (0, 1), (1_700_000_000_000, 42), (clock.MAX_MS, clock.MAX_COUNTER)],
)
def test_pack_unpack_round_trip(ms: int, counter: int) -> None:
    packed = clock.pack(ms, counter)
    assert clock.unpack(packed) == (ms, counter)
    assert clock.physical_ms(packed) == ms


def test_pack_layout_is_48_bits_ms_then_16_bits_counter() -> None:
    assert clock.pack(1, 0) == 1 << 16
    assert clock.pack(0, 1) == 1
    assert clock.pack(clock.MAX_MS, clock.MAX_COUNTER) == clock.MAX_HLC


@pytest.mark.parametrize(
    ("ms", "counter"),
    [(-1, 0), (clock.MAX_MS + 1, 0), (0, -1), (0, clock.MAX_COUNTER + 1)],
)
def test_pack_rejects_out_of_range(ms: int, counter: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        clock.pack(ms, counter)


@pytest.mark.parametrize("value", [-1, clock.MAX_HLC + 1, 1 << 80])
def test_unpack_and_to_hex_reject_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        clock.unpack(value)
    with pytest.raises(ValueError, match="out of range"):
        clock.to_hex(value)


# ---------------------------------------------------------------------------- hex


@pytest.mark.parametrize("value", [0, 1, 0xFFFF, 1 << 16, 0x0123_4567_89AB_CDEF, clock.MAX_HLC])
def test_hex_round_trip_is_fixed_width_lower_case(value: int) -> None:
    text = clock.to_hex(value)
    assert len(text) == clock.HEX_WIDTH
    assert text == text.lower()
    assert clock.from_hex(text) == value
    assert clock.from_hex(text.encode()) == value


def test_hex_string_order_equals_numeric_order() -> None:
    # The Lua scripts compare HLCs as strings; that is only sound at fixed width.
    values = [0, 1, 0xF, 0x10, 0xFFFF, 1 << 16, (1 << 48) - 1, clock.MAX_HLC]
    assert sorted(values, key=clock.to_hex) == sorted(values)


@pytest.mark.parametrize(
    "text", ["", "0", "0" * 15, "0" * 17, "zzzzzzzzzzzzzzzz", "ffff ffff ffff"]
)
def test_from_hex_rejects_wrong_width_or_non_hex(text: str) -> None:
    with pytest.raises(ValueError, match="HLC hex"):
        clock.from_hex(text)


@pytest.mark.parametrize(
    "text",
    [
        "-000000000000001",
        "+000000000000001",
        " 00000000000001 ",
        "0x00000000000001",
        "0000_0000_0000_1",
    ],
)
def test_from_hex_accepts_only_hex_digits(text: str) -> None:
    """int(text, 16) alone takes signs, '0x', spaces and '_': '-000000000000001' would be -1."""
    with pytest.raises(ValueError):
        clock.from_hex(text)


# ---------------------------------------------------------------------------- successor


def test_successor_counter_overflow_rolls_into_ms() -> None:
    assert clock.successor(clock.pack(7, clock.MAX_COUNTER)) == clock.pack(8, 0)
    assert clock.successor(clock.pack(7, 3)) == clock.pack(7, 4)


def test_successor_of_max_raises() -> None:
    with pytest.raises(OverflowError):
        clock.successor(clock.MAX_HLC)


# ---------------------------------------------------------------------------- HLC


def test_now_follows_the_wall_clock_when_it_advances() -> None:
    source = FakeSource(1_000)
    hlc = HLC(source)
    assert hlc.now() == clock.pack(1_000, 0)
    source.ms = 2_000
    assert hlc.now() == clock.pack(2_000, 0)


def test_now_is_strictly_increasing_with_a_stalled_clock() -> None:
    hlc = HLC(FakeSource(5_000))
    issued = [hlc.now() for _ in range(1_000)]
    assert all(b > a for a, b in itertools.pairwise(issued))
    assert issued[-1] == clock.pack(5_000, 999)


def test_now_does_not_go_backwards_when_the_wall_clock_does() -> None:
    source = FakeSource(10_000)
    hlc = HLC(source)
    first = hlc.now()
    source.ms = 1_000
    second = hlc.now()
    assert second > first
    assert clock.physical_ms(second) == 10_000


def test_counter_overflow_rolls_into_ms() -> None:
    hlc = HLC(FakeSource(100), last=clock.pack(100, clock.MAX_COUNTER))
    assert hlc.now() == clock.pack(101, 0)


def test_observe_of_future_remote_orders_later_writes_after_it() -> None:
    hlc = HLC(FakeSource(1_000))
    remote = clock.pack(9_999_999, 17)
    assert hlc.observe(remote) == remote
    assert hlc.now() > remote


def test_observe_of_past_remote_keeps_the_clock() -> None:
    hlc = HLC(FakeSource(5_000))
    mine = hlc.now()
    assert hlc.observe(clock.pack(1, 0)) == mine
    assert hlc.last == mine


@pytest.mark.parametrize("remote", [-1, clock.MAX_HLC + 1])
def test_observe_rejects_out_of_range(remote: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        HLC(FakeSource(1)).observe(remote)


def test_initial_last_is_respected() -> None:
    # A store reloads its clock from Redis this way after a restart.
    hlc = HLC(FakeSource(1), last=clock.pack(50_000, 3))
    assert hlc.now() == clock.pack(50_000, 4)


def test_source_values_outside_48_bits_are_clamped() -> None:
    assert HLC(FakeSource(-5)).now() == clock.pack(0, 1)  # 0 would not be above last=0
    assert HLC(FakeSource(clock.MAX_MS + 10)).now() == clock.pack(clock.MAX_MS, 0)


def test_set_source_takes_effect() -> None:
    hlc = HLC(FakeSource(1_000))
    hlc.set_source(FakeSource(3_000))
    assert hlc.now() == clock.pack(3_000, 0)


def test_exhausted_clock_raises_instead_of_wrapping() -> None:
    hlc = HLC(FakeSource(1), last=clock.MAX_HLC)
    with pytest.raises(OverflowError):
        hlc.now()
