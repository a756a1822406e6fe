"""Per-peer stream cursors, snapshot-bootstrap progress and the quarantine, in one SQLite file.

The hot path saves a peer's cursor only after the batch it covers is applied (at-least-once), so
a save must be on disk when it returns, and a damaged file must stop the engine with an error
that names the file: quietly reading "no cursor" would turn a broken disk into a silent replay or
a silent re-bootstrap.

All statements go through one aiosqlite connection (one worker thread) and one asyncio.Lock.
The lock covers reads too: a read queued between a transaction's BEGIN and COMMIT on the same
connection would otherwise see that transaction half done.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import aiosqlite

from replication_engine.codec import CodecError, decode_payload, parse_stream_id, verify_hash
from replication_engine.errors import ReplicationError

__all__ = [
    "BootstrapState",
    "CursorError",
    "CursorStore",
    "QuarantineRecord",
    "RawFields",
    "printable_text",
    "quarantined_value",
    "read_quarantine",
]

log = logging.getLogger(__name__)

# Bumped whenever a table changes; a file written by a newer engine is refused, not guessed at.
SCHEMA_VERSION = 1
# Bytes kept of each quarantined field: enough to recognise the entry, bounded per row.
QUARANTINE_FIELD_MAX_BYTES = 4096
# Bytes kept of one quarantined entry in total, so quarantine_max_rows bounds the file size
# (a hostile entry may carry thousands of fields).
QUARANTINE_ENTRY_MAX_BYTES = 16_384
# Bytes kept of a quarantined entry's key and reason.
QUARANTINE_TEXT_MAX_BYTES = 4096
# How long a statement waits for a lock held by another process (an operator's sqlite3 shell).
BUSY_TIMEOUT_MS = 5000
# Prefix marking a quarantined field stored as base64 because it was not printable UTF-8.
BASE64_PREFIX = "base64:"
# What _field_text appends to a field it cut.
_TRUNCATION_NOTE = re.compile(r" \.\.\.\[truncated, (\d+) bytes\]\Z")
# How long a cancelled open() waits for SQLite to finish opening the file, to close it: a local
# open takes milliseconds, and a hung file system must not hang the caller's shutdown as well.
ABANDONED_OPEN_WAIT_S = 5.0

# A stream entry's fields as redis-py returns them (bytes, or str with decode_responses). Mapping
# keys are invariant, so each key type is listed for dict[bytes, bytes] and dict[str, str] to fit.
RawFields = (
    Mapping[bytes, bytes | str] | Mapping[str, bytes | str] | Mapping[bytes | str, bytes | str]
)

# SQLite result codes that mean the file itself is damaged or not a database.
_DAMAGED_CODES = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
# SQLite result codes worth retrying: another process holds a lock.
_RETRYABLE_CODES = frozenset({"SQLITE_BUSY", "SQLITE_LOCKED"})
_RECOVERY_HINT = (
    "stop the engine and move the file aside or delete it; on the next start every peer is "
    "bootstrapped again from a snapshot (safe: applies are idempotent), and the quarantine "
    "kept in the file is lost"
)
_TABLES = ("cursors", "quarantine", "bootstrap", "bootstrap_branches", "meta")
# Node-wide facts that outlive a run (e.g. when this node was last in contact with the mesh).
# Added after schema version 1 shipped without a version bump: files without it gain it on open,
# and older engines ignore a table they do not know, so a downgrade keeps working.
_META_TABLE = """CREATE TABLE IF NOT EXISTS meta (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    )"""
# Whole payloads of this store's own versions that it dropped or replaced (docs/DELETES.md,
# "Written off" and "Claims"), and of peers' entries whose rows cut them, beside their
# quarantine rows, whose fields are cut at QUARANTINE_FIELD_MAX_BYTES: what an operator needs
# to write such a value again. Bounded in
# bytes (the newest kept first). Added after schema version 1 like meta: created where missing,
# ignored by older engines (whose row trims leave values that the next open removes).
_VALUES_TABLE = """CREATE TABLE IF NOT EXISTS quarantine_values (
        id INTEGER PRIMARY KEY,
        size INTEGER NOT NULL,
        data BLOB NOT NULL
    )"""
# Default of cursor.quarantine_max_value_bytes.
QUARANTINE_MAX_VALUE_BYTES = 256 * 1024 * 1024
_SCHEMA = (
    """CREATE TABLE cursors (
        peer_id TEXT PRIMARY KEY,
        stream_id TEXT NOT NULL,
        updated_ms INTEGER NOT NULL
    )""",
    """CREATE TABLE quarantine (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        peer_id TEXT NOT NULL,
        stream_id TEXT NOT NULL,
        key TEXT,
        reason TEXT NOT NULL,
        raw TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    )""",
    "CREATE INDEX quarantine_by_peer ON quarantine (peer_id, id)",
    """CREATE TABLE bootstrap (
        peer_id TEXT PRIMARY KEY,
        tail_id TEXT NOT NULL,
        started_ms INTEGER NOT NULL
    )""",
    """CREATE TABLE bootstrap_branches (
        peer_id TEXT NOT NULL,
        branch TEXT NOT NULL,
        PRIMARY KEY (peer_id, branch)
    ) WITHOUT ROWID""",
    _META_TABLE,
    _VALUES_TABLE,
)
_UPSERT_CURSOR = (
    "INSERT INTO cursors (peer_id, stream_id, updated_ms) VALUES (?, ?, ?) "
    "ON CONFLICT (peer_id) DO UPDATE SET "
    "stream_id = excluded.stream_id, updated_ms = excluded.updated_ms"
)
_QUARANTINE_COLUMNS = "id, peer_id, stream_id, key, reason, raw, at_ms"
# Values whose quarantine row is gone (rows are trimmed oldest first), then, newest first,
# whatever goes past `max_bytes` in all (size is stored before data, so the sum never reads a
# value's overflow pages).
_TRIM_ORPHAN_VALUES = (
    "DELETE FROM quarantine_values WHERE id < (SELECT COALESCE(MIN(id), 1 << 62) FROM quarantine)"
)
_TRIM_VALUES = (
    "DELETE FROM quarantine_values WHERE id <= (SELECT id FROM (SELECT id, SUM(size) OVER "
    "(ORDER BY id DESC) AS kept FROM quarantine_values) WHERE kept > ? ORDER BY id DESC LIMIT 1)"
)
# Keeps the newest `max_rows` rows: everything at or below the id just past them goes.
_TRIM_QUARANTINE = (
    "DELETE FROM quarantine WHERE id <= "
    "(SELECT id FROM quarantine ORDER BY id DESC LIMIT 1 OFFSET ?)"
)


class CursorError(ReplicationError):
    """The cursor database cannot be opened, read or written.

    Attributes:
        path: the database file.
        peer: the peer the failed operation was for, if any.
        retryable: True when another process held a lock; everything else needs an operator.
    """

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        peer: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.peer = peer
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class QuarantineRecord:
    """One rejected stream entry, kept for an operator to inspect.

    ``raw`` maps field names to their text; a field that was not printable UTF-8 is stored as
    ``"base64:<data>"``, and one longer than the field limit ends in a truncation note.
    """

    id: int
    peer_id: str
    stream_id: str
    key: str | None
    reason: str
    raw: dict[str, str]
    at_ms: int
    # The version's whole payload, where it was one of this store's own or the row cut a
    # peer's, kept whole and read (read_quarantine(values=True)): see _VALUES_TABLE.
    whole: bytes | None = None
    # Its size, where one is kept (read_quarantine).
    kept_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class BootstrapState:
    """Progress of a snapshot bootstrap from one peer, as left by the last run.

    Attributes:
        tail_id: the peer's stream tail when the bootstrap began; tailing resumes there.
        done_branches: Merkle branch ids whose items are fully applied.
        started_ms: wall-clock time the bootstrap began.
    """

    tail_id: str
    done_branches: set[str]
    started_ms: int


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _check_stream_id(value: object, name: str) -> str:
    """The codec's reading of a stream id, with both parts required: a cursor is always an
    entry's full id, never the ``<ms>`` shorthand XRANGE accepts."""
    if isinstance(value, str) and "-" in value:
        try:
            return str(parse_stream_id(value))
        except CodecError:
            pass
    raise ValueError(f"{name}: expected a stream id '<ms>-<seq>', got {value!r}")


