"""Operator tools behind the CLI: ``verify`` and ``status --mesh``.

Both read Redis directly (the local store and each peer through the same read-only access the
engine uses), so they work whether or not a sidecar is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from redis.exceptions import RedisError

from replication_engine import clock, codec
from replication_engine.codec import NODE_ID_RULE, is_node_id
from replication_engine.config import EngineConfig
from replication_engine.connection import (
    TlsOptions,
    client_maker,
    credentials_refused,
    make_client,
)
from replication_engine.cursor import (
    CursorError,
    CursorStore,
    QuarantineRecord,
    printable_text,
    quarantined_value,
    read_quarantine,
)
from replication_engine.errors import ReplicationError
from replication_engine.knowledge import Anchor, NodeRecord, frontier
from replication_engine.merkle import ZERO, DrillPlan, Geometry
from replication_engine.migrate import Migration, MigrationError
from replication_engine.peer import StreamInfo, parse_stream_info
from replication_engine.redaction import redact_url
from replication_engine.store import functions
from replication_engine.store.layout import Keyspace
from replication_engine.store.partitioned import PartitionedStore
from replication_engine.store.protocol import DeepCheck
from replication_engine.store.reader import TreeReader
from replication_engine.store.redis_store import RedisStore


@dataclass
class TreeDiff:
    """Where two trees differ: leaf buckets and the keys in them, both directions."""

    branches_visited: int = 0
    leaves: list[str] = field(default_factory=list)
    only_local: list[str] = field(default_factory=list)
    only_remote: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)

    @property
    def keys(self) -> int:
        return len(self.only_local) + len(self.only_remote) + len(self.different)


async def diff_trees(
    local: TreeReader,
    remote: TreeReader,
    geometry: Geometry,
    *,
    limit: int | None = None,
    chunk: int = 256,
) -> TreeDiff:
    """Walk both trees level by level, reading only the branches whose digests differ.

    ``DrillPlan`` decides where to go, as it does for the cold path's drill; this walk reads
    both sides of every chunk at once and stops after the chunk that reaches ``limit`` keys.
    """
    result = TreeDiff()
    plan = DrillPlan(geometry, chunk_paths=chunk, deepest_first=False)
    while (branches := plan.next_chunk()) is not None:
        paths = [branch.path for branch in branches]
        mine, theirs = await asyncio.gather(local.nodes(paths), remote.nodes(paths))
        result.branches_visited += len(paths)
        for leaf in plan.compared(branches, mine, theirs).leaves:
            result.leaves.append(leaf.path)
            result.only_local.extend(sorted(leaf.only_here))
            result.only_remote.extend(leaf.only_there)
            result.different.extend(leaf.different)
        if limit is not None and result.keys >= limit:
            return result
    return result


def _geometry(config: EngineConfig) -> Geometry:
    merkle = config.settings.merkle
    return Geometry(merkle.fanout, merkle.depth, merkle.partitions)


def _readers(client: Any, prefix: str, config: EngineConfig) -> list[TreeReader]:
    """A reader per partition of a node's store, over one client."""
    return [TreeReader(client, Keyspace(prefix, p)) for p in _geometry(config).partition_names]


def _local_reader(config: EngineConfig) -> list[TreeReader]:
    local = config.local
    make = client_maker(local.cluster, local.cluster_addresses)
    client = make(
        local.redis_url,
        username=local.username,
        password=local.password.get_secret_value() if local.password else None,
    )
    return _readers(client, local.prefix, config)


def _peer_client(config: EngineConfig, index: int) -> tuple[str, list[TreeReader]]:
    peer = config.peers[index]
    make = client_maker(peer.cluster, peer.cluster_addresses)
    client = make(
        peer.redis_url,
        username=peer.username,
        password=peer.password.get_secret_value() if peer.password else None,
        tls=TlsOptions(peer.tls.ca_file, peer.tls.cert_file, peer.tls.key_file, peer.tls.verify),
    )
    return peer.node_id, _readers(client, peer.effective_prefix(config.local.prefix), config)


async def _root(readers: list[TreeReader]) -> bytes:
    """A node's root: the XOR of its partitions' roots."""
    acc = 0
    for reader in readers:
        acc ^= int.from_bytes(await reader.root(), "big")
    return acc.to_bytes(len(ZERO), "big")


