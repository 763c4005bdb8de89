"""One sandbox as a supervision group: isolation, network policy and guest link.

    /node/sandboxes/<id>            Supervisor, ONE_FOR_ONE, auto_shutdown=ANY_SIGNIFICANT
        isolation                   the jail / namespace / VM: temporary and significant
        net                         the network policy: permanent (a restart re-applies it)
        guest                       the GuestLink: permanent (a restart reconnects to envd)

A crash of ``net`` or ``guest`` restarts only that actor, so the running sandbox is not
disturbed. The end of the isolation actor (its root process died, or it was stopped) ends
the group: a warm pool slot is then replaced by its pool, a bound sandbox is marked
``crashed`` by the registry, which monitors every group.

The group is started once, warm, by a pool; its id is the sandbox id it will have when a
create binds it, so nothing is renamed or moved when that happens.
"""

from __future__ import annotations

import secrets
import string
from typing import TYPE_CHECKING, Any

import trio

from actors import Actor, ActorRef, ExitReason, Request
from supervisors import (
    ANY_SIGNIFICANT,
    TEMPORARY,
    ChildSpec,
    ProcessExited,
    Spawn,
    Supervisor,
    Watch,
)

from .drivers.base import Driver, Instance, SlotSpec
from .guestlink import GuestLink
from .netpolicy import EgressPolicy, NetPolicyDriver, SandboxNet

if TYPE_CHECKING:
    from .node import NodeServices

__all__ = [
    "Isolation",
    "NetPolicy",
    "SandboxDied",
    "SandboxState",
    "new_sandbox_id",
    "sandbox_group",
]

_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_sandbox_id() -> str:
    """A sandbox id: 20 characters of [a-z0-9], as E2B's."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(20))


def valid_sandbox_id(value: str) -> bool:
    return len(value) == 20 and all(c in _ID_ALPHABET for c in value)


class SandboxState:
    """What the members of one sandbox group share: set by isolation, read by the others."""

    def __init__(self, id: str, template: str, spec: SlotSpec, policy: EgressPolicy) -> None:
        self.id = id
        self.template = template
        self.spec = spec
        self.policy = policy
        self.instance: Instance | None = None
        self.adopt: Instance | None = None  # re-adopt this instead of starting a new one
        self.instance_ready = trio.Event()
        self.died: ProcessExited | None = None
        self.group: ActorRef[Any] | None = None

    def __repr__(self) -> str:
        return f"<SandboxState {self.id} {self.template}>"


class SandboxDied(Exception):
    """The sandbox's root process exited on its own."""


class Pause(Request[None], frozen=True):
    pass


class Resume(Request[None], frozen=True):
    pass


class Isolation(Actor[Any]):
    """Owns the sandbox's isolation (a namespace jail, a process, a VM) through its driver.

    ``init`` starts it (or re-adopts a running one after a service restart); the root
    process's exit ends this actor, and with it the group; ``terminate`` tears everything
    down through the driver.
    """

    def __init__(self, state: SandboxState, services: NodeServices) -> None:
        self.state = state
        self.services = services
        self.driver: Driver = services.driver

    async def _spawn(self, argv: list[str], **kwargs: Any) -> Any:
        return await self.services.reaper.call(Spawn(list(argv), owner=self.ctx.self, **kwargs))

    async def init(self) -> None:
        state = self.state
        if state.adopt is not None:
            instance = state.adopt
            if not self.driver.alive(instance):
                raise SandboxDied(f"{state.id}: its root process {instance.pid} is gone")
            # not our child any more (a previous run spawned it): watch it by pidfd
            await self.services.reaper.call(Watch(instance.pid, self.ctx.self))
        else:
            instance = await self.driver.start(state.spec, self._spawn)
        state.instance = instance
        state.instance_ready.set()

    async def on_exited(self, msg: ProcessExited) -> None:
        instance = self.state.instance
        if msg.orphan or instance is None or msg.pid != instance.pid:
            return
        self.state.died = msg
        raise SandboxDied(f"{self.state.id}: {msg}")

    async def on_pause(self, msg: Pause) -> None:
        assert self.state.instance is not None
        await self.driver.pause(self.state.instance)
        self.state.instance.paused = True

    async def on_resume(self, msg: Resume) -> None:
        assert self.state.instance is not None
        await self.driver.resume(self.state.instance)
        self.state.instance.paused = False

    async def terminate(self, reason: ExitReason) -> None:
        if self.state.instance is not None:
            with trio.CancelScope(shield=True):
                await self.driver.stop(self.state.instance)


class UpdatePolicy(Request[None], frozen=True):
    policy: EgressPolicy


class NetPolicy(Actor[Any]):
    """Applies the sandbox's network policy, and removes it when the sandbox goes.

    A restart re-applies the whole policy in one batch (``apply`` replaces what is there).
    """

    def __init__(self, state: SandboxState, services: NodeServices) -> None:
        self.state = state
        self.driver: NetPolicyDriver = services.policy
        self.applied = False

    async def init(self) -> None:
        instance = self.state.instance
        if instance is not None and instance.ip and instance.host_if:
            net = SandboxNet(self.state.id, instance.ip, instance.host_if, self.state.policy)
            await self.driver.apply(net)
            self.applied = True

    async def on_update(self, msg: UpdatePolicy) -> None:
        if self.applied:
            await self.driver.update(self.state.id, msg.policy)
        self.state.policy = msg.policy

    async def terminate(self, reason: ExitReason) -> None:
        if self.applied:
            with trio.CancelScope(shield=True):
                await self.driver.remove(self.state.id)


def _guest_link(state: SandboxState, services: NodeServices) -> GuestLink:
    instance = state.instance
    assert instance is not None

    def alive() -> bool:
        return state.died is None and services.driver.alive(instance)

    return GuestLink(instance.envd, name=state.id, alive=alive, connect_timeout=5.0)


def sandbox_group(state: SandboxState, services: NodeServices) -> Supervisor:
    """The supervisor of one sandbox (see the module docstring)."""
    return Supervisor(
        [
            ChildSpec(
                "isolation",
                Isolation,
                (state, services),
                restart=TEMPORARY,
                significant=True,
                shutdown=60.0,
            ),
            ChildSpec("net", NetPolicy, (state, services), shutdown=10.0),
            ChildSpec("guest", _guest_link, (state, services), shutdown=5.0),
        ],
        intensity=5,
        period=10.0,
        auto_shutdown=ANY_SIGNIFICANT,
    )
