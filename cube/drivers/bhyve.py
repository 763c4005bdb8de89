"""The ``bhyve`` driver: one bhyve microVM per sandbox on FreeBSD (the qemu driver's twin).

Written to docs/freebsd-contract.md (§1 bhyve, §7 the operation table) and tested on Linux
by contract: stand-in ``bhyve``/``bhyvectl``/``ifconfig`` executables record each argv and
exit with the status a test asks for (tests/cube/bhyve/). What only a FreeBSD host can show
is listed in docs/vm.md ("Checks for a real FreeBSD host").

Each slot is one ``bhyve`` process (spawned through the caller's ``spawn``, so the host
reaper owns it) booting the image's raw UEFI disk (``cube.images.build_uefi_disk``: systemd-
boot, then the same kernel and initramfs QEMU boots) with the ``BHYVE_UEFI.fd`` firmware.
envd's channel and the control agent's port are virtio-console ports that bhyve serves as
unix sockets in the slot's directory, ``<state_dir>/bhyve/slots/<slot>/``. The network is a
tap (named ``tap...``: bhyve picks the backend by the name's prefix) on the node's bridge.

The operations, each one command of the contract:

=================  ===========================================================================
boot               ``bhyve -c N -m MEMM -A -H -P -w -u -s 0,hostbridge -s 31,lpc -l com1,stdio
                   -l bootrom,FIRMWARE -s 2,virtio-blk,DISK,ro -s 3,virtio-net,TAP,mac=MAC
                   -s 4,virtio-console,agent=SOCK,cube-ctl=SOCK -s 5,virtio-rnd NAME``
restore            the same argv with ``-r STATE`` (no ``bhyvectl --create``: a UEFI guest)
suspend            ``bhyvectl --vm=NAME --suspend=DIR/state``; bhyve writes state, state.kern
                   and state.meta and exits 0
force poweroff     ``bhyvectl --vm=NAME --force-poweroff`` (bhyve exits 1)
destroy            ``bhyvectl --vm=NAME --destroy`` after every exit
hot tier           SIGSTOP / SIGCONT of the bhyve process
tap                ``ifconfig tap create``; ``ifconfig tapN name TAP up``; ``ifconfig BRIDGE addm
                   TAP private TAP``; ``ifconfig TAP destroy``
bridge             ``ifconfig bridge create``; ``ifconfig bridgeN name BRIDGE``; ``ifconfig BRIDGE
                   inet GW/LEN up``
=================  ===========================================================================

Exit statuses (contract §1.4) become ``ExitVerdict``s, which the sandbox group acts on
(cube/sandbox.py): 0 after a requested suspend is no death; 0 otherwise is a guest reboot,
1 a power-off (or, when restoring, a failed restore), 2 a halt, 3 a triple fault, 4 and the
``errx`` codes a bhyve failure, a signal a crash. Any of those ends the sandbox: a pool slot
is replaced, a bound sandbox is reported crashed with the verdict's reason. The tiers, the
identity and the clock work as in the qemu driver (cube/vm.py).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
import trio

from cube.drivers.base import DriverError, Instance, SlotSpec, Spawner
from cube.drivers.ns_ipam import AddressPool
from cube.drivers.process import node_tag, short_hash
from cube.images import Image
from cube.vm import (
    CheckpointStore,
    ExitVerdict,
    GuestIdentity,
    agent_hello,
    describe_signal,
    guest_control,
    mac_address,
    set_guest_clock,
    warm_up_agent,
)

__all__ = ["BhyveConfig", "BhyveDriver", "BhyveShape", "bhyve_argv", "bhyve_exit_verdict"]

# bhyve's OUI (vm-bhyve and the contract's examples use it)
BHYVE_OUI = "58:9c:fc"
# Part of every durable checkpoint's key: bump it when how a template VM is prepared changes.
CHECKPOINT_FORMAT = 1
SNAPSHOT_META = "snapshot.json"
SUSPEND_FILE = "state"  # bhyve writes state, state.kern and state.meta
# sun_path is 104 bytes on FreeBSD, the NUL included
UNIX_PATH_MAX = 103
# VM_MAX_NAMELEN in sys/amd64/include/vmm.h is 32, the NUL included
VM_NAME_MAX = 31

EXIT_MEANINGS = {
    0: ("rebooted", "the guest rebooted (bhyve exited 0)"),
    1: ("powered_off", "the guest powered off (bhyve exited 1)"),
    2: ("halted", "the guest halted (bhyve exited 2)"),
    3: ("crashed", "the guest triple-faulted (bhyve exited 3)"),
    4: ("failed", "bhyve failed: a device, vm_create or the boot (bhyve exited 4)"),
    64: ("failed", "bhyve refused its command line (EX_USAGE, 64)"),
    65: ("failed", "bhyve found bad data, e.g. in a checkpoint (EX_DATAERR, 65)"),
    71: ("failed", "bhyve hit a host error, e.g. Capsicum (EX_OSERR, 71)"),
    100: ("failed", "bhyve stopped for an unknown suspend reason (100)"),
}


class BhyveConfig(msgspec.Struct, frozen=True):
    """Host-level settings of the bhyve driver."""

    state_dir: str = "/var/db/cube"
    bhyve: str = "/usr/sbin/bhyve"
    bhyvectl: str = "/usr/sbin/bhyvectl"
    ifconfig: str = "/sbin/ifconfig"
    firmware: str = "/usr/local/share/uefi-firmware/BHYVE_UEFI.fd"  # package edk2-bhyve
    bridge: str = "cubebr0"
    gateway: str = ""  # when set: the bridge is made if missing, VMs get leased addresses
    prefix_len: int = 16
    ipam_dir: str = "/var/run/cube-ipam"
    nameservers: tuple[str, ...] = ()
    wire_memory: bool = False  # -S (needed for PCI passthrough only)
    boot_timeout: float = 90.0  # UEFI boot to envd answering
    restore_timeout: float = 30.0
    suspend_timeout: float = 60.0
    durable: bool = True
    checkpoint_dir: str = ""  # "" = <state_dir>/bhyve/checkpoints
    keep_checkpoints: int = 4


class BhyveShape(msgspec.Struct, frozen=True):
    """What decides the VM's devices: a checkpoint restores only into an identical shape."""

    cpus: int
    memory_mb: int
    firmware: str
    disk: str
    network: bool
    channel: str
    control: str
    image_key: str


