"""The actor system: the nursery every actor runs in, its registry, timers, events and tree."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import trio

from .actor import Actor, ActorCell, ActorRef, State
from .calls import CallTimers
from .errors import NoSuchActor
from .events import EventBus, HandlerStuck, MailboxFull
from .exits import ExitReason, Shutdown
from .mailbox import Mailbox
from .signals import InjectCrash, Resume, Suspend

__all__ = ["ActorInfo", "ActorSystem", "TreeSnapshot", "open_actor_system"]

log = logging.getLogger("actors")
log.addHandler(logging.NullHandler())


class ActorInfo(msgspec.Struct, frozen=True):
    """One actor in a ``system.tree()`` snapshot."""

    path: str
    name: str
    kind: str
    state: str
    incarnation: int
    restarts: int
    uptime: float
    mailbox_used: int
    mailbox_capacity: int
    mailbox_peak: int
    senders_waiting: int
    dropped: int
    handled: int
    last_failure: str | None = None
    last_failure_at: float | None = None
    children: list[ActorInfo] = []


class TreeSnapshot(msgspec.Struct, frozen=True):
    """Every actor of a system at one instant (trio's clock)."""

    system: str
    at: float
    count: int
    actors: list[ActorInfo]

    def dump(self) -> str:
        """The tree as text, like ``pstree``."""
        lines = [f"{self.system} ({self.count} actors)"]

        def walk(nodes: list[ActorInfo], prefix: str) -> None:
            for i, node in enumerate(nodes):
                last = i == len(nodes) - 1
                fail = f" last_failure={node.last_failure!r}" if node.last_failure else ""
                lines.append(
                    f"{prefix}{'└─ ' if last else '├─ '}{node.name} [{node.kind} {node.state}]"
                    f" restarts={node.restarts} mbox={node.mailbox_used}/{node.mailbox_capacity}"
                    f" peak={node.mailbox_peak} handled={node.handled}{fail}"
                )
                walk(node.children, prefix + ("   " if last else "│  "))

        walk(self.actors, "")
        return "\n".join(lines)


class ActorSystem:
    """A tree of actors running inside one trio nursery. Create it with ``open_actor_system``."""

    def __init__(self, name: str, nursery: trio.Nursery, event_capacity: int) -> None:
        self.name = name
        self.timers = CallTimers()
        self.events = EventBus(event_capacity)
        self._nursery = nursery
        self._cells: dict[str, ActorCell] = {}
        self._top: dict[str, ActorCell] = {}
        self._top_shutdown: dict[str, float | None] = {}
        self._serial = 0
        self.closing = False

    def __repr__(self) -> str:
        return f"<ActorSystem {self.name} actors={len(self._cells)}>"

    # -- creating actors ------------------------------------------------------------------

    def new_cell(self, actor: Actor[Any], name: str, parent: ActorCell | None) -> ActorCell:
        """Create and register the persistent cell for ``actor`` (not started yet)."""
        path = f"{parent.path if parent else ''}/{name}"
        if path in self._cells:
            raise ValueError(f"an actor named {path} already exists")
        cell = ActorCell(
            self,
            name,
            parent,
            capacity=actor.mailbox_size,
            overflow=actor.overflow,
            kind=actor.kind,
        )
        cell.on_restart = actor.on_restart
        self._cells[path] = cell
        if parent is not None:
            parent.adopt(cell)
        return cell

    def retired_cell(self, path: str, parent: ActorCell) -> ActorCell | None:
        """The cell at ``path`` if it is a child of ``parent`` that is not running (so that a
        restarted supervisor can give its children their old refs back)."""
        cell = self._cells.get(path)
        if cell is None or cell.parent is not parent or cell.running:
            return None
        return cell

    def unique_name(self, prefix: str) -> str:
        self._serial += 1
        return f"{prefix}-{self._serial}"

    async def spawn(
        self,
        actor: Actor[Any] | Callable[[], Actor[Any]],
        name: str | None = None,
        *,
        shutdown: float | str | None = "default",
    ) -> ActorRef[Any]:
        """Start a top-level actor and return its ref once its ``init`` has completed.

        Top-level actors are not restarted; put actors that must be under a ``Supervisor``
        and spawn that. ``shutdown`` is how long the system waits for it to stop when the
        system closes (default 5 s for workers, forever for supervisors; 0 kills at once).
        Raises ``StartFailed`` if ``init`` raises.
        """
        if self.closing:
            raise RuntimeError("the actor system is shutting down")
        instance = actor if isinstance(actor, Actor) else actor()
        name = name or self.unique_name(type(instance).__name__.lower())
        cell = self.new_cell(instance, name, None)
        self._top[name] = cell
        if shutdown == "default":
            self._top_shutdown[name] = None if instance.supervises else 5.0
        elif isinstance(shutdown, str):
            raise ValueError("shutdown must be seconds, None (forever) or 'default'")
        else:
            self._top_shutdown[name] = shutdown
        ref: ActorRef[Any] = await cell.start_in(self._nursery, instance)
        return ref

    def _unregister(self, cell: ActorCell) -> None:
        if self._cells.get(cell.path) is cell:
            del self._cells[cell.path]
        if cell.parent is None and self._top.get(cell.name) is cell:
            del self._top[cell.name]
            self._top_shutdown.pop(cell.name, None)
        elif cell.parent is not None:
            cell.parent.forget(cell)

    def lookup(self, path: str) -> ActorRef[Any]:
        """The stable ref of the actor at ``path`` (e.g. ``/pool/slot-17``)."""
        cell = self._cells.get(path)
        if cell is None:
            raise NoSuchActor(path)
        return cell.ref

    def __contains__(self, path: str) -> bool:
        return path in self._cells

    def __len__(self) -> int:
        return len(self._cells)

    # -- stopping -------------------------------------------------------------------------

    async def stop(self, ref: ActorRef[Any], reason: ExitReason | None = None) -> None:
        """Stop a top-level actor with its shutdown spec and wait until it has ended."""
        cell = ref._cell
        if cell.parent is not None:
            raise ValueError(f"{cell.path} is supervised; use its supervisor's terminate_child")
        timeout = self._top_shutdown.get(cell.name, 5.0)
        await cell.shutdown(reason or Shutdown(), timeout)

    async def shutdown(self) -> None:
        """Stop every top-level actor in reverse start order, each by its shutdown spec."""
        self.closing = True
        for name in reversed(list(self._top)):
            cell = self._top.get(name)
            if cell is not None:
                await cell.shutdown(Shutdown("system"), self._top_shutdown.get(name, 5.0))

    async def _wait_killed(self, cell: ActorCell) -> None:
        """Wait for a cancelled actor to end, reporting it if it is stuck in sync code."""
        waited = 0.0
        while cell.scope is not None:
            with trio.move_on_after(1.0):
                await cell.wait_exited()
                return
            waited += 1.0
            self.events.publish(HandlerStuck(cell.path, trio.current_time(), waited))

    # -- observability and fault injection ------------------------------------------------

    def tree(self) -> TreeSnapshot:
        """A snapshot of every actor, nested as the supervision tree."""
        now = trio.current_time()
        count = 0

        running = State.RUNNING
        states = {state: state.value for state in State}  # Enum.value is a slow descriptor

        def info(cell: ActorCell) -> ActorInfo:
            nonlocal count
            count += 1
            mailbox: Mailbox = cell.mailbox
            failure = cell.last_failure
            children = cell.children
            kids = [info(c) for c in children.values()] if children else []
            state = cell.state
            # positional, in field order: msgspec builds a Struct from keywords ~4x slower
            return ActorInfo(
                cell.path,
                cell.name,
                cell.kind,
                states[state],
                cell.incarnation,
                cell.restarts,
                now - cell.started_at if state is running else 0.0,
                len(mailbox.user),
                mailbox.capacity,
                mailbox.peak,
                mailbox.senders_waiting,
                mailbox.dropped,
                cell.handled,
                failure[0] if failure else None,
                failure[1] if failure else None,
                kids,
            )

        actors = [info(cell) for cell in list(self._top.values())]
        return TreeSnapshot(system=self.name, at=now, count=count, actors=actors)

    def dump(self) -> str:
        """``tree()`` as pstree-like text."""
        return self.tree().dump()

    def inject_crash(self, path: str, error: BaseException | None = None) -> None:
        """Make the actor at ``path`` crash with ``error`` before its next message."""
        cell = self._cell(path)
        cell.mailbox.put_system(InjectCrash(error or RuntimeError(f"injected crash in {path}")))

    def suspend(self, path: str) -> None:
        """Stop the actor at ``path`` from taking user messages (system lane still served)."""
        self._cell(path).mailbox.put_system(Suspend())

    def resume(self, path: str) -> None:
        self._cell(path).mailbox.put_system(Resume())

    def _cell(self, path: str) -> ActorCell:
        cell = self._cells.get(path)
        if cell is None:
            raise NoSuchActor(path)
        return cell

    def _mailbox_overflowed(self, mailbox: Mailbox) -> None:
        self.events.publish(
            MailboxFull(mailbox.path, trio.current_time(), mailbox.overflow.value, mailbox.dropped)
        )

    def log_failure(self, path: str, where: str, error: BaseException) -> None:
        log.warning("%s: %s raised %s: %s", path, where, type(error).__name__, error)


@asynccontextmanager
async def open_actor_system(
    name: str = "system", *, event_capacity: int = 1024
) -> AsyncIterator[ActorSystem]:
    """Run an actor system inside the caller's task for the duration of the block.

    When the block exits (normally, by an exception or by cancellation) every top-level
    actor is stopped in reverse start order, and no task of the system is left behind.
    """
    try:
        async with trio.open_nursery() as nursery:
            system = ActorSystem(name, nursery, event_capacity)
            nursery.start_soon(system.timers.run)
            try:
                yield system
            finally:
                try:
                    await system.shutdown()
                finally:
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # the system's own tasks never raise, so a lone error is the caller's: give it back
        # as it was raised, not wrapped in a group the caller did not open
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise
