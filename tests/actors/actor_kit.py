"""Messages and actors shared by the kernel tests (a helper module, not a test module)."""

from __future__ import annotations

from typing import Any

import msgspec
import trio

from actors import (
    Actor,
    ActorInfo,
    ActorStopped,
    ActorSystem,
    Down,
    Exit,
    ExitReason,
    Monitor,
    Overflow,
    ReplyError,
)


class Boom(Exception):
    """The crash the test actors raise."""


class Invalid(ReplyError):
    """A declared reply error."""


class Get(msgspec.Struct, frozen=True):
    pass


class Add(msgspec.Struct, frozen=True):
    n: int


class Sleep(msgspec.Struct, frozen=True):
    seconds: float


class Block(msgspec.Struct, frozen=True):
    """Handled by waiting on the actor's gate; replies "released"."""


class Fail(msgspec.Struct, frozen=True):
    """Handled by raising the declared reply error ``Invalid``."""


class Crash(msgspec.Struct, frozen=True):
    """Handled by raising ``Boom`` (a crash)."""


class CrashAfterGate(msgspec.Struct, frozen=True):
    """Handled by waiting on the actor's gate, then raising ``Boom``."""


class Incarnation(msgspec.Struct, frozen=True):
    """Replies with the actor's incarnation number."""


class Unhandled(msgspec.Struct, frozen=True):
    """No actor has a handler for this."""


class Counter(Actor[Any]):
    """Adds numbers; records what it handled and how it terminated."""

    def __init__(self, gate: trio.Event | None = None, log: list[Any] | None = None) -> None:
        self.gate = gate if gate is not None else trio.Event()
        self.log = log if log is not None else []
        self.total = 0
        self.seen: list[int] = []

    async def on_add(self, msg: Add) -> int:
        self.total += msg.n
        self.seen.append(msg.n)
        return self.total

    async def on_get(self, msg: Get) -> int:
        return self.total

    async def on_sleep(self, msg: Sleep) -> str:
        await trio.sleep(msg.seconds)
        return "slept"

    async def on_block(self, msg: Block) -> str:
        await self.gate.wait()
        return "released"

    async def on_fail(self, msg: Fail) -> None:
        raise Invalid("bad argument")

    async def on_crash(self, msg: Crash) -> None:
        raise Boom("boom")

    async def on_crash_after_gate(self, msg: CrashAfterGate) -> None:
        await self.gate.wait()
        raise Boom("boom after gate")

    async def on_incarnation(self, msg: Incarnation) -> int:
        return self.ctx.incarnation

    async def terminate(self, reason: ExitReason) -> None:
        self.log.append(("terminate", reason))


def counter_class(size: int, overflow: Overflow = Overflow.BLOCK, **attrs: Any) -> type[Counter]:
    """A Counter subclass with the given mailbox size, overflow policy and other options."""
    return type("SizedCounter", (Counter,), {"mailbox_size": size, "overflow": overflow, **attrs})


class Watch(msgspec.Struct, frozen=True):
    ref: Any


class Unwatch(msgspec.Struct, frozen=True):
    token: Any


class LinkTo(msgspec.Struct, frozen=True):
    ref: Any


class Watcher(Actor[Any]):
    """Monitors or links on request and records every ``Down`` and ``Exit`` it receives."""

    def __init__(self, notices: list[Any], log: list[Any] | None = None) -> None:
        self.notices = notices
        self.log = log if log is not None else []

    async def on_watch(self, msg: Watch) -> Monitor:
        return self.ctx.monitor(msg.ref)

    async def on_unwatch(self, msg: Unwatch) -> None:
        self.ctx.demonitor(msg.token)

    async def on_link_to(self, msg: LinkTo) -> ActorStopped | None:
        try:
            self.ctx.link(msg.ref)
        except ActorStopped as exc:
            return exc  # handed back so that the test can inspect it
        return None

    async def on_down(self, msg: Down) -> None:
        self.notices.append(msg)

    async def on_exit(self, msg: Exit) -> None:
        self.notices.append(msg)

    async def on_crash(self, msg: Crash) -> None:
        raise Boom("watcher boom")

    async def on_get(self, msg: Get) -> str:
        return "alive"

    async def terminate(self, reason: ExitReason) -> None:
        self.log.append(("terminate", reason))


class TrappingWatcher(Watcher):
    trap_exits = True


def info(system: ActorSystem, path: str) -> ActorInfo:
    """The ``system.tree()`` row of the actor at ``path``."""
    stack = list(system.tree().actors)
    while stack:
        node = stack.pop()
        if node.path == path:
            return node
        stack.extend(node.children)
    raise KeyError(path)


def all_tasks() -> set[trio.lowlevel.Task]:
    """Every task of the current trio run, walked from the root task."""
    found: set[trio.lowlevel.Task] = set()
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        found.add(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return found
