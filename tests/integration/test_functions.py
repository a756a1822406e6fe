"""The store's functions as other languages' clients call them (docs/FORMAT.md, "Functions").

Writes made with ``redis-cli`` and with a bare redis-py process (which never imports this
package) must replicate and read back through ``RedisStore.get`` as if written by the package;
a call that declares the wrong keys must be refused, saying why, with nothing written; and the
placement Lua computes must equal Python's for any key.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from harness.mesh import full_mesh, open_mesh
from replication_engine.merkle import Geometry, combine
from replication_engine.store import functions
from replication_engine.store.reader import TreeReader
from replication_engine.store.redis_store import RedisStore
from replication_engine.testing import RedisFactory, RedisHandle, find_redis_server
from replication_engine.testing.redis_proc import redis_server_version

PREFIX = "app:"
HAS_FUNCTIONS = redis_server_version(find_redis_server())[0] >= 7
needs_functions = pytest.mark.skipif(
    not HAS_FUNCTIONS, reason="Redis before 7.0 has no FCALL; the EVALSHA form is tested instead"
)


def redis_cli(handle: RedisHandle, *args: str) -> str:
    cli = shutil.which("redis-cli") or str(Path(find_redis_server()).with_name("redis-cli"))
    if not Path(cli).exists():
        pytest.skip("no redis-cli binary beside redis-server or on PATH")
    done = subprocess.run(
        [cli, "-h", handle.host, "-p", str(handle.port), *args],
        capture_output=True,
        timeout=30,
        check=True,
    )
    return done.stdout.decode()


@pytest.fixture
async def store(redis_server: RedisHandle) -> AsyncIterator[RedisStore]:
    opened = await RedisStore.connect(redis_server.url, node_id="a", prefix=PREFIX)
    yield opened
    await opened.close()


@needs_functions
async def test_redis_cli_writes_reads_and_deletes_an_item_that_replicates(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    async with open_mesh(redis_factory, tmp_path, full_mesh(["a", "b"]), prefix=PREFIX) as mesh:
        a, b = mesh["a"], mesh["b"]
        item = f"{PREFIX}{{0}}item:user:42"
        put = redis_cli(
            a.server, "FCALL", "re_put", "1", item, '{"name": "Ada"}', "application/json"
        )
        hlc, stream_id = put.split()
        assert len(hlc) == 16 and "-" in stream_id, put

        async def on_b() -> bool:
            got = await b.store.get("user:42")
            return got is not None and got.value == b'{"name": "Ada"}'

        await mesh.wait_for(on_b, timeout=20)
        got = await b.store.get("user:42")
        assert got is not None and (got.content_type, got.origin) == ("application/json", "a")
        read = redis_cli(a.server, "FCALL_RO", "re_get", "1", item).split("\n")
        assert read[:5] == ['{"name": "Ada"}', "raw", "application/json", hlc, "a"], read

        redis_cli(a.server, "FCALL", "re_del", "1", item)

        async def gone_on_b() -> bool:
            return await b.store.get("user:42") is None

        await mesh.wait_for(gone_on_b, timeout=20)
        assert redis_cli(a.server, "FCALL_RO", "re_get", "1", item).strip() == ""
        await mesh.wait_converged()


BARE_CLIENT = textwrap.dedent(
    """
    import sys
    import redis

    port, use_functions = int(sys.argv[1]), sys.argv[2] == "1"
    r = redis.Redis(port=port)
    keys = ["app:{0}item:bare:1", "app:{0}item:bare:2"]
    looks_zstd = b"\\x28\\xb5\\x2f\\xfd not really zstd"
    args = ["one", "text/plain", looks_zstd, "application/octet-stream"]
    if use_functions:
        r.fcall("re_put_many", 2, *keys, *args)
    else:
        sha = r.script_load(open(sys.argv[3]).read())
        r.evalsha(sha, 2, *keys, "re_put_many", *args)
    print("ok")
    """
)


async def test_a_client_that_never_imports_the_package_writes_items_that_replicate(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    script = tmp_path / "api.lua"
    script.write_text(functions.fallback_source())
    async with open_mesh(redis_factory, tmp_path, full_mesh(["a", "b"]), prefix=PREFIX) as mesh:
        a, b = mesh["a"], mesh["b"]
        use_functions = "1" if HAS_FUNCTIONS else "0"
        done = subprocess.run(  # noqa: ASYNC221 - a client process, waited for like redis-cli
            [sys.executable, "-c", BARE_CLIENT, str(a.server.port), use_functions, str(script)],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0 and done.stdout.strip() == b"ok", done
        await mesh.wait_converged()
        one, two = await b.store.get("bare:1"), await b.store.get("bare:2")
        assert one is not None and (one.value, one.content_type) == (b"one", "text/plain")
        # A plain value that starts like a zstd frame went in a raw frame, and comes back as is.
        assert two is not None and two.value == b"\x28\xb5\x2f\xfd not really zstd"
        raw = await a.store.redis.hget(a.store.keys.item("bare:2"), "d")
        assert isinstance(raw, bytes)
        assert zstandard.ZstdDecompressor().decompress(raw) == two.value


async def _call(store: RedisStore, name: str, keys: list[str], args: list[Any]) -> Any:
    return await store._api.call(name, keys, args)  # what any client sends, FCALL or EVALSHA


@pytest.mark.parametrize(
    ("keys", "args", "why"),
    [
        ([f"{PREFIX}{{1}}item:k"], ["v"], r"no store partition at app:\{1\}"),
        ([f"{PREFIX}{{0}}mk:ab"], ["v"], "is not an item key"),
        ([f"{PREFIX}item:k"], ["v"], "is not an item key"),
        (["other:{0}item:k"], ["v"], r"no store partition at other:\{0\}"),
        ([f"{PREFIX}{{0}}item:" + "x" * 4097], ["v"], "a key is 1..4096 bytes"),
        ([f"{PREFIX}{{0}}item:"], ["v"], "a key is 1..4096 bytes"),
        ([f"{PREFIX}{{0}}item:k"], [], "re_put takes 1 key"),
    ],
)
async def test_a_call_with_wrong_declared_keys_is_refused_saying_why_and_writes_nothing(
    store: RedisStore, keys: list[str], args: list[Any], why: str
) -> None:
    root, entries = await store.merkle_root(), await store.redis.xlen(store.keys.cdc)
    with pytest.raises(ResponseError, match=why):
        await _call(store, "re_put", keys, args)
    assert await store.merkle_root() == root
    assert await store.redis.xlen(store.keys.cdc) == entries
    assert await store.redis.keys("*item:k") == []


@needs_functions
async def test_a_writer_denied_exists_is_told_what_to_grant_not_told_to_retry(
    store: RedisStore, redis_server: RedisHandle
) -> None:
    """Every call first reads two never-written keys, to refuse while its slot migrates
    (docs/FORMAT.md); a caller whose ACL denies that read is told which grant it lacks, not
    sent to retry a migration that is not happening."""
    admin = Redis.from_url(redis_server.url)
    await admin.acl_setuser(
        "writer", enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-exists"]
    )
    writer = Redis.from_url(redis_server.url, username="writer", password="pw")
    try:
        with pytest.raises(
            ResponseError, match=r"can't run this command.*grant the caller EXISTS"
        ) as refused:
            await writer.fcall("re_put", 1, f"{PREFIX}{{0}}item:k", "v")
        assert "TRYAGAIN" not in str(refused.value)
        assert await admin.exists(f"{PREFIX}{{0}}item:k") == 0
    finally:
        await writer.aclose()
        await admin.aclose()


async def test_a_key_that_is_not_utf8_and_a_bad_hash_are_refused(store: RedisStore) -> None:
    not_utf8 = f"{PREFIX}{{0}}item:".encode() + b"\xff\xfe"
    with pytest.raises(ResponseError, match="not valid UTF-8"):
        await _call(store, "re_put", [not_utf8], ["v"])  # type: ignore[list-item]
    bad = [b"v", "nothex", "binary", "", "", ""]
    with pytest.raises(ResponseError, match="content hash"):
        await _call(store, "re_write", [store.keys.item("k")], bad)
    wrong_sha1 = [b"v", "0" * 40, "binary", "", "", ""]
    with pytest.raises(ResponseError, match="is not the SHA-1 of the payload"):
        await _call(store, "re_write", [store.keys.item("k")], wrong_sha1)
    with pytest.raises(ResponseError, match="must be valid UTF-8"):
        await _call(store, "re_put", [store.keys.item("k")], ["v", b"\xff\xfe"])
    assert await store.get("k") is None


async def test_a_batch_with_one_bad_key_writes_none_of_it(store: RedisStore) -> None:
    await store.redis.set(store.keys.item("wrong-type"), "a string")
    keys = [store.keys.item("fine"), store.keys.item("wrong-type")]
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await _call(store, "re_put_many", keys, ["1", "t", "2", "t"])
    assert await store.get("fine") is None and await store.redis.xlen(store.keys.cdc) == 0


async def test_a_store_of_many_partitions_refuses_a_key_declared_in_another_partition(
    redis_server: RedisHandle,
) -> None:
    """The library places by partition when a store has more than one (a layout this version
    of the engine does not create yet): the declared partition must be the key's."""
    geometry = Geometry(16, 2)
    redis = Redis.from_url(redis_server.url)
    try:
        loaded = await functions.ensure_loaded(redis)
        api = functions.Api(redis)
        api.use(loaded)
        for part in geometry.all_children():
            fields = geometry.as_fields() | {"partitions": "16", "part": part, "id": "a"}
            await redis.hset(f"{PREFIX}{{{part}}}meta", mapping=fields)  # type: ignore[arg-type]
        key = "user:7"
        home = geometry.leaf_path(key)[: geometry.width]
        elsewhere = next(p for p in geometry.all_children() if p != home)
        with pytest.raises(ResponseError, match=rf"belongs in partition \{{{home}\}}"):
            await api.call("re_put", [f"{PREFIX}{{{elsewhere}}}item:{key}"], ["v"])
        hlc, _ = await api.call("re_put", [f"{PREFIX}{{{home}}}item:{key}"], ["v"])
        leaf = await redis.hget(f"{PREFIX}{{{home}}}mk:{geometry.leaf_path(key)}", key)
        assert leaf is not None and len(hlc) == 16
    finally:
        await redis.aclose()


