"""Fuzz the lag estimates that feed alerts and readiness.

Invariants for arbitrary cursors, stream bounds and lengths: ``lag_events`` is 0 when caught up
or the stream is empty, the whole length when the cursor precedes the stream, and within
[1, length] in between; ``lag_ms`` is never negative and is 0 exactly when caught up (or when
behind within the same millisecond).

Run: ``python fuzz/fuzz_lag.py -max_total_time=30 fuzz/corpus/lag``
"""

from __future__ import annotations

import sys

import atheris

# Only our own modules: instrumenting every dependency (pydantic, redis) makes start-up
# take minutes and adds coverage noise the fuzzer cannot use.
with atheris.instrument_imports(include=["replication_engine"]):
    from replication_engine import codec

_MAX_U64 = (1 << 64) - 1


def _id(fdp: atheris.FuzzedDataProvider) -> codec.StreamId | None:
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return None
    # Small values collide often (equal ms, equal ids); large ones probe the u64 edges.
    if fdp.ConsumeBool():
        return codec.StreamId(fdp.ConsumeIntInRange(0, 20), fdp.ConsumeIntInRange(0, 3))
    return codec.StreamId(fdp.ConsumeIntInRange(0, _MAX_U64), fdp.ConsumeIntInRange(0, _MAX_U64))


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    cursor, first, last = _id(fdp), _id(fdp), _id(fdp)
    length = fdp.ConsumeIntInRange(-5, 1 << 40)
    if fdp.ConsumeBool() and first is not None and last is not None and first > last:
        first, last = last, first  # mostly well-formed streams, sometimes not

    events = codec.lag_events(cursor, first, last, length)
    assert isinstance(events, int)
    if length <= 0 or first is None or last is None:
        assert events == 0
    elif cursor is not None and cursor >= last:
        assert events == 0
    elif cursor is None or cursor < first:
        assert events == length
    else:
        assert 1 <= events <= length, (cursor, first, last, length, events)

    millis = codec.lag_ms(cursor, last)
    assert millis >= 0
    if last is None or (cursor is not None and cursor >= last):
        assert millis == 0
    else:
        start = cursor if cursor is not None else codec.STREAM_START
        assert millis == last.ms - start.ms


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
