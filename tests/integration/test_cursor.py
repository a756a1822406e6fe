"""CursorStore against real SQLite files: durability, bounds, bootstrap resume, damaged files."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from replication_engine.cursor import (
    QUARANTINE_FIELD_MAX_BYTES,
    SCHEMA_VERSION,
    BootstrapState,
    CursorError,
    CursorStore,
    read_quarantine,
)

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "cursors.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[CursorStore]:
    opened = await CursorStore.open(db_path, quarantine_max_rows=5)
    try:
        yield opened
    finally:
        await opened.close()


# Filesystem set-up stays synchronous: it is not what these tests exercise.
def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_dirs(path: Path) -> None:
    path.mkdir(parents=True)


def raw_entry(index: int) -> dict[bytes | str, bytes | str]:
    return {b"op": b"PUT", b"key": f"k{index}".encode(), b"data": b"\x00\x01bin"}


# ------------------------------------------------------------------------------------------------
# Cursors


async def test_save_get_all(store: CursorStore) -> None:
    assert await store.get("b") is None
    await store.save("b", "1700000000000-3")
    await store.save("c", "5-0")
    await store.save("b", "1700000000001-0")
    assert await store.get("b") == "1700000000001-0"
    assert await store.all() == {"b": "1700000000001-0", "c": "5-0"}


async def test_cursors_survive_restart(db_path: Path) -> None:
    first = await CursorStore.open(db_path)
    await first.save("b", "1700000000000-3")
    await first.save("c", "42-7")
    await first.close()

    second = await CursorStore.open(db_path)
    try:
        assert await second.get("b") == "1700000000000-3"
        assert await second.all() == {"b": "1700000000000-3", "c": "42-7"}
    finally:
        await second.close()


async def test_saved_cursor_is_visible_to_another_connection_before_close(
    store: CursorStore, db_path: Path
) -> None:
    # "Durable when save returns": the commit is in the file (WAL) for any other reader.
    await store.save("b", "9-9")
    other = sqlite3.connect(db_path)
    try:
        rows = other.execute("SELECT stream_id FROM cursors WHERE peer_id = 'b'").fetchall()
    finally:
        other.close()
    assert rows == [("9-9",)]


async def test_delete_forgets_cursor_and_bootstrap(store: CursorStore) -> None:
    await store.save("b", "1-1")
    await store.bootstrap_begin("b", "2-0")
    await store.bootstrap_mark_done("b", ["00"])
    await store.delete("b")
    assert await store.get("b") is None
    assert await store.bootstrap_state("b") is None
    await store.delete("never-seen")


@pytest.mark.parametrize(
    "bad", ["", "abc", "1", "1-", "-1", "1-2-3", "1 -2", "a-1", "1.5-0", "99999999999999999999-0"]
)
async def test_stream_ids_are_validated(store: CursorStore, bad: str) -> None:
    with pytest.raises(ValueError, match="stream id"):
        await store.save("b", bad)
    with pytest.raises(ValueError, match="stream id"):
        await store.bootstrap_begin("b", bad)
    with pytest.raises(ValueError, match="stream id"):
        await store.bootstrap_finish("b", bad)
    with pytest.raises(ValueError, match="stream id"):
        await store.quarantine_add("b", bad, None, "x", {})
    assert await store.all() == {}


async def test_non_string_stream_id_is_rejected(store: CursorStore) -> None:
    with pytest.raises(ValueError):
        await store.save("b", 17)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="peer_id"):
        await store.save("", "1-0")


async def test_largest_stream_id_is_accepted(store: CursorStore) -> None:
    largest = f"{2**64 - 1}-{2**64 - 1}"
    await store.save("b", largest)
    assert await store.get("b") == largest


# ------------------------------------------------------------------------------------------------
# Journal mode


async def test_wal_mode_is_on(store: CursorStore, db_path: Path) -> None:
    await store.save("b", "1-0")
    other = sqlite3.connect(db_path)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        other.close()
    assert db_path.with_name(db_path.name + "-wal").exists()
    # White-box: synchronous is per connection, so ask the store's own connection.
    assert store._db is not None
    assert list(await store._db.execute_fetchall("PRAGMA synchronous")) == [(1,)]  # NORMAL


async def test_rollback_journal_when_wal_disabled(db_path: Path) -> None:
    async with await CursorStore.open(db_path, wal_mode=False) as store:
        await store.save("b", "1-0")
        assert store._db is not None
        assert list(await store._db.execute_fetchall("PRAGMA journal_mode")) == [("delete",)]
        assert list(await store._db.execute_fetchall("PRAGMA synchronous")) == [(2,)]  # FULL


async def test_missing_parent_directories_are_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "c" / "cursors.db"
    async with await CursorStore.open(path) as store:
        await store.save("b", "1-0")
    assert path.is_file()


# ------------------------------------------------------------------------------------------------
# Quarantine


async def test_quarantine_is_bounded_and_counts_evictions(store: CursorStore) -> None:
    for index in range(8):
        await store.quarantine_add(
            "b", f"{index}-0", f"k{index}", "hash mismatch", raw_entry(index)
        )
    assert await store.quarantine_count() == 5
    assert store.evicted == 3
    listed = await store.quarantine_list()
    assert [record.stream_id for record in listed] == ["7-0", "6-0", "5-0", "4-0", "3-0"]
    assert [record.id for record in listed] == sorted(
        (record.id for record in listed), reverse=True
    )


async def test_quarantine_list_limit_and_peer_filter(store: CursorStore) -> None:
    await store.quarantine_add("b", "1-0", "k1", "r", raw_entry(1))
    await store.quarantine_add("c", "2-0", "k2", "r", raw_entry(2))
    await store.quarantine_add("b", "3-0", None, "r", raw_entry(3))
    assert [r.stream_id for r in await store.quarantine_list(limit=2)] == ["3-0", "2-0"]
    only_b = await store.quarantine_list(peer_id="b")
    assert [(r.peer_id, r.stream_id, r.key) for r in only_b] == [
        ("b", "3-0", None),
        ("b", "1-0", "k1"),
    ]
    with pytest.raises(ValueError):
        await store.quarantine_list(limit=0)


async def test_quarantine_record_contents(store: CursorStore) -> None:
    big = bytes(range(256)) * 40  # 10240 bytes, not UTF-8
    fields: dict[bytes | str, bytes | str] = {
        b"op": b"PUT",
        "meta": '{"hlc": 5}',
        b"data": big,
        b"text": b"x" * 5000,
    }
    await store.quarantine_add("b", "1700000000000-1", "user:1", "corrupt zstd frame", fields)
    (record,) = await store.quarantine_list()
    assert (record.peer_id, record.stream_id, record.key, record.reason) == (
        "b",
        "1700000000000-1",
        "user:1",
        "corrupt zstd frame",
    )
    assert record.raw["op"] == "PUT"
    assert record.raw["meta"] == '{"hlc": 5}'
    encoded, note = record.raw["data"].split(" ", 1)
    assert encoded.startswith("base64:")
    assert base64.b64decode(encoded.removeprefix("base64:")) == big[:QUARANTINE_FIELD_MAX_BYTES]
    assert "truncated, 10240 bytes" in note
    assert record.raw["text"].startswith("x" * QUARANTINE_FIELD_MAX_BYTES + " ...[truncated")
    assert record.at_ms > 1_600_000_000_000


async def test_quarantine_survives_odd_input(store: CursorStore) -> None:
    many = {f"f{i}": "v" * 1000 for i in range(200)}
    await store.quarantine_add("b", "1-0", "k" * 10_000, "r" * 10_000, many)
    await store.quarantine_add("b", "2-0", None, "r", {b"\xff\xfe": 7})  # type: ignore[arg-type]
    newest, oldest = await store.quarantine_list()
    assert newest.raw == {"base64://4=": "7"}
    assert len(json.dumps(oldest.raw)) < 20_000
    assert "more fields dropped" in oldest.raw["..."]
    assert oldest.key is not None and len(oldest.key.encode()) <= 4096


async def test_quarantine_trimmed_when_bound_lowered(db_path: Path) -> None:
    async with await CursorStore.open(db_path, quarantine_max_rows=10) as store:
        for index in range(10):
            await store.quarantine_add("b", f"{index}-0", None, "r", raw_entry(index))
    async with await CursorStore.open(db_path, quarantine_max_rows=4) as store:
        assert store.evicted == 6
        assert await store.quarantine_count() == 4
        assert [r.stream_id for r in await store.quarantine_list()] == ["9-0", "8-0", "7-0", "6-0"]


async def test_quarantine_max_rows_must_be_positive(db_path: Path) -> None:
    with pytest.raises(ValueError, match="quarantine_max_rows"):
        await CursorStore.open(db_path, quarantine_max_rows=0)


# ------------------------------------------------------------------------------------------------
# Bootstrap progress


async def test_bootstrap_begin_mark_finish(store: CursorStore) -> None:
    assert await store.bootstrap_state("b") is None
    await store.bootstrap_begin("b", "1700000000000-5")
    state = await store.bootstrap_state("b")
    assert state is not None
    assert (state.tail_id, state.done_branches) == ("1700000000000-5", set())
    assert state.started_ms > 1_600_000_000_000

    await store.bootstrap_mark_done("b", ["00", "01"])
    await store.bootstrap_mark_done("b", iter(["01", "ff"]))
    await store.bootstrap_mark_done("b", [])
    state = await store.bootstrap_state("b")
    assert state is not None and state.done_branches == {"00", "01", "ff"}

    await store.bootstrap_finish("b", "1700000000000-5")
    assert await store.bootstrap_state("b") is None
    assert await store.get("b") == "1700000000000-5"


async def test_bootstrap_begin_twice_keeps_original_tail(store: CursorStore) -> None:
    await store.bootstrap_begin("b", "10-0")
    first = await store.bootstrap_state("b")
    await store.bootstrap_mark_done("b", ["ab"])
    await store.bootstrap_begin("b", "99-0")
    second = await store.bootstrap_state("b")
    assert first is not None and second is not None
    assert second == BootstrapState("10-0", {"ab"}, first.started_ms)


async def test_bootstrap_resumes_after_restart(db_path: Path) -> None:
    async with await CursorStore.open(db_path) as store:
        await store.bootstrap_begin("b", "10-0")
        await store.bootstrap_mark_done("b", ["0a", "0b"])
    async with await CursorStore.open(db_path) as store:
        state = await store.bootstrap_state("b")
        assert state is not None
        assert (state.tail_id, state.done_branches) == ("10-0", {"0a", "0b"})
        await store.bootstrap_begin("b", "20-0")  # a restarted engine calls begin again
        await store.bootstrap_mark_done("b", ["0c"])
        await store.bootstrap_finish("b", "10-0")
    async with await CursorStore.open(db_path) as store:
        assert await store.bootstrap_state("b") is None
        assert await store.get("b") == "10-0"


async def test_bootstraps_are_per_peer(store: CursorStore) -> None:
    await store.bootstrap_begin("b", "1-0")
    await store.bootstrap_begin("c", "2-0")
    await store.bootstrap_mark_done("b", ["aa"])
    await store.bootstrap_finish("c", "2-0")
    state_b = await store.bootstrap_state("b")
    assert state_b is not None and state_b.done_branches == {"aa"}
    assert await store.bootstrap_state("c") is None


async def test_mark_done_without_begin_is_an_error(store: CursorStore, db_path: Path) -> None:
    with pytest.raises(CursorError, match="no bootstrap in progress for peer 'b'") as info:
        await store.bootstrap_mark_done("b", ["aa"])
    assert info.value.peer == "b"
    with pytest.raises(ValueError, match="branch"):
        await store.bootstrap_mark_done("b", ["", "aa"])
    # The failed transaction was rolled back and the store still works.
    await store.save("b", "1-0")
    assert await store.get("b") == "1-0"


async def test_bootstrap_finish_is_one_transaction(store: CursorStore) -> None:
    await store.save("b", "1-0")
    await store.bootstrap_begin("b", "5-0")
    await store.bootstrap_mark_done("b", ["aa"])
    # White-box: make the cursor upsert (the last statement) fail; nothing of the finish may stay.
    assert store._db is not None
    await store._db.execute(
        "CREATE TRIGGER refuse BEFORE UPDATE ON cursors BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    with pytest.raises(CursorError, match="refused"):
        await store.bootstrap_finish("b", "5-0")
    state = await store.bootstrap_state("b")
    assert state is not None and state.done_branches == {"aa"}
    assert await store.get("b") == "1-0"


# ------------------------------------------------------------------------------------------------
# Damaged, foreign and unwritable files


async def test_garbage_file_is_a_clear_error(db_path: Path) -> None:
    write_file(db_path, b"this is not a database " * 200)
    with pytest.raises(CursorError) as info:
        await CursorStore.open(db_path)
    message = str(info.value)
    assert str(db_path) in message
    assert "not a readable SQLite database" in message
    assert "delete it" in message
    assert info.value.path == str(db_path)


async def test_damaged_pages_fail_the_integrity_check(db_path: Path) -> None:
    async with await CursorStore.open(db_path, wal_mode=False, quarantine_max_rows=1000) as store:
        for index in range(100):
            await store.quarantine_add("b", f"{index}-0", None, "r", {"data": "x" * 3000})
    with db_path.open("r+b") as handle:
        handle.seek(4096 * 2)
        handle.write(b"\xa5" * 4096 * 3)
    with pytest.raises(CursorError) as info:
        await CursorStore.open(db_path)
    assert str(db_path) in str(info.value)
    assert "damaged" in str(info.value) or "not a readable" in str(info.value)


async def test_foreign_sqlite_database_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    other = sqlite3.connect(db_path)
    other.execute("CREATE TABLE invoices (id INTEGER)")
    other.commit()
    other.close()
    with pytest.raises(CursorError, match="another program") as info:
        await CursorStore.open(db_path)
    assert str(db_path) in str(info.value)


async def test_newer_schema_is_refused(db_path: Path) -> None:
    async with await CursorStore.open(db_path):
        pass
    other = sqlite3.connect(db_path)
    other.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    other.commit()
    other.close()
    with pytest.raises(CursorError, match="newer than") as info:
        await CursorStore.open(db_path)
    assert str(db_path) in str(info.value)


async def test_missing_table_is_reported_not_recreated(db_path: Path) -> None:
    async with await CursorStore.open(db_path) as store:
        await store.save("b", "1-0")
    other = sqlite3.connect(db_path)
    other.execute("DROP TABLE cursors")
    other.commit()
    other.close()
    with pytest.raises(CursorError, match="missing tables cursors"):
        await CursorStore.open(db_path)


async def test_path_is_a_directory(db_path: Path) -> None:
    make_dirs(db_path)
    with pytest.raises(CursorError, match="is a directory") as info:
        await CursorStore.open(db_path)
    assert str(db_path) in str(info.value)


async def test_parent_is_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    path = blocker / "cursors.db"
    with pytest.raises(CursorError, match="cannot create directory") as info:
        await CursorStore.open(path)
    assert str(path) in str(info.value)


async def test_save_failure_is_a_cursor_error(store: CursorStore, db_path: Path) -> None:
    await store.save("b", "1-0")
    # White-box: query_only makes every write fail with SQLITE_READONLY, even for root.
    assert store._db is not None
    await store._db.execute("PRAGMA query_only = ON")
    with pytest.raises(CursorError) as info:
        await store.save("b", "2-0")
    message = str(info.value)
    assert str(db_path) in message
    assert "save cursor for peer 'b' failed" in message
    assert "readonly" in message
    assert (info.value.path, info.value.peer) == (str(db_path), "b")
    with pytest.raises(CursorError):
        await store.quarantine_add("b", "3-0", None, "r", {})
    with pytest.raises(CursorError):
        await store.bootstrap_finish("b", "3-0")
    await store._db.execute("PRAGMA query_only = OFF")
    assert await store.get("b") == "1-0"
    await store.save("b", "4-0")
    assert await store.get("b") == "4-0"


async def test_disk_full_is_a_cursor_error(store: CursorStore) -> None:
    assert store._db is not None
    (pages,) = next(iter(await store._db.execute_fetchall("PRAGMA page_count")))
    await store._db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(CursorError, match="full"):
        for index in range(1000):
            await store.quarantine_add("b", f"{index}-0", None, "r", {"data": "x" * 4000})
    await store._db.execute("PRAGMA max_page_count = 1073741823")
    await store.save("b", "1-0")
    assert await store.get("b") == "1-0"


@pytest.mark.skipif(IS_ROOT, reason="running as root: file permissions do not stop root's writes")
async def test_read_only_file_fails_on_open_or_save(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    path = directory / "cursors.db"
    async with await CursorStore.open(path) as store:
        await store.save("b", "1-0")
    path.chmod(0o444)
    directory.chmod(0o555)
    try:
        with pytest.raises(CursorError) as info:
            reopened = await CursorStore.open(path)
            try:
                await reopened.save("b", "2-0")
            finally:
                await reopened.close()
        assert str(path) in str(info.value)
    finally:
        directory.chmod(0o755)
        path.chmod(0o644)


# ------------------------------------------------------------------------------------------------
# Lifecycle and concurrency


async def test_close_is_idempotent_and_later_calls_fail(db_path: Path) -> None:
    store = await CursorStore.open(db_path)
    await store.close()
    await store.close()
    with pytest.raises(CursorError, match="after close"):
        await store.get("b")
    with pytest.raises(CursorError, match="after close"):
        await store.save("b", "1-0")


async def test_concurrent_writers_are_serialised(store: CursorStore) -> None:
    async def peer_loop(peer: str) -> None:
        for seq in range(30):
            await store.save(peer, f"100-{seq}")
            if seq % 10 == 0:
                await store.quarantine_add(peer, f"100-{seq}", None, "r", {})

    async def bootstrap_loop() -> None:
        await store.bootstrap_begin("z", "1-0")
        for index in range(20):
            await store.bootstrap_mark_done("z", [f"{index:02x}"])
        await store.bootstrap_finish("z", "1-0")

    await asyncio.gather(*(peer_loop(p) for p in "bcde"), bootstrap_loop())
    assert await store.all() == {
        "b": "100-29",
        "c": "100-29",
        "d": "100-29",
        "e": "100-29",
        "z": "1-0",
    }
    assert await store.quarantine_count() == 5


@pytest.mark.parametrize("yields_before_cancel", range(8))
async def test_cancellation_mid_write_leaves_store_usable(
    store: CursorStore, yields_before_cancel: int
) -> None:
    task = asyncio.create_task(store.bootstrap_finish("b", "7-0"), name="finish[b]")
    for _ in range(yields_before_cancel):
        await asyncio.sleep(0)  # sync-ok: a yield point where the cancel lands
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # Whatever point the cancel hit, no transaction is left open and writes still work.
    await store.save("c", "1-0")
    assert await store.get("c") == "1-0"
    assert store._db is not None and not store._db.in_transaction


async def test_a_partitions_view_keeps_its_own_cursors_bootstraps_and_meta(
    store: CursorStore,
) -> None:
    """Two partitions read the same peer: each keeps its own position, bootstrap progress
    and certification meta in the one file, under ``<peer>{<partition>}``, and closing a
    view leaves the file open for the others."""
    one, two = store.scoped("3"), store.scoped("a")
    await one.save("b", "5-0")
    await two.save("b", "9-1")
    await one.bootstrap_begin("c", "1-0")
    await one.meta_set("nonce", "x")
    assert (await one.get("b"), await two.get("b"), await store.get("b")) == ("5-0", "9-1", None)
    assert await two.bootstrap_state("c") is None and await one.bootstrap_state("c") is not None
    assert (await one.meta_get("nonce"), await two.meta_get("nonce")) == ("x", None)
    assert await store.all() == {"b{3}": "5-0", "b{a}": "9-1"}
    await one.delete("b")
    assert (await one.get("b"), await two.get("b")) == (None, "9-1")
    await one.close()
    assert await two.get("b") == "9-1"


# ---------------------------------------------------------------------------- whole values


def kept_values(path: Path) -> dict[str, bytes | None]:
    """Each quarantined row's key and the whole value kept beside it (None where none is)."""
    rows, _total = read_quarantine(path, limit=100, values=True)
    return {str(row.key): row.whole for row in rows}


