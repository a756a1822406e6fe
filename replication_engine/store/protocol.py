"""What the engine needs from a store, and the types a store and its callers share.

The engine drives a store through these protocols; :class:`RedisStore` implements all of
them. A store must apply each change atomically, decide by last-writer-wins on
``(hlc, origin)`` with the tiebreak of :func:`replication_engine.knowledge.order`, and keep its
record (claims, anchors, certification; docs/DELETES.md) in the same atomic steps as its data.

- :class:`Store`: what the hot and cold paths need (apply, read, the record).
- :class:`RecordKeeper`: what membership needs besides (certify, collect tombstones...); the
  engine runs only on a store that has it.
- :class:`Scrubbable`: what the background scrub needs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from replication_engine.codec import Change
from replication_engine.knowledge import ApplyStatus

if TYPE_CHECKING:
    from replication_engine.clock import HLC
    from replication_engine.knowledge import NodeRecord
    from replication_engine.merkle import Geometry
    from replication_engine.store.layout import Keyspace
    from replication_engine.store.reader import TreeReader

__all__ = [
    "ApplyResult",
    "Certification",
    "DeepCheck",
    "Item",
    "PreparedApply",
    "RecordKeeper",
    "Scrubbable",
    "Store",
    "StreamBatch",
    "UnreadableItem",
]


# ---------------------------------------------------------------------------- shared types


@dataclass(frozen=True, slots=True)
class Item:
    """A live value as the store's API returns it."""

    key: str
    value: bytes
    content_hash: str
    hlc: int
    origin: str
    content_type: str


@dataclass(frozen=True, slots=True)
class StreamBatch:
    """Where a batch came from, so the store can anchor itself in that stream and take the
    claims it proves (docs/DELETES.md, "Claims", way 2).

    ``first`` and ``last`` are fixed-width stream ids (``knowledge.sid_key``); ``mode`` is
    ``c`` (read on from the cursor), ``f`` (read from the start of a stream never trimmed),
    ``g`` (entries were missed before this batch) or ``n`` (``c``, sent while the batch before
    it may not be applied yet: applied only if the anchor shows that one applied, see
    ``ApplyResult.out_of_turn``); ``claims`` are raised only when the store's anchor shows the
    stream was applied contiguously.
    """

    peer: str
    token: str
    first: str
    last: str
    mode: str
    claims: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PreparedApply:
    """A batch packed for the apply script (see :meth:`RedisStore.prepare_apply`)."""

    size: int  # changes in the batch, accepted or not
    accepted: list[int]  # their indexes that go to the script (the rest are REJECTED)
    newest: int  # the greatest HLC among the accepted changes
    items: list[list[Any]]  # one script item per accepted change, its data left out
    chunks: list[tuple[int, int, bytes]]  # (start, end) into items, packed; bounded in bytes
    relay: bool  # whether the script re-emits applied versions on this node's stream
    data: list[bytes] = field(default_factory=list)  # each item's stored payload, sent apart


@dataclass(slots=True)
class ApplyResult:
    """Statuses in the order of the changes, and why each REFUSED one was refused."""

    statuses: list[ApplyStatus]
    refused: dict[int, str] = field(default_factory=dict)
    # With a tailer's batch: whether the store is anchored in the peer's stream after it
    # (docs/DELETES.md, "Claims"); None without one.
    anchored: bool | None = None
    # A batch sent behind another (mode ``n``) that the store had not applied: nothing of it
    # was applied (every status REJECTED), and it is to be sent again in its turn.
    out_of_turn: bool = False


@dataclass(frozen=True, slots=True)
class Certification:
    """What the certify script found (see :meth:`RedisStore.certify`)."""

    outcome: str  # ok (trusted), moved (may have lost writes), absent (no record)
    run_id: str
    recorded_run_id: str
    cert: int
    self_claim: int
    clock: int  # the store clock after the call
    server_ms: int = 0  # the Redis server's own clock (TIME) during the call; 0: not known


@dataclass(frozen=True, slots=True)
class UnreadableItem:
    """A stored item whose payload does not verify (or whose fields do not parse)."""

    key: str
    fields: Mapping[bytes, bytes]  # as stored, for the quarantine
    version: tuple[int, str] | None  # (hlc, origin) when those fields still parse
    why: str


