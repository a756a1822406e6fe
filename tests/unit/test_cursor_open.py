"""``CursorStore.open`` closes its SQLite file whenever it does not hand out a store.

aiosqlite drops a connection unclosed when the connect is cancelled after its worker thread
opened the file; the file then stays open until the garbage collector finds it. These tests
land the cancel in that window on purpose (the connect cancels its caller as it completes) and
check the descriptor count with the collector off, so only a deterministic close passes.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import aiosqlite
import pytest

from replication_engine import cursor
from replication_engine.cursor import CursorError, CursorStore
from replication_engine.testing import async_wait_until, open_files

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd"
)


@pytest.fixture(autouse=True)
def no_collector() -> Iterator[None]:
    """What is asserted is a deterministic close, not the garbage collector's timing."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.collect()


async def test_a_cancel_landing_as_the_connect_completes_closes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cursors.db"
    await (await CursorStore.open(path)).close()
    real = cursor._open_connection
    opener: asyncio.Task[CursorStore] | None = None

    async def connect_then_cancel(location: str) -> aiosqlite.Connection:
        db = await real(location)
        assert opener is not None
        opener.cancel()  # open() is still waiting for this result
        return db

    monkeypatch.setattr(cursor, "_open_connection", connect_then_cancel)
    opener = asyncio.create_task(CursorStore.open(path))
    with pytest.raises(asyncio.CancelledError):
        await opener
    assert open_files(path) == 0


async def test_a_connect_still_running_after_the_wait_is_closed_when_it_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cursors.db"
    real = cursor._open_connection
    started = asyncio.Event()
    release = asyncio.Event()
    connected = asyncio.Event()

    async def slow_connect(location: str) -> aiosqlite.Connection:
        started.set()
        await release.wait()
        db = await real(location)
        connected.set()
        return db

    monkeypatch.setattr(cursor, "_open_connection", slow_connect)
    monkeypatch.setattr(cursor, "ABANDONED_OPEN_WAIT_S", 0.0)
    opener = asyncio.create_task(CursorStore.open(path))
    await started.wait()
    opener.cancel()
    with pytest.raises(asyncio.CancelledError):
        await opener  # returns without waiting for the connect
    assert not connected.is_set()
    release.set()
    await connected.wait()
    # stop() closes the file on the connection's worker thread, which nobody awaits.
    await async_wait_until(
        lambda: open_files(path) == 0, timeout=5.0, message="abandoned connection closed"
    )


@pytest.mark.parametrize("failure", ["error", "cancel"])
async def test_a_failed_or_cancelled_check_after_the_connect_closes_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    path = tmp_path / "cursors.db"
    await (await CursorStore.open(path)).close()

    async def failing_prepare(self: CursorStore) -> None:
        if failure == "cancel":
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)  # sync-ok: delivers the cancel
        raise CursorError("checks failed", path=self.path)

    monkeypatch.setattr(CursorStore, "_prepare", failing_prepare)
    expected: type[BaseException] = asyncio.CancelledError if failure == "cancel" else CursorError
    with pytest.raises(expected):
        await CursorStore.open(path)
    assert open_files(path) == 0
