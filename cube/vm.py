"""What the VM drivers (``qemu``, ``bhyve``) share: tiers, durable checkpoints, the guest's
identity and control port, and how a hypervisor's exit is read.

The tiers a VM sandbox can come from, fastest first:

* **hot**: a pool slot restored from a checkpoint, given its identity, then paused (QEMU
  ``stop``, bhyve SIGSTOP). Create is ``cont`` + a clock fix + bind.
* **durable**: an on-disk checkpoint of a booted template VM whose envd is ready, one per VM
  shape (image, machine, memory, vCPUs, NIC), content-addressed and kept across service
  restarts (``CheckpointStore``). Pool slots are filled by restoring it.
* **cold**: a boot from the image; it happens once per shape, to make the checkpoint (or for
  every slot when the durable tier is turned off).

Every VM restored from one checkpoint wakes with the checkpoint's MAC, address, hostname and
clock. ``GuestIdentity`` is what makes it this VM, and ``guest_control`` applies it (and the
clock) through the guest's control port, served by ``cube/images/guestctl.py``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import msgspec
import trio

from cube.drivers.base import DriverError
from cube.guestlink import GuestClient, open_transport
from guest import protocol
from guest.protocol import GuestError, Unimplemented

__all__ = [
    "AgentTimeout",
    "CheckpointStore",
    "ExitVerdict",
    "GuestIdentity",
    "Tier",
    "agent_hello",
    "describe_signal",
    "guest_control",
    "mac_address",
    "set_guest_clock",
    "warm_up_agent",
]

Tier = Literal["hot", "durable", "cold"]

# A checkpoint directory is complete once this file exists; it is written last.
CHECKPOINT_DONE = "checkpoint.json"


class GuestIdentity(msgspec.Struct, frozen=True):
    """Who a VM is on the node's bridge: what a restored VM is told after ``cont``."""

    mac: str
    address: str = ""  # "10.1.2.3/16"; "" for no address
    gateway: str = ""
    hostname: str = "sandbox"
    nameservers: tuple[str, ...] = ()

    def net_args(self) -> list[str]:
        """The arguments of the control port's ``net`` command."""
        return [
            self.mac,
            self.address,
            self.gateway or "-",
            self.hostname,
            ",".join(self.nameservers) or "-",
        ]


def mac_address(slot_id: str, oui: str = "52:54:00") -> str:
    """A stable MAC for a slot: the hypervisor's OUI (QEMU 52:54:00, bhyve 58:9c:fc) and
    three bytes of the slot id's hash. Every VM on a bridge needs its own, or the bridge's
    forwarding table flaps between their ports."""
    digest = hashlib.sha256(slot_id.encode()).digest()
    return oui + "".join(f":{b:02x}" for b in digest[:3])


class AgentTimeout(DriverError):
    """The guest's agent did not answer on its channel in time."""


class ExitVerdict(msgspec.Struct, frozen=True):
    """What a hypervisor's exit means for its sandbox.

    ``kind``: ``suspended`` (a requested suspend finished: not a death), ``rebooted``,
    ``powered_off``, ``halted``, ``crashed`` (triple fault, signal), ``failed`` (the
    hypervisor could not run the VM). Any kind but ``suspended`` ends the sandbox: a pool
    slot is replaced by its pool, a bound sandbox is reported crashed with ``reason``.
    """

    kind: Literal["suspended", "rebooted", "powered_off", "halted", "crashed", "failed"]
    reason: str

    @property
    def ends_sandbox(self) -> bool:
        return self.kind != "suspended"


# ---------------------------------------------------------------------------------------------
# The guest agent's channel (envd's virtio-console port)


