"""Fetch the keys a drill (or a request) names from a peer, and apply them here.

Fetching goes on while the drill does, a batch at a time, so memory stays bounded by a batch
or two even when a bootstrap finds hundreds of thousands of keys. Everything fetched goes
through our store's one apply path, so last-writer-wins decides and a stale or duplicate
fetch is harmless. What did not land is remembered: keys our store refused stay requested, and
versions ours outrank are kept for the write-off check (``claims.py``).

What is rejected is kept: a version the peer stores unreadably, or one our store will not hold
(stamped beyond the clock offset, a wrong-typed key here), is quarantined and counted once,
however many cycles meet it again (:class:`Rejections`); a new version of the key is a new
rejection, and the key is repaired as soon as the peer's version is one ours accepts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterable, Sequence
from typing import Any

from replication_engine import codec
from replication_engine.codec import Change, CodecError
from replication_engine.cold_path.drill import drill
from replication_engine.cold_path.local import Part, Shared
from replication_engine.cold_path.stats import CORRUPT_KEYS_LOGGED, PeerRepair
from replication_engine.cursor import CursorError, RawFields
from replication_engine.knowledge import ApplyStatus
from replication_engine.peer import Peer
from replication_engine.resilience import EventRateLimiter
from replication_engine.store.reader import StoredItem

log = logging.getLogger(__name__)

# Rejected versions remembered, over all peers, so that each is kept and counted once. Past
# this the oldest is forgotten: one still met is kept again (a second row, never a lost one).
REJECTIONS_REMEMBERED_MAX = 10_000
# Held for a key whose stream entry the hot path set aside (clock skew, refused): that entry
# is in the quarantine, and the version a repair meets next is the same write.
KEPT_BY_STREAM = "kept by the stream"
# Why our store would not hold a version it did not say why for (status REJECTED).
CLOCK_SKEW_WHY = "HLC is beyond the allowed clock offset: the origin's clock is ahead"


class Rejections:
    """The peers' versions a repair rejected, per (peer, key): what is already kept (pure).

    A version is any hashable that tells one write of a key from another and one rejection
    from another (the reason, the HLC and origin as stored).
    """

    def __init__(self, limit: int = REJECTIONS_REMEMBERED_MAX) -> None:
        self._limit = limit
        self._held: dict[tuple[str, str], Hashable] = {}

    def held(self, peer_id: str, key: str) -> Hashable | None:
        """The version of ``key`` from ``peer_id`` last kept (or KEPT_BY_STREAM), or None."""
        return self._held.get((peer_id, key))

    def hold(self, peer_id: str, key: str, version: Hashable) -> None:
        """Remember ``version`` as kept, forgetting the oldest past the bound."""
        self._held.pop((peer_id, key), None)
        self._held[(peer_id, key)] = version
        while len(self._held) > self._limit:
            del self._held[next(iter(self._held))]

    def hold_by_stream(self, peer_id: str, keys: Iterable[str]) -> None:
        """The hot path kept the stream entries of ``keys``: the next rejection is theirs."""
        for key in keys:
            self.hold(peer_id, key, KEPT_BY_STREAM)

    def forget(self, peer_id: str, key: str) -> None:
        """The peer's version of ``key`` was not rejected: a later rejection is a new one."""
        self._held.pop((peer_id, key), None)


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
    requests. Rejected versions are quarantined once each (``rejections``); a quarantine
    that fails is logged and tried again when the version is next met, and fails no repair.
    """

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        self.rejections = Rejections()
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
        fetched = await peer.call(lambda: peer.reader.stored_items(keys), what="repair_items")
        repair.items_fetched += len(keys)
        self.metrics.repair_items_fetched.labels(pid).inc(len(keys))
        changes: list[Change] = []
        corrupt: list[tuple[StoredItem, CodecError]] = []
        for item in fetched:
            if isinstance(item.decoded, CodecError):
                corrupt.append((item, item.decoded))
            elif item.decoded is None:
                repair.items_missing += 1  # deleted and collected on the peer since the drill
                self.rejections.forget(pid, item.key)
            else:
                changes.append(item.decoded)
        if corrupt:
            repair.items_corrupt += len(corrupt)
            await self._keep_corrupt(pid, corrupt)
        return changes

    async def _keep_corrupt(self, pid: str, corrupt: list[tuple[StoredItem, CodecError]]) -> None:
        """Quarantine and count the versions in ``corrupt`` not kept before; log them."""
        new: list[str] = []
        for item, exc in corrupt:
            version = ("corrupt", item.fields.get(b"hlc"), item.fields.get(b"o"))
            if self.rejections.held(pid, item.key) == version:
                continue
            # The item's payload field is ``d``, which the row would cut without keeping it.
            data = item.fields.get(b"d")
            if await self._keep(pid, item.key, exc.reason, str(exc), item.fields, value=data):
                self.rejections.hold(pid, item.key, version)
                new.append(item.key)
        self.metrics.repair_items_corrupt.labels(pid).inc(len(new))
        # Once at WARNING when first met (and kept); every cycle that meets them again, DEBUG.
        log.log(
            logging.WARNING if new else logging.DEBUG,
            "repair.corrupt_items",
            extra={
                "peer": pid,
                "count": len(corrupt),
                "new": len(new),
                "keys": (new or [item.key for item, _ in corrupt])[:CORRUPT_KEYS_LOGGED],
                "reasons": sorted({exc.reason for _, exc in corrupt}),
            },
        )

    async def _keep(
        self,
        pid: str,
        key: str,
        reason: str,
        message: str,
        raw: RawFields,
        *,
        value: bytes | None = None,
    ) -> bool:
        """Quarantine a version of ``pid``'s that this node rejected; whether it was kept.

        The row's reason starts with the code, as every other row's does, so that
        ``quarantine --reason <code>`` (a prefix) finds it. No stream entry carried it here:
        the row's stream id is ``0-0``, as for every version a repair meets.
        """
        if not message.startswith(reason):
            message = f"{reason}: {message}"
        try:
            evicted = await self.cursors.quarantine_add(
                pid, "0-0", key, message[:500], raw, value=value
            )
        except CursorError as exc:
            log.error(
                "repair.quarantine_failed",
                extra={"peer": pid, "key": key, "reason": reason, "error": str(exc)[:300]},
            )
            return False
        self.metrics.quarantine_evicted.inc(evicted)
        return True

    async def _apply_counted(self, peer: Peer, changes: list[Change], repair: PeerRepair) -> None:
        result = await self.local.apply(changes)
        applied = sum(1 for status in result.statuses if status is ApplyStatus.APPLIED)
        repair.items_applied += applied
        self.metrics.repair_items_applied.labels(peer.node_id).inc(applied)
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
                self.rejections.forget(peer.node_id, change.key)
                continue
            # Not held here: the repair is not complete, and the request for it stays.
            repair.items_refused += 1
            self.requests.keep(peer.node_id, change.key)
            await self._keep_refused(peer.node_id, change, result.refused.get(index))

    async def _keep_refused(self, pid: str, change: Change, refused: str | None) -> None:
        """Quarantine and count a version our store would not hold (``refused`` says why,
        None for one stamped beyond the clock offset), and say once why it cannot land."""
        if refused is None:
            reason, why = "clock_skew", CLOCK_SKEW_WHY
        else:
            reason, why = "refused", f"refused by the local store: {refused}"
        version = (reason, change.hlc, change.origin)
        held = self.rejections.held(pid, change.key)
        if held == version:
            return
        # A stream entry the hot path set aside is that row already; anything else was only
        # ever in the peer's store, and is kept here.
        if held != KEPT_BY_STREAM:
            if not await self._keep(pid, change.key, reason, why, codec.encode_entry(change)):
                return
            self.metrics.repair_items_refused.labels(pid).inc()
        self.rejections.hold(pid, change.key, version)
        log.error(
            "repair.item_refused",
            extra={
                "peer": pid,
                "key": change.key,
                "reason": reason,
                "error": why[:300],
                "hint": "quarantined; kept pending until the local store accepts it",
            },
        )
