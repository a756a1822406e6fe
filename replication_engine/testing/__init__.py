"""Real Redis servers and deadline waits, for the demo, embedders' tests and our own.

It ships inside the package because ``replication-engine demo`` starts servers with it, and an
embedder testing against the engine can start them the same way the suite does. Nothing in the
engine imports it. What only our tests and benchmarks use (the fault-injecting proxy, the mesh
and chaos harnesses) lives in the top-level ``harness`` package, which is not shipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar, overload

from replication_engine.testing.redis_proc import (
    RedisBinaryNotFound,
    RedisFactory,
    RedisHandle,
    RedisProcess,
    RedisStartError,
    TlsFiles,
    TlsToolingUnavailable,
    find_redis_server,
    free_port,
    make_test_ca,
    redis_server_version,
    redis_supports_tls,
)

__all__ = [
    "RedisBinaryNotFound",
    "RedisFactory",
    "RedisHandle",
    "RedisProcess",
    "RedisStartError",
    "TlsFiles",
    "TlsToolingUnavailable",
    "async_wait_until",
    "awaiting_frames",
    "find_redis_server",
    "free_port",
    "make_test_ca",
    "open_files",
    "redis_server_version",
    "redis_supports_tls",
    "wait_until",
]

_T = TypeVar("_T")


def awaiting_frames(task: asyncio.Task[Any]) -> list[FrameType]:
    """Where a suspended task waits: the frame of each coroutine (or generator) in its chain of
    awaits, outermost first. ``Task.get_stack`` gives a suspended task's outermost frame alone."""
    frames: list[FrameType] = []
    awaiting: Any = task.get_coro()
    while awaiting is not None:
        frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "gi_yieldfrom", None)
    return frames


def open_files(path: Path) -> int:
    """File descriptors of this process open on ``path`` (Linux: reads /proc/self/fd)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
    return count


def _failure(message: str, timeout: float, last_error: BaseException | None) -> AssertionError:
    text = message or "condition not met"
    text = f"{text} (waited {timeout}s)"
    if last_error is not None:
        text = f"{text}; last error: {last_error!r}"
    return AssertionError(text)


def wait_until(
    predicate: Callable[[], _T],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "",
    *,
    ignore: tuple[type[Exception], ...] = (),
) -> _T:
    """Re-check ``predicate`` until it returns something truthy, or fail at the deadline.

    This is how tests wait for an outcome they cannot be told about (a replica converging, a
    server refusing connections) without guessing a sleep. The predicate runs at least once,
    and once more at the deadline, so a slow first check cannot fail a met condition.

    Args:
        predicate: Checked repeatedly; its first truthy result is returned.
        timeout: Seconds until giving up.
        interval: Seconds between checks.
        message: Says what was awaited, for the failure.
        ignore: Exception types that mean "not yet" (say ``ConnectionError`` while a server
            comes back); any other exception propagates at once.

    Raises:
        AssertionError: the deadline passed; carries ``message`` and the last ignored error.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        out_of_time = time.monotonic() >= deadline
        try:
            result = predicate()
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result
        if out_of_time:
            raise _failure(message, timeout, last_error)
        time.sleep(max(0.0, min(interval, deadline - time.monotonic())))


@overload
async def async_wait_until(
    predicate: Callable[[], Awaitable[_T]],
    timeout: float = ...,
    interval: float = ...,
    message: str = ...,
    *,
    ignore: tuple[type[Exception], ...] = ...,
) -> _T: ...


@overload
async def async_wait_until(
    predicate: Callable[[], _T],
    timeout: float = ...,
    interval: float = ...,
    message: str = ...,
    *,
    ignore: tuple[type[Exception], ...] = ...,
) -> _T: ...


async def async_wait_until(
    predicate: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.01,
    message: str = "",
    *,
    ignore: tuple[type[Exception], ...] = (),
) -> Any:
    """Async form of :func:`wait_until`; ``predicate`` may be sync or return an awaitable.

    A predicate that hangs (an await on a partitioned peer) is cut off at the deadline too,
    so the wait never outlives ``timeout`` by more than one check's cancellation.

    Raises:
        AssertionError: the deadline passed; carries ``message`` and the last ignored error.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last_error: Exception | None = None
    while True:
        out_of_time = loop.time() >= deadline
        # The final check gets a short grace so "once more at the deadline" can finish.
        check_deadline = asyncio.timeout_at(max(deadline, loop.time() + interval))
        try:
            async with check_deadline:
                result = predicate()
                if inspect.isawaitable(result):
                    result = await result
        except Exception as exc:
            if check_deadline.expired():
                raise _failure(message, timeout, last_error) from exc
            if not isinstance(exc, ignore):
                raise
            last_error = exc
        else:
            if result:
                return result
        if out_of_time:
            raise _failure(message, timeout, last_error)
        await asyncio.sleep(max(0.0, min(interval, deadline - loop.time())))
