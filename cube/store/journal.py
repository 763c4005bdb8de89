"""The journal: every sandbox's lifecycle in SQLite (WAL), committed before it is acknowledged.

    async with Journal.open(state_dir / "journal.db") as journal:
        await journal.insert(SandboxRecord(id=..., template="base", driver="ns"))
        await journal.transition(id, Phase.RUNNING, instance=instance)
        page = await journal.list(state=["running", "paused"], metadata={"app": "prod"})

It is the node's one owner of lifecycle truth (ARCHITECTURE.md §6); docs/store.md has the
schema, the transitions and the measurements.

How it keeps the trio loop free: sqlite3 blocks, so every statement runs on a worker thread
(``trio.to_thread.run_sync``) behind a ``CapacityLimiter(1)``, on one connection opened with
``check_same_thread=False``. Only one thread touches the connection at a time.

Group commit: a write is queued, and the first writer that finds no transaction in flight
leads the next one: it takes every queued write (up to ``max_batch``) into one transaction,
commits it, and hands each writer its own outcome. Writers that arrive meanwhile wait for
that transaction to end and then the first of them leads the next. Each write runs in its own
savepoint, so one write's error (an illegal transition) undoes that write alone; a failed
COMMIT fails every write of the transaction, and none of them was written.

Cancellation: a write cancelled before a transaction took it is withdrawn, not written. Once
taken it is committed or failed with the others, and its caller waits (shielded, for at most
one transaction) to hear which, so an acknowledged outcome is never lost to a cancellation.
"""

from __future__ import annotations

import base64
import contextlib
import os
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, Literal, NamedTuple, TypeVar

import msgspec
import outcome
import trio

from .errors import (
    AlreadyExists,
    CommitFailed,
    InvalidQuery,
    InvalidRecord,
    JournalClosed,
    NotFound,
    SchemaTooNew,
)
from .records import (
    LIVE,
    TERMINAL,
    Page,
    Phase,
    SandboxRecord,
    check_field_names,
    check_transition,
    decode_record,
    encode_record,
    validated,
)

__all__ = ["MIGRATIONS", "Journal", "JournalStats", "Migration", "Order", "Synchronous"]

T = TypeVar("T")

Synchronous = Literal["NORMAL", "FULL"]
"""SQLite's ``synchronous`` setting for ordinary commits (docs/store.md: why NORMAL)."""

Order = Literal["asc", "desc"]

Records = list[SandboxRecord]


class Migration(NamedTuple):
    """One step of the schema; applied in order, once, inside one transaction."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        1,
        "sandboxes and node settings",
        (
            # ``record`` is the whole SandboxRecord as JSON; the other columns are copies of
            # its fields that queries filter and sort on, written by the same statement.
            """CREATE TABLE sandboxes (
                id         TEXT PRIMARY KEY NOT NULL,
                state      TEXT NOT NULL,
                template   TEXT NOT NULL,
                alias      TEXT,
                started_at REAL NOT NULL,
                end_at     REAL,
                updated_at REAL NOT NULL,
                record     TEXT NOT NULL
            )""",
            "CREATE INDEX sandboxes_by_start ON sandboxes (started_at, id)",
            "CREATE INDEX sandboxes_by_state ON sandboxes (state, updated_at)",
            """CREATE TABLE settings (
                key        TEXT PRIMARY KEY NOT NULL,
                value      TEXT NOT NULL,
                updated_at REAL NOT NULL
            )""",
        ),
    ),
)
"""The schema, as the list of steps that build it. Append; never edit a released step."""

_VERSION_TABLE: Final = """CREATE TABLE IF NOT EXISTS schema_version (
    version     INTEGER PRIMARY KEY NOT NULL,
    description TEXT NOT NULL,
    applied_at  REAL NOT NULL
)"""

_INSERT: Final = (
    "INSERT INTO sandboxes (id, state, template, alias, started_at, end_at, updated_at, record)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE: Final = (
    "UPDATE sandboxes SET state = ?, template = ?, alias = ?, started_at = ?, end_at = ?,"
    " updated_at = ?, record = ? WHERE id = ?"
)
_SELECT_ONE: Final = "SELECT record FROM sandboxes WHERE id = ?"
_LIVE_STATES: Final = tuple(sorted(phase.value for phase in LIVE))
_TERMINAL_STATES: Final = tuple(sorted(phase.value for phase in TERMINAL))


class JournalStats(msgspec.Struct, frozen=True):
    """Counters since the journal was opened: how well writes are being batched."""

    writes: int  # write operations run (committed or failed)
    transactions: int  # transactions (group commits) that carried them
    largest_batch: int
    reads: int


class _Batch:
    """One transaction's writes; ``done`` is set once every write has its outcome."""

    __slots__ = ("done", "ops")

    def __init__(self, ops: list[_Op]) -> None:
        self.ops = ops
        self.done = trio.Event()


