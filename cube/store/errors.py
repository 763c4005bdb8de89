"""The store's errors: one type for each outcome a caller of the journal can act on.

Every one is a ``ReplyError``: the ``Store`` actor answers the call with it and keeps running.
Anything else raised by the journal (a disk I/O error, a corrupt file) is not declared here on
purpose: it crashes the ``Store`` actor, and its supervisor restarts it on a fresh connection.
"""

from __future__ import annotations

from actors import ReplyError

__all__ = [
    "AlreadyExists",
    "CommitFailed",
    "IllegalTransition",
    "InvalidQuery",
    "InvalidRecord",
    "JournalClosed",
    "NotFound",
    "SchemaTooNew",
    "StoreError",
]


class StoreError(ReplyError):
    """Base class of the store's declared errors."""


class NotFound(StoreError, LookupError):
    """No sandbox with this id is in the journal."""

    def __init__(self, id: str) -> None:
        super().__init__(f"sandbox {id} not found")
        self.id = id


class AlreadyExists(StoreError):
    """A sandbox with this id is already in the journal."""

    def __init__(self, id: str) -> None:
        super().__init__(f"sandbox {id} already exists")
        self.id = id


class IllegalTransition(StoreError):
    """The requested state change is not allowed from the sandbox's current state."""

    def __init__(self, id: str, current: str, requested: str) -> None:
        super().__init__(f"sandbox {id}: illegal transition {current} -> {requested}")
        self.id = id
        self.current = current
        self.requested = requested


class InvalidRecord(StoreError, ValueError):
    """A record or a field update does not fit the schema (a bad id, type or field name)."""


class InvalidQuery(StoreError, ValueError):
    """A list query is malformed: a bad limit, order or pagination token."""


class JournalClosed(StoreError):
    """The journal was closed before this operation could run; nothing was written."""


class SchemaTooNew(StoreError):
    """The journal file was written by a newer cube (a schema version this one lacks)."""


class CommitFailed(Exception):
    """The transaction that carried this write failed, so nothing of it was written.

    Deliberately not a ``ReplyError``: it means the file or the disk is in trouble, so the
    ``Store`` actor crashes on it and its supervisor restarts it on a fresh connection. The
    SQLite error is the ``__cause__``.
    """