class BhyveSnapshot(msgspec.Struct, frozen=True):
    """A suspended VM (bhyve's state, state.kern, state.meta) and its shape."""

    shape: BhyveShape
    created: float
    seconds: float


class SlotFiles(msgspec.Struct, frozen=True):
    """Where a slot's files live on the host."""

    directory: str
    agent: str
    control: str
    console: str

    @classmethod
    def under(cls, root: str, slot_id: str) -> SlotFiles:
        directory = os.path.join(root, slot_id)
        files = cls(
            directory=directory,
            agent=os.path.join(directory, "agent.sock"),
            control=os.path.join(directory, "ctl.sock"),
            console=os.path.join(directory, "console.log"),
        )
        for sock in (files.agent, files.control):
            if len(sock.encode()) > UNIX_PATH_MAX:
                raise DriverError(f"socket path too long for a unix socket: {sock}")
        return files


def bhyve_argv(
    config: BhyveConfig,
    shape: BhyveShape,
    files: SlotFiles,
    name: str,
    *,
    tap: str | None = None,
    mac: str | None = None,
    restore: str | None = None,
) -> list[str]:
    """The bhyve command line of one VM (contract §1.2, UEFI form). A restore is the same
    call with ``restore`` (the checkpoint's state file): bhyve needs the identical devices."""
    argv = [config.bhyve, "-c", str(shape.cpus), "-m", f"{shape.memory_mb}M"]
    argv += ["-A", "-H", "-P", "-w", "-u"] + (["-S"] if config.wire_memory else [])
    if restore is not None:
        argv += ["-r", restore]
    argv += ["-s", "0,hostbridge", "-s", "31,lpc", "-l", "com1,stdio"]
    argv += ["-l", f"bootrom,{shape.firmware}"]
    argv += ["-s", f"2,virtio-blk,{shape.disk},ro"]
    if shape.network:
        if tap is None:
            raise DriverError("a networked VM shape needs a tap device")
        argv += ["-s", f"3,virtio-net,{tap}" + (f",mac={mac}" if mac else "")]
    ports = f"{shape.channel}={files.agent}"
    if shape.control:
        ports += f",{shape.control}={files.control}"
    argv += ["-s", f"4,virtio-console,{ports}", "-s", "5,virtio-rnd", name]
    return argv