def _check_peer_id(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"peer_id: expected a non-empty string, got {value!r}")
    return value


def _truncate_utf8(text: str, limit: int) -> str:
    data = text.encode("utf-8", errors="backslashreplace")
    if len(data) <= limit:
        return text
    return data[:limit].decode("utf-8", errors="ignore")


def _field_text(value: object, limit: int) -> str:
    """Printable text for one quarantined field, keeping at most ``limit`` bytes of it."""
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
    else:
        # Quarantined input is by definition unexpected; never let its type crash the store.
        text_value = value if isinstance(value, str) else repr(value)
        data = text_value.encode("utf-8", errors="backslashreplace")
    kept = data[:limit]
    text = _printable_utf8(kept, truncated=len(data) > limit)
    if text is None:
        text = BASE64_PREFIX + base64.b64encode(kept).decode("ascii")
    if len(data) > limit:
        text += f" ...[truncated, {len(data)} bytes]"
    return text


def printable_text(data: bytes) -> str | None:
    """``data`` as text when it is printable UTF-8 (tabs and line breaks allowed), else None:
    what the quarantine stores as is rather than in base64, and what may go to a terminal."""
    return _printable_utf8(data, truncated=False)


def _printable_utf8(data: bytes, *, truncated: bool) -> str | None:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # Truncation can split the last character; anything earlier means binary data.
        if not truncated or exc.start < len(data) - 3:
            return None
        try:
            text = data[: exc.start].decode("utf-8")
        except UnicodeDecodeError:
            return None
    if all(ch.isprintable() or ch in "\t\n\r" for ch in text):
        return text
    return None


def _encode_raw(raw: RawFields) -> tuple[str, bytes | None]:
    """The row's text for ``raw``, and the entry's ``data`` field whole when the row cut it."""
    fields: dict[str, str] = {}
    budget = QUARANTINE_ENTRY_MAX_BYTES
    items = list(raw.items())
    data: bytes | None = None
    for position, (name, value) in enumerate(items):
        if budget <= 0:
            fields["..."] = f"{len(items) - position} more fields dropped"
            break
        key = _field_text(name, 256)
        limit = min(QUARANTINE_FIELD_MAX_BYTES, budget)
        text = _field_text(value, limit)
        budget -= len(key) + len(text)
        fields[key] = text
        if key == "data" and isinstance(value, bytes | bytearray | memoryview):
            data = bytes(value) if len(value) > limit else None
    return json.dumps(fields, ensure_ascii=False), data


def _prepare_location(location: str) -> None:
    file = Path(location)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CursorError(
            f"cursor database {location}: cannot create directory {file.parent}: "
            f"{exc.strerror or exc}",
            path=location,
        ) from exc
    if file.is_dir():
        # SQLite would only say "unable to open database file".
        raise CursorError(
            f"cursor database {location}: the path is a directory, expected a file",
            path=location,
        )


