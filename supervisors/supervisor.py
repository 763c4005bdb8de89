"""Supervisor and DynamicSupervisor: OTP supervision for actors.

A supervisor is an actor that sits outside the data path. Its children run in its own
nursery, start in spec order (each ``init`` completes before the next starts) and stop in
reverse order. When a child dies the supervisor applies the restart type and the strategy,
counts the restart against ``intensity`` within ``period`` and, past that, stops every child
and exits with ``SupervisorGaveUp`` so that its own supervisor decides. Starting, restarting
and stopping children happen inside the supervisor's loop, so it is busy while it does them,
exactly as in OTP: keep ``init`` and ``terminate`` short.
"""

from __future__ import annotations

import enum
import functools
import random
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgspec
import trio

from actors import (
    Actor,
    ActorCell,
    ActorCrashed,
    ActorRef,
    ChildExited,
    ExitReason,
    Failure,
    GaveUp,
    Request,
    Restarted,
    Restarting,
    Shutdown,
    StartFailed,
    State,
    is_normal,
)

from .errors import (
    AlreadyPresent,
    AlreadyStarted,
    ChildNotFound,
    ChildRunning,
    ChildStartFailed,
    MaxChildren,
    SupervisorGaveUp,
)
from .spec import AutoShutdown, ChildSpec, Restart, Strategy

__all__ = [
    "ChildCounts",
    "ChildInfo",
    "CountChildren",
    "DeleteChild",
    "DynamicSupervisor",
    "RestartChild",
    "StartChild",
    "StartDynamicChild",
    "Supervisor",
    "TerminateChild",
    "WhichChildren",
    "count_children",
    "delete_child",
    "restart_child",
    "start_child",
    "start_dynamic_child",
    "terminate_child",
    "which_children",
]


class ChildInfo(msgspec.Struct, frozen=True):
    """One row of ``which_children``."""

    id: str
    ref: Any  # ActorRef, or None when the child is not running
    kind: str
    restart: str
    status: str


class ChildCounts(msgspec.Struct, frozen=True):
    """The answer of ``count_children``."""

    specs: int
    active: int
    supervisors: int
    workers: int


class WhichChildren(Request[list[ChildInfo]], frozen=True):
    pass


class CountChildren(Request[ChildCounts], frozen=True):
    pass


class StartChild(Request[ActorRef[Any]], frozen=True):
    spec: ChildSpec


class StartDynamicChild(Request[ActorRef[Any]], frozen=True):
    args: tuple[Any, ...] = ()
    id: str | None = None


class TerminateChild(Request[None], frozen=True):
    id: str


class RestartChild(Request[ActorRef[Any]], frozen=True):
    id: str


class DeleteChild(Request[None], frozen=True):
    id: str


class _RestartDue(msgspec.Struct, frozen=True):
    ids: tuple[str, ...]
    generation: int


class _Status(enum.Enum):
    RUNNING = "running"
    RESTARTING = "restarting"
    TERMINATING = "terminating"
    STOPPED = "stopped"


class _Child:
    """The supervisor's record of one child."""

    __slots__ = ("attempts", "cell", "generation", "kind", "spec", "started_at", "status")

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.cell: ActorCell | None = None
        self.status = _Status.STOPPED
        self.kind = "worker"
        self.started_at = 0.0
        self.attempts = 0  # restarts in the current run of failures, for backoff
        self.generation = 0  # bumps cancel a scheduled (backoff) restart

    @property
    def active(self) -> bool:
        return self.status is _Status.RUNNING

    def info(self) -> ChildInfo:
        ref = self.cell.ref if self.cell is not None and self.active else None
        return ChildInfo(self.spec.id, ref, self.kind, self.spec.restart.value, self.status.value)


