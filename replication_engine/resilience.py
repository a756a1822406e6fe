"""Backoff, adaptive batch sizing, rate limiting and breaker glue.

The pure parts (Backoff, AimdBatchSizer) have no I/O so their rules can be tested exhaustively.
"""

from __future__ import annotations

import asyncio
import random
import time

import pybreaker
from aiolimiter import AsyncLimiter


class Backoff:
    """Exponential backoff with full jitter, reset on success.

    Jitter spreads retries from many engines so a peer that comes back is not hit by all of them
    in the same instant.
    """

    def __init__(
        self, base: float, maximum: float, *, jitter: bool = True, rng: random.Random | None = None
    ) -> None:
        if base <= 0 or maximum < base:
            raise ValueError(f"backoff needs 0 < base <= maximum, got {base} and {maximum}")
        self.base = base
        self.maximum = maximum
        self.jitter = jitter
        self.failures = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        if self.failures == 0:
            return 0.0
        return min(self.maximum, self.base * 2.0 ** min(self.failures - 1, 62))

    def next_delay(self) -> float:
        """Record a failure and return how long to wait before the next try."""
        self.failures += 1
        ceiling = self.ceiling()
        if not self.jitter:
            return ceiling
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0


class AimdBatchSizer:
    """Read-batch size by additive increase, multiplicative decrease.

    Full reads mean a backlog: grow the batch to amortise round trips. Near-empty reads mean we
    are at the head: shrink it so a burst does not arrive as one big slow batch. A flush slower
    than its SLO also shrinks it, because big batches are what make flushes slow.
    """

    def __init__(
        self,
        initial: int,
        minimum: int,
        maximum: int,
        *,
        adaptive: bool = True,
        step: int | None = None,
        factor: float = 0.5,
        empty_fraction: float = 0.1,
    ) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError(
                f"need 1 <= min <= initial <= max, got {minimum}, {initial}, {maximum}"
            )
        self.size = initial
        self.minimum = minimum
        self.maximum = maximum
        self.adaptive = adaptive
        self.step = step or max(1, minimum)
        self.factor = factor
        self.empty_fraction = empty_fraction

    def observe(
        self,
        returned: int,
        *,
        requested: int | None = None,
        flush_seconds: float = 0.0,
        flush_slo_seconds: float | None = None,
    ) -> int:
        """Adapt to one read that asked for ``requested`` entries (default: the current size;
        a pipelined caller's read may have asked before the last change) and got ``returned``."""
        if not self.adaptive:
            return self.size
        if flush_slo_seconds is not None and flush_seconds > flush_slo_seconds:
            self.size = max(self.minimum, int(self.size * self.factor))
        elif returned >= (self.size if requested is None else requested):
            self.size = min(self.maximum, self.size + self.step)
        elif returned <= self.size * self.empty_fraction:
            self.size = max(self.minimum, int(self.size * self.factor))
        return self.size


class EventRateLimiter:
    """Events per second with a burst allowance (a leaky bucket of ``burst`` events)."""

    def __init__(self, per_sec: float, burst: int) -> None:
        self.burst = max(1, burst)
        self._limiter = AsyncLimiter(self.burst, self.burst / per_sec)

    async def acquire(self, events: int) -> None:
        while events > 0:
            take = min(events, self.burst)
            await self._limiter.acquire(take)
            events -= take


# How long a breaker first stays open. Each time its trial call fails and it opens again, the
# time doubles, up to the configured reset timeout; a success starts it over. An outage of a few
# seconds (a Redis restarted, a link that drops) is tried again within a second or two of its
# end, while a store that stays down is still tried no more often than the reset timeout allows.
FIRST_OPEN_SEC = 1.0


class _Escalation(pybreaker.CircuitBreakerListener):
    """Sets an opening breaker's open time: short at first, doubling while trials fail."""

    def __init__(self, longest_sec: float) -> None:
        self.longest_sec = longest_sec
        self.first_sec = min(FIRST_OPEN_SEC, longest_sec)

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        if new_state.name == pybreaker.STATE_HALF_OPEN:
            return  # the trial decides
        if new_state.name == pybreaker.STATE_OPEN and (
            old_state is not None and old_state.name == pybreaker.STATE_HALF_OPEN
        ):
            cb.reset_timeout = min(self.longest_sec, 2 * float(cb.reset_timeout))
        else:  # closed again, or opened from closed
            cb.reset_timeout = self.first_sec


def make_breaker(*, name: str, failures: int, longest_open_sec: float) -> pybreaker.CircuitBreaker:
    """A breaker that opens after ``failures`` failures in a row, for :data:`FIRST_OPEN_SEC` at
    first and twice as long after each failed trial, at most ``longest_open_sec``.

    Our own cancellations (a shutdown) are not failures, and a trip raises the call's own
    error, so callers classify it as they would without a breaker.
    """
    escalation = _Escalation(longest_open_sec)
    return pybreaker.CircuitBreaker(
        fail_max=failures,
        reset_timeout=escalation.first_sec,
        throw_new_error_on_trip=False,
        name=name,
        exclude=[asyncio.CancelledError],
        listeners=[escalation],
    )


def breaker_state(breaker: pybreaker.CircuitBreaker) -> str:
    """'closed', 'half-open' or 'open', with 'open' turning 'half-open' once its timeout passed.

    pybreaker only moves an open breaker to half-open on the next call; reporting the
    time-derived state keeps status and metrics true between calls.
    """
    state = breaker.current_state
    if state == pybreaker.STATE_OPEN and breaker_remaining(breaker) <= 0:
        return "half-open"
    return {pybreaker.STATE_CLOSED: "closed", pybreaker.STATE_HALF_OPEN: "half-open"}.get(
        state, "open"
    )


def breaker_remaining(breaker: pybreaker.CircuitBreaker) -> float:
    """Seconds until an open breaker lets a trial call through (0 when not open)."""
    if breaker.current_state != pybreaker.STATE_OPEN:
        return 0.0
    opened = breaker._state_storage.opened_at
    if opened is None:
        return 0.0
    elapsed = (time.time() - opened.timestamp()) if hasattr(opened, "timestamp") else 0.0
    return max(0.0, float(breaker.reset_timeout) - elapsed)


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    """Wait ``seconds`` unless ``stop`` is set first; True when stopping."""
    if seconds <= 0:
        return stop.is_set()
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True
