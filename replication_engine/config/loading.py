"""Loading a configuration: YAML, environment overrides, and one error report for all problems.

An operator who fixes a config file one error per restart loses an afternoon, so every problem is
collected and reported together, each line naming its field path and the expected form. The
schema itself lives in :mod:`replication_engine.config.models`; this module reads input into
plain data, applies ``REPLICATION_ENGINE__*`` overrides, validates, and describes what failed
without ever printing a secret.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from replication_engine.config.errors import ConfigError, _FieldProblems, _format_loc, _number
from replication_engine.config.models import EngineConfig
from replication_engine.redaction import redact_url

# Environment variables under this prefix override file values; the double underscore separates
# path segments so field names that contain single underscores stay unambiguous.
ENV_PREFIX = "REPLICATION_ENGINE__"
# The engine's section when the file is shared with a parent daemon's configuration.
WRAPPER_KEY = "replication"
# Long inputs (a pasted certificate, a whole mapping) would drown the one line that matters.
_MAX_VALUE_REPR = 120
# Field names whose values are masked in any message even when they are not SecretStr-typed
# (e.g. a misspelt 'passwd' that is reported as an unknown field).
_SECRET_NAME_PARTS = ("pass", "secret", "token", "auth")


# --------------------------------------------------------------------------------------------
# Loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys.

    PyYAML keeps the last of two equal keys, so a second ``peers:`` block would silently replace
    the first; that must be an error.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        self.flatten_mapping(node)
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                duplicate = False
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> EngineConfig:
    """Read, override from the environment, and validate the engine configuration.

    Args:
        path: a YAML file, with or without the top-level ``replication:`` key (sibling keys of
            ``replication:`` belong to other programs and are ignored).
        env: environment to take overrides from; ``None`` means ``os.environ``. A variable
            ``REPLICATION_ENGINE__<PATH>`` sets the field at PATH (segments joined by ``__``,
            case-insensitive, list indices as numbers), e.g.
            ``REPLICATION_ENGINE__PEERS__0__PASSWORD``. Values are parsed as YAML scalars,
            except for string fields, which take the text as is.

    Returns:
        The validated, frozen configuration.

    Raises:
        ConfigError: for every kind of bad input (missing file, bad YAML, invalid values),
            naming the file and each field path. Never contains a password.
    """
    file = Path(path)
    source = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {source} does not exist", source=source) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {source} is not UTF-8 text (byte {exc.start})", source=source
        ) from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"config file {source} cannot be read: {reason}", source=source) from None
    try:
        document = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(_yaml_problem(source, exc), source=source) from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(
            f"config file {source} is not valid YAML: {type(exc).__name__}", source=source
        ) from None
    return _build(document, env, source=source)


def _yaml_problem(source: str, exc: yaml.MarkedYAMLError) -> str:
    # str(exc) quotes the offending line, which may hold a password; rebuild the message from
    # the parts that cannot.
    mark = exc.problem_mark or exc.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = exc.problem or exc.context or "syntax error"
    if exc.context and exc.problem:
        what = f"{exc.problem} ({exc.context})"
    return f"config file {source} is not valid YAML{where}: {what}"


def _build(document: object, env: Mapping[str, str] | None, *, source: str) -> EngineConfig:
    inner = _unwrap(document, source)
    data, env_paths, problems = _apply_env(inner, os.environ if env is None else env)
    if problems:
        raise ConfigError.from_problems(problems, source)
    try:
        return EngineConfig.model_validate(data)
    except ValidationError as exc:
        # 'from None': the pydantic error quotes raw input values, secrets included.
        raise ConfigError.from_problems(_describe(exc, env_paths), source) from None


def _unwrap(document: object, source: str) -> dict[str, Any]:
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise ConfigError(
            f"config {source}: expected a mapping at the top level, got {type(document).__name__}",
            source=source,
        )
    if WRAPPER_KEY in document:
        inner = document[WRAPPER_KEY]
        if inner is None:
            return {}
        if not isinstance(inner, Mapping):
            raise ConfigError(
                f"config {source}: {WRAPPER_KEY}: expected a mapping, got {type(inner).__name__}",
                source=source,
            )
        document = inner
    return typing.cast(dict[str, Any], _to_plain(document, source))


# Bounds on a document's shape. The real config is a few hundred values a handful of levels
# deep; YAML aliases can make a short file refer to itself (endless nesting) or expand
# exponentially ("billion laughs"), and copying either would end in a RecursionError or
# exhausted memory instead of a message.
_MAX_CONFIG_VALUES = 100_000
_MAX_CONFIG_DEPTH = 32


def _to_plain(document: object, source: str) -> object:
    """A copy of ``document`` made of plain dicts and lists, within the bounds above."""
    budget = _MAX_CONFIG_VALUES

    def copy(value: object, loc: tuple[str | int, ...]) -> object:
        nonlocal budget
        budget -= 1
        if budget < 0:
            raise ConfigError(
                f"config {source}: more than {_MAX_CONFIG_VALUES:,} values "
                "(a YAML alias expanding without bound?)",
                source=source,
            )
        if len(loc) > _MAX_CONFIG_DEPTH:
            raise ConfigError(
                f"config {source}: {_format_loc(loc[:3])}...: nested more than "
                f"{_MAX_CONFIG_DEPTH} levels deep (a YAML alias that contains itself?)",
                source=source,
            )
        if isinstance(value, Mapping):
            return {key: copy(item, (*loc, str(key))) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [copy(item, (*loc, i)) for i, item in enumerate(value)]
        return value

    return copy(document, ())


# --------------------------------------------------------------------------------------------
# Environment overrides


def _apply_env(
    data: dict[str, Any], env: Mapping[str, str]
) -> tuple[dict[str, Any], dict[tuple[str | int, ...], str], list[str]]:
    env_paths: dict[tuple[str | int, ...], str] = {}
    problems: list[str] = []
    for name in sorted(env):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        raw_segments = name[len(ENV_PREFIX) :].split("__")
        if not all(raw_segments):
            problems.append(
                f"{name}: expected {ENV_PREFIX}<FIELD>[__<FIELD>...] with no empty segment"
            )
            continue
        segments: list[str | int] = [
            int(part) if part.isdigit() else part.lower() for part in raw_segments
        ]
        problem = _set_path(data, segments, env[name], name)
        if problem:
            problems.append(problem)
        else:
            env_paths[tuple(segments)] = name
    return data, env_paths, problems


def _set_path(data: dict[str, Any], segments: list[str | int], raw: str, name: str) -> str | None:
    node: Any = data
    walked: list[str | int] = []
    for depth, segment in enumerate(segments):
        is_last = depth == len(segments) - 1
        if isinstance(node, list):
            if not isinstance(segment, int):
                return f"{name}: {_format_loc(walked)} is a list, expected a numeric index"
            if segment >= len(node):
                return (
                    f"{name}: {_format_loc([*walked, segment])} does not exist "
                    f"({_format_loc(walked)} has {len(node)} entries)"
                )
            key: str | int = segment
        elif isinstance(node, dict):
            wanted = str(segment)
            key = next((k for k in node if str(k).lower() == wanted), wanted)
        else:
            return f"{name}: {_format_loc(walked)} is not a mapping, cannot set {segment!r} in it"
        walked.append(segment)
        if is_last:
            node[key] = _parse_env_value(raw, _annotation_at(walked))
            return None
        child = node.get(key) if isinstance(node, dict) else node[key]
        if child is None:
            next_segment = segments[depth + 1]
            if isinstance(next_segment, int):
                return (
                    f"{name}: {_format_loc([*walked, next_segment])} does not exist "
                    f"({_format_loc(walked)} has 0 entries)"
                )
            child = {}
            node[key] = child
        node = child
    return None


def _parse_env_value(raw: str, annotation: object) -> object:
    # A password such as "12345" or "yes" must stay text; YAML would turn it into a number or a
    # boolean that the string field then rejects.
    if _is_text_annotation(annotation):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _unwrap_optional(annotation: object) -> object:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def _is_text_annotation(annotation: object) -> bool:
    return _unwrap_optional(annotation) in (str, SecretStr)


def _annotation_at(loc: Sequence[str | int]) -> object:
    """The declared type at a field path, or None when the path leaves the schema."""
    current: object = EngineConfig
    for segment in loc:
        current = _unwrap_optional(current)
        if isinstance(segment, int):
            if typing.get_origin(current) is not list:
                return None
            current = typing.get_args(current)[0]
        elif isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(segment)
            if field is None:
                return None
            current = field.annotation
        else:
            return None
    return current


# --------------------------------------------------------------------------------------------
# Error reporting


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return any(part in lowered for part in _SECRET_NAME_PARTS)


def _mask(value: object, name: str | None = None) -> object:
    if isinstance(value, SecretStr):
        return "***"
    if name is not None and _is_secret_name(name) and value is not None:
        return "***"
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, Mapping):
        return {key: _mask(item, str(key)) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_mask(item) for item in value]
    return value


def _safe_repr(value: object, loc: Sequence[str | int]) -> str:
    names = [part for part in loc if isinstance(part, str)]
    masked = _mask(value, names[-1] if names else None)
    text = _number(masked) if isinstance(masked, float) else repr(masked)
    if len(text) > _MAX_VALUE_REPR:
        text = text[: _MAX_VALUE_REPR - 3] + "..."
    return text


_EXPECTATIONS = {
    "int_type": "expected an integer",
    "int_parsing": "expected an integer",
    "int_from_float": "expected an integer",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
    "string_type": "expected a string",
    "string_too_short": "must not be empty",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}


def _expectation(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if kind in _EXPECTATIONS:
        return _EXPECTATIONS[kind]
    if kind == "greater_than":
        return f"must be > {_number(ctx.get('gt'))}"
    if kind == "greater_than_equal":
        return f"must be >= {_number(ctx.get('ge'))}"
    if kind == "less_than":
        return f"must be < {_number(ctx.get('lt'))}"
    if kind == "less_than_equal":
        return f"must be <= {_number(ctx.get('le'))}"
    if kind == "literal_error":
        return f"expected {ctx.get('expected')}"
    message = str(error.get("msg", "invalid value"))
    if message.startswith("Input should be "):
        return "expected " + message[len("Input should be ") :]
    return message[:1].lower() + message[1:]


# Fields an older engine had, and why they went: an operator upgrading gets the reason, not
# "unknown field".
_REMOVED_FIELDS = {
    ("local", "tombstone_grace_sec"): (
        "removed: tombstones are collected once every member is known to hold them, not after a "
        "grace period (docs/DELETES.md); delete the line"
    ),
    ("local", "tombstone_gc_interval_sec"): (
        "removed: collection runs every settings.membership.interval_sec; delete the line"
    ),
    ("settings", "rebootstrap"): (
        'removed: a node that went back in time recovers by itself (docs/DELETES.md, "Stores '
        'that go back in time"); delete the section'
    ),
}


def _removed(loc: tuple[str | int, ...]) -> str | None:
    names = [part for part in loc if isinstance(part, str)]
    return _REMOVED_FIELDS.get((names[-2], names[-1])) if len(names) >= 2 else None


def _unknown_field_hint(loc: tuple[str | int, ...]) -> str:
    parent = _unwrap_optional(_annotation_at(loc[:-1]))
    if not (isinstance(parent, type) and issubclass(parent, BaseModel)):
        return ""
    allowed = list(parent.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    suggestion = f"did you mean {close[0]!r}? " if close else ""
    return f" ({suggestion}allowed: {', '.join(allowed)})"


def _origin_note(loc: tuple[str | int, ...], env_paths: Mapping[tuple[str | int, ...], str]) -> str:
    for path, name in env_paths.items():
        if loc[: len(path)] == path:
            return f" (from {name})"
    return ""


def _describe(exc: ValidationError, env_paths: Mapping[tuple[str | int, ...], str]) -> list[str]:
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        loc = tuple(error["loc"])
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _FieldProblems):
            for relative, expected, value in cause.problems:
                full = loc + relative
                note = _origin_note(full, env_paths)
                lines.append(
                    f"{_format_loc(full)}: {expected}, got {_safe_repr(value, full)}{note}"
                )
            continue
        note = _origin_note(loc, env_paths)
        if error["type"] == "missing":
            lines.append(f"{_format_loc(loc)}: required field is missing{note}")
        elif error["type"] == "extra_forbidden" and _removed(loc):
            lines.append(f"{_format_loc(loc)}: {_removed(loc)}{note}")
        elif error["type"] == "extra_forbidden":
            hint = _unknown_field_hint(loc)
            got = _safe_repr(error["input"], loc)
            lines.append(f"{_format_loc(loc)}: unknown field{hint}, got {got}{note}")
        else:
            got = _safe_repr(error["input"], loc)
            lines.append(f"{_format_loc(loc)}: {_expectation(error)}, got {got}{note}")
    return lines
