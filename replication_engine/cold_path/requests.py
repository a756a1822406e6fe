"""Repairs asked for and not yet answered, per peer (pure bookkeeping, no I/O).

A request comes from the hot path (a gap, quarantined or refused entries, a clock too far
ahead, an unset anchor), from membership (a recovery, a forget barrier) or from a repair that
could not land everything. It names a reason, remembered with when it was last asked, and may
name keys, fetched first by the next repair. A request stands until a repair that began after
it settles it (:meth:`RepairRequests.settle`); until then the peer's stream proves nothing
about the keys set aside, and cycles run for the peer even while catching up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from replication_engine.cold_path.stats import PeerRepair, is_complete

# Keys from request_repair(keys=...) remembered per peer. Past this the keys are dropped: a
# quarantined key differs from the peer's stored version, so the next drill finds it anyway.
REQUESTED_KEYS_MAX = 10_000
# Reasons that set keys of a peer's stream aside: until repaired, its stream proves nothing
# about them (see hot_path.Tailer).
_SETS_KEYS_ASIDE = ("quarantine", "clock_skew", "refused")


class RepairRequests:
    def __init__(self) -> None:
        # peer -> reason -> monotonic time of the latest request: a repair that began before
        # a request does not answer it (a recovery or a forget barrier waits for a later one).
        self._reasons: dict[str, dict[str, float]] = {}
        self._keys: dict[str, dict[str, None]] = {}

    def __bool__(self) -> bool:
        return bool(self._reasons)

    def add(self, peer_id: str, reason: str, keys: Iterable[str], *, at: float) -> int:
        """Record a request; returns how many of ``keys`` were dropped past the bound."""
        self._reasons.setdefault(peer_id, {})[reason] = at
        pending = self._keys.setdefault(peer_id, {})
        dropped = 0
        for key in keys:
            if len(pending) < REQUESTED_KEYS_MAX:
                pending[key] = None
            elif key not in pending:
                dropped += 1
        return dropped

    def keep(self, peer_id: str, key: str) -> None:
        """Keep ``key`` pending: a repair fetched it and our store would not hold it."""
        self._keys.setdefault(peer_id, {})[key] = None

    def ask_anchor(self, peer_id: str, *, at: float) -> None:
        self._reasons.setdefault(peer_id, {})["anchor"] = at

    def drop_anchor(self, peer_id: str) -> None:
        self._reasons.get(peer_id, {}).pop("anchor", None)

    def peers(self) -> set[str]:
        """The peers with a reason standing."""
        return {peer_id for peer_id, reasons in self._reasons.items() if reasons}

    def reasons(self, peer_id: str) -> list[str]:
        return sorted(self._reasons.get(peer_id, ()))

    def is_requested(self, peer_id: str, reason: str) -> bool:
        return reason in self._reasons.get(peer_id, {})

    def has_pending(self, peer_id: str) -> bool:
        reasons = self._reasons.get(peer_id, ())
        return bool(self._keys.get(peer_id)) or any(r in reasons for r in _SETS_KEYS_ASIDE)

    def pending_keys(self, peer_id: str) -> int:
        return len(self._keys.get(peer_id, {}))

    def keys_to_fetch(self, peer_id: str, budget: int) -> list[str]:
        """The keys named for ``peer_id``, oldest first, at most ``budget`` of them."""
        return list(self._keys.get(peer_id, {}))[:budget]

    def settle(
        self,
        peer_id: str,
        taken: Sequence[str],
        repair: PeerRepair,
        *,
        has_record: bool,
        began: float,
    ) -> None:
        """After a repair that ended without error: forget the keys it fetched (if every one
        landed), then the reasons asked before it ``began``, if it was conclusive."""
        pending = self._keys.get(peer_id)
        if pending and not repair.items_refused and not repair.items_corrupt:
            for key in taken:
                pending.pop(key, None)
        reasons = self._reasons.get(peer_id, {})
        if pending or not _is_conclusive(repair, reasons, has_record=has_record):
            return
        self._keys.pop(peer_id, None)
        for reason in [r for r, at in reasons.items() if at <= began]:
            del reasons[reason]
        if not reasons:
            self._reasons.pop(peer_id, None)


def _is_conclusive(repair: PeerRepair, reasons: Mapping[str, float], *, has_record: bool) -> bool:
    """A request stands until its peer's claims were taken, or until nothing more can be had
    from it (a peer without a record: an engine that predates records), except a recovery's:
    it needs the claims, and a peer whose engine starts gets a record. An anchor asked for
    stands until a later repair takes it."""
    return (repair.complete and "anchor" not in reasons) or (
        is_complete(repair) and not has_record and "recovery" not in reasons
    )