async def _connect(location: str) -> aiosqlite.Connection:
    """``aiosqlite.connect`` that closes the connection it opened if the caller is cancelled.

    aiosqlite's ``Connection._connect``, cancelled after its worker thread has opened the file
    but before the result reached the event loop, only stops the thread: the sqlite3 connection
    is dropped unclosed, and its file stays open until the garbage collector breaks the
    connection's reference cycle (an engine restarted again and again piles up descriptors).
    So the connect runs in a task of its own behind a shield; a cancelled caller waits for it
    (at most ``ABANDONED_OPEN_WAIT_S``), closes what it opened, then re-raises.
    """
    connecting = asyncio.create_task(_open_connection(location), name="cursor_open")
    try:
        return await asyncio.shield(connecting)
    except asyncio.CancelledError:
        await asyncio.shield(_close_when_connected(connecting, location))
        raise


async def _open_connection(location: str) -> aiosqlite.Connection:
    # A coroutine for create_task: aiosqlite.connect returns an awaitable Connection.
    return await aiosqlite.connect(location, isolation_level=None)


async def _close_when_connected(
    connecting: asyncio.Task[aiosqlite.Connection], location: str
) -> None:
    """Close the connection an abandoned connect makes, once it is made."""
    done, _ = await asyncio.wait({connecting}, timeout=ABANDONED_OPEN_WAIT_S)
    if not done:
        log.warning(
            "cursor.open_abandoned",
            extra={
                "path": location,
                "waited_seconds": ABANDONED_OPEN_WAIT_S,
                "hint": "an open of the cursor database is still running after it was "
                "cancelled; the connection is closed when it finishes",
            },
        )
        connecting.add_done_callback(_stop_when_connected)
        return
    if connecting.cancelled() or connecting.exception() is not None:
        return  # nothing was opened
    await _close_quietly(connecting.result(), location)


def _stop_when_connected(connecting: asyncio.Task[aiosqlite.Connection]) -> None:
    # stop() queues the close on the connection's worker thread; nothing is left to await it.
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result().stop()


async def _close_quietly(db: aiosqlite.Connection, location: str) -> None:
    """Close a connection open() will not hand out: the error that got us here matters more."""
    try:
        await db.close()
    except Exception as exc:
        log.warning(
            "cursor.close_failed",
            extra={
                "path": location,
                "error": f"{type(exc).__name__}: {exc}"[:300],
                "hint": "closing the database after a failed open",
            },
        )