async def test_whole_values_are_kept_newest_first_within_their_byte_bound(db_path: Path) -> None:
    store = await CursorStore.open(db_path, quarantine_max_value_bytes=10_000)
    try:
        for i in range(3):
            await store.quarantine_add(
                "me", "0-0", f"k{i}", "absent_on_peer", {}, value=b"%d" % i * 4000
            )
        await store.quarantine_add("b", "1-0", "k3", "bad_meta", {})  # a peer's entry: no value
        await store.quarantine_add("me", "0-0", "k4", "written_off", {}, value=b"v" * 10_001)
    finally:
        await store.close()
    # k4's value alone is over the bound; k0's would take the kept values past it.
    assert kept_values(db_path) == {
        "k4": None,
        "k3": None,
        "k2": b"2" * 4000,
        "k1": b"1" * 4000,
        "k0": None,
    }


async def test_a_value_goes_with_its_row_and_a_lower_bound_applies_at_open(db_path: Path) -> None:
    store = await CursorStore.open(db_path, quarantine_max_rows=2)
    try:
        for i in range(3):
            await store.quarantine_add("me", "0-0", f"k{i}", "absent_on_peer", {}, value=b"x" * 100)
    finally:
        await store.close()
    assert kept_values(db_path) == {"k2": b"x" * 100, "k1": b"x" * 100}
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT COUNT(*) FROM quarantine_values").fetchone()[0] == 2
    reopened = await CursorStore.open(db_path, quarantine_max_value_bytes=150)
    await reopened.close()
    assert kept_values(db_path) == {"k2": b"x" * 100, "k1": None}


async def test_a_file_from_before_whole_values_gains_their_table(db_path: Path) -> None:
    store = await CursorStore.open(db_path)
    await store.quarantine_add("b", "1-0", "k", "bad_meta", {b"op": b"PUT"})
    await store.close()
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.execute("DROP TABLE quarantine_values")
        db.commit()
    assert kept_values(db_path) == {"k": None}  # read as it is, without the table
    store = await CursorStore.open(db_path)
    try:
        await store.quarantine_add("me", "0-0", "j", "written_off", {}, value=b"whole")
    finally:
        await store.close()
    assert kept_values(db_path) == {"j": b"whole", "k": None}
