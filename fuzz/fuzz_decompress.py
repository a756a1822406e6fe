"""Fuzz ``codec.decode_payload``: the first thing a peer's bytes reach.

Invariants: only ``CodecError`` escapes; the result never exceeds the limit; a raw payload comes
back unchanged; an accepted frame is exactly what a full, independent zstd decode yields (so a
truncated or padded frame cannot pass as a shorter value); a frame inflated in one call (it
declares its size) gets the answer it gets when fed to a streaming decoder, as it was before the
one call; and the result re-encodes losslessly.

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


def _stepwise(data: bytes) -> bytes | None:
    """A frame whose header is readable and within the limit, inflated by a streaming decoder fed
    the frame (in one piece when it declares its size, as decode_payload did before it used one
    call; libzstd's streaming answers for a corrupt frame can depend on how the input is cut);
    None where that refuses, or where decode_payload refuses before inflating."""
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError:
        return None
    if declared > LIMIT:
        return None
    try:
        step = len(data) if declared >= 0 else 16
        return codec._inflate_stepwise(data, step, LIMIT, declared)
    except codec.CodecError:
        return None


def TestOneInput(data: bytes) -> None:
    # Half the inputs get the magic prepended, so the zstd decoder is reached more often.
    if data[:1] == b"\x01":
        data = codec.ZSTD_MAGIC + data[1:]
    try:
        value = codec.decode_payload(data, max_size=LIMIT)
    except codec.CodecError as exc:
        assert exc.reason in ("too_large", "bad_zstd"), exc.reason
        if data[:4] == codec.ZSTD_MAGIC:
            whole = _stepwise(data)
            assert whole is None, f"refused a frame a streaming decoder reads: {data[:64]!r}"
        return
    assert len(value) <= LIMIT
    if data[:4] != codec.ZSTD_MAGIC:
        assert value == data
        return
    reference = _reference_decode(data)
    assert reference is not None, f"accepted an incomplete or invalid frame: {data[:64]!r}"
    assert value == reference, "decoded value differs from a full decode"
    assert value == _stepwise(data), "decoded value differs from a streaming decode"
    assert codec.decode_payload(codec.encode_payload(value), max_size=LIMIT) == value


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