class Supervisor(Actor[Any]):
    """A supervisor of a static list of children (which the runtime API can extend).

    ``strategy`` is ONE_FOR_ONE, ONE_FOR_ALL or REST_FOR_ONE; ``intensity`` restarts are
    allowed within ``period`` seconds (default 3 in 5 s; OTP's own default, 1 in 5, is too
    tight for VMs that crash while booting). The worst case in nested trees is the product
    of the intensities on the path. ``auto_shutdown`` needs significant children and the
    other way round. ``seed`` fixes the backoff jitter for tests.
    """

    supervises = True
    background_tasks = True
    kind = "supervisor"

    def __init__(
        self,
        children: Sequence[ChildSpec] = (),
        *,
        strategy: Strategy = Strategy.ONE_FOR_ONE,
        intensity: int = 3,
        period: float = 5.0,
        auto_shutdown: AutoShutdown = AutoShutdown.NEVER,
        seed: int | None = None,
    ) -> None:
        if intensity < 0 or period <= 0:
            raise ValueError("intensity must be >= 0 and period > 0")
        ids = [spec.id for spec in children]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate child ids in {ids}")
        significant = any(spec.significant for spec in children)
        if significant and auto_shutdown is AutoShutdown.NEVER:
            raise ValueError("significant children need auto_shutdown other than NEVER")
        self.strategy = strategy
        self.intensity = intensity
        self.period = period
        self.auto_shutdown = auto_shutdown
        self._specs = list(children)
        self._children: list[_Child] = []
        self._by_id: dict[str, _Child] = {}
        self._restarts: deque[float] = deque()
        self._rng = random.Random(seed)

    # -- lifecycle ------------------------------------------------------------------------

    async def init(self) -> None:
        for spec in self._specs:
            child = self._add(spec)
            try:
                await self._start(child)
            except StartFailed:
                await self._stop_all()
                raise

    async def terminate(self, reason: ExitReason) -> None:
        await self._stop_all()

    async def _stop_all(self) -> None:
        """Stop every running child in reverse start order and cancel pending restarts."""
        for child in reversed(self._children):
            child.generation += 1
            await self._terminate(child)

    # -- bookkeeping ----------------------------------------------------------------------

    def _add(self, spec: ChildSpec) -> _Child:
        child = _Child(spec)
        self._children.append(child)
        self._by_id[spec.id] = child
        return child

    def _remove(self, child: _Child) -> None:
        self._children.remove(child)
        del self._by_id[child.spec.id]
        if child.cell is not None:
            child.cell.close()

    def _get(self, id: str) -> _Child:
        child = self._by_id.get(id)
        if child is None:
            raise ChildNotFound(f"{self.ctx.path} has no child {id!r}")
        return child

    async def _start(self, child: _Child) -> ActorRef[Any]:
        """Start a new incarnation of ``child``; raises StartFailed."""
        spec = child.spec
        path = f"{self.ctx.path}/{spec.id}"
        try:
            instance = spec.start(*spec.args)
        except Exception as exc:  # a factory that raises is a failed start, not our crash
            raise StartFailed(path, exc) from exc
        child.kind = instance.kind
        cell = child.cell
        if cell is None:
            # a previous incarnation of this supervisor may have left the child's cell,
            # retired: reuse it, so refs to the child stay valid across our own restarts
            cell = self.ctx.system.retired_cell(path, self.ctx)
            if cell is None:
                cell = self.ctx.system.new_cell(instance, spec.id, self.ctx)
            child.cell = cell
        cell.reopen()
        assert self.ctx.nursery is not None
        ref: ActorRef[Any] = await cell.start_in(self.ctx.nursery, instance)
        child.status = _Status.RUNNING
        child.started_at = trio.current_time()
        return ref

    async def _terminate(self, child: _Child) -> None:
        """Stop ``child`` by its shutdown spec and retire it (queued calls fail fast)."""
        cell = child.cell
        if cell is None:
            return
        if child.status is _Status.RUNNING and cell.running:
            child.status = _Status.TERMINATING
            await cell.shutdown(Shutdown(), child.spec.shutdown_for(child.kind))
        child.status = _Status.STOPPED
        cell.retire()

    # -- reacting to exits ----------------------------------------------------------------

    async def on_child_exited(self, msg: ChildExited) -> None:
        cell = msg.ref._cell
        child = self._by_id.get(cell.name)
        if child is None or child.cell is not cell or child.status is not _Status.RUNNING:
            return  # we stopped it ourselves, or it is already handled
        if msg.incarnation != cell.incarnation:
            return
        await self._child_died(child, msg.reason)

    async def _child_died(self, child: _Child, reason: ExitReason) -> None:
        spec = child.spec
        child.status = _Status.STOPPED
        restart = spec.restart is Restart.PERMANENT or (
            spec.restart is Restart.TRANSIENT and not is_normal(reason)
        )
        if not restart:
            assert child.cell is not None
            if spec.restart is Restart.TEMPORARY:
                self._remove(child)
            else:
                child.cell.retire()
            if spec.significant:
                self._check_auto_shutdown()
            return
        now = trio.current_time()
        self._restarts.append(now)
        while self._restarts and self._restarts[0] <= now - self.period:
            self._restarts.popleft()
        if len(self._restarts) > self.intensity:
            error = reason.error if type(reason) is Failure else reason
            self.ctx.system.events.publish(GaveUp(self.ctx.path, now, spec.id, str(reason)))
            raise SupervisorGaveUp(self.ctx.path, spec.id, error)
        group = self._group(child)
        for other in reversed(group):
            if other is not child:
                other.generation += 1
                await self._terminate_for_restart(other)
        for other in group:
            if other is not child and other.spec.restart is Restart.TEMPORARY:
                self._remove(other)
        group = [c for c in group if c is child or c.spec.restart is not Restart.TEMPORARY]
        if spec.backoff is not None and now - child.started_at >= spec.backoff.reset_after:
            child.attempts = 0
        child.attempts += 1
        delay = spec.backoff.delay(child.attempts, self._rng) if spec.backoff else 0.0
        for member in group:
            member.status = _Status.RESTARTING
            if member.cell is not None:
                member.cell.state = State.RESTARTING
                self.ctx.system.events.publish(Restarting(member.cell.path, now, delay))
        if delay > 0:
            generation = child.generation = child.generation + 1
            self.ctx.start_soon(self._restart_later, tuple(m.spec.id for m in group), generation, delay)
        else:
            await self._restart(group)

    async def _terminate_for_restart(self, child: _Child) -> None:
        cell = child.cell
        if cell is not None and child.status is _Status.RUNNING and cell.running:
            child.status = _Status.TERMINATING
            await cell.shutdown(Shutdown(), child.spec.shutdown_for(child.kind))
        child.status = _Status.STOPPED

    def _group(self, child: _Child) -> list[_Child]:
        """The children a death of ``child`` affects, in start order."""
        if self.strategy is Strategy.ONE_FOR_ONE:
            return [child]
        live = (_Status.RUNNING, _Status.RESTARTING)
        if self.strategy is Strategy.ONE_FOR_ALL:
            return [c for c in self._children if c is child or c.status in live]
        index = self._children.index(child)
        return [child] + [c for c in self._children[index + 1 :] if c.status in live]

    async def _restart_later(self, ids: tuple[str, ...], generation: int, delay: float) -> None:
        await trio.sleep(delay)
        self.ctx.self.notify(_RestartDue(ids, generation))

    async def on_restart_due(self, msg: _RestartDue) -> None:
        if not msg.ids or msg.ids[0] not in self._by_id:
            return
        # the first id is the child whose death scheduled this; a newer decision supersedes it
        if self._by_id[msg.ids[0]].generation != msg.generation:
            return
        group = [self._by_id[i] for i in msg.ids if i in self._by_id]
        await self._restart([c for c in group if c.status is _Status.RESTARTING])

    async def _restart(self, group: list[_Child]) -> None:
        """Start each child of ``group`` in start order; a failed start counts as a crash."""
        for child in group:
            cell = child.cell
            assert cell is not None
            if cell.on_restart == "discard" and type(cell.exit_reason) is Failure:
                crashed = functools.partial(ActorCrashed, cell.path, cell.exit_reason.error)
                cell.mailbox.discard_user(crashed)
            cell.restarts += 1
            try:
                await self._start(child)
            except StartFailed as exc:
                child.status = _Status.RUNNING  # so that the failure is handled as its death
                await self._child_died(child, Failure(exc.cause))
                return
            self.ctx.system.events.publish(Restarted(cell.path, trio.current_time(), cell.restarts))

    def _check_auto_shutdown(self) -> None:
        if self.auto_shutdown is AutoShutdown.ANY_SIGNIFICANT:
            self.ctx.stop(Shutdown("auto_shutdown"))
        elif self.auto_shutdown is AutoShutdown.ALL_SIGNIFICANT:
            alive = [
                c
                for c in self._children
                if c.spec.significant and c.status is not _Status.STOPPED
            ]
            if not alive:
                self.ctx.stop(Shutdown("auto_shutdown"))

    # -- the runtime API ------------------------------------------------------------------

    async def on_which_children(self, msg: WhichChildren) -> list[ChildInfo]:
        return [child.info() for child in self._children]

    async def on_count_children(self, msg: CountChildren) -> ChildCounts:
        active = [c for c in self._children if c.active]
        supervisors = sum(1 for c in self._children if c.kind == "supervisor")
        return ChildCounts(
            specs=len(self._children),
            active=len(active),
            supervisors=supervisors,
            workers=len(self._children) - supervisors,
        )

    async def on_start_child(self, msg: StartChild) -> ActorRef[Any]:
        spec = msg.spec
        existing = self._by_id.get(spec.id)
        if existing is not None:
            if existing.active:
                raise AlreadyStarted(f"{self.ctx.path}/{spec.id} is running")
            raise AlreadyPresent(f"{self.ctx.path} already has a child spec {spec.id!r}")
        if spec.significant and self.auto_shutdown is AutoShutdown.NEVER:
            raise ChildStartFailed(spec.id, ValueError("significant child without auto_shutdown"))
        return await self._start_added(spec)

    async def _start_added(self, spec: ChildSpec) -> ActorRef[Any]:
        child = self._add(spec)
        try:
            return await self._start(child)
        except StartFailed as exc:
            self._remove(child)
            raise ChildStartFailed(spec.id, exc.cause) from exc

    async def on_terminate_child(self, msg: TerminateChild) -> None:
        child = self._get(msg.id)
        child.generation += 1
        await self._terminate(child)
        if child.spec.restart is Restart.TEMPORARY:
            self._remove(child)

    async def on_restart_child(self, msg: RestartChild) -> ActorRef[Any]:
        child = self._get(msg.id)
        if child.status is not _Status.STOPPED:
            raise ChildRunning(f"{self.ctx.path}/{msg.id} is {child.status.value}")
        try:
            return await self._start(child)
        except StartFailed as exc:
            raise ChildStartFailed(msg.id, exc.cause) from exc

    async def on_delete_child(self, msg: DeleteChild) -> None:
        child = self._get(msg.id)
        if child.status is not _Status.STOPPED:
            raise ChildRunning(f"{self.ctx.path}/{msg.id} is {child.status.value}")
        self._remove(child)


