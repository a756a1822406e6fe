"""What a repair did: per peer (:class:`PeerRepair`) and per cycle (:class:`RepairStats`).

These are what ``repair_once`` returns, what ``status()`` shows and what a repair's conclusions
rest on: only a repair that fetched and applied everything it found (:func:`is_complete`) lets
this store take the peer's claims.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Keys named in one warning, so a bad batch is one readable log line.
CORRUPT_KEYS_LOGGED = 5


@dataclass(slots=True)
class PeerRepair:
    """What one cycle did with one peer.

    ``round_trips`` and ``bytes_read`` are the peer's side only (its ReadCounter), which is
    what a repair costs the peer and the network.
    """

    peer: str
    in_sync: bool = False
    branches_visited: int = 0
    items_fetched: int = 0
    items_applied: int = 0
    round_trips: int = 0
    bytes_read: int = 0
    remaining: bool = False
    error: str | None = None
    duration_sec: float = 0.0
    items_corrupt: int = 0  # fetched items the peer stores unreadably: skipped, logged
    items_missing: int = 0  # keys the peer no longer held when fetched: not complete
    items_refused: int = 0  # refused by our store (a wrong-typed key) or our clock: kept pending
    # Everything the peer held when the repair began is held here now: its claims were taken.
    complete: bool = False
    discarded: int = 0  # versions here that the peer's claims prove dead: dropped
    written_off: int = 0  # versions here the peer's claims cover while it holds older ones
    # Keys the peer's tree left out while the peer holds them: not dropped, not complete.
    unlisted_on_peer: int = 0
    # Versions the peer's claims cover that no collection could have removed yet, by this
    # node's own claims (see claims.Claims._drop_dead): kept, and looked at again next cycle.
    drops_deferred: int = 0


@dataclass(slots=True)
class RepairStats:
    """What one cycle did, summed over peers, with each peer's detail in ``peers``."""

    peers_checked: int = 0
    peers_in_sync: int = 0
    branches_visited: int = 0
    items_fetched: int = 0
    items_applied: int = 0
    bytes_read: int = 0
    round_trips: int = 0
    duration_sec: float = 0.0
    peers: dict[str, PeerRepair] = field(default_factory=dict)
    skipped_reason: str | None = None
    peers_skipped: dict[str, str] = field(default_factory=dict)  # peer -> why not checked

    def add(self, repair: PeerRepair) -> None:
        self.peers[repair.peer] = repair
        self.peers_checked += 1
        self.peers_in_sync += int(repair.in_sync)
        self.branches_visited += repair.branches_visited
        self.items_fetched += repair.items_fetched
        self.items_applied += repair.items_applied
        self.bytes_read += repair.bytes_read
        self.round_trips += repair.round_trips


def is_complete(repair: PeerRepair) -> bool:
    """Whether this store now holds everything the peer held when the repair began.

    A key the peer no longer held when fetched (a tombstone collected there meanwhile)
    leaves ours behind: the claims read at the start may cover that delete, and taking
    them would claim a write this store lacks. The next cycle finds the key on this side
    only and settles it by absence.
    """
    return (
        repair.error is None
        and not repair.remaining
        and not repair.items_corrupt
        and not repair.items_refused
        and not repair.items_missing
    )


def describe(exc: BaseException) -> str:
    """An error as a repair reports and logs it: its type and message, bounded."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]
