"""The convergence judge: final per-node states against every write the workload made.

Every node must hold the same versions, every key the last-writer-wins winner of the
acknowledged writes (or a newer unacknowledged one that did land); no acknowledged write is
lost unless superseded, no deleted key is resurrected, and no version appears that no write
explains. "Winner" and "superseded" are the package's own order (``knowledge.order``, through
:func:`harness.mesh.version_order`), the rule the store's scripts apply.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from harness.mesh import Unacknowledged, Version, Write, version_order

__all__ = ["Judgement", "judge", "unexplained_drops"]


@dataclass(frozen=True, slots=True)
class Judgement:
    """What :func:`judge` found; ``ok`` only when every list of problems is empty."""

    keys: int
    acknowledged: int
    unacknowledged: int
    unacknowledged_landed: int  # final versions explained only by an unacknowledged write
    lost: list[str]  # acknowledged writes neither held nor superseded
    resurrections: list[str]  # keys whose acknowledged winner is a delete but that hold a value
    phantoms: list[str]  # final versions that no write (acknowledged or not) explains
    divergent: list[str]  # keys on which nodes disagree

    @property
    def ok(self) -> bool:
        return not (self.lost or self.resurrections or self.phantoms or self.divergent)


def judge(
    states: Mapping[str, Mapping[str, Version]],
    writes: Sequence[Write],
    unacknowledged: Sequence[Unacknowledged] = (),
    lost_to_operator: Collection[tuple[str, int, str]] = (),
) -> Judgement:
    """Check final per-node states (tombstones included) against the writes made.

    Every node must hold the same version of every key. That version must be the
    last-writer-wins winner (greatest in :func:`version_order`, the package's order) of the
    acknowledged writes of the key, or a newer version that an unacknowledged write of the
    same origin, key and value explains (a write whose reply was lost to a kill can still have
    landed). A key may also be gone from every node when that winner is a delete: its
    tombstone was collected (docs/DELETES.md). An
    acknowledged write is *lost* when the final version orders before it, or the key is gone
    while the winner is a value that no unacknowledged delete can have superseded; a
    *resurrection* is a key whose acknowledged winner is a delete but which holds an older
    value.

    ``lost_to_operator`` lists ``(key, hlc, origin)`` of acknowledged writes that only their
    origin's Redis held when an operator restored it from a backup, wiped it or removed the
    node for good: they may be gone, and the winner is judged among the other writes. They may
    also have survived: the engines run on while the fault is prepared, so a peer can read such
    a write after it was found held nowhere else, and before the store lost it. One that
    survived is held like any write, and an excused delete that survived may have been
    collected, taking the key with it.
    """
    excused = set(lost_to_operator)
    by_key: dict[str, list[Write]] = {}
    excused_deletes: dict[str, list[Write]] = {}
    for write in writes:
        if (write.key, write.hlc, write.node) not in excused:
            by_key.setdefault(write.key, []).append(write)
        elif write.value is None:
            excused_deletes.setdefault(write.key, []).append(write)
    maybe: set[tuple[str, str, bytes | None]] = {(u.node, u.key, u.value) for u in unacknowledged}
    acked_versions = {(w.key, w.node, w.hlc): w.value for w in writes}
    nodes = sorted(states)
    divergent: list[str] = []
    keys = set(by_key)
    for node in nodes:
        keys |= set(states[node])
    reference = states[nodes[0]] if nodes else {}
    for key in sorted(keys):
        seen = {node: states[node].get(key) for node in nodes}
        if len(set(seen.values())) > 1:
            divergent.append(f"{key}: " + ", ".join(f"{n}={_show(v)}" for n, v in seen.items()))
    lost: list[str] = []
    resurrections: list[str] = []
    phantoms: list[str] = []
    landed = 0
    for key in sorted(keys):
        final = reference.get(key)
        acked = by_key.get(key, [])
        winner = max(acked, key=lambda w: w.order) if acked else None
        if final is not None:
            value, hlc, origin = final
            if (key, origin, hlc) in acked_versions:
                if acked_versions[(key, origin, hlc)] != value:
                    phantoms.append(
                        f"{key}: holds {_show(final)}, written as "
                        f"{_show((acked_versions[(key, origin, hlc)], hlc, origin))}"
                    )
            elif (origin, key, value) in maybe:
                landed += 1
            else:
                phantoms.append(f"{key}: holds {_show(final)}, which no write explains")
        collected = final is None and (
            winner is None
            or winner.value is None
            or any(d.order > winner.order for d in excused_deletes.get(key, ()))
        )
        if (
            final is None
            and not collected
            and any(u.key == key and u.value is None for u in unacknowledged)
        ):
            landed += 1  # a delete whose reply was lost landed, and was collected since
            collected = True
        for write in acked:
            if collected:
                break
            if final is None or version_order(final) < write.order:
                lost.append(f"{key}: {_show(write.version)} lost; holds {_show(final)}")
        if (
            winner is not None
            and winner.value is None
            and final is not None
            and final[0] is not None
            and version_order(final) < winner.order
        ):
            resurrections.append(f"{key}: deleted at {_show(winner.version)}, holds {_show(final)}")
    return Judgement(
        keys=len(keys),
        acknowledged=len(writes),
        unacknowledged=len(unacknowledged),
        unacknowledged_landed=landed,
        lost=lost,
        resurrections=resurrections,
        phantoms=phantoms,
        divergent=divergent,
    )


def unexplained_drops(
    drops: Mapping[str, Iterable[tuple[str, int, str]]],
    writes: Sequence[Write],
    unacknowledged: Sequence[Unacknowledged] = (),
) -> list[str]:
    """Absence drops that no delete explains, per node: ``(key, hlc, origin)`` of the values
    each node dropped because a peer lacked the key while its claims covered the version.

    A peer lacks a version its claims cover only when a delete at or above it was collected
    there (docs/DELETES.md), so every such drop must sit below a delete of its key that the
    workload made (acknowledged, excused or not, or unacknowledged). One that does not is a
    claim that went too far: a version thrown away that was not dead. This catches it even
    where a later write of the key hides the loss from the final states.
    """
    deletes: dict[str, list[tuple[int, str]]] = {}
    for write in writes:
        if write.value is None:
            deletes.setdefault(write.key, []).append((write.hlc, write.node))
    maybe_deleted = {u.key for u in unacknowledged if u.value is None}
    problems = []
    for node in sorted(drops):
        for key, hlc, origin in sorted(drops[node]):
            if key in maybe_deleted or any(d >= (hlc, origin) for d in deletes.get(key, ())):
                continue
            problems.append(f"{node} dropped {key}@{hlc:016x}/{origin}, which no delete explains")
    return problems


def _show(version: Version | None) -> str:
    if version is None:
        return "nothing"
    value, hlc, origin = version
    what = "tombstone" if value is None else repr(value[:24])
    return f"{what}@{hlc:016x}/{origin}"
