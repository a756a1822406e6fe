"""The error an operator sees, and the problem records both halves of the package share.

Kept apart from the schema and the loader because both use it: model validators raise
``_FieldProblems`` naming fields, and the loader turns those and pydantic's own errors into one
``ConfigError``. The few formatting helpers here (field paths, numbers) are the ones both need.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, TypeVar

from pydantic import BaseModel

from replication_engine.errors import ReplicationError

_M = TypeVar("_M", bound=BaseModel)


class ConfigError(ReplicationError, ValueError):
    """The configuration is missing, unreadable or invalid.

    Attributes:
        problems: one line per problem, ``<field path>: <expected>, got <value>``.
        source: the file (or ``"<mapping>"``) the configuration came from.
    """

    def __init__(
        self, message: str, *, problems: Sequence[str] = (), source: str | None = None
    ) -> None:
        super().__init__(message)
        self.problems: tuple[str, ...] = tuple(problems)
        self.source = source

    @classmethod
    def from_problems(cls, problems: Sequence[str], source: str | None) -> ConfigError:
        where = f" in {source}" if source else ""
        count = "1 problem" if len(problems) == 1 else f"{len(problems)} problems"
        lines = "\n".join(f"  {problem}" for problem in problems)
        return cls(
            f"invalid replication configuration{where} ({count}):\n{lines}",
            problems=problems,
            source=source,
        )


class _Problem(NamedTuple):
    loc: tuple[str | int, ...]
    expected: str
    value: object


class _FieldProblems(ValueError):
    """Cross-field findings raised from a model validator.

    Pydantic can only attach a model validator's error to the model itself; carrying the field
    names here lets the error report say ``hot_path.min_batch_size`` instead of ``hot_path``.
    """

    def __init__(self, problems: list[_Problem]) -> None:
        super().__init__("; ".join(f"{_format_loc(p.loc)}: {p.expected}" for p in problems))
        self.problems = problems

    @classmethod
    def check(cls, model: _M, problems: list[_Problem]) -> _M:
        if problems:
            raise cls(problems)
        return model


def _format_loc(loc: Sequence[str | int]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "<root>"


def _number(value: object) -> str:
    # Floats from validated fields print as "300" rather than "300.0", matching the YAML source.
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
