"""Lifecycle events and the bounded bus that carries them.

The bus keeps the last ``capacity`` events in a ring. Publishing never blocks and never waits
for subscribers: a subscriber that falls behind skips what was overwritten and is told how
many it missed (``Lagged``). Synchronous hooks run inline and must be quick.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import trio

__all__ = [
    "Crashed",
    "Event",
    "EventBus",
    "GaveUp",
    "HandlerStuck",
    "Lagged",
    "MailboxFull",
    "Restarted",
    "Restarting",
    "Started",
    "Starting",
    "Stopped",
    "Stopping",
]


class Event(msgspec.Struct, frozen=True, tag=True):
    """Base of lifecycle events; ``at`` is trio's clock, ``path`` the actor's path."""

    path: str
    at: float


class Starting(Event, frozen=True, tag=True):
    pass


class Started(Event, frozen=True, tag=True):
    pass


class Crashed(Event, frozen=True, tag=True):
    error: str


class Restarting(Event, frozen=True, tag=True):
    delay: float


class Restarted(Event, frozen=True, tag=True):
    restarts: int


class Stopping(Event, frozen=True, tag=True):
    reason: str


class Stopped(Event, frozen=True, tag=True):
    reason: str


class GaveUp(Event, frozen=True, tag=True):
    """A supervisor exceeded its restart intensity and stopped."""

    child: str
    error: str


class MailboxFull(Event, frozen=True, tag=True):
    policy: str
    dropped: int


class HandlerStuck(Event, frozen=True, tag=True):
    """An actor did not finish after being cancelled: it is blocked in synchronous code."""

    waited: float


class Lagged(Event, frozen=True, tag=True):
    """Given to a subscriber in place of ``missed`` events it was too slow to see."""

    missed: int


E = TypeVar("E", bound=Event)


class EventBus:
    """A bounded broadcast of ``Event``s with drop-oldest semantics."""

    __slots__ = ("_hooks", "_ring", "_seq", "_waiters", "capacity")

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._ring: deque[Event] = deque(maxlen=capacity)
        self._seq = 0  # sequence number of the next event
        self._waiters: trio.Event | None = None
        self._hooks: list[Callable[[Event], None]] = []

    def publish(self, event: Event) -> None:
        """Record ``event``; never blocks."""
        self._ring.append(event)
        self._seq += 1
        for hook in self._hooks:
            hook(event)
        waiters = self._waiters
        if waiters is not None:
            self._waiters = None
            waiters.set()

    def add_hook(self, hook: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``hook(event)`` synchronously on every event; returns a function that removes it."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook)

    def recent(self) -> list[Event]:
        """The events still held in the ring, oldest first."""
        return list(self._ring)

    async def _changed(self) -> None:
        if self._waiters is None:
            self._waiters = trio.Event()
        await self._waiters.wait()

    def subscribe(self, *, replay: bool = False) -> Subscription:
        """Iterate over events published from this call on (or from the ring if ``replay``)."""
        return Subscription(self, self._seq - len(self._ring) if replay else self._seq)

    async def wait_for(
        self,
        kind: type[E],
        path: str | None = None,
        predicate: Callable[[E], bool] | None = None,
        *,
        replay: bool = True,
    ) -> E:
        """Wait for the first event of type ``kind`` (and ``path``, and ``predicate``).

        With ``replay`` (the default) an event already in the ring counts, so a test does not
        race the event it waits for.
        """
        async for event in self.subscribe(replay=replay):
            if (
                isinstance(event, kind)
                and (path is None or event.path == path)
                and (predicate is None or predicate(event))
            ):
                return event
        raise AssertionError("unreachable")  # pragma: no cover

    def of(self, kind: type[E], path: str | None = None) -> list[E]:
        """Events of type ``kind`` (and ``path``) still in the ring, oldest first."""
        return [e for e in self._ring if isinstance(e, kind) and (path is None or e.path == path)]


class Subscription:
    """An async iterator over a bus's events from a fixed starting point."""

    __slots__ = ("_bus", "_cursor")

    def __init__(self, bus: EventBus, cursor: int) -> None:
        self._bus = bus
        self._cursor = cursor

    def __aiter__(self) -> Subscription:
        return self

    async def aclose(self) -> None:
        """Nothing to release; here so that ``contextlib.aclosing`` works."""

    async def __anext__(self) -> Event:
        bus = self._bus
        while True:
            oldest = bus._seq - len(bus._ring)
            if self._cursor < oldest:
                missed = oldest - self._cursor
                self._cursor = oldest
                await trio.lowlevel.checkpoint()
                return Lagged(path="", at=trio.current_time(), missed=missed)
            if self._cursor < bus._seq:
                event = bus._ring[self._cursor - oldest]
                self._cursor += 1
                await trio.lowlevel.checkpoint()
                return event
            await bus._changed()


def describe(error: Any) -> str:
    """A one-line description of an exception for events and snapshots."""
    return f"{type(error).__name__}: {error}"