class DynamicSupervisor(Supervisor):
    """Supervises many children made from one template spec (pool slots, sandboxes).

    ``start_dynamic_child(sup, *args)`` starts ``template.start(*template.args, *args)``.
    Children are one_for_one, and on shutdown all of them are stopped concurrently, as OTP's
    simple_one_for_one does. ``max_children`` bounds how many exist at once.
    """

    def __init__(
        self,
        template: ChildSpec,
        *,
        max_children: int | None = None,
        intensity: int = 3,
        period: float = 5.0,
        seed: int | None = None,
    ) -> None:
        if template.significant:
            raise ValueError("a dynamic supervisor's children cannot be significant")
        super().__init__((), intensity=intensity, period=period, seed=seed)
        self.template = template
        self.max_children = max_children
        self._serial = 0

    async def _stop_all(self) -> None:
        async with trio.open_nursery() as nursery:
            for child in self._children:
                child.generation += 1
                nursery.start_soon(self._terminate, child)

    async def on_start_dynamic_child(self, msg: StartDynamicChild) -> ActorRef[Any]:
        if self.max_children is not None and len(self._children) >= self.max_children:
            raise MaxChildren(f"{self.ctx.path} has {len(self._children)} children")
        if msg.id is None:
            self._serial += 1
            id = f"{self.template.id}-{self._serial}"
        else:
            id = msg.id
        if id in self._by_id:
            raise AlreadyStarted(f"{self.ctx.path}/{id} exists")
        spec = msgspec.structs.replace(self.template, id=id, args=(*self.template.args, *msg.args))
        return await self._start_added(spec)

    async def on_start_child(self, msg: StartChild) -> ActorRef[Any]:
        raise ChildStartFailed(msg.spec.id, TypeError("use start_dynamic_child with a template"))

    async def on_terminate_child(self, msg: TerminateChild) -> None:
        child = self._get(msg.id)
        child.generation += 1
        await self._terminate(child)
        self._remove(child)