class _Op:
    """One queued write: what to run in the transaction, and what came of it."""

    __slots__ = ("apply", "batch", "durable", "result")

    def __init__(self, apply: Callable[[sqlite3.Connection, float], Any], durable: bool) -> None:
        self.apply = apply
        self.durable = durable
        self.batch: _Batch | None = None
        self.result: outcome.Outcome[Any] | None = None


_Ops = list[_Op]  # spelled here: inside Journal, ``list`` is the method


class Journal:
    """The SQLite journal of one node. Open it with ``Journal.open`` (or ``connect``).

    Every method is async and safe to call from many tasks at once. Writes return only after
    their transaction has committed; declared failures are ``StoreError`` subclasses.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        limiter: trio.CapacityLimiter,
        path: Path,
        synchronous: Synchronous,
        max_batch: int,
    ) -> None:
        self.path = path
        self.synchronous: Synchronous = synchronous
        self.max_batch = max_batch
        self._conn: sqlite3.Connection | None = conn
        self._limiter = limiter
        self._queue: deque[_Op] = deque()
        self._current: _Batch | None = None
        self._closing = False
        self._writes = 0
        self._transactions = 0
        self._largest_batch = 0
        self._reads = 0

    def __repr__(self) -> str:
        return f"<Journal {self.path} {'closed' if self._closing else 'open'}>"

    # -- opening and closing --------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "NORMAL",
        max_batch: int = 512,
        busy_timeout: float = 5.0,
    ) -> Journal:
        """Open (creating or migrating) the journal at ``path``; close it with ``aclose``.

        ``busy_timeout`` is how long a transaction waits for another process's lock (say
        ``sqlite3`` in a shell) before it fails with ``CommitFailed``. The file is created
        with mode 0600: it holds access tokens. Raises ``SchemaTooNew`` if a newer cube
        wrote it.
        """
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        where = Path(path)
        limiter = trio.CapacityLimiter(1)
        conn = await trio.to_thread.run_sync(
            _connect, where, synchronous, busy_timeout, limiter=limiter
        )
        return cls(conn, limiter, where, synchronous, max_batch)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "NORMAL",
        max_batch: int = 512,
        busy_timeout: float = 5.0,
    ) -> AsyncIterator[Journal]:
        """The journal at ``path`` for the duration of the block (see ``connect``)."""
        journal = await cls.connect(
            path, synchronous=synchronous, max_batch=max_batch, busy_timeout=busy_timeout
        )
        try:
            yield journal
        finally:
            await journal.aclose()

    async def aclose(self) -> None:
        """Close the journal; idempotent, and not interrupted by cancellation.

        Waits for the transaction in flight (its writes are committed and acknowledged),
        fails writes still queued with ``JournalClosed``, then closes the connection, which
        checkpoints the WAL into the database file and removes the -wal and -shm files.
        """
        self._closing = True
        with trio.CancelScope(shield=True):
            while self._current is not None:
                await self._current.done.wait()
            if self._conn is not None:
                await trio.to_thread.run_sync(self._close_connection, limiter=self._limiter)

    def _close_connection(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.close()

    @property
    def closed(self) -> bool:
        return self._closing

    def stats(self) -> JournalStats:
        """How many writes and transactions so far (to see group commit at work)."""
        return JournalStats(self._writes, self._transactions, self._largest_batch, self._reads)

    # -- writes -----------------------------------------------------------------------------

    async def insert(self, record: SandboxRecord, *, durable: bool = False) -> SandboxRecord:
        """Add a new sandbox; returns the record as stored (``updated_at`` set).

        Raises ``AlreadyExists`` for a known id and ``InvalidRecord`` for one that does not
        fit the schema (for instance an id that is not 20 characters of ``[a-z0-9]``).
        ``durable`` (on every write method) fsyncs this commit even under
        ``synchronous=NORMAL``: for facts that outlive the host's processes.
        """
        checked, _ = validated(record)

        def apply(conn: sqlite3.Connection, now: float) -> SandboxRecord:
            if _find(conn, checked.id) is not None:
                raise AlreadyExists(checked.id)
            return _write_row(conn, checked, now, new=True)

        return await self._write(apply, durable=durable)

    async def save(self, record: SandboxRecord, *, durable: bool = False) -> SandboxRecord:
        """Write ``record`` as it is now, inserting it if new.

        If a stored record's state differs, the change must be a legal transition
        (``IllegalTransition`` otherwise). For callers that keep the whole record in hand.
        """
        checked, _ = validated(record)

        def apply(conn: sqlite3.Connection, now: float) -> SandboxRecord:
            current = _find(conn, checked.id)
            if current is not None and current.state is not checked.state:
                check_transition(checked.id, current.state, checked.state)
            return _write_row(conn, checked, now, new=current is None)

        return await self._write(apply, durable=durable)

    async def transition(
        self, id: str, new_state: Phase | str, /, *, durable: bool = False, **fields: Any
    ) -> SandboxRecord:
        """Move sandbox ``id`` to ``new_state``, setting ``fields`` in the same write.

        Raises ``NotFound``, ``IllegalTransition`` (see ``records.TRANSITIONS``; e.g.
        killed -> running) or ``InvalidRecord`` (an unknown field, or a bad value).
        """
        state = _phase(new_state, InvalidRecord)
        check_field_names(fields)

        def apply(conn: sqlite3.Connection, now: float) -> SandboxRecord:
            current = _load(conn, id)
            check_transition(id, current.state, state)
            return _write_row(conn, _changed(current, state=state, **fields), now, new=False)

        return await self._write(apply, durable=durable)

    async def update(self, id: str, /, *, durable: bool = False, **fields: Any) -> SandboxRecord:
        """Set ``fields`` of sandbox ``id`` (not its state: that is ``transition``'s job).

        Raises ``NotFound`` or ``InvalidRecord``.
        """
        check_field_names(fields)

        def apply(conn: sqlite3.Connection, now: float) -> SandboxRecord:
            current = _load(conn, id)
            return _write_row(conn, _changed(current, **fields), now, new=False)

        return await self._write(apply, durable=durable)

    async def remove(self, id: str) -> bool:
        """Delete sandbox ``id``'s record, whatever its state; False if there was none."""

        def apply(conn: sqlite3.Connection, now: float) -> bool:
            return conn.execute("DELETE FROM sandboxes WHERE id = ?", (id,)).rowcount > 0

        return await self._write(apply)

    async def purge_older_than(self, seconds: float) -> int:
        """Delete records of ended sandboxes last written more than ``seconds`` ago.

        Live records are never purged. Returns how many were deleted.
        """
        marks = ", ".join("?" * len(_TERMINAL_STATES))

        def apply(conn: sqlite3.Connection, now: float) -> int:
            cursor = conn.execute(
                f"DELETE FROM sandboxes WHERE state IN ({marks}) AND updated_at < ?",
                (*_TERMINAL_STATES, now - seconds),
            )
            return cursor.rowcount

        return await self._write(apply)

    # -- node settings (a small key-value table) ------------------------------------------

    async def set_setting(self, key: str, value: str) -> None:
        """Store a node setting. Committed with ``synchronous=FULL`` (see ``ensure_setting``)."""

        def apply(conn: sqlite3.Connection, now: float) -> None:
            conn.execute(
                "INSERT INTO settings (key, value, updated_at) VALUES (?, ?, ?)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
                " updated_at = excluded.updated_at",
                (key, value, now),
            )

        await self._write(apply, durable=True)

    async def ensure_setting(self, key: str, value: str) -> str:
        """The setting ``key``, storing ``value`` first if it has none (e.g. a new API key).

        Settings cannot be rebuilt from the host (a client already holds the API key), so
        this commit is fsynced even when ordinary commits are not.
        """

        def apply(conn: sqlite3.Connection, now: float) -> str:
            conn.execute(
                "INSERT OR IGNORE INTO settings (key, value, updated_at) VALUES (?, ?, ?)",
                (key, value, now),
            )
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
            return str(row[0])

        return await self._write(apply, durable=True)

    async def get_setting(self, key: str) -> str | None:
        """The setting ``key``, or None."""

        def query(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

        return await self._read(query)

    # -- reads ------------------------------------------------------------------------------

    async def get(self, id: str) -> SandboxRecord:
        """Sandbox ``id``'s record; raises ``NotFound``."""
        return await self._read(lambda conn: _load(conn, id))

    async def live(self) -> Records:
        """Every record whose sandbox may still have processes (starting, running, paused).

        What a restarted node re-adopts or cleans up, oldest first.
        """
        marks = ", ".join("?" * len(_LIVE_STATES))
        sql = f"SELECT record FROM sandboxes WHERE state IN ({marks}) ORDER BY started_at, id"

        def query(conn: sqlite3.Connection) -> Records:
            return [decode_record(row[0]) for row in conn.execute(sql, _LIVE_STATES)]

        return await self._read(query)

    async def list(
        self,
        *,
        state: Iterable[Phase | str] | None = None,
        metadata: Mapping[str, str] | None = None,
        template: str | None = None,
        started_after: float | None = None,
        order: Order = "desc",
        limit: int = 100,
        next_token: str | None = None,
    ) -> Page:
        """One page of records, sorted by start time (then id), newest first by default.

        Filters are those of E2B's ``GET /v2/sandboxes``: ``state`` (any of; None = every
        state), ``metadata`` (every pair equal), ``template`` (id or alias), records started
        after ``started_after``. ``next_token`` is the opaque token of the previous page;
        pass the same filters with it. The order is stable, so paging neither skips nor
        repeats a record that existed throughout. Raises ``InvalidQuery``.
        """
        sql, params = _list_query(
            state=state,
            metadata=metadata or {},
            template=template,
            started_after=started_after,
            order=order,
            limit=limit,
            after=None if next_token is None else _decode_token(next_token),
        )

        def query(conn: sqlite3.Connection) -> Page:
            items = [decode_record(row[0]) for row in conn.execute(sql, params)]
            if len(items) <= limit:
                return Page(items)
            del items[limit:]
            return Page(items, _encode_token(items[-1]))

        return await self._read(query)

    # -- the machinery: one thread, group commit --------------------------------------------

    async def _read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``query`` on the worker thread, between transactions."""
        if self._closing:
            raise JournalClosed(f"{self.path} is closed")
        result = await trio.to_thread.run_sync(self._run_read, query, limiter=self._limiter)
        self._reads += 1
        return result

    def _run_read(self, query: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise JournalClosed(f"{self.path} is closed")
        return query(conn)

    async def _write(
        self, apply: Callable[[sqlite3.Connection, float], T], *, durable: bool = False
    ) -> T:
        """Run ``apply(conn, now)`` in the next group commit; return its result once committed.

        ``durable`` forces ``synchronous=FULL`` for the transaction that carries it.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        op = _Op(apply, durable)
        self._queue.append(op)
        gathered = False
        try:
            while op.batch is None:
                if self._closing:
                    raise JournalClosed(f"{self.path} closed before this write ran")
                current = self._current
                if current is not None:
                    await current.done.wait()
                elif not gathered and trio.lowlevel.current_statistics().tasks_runnable:
                    # Before leading, let the writers that are runnable in this same tick
                    # queue up too: one scheduling round buys a much larger transaction.
                    gathered = True
                    await trio.lowlevel.checkpoint()
                else:
                    await self._commit_next_batch()
        finally:
            if op.batch is None:
                self._queue.remove(op)  # no transaction took it: withdrawn, never written
        batch = op.batch
        if not batch.done.is_set():
            # Taken by a transaction already running on the thread: hear its outcome even if
            # cancelled meanwhile; the wait is bounded by that one transaction.
            with trio.CancelScope(shield=True):
                await batch.done.wait()
        assert op.result is not None
        value: T = op.result.unwrap()
        return value

    async def _commit_next_batch(self) -> None:
        """Lead one transaction: take the queued writes (up to ``max_batch``) and commit them."""
        queue = self._queue
        ops = [queue.popleft() for _ in range(min(len(queue), self.max_batch))]
        batch = _Batch(ops)
        for op in ops:
            op.batch = batch
        self._current = batch
        try:
            # Shielded: these writes were promised a transaction, and others wait on it.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._run_batch, ops, limiter=self._limiter)
        finally:
            self._current = None
            for op in ops:
                if op.result is None:  # the thread never ran (trio itself failed)
                    op.result = outcome.Error(JournalClosed(f"{self.path}: write not run"))
            self._writes += len(ops)
            self._transactions += 1
            self._largest_batch = max(self._largest_batch, len(ops))
            batch.done.set()

    def _run_batch(self, ops: _Ops) -> None:
        """On the worker thread: one transaction for ``ops``; sets every op's outcome."""
        conn = self._conn
        if conn is None:
            for op in ops:
                op.result = outcome.Error(JournalClosed(f"{self.path} is closed"))
            return
        durable = self.synchronous != "FULL" and any(op.durable for op in ops)
        if durable:
            conn.execute("PRAGMA synchronous = FULL")
        try:
            results = _commit(conn, ops)
        except sqlite3.Error as exc:
            for op in ops:
                failure = CommitFailed(f"{self.path}: transaction failed: {exc}")
                failure.__cause__ = exc
                op.result = outcome.Error(failure)
            return
        finally:
            if durable:
                conn.execute(f"PRAGMA synchronous = {self.synchronous}")
        for op, result in zip(ops, results, strict=True):
            op.result = result


# -- on the worker thread ----------------------------------------------------------------


def _connect(path: Path, synchronous: Synchronous, busy_timeout: float) -> sqlite3.Connection:
    """Open the file in WAL mode and bring its schema up to date."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Create it private before SQLite does (with the umask's mode); -wal and -shm copy it.
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    # isolation_level=None: no implicit transactions; BEGIN/COMMIT are ours, one per batch.
    conn = sqlite3.connect(
        path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )
    try:
        (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise RuntimeError(f"{path}: the filesystem refused WAL mode (got {mode!r})")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    """Apply the migrations this file lacks, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")  # two processes opening at once migrate one after the other
    try:
        conn.execute(_VERSION_TABLE)
        (current,) = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
        latest = MIGRATIONS[-1].version
        if current > latest:
            raise SchemaTooNew(f"journal schema {current} is newer than this cube's {latest}")
        for migration in MIGRATIONS:
            if migration.version > current:
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, description, applied_at)"
                    " VALUES (?, ?, ?)",
                    (migration.version, migration.description, time.time()),
                )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _commit(conn: sqlite3.Connection, ops: list[_Op]) -> list[outcome.Outcome[Any]]:
    """Run ``ops`` in one transaction, each in a savepoint; their outcomes, once committed."""
    now = time.time()
    conn.execute("BEGIN IMMEDIATE")
    try:
        results = [_apply_one(conn, op, now) for op in ops]
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # the original error is the one to report
                conn.execute("ROLLBACK")
        raise
    return results