class CursorStore:
    """Durable per-peer state of the replication engine, backed by one SQLite file.

    Use :meth:`open` to create one and :meth:`close` (or ``async with``) to release it.

    Durability: with ``wal_mode`` (the default) commits run with ``synchronous=NORMAL``. A
    committed write survives a crash of the engine process; after a power loss the newest commits
    may be rolled back, which only means re-applying a batch, and applies are idempotent.
    Without WAL, ``synchronous=FULL`` syncs every commit.

    Attributes:
        path: the database file.
        evicted: quarantine rows dropped since open to stay within ``quarantine_max_rows``.
    """

    def __init__(
        self,
        db: aiosqlite.Connection,
        path: str,
        *,
        wal_mode: bool,
        quarantine_max_rows: int,
        quarantine_max_value_bytes: int = QUARANTINE_MAX_VALUE_BYTES,
    ) -> None:
        # Private: open() prepares the file before handing out a store.
        self._db: aiosqlite.Connection | None = db
        self._lock = asyncio.Lock()
        self._wal_mode = wal_mode
        self._quarantine_max_rows = quarantine_max_rows
        self._quarantine_max_value_bytes = quarantine_max_value_bytes
        self.path = path
        self.evicted = 0
        # Set on a partition's view (scoped()): appended to every peer id and meta name.
        self._scope = ""

    def scoped(self, partition: str) -> CursorStore:
        """The view one partition of a store of many keeps its state through: cursors,
        bootstrap progress, quarantine rows and meta of its own, named ``<peer>{<partition>}``
        (node ids cannot contain braces), in the same file and transactions. Closing the
        store closes every view."""
        view = copy.copy(self)
        view._scope = f"{{{partition}}}"
        return view

    def _lane(self, peer_id: str) -> str:
        return _check_peer_id(peer_id) + self._scope

    @classmethod
    async def open(
        cls,
        path: str | Path,
        *,
        wal_mode: bool = True,
        quarantine_max_rows: int = 10_000,
        quarantine_max_value_bytes: int = QUARANTINE_MAX_VALUE_BYTES,
    ) -> CursorStore:
        """Open (creating if needed) and check the cursor database.

        Args:
            path: the SQLite file; missing parent directories are created.
            wal_mode: use WAL journaling; open fails if SQLite cannot turn it on.
            quarantine_max_rows: most quarantine rows kept; older ones are dropped.
            quarantine_max_value_bytes: most bytes of whole values kept beside their rows
                (``quarantine_add(value=...)``); older ones are dropped, their rows kept.

        Raises:
            CursorError: the file cannot be created or opened, is not a SQLite database, fails
                its integrity check, was written by a newer schema, or cannot be written. The
                message names the path and what the operator can do.
            ValueError: ``quarantine_max_rows`` is below 1.
        """
        if quarantine_max_rows < 1:
            raise ValueError(f"quarantine_max_rows: must be >= 1, got {quarantine_max_rows}")
        if quarantine_max_value_bytes < 0:
            raise ValueError(
                f"quarantine_max_value_bytes: must be >= 0, got {quarantine_max_value_bytes}"
            )
        location = str(path)
        if location != ":memory:":
            await asyncio.to_thread(_prepare_location, location)
        try:
            db = await _connect(location)
        except sqlite3.Error as exc:
            raise CursorError(
                f"cursor database {location}: cannot open: {exc}", path=location
            ) from exc
        store = cls(
            db,
            location,
            wal_mode=wal_mode,
            quarantine_max_rows=quarantine_max_rows,
            quarantine_max_value_bytes=quarantine_max_value_bytes,
        )
        try:
            await store._prepare()
        except BaseException:
            # Any failure or cancellation of the checks: the caller never gets the connection.
            await _close_quietly(db, location)
            raise
        log.info(
            "cursor.opened",
            extra={"path": location, "wal": wal_mode, "quarantine_max_rows": quarantine_max_rows},
        )
        return store

    async def _prepare(self) -> None:
        db = self._connection("open", None)
        try:
            await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            # The first statement that reads the file: garbage fails here with SQLITE_NOTADB.
            problems = [row[0] for row in await db.execute_fetchall("PRAGMA quick_check")]
        except sqlite3.Error as exc:
            raise self._error("open", None, exc) from exc
        if problems != ["ok"]:
            # quick_check reports up to 100 problems, some spanning lines; show the first few.
            lines = [
                line.strip()
                for problem in problems
                for line in str(problem).splitlines()
                if line.strip() and not line.startswith("***")
            ]
            shown = "; ".join(lines[:3])
            if len(lines) > 3:
                shown += f"; {len(lines) - 3} more"
            raise CursorError(
                f"cursor database {self.path} is damaged (integrity check: {shown}); "
                f"{_RECOVERY_HINT}",
                path=self.path,
            )
        try:
            await self._set_journal_mode(db)
            await self._migrate(db)
        except sqlite3.Error as exc:
            raise self._error("open", None, exc) from exc
        await self._trim_quarantine_on_open()

    async def _set_journal_mode(self, db: aiosqlite.Connection) -> None:
        wanted = "wal" if self._wal_mode else "delete"
        rows = list(await db.execute_fetchall(f"PRAGMA journal_mode = {wanted}"))
        mode = str(rows[0][0]).lower() if rows else "unknown"
        if mode != wanted:
            raise CursorError(
                f"cursor database {self.path}: could not switch to journal_mode={wanted} "
                f"(SQLite kept {mode!r}); put the file on a local filesystem or set "
                f"cursor.wal_mode to false",
                path=self.path,
            )
        # WAL commits are atomic and survive a process crash at NORMAL; only rollback
        # journals need FULL for the same guarantee.
        synchronous = "NORMAL" if self._wal_mode else "FULL"
        await db.execute(f"PRAGMA synchronous = {synchronous}")

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        try:
            await db.execute("BEGIN IMMEDIATE")
            await self._check_or_create_schema(db)
            # A real write at open, so a read-only file or full disk fails at start-up rather
            # than on the first cursor save.
            await db.execute("UPDATE schema_version SET version = version")
            await db.execute("COMMIT")
        except BaseException:
            await self._rollback(db)
            raise

    async def _check_or_create_schema(self, db: aiosqlite.Connection) -> None:
        tables = {
            str(row[0])
            for row in await db.execute_fetchall(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            )
        }
        if "schema_version" not in tables:
            foreign = sorted(tables - {"sqlite_sequence"})
            if foreign:
                raise CursorError(
                    f"cursor database {self.path} is a SQLite database of another program "
                    f"(tables {', '.join(foreign[:5])}); point cursor.sqlite_path at a new file",
                    path=self.path,
                )
            await db.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            await db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            for statement in _SCHEMA:
                await db.execute(statement)
            return
        versions = [
            row[0] for row in await db.execute_fetchall("SELECT version FROM schema_version")
        ]
        if len(versions) != 1 or not isinstance(versions[0], int):
            raise CursorError(
                f"cursor database {self.path} is damaged (schema_version holds {versions!r}); "
                f"{_RECOVERY_HINT}",
                path=self.path,
            )
        if versions[0] > SCHEMA_VERSION:
            raise CursorError(
                f"cursor database {self.path} has schema version {versions[0]}, newer than "
                f"this engine's {SCHEMA_VERSION}; run the newer engine or {_RECOVERY_HINT}",
                path=self.path,
            )
        if "meta" not in tables:
            await db.execute(_META_TABLE)
            tables.add("meta")
        await db.execute(_VALUES_TABLE)
        missing = [table for table in _TABLES if table not in tables]
        if missing:
            raise CursorError(
                f"cursor database {self.path} is damaged (missing tables "
                f"{', '.join(missing)}); {_RECOVERY_HINT}",
                path=self.path,
            )

    async def _trim_quarantine_on_open(self) -> None:
        # quarantine_max_rows may have been lowered since the file was written.
        async with self._transaction("trim quarantine", None) as db:
            async with db.execute(_TRIM_QUARANTINE, (self._quarantine_max_rows,)) as cursor:
                dropped = max(cursor.rowcount, 0)
            await self._trim_values(db, orphans=True, bytes_bound=True)
        self.evicted += dropped

    async def _trim_values(
        self, db: aiosqlite.Connection, *, orphans: bool, bytes_bound: bool
    ) -> None:
        if orphans:
            await db.execute(_TRIM_ORPHAN_VALUES)
        if bytes_bound:
            await db.execute(_TRIM_VALUES, (self._quarantine_max_value_bytes,))

    # ----------------------------------------------------------------------------------------
    # Plumbing

    def _connection(self, action: str, peer: str | None) -> aiosqlite.Connection:
        if self._db is None:
            raise CursorError(
                f"cursor database {self.path}: {action} after close", path=self.path, peer=peer
            )
        return self._db

    def _error(self, action: str, peer: str | None, exc: sqlite3.Error) -> CursorError:
        code = getattr(exc, "sqlite_errorname", "") or ""
        subject = f" for peer {peer!r}" if peer is not None else ""
        message = f"cursor database {self.path}: {action}{subject} failed: {exc}"
        if code:
            message += f" ({code})"
        if code.startswith("SQLITE_READONLY") or code.startswith("SQLITE_CANTOPEN"):
            message += "; the engine needs write access to the file and its directory"
        elif code == "SQLITE_FULL":
            message += "; free disk space"
        if code in _DAMAGED_CODES:
            message = (
                f"cursor database {self.path} is not a readable SQLite database: {exc}; "
                f"{_RECOVERY_HINT}"
            )
        return CursorError(message, path=self.path, peer=peer, retryable=code in _RETRYABLE_CODES)

    async def _rollback(self, db: aiosqlite.Connection) -> None:
        """Roll back whatever transaction the connection is in, if any.

        Statements run in FIFO order on the connection's worker thread, so a ROLLBACK queued
        here runs after any statement a cancelled caller left in flight, and before anything a
        later caller queues. It is shielded: a connection left inside a transaction would make
        every later BEGIN fail.
        """

        async def rollback() -> None:
            try:
                await db.execute("ROLLBACK")
            except sqlite3.OperationalError as exc:
                # SQLite already ended the transaction (COMMIT went through, or it rolled back
                # by itself after e.g. SQLITE_FULL).
                if "no transaction is active" not in str(exc):
                    log.warning(
                        "cursor.rollback_failed",
                        extra={"path": self.path, "error": f"{type(exc).__name__}: {exc}"[:300]},
                    )
            except Exception as exc:
                log.warning(
                    "cursor.rollback_failed",
                    extra={"path": self.path, "error": f"{type(exc).__name__}: {exc}"[:300]},
                )

        await asyncio.shield(rollback())

    @contextlib.asynccontextmanager
    async def _transaction(
        self, action: str, peer: str | None
    ) -> AsyncIterator[aiosqlite.Connection]:
        db = self._connection(action, peer)
        async with self._lock:
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.execute("COMMIT")
            except sqlite3.Error as exc:
                await self._rollback(db)
                raise self._error(action, peer, exc) from exc
            except BaseException:
                # Includes cancellation while BEGIN or COMMIT was already queued.
                await self._rollback(db)
                raise

    async def _write(
        self, action: str, peer: str | None, sql: str, parameters: Sequence[Any]
    ) -> int:
        """Run one statement as its own (autocommit) transaction; returns the rows changed."""
        db = self._connection(action, peer)
        async with self._lock:
            try:
                async with db.execute(sql, parameters) as cursor:
                    return max(cursor.rowcount, 0)
            except sqlite3.Error as exc:
                raise self._error(action, peer, exc) from exc

    async def _put(
        self, action: str, peer: str | None, sql: str, parameters: Sequence[Any]
    ) -> None:
        """Run one statement as its own transaction when its row count is not needed: one hand-off
        to SQLite's thread instead of two (execute, then close the cursor), which halves the CPU
        of a cursor save (99 against 209 us on the benchmark machine)."""
        db = self._connection(action, peer)
        async with self._lock:
            try:
                await db.execute_fetchall(sql, parameters)
            except sqlite3.Error as exc:
                raise self._error(action, peer, exc) from exc

    async def _read(
        self, action: str, peer: str | None, sql: str, parameters: Sequence[Any] = ()
    ) -> list[sqlite3.Row]:
        db = self._connection(action, peer)
        async with self._lock:
            try:
                return list(await db.execute_fetchall(sql, parameters))
            except sqlite3.Error as exc:
                raise self._error(action, peer, exc) from exc

    # ----------------------------------------------------------------------------------------
    # Lifecycle

    async def close(self) -> None:
        """Wait for the running statement, then close the file. Safe to call twice.

        Raises:
            CursorError: SQLite failed to close the file cleanly.
        """
        if self._scope:
            return  # a partition's view: the store it came from closes the file
        if self._db is None:
            return
        async with self._lock:
            db, self._db = self._db, None
            if db is None:
                return
            try:
                await db.close()
            except sqlite3.Error as exc:
                raise self._error("close", None, exc) from exc
        log.info("cursor.closed", extra={"path": self.path})

    async def __aenter__(self) -> CursorStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # ----------------------------------------------------------------------------------------
    # Cursors

    async def get(self, peer_id: str) -> str | None:
        """The last stream id from ``peer_id`` whose batch is fully applied, or None."""
        peer_id = self._lane(peer_id)
        rows = await self._read(
            "read cursor", peer_id, "SELECT stream_id FROM cursors WHERE peer_id = ?", (peer_id,)
        )
        return str(rows[0][0]) if rows else None

    async def save(self, peer_id: str, stream_id: str) -> None:
        """Record that every entry of ``peer_id`` up to ``stream_id`` is applied.

        Call it only after the batch is applied: the saved id is where tailing resumes after a
        restart. The write is committed when this returns.

        Raises:
            ValueError: ``stream_id`` is not ``<ms>-<seq>`` or ``peer_id`` is empty.
            CursorError: the write failed (read-only file, full disk, ...).
        """
        peer_id = self._lane(peer_id)
        _check_stream_id(stream_id, "stream_id")
        await self._put("save cursor", peer_id, _UPSERT_CURSOR, (peer_id, stream_id, _now_ms()))
        log.debug("cursor.saved", extra={"peer": peer_id, "stream_id": stream_id})

    async def delete(self, peer_id: str) -> None:
        """Forget the cursor and any bootstrap progress of ``peer_id``, forcing a re-bootstrap."""
        peer_id = self._lane(peer_id)
        async with self._transaction("delete cursor", peer_id) as db:
            await db.execute("DELETE FROM cursors WHERE peer_id = ?", (peer_id,))
            await db.execute("DELETE FROM bootstrap_branches WHERE peer_id = ?", (peer_id,))
            await db.execute("DELETE FROM bootstrap WHERE peer_id = ?", (peer_id,))
        log.info("cursor.deleted", extra={"peer": peer_id})

    async def all(self) -> dict[str, str]:
        """Every saved cursor, by peer id."""
        rows = await self._read(
            "read cursors", None, "SELECT peer_id, stream_id FROM cursors ORDER BY peer_id"
        )
        return {str(row[0]): str(row[1]) for row in rows}

    # ----------------------------------------------------------------------------------------
    # Quarantine

    async def quarantine_add(
        self,
        peer_id: str,
        stream_id: str,
        key: str | None,
        reason: str,
        raw: RawFields,
        *,
        value: bytes | None = None,
    ) -> int:
        """Keep a rejected entry for inspection, dropping the oldest rows beyond the bound.

        Each field of ``raw`` is stored as text (base64 when not printable UTF-8) and cut to
        ``QUARANTINE_FIELD_MAX_BYTES``; the whole entry to ``QUARANTINE_ENTRY_MAX_BYTES``.
        ``value``, for a version of this store's own that it drops or replaces, is its whole
        payload (``data`` as stored), kept beside the row within ``quarantine_max_value_bytes``
        so that the value can be written again whatever its size. Without it, a ``data``
        field the row cuts is kept whole the same way.

        Returns:
            How many of the oldest rows were dropped to make room (each caller counts its own,
            so concurrent callers cannot count one eviction twice).

        Raises:
            ValueError: ``stream_id`` is not ``<ms>-<seq>`` or ``peer_id`` is empty.
            CursorError: the write failed.
        """
        peer_id = self._lane(peer_id)
        _check_stream_id(stream_id, "stream_id")
        stored_key = None if key is None else _truncate_utf8(key, QUARANTINE_TEXT_MAX_BYTES)
        stored_reason = _truncate_utf8(reason, QUARANTINE_TEXT_MAX_BYTES)
        encoded, cut = _encode_raw(raw)
        if value is None:
            # A peer's entry whose payload the row cuts is kept whole beside it, as a value
            # of this store's own is: a clock-skewed write of 5 KiB, set aside until the
            # clocks agree, must not come back as its first 4 KiB.
            value = cut
        async with self._transaction("quarantine entry", peer_id) as db:
            async with db.execute(
                "INSERT INTO quarantine (peer_id, stream_id, key, reason, raw, at_ms) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (peer_id, stream_id, stored_key, stored_reason, encoded, _now_ms()),
            ) as cursor:
                row_id = cursor.lastrowid
            kept = False
            if value is not None and len(value) <= self._quarantine_max_value_bytes:
                kept = True
                await db.execute(
                    "INSERT INTO quarantine_values (id, size, data) VALUES (?, ?, ?)",
                    (row_id, len(value), bytes(value)),
                )
            async with db.execute(_TRIM_QUARANTINE, (self._quarantine_max_rows,)) as cursor:
                dropped = max(cursor.rowcount, 0)
            # Only a dropped row can leave a value behind, and only a new value can pass the
            # byte bound: a peer's rejected entry costs no pass over the values.
            await self._trim_values(db, orphans=dropped > 0, bytes_bound=kept)
        self.evicted += dropped
        log.debug(
            "cursor.quarantine_added",
            extra={"peer": peer_id, "stream_id": stream_id, "evicted": dropped},
        )
        return dropped

    async def quarantine_list(
        self, limit: int = 100, peer_id: str | None = None
    ) -> list[QuarantineRecord]:
        """The newest quarantined entries first, optionally of one peer only.

        Raises:
            ValueError: ``limit`` is below 1.
            CursorError: the read failed or a stored row is unreadable.
        """
        if limit < 1:
            raise ValueError(f"limit: must be >= 1, got {limit}")
        columns = _QUARANTINE_COLUMNS
        if peer_id is not None:
            peer_id = self._lane(peer_id)
        if peer_id is None:
            rows = await self._read(
                "list quarantine",
                None,
                f"SELECT {columns} FROM quarantine ORDER BY id DESC LIMIT ?",
                (limit,),
            )
        else:
            rows = await self._read(
                "list quarantine",
                peer_id,
                f"SELECT {columns} FROM quarantine WHERE peer_id = ? ORDER BY id DESC LIMIT ?",
                (peer_id, limit),
            )
        return [self._record(row) for row in rows]

    def _record(self, row: sqlite3.Row) -> QuarantineRecord:
        return _quarantine_record(row, self.path)

    async def quarantine_count(self) -> int:
        """How many quarantined entries are kept now."""
        rows = await self._read("count quarantine", None, "SELECT COUNT(*) FROM quarantine")
        return int(rows[0][0])

    # ----------------------------------------------------------------------------------------
    # Snapshot bootstrap progress

    async def bootstrap_begin(self, peer_id: str, tail_id: str) -> None:
        """Record the start of a snapshot bootstrap from ``peer_id``.

        ``tail_id`` is the peer's stream tail read before the snapshot; tailing resumes there
        once the bootstrap finishes. If a bootstrap is already in progress (the engine restarted
        mid-way) it is kept as is, original ``tail_id`` included, so no entry written during the
        first attempt is skipped.

        Raises:
            ValueError: ``tail_id`` is not ``<ms>-<seq>`` or ``peer_id`` is empty.
            CursorError: the write failed.
        """
        peer_id = self._lane(peer_id)
        _check_stream_id(tail_id, "tail_id")
        created = await self._write(
            "begin bootstrap",
            peer_id,
            "INSERT INTO bootstrap (peer_id, tail_id, started_ms) VALUES (?, ?, ?) "
            "ON CONFLICT (peer_id) DO NOTHING",
            (peer_id, tail_id, _now_ms()),
        )
        if created:
            log.info("cursor.bootstrap_begun", extra={"peer": peer_id, "tail_id": tail_id})
        else:
            log.info("cursor.bootstrap_resumed", extra={"peer": peer_id})

    async def bootstrap_state(self, peer_id: str) -> BootstrapState | None:
        """The bootstrap in progress for ``peer_id``, or None if there is none."""
        peer_id = self._lane(peer_id)
        db = self._connection("read bootstrap", peer_id)
        async with self._lock:
            try:
                rows = list(
                    await db.execute_fetchall(
                        "SELECT tail_id, started_ms FROM bootstrap WHERE peer_id = ?", (peer_id,)
                    )
                )
                if not rows:
                    return None
                branches = await db.execute_fetchall(
                    "SELECT branch FROM bootstrap_branches WHERE peer_id = ?", (peer_id,)
                )
            except sqlite3.Error as exc:
                raise self._error("read bootstrap", peer_id, exc) from exc
        return BootstrapState(
            tail_id=str(rows[0][0]),
            done_branches={str(row[0]) for row in branches},
            started_ms=int(rows[0][1]),
        )

    async def bootstrap_mark_done(self, peer_id: str, branches: Iterable[str]) -> None:
        """Record that every item under each of ``branches`` is applied; committed on return.

        Raises:
            ValueError: a branch id is not a non-empty string.
            CursorError: no bootstrap is in progress for ``peer_id``, or the write failed.
        """
        peer_id = self._lane(peer_id)
        given = list(branches)
        for branch in given:
            if not isinstance(branch, str) or not branch:
                raise ValueError(f"branches: expected non-empty branch ids, got {branch!r}")
        done = sorted(set(given))
        if not done:
            return
        async with self._transaction("mark bootstrap branches", peer_id) as db:
            rows = list(
                await db.execute_fetchall("SELECT 1 FROM bootstrap WHERE peer_id = ?", (peer_id,))
            )
            if not rows:
                raise CursorError(
                    f"cursor database {self.path}: no bootstrap in progress for peer {peer_id!r}"
                    f" (call bootstrap_begin first)",
                    path=self.path,
                    peer=peer_id,
                )
            await db.executemany(
                "INSERT OR IGNORE INTO bootstrap_branches (peer_id, branch) VALUES (?, ?)",
                [(peer_id, branch) for branch in done],
            )
        log.debug("cursor.bootstrap_branches_done", extra={"peer": peer_id, "count": len(done)})

    async def bootstrap_finish(self, peer_id: str, cursor: str) -> None:
        """End the bootstrap of ``peer_id`` and save ``cursor``, in one transaction.

        A crash can therefore leave either the bootstrap in progress (resumed on restart) or
        the cursor saved, never neither.

        Raises:
            ValueError: ``cursor`` is not ``<ms>-<seq>`` or ``peer_id`` is empty.
            CursorError: the write failed.
        """
        peer_id = self._lane(peer_id)
        _check_stream_id(cursor, "cursor")
        async with self._transaction("finish bootstrap", peer_id) as db:
            await db.execute("DELETE FROM bootstrap_branches WHERE peer_id = ?", (peer_id,))
            await db.execute("DELETE FROM bootstrap WHERE peer_id = ?", (peer_id,))
            await db.execute(_UPSERT_CURSOR, (peer_id, cursor, _now_ms()))
        log.info("cursor.bootstrap_finished", extra={"peer": peer_id, "cursor": cursor})

    # ----------------------------------------------------------------------------------------
    # Node-wide facts

    async def meta_get(self, name: str) -> str | None:
        """The value stored under ``name`` in the meta table, or None."""
        name += self._scope
        rows = await self._read("read meta", None, "SELECT value FROM meta WHERE name = ?", (name,))
        return str(rows[0][0]) if rows else None

    async def meta_set(self, name: str, value: str) -> None:
        """Store ``value`` under ``name``; committed when this returns.

        Raises:
            CursorError: the write failed.
        """
        name += self._scope
        await self._put(
            "write meta",
            None,
            "INSERT INTO meta (name, value, updated_ms) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET "
            "value = excluded.value, updated_ms = excluded.updated_ms",
            (name, value, _now_ms()),
        )

    async def newest_save_ms(self) -> int | None:
        """Wall-clock ms of the most recent cursor save of any peer, or None without cursors.

        A lower bound of when this node last took changes from the mesh, for files written
        before the meta table recorded that directly.
        """
        rows = await self._read("read cursors", None, "SELECT MAX(updated_ms) FROM cursors")
        return int(rows[0][0]) if rows and rows[0][0] is not None else None


