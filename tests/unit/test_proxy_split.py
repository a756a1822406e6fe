"""The request splitter of the test proxy (``harness.proxy.split_resp_requests``).

The proxy's ``split_requests`` fault forwards a pipeline one request at a time; a test that
relies on it (a command run between two of a read's commands) is only as good as the split.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from redis.connection import Connection

from harness.proxy import split_resp_requests

_ARG = st.binary(max_size=40) | st.sampled_from([b"", b"\r\n", b"*2\r\n", b"$3\r\n"])
_COMMANDS = st.lists(st.lists(_ARG, min_size=1, max_size=5), min_size=1, max_size=6)


def _packed(commands: list[list[bytes]]) -> list[bytes]:
    """Each command as redis-py sends it (RESP arrays of bulk strings)."""
    connection = Connection()
    return [b"".join(connection.pack_command(*command)) for command in commands]


@given(_COMMANDS, st.lists(st.integers(min_value=1, max_value=64), max_size=8))
def test_requests_come_out_whole_and_in_order_however_the_bytes_arrive(
    commands: list[list[bytes]], cuts: list[int]
) -> None:
    """Fed the pipeline in arbitrary pieces (as TCP may deliver it), the splitter returns each
    request exactly once, whole, in order, and holds back only an incomplete one."""
    requests = _packed(commands)
    stream = b"".join(requests)
    out: list[bytes] = []
    pending, at = b"", 0
    for size in [*cuts, len(stream)]:
        chunk, at = stream[at : at + size], at + size
        done, pending = split_resp_requests(pending + chunk)
        out += done
        if at >= len(stream):
            break
    assert out == requests
    assert pending == b""


def test_bytes_that_are_not_a_request_pass_as_one_piece() -> None:
    assert split_resp_requests(b"PING\r\n") == ([b"PING\r\n"], b"")
