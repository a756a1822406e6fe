"""``wire.pack`` against hiredis's reader: any commands packed and parsed back as RESP give
the arguments back, byte for byte, in order, and nothing else."""

from __future__ import annotations

import hiredis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication_engine.wire import pack

_ARG = st.one_of(
    st.binary(max_size=64),
    st.text(max_size=32),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)
_COMMANDS = st.lists(st.lists(_ARG, min_size=1, max_size=6), max_size=6)


def _as_sent(arg: bytes | str | int | float) -> bytes:
    if isinstance(arg, bytes):
        return arg
    return (arg if isinstance(arg, str) else repr(arg)).encode()


@given(_COMMANDS, st.integers(min_value=1, max_value=64))
def test_packed_commands_parse_back_to_their_arguments(
    commands: list[list[bytes | str | int | float]], chunk: int
) -> None:
    packed = pack(commands)
    reader = hiredis.Reader()
    parsed = []
    for start in range(0, len(packed), chunk):  # as it may arrive: in pieces
        reader.feed(packed[start : start + chunk])
        while (request := reader.gets()) is not False:
            parsed.append(request)
    assert parsed == [[_as_sent(arg) for arg in command] for command in commands]


@pytest.mark.parametrize("arg", [True, None, object(), ["a"]])
def test_an_argument_with_no_one_text_on_the_wire_is_refused(arg: object) -> None:
    with pytest.raises(TypeError, match="is not a Redis argument"):
        pack([("SET", "k", arg)])  # type: ignore[list-item]
