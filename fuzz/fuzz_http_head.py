"""Fuzz ``parse_head``: the HTTP server's whole contact with what a client sends.

Input: the bytes a client sent up to its first empty line (``CRLF CRLF`` is added when missing,
as the server reads no further). Invariants: it never raises; a refusal has a status the server
knows how to send; an accepted request is a GET or HEAD of a path without its query; and
the request rendered back from what was parsed parses to the same thing.

Run: ``python fuzz/fuzz_http_head.py -max_total_time=30 fuzz/corpus/http_head``
"""

from __future__ import annotations

import sys

import atheris

# Only our own modules: instrumenting every dependency (pydantic, redis) makes start-up
# take minutes and adds coverage noise the fuzzer cannot use.
with atheris.instrument_imports(include=["replication_engine"]):
    from replication_engine.observability.http import REASONS, Refusal, parse_head


def TestOneInput(data: bytes) -> None:
    if not data.endswith(b"\r\n\r\n"):
        data += b"\r\n\r\n"
    request = parse_head(data)
    if isinstance(request, Refusal):
        assert request.status in REASONS and request.detail, request
        return
    assert request.method in ("GET", "HEAD"), request
    assert request.path.startswith("/") and "?" not in request.path, request
    if not request.path.isascii() or "\ufffd" in request.path:
        return  # a non-ASCII target: its path is shown, not re-sent
    connection = "keep-alive" if request.keep_alive else "close"
    again = (
        f"{request.method} {request.path} HTTP/1.1\r\nHost: a\r\nConnection: {connection}\r\n\r\n"
    )
    assert parse_head(again.encode()) == request, (data, request)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