@dataclass(slots=True)
class DeepCheck:
    """What a deep check found: items whose stored bytes do not verify, and keys under the
    prefix that the format does not define or that have the wrong type. Samples are bounded;
    the counts are not."""

    items: int = 0
    unreadable: int = 0
    stray: int = 0
    unreadable_sample: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    stray_sample: list[tuple[str, str]] = field(default_factory=list)  # (Redis key, why)

    @property
    def clean(self) -> bool:
        return not self.unreadable and not self.stray


# ---------------------------------------------------------------------------- protocols


@runtime_checkable
class Store(Protocol):
    node_id: str
    geometry: Geometry
    keys: Keyspace
    reader: TreeReader

    @property
    def applies_in_order(self) -> bool:
        """Whether ``apply_prepared`` calls made one after another reach Redis in that order
        (one connection), so that a caller gains by not waiting for one before the next."""
        ...

    async def put(self, key: str, value: bytes | str, content_type: str = ...) -> int: ...
    async def delete(self, key: str) -> int: ...
    async def get(self, key: str) -> Item | None: ...
    async def merkle_root(self) -> bytes: ...
    def items(self) -> AsyncIterator[Item]: ...
    async def apply_batch(
        self, changes: Sequence[Change], *, relay: bool = True
    ) -> list[ApplyStatus]: ...
    def prepare_apply(
        self,
        changes: Sequence[Change],
        *,
        relay: bool = True,
        replaces: Mapping[int, tuple[int, str]] | None = None,
    ) -> PreparedApply: ...
    async def apply_prepared(
        self, prepared: PreparedApply, source: StreamBatch | None = None
    ) -> ApplyResult: ...
    async def should_accept_writes(self) -> bool: ...
    async def record(self) -> NodeRecord | None: ...
    async def inherit(
        self,
        *,
        peer: str,
        token: str,
        tail: str,
        incarnation: str,
        cert: int,
        claims: Mapping[str, int],
    ) -> int: ...
    async def discard_versions(
        self, versions: Sequence[tuple[str, int, str]], *, incarnation: str, cert: int
    ) -> int: ...
    async def add_to_record(
        self, *, members: Iterable[str] = ..., forgotten: Iterable[str] = ...
    ) -> tuple[frozenset[str], frozenset[str]]: ...
    async def close(self) -> None: ...


@runtime_checkable
class Scrubbable(Protocol):
    """What the background scrub reads: payloads re-hashed under a subtree, stray keys."""

    node_id: str
    geometry: Geometry

    async def verify_items(self, under: str) -> tuple[int, list[UnreadableItem]]: ...
    async def stray_page(self, cursor: int) -> tuple[int, list[tuple[str, str]]]: ...
    def leaf_parents(self) -> list[str]: ...


@runtime_checkable
class RecordKeeper(Store, Scrubbable, Protocol):
    """A store that keeps its record as docs/DELETES.md says: certifies its own writes,
    takes part in membership and collects tombstones by knowledge."""

    clock: HLC
    read_only: bool
    max_batch_bytes: int
    writes_paused: str | None  # why local writes wait (the HLC floor being restored), or None
    writes_refused: str | None  # why local writes are refused for good (a forgotten node)

    async def open_record(self, *, mode: str, relay: bool) -> tuple[str, str, str]: ...
    async def certify(
        self,
        *,
        expected_run: str,
        expected_nonces: Sequence[str],
        nonce: str,
        advance: bool,
        new_epoch: str = ...,
        state: str,
        reason: str = ...,
    ) -> Certification: ...
    async def raise_clock(self, hlc: int) -> int: ...
    async def claim_all_writes(
        self, origins: Iterable[str], *, incarnation: str, cert: int
    ) -> bool: ...
    async def tombstone_count(self) -> int: ...
    async def oldest_tombstone_ms(self) -> int | None: ...
    async def collect_tombstones(
        self, stable: int, *, incarnation: str, cert: int, limit: int = ...
    ) -> int: ...
    async def scrub(self, parent: str, *, fix: bool) -> int: ...