def _apply_one(conn: sqlite3.Connection, op: _Op, now: float) -> outcome.Outcome[Any]:
    conn.execute("SAVEPOINT op")
    try:
        value = op.apply(conn, now)
    except sqlite3.Error:
        raise  # SQLite may have rolled back the whole transaction: every write in it fails
    except Exception as exc:  # this write's own failure: undo it alone, report it to its caller
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        return outcome.Error(exc)
    conn.execute("RELEASE op")
    return outcome.Value(value)


def _find(conn: sqlite3.Connection, id: str) -> SandboxRecord | None:
    row = conn.execute(_SELECT_ONE, (id,)).fetchone()
    return None if row is None else decode_record(row[0])


def _load(conn: sqlite3.Connection, id: str) -> SandboxRecord:
    record = _find(conn, id)
    if record is None:
        raise NotFound(id)
    return record


def _changed(current: SandboxRecord, **fields: Any) -> SandboxRecord:
    """``current`` with ``fields`` set, validated against the schema."""
    try:
        record = msgspec.structs.replace(current, **fields)
    except TypeError as exc:
        raise InvalidRecord(f"sandbox {current.id}: {exc}") from exc
    checked, _ = validated(record)
    return checked


def _write_row(
    conn: sqlite3.Connection, record: SandboxRecord, now: float, *, new: bool
) -> SandboxRecord:
    """Store a validated ``record`` (its columns and its JSON) with ``updated_at = now``."""
    stored = msgspec.structs.replace(record, updated_at=now)
    text = encode_record(stored).decode()
    columns = (stored.state.value, stored.template, stored.alias, stored.started_at)
    if new:
        conn.execute(_INSERT, (stored.id, *columns, stored.end_at, now, text))
    else:
        conn.execute(_UPDATE, (*columns, stored.end_at, now, text, stored.id))
    return stored


