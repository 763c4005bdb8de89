"""Helpers shared by the store tests (a helper module, not a test module)."""

from __future__ import annotations

import secrets
import sqlite3
import string
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cube.store import SandboxRecord

_ALPHABET = string.ascii_lowercase + string.digits


def new_id() -> str:
    """A fresh sandbox id (20 characters of [a-z0-9])."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(20))


def record(**fields: Any) -> SandboxRecord:
    """A valid record with a fresh id; ``fields`` override the defaults."""
    values: dict[str, Any] = {"id": new_id(), "template": "base", "driver": "process"}
    values.update(fields)
    return SandboxRecord(**values)


@contextmanager
def write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Hold the journal's write lock from another connection, as a second process would.

    The journal's next transaction then waits (on its worker thread) until the block ends,
    which makes "a transaction is in flight" a state a test can hold still.
    """
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield other
        other.execute("ROLLBACK")
    finally:
        other.close()


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def peek(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the file from a separate connection, commit, and close it."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        return other.execute(sql, params).fetchall()
    finally:
        other.close()
