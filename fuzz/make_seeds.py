"""Regenerate the seed corpora under ``fuzz/corpus/<target>/``.

Seeds are small, realistic starting points: CDC entries captured from the Lua scripts of a real
store (so the fuzzer starts from what peers actually send), real zstd payloads, stream ids and
config snippets. Run it after a format change: ``python fuzz/make_seeds.py``. It needs a
``redis-server`` binary for the CDC seeds and says so if there is none.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import sys
from pathlib import Path

import zstandard

from replication_engine import clock, codec

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_cdc_decode import encode_fields

CORPUS = Path(__file__).parent / "corpus"
# Fixed so regenerated seeds are identical and reviewable.
SEED = 20240601


def _write(target: str, name: str, data: bytes) -> None:
    folder = CORPUS / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def _write_each(target: str, seeds: dict[str, bytes]) -> None:
    for name, data in seeds.items():
        _write(target, name, data)


def decompress_seeds() -> None:
    rnd = random.Random(SEED)
    _write("decompress", "raw_small", b"hello")
    _write("decompress", "json_compressed", codec.encode_payload(b'{"name": "ada", "n": 1}' * 20))
    _write("decompress", "magic_prefixed", codec.encode_payload(codec.ZSTD_MAGIC + b"raw value"))
    _write("decompress", "random_raw", rnd.randbytes(100))
    cobj = zstandard.ZstdCompressor(level=19).compressobj()
    bomb = b"".join(cobj.compress(bytes(1 << 20)) for _ in range(8)) + cobj.flush()
    _write("decompress", "zeros_8mib", bomb)  # inflates past the target's limit
    two = codec.encode_payload(b"a" * 100) + codec.encode_payload(b"b" * 100)
    _write("decompress", "two_frames", two)


def stream_id_seeds() -> None:
    _write_each(
        "stream_id",
        {
            "zero": b"0-0",
            "typical": b"1700000000000-5\n1700000000000-6",
            "ms_only": b"42\n42-0",
            "max": b"18446744073709551615-18446744073709551615\n18446744073709551615-0",
            "bad": b"1-2-3\n-5\n1-",
            "order": b"9-0\n10-0\n9-18446744073709551615",
        },
    )


def random_seeds(target: str, count: int, size: int) -> None:
    rnd = random.Random(f"{SEED}-{target}")
    for i in range(count):
        _write(target, f"random_{i}", rnd.randbytes(size))


async def _real_entries() -> list[tuple[bytes, dict[bytes, bytes]]]:
    from replication_engine.store.redis_store import RedisStore
    from replication_engine.testing import RedisProcess

    with RedisProcess() as server:
        store = await RedisStore.connect(server.url, node_id="node-a", prefix="app:")
        try:
            await store.put("user:1", b'{"name": "ada"}', content_type="json")
            await store.put("doc:big", b"lorem ipsum dolor " * 40, content_type="text")
            await store.put("magic", codec.ZSTD_MAGIC + b" looks compressed")
            await store.put("empty", b"")
            await store.delete("user:1")
            now = clock.pack(clock.wall_clock_ms(), 3)
            await store.apply_batch(
                [
                    codec.Change.put(
                        "ключ: with space",
                        b"relayed",
                        hlc=now,
                        origin="node-b",
                        trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                        version=9,
                    ),
                    codec.Change.delete("gone", hlc=now + 1, origin="node-c", version=2),
                ]
            )
            return list(await store.redis.xrange(store.keys.cdc))
        finally:
            await store.close()


def cdc_seeds() -> None:
    try:
        entries = asyncio.run(_real_entries())
    except Exception as exc:  # no redis-server here: fall back to encode_entry's output
        print(f"make_seeds: no real store ({exc!r}); CDC seeds come from codec.encode_entry")
        changes = [
            codec.Change.put("user:1", b'{"name": "ada"}', hlc=1 << 40, origin="node-a"),
            codec.Change.delete("user:1", hlc=(1 << 40) + 1, origin="node-a"),
        ]
        entries = [
            (b"1-%d" % i, {k.encode(): v for k, v in codec.encode_entry(c).items()})
            for i, c in enumerate(changes)
        ]
    for i, (sid, fields) in enumerate(entries):
        _write("cdc_decode", f"real_{i}", encode_fields(sid, fields))
    legacy = {  # a sync-engine writer: SHA-256 hash, no hlc/origin in meta
        b"op": b"PUT",
        b"key": b"legacy:1",
        b"data": b"v",
        b"hash": hashlib.sha256(b"v").hexdigest().encode(),
        b"meta": b'{"version":4,"updated_at":1700000000000,"content_type":"binary"}',
    }
    _write("cdc_decode", "legacy_sha256", encode_fields(b"1700000000000-0", legacy))
    random_seeds("cdc_decode", 2, 200)  # about half start odd: the structured form


CONFIGS = {
    "minimal.yaml": "local_node_id: node-a\n",
    "wrapped.yaml": "replication:\n  local_node_id: node-a\nother_program: {x: 1}\n",
    "peers.yaml": (
        "replication:\n  local_node_id: a\n  mode: mesh\n  local:\n"
        "    redis_url: redis://engine:secret@localhost:6379/0\n    prefix: 'app:'\n"
        "  settings:\n    merkle: {fanout: 256, depth: 2}\n"
        "  peers:\n    - {node_id: b, redis_url: 'rediss://b:6380/0', prefix: 'app:'}\n"
        "    - {node_id: c, redis_url: 'redis://c:6379/1'}\n"
        "  http: {listen: '0.0.0.0:9636'}\n"
    ),
    "bad_types.yaml": "local_node_id: [1, 2]\nmode: sideways\npeers: {}\n",
    "bad_yaml.yaml": "local_node_id: a\n  peers: - [\n",
    "aliases.yaml": "base: &b {node_id: b, redis_url: 'redis://b:1/0'}\n"
    "replication:\n  local_node_id: a\n  peers: [*b, *b]\n",
    "duplicate.yaml": "local_node_id: a\nlocal_node_id: b\n",
    "durations.yaml": "local_node_id: a\nsettings:\n  hot_path: {batch_timeout_s: 5ms}\n",
}


def config_seeds() -> None:
    example = Path(__file__).parent.parent / "deploy" / "compose" / "node-a.yaml"
    if example.exists():
        # First byte 0: the file form, no environment overrides (see fuzz_config.py).
        _write("config", "node-a.yaml", b"\x00" + example.read_bytes())
    for name, text in CONFIGS.items():
        _write("config", name, b"\x00" + text.encode())
    _write("config", "env_overrides.yaml", b"\x02\xff" + CONFIGS["peers.yaml"].encode())
    _write("config", "mapping_form.yaml", b"\x01" + CONFIGS["peers.yaml"].encode())


def http_head_seeds() -> None:
    _write_each(
        "http_head",
        {
            "probe": b"GET /ready HTTP/1.1\r\nHost: node-a:8080\r\nUser-Agent: kube-probe/1.30\r\n"
            b"Accept: */*\r\nConnection: close\r\n\r\n",
            "scrape": b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n"
            b"X-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n",
            "head_1_0": b"HEAD /status HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n",
            "post_body": b"POST /health HTTP/1.1\r\nContent-Length: 0005\r\n\r\n",
            "chunked": b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "bare_lf": b"GET /health HTTP/1.1\nHost: a\n\n",
            "http2": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        },
    )


def main() -> None:
    for target in (
        "decompress",
        "stream_id",
        "lag",
        "cdc_decode",
        "merkle_diff",
        "config",
        "http_head",
    ):
        shutil.rmtree(CORPUS / target, ignore_errors=True)
    decompress_seeds()
    stream_id_seeds()
    random_seeds("lag", 4, 64)
    cdc_seeds()
    random_seeds("merkle_diff", 4, 128)
    config_seeds()
    http_head_seeds()
    for folder in sorted(CORPUS.iterdir()):
        print(f"{folder.name}: {len(list(folder.iterdir()))} seeds")


if __name__ == "__main__":
    main()
