"""The store: the node's journal of sandboxes, the one owner of lifecycle truth.

SQLite in WAL mode, embedded; every state transition is committed before it is
acknowledged; writes run on one worker thread and are group-committed, so the trio loop never
waits on the disk. ``Journal`` is the library; ``Store`` is the actor that owns it in a node's
supervision tree. See docs/store.md.
"""

from .actor import (
    EnsureSetting,
    Get,
    GetSetting,
    Insert,
    List,
    Live,
    Purge,
    Remove,
    Save,
    SetSetting,
    Stats,
    Store,
    Transition,
    Update,
)
from .errors import (
    AlreadyExists,
    CommitFailed,
    IllegalTransition,
    InvalidQuery,
    InvalidRecord,
    JournalClosed,
    NotFound,
    SchemaTooNew,
    StoreError,
)
from .journal import MIGRATIONS, Journal, JournalStats, Migration, Order, Synchronous
from .records import LIVE, TERMINAL, TRANSITIONS, Page, Phase, SandboxId, SandboxRecord

__all__ = [
    "LIVE",
    "MIGRATIONS",
    "TERMINAL",
    "TRANSITIONS",
    "AlreadyExists",
    "CommitFailed",
    "EnsureSetting",
    "Get",
    "GetSetting",
    "IllegalTransition",
    "Insert",
    "InvalidQuery",
    "InvalidRecord",
    "Journal",
    "JournalClosed",
    "JournalStats",
    "List",
    "Live",
    "Migration",
    "NotFound",
    "Order",
    "Page",
    "Phase",
    "Purge",
    "Remove",
    "SandboxId",
    "SandboxRecord",
    "Save",
    "SchemaTooNew",
    "SetSetting",
    "Stats",
    "Store",
    "StoreError",
    "Synchronous",
    "Transition",
    "Update",
]
