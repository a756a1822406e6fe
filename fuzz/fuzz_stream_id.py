"""Fuzz stream id parsing and ordering: cursors are saved and compared as these ids.

Input: up to three ids separated by newlines (seed files are plain text). Invariants: only
``CodecError`` escapes; ``str`` round-trips; ordering is the numeric (ms, seq) order and is a
total order; ``next()`` is strictly greater and nothing lies between an id and its ``next()``.

Run: ``python fuzz/fuzz_stream_id.py -max_total_time=30 fuzz/corpus/stream_id``
"""

from __future__ import annotations

import sys

import atheris

# Only our own modules: instrumenting every dependency (pydantic, redis) makes start-up
# take minutes and adds coverage noise the fuzzer cannot use.
with atheris.instrument_imports(include=["replication_engine"]):
    from replication_engine import codec

_MAX_U64 = (1 << 64) - 1


def _parse(raw: bytes) -> codec.StreamId | None:
    # Both input types the engine sees: bytes from redis-py, text from the cursor database.
    try:
        from_bytes = codec.parse_stream_id(raw)
    except codec.CodecError as exc:
        assert exc.reason == "bad_stream_id"
        from_bytes = None
    text = raw.decode("utf-8", "surrogateescape")
    try:
        from_text = codec.parse_stream_id(text)
    except codec.CodecError:
        from_text = None
    if raw.isascii():
        assert from_bytes == from_text, (raw, from_bytes, from_text)
    return from_bytes if from_bytes is not None else from_text


def TestOneInput(data: bytes) -> None:
    ids = []
    for raw in data.split(b"\n")[:3]:
        sid = _parse(raw)
        if sid is None:
            continue
        assert 0 <= sid.ms <= _MAX_U64 and 0 <= sid.seq <= _MAX_U64
        text = str(sid)
        assert codec.parse_stream_id(text) == sid
        assert codec.parse_stream_id(text.encode()) == sid
        assert codec.StreamId.parse(text) == sid
        if sid == codec.StreamId(_MAX_U64, _MAX_U64):
            try:
                sid.next()
            except codec.CodecError:
                pass
            else:
                raise AssertionError("the largest id has no successor")
        else:
            nxt = sid.next()
            assert nxt > sid
            assert 0 <= nxt.ms <= _MAX_U64 and 0 <= nxt.seq <= _MAX_U64
            for other in ids:
                assert not (sid < other < nxt), (sid, other, nxt)
        ids.append(sid)
    for a in ids:
        for b in ids:
            numeric = (a.ms, a.seq) < (b.ms, b.seq)
            assert (a < b) == numeric
            assert (a == b) == (str(a) == str(b))
            assert (a < b) + (a == b) + (a > b) == 1
            for c in ids:
                if a <= b <= c:
                    assert a <= c


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