async def _close(readers: list[TreeReader]) -> None:
    await readers[0].redis.aclose()  # one client under every partition's reader


async def check_tree(config: EngineConfig, *, repair: bool, out: TextIO = sys.stdout) -> int:
    """Check every node of the local Merkle tree against its children; 0 when consistent.

    With ``repair``, nodes that disagree are rebuilt from the leaves (one parent of leaf
    buckets per script call, so writes go on meanwhile).
    """
    store = await _local_store(config)
    wrong = 0
    try:
        for part in _parts(store):
            for parent in part.leaf_parents():
                wrong += await part.scrub(parent, fix=repair)
    finally:
        await store.close()
    if not wrong:
        print(f"{config.local_node_id:<20} tree consistent with its leaves", file=out)
        return 0
    what = "rebuilt" if repair else "disagree with their children"
    print(f"{config.local_node_id:<20} TREE: {wrong} nodes {what}", file=out)
    return 0 if repair else 1


# Exit codes of ``verify``: a script (or an operator's alert) must tell "they differ" from "I
# could not look": the first needs a repair, the second a network or credentials fix.
VERIFY_EQUAL = 0
VERIFY_DIFFERENT = 1
VERIFY_UNCHECKED = 2


class _WrongStore(Exception):
    """The address this config gives a node leads to another node's store (this node's own,
    say): what is read there says nothing about that node."""


def _unread(exc: BaseException) -> str:
    """How verify and status --mesh flag a node they could not read: WRONG STORE when its
    address leads to another node's store, DENIED when its Redis refused the user or password
    (credentials to fix), else UNREACHABLE (no answer)."""
    if isinstance(exc, _WrongStore):
        return "WRONG STORE"
    return "DENIED" if credentials_refused(exc) is not None else "UNREACHABLE"


def _unread_text(exc: BaseException) -> str:
    """The flag of :func:`_unread` with what it means, for a line a person reads."""
    flag = _unread(exc)
    if flag == "WRONG STORE":
        return f"{flag}: {exc}"
    return f"{flag}: the Redis refused the user or password" if flag == "DENIED" else flag