# -- list queries and their tokens (pure) ----------------------------------------------------


def _phase(value: Phase | str, error: type[Exception]) -> Phase:
    try:
        return Phase(value)
    except ValueError:
        raise error(f"unknown state {value!r}") from None


def _list_query(
    *,
    state: Iterable[Phase | str] | None,
    metadata: Mapping[str, str],
    template: str | None,
    started_after: float | None,
    order: str,
    limit: int,
    after: tuple[float, str] | None,
) -> tuple[str, list[Any]]:
    """The SELECT for ``Journal.list`` and its parameters (one extra row: is there more?)."""
    if order not in ("asc", "desc"):
        raise InvalidQuery(f"order must be asc or desc, not {order!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise InvalidQuery(f"limit must be a positive integer, not {limit!r}")
    where: list[str] = []
    params: list[Any] = []
    if state is not None:
        states = [_phase(s, InvalidQuery).value for s in state]
        where.append(f"state IN ({', '.join('?' * len(states))})")
        params += states
    if template is not None:
        where.append("(template = ? OR alias = ?)")
        params += [template, template]
    if started_after is not None:
        where.append("started_at > ?")
        params.append(started_after)
    for key, value in metadata.items():
        # json_each compares the decoded key and value, so any key works (spaces, dots,
        # quotes) without building a JSON path from user input.
        where.append(
            "EXISTS (SELECT 1 FROM json_each(record, '$.metadata')"
            " WHERE json_each.key = ? AND json_each.value = ?)"
        )
        params += [key, value]
    if after is not None:
        where.append(f"(started_at, id) {'<' if order == 'desc' else '>'} (?, ?)")
        params += list(after)
    direction = order.upper()
    sql = "SELECT record FROM sandboxes"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += f" ORDER BY started_at {direction}, id {direction} LIMIT ?"
    params.append(limit + 1)
    return sql, params


_TOKEN_DECODER: Final = msgspec.json.Decoder(tuple[float, str])


def _encode_token(last: SandboxRecord) -> str:
    """The opaque token for the page after ``last``: where it sits in the sort order."""
    raw = msgspec.json.encode((last.started_at, last.id))
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _decode_token(token: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        return _TOKEN_DECODER.decode(raw)
    except (ValueError, msgspec.DecodeError) as exc:
        raise InvalidQuery(f"bad pagination token {token!r}") from exc