async def _hand_made_store(redis: Redis, geometry: Geometry, partitions: int) -> functions.Api:
    """A store laid out in ``partitions`` partitions, its metas written as an engine would."""
    loaded = await functions.ensure_loaded(redis)
    api = functions.Api(redis)
    api.use(loaded)
    parts = geometry.all_children() if partitions > 1 else ["0"]
    for part in parts:
        fields = geometry.as_fields() | {"partitions": str(partitions), "part": part, "id": "a"}
        await redis.hset(f"{PREFIX}{{{part}}}meta", mapping=fields)  # type: ignore[arg-type]
    return api


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=60, unique=True))
async def test_partition_roots_xor_to_the_root_of_the_same_items_in_one_partition(
    redis_factory: RedisFactory, keys: list[str]
) -> None:
    geometry = Geometry(16, 2)
    one, many = Redis.from_url(redis_factory().url), Redis.from_url(redis_factory().url)
    try:
        single = await _hand_made_store(one, geometry, 1)
        split = await _hand_made_store(many, geometry, 16)
        for i, key in enumerate(keys):
            # The same version on both sides: fixed hlc and updated_at, so equal leaf digests.
            args = [f"v{i}", hashlib.sha1(f"v{i}".encode()).hexdigest(), "t", f"{i + 1:016x}"]
            args += ["1", ""]
            await single.call("re_write", [f"{PREFIX}{{0}}item:{key}"], args)
            part = geometry.leaf_path(key)[: geometry.width]
            await split.call("re_write", [f"{PREFIX}{{{part}}}item:{key}"], args)
        roots = [await many.get(f"{PREFIX}{{{p}}}mk:root") for p in geometry.all_children()]
        combined = combine(r.decode() for r in roots if isinstance(r, bytes))
        whole = await one.get(f"{PREFIX}{{0}}mk:root")
        assert isinstance(whole, bytes) and combined == whole.decode()
    finally:
        await one.aclose()
        await many.aclose()


