"""The registry: the node's one owner of sandbox lifecycle truth, journaled before acknowledged.

Every bound sandbox has an entry here: its record (what the API shows), its group, its
deadline. Transitions (bound, paused, resumed, killed, timed out, crashed) are written to the
journal first and only then acknowledged. The registry monitors every group, so a sandbox
whose isolation dies is marked ``crashed`` with the reason, and one past its deadline is
killed. Slow work (stopping a group, freezing a cgroup) runs in the registry's background
tasks with the reply deferred, so one slow kill never holds up the next request.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from actors import Actor, ActorError, ActorRef, Down, Failure, Monitor, ReplyError, Request
from supervisors import start_dynamic_child, terminate_child

from .drivers.base import SlotSpec
from .netpolicy import EgressPolicy
from .sandbox import Isolation, Pause, Resume, SandboxState
from .store import Live, Phase, SandboxRecord, Transition, Update

if TYPE_CHECKING:
    from .node import NodeServices

log = logging.getLogger("cube.registry")

__all__ = [
    "Entry",
    "Get",
    "Kill",
    "List",
    "NotFound",
    "PauseSandbox",
    "Register",
    "Registry",
    "ResumeSandbox",
    "SetTimeout",
    "StateConflict",
]


class NotFound(ReplyError):
    """No sandbox with this id (or it is gone)."""


class StateConflict(ReplyError):
    """The sandbox is not in a state that allows this (e.g. pausing a paused sandbox)."""


class Entry:
    """The registry's record of one bound sandbox."""

    __slots__ = ("busy", "deadline", "generation", "group", "monitor", "record", "state")

    def __init__(self, record: SandboxRecord, state: SandboxState, group: ActorRef[Any]) -> None:
        self.record = record
        self.state = state
        self.group = group
        self.monitor: Monitor | None = None
        self.deadline = math.inf  # trio clock
        self.generation = 0  # bumped whenever the deadline changes
        self.busy = False  # a kill is in progress



class Register(Request[SandboxRecord], frozen=True):
    record: SandboxRecord
    state: Any  # SandboxState
    group: Any  # ActorRef


class Get(Request[SandboxRecord], frozen=True):
    id: str


class Lookup(Request[Entry], frozen=True):
    id: str


class List(Request[list[SandboxRecord]], frozen=True):
    state: list[str] | None = None
    metadata: dict[str, str] | None = None


class Kill(Request[SandboxRecord], frozen=True):
    id: str
    reason: str = "killed"


class SetTimeout(Request[SandboxRecord], frozen=True):
    id: str
    seconds: float


class PauseSandbox(Request[SandboxRecord], frozen=True):
    id: str


class ResumeSandbox(Request[SandboxRecord], frozen=True):
    id: str
    timeout: float | None = None


class _Expired(msgspec.Struct, frozen=True):
    id: str
    generation: int


def _wall_to_trio(wall: float) -> float:
    return trio.current_time() + (wall - time.time())


