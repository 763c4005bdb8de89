"""Workers that record their lifecycle, for the supervision tests (a helper, not tests)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from actors import NORMAL, Actor, ActorRef, ActorSystem, Down, ExitReason, Restarted
from supervisors import PERMANENT, Backoff, ChildSpec, Restart


class Boom(Exception):
    """The crash the test workers raise."""


class Crash(msgspec.Struct, frozen=True):
    pass


class Ping(msgspec.Struct, frozen=True):
    """Replies ``(name, incarnation)``."""


class Finish(msgspec.Struct, frozen=True):
    """Makes the worker stop itself with ``reason`` (a normal exit by default)."""

    reason: Any = NORMAL


class Rec(Actor[Any]):
    """A worker that appends ``"init:<name>"``, ``"ready:<name>"`` and ``"stop:<name>"`` (or
    ``"stop-done:<name>"`` after a slow terminate) to a shared log, with times if asked."""

    def __init__(
        self,
        name: str,
        log: list[Any],
        *,
        init_delay: float = 0.0,
        terminate_delay: float = 0.0,
        hang_terminate: bool = False,
        fail_init: bool = False,
        timed: bool = False,
    ) -> None:
        self.name = name
        self.log = log
        self.init_delay = init_delay
        self.terminate_delay = terminate_delay
        self.hang_terminate = hang_terminate
        self.fail_init = fail_init
        self.timed = timed

    def _note(self, what: str) -> None:
        entry = f"{what}:{self.name}"
        self.log.append((entry, trio.current_time()) if self.timed else entry)

    async def init(self) -> None:
        self._note("init")
        if self.init_delay:
            await trio.sleep(self.init_delay)
        if self.fail_init:
            raise Boom(f"{self.name} cannot start")
        self._note("ready")

    async def terminate(self, reason: ExitReason) -> None:
        self._note("stop")
        if self.hang_terminate:
            await trio.sleep_forever()
        if self.terminate_delay:
            await trio.sleep(self.terminate_delay)
            self._note("stop-done")

    async def on_crash(self, msg: Crash) -> None:
        raise Boom(f"{self.name} crashed")

    async def on_ping(self, msg: Ping) -> tuple[str, int]:
        return (self.name, self.ctx.incarnation)

    async def on_finish(self, msg: Finish) -> None:
        self.ctx.stop(msg.reason)


def rec(
    id: str,
    log: list[Any],
    *,
    restart: Restart = PERMANENT,
    shutdown: float | str | None = "default",
    significant: bool = False,
    backoff: Backoff | None = None,
    **actor_options: Any,
) -> ChildSpec:
    """A ChildSpec for a ``Rec`` worker named ``id``."""
    return ChildSpec(
        id,
        functools.partial(Rec, id, log, **actor_options),
        restart=restart,
        shutdown=shutdown,
        significant=significant,
        backoff=backoff,
    )


def sup_spec(id: str, factory: Callable[[], Actor[Any]], **spec_options: Any) -> ChildSpec:
    return ChildSpec(id, factory, **spec_options)


async def crash_and_wait(system: ActorSystem, path: str, restarts: int) -> None:
    """Crash the actor at ``path`` and wait until its restart number ``restarts``."""
    await system.lookup(path).cast(Crash())
    await system.events.wait_for(Restarted, path, lambda e: e.restarts == restarts)


def ref_of(system: ActorSystem, path: str) -> ActorRef[Any]:
    return system.lookup(path)


def strip(log: list[Any]) -> list[Any]:
    """The log without the ``ready:`` entries, to compare orders compactly."""
    return [e for e in log if not (isinstance(e, str) and e.startswith("ready:"))]


class Watch(Actor[Any]):
    """Monitors ``target`` from its ``init`` and records every ``Down``."""

    def __init__(self, target: ActorRef[Any], downs: list[Down]) -> None:
        self.target = target
        self.downs = downs

    async def init(self) -> None:
        self.ctx.monitor(self.target)

    async def on_down(self, msg: Down) -> None:
        self.downs.append(msg)


async def watch(system: ActorSystem, target: ActorRef[Any]) -> list[Down]:
    """Start a top-level watcher of ``target``; returns the list its ``Down``s arrive in."""
    downs: list[Down] = []
    await system.spawn(Watch(target, downs))
    return downs