async def test_loading_replaces_an_older_library_and_keeps_a_newer_one(
    redis_server: RedisHandle,
) -> None:
    if not HAS_FUNCTIONS:
        pytest.skip("Redis before 7.0 has no function libraries to load")
    redis = Redis.from_url(redis_server.url)
    try:
        older = (
            f"#!lua name={functions.LIBRARY}\n"
            "redis.register_function('re_version', function() return 0 end)"
        )
        await redis.function_load(older.replace("return 0", "return -1"), replace=True)
        assert (await functions.ensure_loaded(redis)).action == "replaced"  # an older one
        assert (await functions.ensure_loaded(redis)).action == "current"
        newer = older.replace("return 0", f"return {functions.VERSION + 1}")
        await redis.function_load(newer, replace=True)
        kept = await functions.ensure_loaded(redis)
        assert (kept.action, kept.version) == ("newer kept", functions.VERSION + 1)
    finally:
        await redis.aclose()


def test_the_library_version_in_python_is_the_one_in_the_lua_source() -> None:
    assert f"local LIBRARY_VERSION = {functions.VERSION}\n" in functions.library_source()
    assert f"local MAX_KEYS_PER_CALL = {functions.MAX_KEYS_PER_CALL}\n" in (
        functions.library_source()
    )


async def test_a_call_of_too_many_keys_is_refused_and_put_many_splits_its_batch(
    store: RedisStore,
) -> None:
    many = [store.keys.item(f"k{i}") for i in range(functions.MAX_KEYS_PER_CALL + 1)]
    with pytest.raises(ResponseError, match="keys in one call; at most"):
        await _call(store, "re_put_many", many, ["v", "t"] * len(many))
    assert await store.redis.xlen(store.keys.cdc) == 0
    writes = [(f"k{i}", b"v", "t") for i in range(functions.MAX_KEYS_PER_CALL + 1)]
    assert len(set(await store.put_many(writes))) == len(writes)


