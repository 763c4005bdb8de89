"""The Store actor: the node's journal as a member of its supervision tree.

    ChildSpec("store", Store, (state_dir / "journal.db",))
    record = await store.call(Insert(SandboxRecord(...)))
    await store.call(Transition(record.id, Phase.RUNNING, {"instance": instance}))

Every request is answered once the journal has done it: a write's reply means it is
committed. The actor does not handle one request at a time: each handler defers its reply
(OTP's ``noreply``) and runs the request in a background task, so requests that arrive
together reach the journal together and share one transaction (group commit). At most
``max_in_flight`` requests run at once; beyond that the mailbox fills and senders wait.

Crashes: declared errors (``StoreError``: not found, illegal transition, ...) are replies
and the actor keeps running. Anything else (a disk I/O error) crashes it; on the way down it
closes the journal (the transaction in flight commits and is acknowledged first) and its
supervisor restarts it on a fresh connection. Requests still queued in the mailbox are
handled by the next incarnation. An acknowledged write is in the file before the reply is
sent, so no crash of this actor can lose it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import trio

from actors import Actor, ExitReason, PendingCall, Request

from .errors import JournalClosed, StoreError
from .journal import Journal, JournalStats, Synchronous
from .records import Page, Phase, SandboxRecord

__all__ = [
    "EnsureSetting",
    "Get",
    "GetSetting",
    "Insert",
    "List",
    "Live",
    "Purge",
    "Remove",
    "Save",
    "SetSetting",
    "Stats",
    "Store",
    "Transition",
    "Update",
]


class Insert(Request[SandboxRecord], frozen=True, tag=True):
    """Add a new sandbox (``Journal.insert``)."""

    record: SandboxRecord
    durable: bool = False


class Save(Request[SandboxRecord], frozen=True, tag=True):
    """Write a whole record, inserting it if new (``Journal.save``)."""

    record: SandboxRecord
    durable: bool = False


class Transition(Request[SandboxRecord], frozen=True, tag=True):
    """Move a sandbox to another state, setting ``fields`` too (``Journal.transition``)."""

    id: str
    state: Phase
    fields: dict[str, Any] = {}
    durable: bool = False


class Update(Request[SandboxRecord], frozen=True, tag=True):
    """Set fields of a sandbox, not its state (``Journal.update``)."""

    id: str
    fields: dict[str, Any]
    durable: bool = False


class Get(Request[SandboxRecord], frozen=True, tag=True):
    """One sandbox's record (``Journal.get``)."""

    id: str


class List(Request[Page], frozen=True, tag=True):
    """One page of records (``Journal.list``; the same filters)."""

    state: tuple[Phase, ...] | None = None
    metadata: dict[str, str] | None = None
    template: str | None = None
    started_after: float | None = None
    order: Literal["asc", "desc"] = "desc"
    limit: int = 100
    next_token: str | None = None


class Live(Request[list[SandboxRecord]], frozen=True, tag=True):
    """Every record that may still have processes (``Journal.live``)."""


class Remove(Request[bool], frozen=True, tag=True):
    """Delete one record (``Journal.remove``)."""

    id: str


class Purge(Request[int], frozen=True, tag=True):
    """Delete ended records older than ``seconds`` (``Journal.purge_older_than``)."""

    seconds: float


class GetSetting(Request[str | None], frozen=True, tag=True):
    """A node setting, or None (``Journal.get_setting``)."""

    key: str


class SetSetting(Request[None], frozen=True, tag=True):
    """Store a node setting (``Journal.set_setting``)."""

    key: str
    value: str


class EnsureSetting(Request[str], frozen=True, tag=True):
    """A node setting, stored first if missing (``Journal.ensure_setting``)."""

    key: str
    value: str


class Stats(Request[JournalStats], frozen=True, tag=True):
    """The journal's write and transaction counters."""


