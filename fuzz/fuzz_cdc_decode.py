"""Fuzz ``codec.decode_entry`` with arbitrary field maps: the hot path's whole attack surface.

Invariants: only ``CodecError`` escapes (anything else would crash a tailer on one bad entry);
an accepted change is internally consistent; and it re-encodes with ``encode_entry`` and decodes
to an equal change (what a relaying node re-emits must mean the same thing).

Input, by its first byte:
  even: a serialised entry (what the seed corpus holds: real entries written by the Lua
        scripts): ``[len:u8][stream id]`` then repeated ``[len:u8][name][len:u16be][value]``.
  odd:  a structured entry built field by field with ``FuzzedDataProvider``, mostly valid with
        damage in one or two places, so the fuzzer gets deep into the validation quickly.

Run: ``python fuzz/fuzz_cdc_decode.py -max_total_time=30 fuzz/corpus/cdc_decode``
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import sys
from typing import Any

import atheris

# Only our own modules: instrumenting every dependency (pydantic, redis) makes start-up
# take minutes and adds coverage noise the fuzzer cannot use.
with atheris.instrument_imports(include=["replication_engine"]):
    from replication_engine import clock, codec

FIELD_NAMES = [b"op", b"key", b"hash", b"data", b"meta"]
META_NAMES = ["version", "updated_at", "hlc", "origin", "content_type", "trace_parent", "x"]
# Small enough that the fuzzer reaches it; the limit path must hold too.
MAX_PAYLOAD = 64 * 1024


# ---------------------------------------------------------------------------- serialised form


def encode_fields(stream_id: bytes, fields: dict[bytes, bytes]) -> bytes:
    """The serialised input form; ``fuzz/make_seeds.py`` writes seeds with it."""
    out = [b"\x00", bytes([len(stream_id)]), stream_id]
    for name, value in fields.items():
        out += [bytes([len(name)]), name, struct.pack(">H", len(value)), value]
    return b"".join(out)


def decode_fields(data: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """Lenient inverse of :func:`encode_fields`: truncated records are cut short, not errors."""
    pos = 1
    sid_len = data[pos] if pos < len(data) else 0
    sid = data[pos + 1 : pos + 1 + sid_len]
    pos += 1 + sid_len
    fields: dict[bytes, bytes] = {}
    while pos < len(data):
        name_len = data[pos]
        name = data[pos + 1 : pos + 1 + name_len]
        pos += 1 + name_len
        value_len = int.from_bytes(data[pos : pos + 2], "big")
        fields[name] = data[pos + 2 : pos + 2 + value_len]
        pos += 2 + value_len
    return sid, fields


# ---------------------------------------------------------------------------- structured form


def _json_value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind == 0:
        return fdp.ConsumeIntInRange(0, 1 << 20)
    if kind == 1:
        return fdp.ConsumeInt(12)  # up to 96 bits, signed: past u64 both ways
    if kind == 2:
        return clock.to_hex(fdp.ConsumeIntInRange(0, clock.MAX_HLC))
    if kind == 3:
        return fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 20))
    if kind == 4:
        return fdp.ConsumeRegularFloat()
    if kind == 5:
        return fdp.ConsumeBool()
    if kind == 6:
        return None
    if kind == 7 and depth < 3:
        return [_json_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if kind == 8 and depth < 3:
        return {
            fdp.ConsumeUnicode(4): _json_value(fdp, depth + 1)
            for _ in range(fdp.ConsumeIntInRange(0, 3))
        }
    return fdp.ConsumeUnicode(16)


def _meta(fdp: atheris.FuzzedDataProvider) -> bytes:
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind == 0:
        return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
    meta: dict[str, Any] = {}
    for name in META_NAMES:
        if fdp.ConsumeIntInRange(0, 3) == 0:
            continue
        if name in ("version", "updated_at") and fdp.ConsumeBool():
            meta[name] = fdp.ConsumeIntInRange(0, 1 << 50)
        elif name == "hlc" and fdp.ConsumeBool():
            meta[name] = clock.to_hex(fdp.ConsumeIntInRange(0, clock.MAX_HLC))
        elif name in ("origin", "content_type", "trace_parent") and fdp.ConsumeBool():
            meta[name] = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 12))
        else:
            meta[name] = _json_value(fdp)
    text = json.dumps(meta, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def structured_fields(fdp: atheris.FuzzedDataProvider) -> dict[Any, Any]:
    value = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))
    if fdp.ConsumeIntInRange(0, 3) == 0:
        value = codec.ZSTD_MAGIC + value
    data_kind = fdp.ConsumeIntInRange(0, 3)
    data = {
        0: codec.encode_payload(value),
        1: value,
        2: codec.ZSTD_MAGIC + value,
        3: codec.encode_payload(value)[: fdp.ConsumeIntInRange(0, 40)],
    }[data_kind]
    hash_kind = fdp.ConsumeIntInRange(0, 4)
    hash_hex = {
        0: codec.content_hash(value),
        1: hashlib.sha256(value).hexdigest(),
        2: codec.content_hash(value).upper(),
        3: fdp.ConsumeUnicode(64),
        4: codec.content_hash(value),
    }[hash_kind]
    key = (
        fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 30)).encode("utf-8", "surrogatepass")
        if fdp.ConsumeBool()
        else fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 30))
    )
    op = fdp.PickValueInList([b"PUT", b"DEL", b"PUT", b"DEL", b"put", b""])
    fields: dict[Any, Any] = {
        b"op": op,
        b"key": key,
        b"hash": hash_hex.encode("utf-8", "surrogatepass"),
        b"data": data,
        b"meta": _meta(fdp),
    }
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        name = fdp.PickValueInList(FIELD_NAMES)
        if fdp.ConsumeBool():
            fields.pop(name, None)
        else:
            fields[name] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 30))
    if fdp.ConsumeIntInRange(0, 7) == 0:
        fields[fdp.ConsumeBytes(4)] = fdp.ConsumeBytes(8)
    if fdp.ConsumeIntInRange(0, 3) == 0:
        # Text fields, as a client with decode_responses=True would deliver them.
        fields = {
            k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
            for k, v in fields.items()
        }
    return fields


# ---------------------------------------------------------------------------- the target


def _check_consistent(change: codec.Change) -> None:
    assert change.key
    assert len(change.key.encode("utf-8")) <= codec.MAX_KEY_BYTES
    assert change.origin
    if change.tombstone:
        assert change.data == b"" and change.content_hash == "" and change.value is None
    else:
        assert change.value is not None and len(change.value) <= MAX_PAYLOAD
        codec.verify_hash(change.value, change.content_hash)
        assert change.content_hash == change.content_hash.lower()


def TestOneInput(data: bytes) -> None:
    if data[:1] and data[0] & 1:
        fdp = atheris.FuzzedDataProvider(data[1:])
        sid: bytes | str = fdp.PickValueInList([b"1-0", "1700000000000-3", b"bad", b"0"])
        fields: dict[Any, Any] = structured_fields(fdp)
    else:
        sid, fields = decode_fields(data)
    try:
        change = codec.decode_entry(sid, fields, default_origin="peer-x", max_payload=MAX_PAYLOAD)
    except codec.CodecError as exc:
        assert exc.reason, "CodecError without a reason"
        return
    assert 0 <= change.hlc <= clock.MAX_HLC, f"decoded an out-of-range HLC {change.hlc}"
    _check_consistent(change)

    again = codec.decode_entry(
        change.stream_id or "0-0",
        codec.encode_entry(change),
        default_origin="someone-else",
        max_payload=MAX_PAYLOAD,
    )
    expected = dataclasses.replace(change)
    if expected.tombstone:
        expected.content_type = again.content_type  # not carried by a DEL entry
    if expected.trace_parent == "":
        expected.trace_parent = None  # an empty trace parent is not written
    assert again == expected, (change, again)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
