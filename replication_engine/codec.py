"""CDC entries, payload compression, content hashes, stream ids and lag.

Everything here is pure (no I/O) because it is what a peer controls: every byte that arrives from
another node passes through these functions first. They raise exactly one error type,
:class:`CodecError`, with a message that says what was wrong, so the hot path can quarantine an
entry without guessing which exceptions are safe to catch.

The entry format is the sync-engine CDC format (``op``/``key``/``hash``/``data``/``meta``) with two
extra ``meta`` fields, ``hlc`` and ``origin``. ``docs/FORMAT.md`` is the contract.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple

import orjson
import xxhash
import zstandard

from replication_engine import clock
from replication_engine.errors import ReplicationError

# A node id: in the config (``local_node_id``, a peer's ``node_id``) and as an origin on the wire.
NODE_ID_RULE = "1-128 characters from A-Z a-z 0-9 . _ -"
_NODE_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


@functools.lru_cache(maxsize=1024)  # a mesh has few origins; checked per entry decoded
def is_node_id(value: str) -> bool:
    """Whether ``value`` may name a node (the config's rule, for tools that take an id)."""
    return _NODE_ID_RE.fullmatch(value) is not None


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
COMPRESS_MIN_BYTES = 64
DEFAULT_MAX_PAYLOAD = 64 * 1024 * 1024
MAX_KEY_BYTES = 4096
MAX_META_BYTES = 64 * 1024
# Largest version a peer may send: the store's scripts count local writes on top of it as Lua
# numbers (doubles), exact only up to 2^53 - 1; a larger one could turn the next local version
# negative.
MAX_VERSION = 2**53 - 1
_ZSTD_LEVEL = 3
# Input bytes per step for frames that do not declare their size: even a run of RLE blocks
# then inflates by well under a megabyte per step.
_FEED_BYTES = 16

_compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
_decompressor = zstandard.ZstdDecompressor()


class CodecError(ReplicationError, ValueError):
    """Raised for any malformed input: the one error type this module lets escape."""

    def __init__(self, message: str, *, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------- content hashes


def content_hash(data: bytes) -> str:
    """xxh3-128 of the uncompressed content, as 32 lower-case hex characters."""
    return xxhash.xxh3_128_hexdigest(data)


def verify_hash(data: bytes, expected: str) -> None:
    """Check ``data`` against a 32-hex (xxh3-128), 40-hex (SHA-1, what the store's functions
    compute for clients that send a plain value) or 64-hex (SHA-256) digest."""
    expected = expected.lower()
    if len(expected) == 32:
        actual = xxhash.xxh3_128_hexdigest(data)
    elif len(expected) == 40:
        actual = hashlib.sha1(data).hexdigest()
    elif len(expected) == 64:
        actual = hashlib.sha256(data).hexdigest()
    else:
        raise CodecError(
            "content hash must be 32 (xxh3-128), 40 (SHA-1) or 64 (SHA-256) hex characters, "
            f"got {len(expected)}",
            reason="bad_hash",
        )
    if actual != expected:
        raise CodecError(
            f"content hash mismatch: entry says {expected}, content hashes to {actual}",
            reason="hash_mismatch",
        )


# ---------------------------------------------------------------------------- payloads


def encode_payload(value: bytes) -> bytes:
    """Compress when that is smaller and the payload is big enough to be worth it.

    A raw payload that happens to start with the zstd magic is always compressed, so that on the
    wire the magic bytes unambiguously mean "compressed".
    """
    starts_with_magic = value[:4] == ZSTD_MAGIC
    if len(value) < COMPRESS_MIN_BYTES and not starts_with_magic:
        return value
    packed = _compressor.compress(value)
    return packed if starts_with_magic or len(packed) < len(value) else value


def decode_payload(data: bytes, max_size: int = DEFAULT_MAX_PAYLOAD) -> bytes:
    """Inverse of :func:`encode_payload`, refusing to inflate past ``max_size`` bytes.

    A frame must end where the data ends: a truncated frame, a bad checksum or bytes after the
    frame are corruption, not a value. A frame that declares a size (every frame
    :func:`encode_payload` writes) is inflated in one call into exactly that many bytes, which
    libzstd refuses to exceed and which fails unless it reaches the frame's end; this is the
    hot path's commonest step, and one call costs a quarter less than feeding a stream. Other
    frames are fed a few bytes at a time (:func:`_inflate_stepwise`): a small slice of zstd
    can expand to megabytes, so the output is checked as it grows. That includes frames that
    declare no content: the binding answers those with b'' without reading the frame at all.
    """
    if data[:4] != ZSTD_MAGIC:
        if len(data) > max_size:
            raise CodecError(
                f"payload of {len(data)} bytes exceeds the limit of {max_size}", reason="too_large"
            )
        return data
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise CodecError(f"payload is not valid zstd: {exc}", reason="bad_zstd") from None
    if declared > max_size:
        raise CodecError(
            f"compressed payload declares {declared} bytes, over the limit of {max_size}",
            reason="too_large",
        )
    if declared <= 0:
        step = _FEED_BYTES if declared < 0 else len(data)
        return _inflate_stepwise(data, step, max_size, declared)
    try:
        value = _decompressor.decompress(data, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise CodecError(f"payload is not valid zstd: {exc}", reason="bad_zstd") from None
    if len(value) != declared:  # libzstd checks this; kept so no binding can slip it past
        raise CodecError("payload size differs from its zstd header", reason="bad_zstd")
    return value


def _inflate_stepwise(data: bytes, step: int, max_size: int, declared: int) -> bytes:
    """Decompress one zstd frame (whose header declares ``declared`` bytes, or -1 for none)
    ``step`` input bytes at a time, checking the output's size after each step.
    :func:`decode_payload` uses it for frames without a declared size; the tests also run
    sized frames through it, to hold the one-call path to the same answers.
    """
    parts: list[bytes] = []
    size = 0
    dobj = _decompressor.decompressobj()
    fed = 0
    try:
        while fed < len(data) and not dobj.eof:
            part = dobj.decompress(data[fed : fed + step])
            fed += step
            size += len(part)
            parts.append(part)
            if size > max_size:
                raise CodecError(
                    f"compressed payload inflates past the limit of {max_size} bytes",
                    reason="too_large",
                )
    except zstandard.ZstdError as exc:
        raise CodecError(f"payload is not valid zstd: {exc}", reason="bad_zstd") from None
    if not dobj.eof:
        raise CodecError("payload is a truncated zstd frame", reason="bad_zstd")
    if dobj.unused_data or fed < len(data):
        raise CodecError("payload has bytes after its zstd frame", reason="bad_zstd")
    if declared >= 0 and size != declared:
        raise CodecError("payload size differs from its zstd header", reason="bad_zstd")
    return parts[0] if len(parts) == 1 else b"".join(parts)


# ---------------------------------------------------------------------------- stream ids


class StreamId(NamedTuple):
    """A Redis stream entry id; tuple ordering is stream ordering."""

    ms: int
    seq: int

    def __str__(self) -> str:
        # The tuple itself, without two attribute lookups: a third cheaper than an f-string.
        return "%d-%d" % self  # noqa: UP031

    @classmethod
    def parse(cls, raw: str | bytes) -> StreamId:
        return parse_stream_id(raw)

    def next(self) -> StreamId:
        """The smallest id strictly greater than this one (for exclusive XRANGE starts)."""
        if self.seq < _MAX_U64:
            return StreamId(self.ms, self.seq + 1)
        if self.ms < _MAX_U64:
            return StreamId(self.ms + 1, 0)
        raise CodecError("stream id has no successor", reason="bad_stream_id")


_MAX_U64 = (1 << 64) - 1
_new_tuple = tuple.__new__
STREAM_START = StreamId(0, 0)


def parse_stream_id(raw: str | bytes | StreamId) -> StreamId:
    if isinstance(raw, StreamId):
        return raw
    if type(raw) is bytes:
        # What Redis returns: bytes.isdigit() is ASCII-only, so this accepts nothing the
        # general path below would refuse.
        ms_raw, dash, seq_raw = raw.partition(b"-")
        if (
            dash
            and ms_raw.isdigit()
            and seq_raw.isdigit()
            and len(ms_raw) <= 20
            and len(seq_raw) <= 20
        ):
            ms, seq = int(ms_raw), int(seq_raw)
            if ms <= _MAX_U64 and seq <= _MAX_U64:
                # tuple.__new__ directly: StreamId(ms, seq) runs a Python-level __new__, a
                # third of this call's cost, and every entry read comes through here.
                return _new_tuple(StreamId, (ms, seq))
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("ascii")
        except UnicodeDecodeError:
            raise CodecError(
                f"stream id is not ASCII: {raw[:40]!r}", reason="bad_stream_id"
            ) from None
    if not isinstance(raw, str):
        raise CodecError(
            f"stream id must be text, got {type(raw).__name__}", reason="bad_stream_id"
        )
    ms_text, sep, seq_text = raw.partition("-")
    if not sep:
        seq_text = "0"
    if not (ms_text.isdigit() and ms_text.isascii() and seq_text.isdigit() and seq_text.isascii()):
        raise CodecError(
            f"stream id must look like <ms>-<seq>, got {raw[:40]!r}", reason="bad_stream_id"
        )
    if len(ms_text) > 20 or len(seq_text) > 20:
        raise CodecError(f"stream id out of range: {raw[:40]!r}", reason="bad_stream_id")
    ms, seq = int(ms_text), int(seq_text)
    if ms > _MAX_U64 or seq > _MAX_U64:
        raise CodecError(f"stream id out of range: {raw[:40]!r}", reason="bad_stream_id")
    return StreamId(ms, seq)


def lag_ms(cursor: StreamId | None, tail: StreamId | None, first: StreamId | None = None) -> int:
    """Milliseconds between the last applied entry and the newest one; 0 when caught up.

    A cursor older than the stream's first entry (a new reader, or one the stream was trimmed
    past) is measured from that first entry: the backlog's span, not the time since 1970.
    """
    if tail is None:
        return 0
    if cursor is None:
        cursor = STREAM_START
    if cursor >= tail:
        return 0
    if first is not None and cursor < first:
        return max(0, tail.ms - first.ms)
    return max(0, tail.ms - cursor.ms)


def lag_events(
    cursor: StreamId | None,
    first: StreamId | None,
    last: StreamId | None,
    length: int,
) -> int:
    """Estimate of entries not yet applied, from the O(1) facts ``XINFO STREAM`` gives.

    Exact at both ends (0 when caught up; the whole stream when the cursor precedes it) and an
    interpolation by entry time in between: reading the entries to count them would cost as much
    as applying them.
    """
    if length <= 0 or last is None or first is None:
        return 0
    if cursor is not None and cursor >= last:
        return 0
    if cursor is None or cursor < first:
        return length
    span = last.ms - first.ms
    if span <= 0:
        return max(1, length // 2)
    remaining = (last.ms - cursor.ms) / span
    return max(1, min(length, round(length * remaining)))


# ---------------------------------------------------------------------------- changes


class Op(StrEnum):
    PUT = "PUT"
    DEL = "DEL"


@dataclass(slots=True)
class Change:
    """One item version as it travels between nodes: a decoded CDC entry or a fetched item.

    ``data`` is the payload exactly as on the wire (possibly compressed), so applying a change
    stores the bytes that were verified without recompressing them.
    """

    key: str
    hlc: int
    origin: str
    tombstone: bool = False
    data: bytes = b""
    content_hash: str = ""
    content_type: str = ""
    version: int = 0
    updated_at: int = 0
    trace_parent: str | None = None
    stream_id: str | None = None
    value: bytes | None = field(default=None, repr=False)

    @property
    def op(self) -> Op:
        return Op.DEL if self.tombstone else Op.PUT

    @classmethod
    def put(
        cls,
        key: str,
        value: bytes,
        *,
        hlc: int,
        origin: str,
        content_type: str = "binary",
        version: int = 1,
        updated_at: int | None = None,
        trace_parent: str | None = None,
    ) -> Change:
        return cls(
            key=key,
            hlc=hlc,
            origin=origin,
            data=encode_payload(value),
            content_hash=content_hash(value),
            content_type=content_type,
            version=version,
            updated_at=clock.physical_ms(hlc) if updated_at is None else updated_at,
            trace_parent=trace_parent,
            value=value,
        )

    @classmethod
    def delete(cls, key: str, *, hlc: int, origin: str, version: int = 1) -> Change:
        return cls(
            key=key,
            hlc=hlc,
            origin=origin,
            tombstone=True,
            version=version,
            updated_at=clock.physical_ms(hlc),
        )

    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "version": self.version,
            "updated_at": self.updated_at,
            "hlc": clock.to_hex(self.hlc),
            "origin": self.origin,
        }
        if not self.tombstone:
            meta["content_type"] = self.content_type
        if self.trace_parent:
            meta["trace_parent"] = self.trace_parent
        return meta


@functools.lru_cache(maxsize=1024)
def _json_text(text: str) -> bytes:
    """A JSON string literal; cached, as origins and content types repeat in every entry."""
    return json.dumps(text).encode()


def encode_meta(change: Change) -> bytes:
    """The ``meta`` field of a CDC entry: :meth:`Change.meta` as compact JSON.

    Formatted directly rather than through a JSON encoder: the apply path builds one per
    relayed entry, and this is several times cheaper than encoding a fresh dict.
    """
    meta = b'{"version":%d,"updated_at":%d,"hlc":"%016x","origin":%s' % (
        change.version,
        change.updated_at,
        change.hlc,
        _json_text(change.origin),
    )
    if not change.tombstone:
        meta += b',"content_type":' + _json_text(change.content_type)
    if change.trace_parent:
        meta += b',"trace_parent":' + json.dumps(change.trace_parent).encode()
    return meta + b"}"


def encode_entry(change: Change) -> dict[str, bytes]:
    """Fields for ``XADD``; the store's Lua scripts write the same shape."""
    fields = {
        "op": change.op.value.encode(),
        "key": change.key.encode("utf-8"),
        "meta": encode_meta(change),
    }
    if not change.tombstone:
        fields["hash"] = change.content_hash.encode()
        fields["data"] = change.data
    return fields


def _normalise(fields: Mapping[Any, Any]) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for name, value in fields.items():
        if isinstance(name, str):
            name = name.encode("utf-8", "surrogatepass")
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogatepass")
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise CodecError("entry fields must be bytes or text", reason="malformed")
        out[name] = value
    return out


def _meta_int(meta: Mapping[str, Any], name: str, default: int, top: int = clock.MAX_HLC) -> int:
    value = meta.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise CodecError(f"meta.{name} must be an integer in 0..{top}, got {value!r}"[:200])
    return value


def _meta_int_or_bad_meta(meta: Mapping[str, Any], name: str, top: int) -> int:
    try:
        return _meta_int(meta, name, 0, top)
    except CodecError as exc:
        exc.reason = "bad_meta"
        raise


def _parse_hlc(raw: Any) -> int:
    if type(raw) is str and len(raw) == 16 and raw.isascii() and raw.isalnum():
        # The usual form; ASCII letters and digits only, so int() refuses anything not hex.
        try:
            return int(raw, 16)
        except ValueError:
            pass
    if isinstance(raw, str):
        try:
            return clock.from_hex(raw)
        except ValueError as exc:
            raise CodecError(f"meta.hlc: {exc}", reason="bad_meta") from None
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw <= clock.MAX_HLC:
        return raw
    raise CodecError(
        f"meta.hlc must be a 16-hex string or a 64-bit integer, got {raw!r}"[:200],
        reason="bad_meta",
    )


def decode_meta(raw: bytes | None) -> dict[str, Any]:
    if raw is None or raw == b"":
        return {}
    if len(raw) > MAX_META_BYTES:
        raise CodecError(f"meta is {len(raw)} bytes, limit {MAX_META_BYTES}", reason="bad_meta")
    try:
        meta = orjson.loads(raw)
    except (ValueError, RecursionError):
        raise CodecError("meta is not valid JSON", reason="bad_meta") from None
    if not isinstance(meta, dict):
        raise CodecError("meta must be a JSON object", reason="bad_meta")
    return meta


def decode_key(raw: bytes | None) -> str:
    if raw is None:
        raise CodecError("entry has no 'key' field", reason="missing_field")
    if not raw:
        raise CodecError("key is empty", reason="bad_key")
    if len(raw) > MAX_KEY_BYTES:
        raise CodecError(f"key is {len(raw)} bytes, limit {MAX_KEY_BYTES}", reason="bad_key")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("key is not valid UTF-8", reason="bad_key") from None


def change_from_parts(
    key: str,
    tombstone: bool,
    data: bytes,
    hash_hex: str,
    meta: Mapping[str, Any],
    *,
    default_origin: str,
    max_payload: int,
    stream_id: str | None = None,
) -> Change:
    """Validate one item version, from a stream entry or a fetched item hash alike."""
    # The usual values are checked inline (type() is, not isinstance: bool is an int); anything
    # else goes through the helpers, which say what is wrong.
    version = meta.get("version", 0)
    if type(version) is not int or not 0 <= version <= MAX_VERSION:
        version = _meta_int_or_bad_meta(meta, "version", MAX_VERSION)
    updated_at = meta.get("updated_at", 0)
    if type(updated_at) is not int or not 0 <= updated_at <= clock.MAX_HLC:
        updated_at = _meta_int_or_bad_meta(meta, "updated_at", clock.MAX_HLC)
    raw_hlc = meta.get("hlc")
    if raw_hlc is not None or "hlc" in meta:
        hlc = _parse_hlc(raw_hlc)
    else:
        # Entries from writers that predate the HLC order by (updated_at, version).
        hlc = clock.pack(min(updated_at, clock.MAX_MS), min(version, clock.MAX_COUNTER))
    origin = meta.get("origin", default_origin)
    if not isinstance(origin, str) or not is_node_id(origin):
        # An origin no node can have is claimed by no one: a write from it could never be
        # proved dead, and would live on every node for good.
        raise CodecError(
            f"meta.origin must be a node id ({NODE_ID_RULE}), got {origin!r}"[:200],
            reason="bad_meta",
        )
    trace_parent = meta.get("trace_parent")
    if trace_parent is not None and (not isinstance(trace_parent, str) or len(trace_parent) > 512):
        raise CodecError(
            "meta.trace_parent must be a string of at most 512 characters, got "
            + (
                f"{len(trace_parent)}"
                if isinstance(trace_parent, str)
                else type(trace_parent).__name__
            ),
            reason="bad_meta",
        )
    content_type = meta.get("content_type", "binary")
    if not isinstance(content_type, str) or len(content_type) > 256:
        raise CodecError("meta.content_type must be a short string", reason="bad_meta")
    value: bytes | None = None
    if tombstone:
        data, hash_hex = b"", ""
    else:
        if not hash_hex:
            raise CodecError("PUT entry has no content hash", reason="missing_field")
        value = decode_payload(data, max_payload)
        verify_hash(value, hash_hex)
        hash_hex = hash_hex.lower()
    # Positional, in field order (key, hlc, origin, tombstone, data, content_hash, content_type,
    # version, updated_at, trace_parent, stream_id, value): matching twelve keywords cost a
    # tenth of this call.
    return Change(
        key,
        hlc,
        origin,
        tombstone,
        data,
        hash_hex,
        content_type,
        version,
        updated_at,
        trace_parent,
        stream_id,
        value,
    )


_ENTRY_FIELDS = (b"op", b"key", b"meta", b"data", b"hash")
_BYTES_OR_NONE = {bytes, type(None)}


def _entry_fields(fields: Mapping[Any, Any]) -> tuple[Any, ...]:
    """op, key, meta, data and hash of an entry, as bytes or None where absent.

    Redis replies name fields in bytes, so they are read straight from the mapping; text names
    or values (from other callers) are normalised first, which costs a copy.
    """
    values = tuple(map(fields.get, _ENTRY_FIELDS))
    if values[0] is not None and set(map(type, values)) <= _BYTES_OR_NONE:
        return values
    norm = _normalise(fields)
    return tuple(map(norm.get, _ENTRY_FIELDS))


def decode_entry(
    stream_id: str | bytes | StreamId,
    fields: Mapping[Any, Any],
    *,
    default_origin: str,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
) -> Change:
    """Decode and verify one CDC entry; ``default_origin`` names the peer for entries without.

    The hot path's busiest function (a catch-up spends a third of its time here): the usual
    shapes (a dict of bytes from Redis, a key and meta within bounds) are checked inline and
    anything else goes through the helpers that say what is wrong, in the same order.
    """
    sid = str(parse_stream_id(stream_id))
    if type(fields) is not dict and not isinstance(fields, Mapping):
        raise CodecError("entry fields must be a mapping", reason="malformed")
    get = fields.get
    op_raw, key_raw, meta_raw = get(b"op"), get(b"key"), get(b"meta")
    data, hash_raw = get(b"data"), get(b"hash")
    if not (
        type(op_raw) is bytes
        and (type(key_raw) is bytes or key_raw is None)
        and (type(meta_raw) is bytes or meta_raw is None)
        and (type(data) is bytes or data is None)
        and (type(hash_raw) is bytes or hash_raw is None)
    ):
        op_raw, key_raw, meta_raw, data, hash_raw = _entry_fields(fields)
    if op_raw == b"PUT":
        tombstone = False
    elif op_raw == b"DEL":
        tombstone = True
    elif op_raw is None:
        raise CodecError("entry has no 'op' field", reason="missing_field")
    else:
        raise CodecError(f"unknown op {op_raw[:40]!r}"[:100], reason="unknown_op")
    key = decode_key(key_raw)
    if meta_raw and len(meta_raw) <= MAX_META_BYTES:
        try:
            meta = orjson.loads(meta_raw)
        except (ValueError, RecursionError):
            raise CodecError("meta is not valid JSON", reason="bad_meta") from None
        if type(meta) is not dict:
            raise CodecError("meta must be a JSON object", reason="bad_meta")
    else:
        meta = decode_meta(meta_raw)
    if tombstone:
        data, hash_hex = b"", ""
    else:
        if data is None:
            raise CodecError("PUT entry has no 'data' field", reason="missing_field")
        if hash_raw is None:
            raise CodecError("entry has no 'hash' field", reason="missing_field")
        try:
            hash_hex = hash_raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError("field 'hash' is not valid UTF-8", reason="bad_encoding") from None
    return change_from_parts(
        key,
        tombstone,
        data,
        hash_hex,
        meta,
        default_origin=default_origin,
        max_payload=max_payload,
        stream_id=sid,
    )


def key_hint(fields: Mapping[Any, Any]) -> str | None:
    """Best-effort key of an entry that failed to decode, so the cold path can repair it."""
    try:
        raw = fields.get(b"key", fields.get("key"))
        if isinstance(raw, str):
            return raw or None
        if isinstance(raw, bytes) and raw and len(raw) <= MAX_KEY_BYTES:
            return raw.decode("utf-8")
    except (UnicodeDecodeError, AttributeError, TypeError):
        return None
    return None
