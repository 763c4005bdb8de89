"""The ``qemu`` driver: one microVM per sandbox, the Linux analogue of bhyve.

Each slot is one QEMU process (spawned through the caller's ``spawn``, so the host reaper owns
it) booting a guest image (``cube.images``: Debian cloud kernel + initramfs with Python and
envd). The host reaches the guest's envd through a virtio-console port that QEMU exposes as a
unix socket; QEMU is controlled through QMP on a second unix socket. Both live in the slot's
directory, ``<state_dir>/qemu/slots/<slot_id>/``, with the serial console's log.

Machine: ``microvm`` (virtio-mmio devices, no PCI, no firmware tables beyond ACPI), the
smallest machine QEMU has and the fastest to boot under TCG. ``q35`` (virtio-pci, like bhyve's
``-s`` slots) is available for parity checks; see docs/vm.md.

Accelerator: KVM only when a probe boot of the image answers within ``kvm_probe_timeout``
(nested KVM on the development machines either aborts at once or never finishes booting), else
TCG. The verdict is cached per host boot in ``<state_dir>/qemu/accel.json``.

Snapshots: ``snapshot`` stops the VM and migrates its state to a file (``exec:cat > FILE``;
QEMU 7.2 has no ``file:`` URI); ``restore`` starts QEMU with the identical machine and devices
plus ``-incoming defer``, feeds the file with ``migrate-incoming``, and continues the VM. Disk
contents are not part of a snapshot (the guest runs from its initramfs).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import mmap
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec
import trio

from cube.drivers.base import DriverError, Instance, SlotSpec, Spawner
from cube.drivers.qemu_qmp import QmpError, open_qmp
from cube.images import Image, ImageSpec, ensure_image

__all__ = [
    "AgentTimeout",
    "QemuConfig",
    "QemuDriver",
    "SlotPaths",
    "Snapshot",
    "VmShape",
    "agent_hello",
    "host_tsc_khz",
    "qemu_argv",
]

# sun_path is 108 bytes on Linux, the NUL included.
UNIX_PATH_MAX = 107
SNAPSHOT_STATE = "state"
SNAPSHOT_META = "snapshot.json"


class QemuConfig(msgspec.Struct, frozen=True):
    """Host-level settings of the qemu driver."""

    state_dir: str = "/var/lib/cube"
    qemu: str = "qemu-system-x86_64"
    machine: Literal["microvm", "q35"] = "microvm"
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    kvm_probe_timeout: float = 5.0  # a KVM boot slower than this is no better than TCG
    boot_timeout: float = 60.0  # cold boot to envd answering
    restore_timeout: float = 30.0  # migrate-incoming to envd answering
    migrate_timeout: float = 60.0
    bridge: str = "cubebr0"  # attach a tap here when it exists (the net driver creates it)
    # TCG's translation cache; QEMU's default (1 GiB with enough RAM) makes every VM's
    # footprint large for no gain on a microVM's small working set
    tcg_tb_size_mb: int = 128


class SlotPaths(msgspec.Struct, frozen=True):
    """Where a slot's files live on the host."""

    directory: str
    qmp: str
    agent: str
    console: str
    log: str

    @classmethod
    def under(cls, root: str | os.PathLike[str], slot_id: str) -> SlotPaths:
        directory = os.path.join(root, slot_id)
        paths = cls(
            directory=directory,
            qmp=os.path.join(directory, "qmp.sock"),
            agent=os.path.join(directory, "agent.sock"),
            console=os.path.join(directory, "console.log"),
            log=os.path.join(directory, "qemu.log"),
        )
        for sock in (paths.qmp, paths.agent):
            if len(sock.encode()) > UNIX_PATH_MAX:
                raise DriverError(f"socket path too long for a unix socket: {sock}")
        return paths


class VmShape(msgspec.Struct, frozen=True):
    """Everything that decides the VM's machine and devices: a snapshot can only be restored
    into a QEMU started with an identical shape."""

    machine: str
    accel: str
    cpus: int
    memory_mb: int
    kernel: str
    initrd: str
    cmdline: str
    channel: str
    network: bool
    image_key: str


class Snapshot(msgspec.Struct, frozen=True):
    """A VM's saved memory and device state, and the shape to restore it into."""

    directory: str
    shape: VmShape
    qemu_version: str
    state_bytes: int
    seconds: float  # how long stop + migrate took
    created: float

    @property
    def state_file(self) -> str:
        return os.path.join(self.directory, SNAPSHOT_STATE)


