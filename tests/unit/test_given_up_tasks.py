"""A task the tailer gives up on (waited for only within a bound) that fails afterwards is not
reported by asyncio as "Task exception was never retrieved": a chaos run's log showed one, a
peer read that failed after the engine stopped waiting for it."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from replication_engine import hot_path
from replication_engine.peer import PeerUnavailable


async def _read_that_swallows_its_cancel(started: asyncio.Event, release: asyncio.Event) -> None:
    started.set()
    try:
        await asyncio.Event().wait()  # a reply that never comes
    except asyncio.CancelledError:
        pass  # as redis-py may while connecting
    await release.wait()
    raise PeerUnavailable("peer a: circuit open, retry in 0.7s")


@pytest.mark.parametrize("observed", [True, False])
async def test_a_read_failing_after_it_was_given_up_on_is_retrieved(
    caplog: pytest.LogCaptureFixture, observed: bool
) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(_read_that_swallows_its_cancel(started, release))
    await started.wait()  # the cancel lands inside the read, not before it starts
    task.cancel()
    await asyncio.wait({task}, timeout=0.05)  # the tailer's bounded wait
    assert not task.done(), "the read outlived the bound, as in the chaos run"
    if observed:
        hot_path._observe(task)
    release.set()
    # The task's done callbacks run in the order they were added: _observe's before wait's.
    await asyncio.wait({task})
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        del task
        gc.collect()
    reported = "never retrieved" in caplog.text
    assert reported is not observed
