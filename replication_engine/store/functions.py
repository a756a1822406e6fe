"""The store's function library: the one write path, for this package and every other client.

``scripts/api.lua`` (after ``scripts/common.lua``) is loaded into Redis 7 as the Functions library
``replication_engine`` and called with ``FCALL``. Redis 6.2 has no functions, so there the same
code runs as one script, ``EVALSHA`` with the function's name as its first argument. Either way
the caller declares the item keys and the library decides everything else (docs/FORMAT.md,
"Functions").

The library carries a version (``re_version``). Loading replaces an older library and leaves a
newer one alone: a newer library keeps every function of the older ones, with the same
arguments, so an engine that is rolled back still writes through it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoPermissionError, RedisError, ResponseError

from replication_engine.wire import Wire

log = logging.getLogger(__name__)

LIBRARY = "replication_engine"
# Raise with every change to scripts/api.lua or scripts/common.lua that a loaded library must
# pick up; the test suite checks that it matches the source's LIBRARY_VERSION.
VERSION = 7
# Keys one call of a function may declare (MAX_KEYS_PER_CALL in scripts/api.lua).
MAX_KEYS_PER_CALL = 10_000


def _source(name: str) -> str:
    return (resources.files("replication_engine.store") / "scripts" / name).read_text()


def shared_source() -> str:
    """The code every script and the library share (``scripts/common.lua``)."""
    return _source("common.lua")


def script_source(name: str) -> str:
    """One of the store's scripts: the shared code, the check that the partition's slot is not
    migrating (``slot_moving`` in common.lua), the partition it works on (ARGV[1..3]), then
    the script's own body."""
    prologue = (
        "do local moving = slot_moving(ARGV[1]) if moving then return moving end end\n"
        "begin(ARGV[1], ARGV[2], ARGV[3])\n"
    )
    return f"{_source('common.lua')}\n{prologue}{_source(name)}"


def library_source() -> str:
    """The Functions library (Redis 7): the shared code and the API, registered by name."""
    register = (
        "local function register(name, callback, read_only)\n"
        "  redis.register_function{function_name = name, callback = callback,\n"
        "    flags = read_only and {'no-writes'} or {}}\n"
        "end\n"
    )
    return f"#!lua name={LIBRARY}\n{_source('common.lua')}\n{register}{_source('api.lua')}"


def fallback_source() -> str:
    """The same API as one script, for Redis 6.2: ARGV[1] names the function, the rest are its
    arguments."""
    register = (
        "local FUNCTIONS = {}\n"
        "local function register(name, callback) FUNCTIONS[name] = callback end\n"
    )
    dispatch = (
        "\nlocal fn = FUNCTIONS[ARGV[1]]\n"
        "if not fn then\n"
        "  return redis.error_reply('ERR no such function: ' .. tostring(ARGV[1]))\n"
        "end\n"
        "local args = {}\n"
        "for i = 2, #ARGV do args[i - 1] = ARGV[i] end\n"
        "return fn(KEYS, args)\n"
    )
    return f"{_source('common.lua')}\n{register}{_source('api.lua')}{dispatch}"


@dataclass(frozen=True, slots=True)
class Loaded:
    """What :func:`ensure_loaded` found and did."""

    functions: bool  # Redis 7 Functions; False: the EVALSHA fallback (Redis 6.2)
    version: int  # the library version now in Redis (ours, or a newer one left in place)
    # 'loaded', 'replaced', 'current', 'newer kept', 'not permitted' (this user may not call
    # functions) or 'script' (no functions: Redis 6.2)
    action: str


async def ensure_loaded(redis: Redis, key: str | None = None) -> Loaded:
    """Load (or upgrade) the library on a Redis 7; on Redis 6.2 there is nothing to load.

    The version is read with ``key`` declared (``re_version`` ignores its keys), so a cluster
    client asks the node that holds it; ``FUNCTION LOAD`` goes to every master.
    """
    declared = [key] if key is not None else []
    try:
        found = int(await redis.fcall("re_version", len(declared), *declared))
    except NoPermissionError:
        # A user that may not call functions cannot write through them either; its writes
        # are refused as they come, with Redis's own words.
        return Loaded(True, 0, "not permitted")
    except RedisError as exc:
        words = str(exc).lower()
        # Redis 6.2 has no functions: the server says so, or a cluster client, which checks
        # commands against the server's COMMAND list, does before sending.
        if "unknown command" in words or "doesn't exist in redis commands" in words:
            return Loaded(False, VERSION, "script")
        if not isinstance(exc, ResponseError) or "function not found" not in words:
            raise
        found = 0
    if found > VERSION:
        log.warning(
            "functions.newer_kept",
            extra={"library": LIBRARY, "loaded": found, "ours": VERSION},
        )
        return Loaded(True, found, "newer kept")
    if found == VERSION:
        return Loaded(True, VERSION, "current")
    await redis.function_load(library_source(), replace=True)
    action = "replaced" if found else "loaded"
    log.info("functions.loaded", extra={"library": LIBRARY, "version": VERSION, "action": action})
    return Loaded(True, VERSION, action)


class Api:
    """Calls the library's functions: ``FCALL`` on Redis 7, ``EVALSHA`` on Redis 6.2.

    With ``wire`` (built on ``redis``), an ``FCALL`` goes out on it, one write and one read,
    rather than through redis-py's pool: twice the puts a second from 64 concurrent writers,
    and a third less CPU in a writer process (README, "Measured": write path, replication
    lag). Its callers share it, pipelined in order; at most as many calls are in flight on it
    as the pool has connections, as the pool bounded them.
    """

    def __init__(self, redis: Redis, *, wire: Wire | None = None) -> None:
        self._redis = redis
        self._fallback = redis.register_script(fallback_source())
        self._functions = True
        self._wire = wire
        # Only a wire's calls take a slot; a cluster client (no wire) has no connection_pool.
        self._slots = asyncio.Semaphore(redis.connection_pool.max_connections if wire else 1)

    def use(self, loaded: Loaded) -> None:
        self._functions = loaded.functions

    def command(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
        """The raw command of one call, for a caller that sends it on a connection of its own
        (6.2: the whole script, as ``EVAL``, which needs nothing loaded)."""
        if self._functions:
            return ("FCALL", name, len(keys), *keys, *args)
        return ("EVAL", self._fallback.script, len(keys), *keys, name, *args)

    async def call(
        self, name: str, keys: Sequence[str], args: Sequence[Any], *, client: Any = None
    ) -> Any:
        """Call one function; with ``client`` (a pipeline), queue it there instead."""
        if self._functions and client is None and self._wire is not None:
            async with self._slots:
                return await self._wire.call(("FCALL", name, len(keys), *keys, *args))
        if self._functions:
            target = client if client is not None else self._redis
            return await target.fcall(name, len(keys), *keys, *args)
        return await self._fallback(keys=list(keys), args=[name, *args], client=client)

    @property
    def in_flight(self) -> int:
        """Calls sent on the wire and not answered yet."""
        return self._wire.in_flight if self._wire is not None else 0

    def close(self) -> None:
        """Close the wire's connection, if any (the client's are closed with the client)."""
        if self._wire is not None:
            self._wire.close()