class Registry(Actor[Any]):
    """Owns every bound sandbox's lifecycle (see the module docstring)."""

    background_tasks = True

    def __init__(self, services: NodeServices) -> None:
        self.services = services
        self.entries: dict[str, Entry] = {}
        self._deadlines: list[tuple[float, str, int]] = []
        self._timer_scope: trio.CancelScope | None = None

    async def init(self) -> None:
        self.ctx.start_soon(self._deadline_loop)
        await self._adopt()

    async def terminate(self, reason: Any) -> None:
        # the node is stopping and its sandboxes with it: say so in the journal, so that a
        # restart does not take them for sandboxes lost in a crash
        for entry in list(self.entries.values()):
            if not entry.busy:
                with trio.CancelScope(shield=True):
                    await self._transition(entry, Phase.KILLED, reason="node stopped", end_at=time.time())

    async def _adopt(self) -> None:
        """Take back the sandboxes a previous run left alive; clean up everything else.

        Runs before the pools start, so their warm slots are never taken for leftovers.
        """
        services = self.services
        driver = services.driver
        kept: list[str] = []
        for record in await services.store.call(Live()):
            instance = record.instance
            if instance is None or instance.driver != driver.name or not driver.alive(instance):
                await self._forget(record, "lost while the service was down")
                continue
            policy = EgressPolicy.from_e2b(record.allow_internet_access, record.network)
            state = SandboxState(record.id, record.template, SlotSpec(slot_id=record.id), policy)
            state.adopt = instance
            try:
                group = await start_dynamic_child(
                    services.sandboxes, state, services, id=record.id, timeout=None
                )
            except ReplyError as exc:
                await self._forget(record, f"could not be re-adopted: {exc}")
                continue
            state.group = group
            entry = Entry(record, state, group)
            if record.state == Phase.PAUSED:
                instance.paused = True
            entry.monitor = self.ctx.monitor(group)
            self.entries[record.id] = entry
            self._arm(entry)
            kept.append(record.id)
        removed = await driver.cleanup(kept)
        removed += await services.policy.purge(kept)
        if removed:
            log.info("cleaned up after the previous run: %s", ", ".join(removed))

    async def _forget(self, record: SandboxRecord, why: str) -> None:
        if record.instance is not None:
            with trio.CancelScope(shield=True):
                await self.services.driver.stop(record.instance)
        await self.services.store.call(
            Transition(record.id, Phase.CRASHED, {"reason": why, "end_at": time.time()})
        )

    # -- the journal ----------------------------------------------------------------------

    async def _transition(self, entry: Entry, phase: Phase, **fields: Any) -> SandboxRecord:
        """Write a state change to the journal; returns once it is committed."""
        record = await self.services.store.call(Transition(entry.record.id, phase, fields))
        entry.record = record
        return record

    async def _update(self, entry: Entry, **fields: Any) -> SandboxRecord:
        record = await self.services.store.call(Update(entry.record.id, fields))
        entry.record = record
        return record

    # -- deadlines --------------------------------------------------------------------------

    def _arm(self, entry: Entry) -> None:
        entry.generation += 1
        end_at = entry.record.end_at
        entry.deadline = math.inf if end_at is None else _wall_to_trio(end_at)
        if end_at is None:
            return
        heapq.heappush(self._deadlines, (entry.deadline, entry.record.id, entry.generation))
        scope = self._timer_scope
        if scope is not None and entry.deadline < scope.deadline:
            scope.deadline = entry.deadline

    async def _deadline_loop(self) -> None:
        while True:
            now = trio.current_time()
            heap = self._deadlines
            while heap and heap[0][0] <= now:
                _, id, generation = heapq.heappop(heap)
                self.ctx.self.notify(_Expired(id, generation))
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None

    async def on_expired(self, msg: _Expired) -> None:
        entry = self.entries.get(msg.id)
        if entry is None or entry.generation != msg.generation or entry.busy:
            return
        if entry.record.on_timeout == "pause" and entry.record.state == Phase.RUNNING:
            # E2B's lifecycle.on_timeout = "pause": keep it, frozen, instead of killing it.
            try:
                await self._isolation(entry).call(Pause(), timeout=30)
            except (ActorError, ReplyError):
                pass  # it cannot be paused: it ends as any other sandbox at its deadline
            else:
                await self._transition(entry, Phase.PAUSED)
                return
        self._start_kill(entry, Phase.TIMED_OUT, "timeout", None)

    # -- registration and queries -----------------------------------------------------------

    async def on_register(self, msg: Register) -> SandboxRecord:
        entry = Entry(msg.record, msg.state, msg.group)
        entry.monitor = self.ctx.monitor(msg.group)
        self.entries[msg.record.id] = entry
        self._arm(entry)
        return entry.record

    def _entry(self, id: str) -> Entry:
        entry = self.entries.get(id)
        if entry is None:
            raise NotFound(f"sandbox {id} not found")
        return entry

    async def on_get(self, msg: Get) -> SandboxRecord:
        return self._entry(msg.id).record

    async def on_lookup(self, msg: Lookup) -> Entry:
        return self._entry(msg.id)

    async def on_list(self, msg: List) -> list[SandboxRecord]:
        found = []
        for entry in self.entries.values():
            record = entry.record
            if msg.state and record.state not in msg.state:
                continue
            if msg.metadata and any(record.metadata.get(k) != v for k, v in msg.metadata.items()):
                continue
            found.append(record)
        return found

    async def on_set_timeout(self, msg: SetTimeout) -> SandboxRecord:
        entry = self._entry(msg.id)
        if msg.seconds < 0:
            raise StateConflict("timeout must be >= 0")
        record = await self._update(entry, end_at=time.time() + msg.seconds)
        self._arm(entry)
        return record

    # -- pause and resume -------------------------------------------------------------------

    async def on_pause_sandbox(self, msg: PauseSandbox) -> SandboxRecord:
        entry = self._entry(msg.id)
        if entry.record.state == Phase.PAUSED:
            raise StateConflict(f"sandbox {msg.id} is already paused")
        await self._isolation(entry).call(Pause(), timeout=30)
        return await self._transition(entry, Phase.PAUSED)

    async def on_resume_sandbox(self, msg: ResumeSandbox) -> SandboxRecord:
        entry = self._entry(msg.id)
        if entry.record.state != Phase.PAUSED:
            raise StateConflict(f"sandbox {msg.id} is not paused")
        await self._isolation(entry).call(Resume(), timeout=30)
        fields: dict[str, Any] = {}
        if msg.timeout is not None:
            fields["end_at"] = time.time() + msg.timeout
        record = await self._transition(entry, Phase.RUNNING, **fields)
        self._arm(entry)
        return record

    def _isolation(self, entry: Entry) -> ActorRef[Isolation]:
        return self.ctx.system.lookup(f"{entry.group.path}/isolation")

    # -- kill and crash -----------------------------------------------------------------------

    async def on_kill(self, msg: Kill) -> None:
        entry = self._entry(msg.id)
        self._start_kill(entry, Phase.KILLED, msg.reason, self.ctx.defer_reply())

    def _start_kill(self, entry: Entry, phase: Phase, reason: str, call: Any) -> None:
        entry.busy = True
        if entry.monitor is not None:
            self.ctx.demonitor(entry.monitor)
            entry.monitor = None
        self.ctx.start_soon(self._kill, entry, phase, reason, call)

    async def _kill(self, entry: Entry, phase: Phase, reason: str, call: Any) -> None:
        id = entry.record.id
        try:
            await terminate_child(self.services.sandboxes, id)
        except ReplyError:
            pass  # it was already gone
        record = await self._transition(entry, phase, reason=reason, end_at=time.time())
        self.entries.pop(id, None)
        if call is not None:
            call.reply(record)

    async def on_down(self, msg: Down) -> None:
        for entry in list(self.entries.values()):
            if entry.group is msg.ref and not entry.busy:
                died = entry.state.died
                if died is not None:
                    why = str(died)
                elif type(msg.reason) is Failure:
                    why = f"{type(msg.reason.error).__name__}: {msg.reason.error}"
                else:
                    why = str(msg.reason)
                await self._transition(entry, Phase.CRASHED, reason=why, end_at=time.time())
                self.entries.pop(entry.record.id, None)