# -- the runtime API as functions, OTP style ----------------------------------------------


async def which_children(sup: ActorRef[Any], timeout: float | None = 5.0) -> list[ChildInfo]:
    """Every child of ``sup`` in start order, with its ref (None if not running)."""
    return await sup.call(WhichChildren(), timeout)


async def count_children(sup: ActorRef[Any], timeout: float | None = 5.0) -> ChildCounts:
    return await sup.call(CountChildren(), timeout)


async def start_child(sup: ActorRef[Any], spec: ChildSpec, timeout: float | None = 5.0) -> ActorRef[Any]:
    """Add ``spec`` to ``sup`` and start it; AlreadyStarted / AlreadyPresent / ChildStartFailed."""
    return await sup.call(StartChild(spec), timeout)


async def start_dynamic_child(
    sup: ActorRef[Any], *args: Any, id: str | None = None, timeout: float | None = 5.0
) -> ActorRef[Any]:
    """Start a child of a DynamicSupervisor from its template with extra ``args``."""
    return await sup.call(StartDynamicChild(args, id), timeout)


async def terminate_child(sup: ActorRef[Any], id: str, timeout: float | None = None) -> None:
    """Stop child ``id`` by its shutdown spec; its spec stays (unless temporary or dynamic)."""
    await sup.call(TerminateChild(id), timeout)


async def restart_child(sup: ActorRef[Any], id: str, timeout: float | None = 5.0) -> ActorRef[Any]:
    """Start a terminated child again from its spec."""
    return await sup.call(RestartChild(id), timeout)


async def delete_child(sup: ActorRef[Any], id: str, timeout: float | None = 5.0) -> None:
    """Remove the spec of a terminated child."""
    await sup.call(DeleteChild(id), timeout)
