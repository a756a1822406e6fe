"""CDC entries, payload compression, content hashes, stream ids and lag.

Every byte a peer sends passes through the codec first, so these tests pin both the happy path
(what a well-formed entry decodes to) and the contract for bad input: one error type,
:class:`CodecError`, with a ``reason`` the hot path can count by.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import tracemalloc
from typing import Any

import pytest
import zstandard

from replication_engine import clock
from replication_engine.codec import (
    COMPRESS_MIN_BYTES,
    MAX_KEY_BYTES,
    MAX_META_BYTES,
    STREAM_START,
    ZSTD_MAGIC,
    Change,
    CodecError,
    Op,
    StreamId,
    content_hash,
    decode_entry,
    decode_payload,
    encode_entry,
    encode_payload,
    lag_events,
    lag_ms,
    parse_stream_id,
    verify_hash,
)

HLC = clock.pack(1_700_000_000_000, 7)
MIB = 1 << 20
# Size the bomb inflates to: far beyond any limit a test passes, so a missing check would show.
BOMB_INFLATED_BYTES = 200 * MIB
_MAX_U64 = (1 << 64) - 1


def _incompressible(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _entry(**overrides: Any) -> dict[bytes, bytes]:
    """A valid PUT entry, with fields replaced (``None`` removes one)."""
    value = b"hello world"
    fields: dict[str, Any] = {
        "op": b"PUT",
        "key": b"user:1",
        "hash": content_hash(value).encode(),
        "data": value,
        "meta": json.dumps(
            {
                "version": 3,
                "updated_at": 1_700_000_000_000,
                "hlc": clock.to_hex(HLC),
                "origin": "node-b",
                "content_type": "json",
            }
        ).encode(),
    }
    fields.update(overrides)
    return {k.encode(): v for k, v in fields.items() if v is not None}


def _meta(**values: Any) -> bytes:
    return json.dumps(values).encode()


@pytest.fixture(scope="module")
def zstd_bomb() -> bytes:
    """200 MiB of zeros as one small zstd frame, built in chunks so the test itself stays small."""
    cobj = zstandard.ZstdCompressor(level=3).compressobj()
    chunk = bytes(MIB)
    parts = [cobj.compress(chunk) for _ in range(BOMB_INFLATED_BYTES // MIB)]
    parts.append(cobj.flush())
    bomb = b"".join(parts)
    assert bomb.startswith(ZSTD_MAGIC)
    assert len(bomb) < MIB  # a bomb: tiny on the wire
    return bomb


# ---------------------------------------------------------------------------- content hashes


def test_content_hash_is_xxh3_128_hex() -> None:
    digest = content_hash(b"abc")
    assert len(digest) == 32
    assert int(digest, 16) >= 0
    verify_hash(b"abc", digest)


def test_sha256_hash_is_accepted_in_either_case() -> None:
    digest = hashlib.sha256(b"abc").hexdigest()
    verify_hash(b"abc", digest)
    verify_hash(b"abc", digest.upper())


@pytest.mark.parametrize("hasher", ["xxh3", "sha256"])
def test_wrong_hash_is_hash_mismatch(hasher: str) -> None:
    wrong = content_hash(b"other") if hasher == "xxh3" else hashlib.sha256(b"other").hexdigest()
    with pytest.raises(CodecError) as info:
        verify_hash(b"abc", wrong)
    assert info.value.reason == "hash_mismatch"


@pytest.mark.parametrize("digest", ["", "abc", "0" * 31, "0" * 41, "0" * 65])
def test_hash_of_unknown_width_is_bad_hash(digest: str) -> None:
    with pytest.raises(CodecError) as info:
        verify_hash(b"abc", digest)
    assert info.value.reason == "bad_hash"


# ---------------------------------------------------------------------------- payloads


def test_small_payload_stays_raw() -> None:
    value = b"a" * (COMPRESS_MIN_BYTES - 1)
    assert encode_payload(value) == value
    assert encode_payload(b"") == b""


def test_payload_at_threshold_is_compressed_when_smaller() -> None:
    value = b"a" * COMPRESS_MIN_BYTES
    packed = encode_payload(value)
    assert packed.startswith(ZSTD_MAGIC)
    assert len(packed) < len(value)
    assert decode_payload(packed) == value


def test_large_incompressible_payload_stays_raw() -> None:
    value = _incompressible(4096)
    assert not value.startswith(ZSTD_MAGIC)
    assert encode_payload(value) == value


@pytest.mark.parametrize("size", [0, 1, 10, COMPRESS_MIN_BYTES - 1, COMPRESS_MIN_BYTES, 4096])
def test_payload_starting_with_magic_is_always_compressed(size: int) -> None:
    # Otherwise a raw value that begins with the magic would be mistaken for a frame.
    value = ZSTD_MAGIC + _incompressible(size, seed=size)
    packed = encode_payload(value)
    assert packed != value
    assert packed.startswith(ZSTD_MAGIC)
    assert decode_payload(packed) == value


def test_bare_magic_is_round_tripped() -> None:
    assert decode_payload(encode_payload(ZSTD_MAGIC)) == ZSTD_MAGIC


def test_decode_raw_payload_over_limit_is_too_large() -> None:
    with pytest.raises(CodecError) as info:
        decode_payload(b"x" * 11, max_size=10)
    assert info.value.reason == "too_large"


def test_decode_compressed_payload_at_limit_is_accepted() -> None:
    value = b"z" * 100_000
    assert decode_payload(encode_payload(value), max_size=len(value)) == value


def test_decode_invalid_zstd_is_bad_zstd() -> None:
    with pytest.raises(CodecError) as info:
        decode_payload(ZSTD_MAGIC + b"\x00garbage that is not a frame")
    assert info.value.reason == "bad_zstd"


@pytest.mark.parametrize("keep", [4, 9, -1])
def test_decode_truncated_frame_is_bad_zstd(keep: int) -> None:
    # A streaming reader treats the end of input as the end of the frame and returns a prefix.
    packed = encode_payload(b"q" * 10_000)
    with pytest.raises(CodecError) as info:
        decode_payload(packed[:keep])
    assert info.value.reason == "bad_zstd"


def test_entry_with_truncated_frame_is_rejected() -> None:
    """The bare magic inflates to b''; with the hash of b'' it must still not pass as a PUT."""
    with pytest.raises(CodecError):
        decode_entry(
            "1-0", _entry(data=ZSTD_MAGIC, hash=content_hash(b"").encode()), default_origin="p"
        )


def test_frame_that_fills_its_declared_size_before_its_end_is_rejected() -> None:
    # From fuzz/fuzz_decompress.py: the frame declares empty content and its block is
    # corrupt. A one-call decompress into the declared size returned b'' without reading the
    # block; the frame must be read to its end.
    frame = base64.b64decode("KLUv/SAADQBpKLUv/XJhdyD9cmF3IHZhbHVldmFsdWU=")
    assert zstandard.frame_content_size(frame) == 0
    with pytest.raises(CodecError) as info:
        decode_payload(frame)
    assert info.value.reason == "bad_zstd"


def test_decode_frame_with_trailing_garbage_is_an_error() -> None:
    with pytest.raises(CodecError):
        decode_payload(encode_payload(b"q" * 10_000) + b"junk")


def _with_declared_size(frame: bytes, declared: int) -> bytes:
    """Rewrite a frame header's content size field.

    Descriptor 0x80 means: 4-byte content size, a window byte before it, no dictionary id.
    """
    assert frame[4] == 0x80, f"unexpected frame descriptor {frame[4]:#x}"
    return frame[:6] + declared.to_bytes(4, "little") + frame[10:]


@pytest.fixture(scope="module")
def lying_bomb() -> bytes:
    """200 MiB of zeros whose header claims 100 bytes: the declared size must not be trusted."""
    cobj = zstandard.ZstdCompressor(level=3).compressobj(size=BOMB_INFLATED_BYTES)
    chunk = bytes(MIB)
    frame = b"".join(cobj.compress(chunk) for _ in range(BOMB_INFLATED_BYTES // MIB))
    frame += cobj.flush()
    assert zstandard.frame_content_size(frame) == BOMB_INFLATED_BYTES
    lie = _with_declared_size(frame, 100)
    assert zstandard.frame_content_size(lie) == 100
    return lie


def test_declared_size_over_limit_is_refused_up_front() -> None:
    frame = zstandard.ZstdCompressor().compress(b"a" * 5000)  # one-shot: size is declared
    assert zstandard.frame_content_size(frame) == 5000
    with pytest.raises(CodecError) as info:
        decode_payload(frame, max_size=4999)
    assert info.value.reason == "too_large"


def test_bomb_with_lying_header_is_refused_with_bounded_memory(lying_bomb: bytes) -> None:
    limit = MIB
    tracemalloc.start()
    try:
        with pytest.raises(CodecError):
            decode_payload(lying_bomb, max_size=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * limit, f"decoding a lying bomb peaked at {peak} bytes"


def test_zstd_bomb_is_refused_with_bounded_memory(zstd_bomb: bytes) -> None:
    limit = MIB
    tracemalloc.start()
    try:
        with pytest.raises(CodecError) as info:
            decode_payload(zstd_bomb, max_size=limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.reason == "too_large"
    assert peak < 2 * limit, f"decoding a bomb peaked at {peak} bytes with a {limit}-byte limit"


# ---------------------------------------------------------------------------- entries


@pytest.mark.parametrize(
    "key",
    ["k", "user:1", "a.b.c", "with space", "ключ", "emoji 🎉", "a:b.c d", "x" * MAX_KEY_BYTES],
)
@pytest.mark.parametrize(
    "value", [b"", b"v", b"x" * 1000, ZSTD_MAGIC, ZSTD_MAGIC + b"rest", _incompressible(300)]
)
def test_put_entry_round_trip(key: str, value: bytes) -> None:
    change = Change.put(
        key,
        value,
        hlc=HLC,
        origin="node-a",
        content_type="json",
        version=4,
        trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    decoded = decode_entry("1-1", encode_entry(change), default_origin="other")
    assert decoded.key == key
    assert decoded.value == value
    assert decoded.data == change.data
    assert decoded.hlc == HLC
    assert decoded.origin == "node-a"
    assert decoded.content_hash == change.content_hash
    assert decoded.content_type == "json"
    assert decoded.version == 4
    assert decoded.updated_at == clock.physical_ms(HLC)
    assert decoded.trace_parent == change.trace_parent
    assert decoded.stream_id == "1-1"
    assert not decoded.tombstone


def test_delete_entry_round_trip() -> None:
    change = Change.delete("gone:1", hlc=HLC, origin="node-a", version=9)
    fields = encode_entry(change)
    assert fields["op"] == b"DEL"
    assert "data" not in fields and "hash" not in fields
    decoded = decode_entry(b"5-0", fields, default_origin="other")
    assert decoded.tombstone
    assert decoded.op is Op.DEL
    assert (decoded.key, decoded.hlc, decoded.origin, decoded.version) == (
        "gone:1",
        HLC,
        "node-a",
        9,
    )
    assert decoded.value is None and decoded.data == b""


def test_text_fields_are_accepted_like_bytes() -> None:
    fields = {k.decode(): v.decode() for k, v in _entry().items()}
    assert decode_entry("1-0", fields, default_origin="p").key == "user:1"


def test_entry_with_sha256_hash_decodes() -> None:
    value = b"some content"
    change = decode_entry(
        "1-0",
        _entry(hash=hashlib.sha256(value).hexdigest().encode(), data=value),
        default_origin="p",
    )
    assert change.value == value
    assert len(change.content_hash) == 64


def test_entry_with_compressed_data_decodes_to_the_value() -> None:
    value = b"compressible " * 100
    fields = _entry(hash=content_hash(value).encode(), data=encode_payload(value))
    assert fields[b"data"].startswith(ZSTD_MAGIC)
    assert decode_entry("1-0", fields, default_origin="p").value == value


def test_entry_with_wrong_hash_is_hash_mismatch() -> None:
    with pytest.raises(CodecError) as info:
        decode_entry("1-0", _entry(hash=content_hash(b"different").encode()), default_origin="p")
    assert info.value.reason == "hash_mismatch"


def test_entry_payload_over_limit_is_too_large() -> None:
    value = b"a" * 1000
    fields = _entry(hash=content_hash(value).encode(), data=encode_payload(value))
    with pytest.raises(CodecError) as info:
        decode_entry("1-0", fields, default_origin="p", max_payload=999)
    assert info.value.reason == "too_large"


@pytest.mark.parametrize("op", [b"put", b"DELETE", b"", b"\xff", b"UPDATE"])
def test_unknown_op(op: bytes) -> None:
    with pytest.raises(CodecError) as info:
        decode_entry("1-0", _entry(op=op), default_origin="p")
    assert info.value.reason in ("unknown_op", "bad_encoding")


@pytest.mark.parametrize(
    ("missing", "reason"),
    [
        ("op", "missing_field"),
        ("key", "missing_field"),
        ("hash", "missing_field"),
        ("data", "missing_field"),
    ],
)
def test_missing_fields(missing: str, reason: str) -> None:
    with pytest.raises(CodecError) as info:
        decode_entry("1-0", _entry(**{missing: None}), default_origin="p")
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (b"", "bad_key"),
        (b"\xff\xfe", "bad_key"),
        (b"x" * (MAX_KEY_BYTES + 1), "bad_key"),
        (b"half \xe2\x82", "bad_key"),
    ],
)
def test_bad_keys(key: bytes, reason: str) -> None:
    with pytest.raises(CodecError) as info:
        decode_entry("1-0", _entry(key=key), default_origin="p")
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "meta",
    [
        b"{",
        b"not json",
        b"[1, 2]",
        b'"text"',
        b"null",
        b"\xff",
        b"[" * 5000,
        b'{"a": "' + b"x" * MAX_META_BYTES + b'"}',
    ],
)
def test_bad_meta_json(meta: bytes) -> None:
    with pytest.raises(CodecError) as info:
        decode_entry("1-0", _entry(meta=meta), default_origin="p")
    assert info.value.reason == "bad_meta"


@pytest.mark.parametrize(
    "meta",
    [
        {"version": -1},
        {"version": "3"},
        {"version": 1.5},
        {"version": True},
        {"updated_at": -5},
        {"updated_at": None},
        {"origin": ""},
        {"origin": 5},
        {"origin": "o" * 257},
        {"origin": "o" * 129},  # past the node id rule's 128
        {"origin": "../../x y"},  # no node can have it: no claim would ever cover it
        {"origin": "a,b"},
        {"trace_parent": 7},
        {"trace_parent": "t" * 513},
        {"content_type": ["json"]},
        {"hlc": "short"},
        {"hlc": "zzzzzzzzzzzzzzzz"},
    ],
)
def test_bad_meta_values(meta: dict[str, Any]) -> None:
    with pytest.raises(CodecError) as info:
        decode_entry("1-0", _entry(meta=_meta(**meta)), default_origin="p")
    assert info.value.reason == "bad_meta"
    # The message names the field and what it expected, not only that it was wrong.
    (name,) = meta
    assert str(info.value).startswith(f"meta.{name}"), info.value


def test_an_origin_is_said_to_need_a_node_id_and_a_trace_parent_its_bound() -> None:
    with pytest.raises(CodecError, match=r"meta\.origin must be a node id \(1-128 characters"):
        decode_entry("1-0", _entry(meta=_meta(origin="x" * 10_000)), default_origin="p")
    with pytest.raises(CodecError, match="at most 512 characters, got 2000"):
        decode_entry("1-0", _entry(meta=_meta(trace_parent="t" * 2000)), default_origin="p")


@pytest.mark.parametrize("hlc", [-1, -5, 1 << 64, 1 << 70, 1.5, None, [1], True])
def test_bad_meta_hlc_of_other_types(hlc: Any) -> None:
    """Counted as bad_meta, as a badly formed text HLC is: an integer out of range included."""
    with pytest.raises(CodecError) as info:
        decode_entry("1-0", _entry(meta=_meta(hlc=hlc)), default_origin="p")
    assert info.value.reason == "bad_meta"


def test_signed_hex_hlc_is_rejected_at_decode() -> None:
    """Accepted, -1 would only fail later (encode_entry, apply_batch), outside CodecError."""
    with pytest.raises(CodecError):
        decode_entry(
            "1-0", _entry(op=b"DEL", meta=_meta(hlc="-000000000000001")), default_origin="p"
        )


def test_meta_hlc_may_be_an_integer() -> None:
    change = decode_entry("1-0", _entry(meta=_meta(hlc=HLC)), default_origin="p")
    assert change.hlc == HLC


def test_entry_without_hlc_orders_by_updated_at_then_version() -> None:
    def decoded_hlc(updated_at: int, version: int) -> int:
        meta = _meta(updated_at=updated_at, version=version)
        return decode_entry("1-0", _entry(meta=meta), default_origin="p").hlc

    assert decoded_hlc(1_000, 2) == clock.pack(1_000, 2)
    assert decoded_hlc(1_000, 2) < decoded_hlc(1_000, 3) < decoded_hlc(1_001, 0)
    # A version past the 16-bit counter saturates rather than spilling into the ms part.
    assert decoded_hlc(1_000, 1 << 20) == clock.pack(1_000, clock.MAX_COUNTER)
    assert decoded_hlc(1 << 60, 0) == clock.pack(clock.MAX_MS, 0)


def test_entry_without_meta_uses_defaults_and_default_origin() -> None:
    change = decode_entry("1-0", _entry(meta=None), default_origin="peer-x")
    assert change.origin == "peer-x"
    assert change.hlc == 0
    assert change.version == 0
    assert change.content_type == "binary"


def test_delete_ignores_stray_data_and_hash() -> None:
    change = decode_entry("1-0", _entry(op=b"DEL", hash=b"nonsense"), default_origin="p")
    assert change.tombstone
    assert change.data == b"" and change.content_hash == ""


@pytest.mark.parametrize("fields", [None, [(b"op", b"PUT")], "op=PUT", {b"op": 5}, {1: b"PUT"}])
def test_non_mapping_or_non_bytes_fields(fields: Any) -> None:
    with pytest.raises(CodecError):
        decode_entry("1-0", fields, default_origin="p")


def test_bad_stream_id_in_entry() -> None:
    with pytest.raises(CodecError) as info:
        decode_entry("abc", _entry(), default_origin="p")
    assert info.value.reason == "bad_stream_id"


# ---------------------------------------------------------------------------- stream ids


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0-0", StreamId(0, 0)),
        ("1-2", StreamId(1, 2)),
        (b"1700000000000-5", StreamId(1_700_000_000_000, 5)),
        ("42", StreamId(42, 0)),
        (f"{_MAX_U64}-{_MAX_U64}", StreamId(_MAX_U64, _MAX_U64)),
    ],
)
def test_parse_stream_id(raw: str | bytes, expected: StreamId) -> None:
    assert parse_stream_id(raw) == expected
    assert StreamId.parse(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "-",
        "1-",
        "-1",
        "a-b",
        "1-2-3",
        "1 - 2",
        "+1-2",
        "1-0x2",
        "١-٢",
        "²-1",
        b"\xff-1",
        f"{_MAX_U64 + 1}-0",
        f"0-{_MAX_U64 + 1}",
        "1" * 21 + "-0",
        12,
        None,
    ],
)
def test_parse_stream_id_rejects(raw: Any) -> None:
    with pytest.raises(CodecError) as info:
        parse_stream_id(raw)
    assert info.value.reason == "bad_stream_id"


def test_stream_id_str_round_trip_and_order() -> None:
    ids = [StreamId(0, 0), StreamId(0, 1), StreamId(1, 0), StreamId(1, 10), StreamId(2, 3)]
    for sid in ids:
        assert parse_stream_id(str(sid)) == sid
    assert sorted(reversed(ids)) == ids
    # Stream order is numeric, which text order is not.
    assert parse_stream_id("9-0") < parse_stream_id("10-0")


def test_stream_id_next() -> None:
    assert StreamId(5, 5).next() == StreamId(5, 6)
    assert StreamId(5, _MAX_U64).next() == StreamId(6, 0)
    assert StreamId(0, 0).next() > StreamId(0, 0)
    with pytest.raises(CodecError):
        StreamId(_MAX_U64, _MAX_U64).next()


# ---------------------------------------------------------------------------- lag


def test_lag_ms_edges() -> None:
    assert lag_ms(StreamId(1, 0), None) == 0
    assert lag_ms(None, None) == 0
    assert lag_ms(None, StreamId(500, 0)) == 500
    assert lag_ms(StreamId(500, 3), StreamId(500, 3)) == 0
    assert lag_ms(StreamId(600, 0), StreamId(500, 0)) == 0
    assert lag_ms(StreamId(100, 0), StreamId(350, 9)) == 250
    assert lag_ms(StreamId(100, 0), StreamId(100, 9)) == 0  # behind, but within one ms


def test_lag_events_edges() -> None:
    first, last = StreamId(1_000, 0), StreamId(2_000, 0)
    assert lag_events(None, first, last, 0) == 0
    assert lag_events(None, None, None, 10) == 0
    assert lag_events(None, first, last, 10) == 10
    assert lag_events(STREAM_START, first, last, 10) == 10
    assert lag_events(last, first, last, 10) == 0
    assert lag_events(StreamId(3_000, 0), first, last, 10) == 0
    assert lag_events(first, first, last, 10) == 10
    assert lag_events(StreamId(1_500, 0), first, last, 10) == 5
    assert lag_events(StreamId(1_999, 9), first, last, 10) == 1  # never 0 while behind


def test_lag_events_single_ms_stream() -> None:
    first, last = StreamId(1_000, 0), StreamId(1_000, 9)
    assert lag_events(StreamId(1_000, 4), first, last, 10) == 5
    assert lag_events(StreamId(1_000, 4), first, last, 1) == 1