async def verify(
    config: EngineConfig,
    *,
    limit: int = 20,
    tree: str | None = None,
    deep: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """Compare the local root with every peer's.

    Returns :data:`VERIFY_EQUAL` when every check passed, :data:`VERIFY_DIFFERENT` when one
    found a difference (roots, the local tree against its leaves, or with ``deep`` a stored
    payload that does not verify or a key that does not belong), and :data:`VERIFY_UNCHECKED`
    when nothing differed but something could not be checked (a node unreachable, another
    geometry). ``tree``: ``check`` (or ``repair``) the local tree against its leaves first.
    """
    status = VERIFY_EQUAL
    try:
        if tree is not None:
            status = max(status, await check_tree(config, repair=tree == "repair", out=out))
        if deep:
            status = max(status, await check_deep(config, limit=limit, out=out))
    except (RedisError, ReplicationError, OSError) as exc:
        print(f"{config.local_node_id:<20} {_unread_text(exc)}: {redact_url(str(exc))}", file=out)
        return VERIFY_UNCHECKED
    geometry = _geometry(config)
    local = _local_reader(config)
    readers = [_peer_client(config, i) for i in range(len(config.peers))]
    unchecked = False
    try:
        try:
            local_root = await _root(local)
        except (RedisError, ReplicationError, OSError) as exc:
            print(
                f"{config.local_node_id:<20} {_unread_text(exc)}: {redact_url(str(exc))}", file=out
            )
            return VERIFY_UNCHECKED
        print(f"{config.local_node_id:<20} root {local_root.hex()}  (local)", file=out)
        for peer_id, reader in readers:
            found = await _verify_peer(peer_id, reader, local, local_root, geometry, limit, out)
            if found == VERIFY_UNCHECKED:
                unchecked = True
            else:
                status = max(status, found)
    finally:
        await _close(local)
        for _peer_id, reader in readers:
            await _close(reader)
    if status == VERIFY_EQUAL and unchecked:
        return VERIFY_UNCHECKED
    return status


async def _verify_peer(
    peer_id: str,
    readers: list[TreeReader],
    local: list[TreeReader],
    local_root: bytes,
    geometry: Geometry,
    limit: int,
    out: TextIO,
) -> int:
    """Compare one peer's root with ours and, where they differ, list what differs (partition
    by partition: each is its own subtree on both sides)."""
    try:
        stored = await readers[0].geometry()
        record = await readers[0].node_record()
        root = await _root(readers)
    except Exception as exc:
        print(f"{peer_id:<20} {_unread_text(exc)}: {redact_url(str(exc))}", file=out)
        return VERIFY_UNCHECKED
    if record is not None and record.node_id != peer_id:
        print(f"{peer_id:<20} {_unread_text(_wrong_store(record))}", file=out)
        return VERIFY_UNCHECKED
    if stored is None:
        # Nothing was ever laid out there: a wrong redis_url or prefix, or a peer whose engine
        # never started. Its empty root would read as "equal" to an empty store here.
        print(
            f"{peer_id:<20} NO STORE: nothing under prefix {readers[0].keys.prefix!r} at this "
            f"address (no layout written); check the peer's redis_url and prefix, or start "
            f"its engine",
            file=out,
        )
        return VERIFY_UNCHECKED
    if stored != geometry:
        print(
            f"{peer_id:<20} GEOMETRY MISMATCH: peer {stored.describe()}, "
            f"local {geometry.describe()}",
            file=out,
        )
        return VERIFY_UNCHECKED
    if root == local_root:
        print(f"{peer_id:<20} root {root.hex()}  equal", file=out)
        return VERIFY_EQUAL
    diff = TreeDiff()
    for mine, theirs in zip(local, readers, strict=True):
        if diff.keys >= limit:
            break
        found = await diff_trees(mine, theirs, geometry, limit=limit - diff.keys)
        diff.branches_visited += found.branches_visited
        diff.leaves += found.leaves
        diff.only_local += found.only_local
        diff.only_remote += found.only_remote
        diff.different += found.different
    print(
        f"{peer_id:<20} root {root.hex()}  DIFFERENT: {len(diff.leaves)} leaf "
        f"buckets, {diff.keys} keys (first {limit} shown)",
        file=out,
    )
    for label, keys in (
        ("only here", diff.only_local),
        ("only on peer", diff.only_remote),
        ("different", diff.different),
    ):
        for key in keys[:limit]:
            print(f"    {label:<13} {key}", file=out)
    return VERIFY_DIFFERENT


async def check_deep(config: EngineConfig, *, limit: int, out: TextIO = sys.stdout) -> int:
    """Re-hash every stored payload and look for keys that do not belong under the prefix."""
    store = await _local_store(config)
    found = DeepCheck()
    try:
        for at, part in enumerate(_parts(store)):
            # The stray scan walks the whole keyspace whichever partition runs it: once.
            some = await part.deep_check(sample=limit, strays=at == 0)
            found.items += some.items
            found.unreadable += some.unreadable
            found.stray += some.stray
            found.unreadable_sample += some.unreadable_sample[
                : limit - len(found.unreadable_sample)
            ]
            found.stray_sample += some.stray_sample
    finally:
        await store.close()
    node = config.local_node_id
    print(
        f"{node:<20} deep: {found.items} items re-hashed, {found.unreadable} do not verify, "
        f"{found.stray} stray keys under the prefix",
        file=out,
    )
    for key, why in found.unreadable_sample:
        print(f"    {'unreadable':<13} {key}: {why}", file=out)
    for name, why in found.stray_sample:
        print(f"    {'stray':<13} {name}: {why}", file=out)
    return VERIFY_EQUAL if found.clean else VERIFY_DIFFERENT


@dataclass(frozen=True, slots=True)
class _Row:
    """What ``status --mesh`` read of one node, whether printed as a table row or as JSON."""

    node_id: str
    root: str | None = None  # hex; None when the node could not be read
    last_write_ms_ago: int | None = None  # None for an empty stream
    lag_ms: int | None = None  # this node's lag behind it; None for itself, or never read
    lag_events: int | None = None
    flags: tuple[str, ...] = ()  # RECOVERING, LAGGING, DIVERGENT; UNREACHABLE or DENIED
    failed: BaseException | None = None  # why it could not be read

    def as_json(self) -> dict[str, Any]:
        failed = self.failed
        error = None if failed is None else f"{type(failed).__name__}: {redact_url(str(failed))}"
        return {
            "root": self.root,
            "last_write_ms_ago": self.last_write_ms_ago,
            "lag_ms": self.lag_ms,
            "lag_events": self.lag_events,
            "flags": list(self.flags),
            "error": error,
        }


@dataclass(frozen=True, slots=True)
class _Applied:
    """How far this node has applied one peer's stream (one partition's), by two readings.

    The store's anchor (``Pnode``'s ``p:<peer>``) is written by the same script call as the
    data it covers, so it is exact, sidecar running or not. The saved cursor trails it by up
    to a cursor-save interval on a busy stream, and by whatever a killed sidecar never saved:
    it is only the fallback, for a store without an anchor in the peer's current stream (a
    peer that keeps no record, or a stream the store has not applied since it was replaced).
    """

    anchor: Anchor | None
    saved: str | None

    def position(self, peer_record: NodeRecord | None) -> codec.StreamId | None:
        anchor = self.anchor
        if anchor is not None and peer_record is not None and anchor.token == peer_record.token:
            return codec.StreamId(*anchor.stream_id)
        return codec.parse_stream_id(self.saved) if self.saved else None


async def mesh_status(
    config: EngineConfig, *, as_json: bool = False, out: TextIO = sys.stdout
) -> int:
    """Every node's root and stream head, and this node's lag behind each peer: a table, or
    with ``as_json`` one JSON document of the same facts. Returns 1 when a node is flagged."""
    cursors = await _saved_cursors(config)
    local_id = config.local_node_id
    nodes = [(local_id, _local_reader(config))]
    nodes += [_peer_client(config, i) for i in range(len(config.peers))]
    split = _geometry(config).partitions > 1
    rows: list[_Row] = []
    roots: dict[str, str] = {}
    # Per partition, each node's record: a partition's frontier is its own. This node's come
    # first, read before any peer's stream: its anchors are then never ahead of a stream head.
    records: dict[str, dict[str, NodeRecord]] = {r.keys.partition: {} for r in nodes[0][1]}
    try:
        for node_id, readers in nodes:
            applied = [
                None
                if node_id == local_id
                else _Applied(
                    _anchor(records[r.keys.partition].get(local_id), node_id),
                    cursors.get(node_id + (f"{{{r.keys.partition}}}" if split else "")),
                )
                for r in readers
            ]
            row, found = await _node_row(config, node_id, readers, applied)
            rows.append(row)
            if row.root is not None:
                roots[node_id] = row.root
            for reader, record in zip(readers, found, strict=True):
                if record is not None:
                    records[reader.keys.partition][node_id] = record
    finally:
        for _node_id, readers in nodes:
            await _close(readers)
    # Members this config gives no address for (taken out of the peer lists without a forget,
    # say): nothing can be read of them here, and collection waits for them. Listed, flagged.
    peered = {local_id, *(peer.node_id for peer in config.peers)}
    own = [r for by_node in records.values() if (r := by_node.get(local_id)) is not None]
    unpeered = sorted(set().union(*(r.members - r.forgotten for r in own)) - peered)
    rows += [_Row(node_id, flags=("NOT PEERED",)) for node_id in unpeered]
    majority = _majority(roots)
    rows = [
        replace(row, flags=(*row.flags, "DIVERGENT"))
        if majority is not None and row.root not in (None, majority)
        else row
        for row in rows
    ]
    held = _frontier_holder(records)
    if as_json:
        document = {
            "node_id": local_id,
            "nodes": {row.node_id: row.as_json() for row in rows},
            "stable_frontier": None
            if held is None
            else {"behind_sec": round(held[0], 1), "held_lowest_by": held[1], "partition": held[2]},
        }
        print(json.dumps(document, indent=2), file=out)
    else:
        _print_rows(rows, out)
        if held is not None:
            behind, lowest, partition = held
            where = f" (partition {partition})" if partition is not None else ""
            print(
                f"\nstable frontier: {behind:.1f}s behind now, held lowest by {lowest}{where}",
                file=out,
            )
    return 1 if any(row.flags for row in rows) else 0


def _anchor(record: NodeRecord | None, peer_id: str) -> Anchor | None:
    return None if record is None else record.anchors.get(peer_id)


async def _answers_as(config: EngineConfig, node_id: str) -> str | None:
    """The address (password masked) where ``node_id``'s own store answers as that node, if it
    is one of the config's peers and does, within FORGET_PROBE_SEC; else None."""
    index = next((i for i, p in enumerate(config.peers) if p.node_id == node_id), None)
    if index is None:
        return None
    _node, readers = _peer_client(config, index)
    try:
        async with asyncio.timeout(FORGET_PROBE_SEC):
            record = await readers[0].node_record()
    except Exception:  # down, unreachable, refusing: gone, as far as forget can tell
        return None
    finally:
        await _close(readers)
    if record is None or record.node_id != node_id:
        return None
    return redact_url(config.peers[index].redis_url)


async def _saved_cursors(config: EngineConfig) -> dict[str, str]:
    """This node's cursor in each peer's stream, from the cursor database."""
    cursors: dict[str, str] = {}
    # No cursor database (the sidecar never ran here) only leaves the lag columns empty.
    with contextlib.suppress(Exception):
        store = await CursorStore.open(config.cursor.sqlite_path, wal_mode=config.cursor.wal_mode)
        try:
            cursors = await store.all()
        finally:
            await store.close()
    return cursors


async def _node_row(
    config: EngineConfig, node_id: str, readers: list[TreeReader], applied: list[_Applied | None]
) -> tuple[_Row, list[NodeRecord | None]]:
    """One node's row and each partition's record (None where unread); ``applied``
    is how far this node has applied each partition's stream (None for this node itself; a
    peer it never read has no lag to show). Over partitions: the newest write, the largest
    lag, the events behind summed."""
    try:
        root = (await _root(readers)).hex()
        infos = [await _stream_info(reader) for reader in readers]
    except Exception as exc:
        return _Row(node_id, flags=(_unread(exc),), failed=exc), [None] * len(readers)
    marks = []
    records: list[NodeRecord | None] = []
    for reader in readers:
        record = None
        with contextlib.suppress(Exception):
            record = await reader.node_record()
        records.append(record)
    for record in records:
        if record is not None and record.node_id != node_id:
            wrong = _wrong_store(record)
            return _Row(node_id, flags=(_unread(wrong),), failed=wrong), [None] * len(readers)
    if any(record is not None and record.recovering for record in records):
        marks.append("RECOVERING")
    lag_ms = events = None
    positions = [
        None if at is None else at.position(record)
        for at, record in zip(applied, records, strict=True)
    ]
    behind = [
        (
            codec.lag_ms(position, info.last, info.first),  # from the first entry at most
            codec.lag_events(position, info.first, info.last, info.length),
        )
        for info, position in zip(infos, positions, strict=True)
        if position is not None
    ]
    if behind:
        lag_ms, events = max(ms for ms, _ in behind), sum(n for _, n in behind)
        if lag_ms > config.settings.slo.max_replication_lag_sec * 1000:
            marks.append("LAGGING")
    heads = [info.last for info in infos if info.last]
    head_age = round(time.time() * 1000 - max(heads).ms) if heads else None
    return _Row(node_id, root, head_age, lag_ms, events, tuple(marks)), records


def _wrong_store(record: NodeRecord) -> _WrongStore:
    return _WrongStore(
        f"the store at this address belongs to node {record.node_id}; check this config's "
        f"redis_url and prefix for it"
    )


async def _stream_info(reader: TreeReader) -> StreamInfo:
    try:
        return parse_stream_info(await reader.redis.xinfo_stream(reader.keys.cdc))
    except Exception as exc:
        if "no such key" in str(exc).lower():
            return parse_stream_info({"length": 0})
        raise


def _print_rows(rows: list[_Row], out: TextIO) -> None:
    """Print the table: a row per node, its root shortened to 16 hex digits."""
    print(
        f"{'node':<20} {'root':<17} {'last write':<16} {'local lag behind it':<24} flags", file=out
    )
    for row in rows:
        if row.failed is not None:
            failed = _unread_text(row.failed)
            if not isinstance(row.failed, _WrongStore):  # says all it knows already
                failed += f" ({type(row.failed).__name__})"
            print(f"{row.node_id:<20} {'-':<17} {'-':<16} {'-':<24} {failed}", file=out)
            continue
        root = (row.root or "-")[:16]
        ago = "empty" if row.last_write_ms_ago is None else f"{row.last_write_ms_ago} ms ago"
        lag = "-" if row.lag_ms is None else f"{row.lag_ms} ms / {row.lag_events} ev"
        flags = " ".join(row.flags)
        print(f"{row.node_id:<20} {root:<17} {ago:<16} {lag:<24} {flags}", file=out)


def _majority(roots: dict[str, str]) -> str | None:
    """The most common root, when no other root is as common: with a tie (two nodes that
    differ, say) nobody can be called the divergent one."""
    counts = Counter(roots.values())
    ranked = counts.most_common(2)
    if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
        return None
    return ranked[0][0]


def _frontier_holder(
    partitions: dict[str, dict[str, NodeRecord]],
) -> tuple[float, str, str | None] | None:
    """Who holds tombstone collection back: (seconds the stable frontier is behind now, the
    member whose frontier is lowest, the partition whose stable frontier is oldest on a node
    of many, else None), or None when no member's record could be read."""
    worst: tuple[float, str, str | None] | None = None
    for name, records in partitions.items():
        members = {m for record in records.values() for m in record.members} | set(records)
        members -= {f for record in records.values() for f in record.forgotten}
        members = {m for m in members if m in records}
        if not members:
            continue
        lowest = min(sorted(members), key=lambda n: frontier(records[n], members))
        behind = time.time() - clock.physical_ms(frontier(records[lowest], members)) / 1000
        if worst is None or behind > worst[0]:
            worst = (behind, lowest, name if len(partitions) > 1 else None)
    return worst


async def _local_store(config: EngineConfig) -> RedisStore | PartitionedStore:
    local = config.local
    geometry = _geometry(config)
    options: dict[str, Any] = {
        "node_id": config.local_node_id,
        "prefix": local.prefix,
        "username": local.username,
        "password": local.password.get_secret_value() if local.password else None,
        "fanout": geometry.fanout,
        "depth": geometry.depth,
        "stream_maxlen": local.stream_maxlen,
        "cluster": local.cluster,
        "cluster_addresses": local.cluster_addresses,
    }
    if geometry.partitions > 1:
        return await PartitionedStore.connect(
            local.redis_url, partitions=geometry.partitions, **options
        )
    return await RedisStore.connect(local.redis_url, **options)


def _parts(store: RedisStore | PartitionedStore) -> list[RedisStore]:
    if isinstance(store, PartitionedStore):
        return list(store.partitions.values())
    return [store]


async def load_functions(config: EngineConfig, *, out: TextIO = sys.stdout) -> int:
    """Load (or upgrade) the store's function library, and create the store if it is new, so
    that applications can write through the functions before the engine first starts."""
    try:
        store = await _local_store(config)
        try:
            loaded = await _parts(store)[0].load_functions()
            sha = ""
            if not loaded.functions:
                sha = await store.redis.script_load(functions.fallback_source())
        finally:
            await store.close()
    except (RedisError, ReplicationError, OSError) as exc:  # down, refusing the user, not ours
        print(
            f"functions not loaded: the local store at {redact_url(config.local.redis_url)}: "
            f"{_unread_text(exc)}: {type(exc).__name__}: {redact_url(str(exc))}",
            file=sys.stderr,
        )
        return 1
    if loaded.functions:
        print(
            f"library {functions.LIBRARY} version {loaded.version}: {loaded.action}; "
            f"call it with FCALL (docs/FORMAT.md, 'Functions')",
            file=out,
        )
    else:
        print(
            f"this Redis has no functions (before 7.0): the same code is loaded as script "
            f"{sha}; call it with EVALSHA {sha} <numkeys> <keys> <function name> <args> "
            f"(docs/FORMAT.md, 'Redis 6.2'); the store is ready",
            file=out,
        )
    return 0


async def migrate(
    config: EngineConfig, *, dry_run: bool, batch: int, out: TextIO = sys.stdout
) -> int:
    """Convert the local store from format 1 to format 2 in place (see :mod:`..migrate`).

    Returns 0 when the store is in format 2 afterwards (or the dry run could describe it), 1
    when the conversion could not go on (the message says why; run it again once fixed).
    """
    local = config.local
    if config.settings.merkle.partitions > 1:
        print(
            "settings.merkle.partitions is above 1: a format-1 store converts to a store of one "
            "partition, so migrate with partitions 1; a store of many partitions starts new "
            "(bootstrapped from a peer)",
            file=out,
        )
        return 1
    if local.cluster:
        # Format 1's scripts touch keys they do not declare, which a cluster refuses: no
        # format-1 store can have run on one.
        print(
            "local.cluster is true: a format-1 store cannot be on a Redis Cluster, so there "
            "is nothing to migrate",
            file=out,
        )
        return 1
    redis = make_client(
        local.redis_url,
        username=local.username,
        password=local.password.get_secret_value() if local.password else None,
        client_name=f"re-migrate-{config.local_node_id}",
    )
    say = functools.partial(print, file=out, flush=True)
    try:
        migration = Migration(redis, local.prefix, batch=batch, say=say)
        survey = await migration.survey()
        for line in migration.describe(survey):
            say(line)
        if dry_run or survey.state in ("format 2", "empty"):
            return 0
        outcome = await migration.run()
    except MigrationError as exc:
        say(f"migration stopped: {exc}")
        return 1
    except RedisError as exc:  # down or refusing this user: run it again once fixed
        print(
            f"migration stopped: the local Redis at {redact_url(local.redis_url)} failed: "
            f"{type(exc).__name__}: {redact_url(str(exc))}",
            file=sys.stderr,
        )
        return 1
    finally:
        await redis.aclose()
    say(
        f"converted in {outcome.seconds:.1f} s: {outcome.items_moved:,} items renamed, "
        f"{outcome.placed:,} placed in the new tree"
        + (f", {outcome.skipped} unreadable items left out of it" if outcome.skipped else "")
    )
    if outcome.root_kept:
        say(f"root {outcome.root_after}: unchanged, as it must be")
    else:
        say(
            f"root was {outcome.root_before}, is {outcome.root_after}: the old tree disagreed "
            f"with its items; the new tree is built from the items, and the cold path repairs "
            f"any difference with peers"
        )
    store = await _local_store(config)  # records the partition's meta, loads the functions
    await store.close()
    say("store is in format 2; start the engine")
    return 0


# Seconds forget waits for the node's own store to answer before taking it for gone.
FORGET_PROBE_SEC = 2.0


async def forget(
    config: EngineConfig, node_id: str, *, force: bool = False, out: TextIO = sys.stdout
) -> int:
    """Add ``node_id`` to the local store's forgotten list (docs/DELETES.md, "Membership").

    Works with or without a running sidecar: the engine reads the list at its next tick and
    every node learns it from this one's record, for good. So it takes only a member of the
    mesh (a typo would spread to every node and bar that name for ever), and not one whose
    store still answers as that node, unless ``force``: a node forgotten while it takes writes
    has them dropped everywhere, its own store included, nor, unless ``force``, one this config
    gives no address for (its store cannot be checked). Returns 0 (also for a node already
    forgotten), 1 when this node's store cannot be opened, or 2 for a refusal.
    """
    if node_id == config.local_node_id:
        print(f"{node_id} is this node: a node cannot forget itself", file=out)
        return 2
    if not is_node_id(node_id):
        print(f"{node_id!r} is not a node id ({NODE_ID_RULE}); nothing changed", file=out)
        return 2
    try:
        store = await _local_store(config)
    except ReplicationError as exc:
        print(f"cannot open this node's store: {redact_url(str(exc))}", file=sys.stderr)
        return 1
    try:
        members, forgotten = await _parts(store)[0].add_to_record()  # adds nothing: a read
        if node_id in forgotten:
            print(f"{node_id} is forgotten already; nothing changed", file=out)
            return 0
        if node_id not in members:
            known = ", ".join(sorted(members)) or "none recorded yet"
            print(
                f"{node_id} is not a member of this mesh (members: {known}); nothing changed",
                file=out,
            )
            return 2
        if not force and all(peer.node_id != node_id for peer in config.peers):
            print(
                f"{node_id} is not among this config's peers, so forget cannot check that its "
                f"store stopped taking writes (a node forgotten while it takes writes has them "
                f"dropped on every node, its own included). Run forget with a config that lists "
                f"it, or make sure its sidecar and Redis are stopped for good and pass --force; "
                f"nothing changed",
                file=out,
            )
            return 2
        answering = await _answers_as(config, node_id)
        if answering is not None and not force:
            print(
                f"{node_id}'s store answers at {answering}: forget is for a member gone for good. "
                f"Stop its sidecar and its Redis first (a node forgotten while it takes writes "
                f"has them dropped on every node, its own included), or pass --force; nothing "
                f"changed",
                file=out,
            )
            return 2
        for part in _parts(store):  # every partition keeps its own record
            members, forgotten = await part.add_to_record(forgotten=[node_id])
    except ReplicationError as exc:
        print(f"this node's store failed: {redact_url(str(exc))}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    print(
        f"forgot {node_id}: tombstone collection no longer waits for it, and no node reads from "
        f"it once it has read this node's record. members now: {', '.join(sorted(members))}; "
        f"forgotten: {', '.join(sorted(forgotten))}",
        file=out,
    )
    return 0


# Characters of a reason shown in the quarantine table (--json shows it whole).
REASON_WIDTH = 60


def quarantine(
    config: EngineConfig,
    *,
    limit: int = 20,
    peer: str | None = None,
    reason: str | None = None,
    key: str | None = None,
    as_json: bool = False,
    out: TextIO = sys.stdout,
) -> int:
    """List what this node set aside (docs/FORMAT.md, "Cursor database"), newest first.

    Reads the cursor database read-only, so it works beside a running sidecar and in an image
    without the ``sqlite3`` shell. Returns 0, or 2 when the database cannot be read.
    """
    try:
        rows, total = read_quarantine(
            config.cursor.sqlite_path, limit=limit, peer_id=peer, reason=reason, key=key
        )
    except CursorError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if as_json:
        for row in rows:
            print(json.dumps(_quarantine_json(row)), file=out)  # ASCII: escapes reach no terminal
        return 0
    print(f"{'id':>6}  {'at (UTC)':19}  {'peer':12}  {'stream id':24}  key / reason", file=out)
    for row in rows:
        reason_text = _shown(row.reason)
        if len(reason_text) > REASON_WIDTH:
            reason_text = reason_text[: REASON_WIDTH - 3] + "..."
        if row.kept_bytes is not None:
            reason_text += f"  [value kept whole, {row.kept_bytes:,} bytes]"
        key_text = _shown(row.key) if row.key is not None else "(key unreadable)"
        print(
            f"{row.id:>6}  {_utc(row.at_ms)}  {row.peer_id:12}  {row.stream_id:24}  {key_text}\n"
            f"{'':>6}  {reason_text}",
            file=out,
        )
    filters = [
        f"{name} {value}"
        for name, value in (("peer", peer), ("reason", reason), ("key", key))
        if value is not None
    ]
    print(
        f"{len(rows)} shown, newest first ({'; '.join(filters) or 'no filter'}; --limit "
        f"{limit}); {total} kept in all (at most cursor.quarantine_max_rows, "
        f"{config.cursor.quarantine_max_rows}). A value: --value ID.",
        file=out,
    )
    return 0


def quarantine_value(config: EngineConfig, row_id: int, out: Any = None) -> int:
    """Write the value quarantine row ``row_id`` carried to ``out`` (stdout's bytes), as the
    application wrote it: decompressed and checked against its content hash. Returns 0, 1
    when the row has no whole value, 2 when there is no such row or no database, or when the
    value is binary and stdout a terminal."""
    try:
        rows, _total = read_quarantine(
            config.cursor.sqlite_path, limit=1, row_id=row_id, values=True
        )
    except CursorError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if not rows:
        print(f"no quarantine row {row_id} in {config.cursor.sqlite_path}", file=sys.stderr)
        return 2
    try:
        value = quarantined_value(rows[0])
    except CursorError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if out is None and sys.stdout.isatty() and printable_text(value) is None:
        print(
            f"quarantine row {row_id}: its value is {len(value):,} bytes that are not text; "
            "send them to a file (... --value ID > value.bin) rather than to this terminal",
            file=sys.stderr,
        )
        return 2
    sink = out if out is not None else sys.stdout.buffer
    sink.write(value)
    sink.flush()
    return 0


def _shown(text: str) -> str:
    """Text from a peer (a key) as it may be printed on a terminal: control characters, which
    could move the cursor or rewrite what the operator sees, are shown escaped."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in text)


def _utc(at_ms: int) -> str:
    moment = datetime.datetime.fromtimestamp(at_ms / 1000, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _quarantine_json(row: QuarantineRecord) -> dict[str, Any]:
    return {
        "id": row.id,
        "at_ms": row.at_ms,
        "peer": row.peer_id,
        "stream_id": row.stream_id,
        "key": row.key,
        "reason": row.reason,
        "raw": row.raw,
        "value_kept_bytes": row.kept_bytes,
    }
