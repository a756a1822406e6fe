"""One error tree: every error the package raises on purpose derives from ``ReplicationError``,
keeps the built-in base it had, and says whether waiting alone can fix it."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import replication_engine
from replication_engine.errors import ReplicationError, describe_tree

# name -> (built-in base, retryable)
EXPECTED = {
    "CodecError": ("ValueError", False),
    "ConfigError": ("ValueError", False),
    "CursorError": ("Exception", False),  # per instance: True for a lock held elsewhere
    "CursorSaveFailed": ("RuntimeError", False),
    "EngineError": ("RuntimeError", False),
    "FormatError": ("ValueError", False),
    "GeometryError": ("ValueError", False),
    "InvalidWriteError": ("ValueError", False),
    "LocalStoreError": ("RuntimeError", True),
    "MigrationError": ("RuntimeError", False),
    "NotReplicatedError": ("RuntimeError", True),
    "PeerIdentityError": ("ValueError", False),
    "PeerLayoutError": ("ValueError", False),
    "PeerUnavailable": ("ConnectionError", True),
    "ReadOnlyStoreError": ("RuntimeError", False),
    "StoreAccessError": ("PermissionError", False),
    "StoreError": ("Exception", False),
    "StoreKeyError": ("RuntimeError", False),
    "StoreOwnershipError": ("RuntimeError", False),
    "StoreUnavailableError": ("ConnectionError", True),
}


def package_exceptions() -> dict[str, type[BaseException]]:
    """Every public exception class defined in the package (the test harness aside)."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(replication_engine.__path__, "replication_engine."):
        if ".testing" in info.name or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == info.name
                and not name.startswith("_")
            ):
                found[name] = obj
    return found


def test_every_public_error_of_the_package_is_a_replication_error() -> None:
    stray = sorted(
        n for n, c in package_exceptions().items() if not issubclass(c, ReplicationError)
    )
    assert not stray, f"errors outside the tree: {stray}"


def test_the_tree_as_documented() -> None:
    tree = describe_tree()
    print()
    for name, builtin, retryable, module in tree:
        print(f"{name:<24} {builtin:<16} retryable={retryable!s:<5} {module}")
    assert {name: (builtin, retryable) for name, builtin, retryable, _ in tree} == EXPECTED


def test_every_error_is_exported_from_the_package() -> None:
    exported = {n for n in replication_engine.__all__ if n.endswith(("Error", "Unavailable"))}
    assert exported >= set(EXPECTED) - {"CursorSaveFailed", "LocalStoreError"}
    assert "ReplicationError" in replication_engine.__all__
