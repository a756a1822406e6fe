"""Our own store as the cold path uses it, and what every part of the cold path shares.

Every failure of our store is a :class:`LocalStoreError`.

A repair must tell a failing peer (backed off, skipped a while) from a failing local store
(the cycle ends, no peer is blamed). Every read and write of our store during a repair goes
through :class:`LocalStore`, which makes that distinction once, and applies through the local
breaker the hot path also trips.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import pybreaker

from replication_engine.codec import Change
from replication_engine.cold_path.requests import RepairRequests
from replication_engine.cold_path.stats import describe
from replication_engine.config import ColdPathConfig
from replication_engine.cursor import CursorStore
from replication_engine.errors import ReplicationError
from replication_engine.merkle import Geometry
from replication_engine.observability.metrics import Metrics
from replication_engine.store.protocol import ApplyResult, Store

T = TypeVar("T")


class LocalStoreError(ReplicationError, RuntimeError):
    """Our own store failed during a repair: the peer is not to blame and is not backed off."""

    retryable = True


class LocalStore:
    """``store`` with its failures translated; ``relay`` re-emits repaired versions on our
    stream (see ``apply_batch``)."""

    def __init__(
        self, store: Store, *, breaker: pybreaker.CircuitBreaker | None, relay: bool
    ) -> None:
        self.store = store
        self.breaker = breaker
        self.relay = relay

    @property
    def geometry(self) -> Geometry:
        return self.store.geometry

    async def call(self, what: str, op: Awaitable[T]) -> T:
        try:
            return await op
        except Exception as exc:
            raise LocalStoreError(f"local store: {what} failed: {describe(exc)}") from exc

    async def apply(
        self, changes: list[Change], replaces: Mapping[int, tuple[int, str]] | None = None
    ) -> ApplyResult:
        """Apply through the one apply path; ``replaces`` maps an index of ``changes`` to the
        exact version (hlc, origin) it replaces whatever the claims say."""
        prepared = self.store.prepare_apply(changes, relay=self.relay, replaces=replaces)
        if self.breaker is None:
            return await self.call("apply", self.store.apply_prepared(prepared))
        try:
            with self.breaker.calling():
                return await self.store.apply_prepared(prepared)
        except pybreaker.CircuitBreakerError as exc:
            raise LocalStoreError(f"local store: breaker open: {exc}") from exc
        except Exception as exc:
            raise LocalStoreError(f"local store: apply failed: {describe(exc)}") from exc


@dataclass(frozen=True, slots=True)
class Shared:
    """What every part of the cold path works through: our store, the cursor database (its
    quarantine and bootstrap state), the ``cold_path`` settings, the engine's metrics and the
    repairs asked for."""

    local: LocalStore
    cursors: CursorStore
    settings: ColdPathConfig
    metrics: Metrics
    requests: RepairRequests


class Part:
    """A part of the cold path (fetch, claims, the repair cycle, bootstrap): it reaches what
    the parts share as attributes of its own."""

    def __init__(self, shared: Shared) -> None:
        self.local = shared.local
        self.cursors = shared.cursors
        self.settings = shared.settings
        self.metrics = shared.metrics
        self.requests = shared.requests
