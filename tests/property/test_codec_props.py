"""Codec invariants: round trips, and the one-error-type contract for anything a peer can send.

The hot path catches exactly :class:`CodecError` around decoding; any other exception escaping
``decode_entry`` would take a tailer down on a single bad entry, so that contract is checked
over arbitrary field maps, not only over the malformations someone thought of.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import zstandard
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from replication_engine import clock, codec
from replication_engine.codec import (
    ZSTD_MAGIC,
    Change,
    CodecError,
    StreamId,
    content_hash,
    decode_entry,
    decode_payload,
    encode_entry,
    encode_meta,
    encode_payload,
    lag_events,
    lag_ms,
    parse_stream_id,
)

U64 = (1 << 64) - 1

keys = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=60).filter(
    lambda k: len(k.encode("utf-8")) <= 4096
) | st.sampled_from(["a:b", "a.b", "a b", "user:1:name", "ключ", "🎉:x", " ", ":", "."])
values = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda b: ZSTD_MAGIC + b),
    st.binary(min_size=1, max_size=8).map(lambda b: b * 64),  # compressible
)
hlcs = st.integers(min_value=0, max_value=clock.MAX_HLC)
# Node ids, as an origin must be (any other text is refused as bad_meta).
origins = st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True)
trace_parents = st.none() | st.just("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
stream_ids = st.builds(StreamId, st.integers(0, U64), st.integers(0, U64))


@st.composite
def changes(draw: st.DrawFn) -> Change:
    key = draw(keys)
    hlc = draw(hlcs)
    origin = draw(origins)
    version = draw(st.integers(0, 1 << 40))
    if draw(st.booleans()):
        return Change.delete(key, hlc=hlc, origin=origin, version=version)
    return Change.put(
        key,
        draw(values),
        hlc=hlc,
        origin=origin,
        version=version,
        content_type=draw(st.sampled_from(["binary", "json", "text/plain"])),
        updated_at=draw(st.integers(0, 1 << 50)),
        trace_parent=draw(trace_parents),
    )


@given(changes(), stream_ids)
def test_entry_round_trip(change: Change, sid: StreamId) -> None:
    decoded = decode_entry(str(sid), encode_entry(change), default_origin="unused")
    change.stream_id = str(sid)
    if change.tombstone:
        # A tombstone has no content type on the wire; the decoder fills in the default.
        assert decoded.content_type == "binary"
        change.content_type = decoded.content_type
    assert decoded == change
    if not change.tombstone:
        assert decoded.value == change.value


@given(changes(), st.text(min_size=1, max_size=30), st.text(max_size=30))
def test_encoded_meta_is_the_meta_as_json(change: Change, origin: str, content_type: str) -> None:
    change.origin, change.content_type = origin, content_type  # any text, quotes and all
    assert json.loads(encode_meta(change)) == change.meta()


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """zstd frames as a peer might send them: whole, cut, with a byte changed, padded, doubled,
    with or without a checksum and a declared size."""
    repeated = st.binary(min_size=1, max_size=8).map(lambda b: b * 300)
    value = draw(st.binary(max_size=2000) | repeated)
    frame = zstandard.ZstdCompressor(
        level=draw(st.integers(1, 6)),
        write_checksum=draw(st.booleans()),
        write_content_size=draw(st.booleans()),
    ).compress(value)
    at = draw(st.integers(0, len(frame) - 1))
    mutation = draw(st.sampled_from(["none", "cut", "flip", "pad", "double"]))
    if mutation == "cut":
        return frame[:at]
    if mutation == "flip":
        return frame[:at] + bytes([frame[at] ^ draw(st.integers(1, 255))]) + frame[at + 1 :]
    if mutation == "pad":
        return frame + draw(st.binary(min_size=1, max_size=8))
    return frame + frame if mutation == "double" else frame


def _outcome(decode: Any) -> bytes | str:
    try:
        return bytes(decode())
    except CodecError as exc:
        assert exc.reason in ("bad_zstd", "too_large"), exc.reason
        return "refused"


@given(frames(), st.integers(0, 3000))
@settings(max_examples=400)
def test_one_call_inflation_accepts_exactly_what_feeding_the_frame_accepts(
    frame: bytes, limit: int
) -> None:
    """A frame with a declared size is inflated in one call; fed to a streaming decoder, as
    decode_payload did before, it must give the same value or be refused too."""
    assume(frame[:4] == ZSTD_MAGIC)
    try:
        declared = zstandard.frame_content_size(frame)
    except zstandard.ZstdError:
        reference: bytes | str = "refused"  # no readable header
    else:
        step = len(frame) if declared >= 0 else 16  # as decode_payload fed frames before
        reference = (
            "refused"
            if declared > limit
            else _outcome(lambda: codec._inflate_stepwise(frame, step, limit, declared))
        )
    assert _outcome(lambda: decode_payload(frame, limit)) == reference


@given(values)
def test_payload_round_trip_and_compression_rule(value: bytes) -> None:
    packed = encode_payload(value)
    assert decode_payload(packed) == value
    starts_with_magic = value[:4] == ZSTD_MAGIC
    if starts_with_magic:
        # On the wire, the magic always means "compressed".
        assert packed != value and packed[:4] == ZSTD_MAGIC
    elif len(value) < 64:
        assert packed == value
    else:
        assert packed == value or (packed[:4] == ZSTD_MAGIC and len(packed) < len(value))


# ---------------------------------------------------------------------------- hostile input

FIELD_NAMES = [b"op", b"key", b"hash", b"data", b"meta"]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
meta_fields = st.fixed_dictionaries(
    {},
    optional={
        "version": json_values | st.integers(0, 1 << 64),
        "updated_at": json_values | st.integers(0, 1 << 64),
        "hlc": json_values | hlcs.map(clock.to_hex) | hlcs,
        "origin": json_values,
        "content_type": json_values,
        "trace_parent": json_values,
    },
)


@st.composite
def field_maps(draw: st.DrawFn) -> dict[Any, Any]:
    """Anything from a valid entry with one field damaged to random bytes under random names."""
    fields: dict[Any, Any] = {}
    if draw(st.booleans()):
        value = draw(values)
        fields = {
            b"op": draw(st.sampled_from([b"PUT", b"DEL"]) | st.binary(max_size=6)),
            b"key": draw(keys.map(str.encode) | st.binary(max_size=10)),
            b"hash": draw(st.just(content_hash(value).encode()) | st.binary(max_size=70)),
            b"data": draw(
                st.just(encode_payload(value))
                | st.binary(max_size=50)
                | st.binary(max_size=50).map(lambda b: ZSTD_MAGIC + b)
            ),
            b"meta": draw(
                meta_fields.map(lambda m: json.dumps(m).encode()) | st.binary(max_size=40)
            ),
        }
        for name in draw(st.lists(st.sampled_from(FIELD_NAMES), max_size=2)):
            fields.pop(name, None)
    extra = draw(
        st.dictionaries(
            st.sampled_from(FIELD_NAMES) | st.binary(max_size=6), st.binary(max_size=40), max_size=4
        )
    )
    fields.update(extra)
    if draw(st.booleans()):
        # Text keys and values, as a decode_responses client would hand them over.
        fields = {
            k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
            for k, v in fields.items()
        }
    return fields


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(field_maps(), st.text(max_size=25) | st.binary(max_size=25) | stream_ids.map(str))
def test_only_codec_error_escapes_decode_entry(fields: dict[Any, Any], sid: str | bytes) -> None:
    try:
        change = decode_entry(sid, fields, default_origin="peer")
    except CodecError as exc:
        assert exc.reason
        return
    # Whatever was accepted is internally consistent.
    assert change.key
    if change.tombstone:
        assert change.data == b"" and change.content_hash == ""
    else:
        assert change.value is not None
        assert len(change.content_hash) in (32, 64)


# Mostly well-typed meta, so most entries decode and the re-encoding check has work to do.
plausible_meta = st.fixed_dictionaries(
    {},
    optional={
        "version": st.integers(0, 1 << 64),
        "updated_at": st.integers(0, 1 << 64),
        "hlc": hlcs.map(clock.to_hex) | hlcs | hlcs.map(lambda h: clock.to_hex(h).upper()),
        "origin": st.text(max_size=10),
        "content_type": st.text(max_size=10),
        "trace_parent": st.text(max_size=10),
        "extra": json_values,
    },
)


@st.composite
def plausible_entries(draw: st.DrawFn) -> dict[bytes, bytes]:
    value = draw(values)
    hash_hex = draw(
        st.sampled_from(
            [content_hash(value), content_hash(value).upper(), hashlib.sha256(value).hexdigest()]
        )
    )
    return {
        b"op": draw(st.sampled_from([b"PUT", b"DEL"])),
        b"key": draw(keys).encode(),
        b"hash": hash_hex.encode(),
        b"data": encode_payload(value),
        b"meta": json.dumps(draw(plausible_meta)).encode(),
    }


@settings(max_examples=300)
@given(plausible_entries() | field_maps())
def test_accepted_entry_re_encodes_and_decodes_equal(fields: dict[Any, Any]) -> None:
    try:
        first = decode_entry("1-0", fields, default_origin="peer")
    except CodecError:
        return
    assert 0 <= first.hlc <= clock.MAX_HLC
    second = decode_entry("1-0", encode_entry(first), default_origin="other")
    if first.tombstone:
        # A tombstone carries no content type on the wire.
        first.content_type = second.content_type
    if first.trace_parent == "":
        first.trace_parent = None
    assert second == first


# ---------------------------------------------------------------------------- stream ids and lag


@given(stream_ids)
def test_stream_id_str_round_trip(sid: StreamId) -> None:
    assert parse_stream_id(str(sid)) == sid
    assert parse_stream_id(str(sid).encode()) == sid


@given(stream_ids, stream_ids)
def test_stream_id_order_is_numeric(a: StreamId, b: StreamId) -> None:
    assert (a < b) == ((a.ms, a.seq) < (b.ms, b.seq))


@given(stream_ids)
def test_next_is_the_smallest_greater_id(sid: StreamId) -> None:
    assume(sid != StreamId(U64, U64))
    nxt = sid.next()
    assert nxt > sid
    if sid.seq < U64:
        assert nxt == StreamId(sid.ms, sid.seq + 1)
    else:
        assert nxt == StreamId(sid.ms + 1, 0)


@given(st.text(max_size=45) | st.binary(max_size=45))
def test_parse_stream_id_raises_only_codec_error(raw: str | bytes) -> None:
    try:
        sid = parse_stream_id(raw)
    except CodecError:
        return
    assert 0 <= sid.ms <= U64 and 0 <= sid.seq <= U64
    assert parse_stream_id(str(sid)) == sid


small_ids = st.builds(StreamId, st.integers(0, 10_000), st.integers(0, 50))


@given(small_ids | st.none(), small_ids, small_ids, st.integers(0, 100_000))
def test_lag_events_bounds(cursor: StreamId | None, a: StreamId, b: StreamId, length: int) -> None:
    first, last = min(a, b), max(a, b)
    lag = lag_events(cursor, first, last, length)
    if length == 0 or (cursor is not None and cursor >= last):
        assert lag == 0
    elif cursor is None or cursor < first:
        assert lag == length
    else:
        assert 1 <= lag <= length


@given(small_ids | st.none(), small_ids | st.none())
def test_lag_ms_bounds(cursor: StreamId | None, tail: StreamId | None) -> None:
    lag = lag_ms(cursor, tail)
    if tail is None or (cursor is not None and cursor >= tail):
        assert lag == 0
    else:
        assert lag == tail.ms - (cursor.ms if cursor else 0)