async def agent_hello(
    path: str, *, timeout: float, alive: Callable[[], bool] | None = None
) -> dict[str, Any]:
    """Connect to the agent's virtio-console socket, say hello, and return its answer.

    Bytes sent before the guest opens its port wait in the hypervisor (QEMU's virtio-serial,
    bhyve's virtio-console hold them until the guest is connected), so one hello per
    connection is enough. The session nonce tells our answer apart from any a previous host
    left in flight. Raises AgentTimeout, or DriverError when ``alive`` says the hypervisor
    died.
    """
    session = secrets.token_hex(8)
    request = (
        json.dumps({"id": 1, "op": "hello", "args": {"version": 1, "session": session}}).encode()
        + b"\n"
    )
    deadline = trio.current_time() + timeout

    def check_alive() -> None:
        if alive is not None and not alive():
            raise DriverError(f"the hypervisor exited before the agent answered on {path}")

    while trio.current_time() < deadline:
        check_alive()
        try:
            stream = await trio.open_unix_socket(path)
        except OSError:
            await trio.sleep(0.02)
            continue
        try:
            async with stream:
                await stream.send_all(request)
                answer = await _read_hello(stream, session, deadline, check_alive)
        except (trio.BrokenResourceError, OSError):
            answer = None  # the hypervisor dropped the connection (or is going away)
        if answer is not None:
            return answer
        await trio.sleep(0.02)
    raise AgentTimeout(f"the guest agent did not answer on {path} within {timeout} s")


async def _read_hello(
    stream: trio.SocketStream, session: str, deadline: float, check_alive: Callable[[], None]
) -> dict[str, Any] | None:
    """Read frames until the hello answer of ``session``; None if the connection ends or the
    deadline passes. Checks that the hypervisor lives every quarter second while it waits."""
    buffer = b""
    while trio.current_time() < deadline:
        with trio.move_on_at(min(deadline, trio.current_time() + 0.25)):
            chunk = await stream.receive_some(65536)
            if not chunk:
                return None
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    frame = json.loads(line)
                except ValueError:
                    continue
                ok = frame.get("ok") if isinstance(frame, dict) else None
                if frame.get("id") == 1 and isinstance(ok, dict) and ok.get("session") == session:
                    return ok
            continue
        check_alive()
    return None


# ---------------------------------------------------------------------------------------------
# The control port


async def guest_control(path: str, command: str, *args: str, timeout: float = 10.0) -> str:
    """Run one command of the guest's control agent over its port's unix socket at ``path``
    (see cube/images/guestctl.py) and return its answer; DriverError if it fails or does not
    answer in time.

    A new line first ends whatever a previous host left half-sent; the request id tells our
    answer apart from answers meant for an earlier host.
    """
    rid = secrets.token_hex(6)
    request = f"\n{rid} {command} {' '.join(args)}\n".encode()
    with trio.move_on_after(timeout):
        while True:
            try:
                stream = await trio.open_unix_socket(path)
            except OSError:
                await trio.sleep(0.01)  # the hypervisor is still creating its socket
                continue
            async with stream:
                await stream.send_all(request)
                answer = await _read_answer(stream, rid)
            if answer is not None:
                status, _, detail = answer.partition(" ")
                if status != "ok":
                    raise DriverError(f"guest control {command}: {detail}")
                return detail
            await trio.sleep(0.01)
    raise DriverError(f"the guest's control agent did not answer {command} within {timeout} s")


async def _read_answer(stream: trio.SocketStream, rid: str) -> str | None:
    """The rest of the reply line to ``rid``; None if the connection ends first."""
    buffer = b""
    prefix = f"{rid} ".encode()
    while True:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(prefix):
                return line[len(prefix) :].decode(errors="replace")


async def set_guest_clock(path: str, *, timeout: float = 10.0) -> None:
    """Step the guest's real-time clock to the host's (after a restore or a long pause)."""
    await guest_control(path, "clock", str(time.time_ns()), timeout=timeout)


# ---------------------------------------------------------------------------------------------
# Durable checkpoints


