"""Bounded mailboxes with an overflow policy and a separate, never-blocking system lane.

One consumer (the actor's loop) and any number of producers. The user lane is bounded; what
happens when it is full is the actor's ``Overflow`` policy. The system lane carries stop
requests, ``Down``/``Exit`` notices, child exits and state queries: it is never full, so a
flooded actor can always be stopped. The consumer always drains the system lane first.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Any

import outcome
import trio

from .calls import PendingCall
from .errors import ActorStopped, MailboxFull

__all__ = ["Mailbox", "MailboxClosed", "Overflow"]


class Overflow(enum.Enum):
    """What ``cast`` does when the user lane is full."""

    BLOCK = "block"  #: wait for room (backpressure); the default
    FAIL = "fail"  #: raise ``MailboxFull`` in the sender
    DROP_NEWEST = "drop_newest"  #: drop the message being sent (a call fails with MailboxFull)
    DROP_OLDEST = "drop_oldest"  #: evict the oldest queued message (an evicted call fails)


class MailboxClosed(Exception):
    """Raised by ``put`` when the mailbox's actor has stopped for good."""


class Mailbox:
    """An actor's two-lane queue. Items are messages or ``PendingCall`` envelopes."""

    __slots__ = (
        "_receiver",
        "_senders",
        "capacity",
        "closed",
        "dropped",
        "full_reported",
        "on_overflow",
        "overflow",
        "path",
        "peak",
        "system",
        "user",
    )

    def __init__(self, capacity: int, overflow: Overflow, path: str) -> None:
        if capacity < 0:
            raise ValueError("mailbox capacity must be >= 0")
        self.capacity = capacity
        self.overflow = overflow
        self.path = path
        self.user: deque[Any] = deque()
        self.system: list[Any] = []
        self.peak = 0
        self.dropped = 0
        self.full_reported = False
        self.closed = False
        self._receiver: trio.lowlevel.Task | None = None
        self._senders: deque[list[Any]] | None = None  # [task, item] pairs, FIFO
        self.on_overflow: Callable[[Mailbox], None] | None = None

    # -- statistics ---------------------------------------------------------------------

    @property
    def used(self) -> int:
        return len(self.user)

    @property
    def senders_waiting(self) -> int:
        return len(self._senders) if self._senders else 0

    # -- producer side ------------------------------------------------------------------

    def _wake(self) -> None:
        task = self._receiver
        if task is not None:
            self._receiver = None
            trio.lowlevel.reschedule(task)

    def _has_room(self) -> bool:
        user = self.user
        return len(user) < self.capacity or (self._receiver is not None and not user)

    def _append(self, item: Any) -> None:
        user = self.user
        user.append(item)
        if len(user) > self.peak:
            self.peak = len(user)
        self._wake()

    def _overflowed(self) -> None:
        if self.on_overflow is None:
            return
        if self.overflow is Overflow.BLOCK:
            # nothing is lost under BLOCK: one event per episode of backpressure (until the
            # consumer finds the lane empty), not one per blocked send, so that a steady
            # stream of backpressure does not push every other event out of the ring
            if self.full_reported:
                return
            self.full_reported = True
        self.on_overflow(self)

    def put_nowait(self, item: Any) -> bool:
        """Queue ``item`` without blocking; apply the overflow policy when full.

        Returns False when the item was not queued (full under BLOCK, FAIL or DROP_NEWEST, or
        the mailbox is closed). Raises nothing for casts; calls are failed by the caller.
        """
        user = self.user
        if len(user) < self.capacity and not self._senders and not self.closed:
            # the common case, inlined: this is all a try_cast costs
            user.append(item)
            used = len(user)
            if used > self.peak:
                self.peak = used
            task = self._receiver
            if task is not None:
                self._receiver = None
                trio.lowlevel.reschedule(task)
            return True
        if self.closed:
            return False
        if self._has_room() and not self._senders:
            self._append(item)
            return True
        if self.overflow is Overflow.DROP_OLDEST and self.user:
            evicted = self.user.popleft()
            self.dropped += 1
            if type(evicted) is PendingCall:
                evicted.fail(MailboxFull(self.path))
            self._append(item)
            self._overflowed()
            return True
        if self.overflow is not Overflow.BLOCK:
            self.dropped += 1
        self._overflowed()
        return False

    async def put(self, item: Any) -> bool:
        """Queue ``item``, waiting for room under BLOCK; a checkpoint.

        Returns False if the item was dropped (DROP_NEWEST, or the mailbox closed before it
        was queued); raises ``MailboxFull`` under FAIL. Cancellation while waiting leaves the
        mailbox unchanged.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self.put_nowait(item):
            await trio.lowlevel.cancel_shielded_checkpoint()
            return True
        if self.closed:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return False
        if self.overflow is Overflow.FAIL:
            await trio.lowlevel.cancel_shielded_checkpoint()
            raise MailboxFull(self.path)
        if self.overflow is Overflow.DROP_NEWEST:
            await trio.lowlevel.cancel_shielded_checkpoint()
            return False
        senders = self._senders
        if senders is None:
            senders = self._senders = deque()
        entry = [trio.lowlevel.current_task(), item]
        senders.append(entry)

        def abort(_: Any) -> trio.lowlevel.Abort:
            senders.remove(entry)
            return trio.lowlevel.Abort.SUCCEEDED

        queued: bool = await trio.lowlevel.wait_task_rescheduled(abort)
        return queued

    def put_system(self, item: Any) -> None:
        """Queue a control item on the system lane; never blocks, never drops (but a closed
        mailbox, whose actor will never run again, takes nothing)."""
        if self.closed:
            return
        self.system.append(item)
        self._wake()

    # -- consumer side ------------------------------------------------------------------

    def take(self) -> Any:
        """Remove and return the oldest user item (the lane must not be empty)."""
        item = self.user.popleft()
        if self._senders:
            self._admit()
        return item

    def _admit(self) -> None:
        """Move blocked senders' items into the user lane while it has room."""
        senders = self._senders
        user = self.user
        while senders and (len(user) < self.capacity or (self.capacity == 0 and not user)):
            task, waiting = senders.popleft()
            user.append(waiting)
            if len(user) > self.peak:
                self.peak = len(user)
            trio.lowlevel.reschedule(task, outcome.Value(True))

    def take_system(self) -> Any:
        return self.system.pop(0)

    async def wait(self, user_ready: bool = True) -> None:
        """Park the consumer until the system lane (or, if ``user_ready``, either lane) has an
        item. A suspended actor passes False, so queued user messages do not wake it."""
        if self._senders and not self.user:
            self._admit()  # capacity 0: a blocked sender hands over when we are ready
        if (self.user and user_ready) or self.system:
            await trio.lowlevel.checkpoint()
            return
        self.full_reported = False
        self._receiver = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._receiver = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def abort_wait(self, _: Any) -> trio.lowlevel.Abort:
        """The abort function of a consumer parked by ``wait`` (or by the inlined copy of it
        in ``Actor._main``)."""
        self._receiver = None
        return trio.lowlevel.Abort.SUCCEEDED

    def close(self, error: Callable[[], BaseException] | None) -> None:
        """Refuse further items; end every queued call with ``error()`` (ActorStopped if None)."""
        self.closed = True
        pending = list(self.user)
        self.user.clear()
        self.system.clear()
        senders = self._senders
        self._senders = None
        for item in pending:
            if type(item) is PendingCall:
                item.fail(error() if error else ActorStopped(self.path))
        while senders:
            task, item = senders.popleft()
            if type(item) is PendingCall:
                item.fail(error() if error else ActorStopped(self.path))
            trio.lowlevel.reschedule(task, outcome.Value(False))

    def discard_user(self, error: Callable[[], BaseException]) -> None:
        """Drop queued user items, failing calls with ``error()`` (OTP: the mailbox dies)."""
        pending = list(self.user)
        self.user.clear()
        for item in pending:
            if type(item) is PendingCall:
                item.fail(error())
        if self._senders:
            self._admit()


