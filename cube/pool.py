"""Warm pools: sandboxes started ahead of time, so that create only binds one.

One ``Pool`` actor per template keeps ``size`` sandbox groups warm — started, envd connected
and healthy, nobody bound — under the node's sandboxes supervisor, refilling ``concurrency``
at a time. ``Take`` hands one out at once, or waits for the next fill. A warm group that dies
is dropped and replaced (the pool monitors every one). A pool that cannot fill says why: a
``PoolFailing`` event per failed fill, and the error in ``Take`` replies instead of a hang.

A fill shares the node's trio loop with the create that triggered it, and its first steps
(cgroup writes, forks) run on the loop without yielding. So a ``Take(hold_refill=True)``
starts the replacement of a warm slot only once the taker sends ``Bound`` (or after
``HOLD_TIMEOUT``): the bind in flight is not slowed by its own refill.

With a VM driver that can park (cube/drivers/base.py ``VmHooks``), a warm slot waits with its
guest stopped (the hot tier) and the node unparks it at bind. Events say where each sandbox
came from: ``PoolFilled.tier`` how a slot was started ("durable": restored from a checkpoint,
"cold": booted, "start": a driver without tiers), ``PoolTaken.tier`` how a create was served
("hot": a parked slot, "warm": a ready one, else the tier of the fill it waited for).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from actors import Actor, ActorRef, Down, Event, Monitor, PendingCall, ReplyError, Request
from supervisors import start_dynamic_child, terminate_child

from .config import PoolConfig, TemplateConfig
from .drivers.base import SlotSpec
from .netpolicy import EgressPolicy
from .sandbox import Park, SandboxState, new_sandbox_id

if TYPE_CHECKING:
    from .node import NodeServices

__all__ = [
    "Bound",
    "Pool",
    "PoolError",
    "PoolFailing",
    "PoolFilled",
    "PoolTaken",
    "Slot",
    "Take",
]

HOLD_TIMEOUT = 5.0  # seconds a held refill waits for ``Bound`` before it starts anyway


class PoolError(ReplyError):
    """The pool cannot provide a sandbox; the message says why (the last fill's error)."""


class PoolFailing(Event, frozen=True, tag=True):
    """A fill of the pool at ``path`` failed."""

    error: str


class PoolFilled(Event, frozen=True, tag=True):
    """A warm sandbox joined the pool at ``path`` after ``seconds`` of starting; ``tier``
    says how it was started ("durable", "cold", or "start" for drivers without tiers)."""

    sandbox: str
    seconds: float
    tier: str = "start"


class PoolTaken(Event, frozen=True, tag=True):
    """A create took ``sandbox`` from the pool at ``path``: ``tier`` is "hot" (a parked
    slot), "warm" (a ready one) or, when it had to wait, the tier of the fill it got."""

    sandbox: str
    tier: str


class Slot:
    """A warm sandbox group handed out by a pool."""

    __slots__ = ("group", "monitor", "parked", "state", "tier")

    def __init__(self, state: SandboxState, group: ActorRef[Any], tier: str = "start") -> None:
        self.state = state
        self.group = group
        self.tier = tier  # how it was started (PoolFilled.tier)
        self.parked = False  # its guest is stopped until the node unparks it
        self.monitor: Monitor | None = None


class Take(Request[Slot], frozen=True):
    """Take a warm sandbox; waits for a fill if none is warm.

    ``hold_refill``: the taker binds the slot now and sends ``Bound(id)`` when done; a slot
    taken warm is replaced only then (see the module docstring).
    """

    hold_refill: bool = False


class Bound(msgspec.Struct, frozen=True):
    """The taker of sandbox ``id`` is done binding it (or gave up): refill behind it now."""

    id: str


class PoolStatus(msgspec.Struct, frozen=True):
    template: str
    warm: int
    filling: int
    target: int
    waiting: int
    failures: int
    last_error: str | None
    taken: dict[str, int] = {}  # creates served, by tier (PoolTaken.tier)


class Status(Request[PoolStatus], frozen=True):
    pass


class Resize(Request[None], frozen=True):
    size: int


class _Filled(msgspec.Struct, frozen=True):
    slot: Any


class _FillFailed(msgspec.Struct, frozen=True):
    error: str


class Pool(Actor[Any]):
    """Keeps one template's warm sandboxes (see the module docstring)."""

    background_tasks = True

    def __init__(
        self,
        template: str,
        template_config: TemplateConfig,
        pool_config: PoolConfig,
        services: NodeServices,
    ) -> None:
        self.template = template
        self.template_config = template_config
        self.size = pool_config.size
        self.concurrency = pool_config.concurrency
        self.services = services
        self.warm: deque[Slot] = deque()
        self.filling = 0
        self.waiters: deque[PendingCall] = deque()
        self.binding: dict[str, trio.CancelScope] = {}  # held refills: sandbox id -> expiry
        self.failures = 0  # consecutive failed fills
        self.last_error: str | None = None
        self._retry_at = 0.0
        self.taken: dict[str, int] = {}

    async def init(self) -> None:
        self._fill()

    async def terminate(self, reason: Any) -> None:
        self.binding.clear()
        for call in self.waiters:
            call.fail(PoolError(f"pool {self.template} stopped"))
        self.waiters.clear()

    # -- filling ------------------------------------------------------------------------

    def _wanted(self) -> int:
        return self.size + len(self.waiters) - len(self.warm) - self.filling - len(self.binding)

    def _fill(self) -> None:
        """Start fills until the pool (plus whoever waits) is covered, ``concurrency`` at once."""
        while self._wanted() > 0 and self.filling < self.concurrency:
            self.filling += 1
            delay = max(self._retry_at - trio.current_time(), 0.0)
            self.ctx.start_soon(self._fill_one, delay)

    def spec_for(self, id: str) -> SlotSpec:
        t = self.template_config
        return SlotSpec(
            slot_id=id,
            template=self.template,
            memory_mb=t.memory_mb,
            cpus=t.cpus,
            pids_max=t.pids_max,
            disk_mb=t.disk_mb,
            network=t.network,
        )

    async def _fill_one(self, delay: float) -> None:
        if delay:
            await trio.sleep(delay)
        id = new_sandbox_id()
        state = SandboxState(id, self.template, self.spec_for(id), EgressPolicy())
        started = trio.current_time()
        try:
            group = await start_dynamic_child(
                self.services.sandboxes, state, self.services, id=id, timeout=None
            )
        except Exception as exc:
            self.ctx.self.notify(_FillFailed(f"{type(exc).__name__}: {exc}"))
            return
        state.group = group
        tier = state.instance.extra.get("tier", "start") if state.instance else "start"
        slot = Slot(state, group, tier)
        if getattr(self.services.driver, "park", None) is not None:
            try:
                await self.ctx.system.lookup(f"{group.path}/isolation").call(Park(), timeout=30.0)
            except Exception as exc:
                self.ctx.start_soon(terminate_child, self.services.sandboxes, id)
                self.ctx.self.notify(_FillFailed(f"parking: {type(exc).__name__}: {exc}"))
                return
            slot.parked = True
        now = trio.current_time()
        self.ctx.system.events.publish(PoolFilled(self.ctx.path, now, id, now - started, tier))
        self.ctx.self.notify(_Filled(slot))

    async def on_filled(self, msg: _Filled) -> None:
        self.filling -= 1
        self.failures = 0
        self._retry_at = 0.0
        slot: Slot = msg.slot
        slot.monitor = self.ctx.monitor(slot.group)
        if self.waiters:
            self._hand_out(self.waiters.popleft(), slot, slot.tier)
        else:
            self.warm.append(slot)
        self._fill()

    async def on_fill_failed(self, msg: _FillFailed) -> None:
        self.filling -= 1
        self.failures += 1
        self.last_error = msg.error
        self.ctx.system.events.publish(PoolFailing(self.ctx.path, trio.current_time(), msg.error))
        # whoever waits learns why now, rather than after its own timeout
        while self.waiters:
            self.waiters.popleft().fail(PoolError(f"pool {self.template} cannot start a sandbox: {msg.error}"))
        self._retry_at = trio.current_time() + min(0.05 * 2 ** min(self.failures, 8), 10.0)
        self._fill()

    async def on_down(self, msg: Down) -> None:
        for slot in list(self.warm):
            if slot.group == msg.ref or slot.group._cell is msg.ref._cell:
                self.warm.remove(slot)
        self._fill()

    # -- handing out --------------------------------------------------------------------

    def _hand_out(self, call: PendingCall, slot: Slot, tier: str) -> None:
        if slot.monitor is not None:
            self.ctx.demonitor(slot.monitor)
            slot.monitor = None
        self.taken[tier] = self.taken.get(tier, 0) + 1
        now = trio.current_time()
        self.ctx.system.events.publish(PoolTaken(self.ctx.path, now, slot.state.id, tier))
        call.reply(slot)

    async def on_take(self, msg: Take) -> Slot | None:
        while self.warm:
            slot = self.warm.popleft()
            if slot.group.alive:
                self._hand_out(self.ctx.defer_reply(), slot, "hot" if slot.parked else "warm")
                if msg.hold_refill:
                    self._hold(slot.state.id)
                self._fill()
                return None
        if self.failures and self.filling == 0 and trio.current_time() < self._retry_at:
            raise PoolError(f"pool {self.template} cannot start a sandbox: {self.last_error}")
        self.waiters.append(self.ctx.defer_reply())
        self._fill()
        return None

    def _hold(self, id: str) -> None:
        scope = trio.CancelScope()
        self.binding[id] = scope
        self.ctx.start_soon(self._expire_hold, id, scope)

    async def _expire_hold(self, id: str, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(HOLD_TIMEOUT)
            self.ctx.self.notify(Bound(id))

    async def on_bound(self, msg: Bound) -> None:
        scope = self.binding.pop(msg.id, None)
        if scope is not None:
            scope.cancel()
            self._fill()

    async def on_status(self, msg: Status) -> PoolStatus:
        return PoolStatus(
            template=self.template,
            warm=len(self.warm),
            filling=self.filling,
            target=self.size,
            waiting=len(self.waiters),
            failures=self.failures,
            last_error=self.last_error,
            taken=dict(self.taken),
        )

    async def on_resize(self, msg: Resize) -> None:
        if msg.size < 0:
            raise PoolError("pool size must be >= 0")
        self.size = msg.size
        while len(self.warm) > self.size:
            slot = self.warm.pop()
            if slot.monitor is not None:
                self.ctx.demonitor(slot.monitor)
            self.ctx.start_soon(terminate_child, self.services.sandboxes, slot.state.id)
        self._fill()
