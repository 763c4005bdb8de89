"""Request/reply plumbing: typed requests, the one-shot reply slot, and the call timer.

A call parks the caller with ``wait_task_rescheduled`` and the actor reschedules it with the
reply: no channel and no cancel scope per call. Timeouts are served by one timer task per
system that keeps a FIFO of pending calls per distinct timeout value; with a uniform default
timeout every new deadline is the latest, so the timer never has to be woken early and the
queue is pruned from its head as calls complete.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import msgspec
import outcome
import trio

from .errors import CallTimeout

__all__ = ["CallTimers", "Handshake", "PendingCall", "Request"]

R = TypeVar("R")


class Request(msgspec.Struct, Generic[R], frozen=True):
    """Base for messages that expect a reply of type ``R``.

    ``class Boot(Request[VmInfo], tag=True): ...`` makes ``await ref.call(Boot())`` typed
    ``VmInfo``. Any message can be sent with ``call``; subclassing only adds the type.
    """


class PendingCall:
    """A call in flight: the message, the parked caller, and its single outcome."""

    __slots__ = ("deadline", "done", "msg", "path", "result", "task", "timeout")

    def __init__(self, msg: Any, path: str, timeout: float | None) -> None:
        self.msg = msg
        self.path = path
        self.timeout = timeout
        self.deadline = math.inf
        self.done = False
        self.task: trio.lowlevel.Task | None = None
        self.result: outcome.Outcome[Any] | None = None

    def _settle(self, result: outcome.Outcome[Any]) -> None:
        if self.done:
            return  # a late reply, or a second outcome: dropped, as in OTP >= 24
        self.done = True
        task = self.task
        if task is None:
            self.result = result  # the caller has not parked yet; it will find this
        else:
            self.task = None
            trio.lowlevel.reschedule(task, result)

    def reply(self, value: Any) -> None:
        """Deliver the reply (ignored if the call already ended)."""
        self._settle(outcome.Value(value))

    def fail(self, error: BaseException) -> None:
        """End the call with ``error`` raised in the caller (ignored if it already ended)."""
        self._settle(outcome.Error(error))

    async def wait(self) -> Any:
        """Park the caller until the call ends; cancelling the caller abandons the call."""
        if self.result is not None:
            await trio.lowlevel.checkpoint()
            return self.result.unwrap()
        self.task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.task = None
            self.done = True
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)


class CallTimers:
    """One task that ends calls whose timeout passed, for every call in one actor system."""

    __slots__ = ("_queues", "_scope")

    def __init__(self) -> None:
        self._queues: dict[float, deque[PendingCall]] = {}
        self._scope: trio.CancelScope | None = None

    def arm(self, call: PendingCall, timeout: float) -> None:
        """Fail ``call`` with ``CallTimeout`` if it has not ended ``timeout`` seconds from now."""
        call.deadline = trio.current_time() + timeout
        queue = self._queues.get(timeout)
        if queue is None:
            queue = self._queues[timeout] = deque()
        else:
            while queue and queue[0].done:
                queue.popleft()
        queue.append(call)
        scope = self._scope
        if scope is not None and call.deadline < scope.deadline:
            scope.deadline = call.deadline

    def pending(self) -> int:
        """How many calls are still tracked (completed ones may linger until pruned)."""
        return sum(1 for q in self._queues.values() for c in q if not c.done)

    async def run(self) -> None:
        """Serve deadlines forever; runs in the system's nursery."""
        while True:
            now = trio.current_time()
            wake = math.inf
            for timeout, queue in list(self._queues.items()):
                while queue and (queue[0].done or queue[0].deadline <= now):
                    call = queue.popleft()
                    if not call.done:
                        call.fail(CallTimeout(call.path, call.timeout or timeout))
                if queue:
                    wake = min(wake, queue[0].deadline)
                else:
                    del self._queues[timeout]
            with trio.CancelScope(deadline=wake) as scope:
                self._scope = scope
                await trio.sleep_forever()
            self._scope = None


class Handshake:
    """The starter's side of starting an incarnation with ``start_soon``: it parks until the
    child reports that its init completed (or failed).

    Cheaper than ``nursery.start``, which opens a temporary nursery and moves the task.
    If the starter is cancelled while it waits, ``on_abort`` kills the child.
    """

    __slots__ = ("on_abort", "result", "task")

    def __init__(self, on_abort: Callable[[], None]) -> None:
        self.task: trio.lowlevel.Task | None = None
        self.result: outcome.Outcome[Any] | None = None
        self.on_abort = on_abort

    def _settle(self, result: outcome.Outcome[Any]) -> None:
        if self.result is not None:
            return
        self.result = result
        task = self.task
        if task is not None:
            self.task = None
            trio.lowlevel.reschedule(task, result)

    def started(self, value: Any = None) -> None:
        self._settle(outcome.Value(value))

    def failed(self, error: BaseException) -> None:
        self._settle(outcome.Error(error))

    async def wait(self) -> Any:
        if self.result is not None:
            await trio.lowlevel.checkpoint()
            return self.result.unwrap()
        self.task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self.task = None
            self.result = outcome.Value(None)  # a late started()/failed() is ignored
            self.on_abort()
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)