def bhyve_exit_verdict(
    returncode: int, *, suspending: bool = False, restoring: bool = False
) -> ExitVerdict:
    """What bhyve's exit status means (contract §1.4)."""
    if returncode < 0:
        return ExitVerdict("crashed", f"bhyve was {describe_signal(returncode)}")
    if returncode == 0 and suspending:
        return ExitVerdict("suspended", "bhyve saved the guest and exited 0")
    if returncode == 1 and restoring:
        return ExitVerdict("failed", "bhyve could not restore the checkpoint (bhyve exited 1)")
    kind, reason = EXIT_MEANINGS.get(returncode, ("failed", f"bhyve exited {returncode}"))
    return ExitVerdict(kind, reason)  # type: ignore[arg-type]


def _command_line(pid: int) -> list[str] | None:
    """The command line of a running ``pid``: /proc where there is one (Linux, the stand-in
    tests), else ``ps`` (FreeBSD does not mount procfs by default)."""
    if pid <= 0:
        return None
    if os.path.isdir("/proc/self"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read()
        except OSError:
            return None
        if state in (b"Z", b"X"):
            return None
        return [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    done = subprocess.run(
        ["ps", "-ww", "-o", "state=,command=", "-p", str(pid)],
        capture_output=True,
        text=True,
        check=False,
    )
    fields = done.stdout.split()
    if done.returncode != 0 or not fields or fields[0].startswith("Z"):
        return None
    return fields[1:]


class BhyveDriver:
    """The Driver for bhyve microVMs (see the module docstring), with the same VM hooks as
    the qemu driver (cube/drivers/base.py ``VmHooks``)."""

    name = "bhyve"
    isolated = True

    def __init__(
        self,
        state_dir: str | None = None,
        *,
        image: Image | None = None,
        disk: str | None = None,
        config: BhyveConfig | None = None,
    ) -> None:
        """``image`` is the guest image (built on first use if None); ``disk`` its raw UEFI
        disk (derived from the image on first use if None)."""
        config = config or BhyveConfig()
        if state_dir is not None:
            config = msgspec.structs.replace(config, state_dir=state_dir)
        self.config = config
        self._image = image
        self._disk = disk
        self.root = os.path.join(config.state_dir, "bhyve")
        self.slots = os.path.join(self.root, "slots")
        self.suspended = os.path.join(self.root, "suspended")
        self.checkpoints = CheckpointStore(
            config.checkpoint_dir or os.path.join(self.root, "checkpoints")
        )
        self.tag = node_tag(config.state_dir)
        self.lease_tag = "vm-" + self.tag
        self.addresses = (
            AddressPool(config.ipam_dir, config.gateway, config.prefix_len)
            if config.gateway
            else None
        )

    # -- names and host tools -------------------------------------------------------------

    def vm_name(self, slot_id: str) -> str:
        """The VM's kernel name (``/dev/vmm/NAME``), unique on the host: the node's tag and
        the slot id (hashed when it would pass VM_MAX_NAMELEN)."""
        name = f"cube-{self.tag}-{slot_id}"
        return name if len(name) <= VM_NAME_MAX else f"cube-{self.tag}-{short_hash(slot_id, 16)}"

    def tap_name(self, slot_id: str) -> str:
        """The slot's tap: "tap" (bhyve chooses the backend by it) + tag + hash, 14 chars."""
        return f"tap{self.tag}{short_hash(slot_id, 6)}"

    async def _run(self, argv: Sequence[str], *, check: bool = True) -> str:
        """One host tool (bhyvectl, ifconfig); a failure is a DriverError when ``check``."""
        done = await trio.run_process(
            list(argv), capture_stdout=True, capture_stderr=True, check=False
        )
        if check and done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip()
            raise DriverError(f"{' '.join(argv)}: exit {done.returncode}: {detail}")
        return done.stdout.decode(errors="replace")

    async def _bhyvectl(self, slot_id: str, *options: str, check: bool = True) -> None:
        await self._run(
            [self.config.bhyvectl, f"--vm={self.vm_name(slot_id)}", *options], check=check
        )

    # -- the guest ---------------------------------------------------------------------------

    async def _prepare(self) -> tuple[Image, str]:
        """The image and its UEFI disk, built or found on first use."""
        if self._image is None:
            from cube.images import ImageSpec, ensure_image

            self._image = await ensure_image(ImageSpec(), self.config.state_dir)
        if self._disk is None:
            from cube.images import build_uefi_disk

            image, state_dir = self._image, self.config.state_dir
            self._disk = await trio.to_thread.run_sync(build_uefi_disk, image, state_dir)
        await self._ensure_bridge()
        return self._image, self._disk

    def _shape(self, spec: SlotSpec, image: Image, disk: str, network: bool) -> BhyveShape:
        return BhyveShape(
            cpus=max(1, math.ceil(spec.cpus)),
            memory_mb=spec.memory_mb,
            firmware=self.config.firmware,
            disk=disk,
            network=network,
            channel=image.channel,
            control=image.control_channel,
            image_key=image.key,
        )

    def _identity(self, slot_id: str, ip: str | None) -> GuestIdentity:
        from cube.drivers.ns import host_nameservers

        return GuestIdentity(
            mac=mac_address(slot_id, BHYVE_OUI),
            address=f"{ip}/{self.config.prefix_len}" if ip else "",
            gateway=self.config.gateway if ip else "",
            hostname=f"cube-{slot_id}",
            nameservers=tuple(self.config.nameservers or host_nameservers()),
        )

    # -- network -----------------------------------------------------------------------------

    async def _ensure_bridge(self) -> None:
        """The node's bridge with the gateway address, made when missing (contract §7)."""
        bridge, gateway = self.config.bridge, self.config.gateway
        if not gateway or await self._link_exists(bridge):
            return
        made = (await self._run([self.config.ifconfig, "bridge", "create"])).strip()
        await self._run([self.config.ifconfig, made, "name", bridge])
        await self._run(
            [self.config.ifconfig, bridge, "inet", f"{gateway}/{self.config.prefix_len}", "up"]
        )

    async def _link_exists(self, name: str) -> bool:
        done = await trio.run_process(
            [self.config.ifconfig, name], capture_stdout=True, capture_stderr=True, check=False
        )
        return done.returncode == 0

    def _wants_network(self, spec: SlotSpec) -> bool:
        return spec.network and bool(self.config.gateway)

    async def _add_tap(self, slot_id: str, *, attach: bool = True) -> str:
        """A new tap for the slot, on the bridge as a private (isolated) member."""
        tap = self.tap_name(slot_id)
        await self._del_tap(tap)
        made = (await self._run([self.config.ifconfig, "tap", "create"])).strip()
        await self._run([self.config.ifconfig, made, "name", tap, "up"])
        if attach:
            await self._run([self.config.ifconfig, self.config.bridge, "addm", tap, "private", tap])
        return tap

    async def _del_tap(self, tap: str) -> None:
        await self._run([self.config.ifconfig, tap, "destroy"], check=False)

    def _owner(self, slot_id: str) -> str:
        return f"{self.lease_tag} {slot_id}"

    def _lease(self, slot_id: str) -> str | None:
        return self.addresses.acquire(self._owner(slot_id)) if self.addresses else None

    def _release(self, slot_id: str, ip: str | None) -> None:
        if self.addresses is None:
            return
        owner = self._owner(slot_id)
        for address in [ip] if ip else list(self.addresses.leases(owner)):
            self.addresses.release(address, owner)

    # -- starting VMs ------------------------------------------------------------------------

    async def start(self, spec: SlotSpec, spawn: Spawner) -> Instance:
        """Make a VM for the slot: restored from the durable checkpoint of its shape (made
        now by one UEFI boot if there is none), or booted when the durable tier is off."""
        image, disk = await self._prepare()
        network = self._wants_network(spec)
        shape = self._shape(spec, image, disk, network)
        ip = self._lease(spec.slot_id) if network else None
        identity = self._identity(spec.slot_id, ip)
        try:
            if not self.config.durable:
                instance = await self._launch(spec.slot_id, shape, spawn, ip=ip, identity=identity)
                instance.extra["tier"] = "cold"
                return instance
            key = CheckpointStore.key(CHECKPOINT_FORMAT, os.uname().release, shape)

            async def create(directory: str) -> dict[str, object]:
                return await self._make_checkpoint(directory, shape, spawn)

            directory, made = await self.checkpoints.ensure(key, create)
            if made:
                self.checkpoints.prune(self.config.keep_checkpoints)
            instance = await self._launch(
                spec.slot_id,
                shape,
                spawn,
                ip=ip,
                identity=identity,
                restore=os.path.join(directory, SUSPEND_FILE),
            )
            instance.extra["tier"] = "cold" if made else "durable"
            return instance
        except BaseException:
            self._release(spec.slot_id, ip)
            raise

    async def _make_checkpoint(
        self, directory: str, shape: BhyveShape, spawn: Spawner
    ) -> dict[str, object]:
        """Boot a template VM (tap on no bridge, no address), warm its envd up, suspend it
        into ``directory``."""
        slot = f"tpl-{os.getpid()}-{short_hash(str(time.time()), 4)}"
        started = time.monotonic()
        instance = await self._launch(
            slot, shape, spawn, mac=mac_address("template", BHYVE_OUI), attach=False
        )
        try:
            booted = time.monotonic() - started
            await warm_up_agent(instance.envd)
            seconds = await self._suspend_into(instance, directory)
        finally:
            with trio.CancelScope(shield=True):
                await self.stop(instance)
        return {"boot_seconds": round(booted, 3), "suspend_seconds": seconds}

    async def _launch(
        self,
        slot_id: str,
        shape: BhyveShape,
        spawn: Spawner,
        *,
        ip: str | None = None,
        mac: str | None = None,
        identity: GuestIdentity | None = None,
        attach: bool = True,
        restore: str | None = None,
    ) -> Instance:
        """Start bhyve for ``shape`` (restoring ``restore`` into it, if given), wait for the
        agent, then give the guest ``identity`` and the time. On a failure everything of the
        slot is removed again."""
        files = SlotFiles.under(self.slots, slot_id)
        shutil.rmtree(files.directory, ignore_errors=True)
        os.makedirs(files.directory, mode=0o700)
        mac = identity.mac if identity is not None else mac
        name = self.vm_name(slot_id)
        instance = Instance(
            slot_id=slot_id,
            driver=self.name,
            pid=0,
            envd=f"unix:{files.agent}",
            state_dir=files.directory,
            ip=ip,
            extra={
                "channel": "virtio-console",
                "vm": name,
                "control": files.control if shape.control else "",
                "mac": mac or "",
                "shape": msgspec.to_builtins(shape),
                "restoring": restore is not None,
            },
        )
        handle: Any = None
        try:
            # a VM of this name left by a crash would be re-initialised, not replaced
            await self._bhyvectl(slot_id, "--destroy", check=False)
            tap = await self._add_tap(slot_id, attach=attach) if shape.network else None
            instance.host_if = tap
            argv = bhyve_argv(self.config, shape, files, name, tap=tap, mac=mac, restore=restore)
            with open(files.console, "ab") as console:
                handle = await spawn(argv, cwd=files.directory, stdout=console, stderr=console)
            instance.pid = handle.pid
            instance.extra["argv"] = argv
            Path(files.directory, "bhyve.pid").write_text(str(handle.pid))
            timeout = self.config.restore_timeout if restore else self.config.boot_timeout
            instance.extra["hello"] = await agent_hello(
                files.agent, timeout=timeout, alive=lambda: bool(handle.running)
            )
            instance.extra["restoring"] = False
            if shape.control:
                if identity is not None and identity.address and shape.network:
                    await guest_control(files.control, "net", *identity.net_args())
                if identity is not None:
                    await set_guest_clock(files.control)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.stop(instance)
            raise
        return instance

    # -- stopping ----------------------------------------------------------------------------

    def _running(self, instance: Instance) -> bool:
        """Whether ``instance.pid`` is this slot's bhyve: its command line ends with the VM
        name (``bhyve: NAME`` after setproctitle, or the argv's last element)."""
        cmdline = _command_line(instance.pid)
        if not cmdline:
            return False
        name = self.vm_name(instance.slot_id)
        return cmdline[-1] == name or cmdline[-1].endswith(f": {name}")

    def alive(self, instance: Instance) -> bool:
        """Whether the sandbox still exists: its bhyve runs, or it is suspended to disk."""
        return self._running(instance) or self._is_suspended(instance.slot_id)

    async def _wait_gone(self, instance: Instance, timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while self._running(instance):
                await trio.sleep(0.02)
            return True
        return False

    async def stop(self, instance: Instance) -> None:
        """Force the VM off, destroy it, and remove its tap, lease, sockets and state
        (contract §1.4: ``--force-poweroff``, then SIGKILL, then ``--destroy``)."""
        if self._running(instance):
            os.kill(instance.pid, signal.SIGCONT)  # a parked (stopped) bhyve cannot power off
            await self._bhyvectl(instance.slot_id, "--force-poweroff", check=False)
            if not await self._wait_gone(instance, 5.0):
                os.kill(instance.pid, signal.SIGKILL)
                await self._wait_gone(instance, 5.0)
        await self._bhyvectl(instance.slot_id, "--destroy", check=False)
        await self._del_tap(instance.host_if or self.tap_name(instance.slot_id))
        self._release(instance.slot_id, instance.ip)
        # bhyve does not unlink its console sockets (contract §1.3)
        shutil.rmtree(os.path.join(self.slots, instance.slot_id), ignore_errors=True)
        shutil.rmtree(self._suspend_dir(instance.slot_id), ignore_errors=True)

    # -- pause, park, suspend ----------------------------------------------------------------

    async def pause(self, instance: Instance) -> None:
        """Stop the VM's process (SIGSTOP): its vCPUs and devices stop, memory stays."""
        os.kill(instance.pid, signal.SIGSTOP)
        instance.paused = True
        await trio.lowlevel.checkpoint()

    async def resume(self, instance: Instance) -> None:
        """SIGCONT, and step the guest's clock to the host's."""
        os.kill(instance.pid, signal.SIGCONT)
        instance.paused = False
        if instance.extra.get("control"):
            await set_guest_clock(instance.extra["control"])

    async def park(self, instance: Instance) -> None:
        """The hot tier: a warm slot waits stopped (SIGSTOP)."""
        await self.pause(instance)

    async def unpark(self, instance: Instance) -> None:
        """Bind time for a parked slot: SIGCONT and a fresh clock."""
        await self.resume(instance)

    def _suspend_dir(self, slot_id: str) -> str:
        return os.path.join(self.suspended, slot_id)

    def _is_suspended(self, slot_id: str) -> bool:
        return os.path.exists(os.path.join(self._suspend_dir(slot_id), SNAPSHOT_META))

    async def _suspend_into(self, instance: Instance, directory: str) -> float:
        """``bhyvectl --suspend``: bhyve writes the checkpoint and exits 0. The request is
        asynchronous (no reply, contract §1.6): completion is bhyve's exit plus a complete
        ``state.meta``. Returns how long it took; DriverError if bhyve stays up."""
        os.makedirs(directory, exist_ok=True)
        state = os.path.join(directory, SUSPEND_FILE)
        instance.extra["suspending"] = True
        started = time.monotonic()
        try:
            await self._bhyvectl(instance.slot_id, f"--suspend={state}")
            if not await self._wait_gone(instance, self.config.suspend_timeout):
                raise DriverError(
                    f"bhyve of {instance.slot_id} did not exit after --suspend: {self._tail(instance)}"
                )
        finally:
            instance.extra["suspending"] = False
        for suffix in ("", ".kern", ".meta"):
            if not os.path.exists(state + suffix):
                raise DriverError(f"bhyve exited without writing {state}{suffix}")
        await self._bhyvectl(instance.slot_id, "--destroy", check=False)
        seconds = round(time.monotonic() - started, 3)
        shape = msgspec.convert(instance.extra["shape"], BhyveShape)
        record = BhyveSnapshot(shape=shape, created=time.time(), seconds=seconds)
        Path(directory, SNAPSHOT_META).write_bytes(msgspec.json.encode(record))
        return seconds

    def _tail(self, instance: Instance, lines: int = 5) -> str:
        try:
            text = Path(instance.state_dir, "console.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    async def suspend(self, instance: Instance) -> None:
        """E2B pause: ``bhyvectl --suspend`` into the slot's suspended state; bhyve exits.
        The tap and the address stay for ``wake``."""
        if instance.paused:
            os.kill(instance.pid, signal.SIGCONT)  # bhyve must run to save itself
        directory = self._suspend_dir(instance.slot_id)
        shutil.rmtree(directory, ignore_errors=True)
        await self._suspend_into(instance, directory)
        instance.pid = 0
        instance.paused = True
        instance.extra["suspended"] = directory

    async def wake(self, instance: Instance, spawn: Spawner) -> None:
        """E2B resume: ``bhyve -r`` the suspended state in the same slot; fresh clock."""
        directory = self._suspend_dir(instance.slot_id)
        try:
            snap = msgspec.json.decode(
                Path(directory, SNAPSHOT_META).read_bytes(), type=BhyveSnapshot
            )
        except (OSError, msgspec.DecodeError) as e:
            raise DriverError(f"{instance.slot_id} has no suspended state: {e}") from e
        woken = await self._launch(
            instance.slot_id,
            snap.shape,
            spawn,
            ip=instance.ip,
            mac=instance.extra.get("mac") or None,
            restore=os.path.join(directory, SUSPEND_FILE),
        )
        if snap.shape.control:
            await set_guest_clock(woken.extra["control"])
        instance.pid = woken.pid
        instance.host_if = woken.host_if
        instance.paused = False
        instance.extra.update(woken.extra)
        instance.extra.pop("suspended", None)
        shutil.rmtree(directory, ignore_errors=True)

    async def adopt(self, instance: Instance) -> Instance:
        """The instance as it is now, after a service restart."""
        if self._running(instance):
            return instance
        if self._is_suspended(instance.slot_id):
            instance.pid = 0
            instance.paused = True
            instance.extra["suspended"] = self._suspend_dir(instance.slot_id)
            return instance
        raise DriverError(f"{instance.slot_id}: neither its bhyve nor its suspended state is left")

    def describe_exit(self, instance: Instance, returncode: int) -> ExitVerdict:
        """bhyve's exit status as the contract defines it (``bhyve_exit_verdict``)."""
        return bhyve_exit_verdict(
            returncode,
            suspending=bool(instance.extra.get("suspending")),
            restoring=bool(instance.extra.get("restoring")),
        )

    # -- what is left on the host ------------------------------------------------------------

    def _slot_dirs(self) -> set[str]:
        found: set[str] = set()
        for root in (self.slots, self.suspended):
            if os.path.isdir(root):
                found.update(os.listdir(root))
        return found

    def _leases(self) -> dict[str, str]:
        if self.addresses is None:
            return {}
        owned = self.addresses.leases(f"{self.lease_tag} ")
        return {address: owner.split(" ", 1)[1] for address, owner in owned.items()}

    def leftovers(self, slot_ids: Sequence[str] | None = None) -> list[str]:
        """Slot directories, suspended states and address leases of this driver (the slot
        directories are how its VMs are found: each running VM has one)."""
        wanted = None if slot_ids is None else set(slot_ids)
        found = []
        for label, root in (("directory", self.slots), ("suspended", self.suspended)):
            if os.path.isdir(root):
                for slot in sorted(os.listdir(root)):
                    if wanted is None or slot in wanted:
                        found.append(f"{label} {os.path.join(root, slot)}")
        for address, slot in sorted(self._leases().items()):
            if wanted is None or slot in wanted:
                found.append(f"address {address} ({slot})")
        return found

    async def cleanup(self, keep: Sequence[str] = ()) -> list[str]:
        """Stop and remove every VM of this driver except the slots in ``keep``."""
        removed = []
        slots = self._slot_dirs() | set(self._leases().values())
        for slot in sorted(slots - set(keep)):
            removed += self.leftovers([slot])
            pid = self._pid_of(slot)
            await self.stop(
                Instance(slot, self.name, pid, "", os.path.join(self.slots, slot), host_if=None)
            )
        return removed

    def _pid_of(self, slot_id: str) -> int:
        """The pid of the slot's bhyve, from its recorded argv's process (0 if none runs)."""
        try:
            pid = int(Path(self.slots, slot_id, "bhyve.pid").read_text())
        except (OSError, ValueError):
            return 0
        probe = Instance(slot_id, self.name, pid, "", "")
        return pid if self._running(probe) else 0
