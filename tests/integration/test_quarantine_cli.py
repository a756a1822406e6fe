"""``replication-engine quarantine``: what an operator reads of the quarantine, and the values
it gives back, from a real cursor database written by ``CursorStore`` (a real process each)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import yaml

from replication_engine import codec
from replication_engine.codec import Change
from replication_engine.cursor import QUARANTINE_FIELD_MAX_BYTES, CursorStore

COMMAND_TIMEOUT_S = 60.0
CLI = (sys.executable, "-m", "replication_engine", "quarantine")
# Compressible JSON, which the stream carries zstd-compressed; binary that stays raw.
JSON_VALUE = json.dumps({"name": "ada", "bio": "x" * 6000}).encode()
BINARY_VALUE = random.Random(3).randbytes(3000)
# Incompressible and over the kept field size: only a prefix of it is in the quarantine.
TOO_BIG = random.Random(4).randbytes(QUARANTINE_FIELD_MAX_BYTES + 900)


def put(key: str, value: bytes, hlc: int = 7) -> dict[str, bytes]:
    return codec.encode_entry(Change.put(key, value, hlc=hlc, origin="b"))


@pytest.fixture
async def config(tmp_path: Path) -> Path:
    """A node whose quarantine holds, oldest first: a value of its own dropped by absence, a
    corrupt entry from b, a delete from b, two values from b (one in partition 3's lane), and
    a value too big to keep whole."""
    db = tmp_path / "cursors.db"
    store = await CursorStore.open(db)
    try:
        await store.quarantine_add(
            "me", "0-0", "doc:1", "absent_on_peer: b", put("doc:1", JSON_VALUE)
        )
        corrupt = {b"op": b"PUT", b"key": b"k:2", b"data": b"zz", b"hash": b"0" * 32}
        await store.quarantine_add("b", "17-0", "k:2", "hash_mismatch: content hash", corrupt)
        gone = codec.encode_entry(Change.delete("k:3", hlc=8, origin="b"))
        await store.quarantine_add("b", "18-0", "k:3", "clock_skew: ahead", gone)
        await store.quarantine_add("b", "19-0", "bin:4", "written_off", put("bin:4", BINARY_VALUE))
        await store.scoped("3").quarantine_add(
            "b", "20-0", "p:5", "absent_on_peer", put("p:5", b"v")
        )
    finally:
        await store.close()
    # A file whose value budget is under TOO_BIG: only the row's first bytes of it are kept.
    store = await CursorStore.open(db, quarantine_max_value_bytes=QUARANTINE_FIELD_MAX_BYTES)
    try:
        await store.quarantine_add("me", "0-0", "big:6", "absent_on_peer: c", put("big:6", TOO_BIG))
    finally:
        await store.close()
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "local_node_id": "me",
                "local": {"redis_url": "redis://127.0.0.1:1/0", "prefix": "t:"},
                "cursor": {"sqlite_path": str(db), "quarantine_max_rows": 2},
            }
        )
    )
    return path


def quarantine(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*CLI, "--config", str(config), *args],
        capture_output=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


def listed(config: Path, *args: str) -> list[dict[str, object]]:
    done = quarantine(config, "--json", *args)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


def ids(rows: Sequence[dict[str, object]]) -> list[object]:
    return [row["id"] for row in rows]


def test_the_table_lists_the_newest_first_with_key_and_reason(config: Path) -> None:
    done = quarantine(config, "--limit", "3")
    assert done.returncode == 0, done.stderr
    text = done.stdout.decode()
    lines = text.splitlines()
    assert [line.split()[0] for line in lines[1:7:2]] == ["6", "5", "4"]
    assert "big:6" in lines[1] and "absent_on_peer: c" in lines[2]
    assert "3 shown" in lines[-1] and "6 kept in all" in lines[-1]


def test_rows_are_filtered_by_peer_in_every_partition_reason_prefix_and_key(config: Path) -> None:
    assert ids(listed(config, "--peer", "b")) == [5, 4, 3, 2]
    assert listed(config, "--peer", "b")[0]["peer"] == "b{3}"
    assert ids(listed(config, "--reason", "absent_on_peer")) == [6, 5, 1]
    assert ids(listed(config, "--reason", "absent_on_peer", "--peer", "me")) == [6, 1]
    assert ids(listed(config, "--key", "k:2")) == [2]
    assert listed(config, "--key", "nothing") == []


def test_json_rows_carry_what_arrived(config: Path) -> None:
    (row,) = listed(config, "--key", "k:2")
    assert row["reason"] == "hash_mismatch: content hash"
    assert row["raw"] == {"op": "PUT", "key": "k:2", "data": "zz", "hash": "0" * 32}


@pytest.mark.parametrize(("row", "value"), [(1, JSON_VALUE), (4, BINARY_VALUE), (5, b"v")])
def test_a_value_set_aside_comes_back_byte_for_byte(config: Path, row: int, value: bytes) -> None:
    done = quarantine(config, "--value", str(row))
    assert done.returncode == 0, done.stderr
    assert done.stdout == value


@pytest.mark.parametrize(
    ("row", "why"),
    [
        (6, f"of which the first {QUARANTINE_FIELD_MAX_BYTES} were kept"),
        (2, "does not match its content hash"),
        (3, "a delete"),
    ],
)
def test_a_row_without_its_whole_value_says_why_and_writes_nothing(
    config: Path, row: int, why: str
) -> None:
    done = quarantine(config, "--value", str(row))
    assert done.returncode == 1 and done.stdout == b""
    assert why in done.stderr.decode()


def test_a_missing_row_or_database_is_named_and_nothing_is_created(
    config: Path, tmp_path: Path
) -> None:
    done = quarantine(config, "--value", "99")
    assert done.returncode == 2 and "no quarantine row 99" in done.stderr.decode()
    settings = yaml.safe_load(config.read_text())
    missing = tmp_path / "elsewhere" / "cursors.db"
    settings["cursor"]["sqlite_path"] = str(missing)
    config.write_text(yaml.safe_dump(settings))
    done = quarantine(config)
    assert done.returncode == 2 and "no such file" in done.stderr.decode()
    assert not missing.parent.exists()


async def test_it_reads_beside_a_running_engine_without_trimming(config: Path) -> None:
    # The config keeps 2 rows at most: opening the file as the engine does would trim it.
    settings = yaml.safe_load(await asyncio.to_thread(config.read_text))
    engine_side = await CursorStore.open(settings["cursor"]["sqlite_path"])
    try:
        await engine_side.save("b", "20-0")
        rows = await asyncio.to_thread(listed, config, "--limit", "100")
        assert ids(rows) == [6, 5, 4, 3, 2, 1]
        await engine_side.quarantine_add("b", "21-0", "k:7", "bad_meta", {b"op": b"PUT"})
        assert ids(await asyncio.to_thread(listed, config, "--limit", "1")) == [7]
    finally:
        await engine_side.close()


async def test_a_value_kept_whole_comes_back_whatever_its_size(config: Path) -> None:
    settings = yaml.safe_load(await asyncio.to_thread(config.read_text))
    store = await CursorStore.open(settings["cursor"]["sqlite_path"])
    try:
        entry = put("big:8", TOO_BIG)  # as the drop of a version of this store's own keeps it
        await store.quarantine_add(
            "me", "0-0", "big:8", "absent_on_peer: b", entry, value=entry["data"]
        )
    finally:
        await store.close()
    done = await asyncio.to_thread(quarantine, config, "--value", "7")
    assert done.returncode == 0, done.stderr
    assert done.stdout == TOO_BIG
    row, *others = await asyncio.to_thread(listed, config)
    assert (row["id"], row["value_kept_bytes"]) == (7, len(entry["data"]))
    assert [r["value_kept_bytes"] for r in others] == [None] * 6
    table = await asyncio.to_thread(quarantine, config, "--limit", "1")
    assert f"[value kept whole, {len(entry['data']):,} bytes]" in table.stdout.decode()


async def test_a_peers_rejected_value_over_the_row_limit_comes_back_whole(config: Path) -> None:
    # As the tailer keeps an entry it sets aside (a clock-skewed write): no value= given.
    settings = yaml.safe_load(await asyncio.to_thread(config.read_text))
    store = await CursorStore.open(settings["cursor"]["sqlite_path"])
    try:
        await store.quarantine_add("b", "22-0", "big:8", "clock_skew: ahead", put("big:8", TOO_BIG))
    finally:
        await store.close()
    done = await asyncio.to_thread(quarantine, config, "--value", "7")
    assert done.returncode == 0, done.stderr
    assert done.stdout == TOO_BIG
    (row,) = await asyncio.to_thread(listed, config, "--key", "big:8")
    assert row["value_kept_bytes"] == len(TOO_BIG)


async def test_what_a_peer_sent_cannot_write_control_characters_to_the_terminal(
    config: Path,
) -> None:
    settings = yaml.safe_load(await asyncio.to_thread(config.read_text))
    store = await CursorStore.open(settings["cursor"]["sqlite_path"])
    try:
        hostile = "k\x1b[2J\x1b]0;owned\x07\x9b31m"  # C0 escapes, then a C1 CSI
        await store.quarantine_add("b", "30-0", hostile, "bad_meta", {b"key": hostile.encode()})
    finally:
        await store.close()
    done = await asyncio.to_thread(quarantine, config, "--limit", "1")
    assert done.returncode == 0, done.stderr
    assert b"\x1b" not in done.stdout and b"\x07" not in done.stdout
    assert "\x9b" not in done.stdout.decode()
    assert "k\\x1b[2J\\x1b]0;owned\\x07\\x9b31m" in done.stdout.decode()
    as_json = await asyncio.to_thread(quarantine, config, "--limit", "1", "--json")
    assert as_json.stdout.isascii() and b"\\u001b" in as_json.stdout
    assert json.loads(as_json.stdout)["key"] == hostile


@pytest.mark.parametrize(("row", "code"), [(4, 2), (1, 0)])
def test_a_binary_value_is_not_written_to_a_terminal(config: Path, row: int, code: int) -> None:
    primary, secondary = pty.openpty()
    try:
        done = subprocess.run(
            [*CLI, "--config", str(config), "--value", str(row)],
            stdout=secondary,
            stderr=subprocess.PIPE,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
    finally:
        os.close(secondary)
        os.close(primary)
    assert done.returncode == code, done.stderr
    if code:
        assert b"not text" in done.stderr and b"> value.bin" in done.stderr


async def test_a_reader_that_stops_early_is_no_error(tmp_path: Path) -> None:
    # `quarantine | head -c 1`: the pipe closes long before the table is written out (more of
    # it than a pipe buffers, so a write meets the closed pipe whatever the timing).
    db = tmp_path / "many.db"
    store = await CursorStore.open(db)
    try:
        for i in range(1500):
            await store.quarantine_add("b", f"{i}-0", f"k:{i}", "hash_mismatch: " + "x" * 80, {})
    finally:
        await store.close()
    path = tmp_path / "many.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "local_node_id": "me",
                "local": {"redis_url": "redis://127.0.0.1:1/0"},
                "cursor": {"sqlite_path": str(db)},
            }
        )
    )
    reader_gone = await asyncio.to_thread(
        subprocess.run,
        f"{' '.join(CLI)} --config {path} --limit 1500 | head -c 1",
        shell=True,
        capture_output=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
        executable="/bin/bash",
    )
    assert len(reader_gone.stdout) == 1, reader_gone.stdout
    assert b"Traceback" not in reader_gone.stderr, reader_gone.stderr