class AgentTimeout(DriverError):
    """The guest's agent did not answer on its channel in time."""


# ---------------------------------------------------------------------------------------------
# argv


def qemu_argv(
    qemu: str,
    shape: VmShape,
    paths: SlotPaths,
    *,
    tap: str | None = None,
    mac: str | None = None,
    incoming: bool = False,
    tcg_tb_size_mb: int = 128,
    name: str = "",
) -> list[str]:
    """The QEMU command line of one VM. A restore uses the same call with ``incoming=True``:
    only ``-incoming defer`` differs, as migration requires."""
    microvm = shape.machine == "microvm"
    # device names differ by transport: virtio-mmio on microvm, virtio-pci on q35
    suffix = "device" if microvm else "pci"
    if shape.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", f"tcg,tb-size={tcg_tb_size_mb}", "-cpu", "max"]
    # microvm keeps its PIT (the kernel calibrates the TSC against it under TCG: without it
    # the TSC is marked unstable and boot crawls) and ACPI, which is how the guest finds the
    # virtio-mmio devices (the Debian kernel lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES)
    machine = "microvm,acpi=on" if microvm else "q35"
    append = shape.cmdline + (" pci=off" if microvm else "")
    argv = [
        qemu,
        "-name",
        name or os.path.basename(paths.directory),
        "-machine",
        machine,
        *accel,
        "-smp",
        str(shape.cpus),
        "-m",
        f"{shape.memory_mb}M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        shape.kernel,
        "-initrd",
        shape.initrd,
        "-append",
        append,
        "-chardev",
        f"file,id=console0,path={paths.console}",
        "-serial",
        "chardev:console0",
        "-device",
        f"virtio-serial-{suffix},id=vser0",
        "-chardev",
        f"socket,id=agent0,path={paths.agent},server=on,wait=off",
        "-device",
        f"virtserialport,bus=vser0.0,chardev=agent0,name={shape.channel},id=agent-port",
        "-qmp",
        f"unix:{paths.qmp},server=on,wait=off",
    ]
    if shape.network:
        if tap is None:
            raise DriverError("a networked VM shape needs a tap device")
        argv += ["-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no"]
        argv += ["-device", f"virtio-net-{suffix},netdev=net0" + (f",mac={mac}" if mac else "")]
    if incoming:
        argv += ["-S", "-incoming", "defer"]
    return argv


# ---------------------------------------------------------------------------------------------
# The guest agent's channel


async def agent_hello(
    path: str, *, timeout: float, alive: Callable[[], bool] | None = None
) -> dict[str, Any]:
    """Connect to the agent's virtio-console socket, say hello, and return its answer.

    Bytes sent before the guest opens its port wait in QEMU (virtio-serial holds them until
    the guest is connected), so one hello per connection is enough. The session nonce tells
    our answer apart from any a previous host left in flight. Raises AgentTimeout, or
    DriverError when ``alive`` says QEMU died.
    """
    session = secrets.token_hex(8)
    request = (
        json.dumps({"id": 1, "op": "hello", "args": {"version": 1, "session": session}}).encode()
        + b"\n"
    )
    deadline = trio.current_time() + timeout

    def check_alive() -> None:
        if alive is not None and not alive():
            raise DriverError(f"QEMU exited before the agent answered on {path}")

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
            answer = None  # QEMU dropped the connection (or is going away): check, retry
        if answer is not None:
            return answer
        await trio.sleep(0.02)
    raise AgentTimeout(f"the guest agent did not answer on {path} within {timeout} s")


async def _read_hello(
    stream: trio.SocketStream, session: str, deadline: float, check_alive: Callable[[], None]
) -> dict[str, Any] | None:
    """Read frames until the hello answer of ``session``; None if the connection ends or the
    deadline passes. Checks that QEMU lives every quarter second while it waits."""
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
# Host helpers


