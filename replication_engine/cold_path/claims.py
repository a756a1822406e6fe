"""What a repair concludes from a peer's record (docs/DELETES.md).

A repair reads the peer's record, stream facts and root first (:class:`PeerFacts`). When it
fetched and applied everything that differed, with nothing left over, corrupt or refused, this
store holds everything the peer held then, and takes the peer's claims and an anchor in its
stream. The same drill lists the keys only this store holds: a version there that the peer's
claims cover is dead (deleted and collected), and is dropped here. A version here that the
peer's claims cover while it holds an older one was written off, and the peer's replaces it.
All three rest on the record read before the drill, and none is done if it went back meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from replication_engine import codec
from replication_engine.codec import STREAM_START, Change
from replication_engine.cold_path.local import Part, Shared
from replication_engine.cold_path.stats import CORRUPT_KEYS_LOGGED, PeerRepair
from replication_engine.knowledge import (
    ApplyStatus,
    NodeRecord,
    frontier,
    is_dead_by_absence,
    order,
    sid_key,
)
from replication_engine.peer import Peer, StreamInfo

log = logging.getLogger(__name__)

# Quarantine reason of a version dropped because a peer's claims prove it dead.
ABSENT_REASON = "absent_on_peer"
WRITTEN_OFF_REASON = "written_off"


@dataclass(frozen=True, slots=True)
class PeerFacts:
    """What a repair that starts now may claim once complete: the peer's record, stream facts
    and root, read in that order (``Peer.snapshot_facts``)."""

    record: NodeRecord | None
    stream: StreamInfo
    root: bytes
    read_at: float  # monotonic

    @property
    def tail(self) -> str:
        last = self.stream.last or STREAM_START
        return sid_key(last.ms, last.seq)


class Claims(Part):
    """Draws a repair's conclusions: dead versions dropped, written-off ones replaced, claims
    taken.

    Dropped and replaced versions are quarantined in the cursor database; ``fetch_batch_size``
    bounds each read and drop; an anchor still missing is asked for as a request.
    ``on_complete`` is called with a peer's id and the monotonic time its repair began, after
    every complete repair from it.
    """

    def __init__(self, shared: Shared, on_complete: Callable[[str, float], None]) -> None:
        super().__init__(shared)
        self.on_complete = on_complete
        self.last_complete: dict[str, float] = {}  # peer -> wall time of its last complete repair

    async def conclude(
        self,
        peer: Peer,
        facts: PeerFacts,
        own: NodeRecord | None,
        repair: PeerRepair,
        *,
        absent: list[str],
        behind: list[Change],
        complete: bool,
        began: float,
    ) -> None:
        """After the drill: drop what the peer proves dead (of ``absent``, the keys only this
        store holds), replace what it proves written off (of ``behind``, its versions that ours
        outranked), then, if the repair was ``complete``, take its claims (and set
        ``repair.complete``). ``began`` (monotonic seconds) is when the repair read our
        record: what waits for a repair that began after some event compares it.
        """
        record = facts.record
        if record is None and complete:
            # A peer that never ran an engine (or whose record is gone) claims nothing, and so
            # can hold none of this node's writes that a recovery waits for.
            self.on_complete(peer.node_id, began)
        if record is None or own is None or not (complete or absent or behind):
            return
        if await self._record_moved(peer, record):
            return
        if absent and not record.recovering:
            repair.discarded = await self._drop_dead(peer, record, own, absent, repair)
        if behind and not record.recovering:
            repair.written_off = await self._write_off(peer, record, behind)
        if complete and not repair.unlisted_on_peer:
            await self._take_claims(peer, facts, record, own, repair, began)

    async def _record_moved(self, peer: Peer, record: NodeRecord) -> bool:
        """Whether the peer's record went back since ``record`` was read (its Redis restored
        or wiped mid-repair): then nothing is concluded from it this cycle."""
        now = await peer.record()
        if (
            now is not None
            and now.incarnation == record.incarnation
            and now.epoch == record.epoch
            and now.cert >= record.cert
        ):
            return False
        log.warning(
            "repair.peer_record_moved",
            extra={
                "peer": peer.node_id,
                "hint": "the peer's record changed during the repair; nothing is concluded "
                "from it this cycle",
            },
        )
        return True

    async def _take_claims(
        self,
        peer: Peer,
        facts: PeerFacts,
        record: NodeRecord,
        own: NodeRecord,
        repair: PeerRepair,
        began: float,
    ) -> None:
        taken = await self.local.call(
            "take claims",
            self.local.store.inherit(
                peer=peer.node_id,
                token=record.token,
                tail=facts.tail,
                incarnation=own.incarnation,
                cert=own.cert,
                claims=record.all_claims(),
            ),
        )
        if not taken:
            return
        if taken == 1:
            # The peer's tailer here read on past a gap the repair began before: one more
            # repair, beginning now, anchors it (and until then its stream proves nothing).
            self.requests.ask_anchor(peer.node_id, at=time.monotonic())
        else:
            self.requests.drop_anchor(peer.node_id)
        repair.complete = True
        self.last_complete[peer.node_id] = time.time()
        self.on_complete(peer.node_id, began)

    async def _quarantine(self, version: Change, reason: str) -> None:
        """Keep a version about to be dropped or replaced, with why, for an operator: its
        payload whole (within cursor.quarantine_max_value_bytes), so it can be written again."""
        evicted = await self.cursors.quarantine_add(
            self.local.store.node_id,
            "0-0",
            version.key,
            reason,
            codec.encode_entry(version),
            value=None if version.tombstone else version.data,
        )
        self.metrics.quarantine_evicted.inc(evicted)

    async def _drop_dead(
        self,
        peer: Peer,
        record: NodeRecord,
        own: NodeRecord,
        keys: list[str],
        repair: PeerRepair,
    ) -> int:
        """Drop the versions held here under ``keys`` (which ``peer`` lacks) that its claims
        cover: the peer applied them or newer and lost them only to a collection.

        The peer's tree only says which keys to ask about: each one is read on the peer before
        anything is dropped, and one the peer holds after all (its tree damaged, or edited by
        hand) is kept here and fetched instead, and the repair is not complete. A drop rests
        on the item being absent, never on an index of it.

        Nor on the peer's claims alone: a collection waits until every member claims the
        tombstone, this node included, and this node's claims only grow while it serves. So a
        version here above this node's own frontier cannot have been collected anywhere yet,
        whatever the peer's record says (a record edited by hand, or broken): it is kept, and
        looked at again next cycle. While this node recovers, or follows, its claims bound
        nothing, and the peer's are taken as they are.
        """
        dropped = values = tombstones = 0
        sample: list[str] = []
        bound = None if own.recovering or own.mode != "mesh" else self._own_frontier(own)
        size = self.settings.fetch_batch_size
        for start in range(0, len(keys), size):
            held = await self.local.call(
                "read items", self.local.store.reader.items(keys[start : start + size])
            )
            dead: list[Change] = [
                version
                for version in held
                if isinstance(version, Change)
                and is_dead_by_absence((version.hlc, version.origin), record)
            ]
            if bound is not None and (early := [v for v in dead if v.hlc > bound]):
                repair.drops_deferred += len(early)
                dead = [v for v in dead if v.hlc <= bound]
            if dead:
                dead = await self._confirmed_absent(peer, dead, repair)
            if not dead:
                continue
            for version in dead:
                if not version.tombstone:
                    await self._quarantine(
                        version,
                        f"{ABSENT_REASON}: peer {peer.node_id} lacks the key and its claim "
                        f"about {version.origin}'s writes covers this version (deleted and "
                        f"collected)",
                    )
            done = await self.local.call(
                "drop dead versions",
                self.local.store.discard_versions(
                    [(v.key, v.hlc, v.origin) for v in dead],
                    incarnation=own.incarnation,
                    cert=own.cert,
                ),
            )
            if done < 0:
                break  # our own record went back: nothing concluded
            dropped += done
            live = [v for v in dead if not v.tombstone]
            values += len(live)
            tombstones += len(dead) - len(live)
            # Values first: a tombstone the peer collected first is routine, a value is news.
            ranked = live + [v for v in dead if v.tombstone]
            sample.extend(v.key for v in ranked[: CORRUPT_KEYS_LOGGED - len(sample)])
        if repair.drops_deferred:
            log.info(
                "repair.drops_deferred",
                extra={
                    "peer": peer.node_id,
                    "count": repair.drops_deferred,
                    "own_frontier": bound,
                    "hint": "versions the peer lacks while its claims cover them, above this "
                    "node's own frontier: no collection can have removed them yet, so they are "
                    "kept (a peer's record ahead of what it holds, or a member this node knows "
                    "of and the peer does not)",
                },
            )
        if dropped:
            self.metrics.absence_drops.labels(peer.node_id).inc(dropped)
            # Tombstones alone are the ordinary case (the peer collected a delete first): an
            # INFO line. A value dropped is kept in the quarantine and said at WARNING.
            log.log(
                logging.WARNING if values else logging.INFO,
                "repair.dropped_dead",
                extra={
                    "peer": peer.node_id,
                    "count": dropped,
                    "values": values,  # of the versions found dead (kept in the quarantine)
                    "tombstones": tombstones,
                    "keys": sample,
                    "quarantine_reason": ABSENT_REASON if values else None,
                    "hint": "versions here that the peer lacks while its claims cover them "
                    "(deleted and collected)"
                    + ("; values are kept in the quarantine" if values else ": tombstones only"),
                },
            )
        return dropped

    @staticmethod
    def _own_frontier(own: NodeRecord) -> int:
        """This node's frontier by its own record: every collection anywhere is at or below
        it, as every member's frontier bounds the stable frontier that collections use."""
        return frontier(own, own.members | {own.node_id}, own.forgotten)

    async def _confirmed_absent(
        self, peer: Peer, versions: list[Change], repair: PeerRepair
    ) -> list[Change]:
        """Of ``versions``, those whose key the peer does not hold, read on the peer now; the
        peer's readable versions of the others are applied here, as a drill's finds are."""
        stored = await peer.call(
            lambda: peer.reader.stored_items([v.key for v in versions]), what="repair_items"
        )
        absent = [v for v, item in zip(versions, stored, strict=True) if item.decoded is None]
        if len(absent) == len(versions):
            return absent
        unlisted = [item for item in stored if item.decoded is not None]
        repair.unlisted_on_peer += len(unlisted)
        log.warning(
            "repair.unlisted_on_peer",
            extra={
                "peer": peer.node_id,
                "count": len(unlisted),
                "keys": [item.key for item in unlisted[:CORRUPT_KEYS_LOGGED]],
                "hint": "the peer holds keys its Merkle tree did not list (a damaged or "
                "hand-edited tree, or a write there since the tree was read): kept here, not "
                "dropped, and the repair is not complete; a damaged tree stays so until "
                "that key is written again there",
            },
        )
        found = [item.decoded for item in unlisted if isinstance(item.decoded, Change)]
        if found:
            await self.local.apply(found)
        return absent

    async def _write_off(self, peer: Peer, record: NodeRecord, theirs: list[Change]) -> int:
        """Replace the versions held here that ``peer``'s claims cover while it holds an older
        version of the key (docs/DELETES.md, "Written off").

        The peer applied ours or newer, and a store loses a version only to a newer one, to a
        collection, or to an operator: holding an older one, it lost ours to a recovery that
        wrote it off (certified past it), and a restore brought it back here. Every store
        whose claims cover it refuses it, so the mesh would stay split for good; the peer's
        version replaces it, whatever this store's own claims say (they may cover the peer's
        version only because ours superseded it). The version replaced is quarantined.
        """
        replaced = 0
        size = self.settings.fetch_batch_size
        for start in range(0, len(theirs), size):
            batch = theirs[start : start + size]
            held = await self.local.call(
                "read items", self.local.store.reader.items([c.key for c in batch])
            )
            chosen: list[Change] = []
            replaces: dict[int, tuple[int, str]] = {}
            for change, ours in zip(batch, held, strict=True):
                if isinstance(ours, Change) and _is_written_off(ours, change, record):
                    replaces[len(chosen)] = (ours.hlc, ours.origin)
                    chosen.append(change)
                    await self._quarantine(
                        ours,
                        f"{WRITTEN_OFF_REASON}: peer {peer.node_id} holds an older version while "
                        f"its claim about {ours.origin}'s writes covers this one (lost to a "
                        f"recovery, brought back by a restore)",
                    )
            if not chosen:
                continue
            result = await self.local.apply(chosen, replaces)
            done = sum(1 for status in result.statuses if status is ApplyStatus.APPLIED)
            replaced += done
            log.warning(
                "repair.written_off",
                extra={
                    "peer": peer.node_id,
                    "count": done,
                    "keys": [c.key for c in chosen[:CORRUPT_KEYS_LOGGED]],
                    "quarantine_reason": WRITTEN_OFF_REASON,
                    "hint": "versions here that the peer's claims cover while it holds older "
                    "ones were replaced by the peer's; they are kept in the quarantine",
                },
            )
        if replaced:
            self.metrics.written_off.labels(peer.node_id).inc(replaced)
        return replaced


def _is_written_off(ours: Change, theirs: Change, record: NodeRecord) -> bool:
    """Ours outranks the peer's version, and the peer's claims cover ours."""
    return order(ours.hlc, ours.origin, ours.tombstone, ours.content_hash) > order(
        theirs.hlc, theirs.origin, theirs.tombstone, theirs.content_hash
    ) and is_dead_by_absence((ours.hlc, ours.origin), record)
