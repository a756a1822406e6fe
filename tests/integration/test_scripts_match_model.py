"""The Lua scripts decide exactly what the model of the mesh decides, on a real redis-server.

``tests/model/mesh_model.py`` runs deletes by knowledge through ``knowledge.decide`` and its
own line-by-line mirrors of the scripts' anchor, claim and collection logic; the property tests
judge the design on that model. These tests hold the scripts to it: random store states, claims
and remote batches go through ``apply_batch`` and must come out with the statuses and versions
the model gives; random sequences of stream batches and repairs must leave the same anchors and
claims; a collection must remove exactly the tombstones at or below the stable frontier and
leave the tree of a store that never held them; and a hypothesis state machine lives one
store's life (local writes, remote batches, repairs' claims) checking it against the model
after every step.

One server serves every example; each example gets its own key prefix.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from model.mesh_model import (
    Record,
    Source,
    Version,
    anchor_batch,
    inherit_claims,
)

from replication_engine import clock
from replication_engine.codec import Change, content_hash
from replication_engine.knowledge import ApplyStatus, decide, hlc_hex, sid_key
from replication_engine.merkle import MerkleModel
from replication_engine.store.protocol import StreamBatch
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisFactory, RedisHandle

SELF = "n-a"  # the store under test
ORIGINS = [SELF, "n-b", "n-c"]
PEERS = ["n-b", "n-c"]
KEYS = ["k0", "k1", "k2"]
# Few milliseconds and counters, so that versions tie on HLC and origin and the rest of the
# total order (tombstone over value, then the content hash) has to decide.
hlcs = st.builds(clock.pack, st.integers(1, 3), st.integers(0, 2))
claim_values = st.just(0) | hlcs
versions = st.tuples(
    st.sampled_from(KEYS),
    hlcs,
    st.sampled_from(ORIGINS),
    st.none() | st.sampled_from([b"p", b"q"]),  # None: a tombstone
)
VersionSpec = tuple[str, int, str, bytes | None]
EXAMPLE_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_prefixes: Iterator[int] = itertools.count()


@pytest.fixture
def server(redis_factory: RedisFactory) -> RedisHandle:
    """One redis-server for all the examples of a test."""
    return redis_factory()


def _change(spec: VersionSpec) -> Change:
    key, hlc, origin, value = spec
    if value is None:
        return Change.delete(key, hlc=hlc, origin=origin)
    return Change.put(key, value, hlc=hlc, origin=origin)


def _version(change: Change) -> Version:
    return Version(change.hlc, change.origin, change.tombstone, change.content_hash)


def _model_apply(
    held: dict[str, Version], changes: Sequence[Change], claims: dict[str, int]
) -> list[ApplyStatus]:
    """What the apply path must do, item by item, in order: ``knowledge.decide``."""
    statuses = []
    for change in changes:
        remote, local = _version(change), held.get(change.key)
        status = decide(local, remote, claims.get(change.origin, 0))
        if status is ApplyStatus.APPLIED:
            held[change.key] = remote
        statuses.append(status)
    return statuses


async def _stored(store: RedisStore) -> dict[str, Version]:
    return {c.key: _version(c) async for c in store.versions()}


def _root(held: dict[str, Version]) -> str:
    return MerkleModel.build({k: v.digest(k) for k, v in held.items()}).root


async def _open(url: str) -> RedisStore:
    """A store of node ``SELF`` under a prefix no other example uses, its record open."""
    store = await RedisStore.connect(url, node_id=SELF, prefix=f"m{next(_prefixes)}:")
    await store.open_record(mode="mesh", relay=False)
    return store


# ---------------------------------------------------------------------------- the apply rule


@EXAMPLE_SETTINGS
@given(
    initial=st.lists(versions, max_size=8),
    claims=st.dictionaries(st.sampled_from(ORIGINS), claim_values),
    batch=st.lists(versions, min_size=1, max_size=10),
)
def test_apply_batch_gives_the_statuses_and_versions_of_knowledge_decide(
    server: RedisHandle,
    initial: list[VersionSpec],
    claims: dict[str, int],
    batch: list[VersionSpec],
) -> None:
    asyncio.run(_check_apply(server.url, initial, claims, batch))


async def _check_apply(
    url: str, initial: list[VersionSpec], claims: dict[str, int], batch: list[VersionSpec]
) -> None:
    store = await _open(url)
    try:
        held: dict[str, Version] = {}
        first = [_change(spec) for spec in initial]
        assert await store.apply_batch(first, relay=False) == _model_apply(held, first, {})
        record = await store.record()
        assert record is not None
        # Claims about other origins come in the way a complete repair brings them. The claim
        # about this store's own writes comes only from certification, which follows the
        # store clock; to reach every value relative to the versions, it is written directly.
        taken = await store.inherit(
            peer="n-b",
            token="inc.epoch.0",
            tail=sid_key(1, 0),
            incarnation=record.incarnation,
            cert=record.cert,
            claims=claims,
        )
        assert taken
        if SELF in claims:
            await store.redis.hset(store.keys.record, "self", hlc_hex(claims[SELF]))
        record = await store.record()
        assert record is not None
        assert {o: record.claim(o) for o in ORIGINS} == {o: claims.get(o, 0) for o in ORIGINS}
        changes = [_change(spec) for spec in batch]
        statuses = await store.apply_batch(changes, relay=False)
        assert statuses == _model_apply(held, changes, claims)
        assert await _stored(store) == held
        assert (await store.merkle_root()).hex() == _root(held)
    finally:
        await store.close()


def test_versions_that_tie_on_hlc_and_origin_are_ordered_as_the_model_orders_them(
    server: RedisHandle,
) -> None:
    """Tombstone over value, then the greater content hash; a replay of either is a duplicate."""
    asyncio.run(_check_ties(server.url))


async def _check_ties(url: str) -> None:
    hlc = clock.pack(2, 0)
    p, q = (
        Change.put("k", b"p", hlc=hlc, origin="n-b"),
        Change.put("k", b"q", hlc=hlc, origin="n-b"),
    )
    low, high = sorted([p, q], key=lambda c: c.content_hash)
    tomb = Change.delete("k", hlc=hlc, origin="n-b")
    store = await _open(url)
    try:
        held: dict[str, Version] = {}
        for sequence in ([low, high, low, tomb, high, tomb], [tomb, low, high]):
            for change in sequence:
                expected = _model_apply(held, [change], {})
                assert await store.apply_batch([change], relay=False) == expected
            assert await _stored(store) == held
        assert held["k"].tombstone
    finally:
        await store.close()


def test_an_older_version_with_the_same_content_is_skipped_as_decide_says(
    server: RedisHandle,
) -> None:
    asyncio.run(_check_same_content_older(server.url))


async def _check_same_content_older(url: str) -> None:
    store = await _open(url)
    try:
        newer = Change.put("k", b"p", hlc=clock.pack(3, 0), origin="n-b")
        older = Change.put("k", b"p", hlc=clock.pack(2, 0), origin="n-c")
        await store.apply_batch([newer], relay=False)
        expected = decide(_version(newer), _version(older), 0)
        assert expected is ApplyStatus.SKIPPED
        assert await store.apply_batch([older], relay=False) == [expected]
    finally:
        await store.close()


# ---------------------------------------------------------------------------- anchors, claims

positions = st.integers(0, 6)
batches = st.tuples(
    st.just("batch"),
    st.sampled_from(PEERS),
    st.sampled_from(["t1", "t2"]),
    positions,
    st.integers(0, 3),
    st.sampled_from("cfg"),
    st.dictionaries(st.sampled_from(ORIGINS), claim_values, max_size=3),
)
repairs = st.tuples(
    st.just("inherit"),
    st.sampled_from(PEERS),
    st.sampled_from(["t1", "t2"]),
    positions,
    st.just(0),
    st.just(""),
    st.dictionaries(st.sampled_from(ORIGINS), claim_values, max_size=3),
)
Step = tuple[str, str, str, int, int, str, dict[str, int]]


@EXAMPLE_SETTINGS
@given(steps=st.lists(batches | repairs, min_size=1, max_size=8))
def test_stream_batches_and_repairs_anchor_and_claim_as_the_model_does(
    server: RedisHandle, steps: list[Step]
) -> None:
    """apply.lua's anchor modes (c contiguous, f fresh, g gap, the token check, the contiguity
    check, the position an unanchored tailer is contiguous since) and inherit.lua's anchoring,
    against the model's mirrors of them."""
    asyncio.run(_check_anchors(server.url, steps))


