"""The root of every error the package raises on purpose.

An embedder writes ``except ReplicationError`` and then asks what it can do:

- ``retryable``: the same call may succeed later with nobody changing anything (a Redis that is
  restarting, a peer behind a partition). Back off and try again.
- not retryable: something must change first, and the message says what (a config field, a
  key of the wrong type, a write to a follower that belongs on the primary, a value over the
  payload limit).

Each error keeps the built-in base it had before the tree existed (``ValueError`` for bad input,
``ConnectionError`` for an unreachable server, ``RuntimeError`` otherwise), so code that caught
those still does. redis-py's own errors are wrapped where they cross the public surface of the
store's write API; the wrapped one is the ``__cause__``.
"""

from __future__ import annotations


class ReplicationError(Exception):
    """Base of the package's errors. ``retryable`` says whether waiting alone can fix it: set
    per class, or per instance where one class covers both (a cursor database that another
    process holds locked is worth a retry, one that is corrupt is not)."""

    retryable: bool = False


def describe_tree() -> list[tuple[str, str, bool, str]]:
    """Every error class of the package: (name, built-in base, retryable, module), for the docs
    and for the test that keeps this tree whole."""
    import importlib
    import pkgutil

    import replication_engine

    for info in pkgutil.walk_packages(replication_engine.__path__, "replication_engine."):
        if ".testing" not in info.name and not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    rows: list[tuple[str, str, bool, str]] = []
    pending: list[type[ReplicationError]] = list(ReplicationError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        builtin = next(
            (b.__name__ for b in cls.__mro__[1:] if b.__module__ == "builtins" and b is not object),
            "Exception",
        )
        rows.append((cls.__name__, builtin, cls.retryable, cls.__module__))
    return sorted(rows, key=lambda row: (row[3], row[0]))
