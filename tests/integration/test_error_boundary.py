"""Every public coroutine of the store raises only the package's errors when Redis fails it.

An embedder writes ``except ReplicationError`` (or one of its subclasses) around the store's
API; a redis-py class escaping through it would be an error that code cannot name. Each failure
Redis can hand the store is made for real on a redis-server: the server stopped (nothing
answers), an ACL user without the rights the store needs, a key of the wrong type. The
redis-py error stays reachable as ``__cause__``.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from replication_engine import ReplicationError, StoreUnavailableError
from replication_engine.store.redis_store import (
    RedisStore,
    StoreAccessError,
    StoreError,
    StoreKeyError,
)
from replication_engine.testing import RedisFactory, find_redis_server
from replication_engine.testing.redis_proc import redis_server_version

HAS_FUNCTIONS = redis_server_version(find_redis_server())[0] >= 7
PREFIX = "t:"

# The store's public API (README, "Embedding"), each called with arguments that reach Redis.
CALLS: dict[str, Callable[[RedisStore], Awaitable[Any]]] = {
    "check_geometry": lambda s: s.check_geometry(),
    "put": lambda s: s.put("k", b"v"),
    "put_many": lambda s: s.put_many([("k", b"v", "binary"), ("j", b"w", "binary")]),
    "delete": lambda s: s.delete("k"),
    "get": lambda s: s.get("k"),
    "get_version": lambda s: s.get_version("k"),
    "merkle_root": lambda s: s.merkle_root(),
    "stream_tail": lambda s: s.stream_tail(),
    "record": lambda s: s.record(),
    "versions": lambda s: _drain(s.versions()),
    "items": lambda s: _drain(s.items()),
}


async def _drain(iterator: Any) -> list[Any]:
    return [item async for item in iterator]


def test_the_calls_cover_every_public_coroutine_of_the_store() -> None:
    """A public coroutine added to RedisStore without a place here would go unchecked; the
    engine's own steps (apply, certify, collect...) are not the embedder's API and say so by
    being listed here as such."""
    engine_steps = {
        "add_to_record",
        "apply_batch",
        "apply_prepared",
        "certify",
        "claim_all_writes",
        "collect_tombstones",
        "deep_check",
        "discard_versions",
        "inherit",
        "load_functions",
        "oldest_tombstone_ms",
        "open_record",
        "prepare",
        "raise_clock",
        "scrub",
        "should_accept_writes",
        "stray_page",
        "take_stream_claims",
        "tombstone_count",
        "verify_items",
        "heal",
        "close",
    }
    public = {
        name
        for name, fn in inspect.getmembers(RedisStore)
        if not name.startswith("_")
        and (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn))
    }
    public.discard("connect")  # checked on its own below
    assert public - engine_steps == set(CALLS)


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_a_stopped_redis_is_a_retryable_store_unavailable_error(
    redis_factory: RedisFactory, name: str
) -> None:
    server = redis_factory()
    store = await RedisStore.connect(server.url, node_id="a", prefix=PREFIX)
    try:
        server.stop()
        with pytest.raises(ReplicationError) as caught:
            await CALLS[name](store)
        assert isinstance(caught.value, StoreUnavailableError), repr(caught.value)
        assert caught.value.retryable
        assert caught.value.__cause__ is not None  # redis-py's own error, for the traceback
    finally:
        await store.close()


async def test_connect_to_a_stopped_redis_is_a_store_unavailable_error(
    redis_factory: RedisFactory,
) -> None:
    server = redis_factory()
    server.stop()
    with pytest.raises(StoreUnavailableError) as caught:
        await RedisStore.connect(server.url, node_id="a", prefix=PREFIX)
    assert caught.value.retryable


async def test_wrong_credentials_are_a_store_access_error_that_waiting_cannot_fix(
    redis_factory: RedisFactory,
) -> None:
    server = redis_factory()
    server.client().execute_command("ACL", "SETUSER", "app", "on", ">right", "~*", "+@all")
    with pytest.raises(StoreAccessError) as caught:
        await RedisStore.connect(
            server.url, node_id="a", prefix=PREFIX, username="app", password="wrong"
        )
    assert not caught.value.retryable
    assert "wrong" not in str(caught.value)


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_a_user_without_the_rights_gets_a_store_access_error(
    redis_factory: RedisFactory, name: str
) -> None:
    """A user that may connect but read nothing beyond what connect needs (the geometry, the
    partition's meta, the clock and the library's version), and run nothing else."""
    server = redis_factory()
    admin = await RedisStore.connect(server.url, node_id="a", prefix=PREFIX)
    await admin.close()  # records the geometry
    server.client().execute_command(
        "ACL",
        "SETUSER",
        "app",
        "on",
        ">pw",
        f"~{admin.keys.meta}",
        f"~{admin.keys.hlc}",
        f"~{admin.keys.part_meta}",
        "+hgetall",
        "+hset",
        "+get",
        "+client",
        "+info",
        *(["+fcall"] if HAS_FUNCTIONS else []),  # 6.2 has no FCALL to allow
    )
    store = await RedisStore.connect(
        server.url, node_id="a", prefix=PREFIX, username="app", password="pw"
    )
    try:
        if name == "check_geometry":
            pytest.skip("the user is given what check_geometry needs, so that connect works")
        with pytest.raises(ReplicationError) as caught:
            await CALLS[name](store)
        assert isinstance(caught.value, StoreAccessError), repr(caught.value)
        assert not caught.value.retryable
    finally:
        await store.close()


async def test_a_wrong_typed_key_is_a_store_key_error_naming_it(
    redis_factory: RedisFactory,
) -> None:
    server = redis_factory()
    store = await RedisStore.connect(server.url, node_id="a", prefix=PREFIX)
    try:
        await store.put("k", b"v")
        item_key = store.keys.item("k")
        server.client().delete(item_key)
        server.client().set(item_key, "not a hash")
        with pytest.raises(StoreError) as caught:
            await store.get("k")
        assert isinstance(caught.value, StoreError)
        with pytest.raises(StoreKeyError):
            await store.put("k", b"w")
    finally:
        await store.close()
