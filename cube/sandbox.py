"""One sandbox as a supervision group: isolation, network policy and guest link.

    /node/sandboxes/<id>            Supervisor, ONE_FOR_ONE, auto_shutdown=ANY_SIGNIFICANT
        isolation                   the jail / namespace / VM: temporary and significant
        net                         the network policy: permanent (a restart re-applies it)
        guest                       the GuestLink: permanent (a restart reconnects to envd)

A crash of ``net`` or ``guest`` restarts only that actor, so the running sandbox is not
disturbed. The end of the isolation actor (its root process died, or it was stopped) ends
the group: a warm pool slot is then replaced by its pool, a bound sandbox is marked
``crashed`` by the registry, which monitors every group.

VM drivers (qemu, bhyve) have optional hooks (cube/drivers/base.py ``VmHooks``) that the
isolation actor uses when present: ``park``/``unpark`` (a warm slot waits stopped, the hot
tier), ``suspend``/``wake`` (pause saves the VM to disk and its hypervisor exits),
``adopt`` and ``describe_exit``. While the guest cannot answer, the guest link is held (no
hang alarm) or down, and it is brought back when the guest runs again.

The group is started once, warm, by a pool; its id is the sandbox id it will have when a
create binds it, so nothing is renamed or moved when that happens.
"""

from __future__ import annotations

import math
import secrets
import string
from typing import TYPE_CHECKING, Any

import trio

from actors import Actor, ActorError, ActorRef, ExitReason, ReplyError, Request
from supervisors import (
    ANY_SIGNIFICANT,
    TEMPORARY,
    ChildSpec,
    ProcessExited,
    Spawn,
    Supervisor,
    Watch,
    restart_child,
    terminate_child,
)

from .drivers.base import Driver, Instance, SlotSpec
from .guestlink import GetClient, GuestClient, GuestLink
from .netpolicy import EgressPolicy, NetPolicyDriver, SandboxNet
from .store import Update

if TYPE_CHECKING:
    from .node import NodeServices

