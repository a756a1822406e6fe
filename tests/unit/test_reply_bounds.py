"""The bounds replies are read in (``wire.bound_reader``), on hiredis's reader itself.

hiredis-py makes a list of the length an aggregate's header declares as it reads the header;
a bounded reader refuses a header past the bounds before any list is made. Bytes inside a
bulk string are never taken for a header: hiredis skips them by their declared length.
"""

from __future__ import annotations

import hiredis
import pytest

from replication_engine.wire import (
    MAX_REPLY_DEPTH,
    MAX_REPLY_ELEMENTS,
    _unbounded_because,
    bound_reader,
)


def _bounded() -> hiredis.Reader:
    reader = hiredis.Reader()
    assert bound_reader(reader)
    return reader


def _nested(depth: int) -> bytes:
    return b"*1\r\n" * depth + b":7\r\n"


def test_the_hiredis_we_run_on_takes_the_bounds() -> None:
    """Fails where a hiredis upgrade moved the reader's limits: replies would then be read
    unbounded (with a warning), as before the bounds."""
    assert _unbounded_because() is None


@pytest.mark.parametrize("kind", [b"*", b"~", b">", b"%"])
def test_an_aggregate_past_the_elements_bound_is_refused_at_its_header(kind: bytes) -> None:
    reader = _bounded()
    reader.feed(kind + b"%d\r\n" % (MAX_REPLY_ELEMENTS + 1))
    with pytest.raises(hiredis.ProtocolError, match="Multi-bulk length out of range"):
        reader.gets()


def test_aggregates_nested_past_the_depth_bound_are_refused() -> None:
    reader = _bounded()
    reader.feed(_nested(MAX_REPLY_DEPTH + 1))
    with pytest.raises(hiredis.ProtocolError, match="nesting depth"):
        reader.gets()


def test_replies_within_the_bounds_read_as_ever() -> None:
    reader = _bounded()
    reader.feed(_nested(MAX_REPLY_DEPTH))
    reply = reader.gets()
    for _ in range(MAX_REPLY_DEPTH):
        (reply,) = reply
    assert reply == 7
    reader.feed(b"*3\r\n:1\r\n:2\r\n:3\r\n")
    assert reader.gets() == [1, 2, 3]


def test_a_bulk_string_holding_header_lookalikes_is_read_intact() -> None:
    value = b"\r\n*99999999\r\n%2000000000\r\n" + b"\r\n*1\r\n" * (MAX_REPLY_DEPTH + 2)
    reader = _bounded()
    wire = b"*2\r\n$%d\r\n%s\r\n$1\r\nz\r\n" % (len(value), value)
    for at in range(len(wire)):  # in any two pieces
        reader.feed(wire[:at])
        assert reader.gets() is False
        reader.feed(wire[at:])
        assert reader.gets() == [value, b"z"]
