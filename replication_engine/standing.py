"""A node's standing in the mesh after an absence, and what follows from it (pure, no I/O).

DESIGN.md invariant 3: deletes are tombstones, collected after ``local.tombstone_grace_sec``.
Once a peer has collected a tombstone, nothing in the mesh remembers the delete. A node that
was away for longer than the grace can still hold the value that was deleted. The apply path
applies a value for a key it does not hold, so if a peer's cold path pulled that value back,
the deleted key would come back to life. Each engine therefore keeps a *standing record* in its
own Redis (``Pmesh``, see docs/FORMAT.md) with these fields:

- ``contact_ms``: the last time this node was in contact with the mesh (reading a peer).
- ``state``: absent while the node is in the mesh. Otherwise it is ``verifying``,
  ``needs_rebootstrap`` or ``rebootstrapping``, with ``since_ms`` and a human ``reason``.
  ``confirmed`` is ``0`` for a ``needs_rebootstrap`` that no evidence confirms yet, and
  ``1`` for one that evidence confirms. A stream gap is evidence; a peer that cannot be
  reached is not.

Peers read the record before they pull anything from the node. They do not pull while the node
says it is stale, or while its last contact is older than the grace. That second rule covers a
node whose engine is not running, while its Redis, holding old data, answers. This module
decides from records and clocks; :mod:`replication_engine.rebootstrap` reads and writes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "IN_MESH",
    "NEEDS_REBOOTSTRAP",
    "REBOOTSTRAPPING",
    "STATES",
    "VERIFYING",
    "Standing",
    "absence_reason",
    "elected",
    "initial_state",
    "is_authority",
    "out_of_mesh_reason",
]

IN_MESH = "in_mesh"
# Away longer than the grace: data held back from peers until the peers' streams show that
# no delete was missed (no stream was trimmed past this node's cursor).
VERIFYING = "verifying"
# A delete may have been missed. The node waits for a peer that is in the mesh.
NEEDS_REBOOTSTRAP = "needs_rebootstrap"
# Copying from the mesh and discarding what the mesh deleted and collected.
REBOOTSTRAPPING = "rebootstrapping"
STATES = (IN_MESH, VERIFYING, NEEDS_REBOOTSTRAP, REBOOTSTRAPPING)
# Fields of the record that describe a stale state; cleared when the node is back in the mesh.
STATE_FIELDS = ("state", "since_ms", "reason", "confirmed")


@dataclass(frozen=True, slots=True)
class Standing:
    """One node's standing record as stored in its Redis.

    ``state`` is kept as written, so a state this version does not know (one written by a
    newer engine) still reads as "not in the mesh" rather than as fine.
    """

    contact_ms: int | None = None
    state: str = IN_MESH
    since_ms: int | None = None
    reason: str | None = None
    confirmed: bool = True

    @property
    def in_mesh(self) -> bool:
        return self.state == IN_MESH

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Standing | None:
        """The record from a hash's fields; None when there is no record at all."""
        if not fields:
            return None
        return cls(
            contact_ms=_int(fields.get("contact_ms")),
            state=fields.get("state") or IN_MESH,
            since_ms=_int(fields.get("since_ms")),
            reason=fields.get("reason") or None,
            confirmed=fields.get("confirmed") != "0",
        )

    def as_fields(self) -> dict[str, str]:
        """Fields to write. An in-mesh record carries only ``contact_ms``: see STATE_FIELDS."""
        fields: dict[str, str] = {}
        if self.contact_ms is not None:
            fields["contact_ms"] = str(self.contact_ms)
        if not self.in_mesh:
            fields["state"] = self.state
            if self.since_ms is not None:
                fields["since_ms"] = str(self.since_ms)
            fields["reason"] = self.reason or ""
            fields["confirmed"] = "1" if self.confirmed else "0"
        return fields


def _int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None and raw != "" else None
    except ValueError:
        return None


def _seconds(ms: int) -> str:
    return f"{ms / 1000:.1f}s"