async def _check_anchors(url: str, steps: list[Step]) -> None:
    store = await _open(url)
    model = Record(SELF)
    try:
        for kind, peer, token, start, length, mode, claims in steps:
            if kind == "batch":
                first, last = sid_key(start, 0), sid_key(start + length, 0)
                await store.take_stream_claims(StreamBatch(peer, token, first, last, mode, claims))
                anchor_batch(model, Source(peer, token, first, last, mode, claims))
            else:
                record = await store.record()
                assert record is not None
                tail = sid_key(start, 0)
                taken = await store.inherit(
                    peer=peer,
                    token=token,
                    tail=tail,
                    incarnation=record.incarnation,
                    cert=record.cert,
                    claims=claims,
                )
                assert taken == inherit_claims(model, peer, token, tail, claims)
            record = await store.record()
            assert record is not None
            assert dict(record.anchors) == model.anchors
            assert dict(record.claims) == model.claims
            assert record.self_claim == 0  # never taken from a peer
    finally:
        await store.close()


# ---------------------------------------------------------------------------- collection


def test_collection_removes_exactly_the_tombstones_at_or_below_the_frontier(
    server: RedisHandle,
) -> None:
    asyncio.run(_check_collection(server.url))


async def _check_collection(url: str) -> None:
    stable = clock.pack(2, 1)
    changes = [
        Change.delete("old-delete", hlc=clock.pack(1, 0), origin="n-b"),
        Change.delete("at-the-frontier", hlc=stable, origin="n-c"),
        Change.delete("same-ms-later", hlc=clock.pack(2, 2), origin="n-b"),
        Change.delete("new-delete", hlc=clock.pack(3, 0), origin="n-c"),
        Change.put("old-value", b"v", hlc=clock.pack(1, 0), origin="n-b"),
        Change.put("value", b"w", hlc=clock.pack(2, 0), origin=SELF),
    ]
    survivors = [c for c in changes if not (c.tombstone and c.hlc <= stable)]
    store = await _open(url)
    fresh = await _open(url)
    try:
        await store.apply_batch(changes, relay=False)
        record = await store.record()
        assert record is not None
        assert await store.collect_tombstones(stable, incarnation="another", cert=0) == -1
        assert len(await _stored(store)) == len(changes)  # a record that moved: nothing done
        collected = await store.collect_tombstones(
            stable, incarnation=record.incarnation, cert=record.cert
        )
        assert collected == len(changes) - len(survivors)
        assert await _stored(store) == {c.key: _version(c) for c in survivors}
        assert await store.tombstone_count() == sum(1 for c in survivors if c.tombstone)
        after = await store.record()
        assert after is not None and after.collected == stable
        await fresh.apply_batch(survivors, relay=False)
        assert await store.merkle_root() == await fresh.merkle_root()
        assert (await store.merkle_root()).hex() == _root(await _stored(fresh))
        assert (
            await store.collect_tombstones(stable, incarnation=record.incarnation, cert=record.cert)
            == 0
        )
    finally:
        await store.close()
        await fresh.close()


