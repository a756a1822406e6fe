"""``parse_head``, the HTTP server's only contact with what a client sends: any bytes give a
Request or a Refusal with a status the server can send, and a well-formed request gives back
what it asked for."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from replication_engine.observability.http import REASONS, Refusal, Request, parse_head

_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NAMES = st.text(_TOKEN_CHARS, min_size=1, max_size=12).filter(
    lambda n: n.lower() not in ("connection", "content-length", "transfer-encoding", "host")
)
# Field values: visible ASCII and spaces, not starting or ending with a space (parse_head
# strips those, as RFC 9112 says a recipient must).
_VALUES = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20)
_PATHS = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?"), max_size=20
).map(lambda p: "/" + p)


def head(method: str, target: str, version: str, headers: list[tuple[str, str]]) -> bytes:
    """A request head with these headers, after a Host header (which HTTP/1.1 requires)."""
    lines = [f"{method} {target} {version}", "Host: node-a:9100"]
    lines += [*(f"{n}: {v}" for n, v in headers), "", ""]
    return "\r\n".join(lines).encode()


@given(st.binary(max_size=300))
def test_any_bytes_give_a_request_or_a_status_to_send(raw: bytes) -> None:
    for candidate in (
        raw,
        raw + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + raw + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\n" + raw + b"\r\n\r\n",
    ):
        request = parse_head(candidate)
        if isinstance(request, Refusal):
            assert request.status in REASONS and request.detail
        else:
            assert request.method in ("GET", "HEAD")
            assert request.path.startswith("/") and "?" not in request.path


@given(
    st.sampled_from(["GET", "HEAD"]),
    _PATHS,
    st.one_of(st.none(), _VALUES.map(lambda q: "?" + q)),
    st.sampled_from(["HTTP/1.0", "HTTP/1.1"]),
    st.sampled_from([None, "close", "keep-alive", "Keep-Alive, Upgrade", "upgrade, CLOSE"]),
    st.lists(st.tuples(_NAMES, _VALUES), max_size=5),
)
def test_a_well_formed_request_parses_to_what_it_asked(
    method: str,
    path: str,
    query: str | None,
    version: str,
    connection: str | None,
    headers: list[tuple[str, str]],
) -> None:
    if connection is not None:
        headers = [*headers, ("Connection", connection)]
    tokens = {t.strip().lower() for t in (connection or "").split(",")}
    keep_alive = "close" not in tokens and (version == "HTTP/1.1" or "keep-alive" in tokens)
    parsed = parse_head(head(method, path + (query or ""), version, headers))
    assert parsed == Request(method, path, keep_alive)


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        (("Content-Length", "0"), None),
        (("Content-Length", "000"), None),
        (("Content-Length", "1"), 413),
        (("Content-Length", "0010"), 413),
        (("Content-Length", "1e3"), 400),
        (("Transfer-Encoding", "identity"), 413),
    ],
)
def test_a_request_that_announces_a_body_is_refused(
    extra: tuple[str, str], status: int | None
) -> None:
    parsed = parse_head(head("GET", "/ready", "HTTP/1.1", [extra]))
    if status is None:
        assert parsed == Request("GET", "/ready", True)
    else:
        assert isinstance(parsed, Refusal) and parsed.status == status


@given(
    st.sampled_from(["GET", "HEAD"]),
    _PATHS,
    st.sampled_from(["HTTP/1.0", "HTTP/1.1"]),
    st.lists(st.tuples(_NAMES, _VALUES), max_size=5),
    st.lists(_VALUES, max_size=3),
    st.sampled_from(["Host", "host", "HOST"]),
)
def test_a_request_is_refused_unless_it_names_one_host_where_its_version_requires_one(
    method: str,
    path: str,
    version: str,
    headers: list[tuple[str, str]],
    hosts: list[str],
    spelling: str,
) -> None:
    """RFC 9112 3.2: HTTP/1.1 requires exactly one Host; HTTP/1.0 may leave it out, but two are
    refused whatever the version."""
    lines = [f"{method} {path} {version}", *(f"{n}: {v}" for n, v in headers)]
    lines += [f"{spelling}: {h}" for h in hosts]
    parsed = parse_head("\r\n".join([*lines, "", ""]).encode())
    if len(hosts) == 1 or (not hosts and version == "HTTP/1.0"):
        assert isinstance(parsed, Request) and parsed.path == path
    else:
        assert isinstance(parsed, Refusal) and parsed.status == 400
        assert "Host" in parsed.detail