class Store(Actor[Any]):
    """Owns the node's ``Journal`` (see the module docstring)."""

    background_tasks = True
    mailbox_size = 256

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "NORMAL",
        max_batch: int = 512,
        busy_timeout: float = 5.0,
        max_in_flight: int = 256,
    ) -> None:
        self.path = path
        self.synchronous: Synchronous = synchronous
        self.max_batch = max_batch
        self.busy_timeout = busy_timeout
        self._journal: Journal | None = None
        self._in_flight = trio.Semaphore(max_in_flight)

    async def init(self) -> None:
        self._journal = await Journal.connect(
            self.path,
            synchronous=self.synchronous,
            max_batch=self.max_batch,
            busy_timeout=self.busy_timeout,
        )
        self.ctx.start_soon(self._close_at_exit)

    async def terminate(self, reason: ExitReason) -> None:
        if self._journal is not None:
            await self._journal.aclose()

    async def _close_at_exit(self) -> None:
        """Close the journal when this incarnation ends, also when it is killed (then
        ``terminate`` does not run), so no connection or -wal file outlives it."""
        try:
            await trio.sleep_forever()
        finally:
            await self.journal.aclose()  # idempotent, and shielded inside

    @property
    def journal(self) -> Journal:
        """The open journal (only while the actor runs)."""
        if self._journal is None:
            raise JournalClosed(f"{self.path} is not open")
        return self._journal

    # -- requests -------------------------------------------------------------------------

    async def on_insert(self, msg: Insert) -> None:
        await self._serve(self.journal.insert, msg.record, durable=msg.durable)

    async def on_save(self, msg: Save) -> None:
        await self._serve(self.journal.save, msg.record, durable=msg.durable)

    async def on_transition(self, msg: Transition) -> None:
        await self._serve(
            self.journal.transition, msg.id, msg.state, durable=msg.durable, **msg.fields
        )

    async def on_update(self, msg: Update) -> None:
        await self._serve(self.journal.update, msg.id, durable=msg.durable, **msg.fields)

    async def on_get(self, msg: Get) -> None:
        await self._serve(self.journal.get, msg.id)

    async def on_list(self, msg: List) -> None:
        await self._serve(
            self.journal.list,
            state=msg.state,
            metadata=msg.metadata,
            template=msg.template,
            started_after=msg.started_after,
            order=msg.order,
            limit=msg.limit,
            next_token=msg.next_token,
        )

    async def on_live(self, msg: Live) -> None:
        await self._serve(self.journal.live)

    async def on_remove(self, msg: Remove) -> None:
        await self._serve(self.journal.remove, msg.id)

    async def on_purge(self, msg: Purge) -> None:
        await self._serve(self.journal.purge_older_than, msg.seconds)

    async def on_get_setting(self, msg: GetSetting) -> None:
        await self._serve(self.journal.get_setting, msg.key)

    async def on_set_setting(self, msg: SetSetting) -> None:
        await self._serve(self.journal.set_setting, msg.key, msg.value)

    async def on_ensure_setting(self, msg: EnsureSetting) -> None:
        await self._serve(self.journal.ensure_setting, msg.key, msg.value)

    async def on_stats(self, msg: Stats) -> JournalStats:
        return self.journal.stats()

    # -- serving them concurrently ----------------------------------------------------------

    async def _serve(
        self, method: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> None:
        """Answer the current call from a background task with ``method(*args, **kwargs)``."""
        try:
            # No checkpoint when there is room, so one wakeup of the actor hands a whole burst
            # of requests to the journal at once (one transaction instead of one each).
            self._in_flight.acquire_nowait()
        except trio.WouldBlock:
            await self._in_flight.acquire()  # before deferring: a crash here fails the call
        call = self.ctx.defer_reply()
        self.ctx.start_soon(self._answer, call, functools.partial(method, *args, **kwargs))

    async def _answer(self, call: PendingCall, work: Callable[[], Awaitable[Any]]) -> None:
        try:
            result = await work()
        except StoreError as exc:
            call.fail(exc)
        except Exception as exc:
            call.fail(exc)
            raise  # not a declared error: the file or the disk is in trouble; let it crash
        else:
            call.reply(result)
        finally:
            self._in_flight.release()
            if not call.done:
                # Cancelled before the journal took the write, so it was not written.
                call.fail(JournalClosed(f"{self.path}: the store stopped before this ran"))
