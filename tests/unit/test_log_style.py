"""Every log call in the package is an event name plus structured fields, so the style cannot drift.

The message is a short, stable, dotted event name (``repair.requested``, ``tailer.gap``); every
fact is a field in ``extra``, which the formatters in ``observability/logs.py`` emit (and
redact). A log pipeline then filters on ``msg`` and fields instead of parsing prose. The check
reads the source with ``ast``: nothing is imported or run.
"""

from __future__ import annotations

import ast
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "replication_engine"
# Test harnesses shipped inside the package log for tests, not for operators.
EXCLUDED = PACKAGE / "testing"
EVENT = re.compile(r"^[a-z_]+(\.[a-z_]+)+$")
FIELD = re.compile(r"^[a-z][a-z0-9_]*$")
METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "log"}
# Names logging.Logger.makeRecord refuses in ``extra`` (it raises KeyError at the call).
RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
# The package logs far more than this; fewer calls found means the walk missed them.
MIN_CALLS = 50


@dataclass(frozen=True)
class LogCall:
    where: str
    node: ast.Call

    @property
    def method(self) -> str:
        assert isinstance(self.node.func, ast.Attribute)
        return self.node.func.attr

    def problems(self) -> list[str]:
        """What breaks the style: the message, formatting arguments, the ``extra`` fields."""
        found = []
        if self.method == "warn":
            found.append("Logger.warn is deprecated; use warning")
        at = 1 if self.method == "log" else 0  # log.log(level, event, ...)
        message = self.node.args[at] if len(self.node.args) > at else None
        if not (isinstance(message, ast.Constant) and isinstance(message.value, str)):
            shown = ast.unparse(message) if message is not None else "nothing"
            found.append(f"the message must be a string literal (an event name), got {shown}")
        elif not EVENT.match(message.value):
            found.append(f"{message.value!r} is not an event name like 'repair.requested'")
        if len(self.node.args) > at + 1:
            found.append("%-formatting arguments after the event name; use extra={...} fields")
        extra = next((k.value for k in self.node.keywords if k.arg == "extra"), None)
        if extra is not None and not isinstance(extra, ast.Dict):
            found.append("extra must be a dict literal")
        for key in extra.keys if isinstance(extra, ast.Dict) else []:
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                found.append("field names must be string literals")
            elif not FIELD.match(key.value):
                found.append(f"field {key.value!r} is not snake_case")
            elif key.value in RESERVED:
                found.append(f"field {key.value!r} is a LogRecord attribute (KeyError)")
        return found


def _loggers(tree: ast.Module) -> set[str]:
    """The expressions bound to ``logging.getLogger(...)`` anywhere in the module."""
    names = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) == "logging.getLogger"
        ):
            names.update(ast.unparse(target) for target in node.targets)
    return names


def log_calls(tree: ast.Module, filename: str) -> list[LogCall]:
    loggers = _loggers(tree) | {"logging"}  # logging.info(...) logs on the root logger
    return [
        LogCall(f"{filename}:{node.lineno}", node)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in METHODS
        and ast.unparse(node.func.value) in loggers
    ]


def _package_calls() -> list[LogCall]:
    calls = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if EXCLUDED not in path.parents:
            name = str(path.relative_to(PACKAGE.parent))
            calls += log_calls(ast.parse(path.read_text(), filename=name), name)
    return calls


CALLS = _package_calls()


def test_the_walk_finds_the_package_log_calls() -> None:
    assert len(CALLS) >= MIN_CALLS, [c.where for c in CALLS]


@pytest.mark.parametrize("call", CALLS, ids=[c.where for c in CALLS])
def test_every_log_call_is_an_event_name_plus_snake_case_fields(call: LogCall) -> None:
    assert not call.problems(), f"{call.where}: {call.problems()}"


@pytest.mark.parametrize(
    "source",
    [
        'log.info("repair.requested peer=%s reason=%s keys=%d", peer_id, reason, n)',
        'log.info(f"replication engine {node} running", extra={"peers": peers})',
        'log.warning("peer call failed", extra={"peer": peer})',
        'log.log(logging.ERROR, "apply failed; batch kept")',
        'log.info("engine.started", extra={"nodeId": node})',
        'log.info("engine.started", extra={"name": node})',
        'log.info("engine.started", extra=fields)',
        'logging.warning("engine.started %s", node)',
        'log.warn("engine.started")',
    ],
)
def test_the_check_rejects_the_old_styles_and_bad_fields(source: str) -> None:
    tree = ast.parse("import logging\nlog = logging.getLogger(__name__)\n" + source)
    (call,) = log_calls(tree, "<example>")
    assert call.problems(), source


def test_the_check_accepts_an_event_with_fields() -> None:
    source = 'log.log(level, "tailer.apply_failed", extra={"peer": p, "error": e})'
    tree = ast.parse("import logging\nlog = logging.getLogger(__name__)\n" + source)
    (call,) = log_calls(tree, "<example>")
    assert call.problems() == []
