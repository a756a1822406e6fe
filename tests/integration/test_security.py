"""Security end to end on real redis-server processes: TLS with verification, least-privilege
ACL users, and secrets that never leak into logs, errors, status or metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import shutil
import traceback
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import redis
from pydantic import SecretStr
from redis.exceptions import NoPermissionError

from replication_engine.config import EngineConfig
from replication_engine.connection import TlsOptions
from replication_engine.engine import EngineError, ReplicationEngine
from replication_engine.observability.logs import JsonFormatter, TextFormatter
from replication_engine.store.redis_store import RedisStore, StoreAccessError
from replication_engine.testing import (
    RedisFactory,
    RedisHandle,
    TlsFiles,
    async_wait_until,
    find_redis_server,
    make_test_ca,
    redis_server_version,
    redis_supports_tls,
)

PREFIX = "app:"
REPO = Path(__file__).resolve().parents[2]
ACL_TEMPLATE = REPO / "deploy" / "redis" / "users.acl"
# Deadline for replication and for failures to show up in status.
DEADLINE_S = 30.0

# Distinctive secrets: any occurrence in an output is a leak. They hold characters that URLs
# must percent-encode, so the encoded form is searched for too.
PEER_PASSWORD = "peer-S3cret/@:%-7b1f"
LOCAL_PASSWORD = "local-S3cret/@:%-c2d4"
WRONG_FIELD_PASSWORD = "wrong-field-S3cret-9e8a"
WRONG_URL_PASSWORD = "wrong-url-S3cret/@-4f3c"
REPLICATOR_PASSWORD = "replicator-S3cret-1a2b"
ENGINE_PASSWORD = "engine-S3cret-3c4d"
ADMIN_PASSWORD = "admin-S3cret-5e6f"


# ------------------------------------------------------------------------------------ helpers


def mesh_config(
    node_id: str, local_url: str, peers: Iterable[Mapping[str, Any]], cursor: Path, **extra: Any
) -> EngineConfig:
    data: dict[str, Any] = {
        "local_node_id": node_id,
        "local": {"redis_url": local_url, "prefix": PREFIX},
        "settings": {
            "hot_path": {"block_timeout_sec": 0.2},
            "cold_path": {
                "enabled": True,
                "interval_sec": 0.5,
                "backoff_base_sec": 0.2,
                "backoff_max_sec": 1.0,
                "root_cache_ttl_sec": 0.1,
            },
            "peer_health": {"ping_interval_sec": 0.5, "idle_threshold_sec": 0.5},
        },
        "peers": [
            {"circuit_failure_threshold": 2, "circuit_reset_timeout_sec": 0.5, **p} for p in peers
        ],
        "cursor": {"sqlite_path": str(cursor)},
        "http": {"enabled": False},
    }
    data.update(extra)
    return EngineConfig.model_validate(data)


@contextlib.asynccontextmanager
async def running(engine: ReplicationEngine) -> AsyncIterator[ReplicationEngine]:
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown(10.0)


async def holds_all(store: RedisStore, keys: Iterable[str]) -> bool:
    for key in keys:
        if await store.get(key) is None:
            return False
    return True


async def put_many(store: RedisStore, keys: Iterable[str]) -> list[str]:
    written = []
    for key in keys:
        await store.put(key, f"value of {key}".encode())
        written.append(key)
    return written


# ------------------------------------------------------------------------------------ TLS


@pytest.fixture
def two_cas(tmp_path: Path) -> tuple[TlsFiles, TlsFiles]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is needed to generate test certificates")
    if not redis_supports_tls(find_redis_server()):
        pytest.skip(f"{find_redis_server()} was built without TLS")
    return make_test_ca(tmp_path / "ca"), make_test_ca(tmp_path / "other-ca")


async def tls_store(server: RedisHandle, files: TlsFiles, node_id: str) -> RedisStore:
    return await RedisStore.connect(
        server.url, node_id=node_id, prefix=PREFIX, tls=TlsOptions(ca_file=str(files.ca_cert))
    )


async def test_two_nodes_replicate_both_ways_over_verified_tls(
    redis_factory: RedisFactory, tmp_path: Path, two_cas: tuple[TlsFiles, TlsFiles]
) -> None:
    ca, _ = two_cas
    servers = {n: redis_factory(tls=ca) for n in ("a", "b")}
    assert all(s.url.startswith("rediss://") for s in servers.values())
    stores = {n: await tls_store(servers[n], ca, n) for n in servers}
    try:
        # Written before the engines start, so they arrive by snapshot bootstrap (cold path).
        early = {
            n: await put_many(stores[n], [f"early:{n}:{i}" for i in range(20)]) for n in stores
        }
        engines = {
            n: ReplicationEngine(
                mesh_config(
                    n,
                    servers[n].url,
                    [
                        {
                            "node_id": p,
                            "redis_url": servers[p].url,
                            "tls": {"ca_file": str(ca.ca_cert)},
                        }
                    ],
                    tmp_path / f"{n}.db",
                ),
                store=stores[n],
            )
            for n, p in (("a", "b"), ("b", "a"))
        }
        async with running(engines["a"]), running(engines["b"]):
            for n, p in (("a", "b"), ("b", "a")):
                await async_wait_until(
                    lambda n=n, p=p: holds_all(stores[n], early[p]),
                    timeout=DEADLINE_S,
                    message=f"{n} bootstrapped from {p}",
                )
            # Then by the hot path.
            late = {
                n: await put_many(stores[n], [f"late:{n}:{i}" for i in range(20)]) for n in stores
            }
            for n, p in (("a", "b"), ("b", "a")):
                await async_wait_until(
                    lambda n=n, p=p: holds_all(stores[n], late[p]),
                    timeout=DEADLINE_S,
                    message=f"{n} tailed {p}",
                )
                status = engines[n].status()["peers"][p]
                assert status["connected"] and status["last_error"] is None
                assert status["url"].startswith("rediss://")
            assert await stores["a"].merkle_root() == await stores["b"].merkle_root()
    finally:
        for store in stores.values():
            await store.close()


async def test_a_peer_certificate_from_another_ca_is_refused(
    redis_factory: RedisFactory, tmp_path: Path, two_cas: tuple[TlsFiles, TlsFiles]
) -> None:
    ca, other = two_cas
    peer = redis_factory(tls=ca)
    local = redis_factory()
    peer_store = await tls_store(peer, ca, "b")
    local_store = await RedisStore.connect(local.url, node_id="a", prefix=PREFIX)
    try:
        written = await put_many(peer_store, [f"k:{i}" for i in range(10)])
        engine = ReplicationEngine(
            mesh_config(
                "a",
                local.url,
                [{"node_id": "b", "redis_url": peer.url, "tls": {"ca_file": str(other.ca_cert)}}],
                tmp_path / "a.db",
            ),
            store=local_store,
        )
        async with running(engine):

            def refused() -> bool:
                status = engine.status()["peers"]["b"]
                return "CERTIFICATE_VERIFY_FAILED" in (status["last_error"] or "")

            await async_wait_until(
                refused,
                timeout=DEADLINE_S,
                message="a certificate-verification error in b's status",
            )
            await async_wait_until(
                lambda: engine.status()["peers"]["b"]["circuit"] == "open",
                timeout=DEADLINE_S,
                message="b's breaker open",
            )
            status = engine.status()["peers"]["b"]
            assert status["connected"] is False
            assert "certificate verify failed" in status["last_error"]
            assert engine.tailers["b"].stats.applied == 0
        assert not [k for k in written if await local_store.get(k) is not None]
        assert await local_store.merkle_root() != await peer_store.merkle_root()
    finally:
        await peer_store.close()
        await local_store.close()


async def test_mutual_tls_peer_accepts_the_engines_client_certificate_and_refuses_none(
    redis_factory: RedisFactory, tmp_path: Path, two_cas: tuple[TlsFiles, TlsFiles]
) -> None:
    ca, _ = two_cas
    assert ca.client_cert is not None and ca.client_key is not None
    mutual = dataclasses.replace(ca, require_client_cert=True)
    peer = redis_factory(tls=mutual)
    local = redis_factory()
    client_tls = TlsOptions(
        ca_file=str(ca.ca_cert), cert_file=str(ca.client_cert), key_file=str(ca.client_key)
    )
    peer_store = await RedisStore.connect(peer.url, node_id="b", prefix=PREFIX, tls=client_tls)
    local_store = await RedisStore.connect(local.url, node_id="a", prefix=PREFIX)
    try:
        written = await put_many(peer_store, [f"k:{i}" for i in range(10)])
        anonymous = ReplicationEngine(
            mesh_config(
                "a",
                local.url,
                [{"node_id": "b", "redis_url": peer.url, "tls": {"ca_file": str(ca.ca_cert)}}],
                tmp_path / "anonymous.db",
            ),
            store=local_store,
        )
        async with running(anonymous):
            await async_wait_until(
                lambda: anonymous.status()["peers"]["b"]["circuit"] == "open",
                timeout=DEADLINE_S,
                message="a peer without a client certificate refused",
            )
            status = anonymous.status()["peers"]["b"]
            assert status["connected"] is False and status["last_error"], status
            assert anonymous.tailers["b"].stats.applied == 0
        assert not [k for k in written if await local_store.get(k) is not None]
        with_cert = ReplicationEngine(
            mesh_config(
                "a",
                local.url,
                [
                    {
                        "node_id": "b",
                        "redis_url": peer.url,
                        "tls": {
                            "ca_file": str(ca.ca_cert),
                            "cert_file": str(ca.client_cert),
                            "key_file": str(ca.client_key),
                        },
                    }
                ],
                tmp_path / "with-cert.db",
            ),
            store=local_store,
        )
        async with running(with_cert):
            await async_wait_until(
                lambda: holds_all(local_store, written),
                timeout=DEADLINE_S,
                message="replication with a client certificate",
            )
            assert with_cert.status()["peers"]["b"]["connected"]
    finally:
        await peer_store.close()
        await local_store.close()


# ------------------------------------------------------------------------------------ ACL


def rendered_acl(path: Path) -> Path:
    """deploy/redis/users.acl with its placeholders replaced the way start-redis.sh does
    (``#<sha256 hex>`` of the real password), plus an admin user to read ACL LOG."""
    text = ACL_TEMPLATE.read_text()
    assert ">CHANGE_ME_REPLICATOR" in text and ">CHANGE_ME_ENGINE" in text
    version = redis_server_version(find_redis_server())[:2]
    if (7, 0) <= version < (7, 2):
        # As start-redis.sh does: CLIENT SETINFO exists from 7.2, and 7.0/7.1 refuse the name.
        text = text.replace(" +client|setinfo", "")
    if version < (7, 0):
        text = text.replace(" +fcall_ro", "")  # as start-redis.sh does: 6.2 has no FCALL_RO
    for placeholder, password in (
        (">CHANGE_ME_REPLICATOR", REPLICATOR_PASSWORD),
        (">CHANGE_ME_ENGINE", ENGINE_PASSWORD),
    ):
        text = text.replace(placeholder, "#" + hashlib.sha256(password.encode()).hexdigest())
    assert "CHANGE_ME" not in text
    text += f"user admin on >{ADMIN_PASSWORD} ~* &* +@all\n"
    path.write_text(text)
    return path


def admin(server: RedisHandle) -> redis.Redis:
    return redis.Redis(
        host=server.host,
        port=server.port,
        username="admin",
        password=ADMIN_PASSWORD,
        decode_responses=True,
    )


def denials(server: RedisHandle, user: str) -> list[dict[str, Any]]:
    with admin(server) as client:
        log = client.acl_log(count=1000)
    return [entry for entry in log if entry.get("username") == user]


async def test_a_read_only_replicator_user_is_enough_to_bootstrap_tail_and_repair(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    peer = redis_factory(aclfile=rendered_acl(tmp_path / "users.acl"))
    local = redis_factory()
    peer_store = await RedisStore.connect(
        peer.url, node_id="b", prefix=PREFIX, username="engine", password=ENGINE_PASSWORD
    )
    local_store = await RedisStore.connect(local.url, node_id="a", prefix=PREFIX)
    config = mesh_config(
        "a",
        local.url,
        [
            {
                "node_id": "b",
                "redis_url": peer.url,
                "username": "replicator",
                "password": REPLICATOR_PASSWORD,
                "start_from": "snapshot",
            }
        ],
        tmp_path / "a.db",
    )
    try:
        snapshot = await put_many(peer_store, [f"snap:{i}" for i in range(50)])
        engine = ReplicationEngine(config, store=local_store)
        async with running(engine):
            # Bootstrap: geometry, tree nodes and items read as the replicator.
            await async_wait_until(
                lambda: holds_all(local_store, snapshot),
                timeout=DEADLINE_S,
                message="bootstrap through the replicator user",
            )
            # Hot path: XINFO, XRANGE and XREAD.
            tailed = await put_many(peer_store, [f"tail:{i}" for i in range(20)])
            await async_wait_until(
                lambda: holds_all(local_store, tailed),
                timeout=DEADLINE_S,
                message="tailing through the replicator user",
            )
        # Cold path repair: the entries a misses are trimmed away, only the tree can bring them.
        missed = await put_many(peer_store, [f"missed:{i}" for i in range(30)])
        await peer_store.redis.xtrim(peer_store.keys.cdc, maxlen=1, approximate=False)
        engine = ReplicationEngine(config, store=local_store)
        async with running(engine):
            await async_wait_until(
                lambda: holds_all(local_store, missed),
                timeout=DEADLINE_S,
                message="cold-path repair through the replicator user",
            )
            assert (
                engine.metrics.registry.get_sample_value(
                    "replication_repair_items_applied_total", {"peer": "b"}
                )
                or 0
            ) > 0
            assert engine.tailers["b"].stats.gaps > 0
            status = engine.status()["peers"]["b"]
            assert status["connected"] and status["last_error"] is None, status
            assert engine.tailer_restarts == {}
        assert await local_store.merkle_root() == await peer_store.merkle_root()
        # Every command the peer reader sent was allowed: the ACL log holds no denial for it.
        assert denials(peer, "replicator") == []
    finally:
        await peer_store.close()
        await local_store.close()


async def test_the_replicator_user_cannot_write_and_each_attempt_is_logged_by_redis(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    peer = redis_factory(aclfile=rendered_acl(tmp_path / "users.acl"))
    peer_store = await RedisStore.connect(
        peer.url, node_id="b", prefix=PREFIX, username="engine", password=ENGINE_PASSWORD
    )
    await peer_store.put("k", b"owned by b")
    as_replicator = redis.Redis(
        host=peer.host, port=peer.port, username="replicator", password=REPLICATOR_PASSWORD
    )
    replicator_store = await RedisStore.connect(
        peer.url, node_id="b", prefix=PREFIX, username="replicator", password=REPLICATOR_PASSWORD
    )
    attempts = {
        "set": lambda: as_replicator.set(f"{PREFIX}x", b"1"),
        "hset": lambda: as_replicator.hset(f"{PREFIX}{{0}}item:k", "d", b"evil"),
        "xadd": lambda: as_replicator.xadd(f"{PREFIX}{{0}}cdc", {"op": b"DEL", "key": b"k"}),
        "del": lambda: as_replicator.delete(f"{PREFIX}{{0}}mk:root"),
        "xtrim": lambda: as_replicator.xtrim(f"{PREFIX}{{0}}cdc", maxlen=0),
        "eval": lambda: as_replicator.eval("return 1", 0),
        "flushall": lambda: as_replicator.flushall(),
        "config": lambda: as_replicator.config_set("appendonly", "no"),
    }
    try:
        assert as_replicator.hgetall(f"{PREFIX}{{0}}item:k")  # it can read
        # redis-py raises NoPermissionError exactly for a NOPERM reply (and drops the prefix).
        for attempt in attempts.values():
            with pytest.raises(NoPermissionError, match="no permissions"):
                attempt()
        # The store's own write path (a Lua script) is refused too, as the store's own error
        # with Redis's behind it, and nothing changed.
        for write in (replicator_store.put("k", b"overwritten"), replicator_store.delete("k")):
            with pytest.raises(StoreAccessError, match="no permissions") as caught:
                await write
            assert isinstance(caught.value.__cause__, NoPermissionError)
        item = await peer_store.get("k")
        assert item is not None and item.value == b"owned by b"
        # Redis reports every refused attempt in its ACL log, under the replicator user.
        refused = {entry["object"] for entry in denials(peer, "replicator")}
        assert {"set", "hset", "xadd", "del", "xtrim", "eval", "flushall"} <= refused, refused
        assert any(name.startswith("config") for name in refused), refused
        assert "evalsha" in refused or "eval" in refused
    finally:
        as_replicator.close()
        await replicator_store.close()
        await peer_store.close()


# ------------------------------------------------------------------------------------ secrets


def forms(secret: str) -> set[str]:
    return {secret, quote(secret, safe=""), quote(secret)}


def assert_no_secret(where: str, text: str) -> None:
    for secret in (PEER_PASSWORD, LOCAL_PASSWORD, WRONG_FIELD_PASSWORD, WRONG_URL_PASSWORD):
        for form in forms(secret):
            assert form not in text, f"a password ({secret[:8]}...) appears in {where}"


def url_with_password(server: RedisHandle, password: str, username: str = "") -> str:
    return f"redis://{username}:{quote(password, safe='')}@{server.host}:{server.port}/0"


async def test_no_password_leaks_into_logs_errors_status_or_metrics(
    redis_factory: RedisFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    peer = redis_factory(password=PEER_PASSWORD)
    local = redis_factory(password=LOCAL_PASSWORD)
    peer_store = await RedisStore.connect(
        url_with_password(peer, PEER_PASSWORD), node_id="b", prefix=PREFIX
    )
    config = mesh_config(
        "a",
        url_with_password(local, LOCAL_PASSWORD),
        [
            # Right password in the URL: works.
            {
                "node_id": "b",
                "redis_url": url_with_password(peer, PEER_PASSWORD),
                "start_from": "beginning",
            },
            # Wrong password in the password field: auth failures.
            {
                "node_id": "b-field",
                "redis_url": f"redis://{peer.host}:{peer.port}/0",
                "password": WRONG_FIELD_PASSWORD,
                "start_from": "beginning",
            },
            # Wrong password in the URL, with a user name: auth failures.
            {
                "node_id": "b-url",
                "redis_url": url_with_password(peer, WRONG_URL_PASSWORD, "default"),
                "start_from": "beginning",
            },
        ],
        tmp_path / "a.db",
        http={"enabled": True, "listen": "127.0.0.1:0"},
    )
    outputs: dict[str, str] = {}
    try:
        written = await put_many(peer_store, [f"k:{i}" for i in range(10)])
        engine = ReplicationEngine(config)  # builds its own store from the local URL
        async with running(engine):
            assert engine.store is not None
            await async_wait_until(
                lambda: holds_all(engine.store, written),  # type: ignore[arg-type]
                timeout=DEADLINE_S,
                message="replication with a password",
            )

            def auth_failed() -> bool:
                peers = engine.status()["peers"]
                return all(
                    "AuthenticationError" in (peers[p]["last_error"] or "")
                    for p in ("b-field", "b-url")
                )

            await async_wait_until(
                auth_failed, timeout=DEADLINE_S, message="authentication failures in status"
            )
            assert engine.http is not None
            async with aiohttp.ClientSession() as http:
                for path in ("/status", "/ready", "/metrics", "/health"):
                    async with http.get(engine.http.url + path) as response:
                        outputs[f"GET {path}"] = await response.text()
            outputs["status()"] = json.dumps(engine.status(), default=str)
            outputs["readiness()"] = json.dumps(engine.readiness(), default=str)
            outputs["metrics.render()"] = engine.metrics.render().decode()
            outputs["repr(config)"] = repr(engine.config)
            outputs["config.redacted_dict()"] = json.dumps(engine.config.redacted_dict())
            outputs["tailer errors"] = json.dumps(engine.tailer_errors)
        # A wrong local password: start fails, and says so without the password.
        wrong_local = config.model_copy(
            update={
                "local": config.local.model_copy(
                    update={"redis_url": url_with_password(local, WRONG_URL_PASSWORD)}
                )
            }
        )
        with pytest.raises(EngineError) as raised:
            await ReplicationEngine(wrong_local).start()
        assert "refused the user or password" in str(raised.value)
        outputs["start error (with causes)"] = "".join(traceback.format_exception(raised.value))
        outputs["start error repr"] = repr(raised.value)
        records = caplog.records
        assert any(r.name.startswith("replication_engine") for r in records)
        outputs["logs (JSON formatter)"] = "\n".join(JsonFormatter().format(r) for r in records)
        outputs["logs (text formatter)"] = "\n".join(TextFormatter().format(r) for r in records)
        outputs["logs (caplog text)"] = caplog.text
        outputs["log record args and extras"] = "\n".join(
            repr({k: v for k, v in vars(r).items() if k not in ("exc_info", "exc_text")})
            for r in records
        )
        for where, text in outputs.items():
            assert_no_secret(where, text)
        # The failures were logged, with the URL masked rather than dropped.
        assert "AuthenticationError" in outputs["logs (JSON formatter)"]
        assert "default:***@" in outputs["status()"]
    finally:
        await peer_store.close()


async def test_password_settings_win_over_wrong_passwords_in_the_urls(
    redis_factory: RedisFactory, tmp_path: Path
) -> None:
    """Both URLs carry a wrong password and the settings the right ones: the settings are used
    for the local store and the peer alike, and no password shows in status or the config."""
    peer = redis_factory(password=PEER_PASSWORD)
    local = redis_factory(password=LOCAL_PASSWORD)
    peer_store = await RedisStore.connect(
        url_with_password(peer, WRONG_URL_PASSWORD),
        node_id="b",
        prefix=PREFIX,
        password=PEER_PASSWORD,
    )
    config = mesh_config(
        "a",
        url_with_password(local, WRONG_URL_PASSWORD),
        [
            {
                "node_id": "b",
                "redis_url": url_with_password(peer, WRONG_URL_PASSWORD, "default"),
                "password": PEER_PASSWORD,
                "start_from": "beginning",
            }
        ],
        tmp_path / "a.db",
    )
    config = config.model_copy(
        update={"local": config.local.model_copy(update={"password": SecretStr(LOCAL_PASSWORD)})}
    )
    try:
        written = await put_many(peer_store, [f"k:{i}" for i in range(10)])
        engine = ReplicationEngine(config)  # builds its own store from the local URL
        async with running(engine):
            assert engine.store is not None
            await async_wait_until(
                lambda: holds_all(engine.store, written),  # type: ignore[arg-type]
                timeout=DEADLINE_S,
                message="replication with the passwords from the settings",
            )
            assert engine.status()["peers"]["b"]["last_error"] is None
            assert_no_secret("status()", json.dumps(engine.status(), default=str))
            assert_no_secret("repr(config)", repr(engine.config))
    finally:
        await peer_store.close()