class CheckpointStore:
    """The durable tier: one checkpoint directory per key under ``root``.

    A checkpoint is made at most once per key, host-wide: a trio lock orders the tasks of
    this process, an ``flock`` on ``<root>/<key>.lock`` the processes (two services, or test
    runs, sharing a cache). It is written into ``.tmp-<key>-<pid>`` and renamed into place
    with its ``checkpoint.json`` (written last), so a directory named by a key is complete.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._locks: dict[str, trio.Lock] = {}

    @staticmethod
    def key(*parts: object) -> str:
        """The content address of a checkpoint: everything that decides its bytes."""
        return hashlib.sha256(msgspec.json.encode(parts)).hexdigest()[:20]

    def path(self, key: str) -> str:
        return os.path.join(self.root, key)

    def complete(self, key: str) -> bool:
        return os.path.exists(os.path.join(self.path(key), CHECKPOINT_DONE))

    async def ensure(
        self, key: str, create: Callable[[str], Awaitable[dict[str, object]]]
    ) -> tuple[str, bool]:
        """The directory of checkpoint ``key``, made now with ``await create(directory)`` if
        there is none; returns ``(directory, made_now)``. ``create`` returns what
        checkpoint.json records."""
        if self.complete(key):
            return self.path(key), False
        lock = self._locks.setdefault(key, trio.Lock())
        async with lock:
            os.makedirs(self.root, exist_ok=True)
            fd = os.open(os.path.join(self.root, f"{key}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                await trio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX)
                if self.complete(key):
                    return self.path(key), False
                return self.path(key), await self._create(key, create)
            finally:
                os.close(fd)  # releases the flock

    async def _create(
        self, key: str, create: Callable[[str], Awaitable[dict[str, object]]]
    ) -> bool:
        staging = os.path.join(self.root, f".tmp-{key}-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        try:
            record = await create(staging)
            record = {"key": key, "created": time.time(), **record}
            Path(staging, CHECKPOINT_DONE).write_bytes(msgspec.json.encode(record))
            final = self.path(key)
            shutil.rmtree(final, ignore_errors=True)  # an incomplete one from a crash
            os.rename(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return True

    def remove(self, key: str) -> None:
        """Forget checkpoint ``key`` (a restore found it unusable)."""
        shutil.rmtree(self.path(key), ignore_errors=True)

    def keys(self) -> list[str]:
        """The complete checkpoints, oldest first."""
        if not os.path.isdir(self.root):
            return []
        found = [name for name in os.listdir(self.root) if self.complete(name)]
        return sorted(found, key=lambda k: os.path.getmtime(self.path(k)))

    def prune(self, keep: int) -> list[str]:
        """Remove all but the ``keep`` newest checkpoints, and staging directories of
        processes that died while making one; returns the removed keys."""
        old = self.keys()[:-keep] if keep > 0 else self.keys()
        for key in old:
            self.remove(key)
        for name in os.listdir(self.root) if os.path.isdir(self.root) else []:
            pid = name.rsplit("-", 1)[-1]
            if name.startswith(".tmp-") and pid.isdigit() and not _pid_exists(int(pid)):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
            elif name.endswith(".lock") and not self.complete(name[: -len(".lock")]):
                _remove_unheld_lock(os.path.join(self.root, name))
        return old


async def warm_up_agent(address: str, *, runs: int = 2, timeout: float = 30.0) -> None:
    """Run a trivial command through envd at ``address`` a few times, so that what its
    first command imports and compiles is in memory before a checkpoint is taken: every VM
    restored from it then runs its first command warm. An agent without processes (the
    stand-in) is left as it is."""
    command = protocol.ProcessStart(
        process=protocol.ProcessConfig(cmd="/bin/true"), user="root", stdin=False
    )
    with trio.fail_after(timeout):
        client = GuestClient(await open_transport(address), name="template")
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run)
            try:
                for _ in range(runs):
                    async with client.open_stream("process.start", command) as stream:
                        await stream.wait()
            except Unimplemented:
                pass
            except GuestError as e:
                raise DriverError(f"warming up the template's envd: {e}") from e
            finally:
                await client.aclose()


def _remove_unheld_lock(path: str) -> None:
    """Remove a lock file nobody holds (one whose checkpoint was pruned or never made)."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass  # held: a checkpoint is being made
    finally:
        os.close(fd)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_signal(returncode: int) -> str:
    """``-9`` -> ``"killed by SIGKILL"``."""
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"killed by {name}"
