"""Detecting that this node was out of the mesh past the tombstone grace, and re-bootstrapping it.

DESIGN.md invariant 3 says that a node offline longer than the tombstone grace must
re-bootstrap, and that the engine detects this and says so. :class:`Membership` does that. It
keeps this node's standing record (:mod:`replication_engine.standing`) in its Redis, so that
peers stop pulling from it while it is stale, and moves between four states:

``in_mesh``
    Every heartbeat (a quarter of the grace, at most 30 s) in which some peer is being read,
    ``contact_ms`` is refreshed, in the record and in the cursor database.
``verifying``
    Entered when the last contact is older than the grace, at start (the record, or the
    cursor database for an engine from before records) or while running (every peer out of
    reach). Peers' tailers read each stream from this node's saved cursor. Whatever a peer
    deleted is in its stream as a tombstone entry, so a stream read to its end with no gap
    proves that nothing was missed. Once every peer with a saved cursor has been read this way,
    the node returns to ``in_mesh`` without a copy. A gap (a stream trimmed past a
    cursor older than the grace) means a delete may be lost for good, and leads to
    ``needs_rebootstrap``. So does having no saved cursor, or the hot path turned off, because
    nothing can then be proven. A peer that stays unreachable for four heartbeats also leads
    there, but *unconfirmed*: the node still clears itself if that peer turns up and its
    stream proves the node clean. A gap found meanwhile confirms the need.
``needs_rebootstrap``
    Waits for an *authority*: a peer whose record says it is in the mesh with contact within
    the grace. If every node of the mesh needs a re-bootstrap (a split longer than the grace),
    :func:`~replication_engine.standing.elected` picks the reference, so that waiting cannot
    last forever. It prefers an unconfirmed need, then the newest contact.
``rebootstrapping``
    Copies everything that differs from every authority, then discards local *values* that
    are older than the grace and that no authority holds.

Why discard instead of wiping, and why only those values. Normal repair never deletes on
absence, so a copy alone would keep the stale value, and peers would pull it back once this
node is in the mesh again. Wiping the replicated keyspace before copying would also destroy
what this node holds rightly: its writes from within the grace and everything the peers hold
anyway. It would also make a false detection, or a wrong peer list, cost a whole node. The
discard is narrower, and it is exact for what the grace guarantees. If a peer collected the
tombstone of a key, that delete is older than the grace, so a version newer than the grace beats
it under last-writer-wins and is kept. A version older than the grace that no authority holds
was either deleted and collected, or written here long ago and never replicated. The two cannot
be told apart once the tombstone is gone, and the second cannot happen while the hot path runs.
Each discarded version is first copied into the quarantine (reason ``rebootstrap_discarded``),
from which an operator can restore it. Discards change only this store: no tombstone and no
CDC entry are written, so no other peer loses a copy it may rightly hold. More than
``settings.rebootstrap.max_discard_items`` candidates stop the re-bootstrap before anything is
discarded. The node then stays out of the mesh and says why, and a bad peer list cannot empty
it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from replication_engine import codec
from replication_engine.clock import physical_ms
from replication_engine.codec import Change
from replication_engine.cursor import CursorStore
from replication_engine.merkle import ZERO
from replication_engine.observability.metrics import STANDING_STATES, Metrics
from replication_engine.peer import Peer
from replication_engine.resilience import Backoff
from replication_engine.standing import (
    IN_MESH,
    NEEDS_REBOOTSTRAP,
    REBOOTSTRAPPING,
    STATE_FIELDS,
    VERIFYING,
    Standing,
    absence_reason,
    elected,
    initial_state,
    is_authority,
)
from replication_engine.store.protocol import Store

if TYPE_CHECKING:
    from replication_engine.cold_path import ColdPath
    from replication_engine.config import EngineConfig
    from replication_engine.hot_path import Tailer

__all__ = ["DISCARD_REASON", "Membership", "discard_limit", "heartbeat_interval_sec"]

log = logging.getLogger(__name__)

# Heartbeat: a quarter of the grace, so three missed beats still leave the record fresh; at
# most this many seconds, so a day-long grace still shows a dead engine within a minute.
HEARTBEAT_MAX_SEC = 30.0
HEARTBEAT_MIN_SEC = 0.01
# Quarantine reason of a version a re-bootstrap discarded.
DISCARD_REASON = "rebootstrap_discarded"
# Keys named in the log line that reports discards.
DISCARDED_KEYS_LOGGED = 5
# Cursor database meta entry holding the last contact (ms), for stores without a record.
META_LAST_CONTACT = "last_contact_ms"
# Retry schedule of a re-bootstrap that failed (a peer or our store went away mid-way).
RETRY_BASE_SEC = 1.0
RETRY_MAX_SEC = 60.0
# Heartbeats a verifying node waits for an unreachable peer before it re-bootstraps instead.
VERIFY_PATIENCE_BEATS = 4
# Verdicts of a verification (see Membership._verdict).
_CLEARED, _WAITING, _UNREACHABLE = "cleared", "waiting", "unreachable"
# Tailer modes in which a peer's changes are arriving here.
_RECEIVING_MODES = ("tailing", "catching_up")


def heartbeat_interval_sec(grace_sec: float) -> float:
    return max(HEARTBEAT_MIN_SEC, min(HEARTBEAT_MAX_SEC, grace_sec / 4))


@runtime_checkable
class StandingStore(Protocol):
    """What a store needs for a full membership: a record peers can read, and discards."""

    async def write_mesh_record(
        self, fields: Mapping[str, str], *, clear: Sequence[str] = ...
    ) -> None: ...
    async def discard_versions(self, versions: Sequence[tuple[str, int, str]]) -> int: ...


def discard_limit(config: EngineConfig) -> int:
    """The most versions one re-bootstrap may discard.

    ``settings.rebootstrap.max_discard_items``, but never more than the quarantine keeps: each
    discarded version is copied there first, and more would evict those copies before anyone
    could inspect them.
    """
    return min(config.settings.rebootstrap.max_discard_items, config.cursor.quarantine_max_rows)


class _DiscardRefused(Exception):
    """More discard candidates than ``max_discard_items``: nothing is discarded."""


class Membership:
    """This node's standing in the mesh: heartbeat, detection and re-bootstrap.

    Args:
        node_id: this node.
        store: our store. Records and discards need a :class:`StandingStore`. With any other
            store, detection still works through the cursor database, but a re-bootstrap
            cannot discard and waits for an operator.
        cursors: the cursor database (saved cursors, last contact, quarantine).
        peers: every peer, in priority order.
        cold_path: reads peers' records, copies from them and lists what only we hold.
        tailers: the engine's live map of tailers, by peer.
        metrics: the engine's metrics.
        grace_sec: ``local.tombstone_grace_sec``.
        max_discard_items: ``settings.rebootstrap.max_discard_items``.
        fetch_batch_size: keys per round trip while discarding.
        hot_path_enabled: without tailers, an absence cannot be proven harmless.
        stall_after_sec: a peer silent for this long does not count as contact.
        wall_ms: wall-clock milliseconds (the store's clock, so horizons match its GC).

    Error handling: :meth:`run` never raises for a peer or a store failure. A failed
    re-bootstrap is logged and retried with backoff. A refused one (too many discards, or a
    store that cannot discard) is logged once at ERROR and not retried in this run.
    """

    def __init__(
        self,
        *,
        node_id: str,
        store: Store,
        cursors: CursorStore,
        peers: Sequence[Peer],
        cold_path: ColdPath,
        tailers: Mapping[str, Tailer],
        metrics: Metrics,
        grace_sec: float,
        max_discard_items: int,
        fetch_batch_size: int,
        hot_path_enabled: bool,
        stall_after_sec: float,
        wall_ms: Callable[[], int],
    ) -> None:
        self.node_id = node_id
        self.store = store
        self.cursors = cursors
        self.peers = list(peers)
        self.cold_path = cold_path
        self.tailers = tailers
        self.metrics = metrics
        self.grace_ms = int(grace_sec * 1000)
        self.max_discard_items = max_discard_items
        self.fetch_batch_size = fetch_batch_size
        self.hot_path_enabled = hot_path_enabled
        self.stall_after_sec = stall_after_sec
        self.interval_sec = heartbeat_interval_sec(grace_sec)
        self._wall_ms = wall_ms
        self.state = IN_MESH
        self.reason: str | None = None
        self.since_ms: int | None = None
        self.contact_ms: int | None = None
        self.error: str | None = None  # why a re-bootstrap failed or is refused
        self.discarded = 0  # versions discarded by re-bootstraps in this run
        self.last_rebootstrap: dict[str, Any] | None = None
        self._gaps: dict[str, str] = {}  # peer -> stream gap past the grace, since last contact
        self._verify_started: float | None = None  # monotonic
        self._verify_peers: set[str] = set()  # peers with a saved cursor when verifying began
        self._refused = False
        # False for a needs_rebootstrap caused only by a peer too long unreachable to verify.
        self._confirmed = True
        self._retry = Backoff(RETRY_BASE_SEC, RETRY_MAX_SEC)
        self._retry_at = 0.0
        self._wake = asyncio.Event()
        self._record_error: str | None = None
        self._start_pending = False  # the start decision waits for the local store
        metrics.standing_state.set(STANDING_STATES[IN_MESH])

    # ------------------------------------------------------------------------ start

    async def open(self) -> None:
        """Decide the state at start, before any tailer or cold path runs.

        When the node is stale, the record says so before this returns, so peers hold off from
        the first moment. A stale record left by an earlier run is picked up again. A local
        store that does not answer does not stop the engine from starting (its tailers wait
        for it). The node then counts as ``verifying`` until its record can be read. Peers
        cannot read this store either meanwhile, so they cannot pull from it.
        """
        try:
            await self._decide_start()
        except Exception as exc:
            self._start_pending = True
            log.warning("standing.unknown node=%s error=%s", self.node_id, _describe(exc))
            await self._enter(
                VERIFYING,
                f"this node's standing record could not be read at start ({_describe(exc)})",
            )

    async def _decide_start(self) -> None:
        own = Standing.from_fields(await self.store.reader.mesh_record())
        fallback = await self._saved_contact()
        empty = await self.store.reader.root() == ZERO
        self.contact_ms = own.contact_ms if own is not None and own.contact_ms else fallback
        if not self.peers:
            state, reason = IN_MESH, None
        else:
            state, reason = initial_state(
                own, fallback, self._wall_ms(), self.grace_ms, store_empty=empty
            )
        if state == VERIFYING:
            await self._enter(VERIFYING, reason)
            await self._check_provable()
        elif state == NEEDS_REBOOTSTRAP:
            await self._enter(NEEDS_REBOOTSTRAP, reason)
        elif self.state != IN_MESH:
            await self._enter(IN_MESH, "the standing record was read: in the mesh")
        elif own is not None and not own.in_mesh:
            # Stale when it stopped, but there is nothing here that could come back.
            await self._enter(IN_MESH, "the store is empty")

    async def _saved_contact(self) -> int | None:
        raw = await self.cursors.meta_get(META_LAST_CONTACT)
        if raw is not None and raw.isdigit():
            return int(raw)
        return await self.cursors.newest_save_ms()

    # ------------------------------------------------------------------------ events

    def on_gap(self, peer_id: str, cursor: codec.StreamId | None) -> None:
        """A tailer found ``peer_id``'s stream trimmed past its cursor (called synchronously).

        Entries missed from a cursor older than the grace may include deletes whose tombstones
        the peer has collected since: nothing can deliver those any more.
        """
        if cursor is None:
            return
        age_ms = self._wall_ms() - cursor.ms
        if age_ms <= self.grace_ms:
            return
        self._gaps[peer_id] = (
            f"peer {peer_id}'s stream was trimmed past our cursor {cursor}, "
            f"{age_ms / 1000:.1f}s old (grace {self.grace_ms / 1000:.1f}s): deletes it "
            f"collected may never arrive"
        )
        self._wake.set()

    async def record_contact(self) -> None:
        """A bootstrap from a peer just finished: that is contact, recorded now.

        The heartbeat would record it too, but an engine stopped before its first beat would
        leave no record at all, and peers pull from a node without a record.
        """
        if self.state == IN_MESH:
            self.contact_ms = self._wall_ms()
            await self._write_record()

    async def close(self) -> None:
        """At a graceful shutdown, before the tailers stop: record the contact of this moment."""
        if self.state == IN_MESH and self._receiving():
            await self.record_contact()

    # ------------------------------------------------------------------------ loop

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat and state changes until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # one bad tick must not end the heartbeat
                log.warning("standing.tick_failed error=%s", _describe(exc))
            if await _wait(stop, self._wake, self.interval_sec):
                return
            self._wake.clear()

    async def _tick(self) -> None:
        if self._start_pending:
            try:
                await self._decide_start()
            except Exception:
                return  # still unreadable: stay verifying, try again next beat
            self._start_pending = False
            return
        now = self._wall_ms()
        if self.state == IN_MESH:
            absent = None if self.contact_ms is None else now - self.contact_ms
            reason = None if absent is None else absence_reason(absent, self.grace_ms)
            if reason is not None and self.peers:
                await self._enter(VERIFYING, reason)
                await self._check_provable()
            elif self._receiving():
                self.contact_ms = now
                self._gaps.clear()
                await self._write_record()
        elif self.state == VERIFYING:
            if self._gaps:
                await self._enter(NEEDS_REBOOTSTRAP, self._gap_reason())
                return
            verdict, unproven = self._verdict()
            if verdict == _CLEARED:
                await self._clear()
            elif verdict == _UNREACHABLE and self._patience_over():
                self._confirmed = False
                await self._enter(
                    NEEDS_REBOOTSTRAP,
                    f"{self.reason}; peer(s) {', '.join(unproven)} unreachable, so their "
                    f"streams cannot show that no delete was missed",
                )
        elif self.state == NEEDS_REBOOTSTRAP and not self._refused:
            may_elect = True
            if not self._confirmed:
                # Only a peer was missing to verify against: it may still turn up and prove us
                # clean, and a gap found meanwhile settles the matter the other way.
                if self._gaps:
                    self._confirmed = True
                    self.reason = self._gap_reason()
                    await self._write_record()
                    self._log_need()
                else:
                    verdict, _ = self._verdict()
                    if verdict == _CLEARED:
                        await self._clear()
                        return
                    may_elect = verdict != _WAITING
            if time.monotonic() >= self._retry_at:
                await self._try_rebootstrap(may_elect=may_elect)

    async def _clear(self) -> None:
        self.contact_ms = self._wall_ms()
        await self._enter(IN_MESH, "every peer's stream was read from our cursor, with no gap")

    def _gap_reason(self) -> str:
        return "; ".join(sorted(self._gaps.values()))

    def _patience_over(self) -> bool:
        assert self._verify_started is not None
        waited = time.monotonic() - self._verify_started
        return waited >= VERIFY_PATIENCE_BEATS * self.interval_sec

    def _receiving(self) -> bool:
        """Some peer answers and its changes are arriving here (tailer reading, or no tailer)."""
        for peer in self.peers:
            if not peer.connected or peer.stalled(self.stall_after_sec):
                continue
            tailer = self.tailers.get(peer.node_id)
            if not self.hot_path_enabled or (
                tailer is not None and tailer.mode in _RECEIVING_MODES
            ):
                return True
        return False

    async def _check_provable(self) -> None:
        """Go straight to ``needs_rebootstrap`` when no stream can prove anything."""
        if not self.hot_path_enabled:
            await self._enter(
                NEEDS_REBOOTSTRAP,
                f"{self.reason}; the hot path is off, so no peer stream can show that no "
                f"delete was missed",
            )
        elif not self._verify_peers:
            await self._enter(
                NEEDS_REBOOTSTRAP,
                f"{self.reason}; no saved cursor, so no peer stream can show that no delete "
                f"was missed",
            )

    def _verdict(self) -> tuple[str, list[str]]:
        """Whether the peers' streams show that this node missed no delete.

        Returns ``(_CLEARED, [])`` when every peer with a saved cursor was read to its tail
        since verifying began, ``(_WAITING, [])`` while a reachable peer is still being read,
        and ``(_UNREACHABLE, peers)`` when only unreachable peers are left. Every peer counts,
        not just one: with ``settings.hot_path.relay`` off, a peer's deletes are in its own
        stream only, and no other peer can vouch for them.
        """
        assert self._verify_started is not None
        unproven: list[str] = []
        for peer in self.peers:
            if peer.node_id not in self._verify_peers:
                continue
            tailer = self.tailers.get(peer.node_id)
            if (
                tailer is not None
                and tailer.last_read_at is not None
                and tailer.last_read_at > self._verify_started
                and not tailer.catching_up
            ):
                continue
            if peer.connected:
                return _WAITING, []
            unproven.append(peer.node_id)
        return (_UNREACHABLE, unproven) if unproven else (_CLEARED, [])

    # ------------------------------------------------------------------------ re-bootstrap

    async def _try_rebootstrap(self, *, may_elect: bool) -> None:
        standings: dict[str, Standing | None] = {}
        authorities: list[Peer] = []
        unreachable = False
        now = self._wall_ms()
        for peer in self.peers:
            try:
                standing = await self.cold_path.peer_standing(peer)
            except Exception:
                unreachable = True
                continue
            standings[peer.node_id] = standing
            if is_authority(standing, now, self.grace_ms):
                authorities.append(peer)
        if authorities:
            await self._rebootstrap(authorities)
            return
        if (
            may_elect
            and not unreachable
            and elected(self.node_id, self.contact_ms, standings, own_confirmed=self._confirmed)
        ):
            log.error(
                "standing.elected node=%s contact_ms=%s: every node of the mesh needs a "
                "re-bootstrap (split longer than the tombstone grace); this node has the "
                "newest contact and becomes the reference; deletes made and collected on the "
                "other side of the split can come back",
                self.node_id,
                self.contact_ms,
            )
            self.metrics.rebootstraps.labels("elected").inc()
            self.contact_ms = now
            await self._enter(IN_MESH, "elected as the reference after a split")
            return
        self.error = "waiting for a peer that is in the mesh (reachable, record within the grace)"

    async def _rebootstrap(self, authorities: list[Peer]) -> None:
        names = [p.node_id for p in authorities]
        await self._enter(REBOOTSTRAPPING, f"{self.reason} (from {', '.join(names)})")
        started = time.perf_counter()
        summary: dict[str, Any] = {"peers": names, "started_ms": self._wall_ms()}
        try:
            fetched = applied = 0
            for peer in authorities:
                repair = await self.cold_path.copy_from(peer)
                fetched += repair.items_fetched
                applied += repair.items_applied
            summary.update(items_fetched=fetched, items_applied=applied)
            candidates = await self._candidates(authorities)
            summary["discarded"] = await self._discard(candidates)
        except _DiscardRefused as exc:
            self._refused = True
            self.error = str(exc)
            self.metrics.rebootstraps.labels("refused").inc()
            log.error("standing.rebootstrap_refused node=%s: %s", self.node_id, exc)
            await self._enter(NEEDS_REBOOTSTRAP, self.reason)
            return
        except Exception as exc:
            self.error = _describe(exc)
            delay = self._retry.next_delay()
            self._retry_at = time.monotonic() + delay
            self.metrics.rebootstraps.labels("failed").inc()
            log.warning(
                "standing.rebootstrap_failed node=%s error=%s retry_sec=%.1f",
                self.node_id,
                self.error,
                delay,
            )
            await self._enter(NEEDS_REBOOTSTRAP, self.reason)
            return
        summary["duration_sec"] = round(time.perf_counter() - started, 3)
        self.last_rebootstrap = summary
        self.error = None
        self._retry.reset()
        self.metrics.rebootstraps.labels("completed").inc()
        self.contact_ms = self._wall_ms()
        log.info(
            "standing.rebootstrap_complete node=%s peers=%s fetched=%d applied=%d "
            "discarded=%d seconds=%.1f",
            self.node_id,
            ",".join(names),
            summary["items_fetched"],
            summary["items_applied"],
            summary["discarded"],
            summary["duration_sec"],
        )
        await self._enter(IN_MESH, "re-bootstrapped")

    async def _candidates(self, authorities: list[Peer]) -> dict[str, tuple[int, str]]:
        """Our values older than the grace that no authority holds: ``key -> (hlc, origin)``."""
        horizon_ms = self._wall_ms() - self.grace_ms
        found: dict[str, tuple[int, str]] = {}

        async def consider(keys: list[str]) -> None:
            for key, version in zip(keys, await self.store.reader.items(keys), strict=True):
                # Tombstones go by themselves (GC); unreadable items are the cold path's.
                if not isinstance(version, Change) or version.tombstone:
                    continue
                if physical_ms(version.hlc) >= horizon_ms:
                    continue  # newer than any collected delete: last-writer-wins keeps it
                found[key] = (version.hlc, version.origin)
                if len(found) > self.max_discard_items:
                    raise _DiscardRefused(self._refusal(f"more than {len(found) - 1}"))

        await self.cold_path.local_only_keys(authorities[0], consider)
        for peer in authorities[1:]:
            for batch in _chunks(list(found), self.fetch_batch_size):
                held = await _held_by(peer, batch)
                for key, got in zip(batch, held, strict=True):
                    if got is not None:  # held there, even unreadably: not ours to judge
                        found.pop(key, None)
        return found

    def _refusal(self, count: str) -> str:
        return (
            f"re-bootstrap would discard {count} local versions older than the tombstone grace "
            f"that no peer in the mesh holds, above the limit of {self.max_discard_items} "
            f"(settings.rebootstrap.max_discard_items, at most cursor.quarantine_max_rows); "
            f"nothing was discarded and this node stays out of the "
            f"mesh (not ready, peers do not pull from it). Check that its peers are the right "
            f"mesh, then raise the limit and restart it"
        )

    async def _discard(self, candidates: dict[str, tuple[int, str]]) -> int:
        """Quarantine a copy of each candidate, then remove it from this store only."""
        if not candidates:
            return 0
        if not isinstance(self.store, StandingStore):
            raise _DiscardRefused(
                f"re-bootstrap must discard {len(candidates)} local versions, but this store "
                f"({type(self.store).__name__}) cannot discard; remove them by hand"
            )
        discarded = 0
        sample: list[str] = []
        for batch in _chunks(sorted(candidates), self.fetch_batch_size):
            versions: list[tuple[str, int, str]] = []
            for key, change in zip(batch, await self.store.reader.items(batch), strict=True):
                if not isinstance(change, Change) or (change.hlc, change.origin) != candidates[key]:
                    continue  # changed since it was chosen: a newer version is not ours to drop
                await self.cursors.quarantine_add(
                    self.node_id,
                    "0-0",
                    key,
                    f"{DISCARD_REASON}: a value older than the tombstone grace that no peer in "
                    f"the mesh holds (its delete was collected while this node was away)",
                    codec.encode_entry(change),
                )
                versions.append((key, change.hlc, change.origin))
            self.metrics.quarantine_evicted.set(self.cursors.evicted)
            done = await self.store.discard_versions(versions)
            discarded += done
            self.discarded += done
            self.metrics.rebootstrap_discarded.inc(done)
            sample.extend(key for key, _, _ in versions[: DISCARDED_KEYS_LOGGED - len(sample)])
        if discarded:
            log.error(
                "standing.rebootstrap_discarded node=%s count=%d keys=%r: values older than the "
                "tombstone grace that no peer in the mesh holds were removed here; copies are "
                "in the quarantine (reason %s)",
                self.node_id,
                discarded,
                sample,
                DISCARD_REASON,
            )
        return discarded

    # ------------------------------------------------------------------------ state

    async def _enter(self, state: str, reason: str | None) -> None:
        previous = self.state
        self.state = state
        self.reason = None if state == IN_MESH else reason
        if state != previous:
            self.since_ms = self._wall_ms()
            self.metrics.standing_changes.labels(state).inc()
        self.metrics.standing_state.set(STANDING_STATES[state])
        if state == VERIFYING:
            self._verify_started = time.monotonic()
            self._verify_peers = set(await self.cursors.all())
            self._confirmed = True
        if state == IN_MESH:
            self._gaps.clear()
            self.error = None
        await self._write_record()
        if state == previous:
            return
        if state == VERIFYING:
            log.warning(
                "standing.verifying node=%s reason=%s: holding this node's data back from "
                "peers until their streams show it missed no delete",
                self.node_id,
                reason,
            )
        elif state == NEEDS_REBOOTSTRAP and previous != REBOOTSTRAPPING:
            self._log_need()  # a failed attempt has logged its own WARNING
        elif state == REBOOTSTRAPPING:
            log.info("standing.rebootstrapping node=%s reason=%s", self.node_id, reason)
        else:
            log.info("standing.in_mesh node=%s reason=%s", self.node_id, reason)

    def _log_need(self) -> None:
        if not self._confirmed:
            # Self-healing once the peer answers: WARNING. A confirmed need is an ERROR.
            log.warning(
                "standing.needs_rebootstrap_unconfirmed node=%s reason=%s: verifying again "
                "once the peer answers, re-bootstrapping if a peer in the mesh turns up first",
                self.node_id,
                self.reason,
            )
            return
        log.error(
            "standing.needs_rebootstrap node=%s reason=%s: this node must re-bootstrap from a "
            "peer in the mesh before peers may pull from it; it is not ready meanwhile",
            self.node_id,
            self.reason,
        )

    async def _write_record(self) -> None:
        """Publish the standing; a failure is logged once and retried by the next heartbeat."""
        record = Standing(
            self.contact_ms, self.state, self.since_ms, self.reason, confirmed=self._confirmed
        )
        try:
            if isinstance(self.store, StandingStore):
                clear = STATE_FIELDS if self.state == IN_MESH else ()
                await self.store.write_mesh_record(record.as_fields(), clear=clear)
            if self.contact_ms is not None:
                await self.cursors.meta_set(META_LAST_CONTACT, str(self.contact_ms))
        except Exception as exc:
            message = _describe(exc)
            if message != self._record_error:
                log.warning("standing.record_failed node=%s error=%s", self.node_id, message)
            self._record_error = message
        else:
            self._record_error = None

    def status(self) -> dict[str, Any]:
        """For ``engine.status()``: where this node stands and why."""
        now = self._wall_ms()
        return {
            "state": self.state,
            "reason": self.reason,
            "since_ms": self.since_ms,
            "last_contact_ms": self.contact_ms,
            "out_of_contact_sec": (
                None if self.contact_ms is None else round((now - self.contact_ms) / 1000, 3)
            ),
            "tombstone_grace_sec": self.grace_ms / 1000,
            "error": self.error,
            "discarded": self.discarded,
            "last_rebootstrap": self.last_rebootstrap,
        }

    def not_ready_reason(self) -> str | None:
        if self.state == IN_MESH:
            return None
        return f"node {self.state}: {self.reason}" if self.reason else f"node {self.state}"


async def _wait(stop: asyncio.Event, wake: asyncio.Event, timeout: float) -> bool:
    """Wait for ``stop``, ``wake`` or ``timeout``, whichever comes first; True when stopping."""
    waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())}
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return stop.is_set()


async def _held_by(peer: Peer, keys: list[str]) -> list[Change | codec.CodecError | None]:
    return await peer.call(lambda: peer.reader.items(keys), what="repair_items")


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
