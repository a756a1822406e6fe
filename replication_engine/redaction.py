"""Secrets out of anything a person reads: one function every log line, error, status field
and metric label that may hold a Redis URL goes through.

Its own module, below config and connection alike, because both need it and neither owns it.
"""

from __future__ import annotations

import re

__all__ = ["redact_url"]

# scheme://user:password@ anywhere in a text, and user:password@host as the whole text.
_URL_CREDENTIALS_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*):(\S*)@")
_BARE_CREDENTIALS_RE = re.compile(r"^([^\s:/@]*):(\S*)@(\S+)$")
_QUERY_SECRET_RE = re.compile(r"(?i)([?&;](?:password|pass|pwd|auth|token|secret)=)[^&#;]*")


def redact_url(url: str) -> str:
    """Mask any password in a URL so it can be logged or shown in a status page.

    ``redis://user:secret@host:6379/0`` becomes ``redis://user:***@host:6379/0``; a
    ``?password=`` query parameter is masked the same way. When the string is malformed the
    function errs on the side of hiding too much: it never raises and never returns the secret.

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
    url = _URL_CREDENTIALS_RE.sub(r"\1:***@", url)
    if "://" not in url:
        url = _BARE_CREDENTIALS_RE.sub(r"\1:***@\3", url)
    return _QUERY_SECRET_RE.sub(r"\1***", url)