def out_of_mesh_reason(standing: Standing | None, now_ms: int, grace_ms: int) -> str | None:
    """Why nothing may be pulled from a node with this record; None when it may.

    A node without a record has never run an engine that writes one: an older engine version
    or a fresh store. It is pulled from as before. Refusing it would stop every mixed-version
    mesh from converging.
    """
    if standing is None:
        return None
    if not standing.in_mesh:
        return f"{standing.state}: {standing.reason}" if standing.reason else standing.state
    if standing.contact_ms is None:
        return None
    return absence_reason(now_ms - standing.contact_ms, grace_ms)


def absence_reason(absent_ms: int, grace_ms: int) -> str | None:
    """The reason text for an absence longer than the grace, or None for a shorter one."""
    if absent_ms <= grace_ms:
        return None
    return (
        f"last in contact with the mesh {_seconds(absent_ms)} ago, longer than the tombstone "
        f"grace ({_seconds(grace_ms)}): deletes may have been collected meanwhile"
    )


def is_authority(standing: Standing | None, now_ms: int, grace_ms: int) -> bool:
    """Whether a peer's data can stand for the mesh when this node re-bootstraps.

    That takes a record that says the peer is in the mesh and was in contact within the grace.
    A peer without a record (a fresh node) could be empty. Its absences do not show that
    deletes happened, so it never counts.
    """
    return (
        standing is not None
        and standing.contact_ms is not None
        and out_of_mesh_reason(standing, now_ms, grace_ms) is None
    )


def initial_state(
    own: Standing | None,
    fallback_contact_ms: int | None,
    now_ms: int,
    grace_ms: int,
    *,
    store_empty: bool,
) -> tuple[str, str | None]:
    """This node's state when its engine starts, and why.

    Args:
        own: the record in this node's Redis, which travels with the data: a Redis restored
            from an old backup carries that backup's contact time.
        fallback_contact_ms: when there is no record (an engine from before records), the last
            contact known from the cursor database.
        now_ms: wall clock.
        grace_ms: the tombstone grace.
        store_empty: an empty store holds nothing that could come back; it is never stale.

    Returns:
        ``(state, reason)``. A node with no known contact at all is taken as new (in the mesh):
        treating every unknown store as stale would make a fresh node with preloaded data
        throw that data away.
    """
    if store_empty:
        return IN_MESH, None
    if own is not None and own.state == REBOOTSTRAPPING:
        return NEEDS_REBOOTSTRAP, own.reason or "a re-bootstrap was left unfinished"
    if own is not None and own.state == NEEDS_REBOOTSTRAP and own.confirmed:
        return NEEDS_REBOOTSTRAP, own.reason or "a re-bootstrap was left unfinished"
    if own is not None and own.state in (VERIFYING, NEEDS_REBOOTSTRAP):
        return VERIFYING, own.reason or "a verification was left unfinished"
    contact = own.contact_ms if own is not None and own.contact_ms is not None else None
    if contact is None:
        contact = fallback_contact_ms
    if contact is None:
        return IN_MESH, None
    reason = absence_reason(now_ms - contact, grace_ms)
    if reason is not None:
        return VERIFYING, reason
    return IN_MESH, None


def elected(
    node_id: str,
    own_contact_ms: int | None,
    peers: Mapping[str, Standing | None],
    *,
    own_confirmed: bool = True,
) -> bool:
    """Whether this node becomes the reference when no node of the mesh is in it.

    A split longer than the grace can leave every node stale. Then there is no peer in the
    mesh to re-bootstrap from, and waiting would last forever. An election is held only when
    every peer's record was read and every peer needs a re-bootstrap too. A peer that is still
    verifying may yet clear itself. A node whose need is unconfirmed (it only lacked a peer to
    verify against) wins over one that saw a stream gap: the gap proves that deletes were
    lost there. Next, the node with the newest contact wins, and ties go to the smallest node
    id. The winner keeps its data and the others re-bootstrap from it. Deletes
    that the losers made and collected during the split can come back, because nothing
    remembers them any more.
    """
    candidates: list[tuple[bool, int, str]] = [(own_confirmed, -(own_contact_ms or 0), node_id)]
    for peer_id, standing in peers.items():
        if standing is None or standing.state not in (NEEDS_REBOOTSTRAP, REBOOTSTRAPPING):
            return False
        confirmed = standing.confirmed or standing.state == REBOOTSTRAPPING
        candidates.append((confirmed, -(standing.contact_ms or 0), peer_id))
    return min(candidates)[2] == node_id
