"""HLC invariants over arbitrary wall-clock behaviour.

A node's wall clock can jump either way (NTP steps, VM pauses, a bad RTC), and remote clocks can
be anywhere. Whatever happens, a node must never issue a timestamp at or below one it has
issued or observed, or last-writer-wins would let an older write beat a newer one.
"""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from replication_engine import clock
from replication_engine.clock import HLC

# Wall clocks near the present and near the edges of the 48-bit range, so both the common case
# and the clamping path are exercised; far from MAX so the clock cannot be exhausted.
wall_ms = st.one_of(
    st.integers(min_value=1_600_000_000_000, max_value=1_800_000_000_000),
    st.integers(min_value=-1000, max_value=1000),
    st.integers(min_value=0, max_value=clock.MAX_MS - 100_000),
)
remote_hlc = st.integers(min_value=0, max_value=clock.pack(clock.MAX_MS - 100_000, 0))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), wall_ms),
        st.tuples(st.just("observe"), remote_hlc),
    ),
    max_size=200,
)


class ScriptedSource:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@given(ops)
def test_now_is_strictly_above_everything_issued_or_observed(script: list[tuple[str, int]]) -> None:
    source = ScriptedSource(0)
    hlc = HLC(source)
    high_water = 0
    for op, value in script:
        if op == "tick":
            source.ms = value
            issued = hlc.now()
            assert issued > high_water
            # It follows the wall clock whenever that is ahead of everything seen.
            wall = clock.pack(min(max(value, 0), clock.MAX_MS), 0)
            if wall > high_water:
                assert issued == wall
            else:
                assert issued == high_water + 1
            high_water = issued
        else:
            seen = hlc.observe(value)
            assert seen == max(high_water, value)
            high_water = seen
        assert hlc.last == high_water


@given(st.lists(wall_ms, min_size=2, max_size=100))
def test_now_is_strictly_increasing(walls: list[int]) -> None:
    source = ScriptedSource(walls[0])
    hlc = HLC(source)
    issued = []
    for wall in walls:
        source.ms = wall
        issued.append(hlc.now())
    assert all(b > a for a, b in itertools.pairwise(issued))


@given(wall_ms, remote_hlc, st.integers(min_value=1, max_value=50))
def test_after_observe_every_later_now_exceeds_the_remote(
    wall: int, remote: int, writes: int
) -> None:
    hlc = HLC(ScriptedSource(wall))
    hlc.observe(remote)
    for _ in range(writes):
        assert hlc.now() > remote


@given(
    st.integers(min_value=0, max_value=clock.MAX_MS),
    st.integers(min_value=0, max_value=clock.MAX_COUNTER),
)
def test_pack_unpack_hex_round_trip(ms: int, counter: int) -> None:
    packed = clock.pack(ms, counter)
    assert clock.unpack(packed) == (ms, counter)
    assert clock.from_hex(clock.to_hex(packed)) == packed


@given(
    st.integers(min_value=0, max_value=clock.MAX_HLC),
    st.integers(min_value=0, max_value=clock.MAX_HLC),
)
def test_hex_order_is_numeric_order(a: int, b: int) -> None:
    # The Lua scripts compare HLCs byte by byte as hex text.
    assert (clock.to_hex(a) < clock.to_hex(b)) == (a < b)


@given(st.integers(min_value=0, max_value=clock.MAX_HLC - 1))
def test_successor_is_the_next_integer_and_rolls_the_counter(hlc: int) -> None:
    nxt = clock.successor(hlc)
    assert nxt == hlc + 1
    ms, counter = clock.unpack(hlc)
    if counter == clock.MAX_COUNTER:
        assert clock.unpack(nxt) == (ms + 1, 0)
    else:
        assert clock.unpack(nxt) == (ms, counter + 1)
