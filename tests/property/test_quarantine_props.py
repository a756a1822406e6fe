"""A value kept in the quarantine comes back exactly, or the row says it was cut: never a
wrong value (``quarantined_value`` over what ``CursorStore`` stores, without the file)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication_engine import codec
from replication_engine.codec import Change
from replication_engine.cursor import (
    QUARANTINE_FIELD_MAX_BYTES,
    CursorError,
    QuarantineRecord,
    _encode_raw,
    quarantined_value,
)

# Bytes, text that reads as base64 or as a truncation note, and repetitive (compressed) data.
_VALUES = st.one_of(
    st.binary(max_size=QUARANTINE_FIELD_MAX_BYTES + 600),
    st.text(max_size=3000).map(str.encode),
    st.sampled_from([b"base64:AAAA", b"base64:", b"x ...[truncated, 5 bytes]"]),
    st.tuples(st.binary(min_size=1, max_size=8), st.integers(1, 4000)).map(lambda p: p[0] * p[1]),
)


def kept(fields: dict[str, bytes], *, whole: bool = True) -> QuarantineRecord:
    """The record ``CursorStore`` reads back for an entry it was given; without ``whole``, as
    it reads one whose whole data went over the value budget (or was dropped since)."""
    text, cut = _encode_raw(fields)
    return QuarantineRecord(
        1, "b", "1-0", "k", "absent_on_peer", json.loads(text), 0, whole=cut if whole else None
    )


@given(_VALUES)
def test_a_kept_value_comes_back_exactly_whatever_its_size(value: bytes) -> None:
    entry = codec.encode_entry(Change.put("k", value, hlc=9, origin="b"))
    assert quarantined_value(kept(entry)) == value


@given(_VALUES)
def test_a_row_without_its_whole_value_gives_what_it_kept_or_says_it_was_cut(value: bytes) -> None:
    entry = codec.encode_entry(Change.put("k", value, hlc=9, origin="b"))
    record = kept(entry, whole=False)
    if len(entry["data"]) <= QUARANTINE_FIELD_MAX_BYTES:
        assert quarantined_value(record) == value
    else:
        with pytest.raises(CursorError, match="were kept"):
            quarantined_value(record)


@given(_VALUES, st.binary(min_size=1, max_size=64))
def test_data_that_does_not_match_its_hash_gives_no_value(value: bytes, other: bytes) -> None:
    entry = codec.encode_entry(Change.put("k", value, hlc=9, origin="b"))
    entry["hash"] = codec.encode_entry(Change.put("k", value + other, hlc=9, origin="b"))["hash"]
    with pytest.raises(CursorError):
        quarantined_value(kept(entry))
