"""Secrets out of anything a person reads: one function every log line, error, status field
and metric label that may hold a Redis URL goes through.

Its own module, below config and connection alike, because both need it and neither owns it.
"""

from __future__ import annotations

import re

__all__ = ["redact_url", "register_secret"]

# scheme://user:password@ anywhere in a text, and user:password@host as the whole text.
_URL_CREDENTIALS_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*):(\S*)@")
_BARE_CREDENTIALS_RE = re.compile(r"^([^\s:/@]*):(\S*)@(\S+)$")
# A URL's password with blanks in it (unescaped): from scheme://user: to the next '@' on the
# line, where nothing between holds a '/' or a ':' and it does not start with a port (a URL
# without a password has a port, a path or a message there).
_SPACED_CREDENTIALS_RE = re.compile(
    r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*):(?!\d+\s)([^/:@\n]*\s[^/:@\n]*)@"
)
# Any run of non-blanks with a ':' before its last '@': a URL with a mistyped scheme
# ('redis//:pw@host', 'redis:://:pw@host', '//:pw@host') looks like nothing else.
_LOOSE_CREDENTIALS_RE = re.compile(r"([^\s:@]*):(\S*)@(?=\S)")
_QUERY_SECRET_RE = re.compile(r"(?i)([?&;](?:password|pass|pwd|auth|token|secret)=)[^&#;]*")
_MASK = "***"
# Secrets shorter than this are masked where a URL shows them, not wherever the text occurs:
# masking every 'ab' in a log line would make it unreadable.
_MIN_REGISTERED = 6
# The configured secrets, masked wherever they occur (see register_secret). Bounded by what a
# process's configs hold.
_SECRETS: set[str] = set()


def register_secret(secret: str | None) -> None:
    """Mask ``secret`` in everything :func:`redact_url` sees from now on, wherever it occurs.

    Called for every password a configuration holds (in a URL or a password field): the
    patterns find a password in a URL however it is typed, and this finds it in text that
    shows it otherwise (a client library's error message, say).
    """
    if secret and len(secret) >= _MIN_REGISTERED:
        _SECRETS.add(secret)


def redact_url(url: str) -> str:
    """Mask any password in a URL so it can be logged or shown in a status page.

    ``redis://user:secret@host:6379/0`` becomes ``redis://user:***@host:6379/0``; a
    ``?password=`` query parameter is masked the same way, as is any password registered with
    :func:`register_secret`. When the string is malformed the function errs on the side of
    hiding too much: it never raises and never returns the secret.

    Args:
        url: any string; non-URLs come back unchanged unless they look like ``user:pw@host``.

    Returns:
        The URL with secrets replaced by ``***``.
    """
    try:
        return _redact(str(url))
    except Exception:
        return "<unprintable url>"


def _redact(url: str) -> str:
    # Greedy up to the last '@' of the run of non-blank characters: an operator may leave '@',
    # '/', '?' or '#' unescaped in a password, and hiding too much beats printing part of a
    # secret. Only a URL's userinfo is touched, so text around it (a Lua error's
    # "@user_script:12", an address) keeps every byte.
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in url:
            url = url.replace(secret, _MASK)
    url = _SPACED_CREDENTIALS_RE.sub(r"\1:***@", url)
    url = _URL_CREDENTIALS_RE.sub(r"\1:***@", url)
    if "://" not in url:
        url = _BARE_CREDENTIALS_RE.sub(r"\1:***@\3", url)
    url = _LOOSE_CREDENTIALS_RE.sub(_loose, url)
    return _QUERY_SECRET_RE.sub(r"\1***", url)


_HOST_PORT_RE = re.compile(r"[\w.\-\[\]']*")


def _loose(match: re.Match[str]) -> str:
    """What is left between a ':' and an '@' that no URL rule masked. Kept as it is: text
    already masked, ``scheme://user@`` (a user, no password) and a Redis Cluster node's
    ``host:port@bus-port``."""
    head, middle = match[1], match[2]
    if middle == _MASK or middle.endswith(":" + _MASK):
        return match[0]
    if middle.startswith("//") and ":" not in middle:
        return match[0]
    if middle.isdigit() and _HOST_PORT_RE.fullmatch(head):
        return match[0]
    return f"{head}:{_MASK}@"