def _quarantine_record(row: sqlite3.Row | tuple[Any, ...], path: str) -> QuarantineRecord:
    try:
        raw = json.loads(row[5])
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise CursorError(
            f"cursor database {path}: quarantine row {row[0]} has unreadable raw fields ({exc})",
            path=path,
            peer=row[1],
        ) from exc
    return QuarantineRecord(
        id=int(row[0]),
        peer_id=str(row[1]),
        stream_id=str(row[2]),
        key=None if row[3] is None else str(row[3]),
        reason=str(row[4]),
        raw={str(name): str(value) for name, value in raw.items()},
        at_ms=int(row[6]),
    )


def read_quarantine(
    path: str | Path,
    *,
    limit: int = 100,
    peer_id: str | None = None,
    reason: str | None = None,
    key: str | None = None,
    row_id: int | None = None,
    values: bool = False,
) -> tuple[list[QuarantineRecord], int]:
    """Quarantined entries, newest first, and how many the file keeps in all, for an operator.

    Opened read-only, so it runs beside a live engine (WAL lets a reader in while the engine
    writes) and never creates, migrates or trims the file as ``CursorStore.open`` does.
    ``peer_id`` matches the peer's rows in every partition (``<peer>{<partition>}``); ``reason``
    is a prefix (``absent_on_peer``, ``hash_mismatch``); ``key`` is exact. With ``values``,
    each record carries its whole value where one is kept (``QuarantineRecord.whole``).

    Raises:
        CursorError: no database at ``path``, or it cannot be read.
        ValueError: ``limit`` is below 1.
    """
    if limit < 1:
        raise ValueError(f"limit: must be >= 1, got {limit}")
    location = str(path)
    if not Path(location).is_file():
        raise CursorError(
            f"cursor database {location}: no such file (cursor.sqlite_path of the config; the "
            "engine creates it when it first runs)",
            path=location,
        )
    where: list[str] = []
    params: list[Any] = []
    if peer_id is not None:
        where.append("(peer_id = ? OR substr(peer_id, 1, length(?) + 1) = ? || '{')")
        params += [peer_id, peer_id, peer_id]
    if reason is not None:
        where.append("substr(reason, 1, length(?)) = ?")
        params += [reason, reason]
    if key is not None:
        where.append("key = ?")
        params.append(key)
    if row_id is not None:
        where.append("id = ?")
        params.append(row_id)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    uri = f"{Path(location).resolve().as_uri()}?mode=ro"
    whole: dict[int, bytes] = {}
    try:
        with contextlib.closing(sqlite3.connect(uri, uri=True, isolation_level=None)) as db:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("BEGIN")  # one snapshot for the rows, the count and the values
            has_values = db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'quarantine_values'"
            ).fetchone()
            size = "(SELECT size FROM quarantine_values v WHERE v.id = quarantine.id)"
            rows = db.execute(
                f"SELECT {_QUARANTINE_COLUMNS}, {size if has_values else 'NULL'} "
                f"FROM quarantine{clause} ORDER BY id DESC LIMIT ?",
                (*params, limit),
            ).fetchall()
            total = int(db.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0])
            for row in rows if values else ():
                if row[7] is not None:
                    found = db.execute(
                        "SELECT data FROM quarantine_values WHERE id = ?", (row[0],)
                    ).fetchone()
                    if found is not None:
                        whole[int(row[0])] = bytes(found[0])
            db.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise CursorError(
            f"cursor database {location}: cannot read the quarantine: {exc}", path=location
        ) from exc
    records = [_quarantine_record(row, location) for row in rows]
    return [
        replace(r, whole=whole.get(r.id), kept_bytes=row[7])
        for r, row in zip(records, rows, strict=True)
    ], total


