"""Fetch the keys a drill (or a request) names from a peer, and apply them here.

Fetching goes on while the drill does, a batch at a time, so memory stays bounded by a batch
or two even when a bootstrap finds hundreds of thousands of keys. Everything fetched goes
through our store's one apply path, so last-writer-wins decides and a stale or duplicate
fetch is harmless. What did not land is remembered: keys our store refused stay requested, and
versions ours outrank are kept for the write-off check (``claims.py``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import Any

from replication_engine.codec import Change, CodecError
from replication_engine.cold_path.drill import drill
from replication_engine.cold_path.local import Part, Shared
from replication_engine.cold_path.stats import CORRUPT_KEYS_LOGGED, PeerRepair
from replication_engine.knowledge import ApplyStatus
from replication_engine.peer import Peer
from replication_engine.resilience import EventRateLimiter

log = logging.getLogger(__name__)


class Batcher:
    """Collects keys found by a drill, fetches them ``size`` at a time and applies them.

    One apply runs in the background while the next batch is fetched: the peer's Redis and ours
    work at the same time, in apply order.
    """

    def __init__(
        self,
        size: int,
        fetch: Callable[[list[str]], Awaitable[list[Change]]],
        apply: Callable[[list[Change]], Coroutine[Any, Any, None]],
    ) -> None:
        self.size = size
        self._fetch = fetch
        self._apply = apply
        self._buffer: list[str] = []
        self._applying: asyncio.Task[None] | None = None

    async def add(self, keys: Iterable[str]) -> None:
        self._buffer.extend(keys)
        while len(self._buffer) >= self.size:
            batch, self._buffer = self._buffer[: self.size], self._buffer[self.size :]
            await self._flush(batch)

    async def finish(self) -> None:
        if self._buffer:
            batch, self._buffer = self._buffer, []
            await self._flush(batch)
        await self._applied()

    async def aclose(self) -> None:
        """Cancel an apply still running (after a failure or a cancellation) and await it."""
        task, self._applying = self._applying, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _flush(self, batch: list[str]) -> None:
        changes = await self._fetch(batch)
        await self._applied()
        if changes:
            self._applying = asyncio.create_task(self._apply(changes), name="cold_path.apply")

    async def _applied(self) -> None:
        task, self._applying = self._applying, None
        if task is not None:
            await task


class Fetcher(Part):
    """Fetches from peers and applies here, counting into each repair's report.

    Of the settings, ``fetch_batch_size`` (items per round trip), ``drill_concurrency`` and
    ``max_items_per_cycle`` (which also bounds the versions kept per peer for the write-off
    check, and the keys listed as only here); keys our store refused are kept pending in the
    requests.
    """

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        self._refused: dict[str, set[str]] = {}  # peer -> keys our store refuses (logged once)
        # peer -> its versions this repair that ours outrank (STALE, SKIPPED): written off, if
        # its record, read again after the fetch, covers ours (see claims.Claims).
        self._behind: dict[str, dict[str, Change]] = {}

    def begin(self, peer_id: str) -> None:
        """A repair from ``peer_id`` begins: forget the versions an earlier one kept."""
        self._behind[peer_id] = {}

    def behind(self, peer_id: str) -> list[Change]:
        """The peer's versions that ours outranked since :meth:`begin`, handed over once."""
        return list(self._behind.pop(peer_id, {}).values())

    async def fetch_keys(self, peer: Peer, repair: PeerRepair, keys: Sequence[str]) -> None:
        """Fetch and apply ``keys`` (named by a request), without a drill."""
        await self._fetch_and_apply(peer, repair, None, lambda batcher: batcher.add(keys))

    async def drill(
        self,
        peer: Peer,
        starts: Sequence[str],
        repair: PeerRepair,
        *,
        limit: int | None,
        limiter: EventRateLimiter | None = None,
        absent: list[str] | None = None,
    ) -> None:
        """Drill into the branches under ``starts`` that differ (see ``drill.drill``), fetching
        and applying the keys found as the drill goes."""
        await self._fetch_and_apply(
            peer,
            repair,
            limiter,
            lambda batcher: drill(
                peer,
                self.local,
                starts,
                repair,
                limit=limit,
                concurrency=self.settings.drill_concurrency,
                on_keys=batcher.add,
                absent=absent,
                absent_max=self.settings.max_items_per_cycle,
            ),
        )

    async def _fetch_and_apply(
        self,
        peer: Peer,
        repair: PeerRepair,
        limiter: EventRateLimiter | None,
        feed: Callable[[Batcher], Awaitable[None]],
    ) -> None:
        """Fetch and apply, in batches, every key ``feed`` hands the batcher."""
        batcher = Batcher(
            self.settings.fetch_batch_size,
            lambda keys: self._fetch(peer, keys, repair, limiter),
            lambda changes: self._apply_counted(peer, changes, repair),
        )
        try:
            await feed(batcher)
            await batcher.finish()
        finally:
            await batcher.aclose()

    async def _fetch(
        self, peer: Peer, keys: list[str], repair: PeerRepair, limiter: EventRateLimiter | None
    ) -> list[Change]:
        """The peer's versions of ``keys``, leaving out those it lost or stores unreadably."""
        pid = peer.node_id
        if limiter is not None:
            await limiter.acquire(len(keys))
        fetched = await peer.call(lambda: peer.reader.items(keys), what="repair_items")
        repair.items_fetched += len(keys)
        self.metrics.repair_items_fetched.labels(pid).inc(len(keys))
        changes: list[Change] = []
        corrupt: list[tuple[str, str]] = []
        for key, got in zip(keys, fetched, strict=True):
            if isinstance(got, CodecError):
                corrupt.append((key, got.reason))
            elif got is None:
                repair.items_missing += 1  # deleted and collected on the peer since the drill
            else:
                changes.append(got)
        if corrupt:
            repair.items_corrupt += len(corrupt)
            self.metrics.repair_items_corrupt.labels(pid).inc(len(corrupt))
            log.warning(
                "repair.corrupt_items",
                extra={
                    "peer": pid,
                    "count": len(corrupt),
                    "keys": [k for k, _ in corrupt[:CORRUPT_KEYS_LOGGED]],
                    "reasons": sorted({reason for _, reason in corrupt}),
                },
            )
        return changes

    async def _apply_counted(self, peer: Peer, changes: list[Change], repair: PeerRepair) -> None:
        result = await self.local.apply(changes)
        applied = sum(1 for status in result.statuses if status is ApplyStatus.APPLIED)
        repair.items_applied += applied
        self.metrics.repair_items_applied.labels(peer.node_id).inc(applied)
        refused = self._refused.setdefault(peer.node_id, set())
        behind = self._behind.setdefault(peer.node_id, {})
        for index, status in enumerate(result.statuses):
            change = changes[index]
            # KNOWN too: a restore can bring back a version that a recovery wrote off while
            # this store's claims moved past the peer's (its tailer read on), and the apply
            # then answers "known" before it compares versions. Claims decide what is
            # written off (``Claims.conclude``), not this status.
            if status in (ApplyStatus.STALE, ApplyStatus.SKIPPED, ApplyStatus.KNOWN):
                if len(behind) < self.settings.max_items_per_cycle:
                    behind[change.key] = change
            if status not in (ApplyStatus.REFUSED, ApplyStatus.REJECTED):
                refused.discard(change.key)
                continue
            # Not held here: the repair is not complete, and the request for it stays. The hot
            # path quarantined the entry; this says once per key why the repair cannot land.
            repair.items_refused += 1
            self.requests.keep(peer.node_id, change.key)
            if change.key not in refused:
                refused.add(change.key)
                why = result.refused.get(index, "stamped beyond the allowed clock offset")
                log.error(
                    "repair.item_refused",
                    extra={
                        "peer": peer.node_id,
                        "key": change.key,
                        "error": why[:300],
                        "hint": "kept pending until the local store accepts it",
                    },
                )
