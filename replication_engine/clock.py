"""Hybrid logical clock.

An HLC orders writes across nodes whose wall clocks disagree: it follows the wall clock when it
can and falls back to a logical counter when the wall clock stalls or runs backwards, so a node
never issues a timestamp lower than one it has already issued or seen.

Layout (64 bits): 48 bits of wall-clock milliseconds, 16 bits of logical counter. Inside Redis
scripts the value travels as a 16-character lower-case hex string, because Lua numbers are
doubles and cannot hold 64 bits exactly; fixed width makes string comparison equal numeric
comparison.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

MS_BITS = 48
COUNTER_BITS = 16
MAX_MS = (1 << MS_BITS) - 1
MAX_COUNTER = (1 << COUNTER_BITS) - 1
MAX_HLC = (1 << 64) - 1
HEX_WIDTH = 16
_HEX16 = re.compile(r"[0-9a-fA-F]{16}")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def offset_problem(before_ms: int, after_ms: int, server_ms: int, bound_ms: float) -> str | None:
    """How this process's clock differs from its Redis's, said, when it is past ``bound_ms``
    (``local.max_clock_offset_sec``); None within it. ``server_ms`` is the server's ``TIME``
    read between the two readings of this clock, whose gap (the round trip) is allowed for.
    The engine checks it at start and at every certification."""
    offset = (before_ms + after_ms) / 2 - server_ms
    if abs(offset) <= bound_ms + (after_ms - before_ms):
        return None
    return (
        f"this process's clock is {abs(offset) / 1000:.1f} s "
        f"{'ahead of' if offset > 0 else 'behind'} its Redis's, past local.max_clock_offset_sec "
        f"({bound_ms / 1000:g} s): "
        + (
            "it stamps this node's writes ahead of every other node's"
            if offset > 0
            else "it sets every peer's new write aside as clock skew"
        )
    )


def pack(ms: int, counter: int) -> int:
    if not 0 <= ms <= MAX_MS:
        raise ValueError(f"HLC milliseconds out of range: {ms}")
    if not 0 <= counter <= MAX_COUNTER:
        raise ValueError(f"HLC counter out of range: {counter}")
    return (ms << COUNTER_BITS) | counter


def unpack(hlc: int) -> tuple[int, int]:
    if not 0 <= hlc <= MAX_HLC:
        raise ValueError(f"HLC out of range: {hlc}")
    return hlc >> COUNTER_BITS, hlc & MAX_COUNTER


def to_hex(hlc: int) -> str:
    if not 0 <= hlc <= MAX_HLC:
        raise ValueError(f"HLC out of range: {hlc}")
    return f"{hlc:016x}"


def from_hex(text: str | bytes) -> int:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if _HEX16.fullmatch(text) is None:
        raise ValueError(f"HLC hex must be {HEX_WIDTH} hexadecimal digits, got {text[:40]!r}")
    return int(text, 16)


def physical_ms(hlc: int) -> int:
    return hlc >> COUNTER_BITS


def successor(hlc: int) -> int:
    """The next timestamp after ``hlc``; the counter overflows into the millisecond part."""
    if hlc >= MAX_HLC:
        raise OverflowError("HLC exhausted")
    return hlc + 1


class HLC:
    """A thread-safe hybrid logical clock.

    ``source`` returns wall-clock milliseconds; tests inject skew or a clock that runs
    backwards through it.
    """

    def __init__(self, source: Callable[[], int] = wall_clock_ms, last: int = 0) -> None:
        self._source = source
        self._last = last
        self._lock = threading.Lock()

    @property
    def last(self) -> int:
        return self._last

    def now(self) -> int:
        with self._lock:
            wall = pack(min(max(self._source(), 0), MAX_MS), 0)
            self._last = wall if wall > self._last else successor(self._last)
            return self._last

    def observe(self, remote: int) -> int:
        """Advance past a timestamp seen from elsewhere, so later local writes order after it."""
        if not 0 <= remote <= MAX_HLC:
            raise ValueError(f"HLC out of range: {remote}")
        with self._lock:
            if remote > self._last:
                self._last = remote
            return self._last

    def wall(self) -> int:
        """Wall-clock ms from this clock's source: for horizons that must not follow a peer's
        clock (the HLC itself jumps ahead to the fastest clock it has seen)."""
        return self._source()

    def set_source(self, source: Callable[[], int]) -> None:
        self._source = source
