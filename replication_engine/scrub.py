"""The scrub: stored data checked in the background, a little per tick.

The Merkle tree covers each item's content hash, not its bytes. A payload that rots on disk or is
edited by hand leaves every digest equal, so no comparison between nodes ever sees it, and reads
of that key fail. The scrub re-reads payloads against their content hashes, subtree by subtree at
a bounded rate; one that does not verify is kept in the quarantine and replaced by a peer's copy
that does (the same write, so it replaces exactly the held version).

It also scans the keys under the prefix for ones the format does not define or that have the
wrong type (made by hand, or by another program sharing the prefix). Those are reported, counted
and sampled, never used and never removed: they are the operator's to look at. A wrong-typed key
that an item needs is already refused per item by the apply path, so none can stop replication.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from replication_engine.config import ScrubConfig
from replication_engine.cursor import CursorStore
from replication_engine.observability.metrics import Metrics
from replication_engine.resilience import sleep_or_stop
from replication_engine.store.protocol import Scrubbable, UnreadableItem

log = logging.getLogger(__name__)

# Quarantine reason of a local copy the scrub found unreadable.
UNREADABLE_REASON = "unreadable_local"
# Stray keys named in /status and the log, at most.
STRAY_SAMPLE = 20

Heal = Callable[[str, tuple[int, str]], Awaitable[str | None]]


@dataclass(slots=True)
class _Pass:
    """A scan of the keys under the prefix, page by page: what it found so far."""

    cursor: int = 0
    count: int = 0
    sample: list[tuple[str, str]] | None = None


class Scrub:
    """Owned by the engine; :meth:`run` is one task, :meth:`tick` one bounded step."""

    def __init__(
        self,
        store: Scrubbable,
        cursors: CursorStore,
        metrics: Metrics,
        settings: ScrubConfig,
        *,
        heal: Heal | None,
    ) -> None:
        self.store = store
        self.cursors = cursors
        self.metrics = metrics
        self.settings = settings
        self.heal = heal
        self._parents = store.leaf_parents()
        self._next_parent = 0
        self._budget = 0.0  # items this tick may still check: the rate's share, carried over
        self.items_checked = 0
        self.passes = 0
        self.healed = 0
        # Unreadable copies not healed yet, by key: the version held and why it fails. Kept in
        # the quarantine once (when first found), retried every pass.
        self.unhealed: dict[str, tuple[tuple[int, str] | None, str]] = {}
        self._stray = _Pass()
        self.stray_count: int | None = None  # None until a first complete scan
        self.stray_sample: list[tuple[str, str]] = []
        self.last_error: str | None = None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick()
                self.last_error = None
            except Exception as exc:  # the local store down: the breaker's and /ready's business
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                log.debug("scrub.tick_failed", extra={"error": self.last_error})
            if await sleep_or_stop(stop, self.settings.interval_sec):
                return

    async def tick(self) -> None:
        if self.settings.payload_items_per_sec > 0:
            self._budget += self.settings.payload_items_per_sec * self.settings.interval_sec
            # At most one pass a tick: an empty subtree counts as one item, so on a store far
            # smaller than the budget, the budget alone let a tick re-check the same subtrees
            # thousands of times, one call each.
            for _ in self._parents:
                if self._budget <= 0:
                    break
                self._budget -= await self._check_parent()
            else:
                self._budget = 0.0  # a whole pass done: what is left would only repeat it
            if self._budget < 0:
                self._budget = 0.0  # one large subtree does not starve the ticks after it
        if self.settings.stray_scan:
            await self._stray_page()

    async def _check_parent(self) -> int:
        """Verify the items below the next parent of leaf buckets; returns how many."""
        parent = self._parents[self._next_parent]
        checked, unreadable = await self.store.verify_items(parent)
        self._next_parent = (self._next_parent + 1) % len(self._parents)
        self.items_checked += checked
        self.metrics.scrub_items_checked.inc(checked)
        found = {item.key for item in unreadable}
        leaf_path = self.store.geometry.leaf_path
        for key in [k for k in self.unhealed if leaf_path(k).startswith(parent)]:
            if key not in found:
                del self.unhealed[key]  # replaced or deleted meanwhile: nothing to heal
        for item in unreadable:
            await self._found(item)
        if self._next_parent == 0:
            self.passes += 1
            self.metrics.scrub_passes.inc()
        self.metrics.scrub_unhealed.set(len(self.unhealed))
        return max(1, checked)

    async def _found(self, item: UnreadableItem) -> None:
        first = item.key not in self.unhealed
        if first:
            self.metrics.scrub_unreadable.inc()
            evicted = await self.cursors.quarantine_add(
                self.store.node_id,
                "0-0",
                item.key,
                f"{UNREADABLE_REASON}: {item.why}"[:500],
                dict(item.fields),
            )
            self.metrics.quarantine_evicted.inc(evicted)
        healed_from = None
        if self.heal is not None and item.version is not None:
            healed_from = await self.heal(item.key, item.version)
        if healed_from is not None:
            self.unhealed.pop(item.key, None)
            self.healed += 1
            self.metrics.scrub_healed.inc()
            log.warning(
                "scrub.healed",
                extra={"key": item.key, "peer": healed_from, "error": item.why[:200]},
            )
            return
        self.unhealed[item.key] = (item.version, item.why)
        if first:
            hint = (
                "no peer holds a copy that verifies yet; retried every pass"
                if item.version is not None
                else "its version fields do not parse either: rewrite or delete the key"
            )
            log.error(
                "scrub.unreadable",
                extra={"key": item.key, "error": item.why[:200], "hint": hint},
            )

    async def _stray_page(self) -> None:
        scan = self._stray
        cursor, stray = await self.store.stray_page(scan.cursor)
        scan.count += len(stray)
        sample = scan.sample if scan.sample is not None else []
        sample += stray[: max(0, STRAY_SAMPLE - len(sample))]
        scan.sample = sample
        if cursor != 0:
            scan.cursor = cursor
            return
        # A complete pass: publish it, and start the next one.
        changed = scan.count != self.stray_count
        self.stray_count, self.stray_sample = scan.count, sample
        self.metrics.stray_keys.set(scan.count)
        self._stray = _Pass()
        if scan.count and changed:
            log.warning(
                "scrub.stray_keys",
                extra={
                    "count": scan.count,
                    "sample": [f"{name} ({why})" for name, why in sample[:5]],
                    "hint": "keys under the prefix that the format does not define or that "
                    "have the wrong type; never read or removed by the engine",
                },
            )

    def status(self) -> dict[str, Any]:
        return {
            "payloads": {
                "enabled": self.settings.payload_items_per_sec > 0,
                "items_checked": self.items_checked,
                "passes": self.passes,
                "progress": round(self._next_parent / len(self._parents), 3),
                "healed": self.healed,
                "unhealed": [
                    {"key": key, "error": why[:200]}
                    for key, (_version, why) in list(self.unhealed.items())[:STRAY_SAMPLE]
                ],
                "unhealed_count": len(self.unhealed),
            },
            "stray_keys": {
                "enabled": self.settings.stray_scan,
                "count": self.stray_count,
                "sample": [{"key": name, "problem": why} for name, why in self.stray_sample],
            },
            "last_error": self.last_error,
        }