PLACE = "\nlocal out = {}\nfor i = 4, #ARGV do out[#out + 1] = path_of(ARGV[i]) end\nreturn out\n"
keys = st.one_of(
    st.text(min_size=1, max_size=64),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=300),
    st.binary(min_size=1, max_size=64).map(lambda b: b.decode("latin-1")),
    st.integers(1, 4096).map(lambda n: "k" * n),
    st.integers(1, 1024).map(lambda n: "\u00e9" * n),  # two bytes each: up to 2048 bytes
)
geometries = st.sampled_from(
    [
        Geometry(256, 2),
        Geometry(16, 3),
        Geometry(2, 4),
        Geometry(8, 3),
        Geometry(65536, 2),
        Geometry(32, 1),
    ]
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(geometry=geometries, batch=st.lists(keys, min_size=1, max_size=20))
async def test_lua_places_every_key_where_python_does(
    redis_server: RedisHandle, geometry: Geometry, batch: list[str]
) -> None:
    batch = [k for k in batch if 0 < len(k.encode("utf-8")) <= 4096]
    redis = Redis.from_url(redis_server.url)
    try:
        source = f"{functions.shared_source()}\nbegin(ARGV[1], ARGV[2], ARGV[3])\n{PLACE}"
        got = await redis.eval(
            source, 0, "p{0}", f"{geometry.fanout}/{geometry.depth}", "a", *batch
        )
        assert [g.decode() for g in got] == [geometry.leaf_path(k) for k in batch]
    finally:
        await redis.aclose()


async def _calls(redis: Redis, command: str) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_the_cold_path_reads_many_hashes_in_one_call_and_the_same_without_the_function(
    store: RedisStore,
) -> None:
    """A peer's tree and items are read with one ``re_hashes`` call per batch; a server that
    cannot run it (6.2, an older library, a user without FCALL_RO) gets a pipeline of
    ``HGETALL``s and the reader returns exactly the same."""
    await store.put_many([(f"k{i}", f"value {i}".encode(), "text") for i in range(40)])
    await store.delete("k3")
    keys = [f"k{i}" for i in range(40)] + ["never-written"]
    geometry = store.geometry
    paths = ["", *geometry.all_children()]

    one_call = TreeReader(store.redis, store.keys)
    fcalls = await _calls(store.redis, "fcall_ro")
    by_function = (await one_call.items(keys), await one_call.nodes(paths))
    if HAS_FUNCTIONS:
        assert one_call.counter.round_trips == 2
        assert await _calls(store.redis, "fcall_ro") == fcalls + 2
        await store.redis.function_delete(functions.LIBRARY)  # as on a peer with an older one

    pipelined = TreeReader(store.redis, store.keys)
    hgetalls = await _calls(store.redis, "hgetall")
    by_pipeline = (await pipelined.items(keys), await pipelined.nodes(paths))
    assert await _calls(store.redis, "hgetall") == hgetalls + len(keys) + len(paths)
    assert pipelined.counter.round_trips == 2
    assert by_pipeline == by_function
    assert pipelined.counter.bytes_read == one_call.counter.bytes_read
    items, nodes = by_function
    assert items[-1] is None and items[3] is not None and items[3].tombstone
    assert [c.value for c in items[:3] if c is not None] == [b"value 0", b"value 1", b"value 2"]
    assert nodes[0] and sum(len(n) for n in nodes[1:]) > 0


@needs_functions
async def test_re_hashes_returns_each_hash_and_refuses_arguments(store: RedisStore) -> None:
    await store.put("user:1", b"Ada", content_type="text")
    item = store.keys.item("user:1")
    reply = await store.redis.fcall_ro("re_hashes", 2, item, store.keys.item("absent"))
    first = dict(zip(reply[0][::2], reply[0][1::2], strict=True))
    assert first == await store.redis.hgetall(item) and reply[1] == []
    with pytest.raises(ResponseError, match="re_hashes takes no arguments"):
        await store.redis.fcall_ro("re_hashes", 1, item, "extra")


@needs_functions
@pytest.mark.parametrize(
    "body",
    [
        "return 42",
        "return {1, 2}",
        "return {{'a', 'b', 'c'}}",
        "return redis.error_reply('ERR no')",
    ],
)
async def test_a_re_hashes_that_is_not_ours_changes_nothing_the_reader_returns(
    store: RedisStore, body: str
) -> None:
    """A peer's operator can register any function of that name: whatever it answers, the
    reader reads with the built-in commands instead and returns what they give."""
    await store.put_many([(f"k{i}", f"value {i}".encode(), "text") for i in range(5)])
    keys = [f"k{i}" for i in range(5)]
    expected = await TreeReader(store.redis, store.keys).items(keys)
    await store.redis.function_delete(functions.LIBRARY)
    await store.redis.function_load(
        "#!lua name=impostor\n"
        f"redis.register_function{{function_name = 're_hashes', callback = function() {body} end,"
        " flags = {'no-writes'}}"
    )
    reader = TreeReader(store.redis, store.keys)
    assert await reader.items(keys) == expected
    hgetalls = await _calls(store.redis, "hgetall")
    assert await reader.items(keys) == expected
    assert await _calls(store.redis, "hgetall") == hgetalls + len(keys), "pipelined from then on"
