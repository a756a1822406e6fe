"""How a peer's raw replies become entries: every entry a tailer reads passes through here."""

from __future__ import annotations

from typing import Any

import hiredis
import pytest

from replication_engine.peer import _entries


def _resp(value: Any) -> bytes:
    if isinstance(value, list):
        return b"*%d\r\n" % len(value) + b"".join(map(_resp, value))
    return b"$%d\r\n%s\r\n" % (len(value), value)


def test_xrange_reply_read_off_the_wire_pairs_each_entrys_fields() -> None:
    reply = [
        [b"1-0", [b"op", b"PUT", b"key", b"a", b"data", b"x", b"hash", b"h", b"meta", b"{}"]],
        [b"1-1", [b"op", b"DEL", b"key", b"b"]],
        [b"2-0", []],
    ]
    reader = hiredis.Reader()
    reader.feed(_resp(reply))
    assert _entries(reader.gets()) == [
        (b"1-0", {b"op": b"PUT", b"key": b"a", b"data": b"x", b"hash": b"h", b"meta": b"{}"}),
        (b"1-1", {b"op": b"DEL", b"key": b"b"}),
        (b"2-0", {}),
    ]


def test_entries_already_paired_are_taken_as_they_are() -> None:
    fields = {b"op": b"PUT"}
    assert _entries([(b"1-0", fields)]) == [(b"1-0", fields)]
    assert _entries(None) == []


def test_fields_of_an_odd_length_are_refused_not_cut() -> None:
    """A reply Redis never gives; pairing it would drop the last name silently."""
    with pytest.raises(ValueError):
        _entries([[b"1-0", [b"op", b"PUT", b"key"]]])
