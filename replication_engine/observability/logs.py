"""Structured logs: one JSON object per line when not on a terminal, readable text when on one.

Log calls put their facts in ``extra`` (peer, cursor, error...); this formatter emits them as
fields, so a log pipeline can filter by peer without parsing prose. Anything that may hold a URL
is passed through :func:`redact_url` before it is written.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from replication_engine.redaction import redact_url

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _safe(value: Any) -> Any:
    """Mask URL passwords in one value (strings, and strings inside lists)."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, (list, tuple)):
        return [_safe(v) for v in value]
    return value


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: _safe(v) for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact_url(record.getMessage()),
        }
        body.update(_fields(record))
        if record.exc_info:
            body["exc"] = redact_url(self.formatException(record.exc_info))
        # Values are redacted one by one: redacting the whole line could join two URLs' text.
        return json.dumps(body, default=lambda v: redact_url(str(v)))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname:<7} {record.name.removeprefix('replication_engine.')}: "
        line += redact_url(record.getMessage()) + (f"  {extras}" if extras else "")
        if record.exc_info:
            line += "\n" + redact_url(self.formatException(record.exc_info))
        return line


# redis-py's cluster client logs a failed topology refresh at ERROR, though it keeps serving
# from the topology it has and refreshes again at the next redirection: during a failover or a
# slot migration it is expected, several times, and an ERROR line pages whoever watches them.
# The engine judges a shard that stays unreachable itself (the local store's breaker, a
# peer's breaker), so these lines are kept as warnings, with a hint.
_CLUSTER_LOGGER = "redis.asyncio.cluster"
_TRANSIENT_PREFIX = "Topology refresh failed"
_TRANSIENT_HINT = (
    "the cluster client keeps its current topology and refreshes again; expected during a "
    "failover or slot migration, and the breakers report a shard that stays unreachable"
)


class _TransientClusterErrors(logging.Filter):
    """Turns redis-py's failed-topology-refresh ERROR into a WARNING (see above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.name == _CLUSTER_LOGGER
            and record.levelno == logging.ERROR
            and str(record.msg).startswith(_TRANSIENT_PREFIX)
        ):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.hint = _TRANSIENT_HINT
        return True


def setup_logging(level: str = "INFO", *, json_format: bool | None = None) -> None:
    """The sidecar's logging: one handler on the root logger (an embedder keeps its own)."""
    if json_format is None:
        json_format = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    handler.addFilter(_TransientClusterErrors())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