# ---------------------------------------------------------------------------- a store's life

# What the stateful test did, over all its examples: printed with -s, for the closing note.
LIFE_FIGURES: Counter[str] = Counter()


class StoreLife(RuleBasedStateMachine):
    """One store's life, step by step: local puts and deletes, remote batches whose versions
    tie, beat or trail what is held, claims taken from repairs. After every step the store
    holds what the pure rule (``knowledge.decide`` over ``knowledge.order``) says, its record
    claims what the model claims, and its root is the root of the model's tree.

    Remote HLCs are drawn around the store's own clock, so that they interleave with local
    writes instead of all trailing them.
    """

    url = ""  # set by the test: the server every example shares

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.store = self.run(_open(self.url))
        self.held: dict[str, Version] = {}
        self.claims: dict[str, int] = {}
        self.repairs = 0

    def run(self, step: Any) -> Any:
        return self.loop.run_until_complete(step)

    def near(self, offset: tuple[int, int]) -> int:
        """An HLC around the store clock's latest: ``offset`` is (ms, counter) added to it."""
        ms, counter = clock.unpack(self.store.clock.last)
        return clock.pack(max(ms + offset[0], 1), max(counter + offset[1], 0))

    @rule(key=st.sampled_from(KEYS), value=st.none() | st.sampled_from([b"p", b"q", b"r"]))
    def local_write(self, key: str, value: bytes | None) -> None:
        if value is None:
            hlc = self.run(self.store.delete(key))
            written = Version(hlc, SELF, True, "")
        else:
            hlc = self.run(self.store.put(key, value))
            written = Version(hlc, SELF, False, content_hash(value))
        # A local write is stamped after everything the store has seen: it always wins.
        assert decide(self.held.get(key), written, 0) is ApplyStatus.APPLIED
        self.held[key] = written
        LIFE_FIGURES["local " + ("delete" if value is None else "put")] += 1

    @rule(
        batch=st.lists(
            st.tuples(
                st.sampled_from(KEYS),
                st.tuples(st.integers(-2, 2), st.integers(-1, 1)),
                st.sampled_from([*PEERS, SELF]),
                st.none() | st.sampled_from([b"p", b"q", b"r"]),
            ),
            min_size=1,
            max_size=6,
        )
    )
    def remote_batch(self, batch: list[tuple[str, tuple[int, int], str, bytes | None]]) -> None:
        changes = [
            _change((key, self.near(offset), origin, value)) for key, offset, origin, value in batch
        ]
        statuses = self.run(self.store.apply_batch(changes, relay=False))
        assert statuses == _model_apply(self.held, changes, self.claims)
        LIFE_FIGURES.update(f"remote {status}" for status in statuses)

    @rule(
        claims=st.dictionaries(
            st.sampled_from(PEERS), st.tuples(st.integers(-2, 1), st.integers(0, 1)), max_size=2
        )
    )
    def repair_claims(self, claims: dict[str, tuple[int, int]]) -> None:
        """A complete repair from a peer hands over its claims; claims only ever rise."""
        taken = {origin: self.near(offset) for origin, offset in claims.items()}
        record = self.run(self.store.record())
        self.repairs += 1
        assert self.run(
            self.store.inherit(
                peer="n-b",
                token="inc.epoch.0",
                tail=sid_key(self.repairs, 0),
                incarnation=record.incarnation,
                cert=record.cert,
                claims=taken,
            )
        )
        for origin, hlc in taken.items():
            self.claims[origin] = max(self.claims.get(origin, 0), hlc)
        LIFE_FIGURES["repair claims"] += 1

    @invariant()
    def holds_what_the_model_holds(self) -> None:
        assert self.run(_stored(self.store)) == self.held
        record = self.run(self.store.record())
        assert {o: record.claim(o) for o in PEERS} == {o: self.claims.get(o, 0) for o in PEERS}
        assert self.run(self.store.merkle_root()).hex() == _root(self.held)
        LIFE_FIGURES["checks"] += 1

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        LIFE_FIGURES["examples"] += 1


def test_a_store_lives_as_the_model_says(server: RedisHandle) -> None:
    StoreLife.url = server.url
    LIFE_FIGURES.clear()
    run_state_machine_as_test(
        StoreLife,
        settings=settings(
            max_examples=int(os.environ.get("LWW_EXAMPLES", "60")),
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture],
        ),
    )
    print(f"\nstore life vs model: {dict(sorted(LIFE_FIGURES.items()))}")
    # Every kind of outcome happened at least once, or the test proved less than it says.
    for what in ("remote applied", "remote skipped", "remote stale", "remote known"):
        assert LIFE_FIGURES[what], f"no {what} in {dict(LIFE_FIGURES)}"