def quarantined_value(record: QuarantineRecord) -> bytes:
    """The value a quarantined version carried, decompressed and checked against its content
    hash: what an operator writes again when a value set aside should live (docs/DELETES.md).

    A kept field is text, or ``base64:`` and its bytes when it was not printable; a value that
    happens to read like either is told apart by the hash, which only the true bytes match.

    Raises:
        CursorError: the row carries no value (a delete, an entry without data or hash), its
            data was cut when kept, or what is kept does not match the content hash.
    """
    where = f"quarantine row {record.id}"
    data, hash_hex = record.raw.get("data"), record.raw.get("hash")
    if record.raw.get("op") == "DEL" or data is None or not hash_hex:
        raise CursorError(f"{where}: a delete or an entry without data and hash: no value")
    candidates = [data.encode("utf-8", "surrogateescape")]
    if data.startswith(BASE64_PREFIX):
        with contextlib.suppress(ValueError):
            candidates.insert(0, base64.b64decode(data[len(BASE64_PREFIX) :], validate=True))
    if record.whole is not None:
        candidates.insert(0, record.whole)
    for payload in candidates:
        try:
            value = decode_payload(payload)
            verify_hash(value, hash_hex)
        except CodecError:
            continue
        return value
    cut = _TRUNCATION_NOTE.search(data)
    if cut is not None:
        raise CursorError(
            f"{where}: its data was {cut.group(1)} bytes, of which the first "
            f"{QUARANTINE_FIELD_MAX_BYTES} were kept: the whole value is not in the quarantine "
            "(whole values are kept newest first within cursor.quarantine_max_value_bytes, "
            "and this one was over it or has been dropped since)"
        )
    raise CursorError(
        f"{where}: the data kept does not match its content hash {hash_hex[:64]} (the entry "
        "may have been quarantined for that): its raw fields show what arrived"
    )
