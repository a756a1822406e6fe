"""Convert a format-1 store to format 2 in place (``replication-engine migrate``).

Format 2 changed two things (docs/FORMAT.md, "Migrating from format 1"): every key of the store's
data moved under the partition's hash tag (``Pitem:k`` became ``P{0}item:k``), and a key's leaf
bucket is now chosen by SHA-1, which Redis computes, instead of xxh3. So the conversion renames
keys (values, versions, the stream with its entry ids, the clock, the tombstone index and the
record with its claims and anchors all keep their content, so peers' cursors and anchors stay
valid) and builds the tree again from the items' leaf digests.

It runs with the node's engine stopped, in bounded batches, and can be interrupted and run again
at any point: ``Pmeta`` says a migration is under way (``migrating``), which every engine refuses
to open, and each step skips what an earlier run finished. The tree is rebuilt from scratch on
every run, since its keys are cheap to build and a half-built tree cannot be told from a whole
one. The root cannot move: the root is the XOR of every leaf digest, whatever bucket each leaf
sits in, so the new root must equal the old, and the command says whether it did.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from replication_engine.errors import ReplicationError
from replication_engine.merkle import BUCKET_HASH, FORMAT, Geometry
from replication_engine.store import functions
from replication_engine.store.layout import Keyspace, glob_escape, text

# The keys of a format-1 store that move as they are: format-1 name after the prefix, and the
# Keyspace property that names them now.
_MOVED = (("cdc", "cdc"), ("hlc", "hlc"), ("tombs", "tombs"), ("node", "record"))


class MigrationError(ReplicationError, RuntimeError):
    """The store cannot be converted as it is; the message says why and what to do."""


@dataclass(slots=True)
class Survey:
    """What a store holds before (or part way through) a conversion."""

    state: str  # 'format 1', 'interrupted', 'format 2' or 'empty'
    geometry: Geometry | None = None
    items_to_move: int = 0
    items_moved: int = 0
    old_tree_nodes: int = 0
    stream_entries: int = 0
    moves: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Outcome:
    survey: Survey
    items_moved: int = 0
    placed: int = 0
    skipped: int = 0
    root_before: str = ""
    root_after: str = ""
    seconds: float = 0.0

    @property
    def root_kept(self) -> bool:
        return self.root_before == self.root_after


class Migration:
    """One store's conversion. ``say`` gets each line of progress."""

    def __init__(
        self,
        redis: Redis,
        prefix: str,
        *,
        batch: int = 1000,
        say: Callable[[str], None] = print,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.redis = redis
        self.keys = Keyspace(prefix)
        self.batch = batch
        self.say = say
        self._place = redis.register_script(functions.script_source("place.lua"))

    async def survey(self) -> Survey:
        meta = {text(k): text(v) for k, v in (await self.redis.hgetall(self.keys.meta)).items()}
        if meta.get("format") == str(FORMAT) and "migrating" not in meta:
            return Survey("format 2", Geometry(int(meta["fanout"]), int(meta["depth"])))
        if not meta:
            return Survey("empty")
        try:
            geometry = Geometry(int(meta["fanout"]), int(meta["depth"]))
        except (KeyError, ValueError) as exc:
            raise MigrationError(f"{self.keys.meta} is unreadable: {meta!r}") from exc
        survey = Survey("interrupted" if "migrating" in meta else "format 1", geometry)
        survey.items_to_move = await self._count(self._scan(self._old_items()))
        survey.items_moved = await self._count(self._scan(self.keys.item_pattern))
        survey.old_tree_nodes = await self._count(self._scan(self._old_tree()))
        for old, new in _MOVED:
            if await self.redis.exists(self.keys.prefix + old):
                survey.moves.append(f"{self.keys.prefix}{old} -> {getattr(self.keys, new)}")
        stream = self.keys.prefix + "cdc"
        if not await self.redis.exists(stream):
            stream = self.keys.cdc
        if await self.redis.type(stream) == b"stream":
            survey.stream_entries = int(await self.redis.xlen(stream))
        return survey

    def describe(self, survey: Survey) -> list[str]:
        """What a run would do, in words (the dry run prints this)."""
        at = f"store at prefix {self.keys.prefix!r}"
        if survey.state == "format 2":
            return [f"{at} is already in format {FORMAT}: nothing to do"]
        if survey.state == "empty":
            return [f"{at} holds no store ({self.keys.meta} is missing): nothing to do"]
        assert survey.geometry is not None
        lines = [
            f"{at} is in {survey.state} (fanout {survey.geometry.fanout}, depth "
            f"{survey.geometry.depth}); the conversion will:",
            f"  rename {survey.items_to_move} item keys to {self.keys.part}item:<key> "
            f"({survey.items_moved} already renamed)",
            *(f"  rename {move}" for move in survey.moves),
            f"  keep the stream's {survey.stream_entries} entries and their ids, the clock, "
            "the tombstone index and the record (claims, anchors)",
            f"  delete the old tree ({survey.old_tree_nodes} nodes) and build the new one from "
            f"the items' leaf digests, buckets by {BUCKET_HASH}; the root must not change",
            f"  then record format {FORMAT} in {self.keys.meta}",
        ]
        return lines

    async def run(self) -> Outcome:
        started = time.monotonic()
        survey = await self.survey()
        outcome = Outcome(survey)
        if survey.state in ("format 2", "empty"):
            return outcome
        old_root = await self.redis.get(self.keys.prefix + "mk:root")
        if survey.state == "format 1":
            # The old root is kept in meta, so an interrupted run still compares against it.
            await self.redis.hset(
                self.keys.meta,
                mapping={"migrating": str(FORMAT), "old_root": text(old_root or b"0" * 32)},
            )
        outcome.root_before = text(await self.redis.hget(self.keys.meta, "old_root") or b"")
        await self._move_fixed_keys()
        outcome.items_moved = await self._move_items(survey.items_to_move)
        await self._unlink_all(self._old_tree(), "old tree nodes")
        await self._unlink_all(f"{glob_escape(self.keys.part)}mk:*", "partial new tree nodes")
        assert survey.geometry is not None
        outcome.placed, outcome.skipped = await self._build_tree(survey.geometry)
        outcome.root_after = text(await self.redis.get(self.keys.root) or b"0" * 32)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.keys.meta,
                mapping={
                    "format": str(FORMAT),
                    "bucket_hash": BUCKET_HASH,
                    "partitions": "1",  # format 1 had one keyspace: it becomes one partition
                },
            )
            pipe.hdel(self.keys.meta, "migrating", "old_root")
            await pipe.execute()
        outcome.seconds = time.monotonic() - started
        return outcome

    # ------------------------------------------------------------------------ steps

    async def _move_fixed_keys(self) -> None:
        for old_name, new in _MOVED:
            old, target = self.keys.prefix + old_name, getattr(self.keys, new)
            if not await self.redis.exists(old):
                continue
            if await self.redis.exists(target):
                raise MigrationError(
                    f"both {old} (format 1) and {target} (format 2) exist: something wrote "
                    f"the store in format 2 during the conversion. Stop every writer and the "
                    f"engine, look at both keys, delete the one that is wrong, and run again"
                )
            await self.redis.rename(old, target)
            self.say(f"renamed {old} -> {target}")

    async def _move_items(self, expected: int) -> int:
        moved, started, last_said = 0, time.monotonic(), 0.0
        item_prefix = len(self.keys.prefix) + len("item:")
        while True:
            # Renamed keys leave the pattern, so passes repeat until one finds nothing: SCAN only
            # promises the keys present for a whole pass.
            found = 0
            async for names in self._pages(self._old_items()):
                found += len(names)
                async with self.redis.pipeline(transaction=False) as pipe:
                    for name in names:
                        pipe.renamenx(name, self.keys.item(text(name)[item_prefix:]))
                    done = await pipe.execute(raise_on_error=False)
                clashes = [text(n) for n, ok in zip(names, done, strict=True) if ok is False]
                if clashes:
                    raise MigrationError(
                        f"{clashes[0]} and its format-2 name both exist ({len(clashes)} such "
                        f"keys): something wrote the store in format 2 during the conversion"
                    )
                moved += sum(1 for ok in done if ok is True)
                now = time.monotonic()
                if now - last_said >= 1.0:
                    last_said = now
                    rate = moved / max(now - started, 1e-9)
                    self.say(f"items: {moved:,} of {expected:,} renamed ({rate:,.0f}/s)")
            if not found:
                break
        self.say(f"items: {moved:,} renamed in {time.monotonic() - started:.1f} s")
        return moved

    async def _unlink_all(self, pattern: str, what: str) -> None:
        gone = 0
        async for names in self._pages(pattern):
            gone += int(await self.redis.unlink(*names))
        if gone:
            self.say(f"deleted {gone:,} {what}")

    async def _build_tree(self, geometry: Geometry) -> tuple[int, int]:
        base = [self.keys.part, f"{geometry.fanout}/{geometry.depth}", "migrate"]
        placed = skipped = 0
        started, last_said = time.monotonic(), 0.0
        item_prefix = len(self.keys.part) + len("item:")
        async for names in self._pages(self.keys.item_pattern):
            keys = [text(n)[item_prefix:] for n in names]
            done = await self._place(keys=[self.keys.record], args=[*base, *keys])
            placed, skipped = placed + int(done[0]), skipped + int(done[1])
            now = time.monotonic()
            if now - last_said >= 1.0:
                last_said = now
                self.say(f"tree: {placed:,} items placed ({placed / (now - started):,.0f}/s)")
        self.say(f"tree: {placed:,} items placed in {time.monotonic() - started:.1f} s")
        return placed, skipped

    # ------------------------------------------------------------------------ scanning

    def _old_items(self) -> str:
        return f"{glob_escape(self.keys.prefix)}item:*"

    def _old_tree(self) -> str:
        return f"{glob_escape(self.keys.prefix)}mk:*"

    async def _scan(self, pattern: str) -> AsyncIterator[bytes]:
        async for names in self._pages(pattern):
            for name in names:
                yield name

    async def _pages(self, pattern: str) -> AsyncIterator[list[bytes]]:
        cursor = 0
        while True:
            cursor, names = await self.redis.scan(cursor, match=pattern, count=self.batch)
            if names:
                yield [n if isinstance(n, bytes) else n.encode() for n in names]
            if cursor == 0:
                return

    @staticmethod
    async def _count(names: AsyncIterator[bytes]) -> int:
        return sum([1 async for _ in names])
