"""Fuzz ``codec.decode_payload``: the first thing a peer's bytes reach.

Invariants: only ``CodecError`` escapes; the result never exceeds the limit; a raw payload comes
back unchanged; an accepted frame is exactly what a full, independent zstd decode yields (so a
truncated or padded frame cannot pass as a shorter value); and the result re-encodes losslessly.

Run: ``python fuzz/fuzz_decompress.py -max_total_time=30 fuzz/corpus/decompress``
"""

from __future__ import annotations

import sys

import atheris

# Only our own modules: instrumenting every dependency (pydantic, redis) makes start-up
# take minutes and adds coverage noise the fuzzer cannot use.
with atheris.instrument_imports(include=["replication_engine"]):
    import zstandard

    from replication_engine import codec

# Small enough that the fuzzer hits the limit often, large enough for real frames.
LIMIT = 256 * 1024


def _reference_decode(data: bytes) -> bytes | None:
    """A complete single-frame decode by another route; None if zstd itself refuses it."""
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = dobj.decompress(data)
    except zstandard.ZstdError:
        return None
    return out if dobj.eof else None


def TestOneInput(data: bytes) -> None:
    # Half the inputs get the magic prepended, so the zstd decoder is reached more often.
    if data[:1] == b"\x01":
        data = codec.ZSTD_MAGIC + data[1:]
    try:
        value = codec.decode_payload(data, max_size=LIMIT)
    except codec.CodecError as exc:
        assert exc.reason in ("too_large", "bad_zstd"), exc.reason
        return
    assert len(value) <= LIMIT
    if data[:4] != codec.ZSTD_MAGIC:
        assert value == data
        return
    reference = _reference_decode(data)
    assert reference is not None, f"accepted an incomplete or invalid frame: {data[:64]!r}"
    assert value == reference, "decoded value differs from a full decode"
    assert codec.decode_payload(codec.encode_payload(value), max_size=LIMIT) == value


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
