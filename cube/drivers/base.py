"""The isolation driver interface shared by every platform.

A driver turns a ``SlotSpec`` into a running, isolated envd (``Instance``) and back into
nothing. Everything slow (namespaces, veths, cgroups, the root filesystem, booting a VM)
happens in ``start``, which a pool slot calls ahead of time; binding a slot to a user is not
the driver's job. Drivers are plain objects driven by actors (``cube`` domain actors); they
hold no task of their own.

Process ownership: a driver never forks by itself. It asks the caller's ``spawn`` function
(backed by the host ``Reaper``) to start the sandbox's root process, so exits are reported to
the owning actor and orphans are reaped. Root processes lead their own session and are *not*
killed when the service exits: a restarted service re-adopts them from the journal
(``Instance`` is what the journal stores).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import msgspec

__all__ = ["Driver", "DriverError", "Instance", "SlotSpec", "Spawner", "VmHooks"]


class DriverError(Exception):
    """A driver operation failed; the message says which step and why."""


class SlotSpec(msgspec.Struct, frozen=True):
    """What to prepare for one sandbox (a pool slot), before anyone is bound to it."""

    slot_id: str  # short [a-z0-9-], unique on the host; names every resource of the slot
    template: str = "base"
    memory_mb: int = 512
    cpus: float = 1.0
    pids_max: int = 256
    disk_mb: int = 1024  # size limit of the writable home / overlay
    network: bool = True
    default_user: str = "user"


class Instance(msgspec.Struct):
    """A started sandbox: everything needed to reach it, watch it, and clean it up.

    Stored in the journal as JSON, so a restarted service can re-adopt or clean it up.
    """

    slot_id: str
    driver: str
    pid: int  # the sandbox's root process on the host (its init / envd / hypervisor)
    envd: str  # how to reach envd: "unix:/path", "vsock:CID:PORT", ...
    state_dir: str  # the slot's own directory on the host; removed at stop
    root: str | None = None  # root filesystem mount point, if any
    cgroups: list[str] = []  # cgroup directories created for the slot
    netns: str | None = None  # network namespace name, if any
    host_if: str | None = None  # host side of the veth / tap
    ip: str | None = None  # the sandbox's address on the host bridge
    paused: bool = False
    extra: dict[str, Any] = {}


Spawner = Callable[..., Awaitable[Any]]
"""``await spawn(argv, cwd=None, env=None, pass_fds=(), stdout=None, stderr=None)`` starts a
process owned by the calling actor through the host reaper and returns its
``supervisors.ProcessHandle``."""


class Driver(Protocol):
    """What every isolation driver provides."""

    name: str
    isolated: bool  # False for the process driver: it must say so loudly

    async def start(self, spec: SlotSpec, spawn: Spawner) -> Instance:
        """Create the slot's resources and start envd in it; return once envd listens."""
        ...

    async def stop(self, instance: Instance) -> None:
        """Kill every process of the slot and remove every resource; idempotent."""
        ...

    async def pause(self, instance: Instance) -> None:
        """Freeze the sandbox's processes, keeping their memory."""
        ...

    async def resume(self, instance: Instance) -> None:
        """Thaw what ``pause`` froze."""
        ...

    def alive(self, instance: Instance) -> bool:
        """Whether the root process still runs (re-adoption after a service restart)."""
        ...

    def leftovers(self, slot_ids: Sequence[str] | None = None) -> list[str]:
        """Resources of this driver still on the host (all, or of these slots): processes,
        mounts, netns, veths, cgroups, directories. Empty means nothing leaked."""
        ...

    async def cleanup(self, keep: Sequence[str] = ()) -> list[str]:
        """Remove every resource of this driver except the slots in ``keep``; returns what was
        removed. Run at service start, after re-adopting what the journal knows."""
        ...


class VmHooks(Protocol):
    """Optional methods of the VM drivers (qemu, bhyve). The pool, the node and the sandbox
    group call each one only when the driver has it (``getattr``), so drivers without them
    behave as before. docs/vm.md describes the tiers they make.
    """

    async def park(self, instance: Instance) -> None:
        """The pool, when a slot becomes warm: stop the guest until it is bound (the hot
        tier). ``instance.paused`` becomes True."""
        ...

    async def unpark(self, instance: Instance) -> None:
        """The node, when it binds a parked slot: run the guest again with a fresh clock."""
        ...

    async def suspend(self, instance: Instance) -> None:
        """E2B pause: save the guest to disk and end its hypervisor (``instance.pid`` becomes
        0); what the sandbox owns on the host (tap, address) stays."""
        ...

    async def wake(self, instance: Instance, spawn: Spawner) -> None:
        """E2B resume of a suspended guest: a new hypervisor restores it; ``instance`` is
        updated in place (its new pid)."""
        ...

    async def adopt(self, instance: Instance) -> Instance:
        """After a service restart: the instance as it is now (the journal's copy may predate
        a suspend or a wake)."""
        ...

    def describe_exit(self, instance: Instance, returncode: int) -> Any:
        """What the root process's exit status means (a ``cube.vm.ExitVerdict``): whether it
        ends the sandbox, and the reason a bound sandbox is reported crashed with."""
        ...