__all__ = [
    "Isolation",
    "NetPolicy",
    "Park",
    "SandboxDied",
    "SandboxExited",
    "SandboxLink",
    "SandboxPaused",
    "SandboxState",
    "Unpark",
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


class SandboxExited(ProcessExited, frozen=True):
    """The root process's exit with what the driver says it means (``describe_exit``): the
    registry records ``str()`` of it as a crashed sandbox's reason."""

    reason: str = ""

    def __str__(self) -> str:
        return self.reason or super().__str__()


class SandboxPaused(ReplyError):
    """The sandbox is paused: nothing in it can answer until it is resumed."""


class Pause(Request[None], frozen=True):
    pass


class Resume(Request[None], frozen=True):
    pass


class Park(Request[None], frozen=True):
    """Stop a warm slot's guest until it is bound (drivers with ``park``; else nothing)."""


class Unpark(Request[None], frozen=True):
    """Run a parked slot's guest again, with a fresh clock, before it is bound."""


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
        self._link_dead_after: float | None = None  # set while the link is held (parked)

    async def _spawn(self, argv: list[str], **kwargs: Any) -> Any:
        return await self.services.reaper.call(Spawn(list(argv), owner=self.ctx.self, **kwargs))

    @property
    def instance(self) -> Instance:
        assert self.state.instance is not None
        return self.state.instance

    async def init(self) -> None:
        state = self.state
        if state.adopt is not None:
            instance = state.adopt
            if not self.driver.alive(instance):
                raise SandboxDied(f"{state.id}: its root process {instance.pid} is gone")
            adopt = getattr(self.driver, "adopt", None)
            if adopt is not None:  # the journal's copy may predate a suspend or a wake
                instance = await adopt(instance)
            if instance.pid:
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
        describe = getattr(self.driver, "describe_exit", None)
        verdict = describe(instance, msg.returncode) if describe is not None else None
        if verdict is not None and not verdict.ends_sandbox:
            return  # e.g. bhyve's exit 0 after a requested suspend
        reason = f"{verdict.reason} (pid {msg.pid})" if verdict is not None else ""
        self.state.died = SandboxExited(msg.pid, msg.returncode, msg.orphan, reason=reason)
        raise SandboxDied(f"{self.state.id}: {self.state.died}")

    async def on_pause(self, msg: Pause) -> None:
        suspend = getattr(self.driver, "suspend", None)
        if suspend is None:
            await self.driver.pause(self.instance)
            self.instance.paused = True
            return
        # the hypervisor exits with the guest saved to disk: the link goes first, so that it
        # does not take the closing socket for a dead guest
        await self._link_down()
        await suspend(self.instance)
        await self._journal_instance()

    async def on_resume(self, msg: Resume) -> None:
        wake = getattr(self.driver, "wake", None)
        if wake is not None and self.instance.pid == 0:
            await wake(self.instance, self._spawn)
            await self._journal_instance()
            await self._relink()
            return
        await self.driver.resume(self.instance)
        self.instance.paused = False
        if not await self._link_ready():  # re-adopted while paused: never connected
            await self._relink()

    async def on_park(self, msg: Park) -> None:
        park = getattr(self.driver, "park", None)
        if park is None:
            return
        # a stopped guest answers no pings: no hang alarm until it runs again
        client = await self._client()
        if self._link_dead_after is None:
            self._link_dead_after = client.dead_after
        client.dead_after = math.inf
        await park(self.instance)
        self.instance.paused = True

    async def on_unpark(self, msg: Unpark) -> None:
        unpark = getattr(self.driver, "unpark", None)
        if unpark is None or not self.instance.paused:
            return
        await unpark(self.instance)
        self.instance.paused = False
        client = await self._client()
        await client.call("ping", timeout=10.0)  # it runs and answers: the link is live
        if self._link_dead_after is not None:
            client.dead_after = self._link_dead_after
            self._link_dead_after = None

    # -- the sibling guest link ------------------------------------------------------------

    def _group_path(self) -> str:
        return self.ctx.path.rsplit("/", 1)[0]

    async def _client(self) -> GuestClient:
        link = self.ctx.system.lookup(f"{self._group_path()}/guest")
        client: GuestClient = await link.call(GetClient(), timeout=30.0)
        return client

    async def _link_ready(self) -> bool:
        link = self.ctx.system.lookup(f"{self._group_path()}/guest")
        try:
            return bool(await link.query(lambda actor: actor.client is not None))
        except ActorError:
            return False

    async def _link_down(self) -> None:
        group = self.ctx.system.lookup(self._group_path())
        await terminate_child(group, "guest", timeout=30.0)

    async def _relink(self) -> None:
        """Connect the guest link anew (a fresh hello resynchronises the guest)."""
        await self._link_down()
        group = self.ctx.system.lookup(self._group_path())
        await restart_child(group, "guest", timeout=30.0)

    async def _journal_instance(self) -> None:
        """Write the changed instance (a new pid, a suspended state) to the journal, so that
        a restarted service re-adopts what is there now. Warm slots have no record."""
        try:
            await self.services.store.call(Update(self.state.id, {"instance": self.instance}))
        except ReplyError:
            pass

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


class SandboxLink(GuestLink):
    """The group's GuestLink: not connected while the sandbox is paused (nothing in it could
    answer a hello; the isolation actor reconnects it on resume)."""

    def __init__(self, state: SandboxState, services: NodeServices) -> None:
        instance = state.instance
        assert instance is not None

        def alive() -> bool:
            return state.died is None and services.driver.alive(instance)

        super().__init__(instance.envd, name=state.id, alive=alive, connect_timeout=5.0)
        self.state = state

    async def init(self) -> None:
        instance = self.state.instance
        if instance is not None and instance.paused:
            return
        await super().init()

    async def on_get_client(self, msg: GetClient) -> GuestClient:
        if self.client is None:
            raise SandboxPaused(f"sandbox {self.state.id} is paused")
        return self.client


def _guest_link(state: SandboxState, services: NodeServices) -> GuestLink:
    return SandboxLink(state, services)


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