def _proc_cmdline(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _cmdline_settled(pid: int, wait: float = 0.2) -> list[str] | None:
    """The command line of a live (non-zombie) ``pid``, or None if it is gone.

    A process reads as running with an empty command line for a moment in two places: while
    it exits (its memory is released before it becomes a zombie), and inside execve, after
    the vfork parent (subprocess.Popen) has already returned. Mistaking the second for "gone"
    made a just-spawned QEMU look dead, so an empty command line is read again until it
    settles (microseconds, normally), for at most ``wait`` seconds.
    """
    deadline = time.monotonic() + wait
    while True:
        if pid <= 0 or _proc_state(pid) in (None, "Z", "X"):
            return None
        cmdline = _proc_cmdline(pid)
        if cmdline is None:
            return None
        if cmdline or time.monotonic() > deadline:
            return cmdline
        time.sleep(0.001)


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2 :].split()[0].decode()


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def _rdtsc_khz(window: float = 0.05) -> int | None:
    """The TSC's rate measured against CLOCK_MONOTONIC_RAW, by running ``rdtsc`` from a page
    of machine code (x86-64 only; None where executable memory is refused)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    code = bytes(
        [0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3]
    )  # rdtsc; shl rdx,32; or rax,rdx; ret
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        return None
    try:
        page.write(code)
        anchor = ctypes.c_char.from_buffer(page)
        rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(anchor))
        rates = []
        for _ in range(3):
            t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
            c0 = rdtsc()
            time.sleep(window)
            c1 = rdtsc()
            t1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
            rates.append((c1 - c0) * 1_000_000 / (t1 - t0))
        del rdtsc, anchor  # the page cannot close while ctypes still points into it
    finally:
        page.close()
    median: float = statistics.median(rates)
    return round(median)


def host_tsc_khz() -> int | None:
    """The host's TSC frequency in kHz, which is also the TSC rate a TCG guest sees.

    A TCG guest calibrates its TSC against the PIT by counting host time; on a loaded host
    the vCPU is starved during calibration, it fails, the TSC is marked unstable and the boot
    never finishes (microvm has no HPET or ACPI PM timer to fall back on). Passing
    ``tsc_early_khz`` skips the calibration. Sources, best first: the kernel's own value
    (sysfs), the frequency a hypervisor reports (``tsc_known_freq``), a measurement.
    """
    try:
        with open("/sys/devices/system/cpu/cpu0/tsc_freq_khz") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        cpuinfo = ""
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.MULTILINE)
    mhz = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.MULTILINE)
    if flags and mhz and "tsc_known_freq" in flags.group(1).split():
        return round(float(mhz.group(1)) * 1000)
    return _rdtsc_khz()


def _tap_prefix(state_dir: str) -> str:
    """The name prefix of every tap of one driver: "tq" + a hash of its state directory, so
    that two services (or test runs) on one host never share a tap name."""
    return "tq" + hashlib.sha1(os.path.abspath(state_dir).encode()).hexdigest()[:4] + "-"


def _tap_name(state_dir: str, slot_id: str) -> str:
    """The slot's tap: the driver's prefix + a hash of the slot id (IFNAMSIZ allows 15)."""
    return _tap_prefix(state_dir) + hashlib.sha1(slot_id.encode()).hexdigest()[:8]


async def _run(argv: Sequence[str]) -> str:
    """A short host tool (ip, qemu --version); its failure is a DriverError."""
    done = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False)
    if done.returncode != 0:
        raise DriverError(f"{' '.join(argv)}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# The driver


class QemuDriver:
    """The Driver for QEMU microVMs (see the module docstring)."""

    name = "qemu"
    isolated = True

    def __init__(
        self,
        state_dir: str | None = None,
        *,
        image: Image | None = None,
        config: QemuConfig | None = None,
    ) -> None:
        """``state_dir`` overrides ``config.state_dir``. Without ``image``, the first start
        builds (or finds in the cache) the default image under the state directory."""
        config = config or QemuConfig()
        if state_dir is not None:
            config = msgspec.structs.replace(config, state_dir=state_dir)
        self.config = config
        self._image = image
        self.root = os.path.join(self.config.state_dir, "qemu")
        self.slots = os.path.join(self.root, "slots")
        self._accel: str | None = None
        self._version: str | None = None
        self._tsc_khz: int | None = None

    # -- host facts ---------------------------------------------------------------------------

    @property
    def image(self) -> Image:
        """The guest image VMs boot; DriverError before ``ensure_image`` found one."""
        if self._image is None:
            raise DriverError("the qemu driver has no image yet: await ensure_image() first")
        return self._image

    async def ensure_image(self) -> Image:
        """The image, built with ``cube image build``'s defaults if none was given."""
        if self._image is None:
            self._image = await ensure_image(ImageSpec(), self.config.state_dir)
        return self._image

    async def qemu_version(self) -> str:
        """The first line of ``qemu --version``; snapshots record it and restores check it."""
        if self._version is None:
            self._version = (await _run([self.config.qemu, "--version"])).splitlines()[0].strip()
        return self._version

    async def tsc_khz(self) -> int | None:
        """The host TSC rate TCG guests are told (``host_tsc_khz``), found once."""
        if self._tsc_khz is None:
            self._tsc_khz = await trio.to_thread.run_sync(host_tsc_khz)
        return self._tsc_khz

    async def accelerator(self, spawn: Spawner) -> str:
        """The accelerator for this host, "kvm" or "tcg": configured, cached for this host
        boot, or probed now (``probe_kvm``)."""
        if self._accel is not None:
            return self._accel
        if self.config.accel != "auto":
            self._accel = self.config.accel
            return self._accel
        cache = Path(self.root) / "accel.json"
        version = await self.qemu_version()
        try:
            cached = json.loads(cache.read_text())
        except (OSError, ValueError):
            cached = {}
        if (
            cached.get("boot_id") == _boot_id()
            and cached.get("qemu") == version
            and cached.get("accel") in ("kvm", "tcg")
        ):
            self._accel = str(cached["accel"])
            self._tsc_khz = cached.get("tsc_khz")
            return self._accel
        verdict, detail = await self.probe_kvm(spawn)
        cache.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "boot_id": _boot_id(),
            "qemu": version,
            "accel": verdict,
            "detail": detail,
            "tsc_khz": await self.tsc_khz(),
            "probed": time.time(),
        }
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(cache)
        self._accel = verdict
        return verdict

    async def probe_kvm(self, spawn: Spawner) -> tuple[str, str]:
        """Boot the image under KVM for at most ``kvm_probe_timeout`` s: ("kvm", how long) if
        its agent answered, else ("tcg", why not)."""
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg", "/dev/kvm is not usable"
        await self.ensure_image()
        slot = f"kvm-probe-{os.getpid()}"
        shape = self._shape(
            SlotSpec(slot_id=slot, memory_mb=256, network=False), "kvm", network=False
        )
        started = time.monotonic()
        try:
            instance = await self._launch(slot, shape, spawn, timeout=self.config.kvm_probe_timeout)
        except DriverError as e:
            await self.stop(Instance(slot, self.name, 0, "", os.path.join(self.slots, slot)))
            return "tcg", f"KVM probe failed: {e}"
        elapsed = time.monotonic() - started
        await self.stop(instance)
        return "kvm", f"KVM boot answered in {elapsed:.2f} s"

    # -- lifecycle ----------------------------------------------------------------------------

    def _shape(
        self, spec: SlotSpec, accel: str, *, network: bool, tsc_khz: int | None = None
    ) -> VmShape:
        cmdline = self.image.cmdline
        if accel == "tcg" and tsc_khz:
            cmdline += f" tsc_early_khz={tsc_khz}"
        return VmShape(
            machine=self.config.machine,
            accel=accel,
            cpus=max(1, math.ceil(spec.cpus)),
            memory_mb=spec.memory_mb,
            kernel=self.image.kernel,
            initrd=self.image.initrd,
            cmdline=cmdline,
            channel=self.image.channel,
            network=network,
            image_key=self.image.key,
        )

    def _wants_network(self, spec: SlotSpec) -> bool:
        return spec.network and os.path.exists(f"/sys/class/net/{self.config.bridge}")

    async def start(self, spec: SlotSpec, spawn: Spawner) -> Instance:
        """Boot a VM for the slot and return once its agent answers a hello."""
        await self.ensure_image()
        accel = await self.accelerator(spawn)
        shape = self._shape(
            spec, accel, network=self._wants_network(spec), tsc_khz=await self.tsc_khz()
        )
        return await self._launch(spec.slot_id, shape, spawn, timeout=self.config.boot_timeout)

    async def _launch(
        self,
        slot_id: str,
        shape: VmShape,
        spawn: Spawner,
        *,
        timeout: float,
        snapshot: Snapshot | None = None,
    ) -> Instance:
        """Start QEMU for ``shape`` (restoring ``snapshot`` into it, if given) and wait for the
        agent. On any failure everything of the slot is removed again."""
        paths = SlotPaths.under(self.slots, slot_id)
        shutil.rmtree(paths.directory, ignore_errors=True)
        os.makedirs(paths.directory, mode=0o700)
        instance = Instance(
            slot_id=slot_id,
            driver=self.name,
            pid=0,
            envd=f"unix:{paths.agent}",
            state_dir=paths.directory,
            # channel: the envd socket is a virtio-console port, not a listener: a new
            # connection does not start a new session on the guest side, a hello does
            extra={
                "channel": "virtio-console",
                "qmp": paths.qmp,
                "console": paths.console,
                "shape": msgspec.to_builtins(shape),
            },
        )
        handle: Any = None
        try:
            tap = await self._add_tap(slot_id) if shape.network else None
            instance.host_if = tap
            argv = qemu_argv(
                self.config.qemu,
                shape,
                paths,
                tap=tap,
                incoming=snapshot is not None,
                tcg_tb_size_mb=self.config.tcg_tb_size_mb,
                name=f"cube-{slot_id}",
            )
            with open(paths.log, "ab") as log:
                handle = await spawn(argv, cwd=paths.directory, stdout=log, stderr=log)
            instance.pid = handle.pid
            instance.extra["argv"] = argv

            def alive() -> bool:
                # the handle is the truth for a process we spawned and has not been reaped
                return bool(handle.running)

            if snapshot is not None:
                await self._migrate_in(instance, snapshot, alive)
            instance.extra["hello"] = await agent_hello(paths.agent, timeout=timeout, alive=alive)
        except BaseException as e:
            with trio.CancelScope(shield=True):
                detail = self._log_tail(paths)
                if handle is not None and not self.alive(instance):
                    with trio.move_on_after(1.0):  # the reaper collects the status soon
                        detail = f"QEMU: {await handle.wait()}\n{detail}"
                await self.stop(instance)
            if isinstance(e, DriverError) and detail:
                raise type(e)(f"{e}\n{detail}") from e
            raise
        return instance

    def _log_tail(self, paths: SlotPaths, lines: int = 15) -> str:
        """The end of QEMU's stderr and the console: what a failed boot said last."""
        parts = []
        for label, path in (("qemu", paths.log), ("console", paths.console)):
            try:
                text = Path(path).read_text(errors="replace").strip().splitlines()[-lines:]
            except OSError:
                continue
            if text:
                parts.append(f"--- {label}:\n" + "\n".join(text))
        return "\n".join(parts)

    async def stop(self, instance: Instance) -> None:
        """Kill the slot's QEMU (QMP quit, then SIGKILL) and remove its tap and directory.

        Idempotent, and safe after QEMU was killed from outside.
        """
        paths = SlotPaths.under(self.slots, instance.slot_id)
        if self.alive(instance):
            with trio.move_on_after(2.0):
                try:
                    async with open_qmp(paths.qmp, timeout=1.0) as qmp:
                        await qmp.quit()
                except QmpError:
                    pass  # it is killed below
            await self._kill(instance.pid, paths)
        for pid in self._qemu_pids(instance.slot_id):  # e.g. a second QEMU of the slot
            await self._kill(pid, paths)
        if instance.host_if:
            await self._del_tap(instance.host_if)
        shutil.rmtree(paths.directory, ignore_errors=True)

    async def _kill(self, pid: int, paths: SlotPaths) -> None:
        """SIGKILL ``pid`` if it is still this slot's QEMU, and wait until it has died."""
        with trio.move_on_after(10.0):
            while self._is_slot_qemu(pid, paths):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    return
                await trio.sleep(0.01)
            return
        raise DriverError(f"QEMU pid {pid} of {paths.directory} does not die")

    def _is_slot_qemu(self, pid: int, paths: SlotPaths) -> bool:
        """Whether ``pid`` runs (not a zombie) and is the QEMU of this slot: a pid is checked
        by its command line, because a reaped pid can be reused by anything."""
        cmdline = _cmdline_settled(pid)
        return cmdline is not None and f"unix:{paths.qmp},server=on,wait=off" in cmdline

    def alive(self, instance: Instance) -> bool:
        """Whether the slot's QEMU still runs."""
        return self._is_slot_qemu(instance.pid, SlotPaths.under(self.slots, instance.slot_id))

    async def pause(self, instance: Instance) -> None:
        """Stop the vCPUs (QMP ``stop``); memory stays as it is."""
        async with open_qmp(instance.extra["qmp"], timeout=5.0) as qmp:
            await qmp.execute("stop")
        instance.paused = True

    async def resume(self, instance: Instance) -> None:
        """Run the vCPUs again (QMP ``cont``)."""
        async with open_qmp(instance.extra["qmp"], timeout=5.0) as qmp:
            await qmp.execute("cont")
        instance.paused = False

    async def status(self, instance: Instance) -> str:
        """QEMU's run state of the VM ("running", "paused", ...)."""
        async with open_qmp(instance.extra["qmp"], timeout=5.0) as qmp:
            return await qmp.status()

    # -- snapshot / restore -------------------------------------------------------------------

    async def snapshot(
        self, instance: Instance, directory: str, *, keep_running: bool = False
    ) -> Snapshot:
        """Save the VM to ``directory`` (its state file and snapshot.json).

        The VM is stopped, migrated to the file, then continued (``keep_running``) or ended
        with QMP ``quit`` (a suspend: call ``stop`` afterwards to remove the slot). A
        snapshot is complete only once snapshot.json exists; it is written last.
        """
        shape = msgspec.convert(instance.extra["shape"], VmShape)
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        (target / SNAPSHOT_META).unlink(missing_ok=True)
        partial = target / (SNAPSHOT_STATE + ".partial")
        started = time.monotonic()
        async with open_qmp(instance.extra["qmp"], timeout=5.0) as qmp:
            await qmp.execute("stop")
            await qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(partial))}"})
            await self._wait_migration(qmp, "saving")
            seconds = time.monotonic() - started
            if keep_running:
                await qmp.execute("cont")
            else:
                await qmp.quit()
        instance.paused = not keep_running
        partial.replace(target / SNAPSHOT_STATE)
        snap = Snapshot(
            directory=str(target),
            shape=shape,
            qemu_version=await self.qemu_version(),
            state_bytes=(target / SNAPSHOT_STATE).stat().st_size,
            seconds=round(seconds, 3),
            created=time.time(),
        )
        meta = target / (SNAPSHOT_META + ".tmp")
        meta.write_bytes(msgspec.json.encode(snap))
        meta.replace(target / SNAPSHOT_META)
        return snap

    async def _wait_migration(self, qmp: Any, what: str) -> None:
        """Poll ``query-migrate`` until it completes; a failure raises DriverError."""
        with trio.move_on_after(self.config.migrate_timeout):
            while True:
                info = await qmp.execute("query-migrate")
                status = info.get("status", "")
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    raise DriverError(f"migration ({what}) {status}: {info.get('error-desc', '')}")
                await trio.sleep(0.005)
        raise DriverError(f"migration ({what}) did not complete in {self.config.migrate_timeout} s")

    @staticmethod
    def load_snapshot(directory: str) -> Snapshot:
        """The snapshot saved in ``directory``; DriverError if it is missing or incomplete."""
        try:
            snap = msgspec.json.decode(
                (Path(directory) / SNAPSHOT_META).read_bytes(), type=Snapshot
            )
        except (OSError, msgspec.DecodeError) as e:
            raise DriverError(f"no complete snapshot in {directory}: {e}") from e
        return msgspec.structs.replace(snap, directory=directory)

    async def restore(self, spec: SlotSpec, spawn: Spawner, snapshot: Snapshot | str) -> Instance:
        """Start a VM for ``spec`` from a snapshot and return once its agent answers.

        The VM gets the snapshot's shape (memory, vCPUs, devices), not ``spec``'s: migration
        needs the identical machine. It is refused when QEMU's version changed since.
        """
        snap = self.load_snapshot(snapshot) if isinstance(snapshot, str) else snapshot
        version = await self.qemu_version()
        if snap.qemu_version != version:
            raise DriverError(
                f"snapshot {snap.directory} is from {snap.qemu_version}, this is {version}"
            )
        for path in (snap.shape.kernel, snap.shape.initrd, snap.state_file):
            if not os.path.exists(path):
                raise DriverError(f"snapshot {snap.directory} needs {path}, which is gone")
        if snap.shape.network and not self._wants_network(spec):
            raise DriverError(
                f"snapshot {snap.directory} has a NIC but bridge {self.config.bridge} is missing"
            )
        return await self._launch(
            spec.slot_id, snap.shape, spawn, timeout=self.config.restore_timeout, snapshot=snap
        )

    async def _migrate_in(
        self, instance: Instance, snap: Snapshot, alive: Callable[[], bool]
    ) -> None:
        """Feed the snapshot into a QEMU started with ``-incoming defer``, then run it."""
        async with open_qmp(instance.extra["qmp"], timeout=10.0, alive=alive) as qmp:
            await qmp.execute(
                "migrate-incoming", {"uri": f"exec:cat {shlex.quote(snap.state_file)}"}
            )
            await self._wait_migration(qmp, "loading")
            await qmp.execute("cont")

    # -- networking ---------------------------------------------------------------------------

    async def _add_tap(self, slot_id: str) -> str:
        tap = _tap_name(self.config.state_dir, slot_id)
        if os.path.exists(f"/sys/class/net/{tap}"):
            await _run(["ip", "link", "del", tap])
        await _run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
        await _run(["ip", "link", "set", tap, "master", self.config.bridge, "up"])
        return tap

    async def _del_tap(self, tap: str) -> None:
        if os.path.exists(f"/sys/class/net/{tap}"):
            await _run(["ip", "link", "del", tap])

    # -- what is left on the host -------------------------------------------------------------

    def _qemu_pids(self, slot_id: str | None = None) -> list[int]:
        """Running QEMU processes of this driver (of one slot, or all)."""
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit() or _proc_state(int(name)) in (None, "Z", "X"):
                continue
            slot = self._slot_of_cmdline(_proc_cmdline(int(name)) or [])
            if slot is not None and (slot_id is None or slot == slot_id):
                found.append(int(name))
        return found

    def _slot_of_cmdline(self, cmdline: Sequence[str]) -> str | None:
        """The slot whose QMP socket a command line serves, if it is one of this driver's."""
        prefix, suffix = f"unix:{self.slots}/", "/qmp.sock,server=on,wait=off"
        for arg in cmdline:
            if arg.startswith(prefix) and arg.endswith(suffix):
                slot = arg[len(prefix) : -len(suffix)]
                if slot and "/" not in slot:
                    return slot
        return None

    def _slot_of_pid(self, pid: int) -> str | None:
        return self._slot_of_cmdline(_proc_cmdline(pid) or [])

    def _taps(self) -> list[str]:
        try:
            prefix = _tap_prefix(self.config.state_dir)
            return sorted(name for name in os.listdir("/sys/class/net") if name.startswith(prefix))
        except OSError:
            return []

    def leftovers(self, slot_ids: Sequence[str] | None = None) -> list[str]:
        """QEMU processes, slot directories and taps of this driver still on the host."""
        wanted = None if slot_ids is None else set(slot_ids)
        found = []
        for pid in self._qemu_pids():
            slot = self._slot_of_pid(pid)
            if wanted is None or slot in wanted:
                found.append(f"process {pid} (qemu of {slot})")
        if os.path.isdir(self.slots):
            for slot in sorted(os.listdir(self.slots)):
                if wanted is None or slot in wanted:
                    found.append(f"directory {os.path.join(self.slots, slot)}")
        taps = (
            {_tap_name(self.config.state_dir, slot): slot for slot in wanted}
            if wanted is not None
            else None
        )
        for tap in self._taps():
            if taps is None or tap in taps:
                found.append(f"tap {tap}")
        return found

    async def cleanup(self, keep: Sequence[str] = ()) -> list[str]:
        """Kill and remove everything of this driver except the slots in ``keep``."""
        kept = set(keep)
        removed = []
        slots = set(os.listdir(self.slots)) if os.path.isdir(self.slots) else set()
        for pid in self._qemu_pids():
            slot = self._slot_of_pid(pid)
            if slot is not None:
                slots.add(slot)
        for slot in sorted(slots - kept):
            before = self.leftovers([slot])
            await self.stop(
                Instance(
                    slot,
                    self.name,
                    0,
                    "",
                    os.path.join(self.slots, slot),
                    host_if=_tap_name(self.config.state_dir, slot),
                )
            )
            removed += before
        kept_taps = {_tap_name(self.config.state_dir, slot) for slot in kept}
        for tap in self._taps():
            if tap not in kept_taps:
                await self._del_tap(tap)
                removed.append(f"tap {tap}")
        return removed
