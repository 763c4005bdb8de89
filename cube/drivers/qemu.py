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

Tiers (cube/vm.py, docs/vm.md): ``start`` fills a slot by restoring the durable checkpoint of
its VM shape (made once by a cold boot of a template VM whose RAM is a file that every
restored VM maps copy-on-write), then gives the guest its own MAC, address and clock through
the control port; ``park``/``unpark`` are the hot tier; ``suspend``/``wake`` are E2B's
pause/resume through disk. Networked VMs get a tap on the node's bridge and an address from
the ns driver's IPAM, so the node's nftables policy applies to them as to namespaces.
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
from cube.drivers.ns import host_nameservers
from cube.drivers.ns_ipam import AddressPool
from cube.drivers.ns_netlink import Netlink, link_index
from cube.drivers.process import node_tag
from cube.drivers.qemu_qmp import QmpError, open_qmp
from cube.images import Image, ImageSpec, ensure_image
from cube.vm import (
    AgentTimeout,
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

__all__ = [
    "AgentTimeout",
    "CheckpointBroken",
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
MEMORY_FILE = "ram"  # a durable checkpoint's guest RAM
# Part of every durable checkpoint's key: bump it when how a template VM is prepared changes.
CHECKPOINT_FORMAT = 2


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
    bridge: str = "cubebr0"  # the node's bridge: each networked VM gets a tap on it
    # the bridge's own address; when set, the driver creates the bridge if it is missing and
    # leases each VM an address of its subnet (the ns driver's IPAM, /run/cube-ipam)
    gateway: str = ""
    prefix_len: int = 16
    ipam_dir: str = "/run/cube-ipam"
    nameservers: tuple[str, ...] = ()  # the guests' resolv.conf; () = the host's
    # TCG's translation cache; QEMU's default (1 GiB with enough RAM) makes every VM's
    # footprint large for no gain on a microVM's small working set
    tcg_tb_size_mb: int = 128
    # the durable tier: fill slots by restoring a checkpoint of a booted template VM (made
    # once per VM shape by a cold boot) instead of cold booting each one
    durable: bool = True
    checkpoint_dir: str = ""  # "" = <state_dir>/qemu/checkpoints
    keep_checkpoints: int = 4


class SlotPaths(msgspec.Struct, frozen=True):
    """Where a slot's files live on the host."""

    directory: str
    qmp: str
    agent: str
    console: str
    log: str
    control: str = ""  # the control agent's port (cube/images/guestctl.py)

    @classmethod
    def under(cls, root: str | os.PathLike[str], slot_id: str) -> SlotPaths:
        directory = os.path.join(root, slot_id)
        paths = cls(
            directory=directory,
            qmp=os.path.join(directory, "qmp.sock"),
            agent=os.path.join(directory, "agent.sock"),
            console=os.path.join(directory, "console.log"),
            log=os.path.join(directory, "qemu.log"),
            control=os.path.join(directory, "ctl.sock"),
        )
        for sock in (paths.qmp, paths.agent, paths.control):
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
    control: str = ""  # the control agent's port name; "" for an image without one


class Snapshot(msgspec.Struct, frozen=True):
    """A VM's saved memory and device state, and the shape to restore it into."""

    directory: str
    shape: VmShape
    qemu_version: str
    state_bytes: int
    seconds: float  # how long stop + migrate took
    created: float
    # the guest's RAM as a file in the directory (a durable checkpoint): the state file then
    # holds only the devices, and a restore maps the file privately (copy-on-write)
    memory_file: str = ""

    @property
    def state_file(self) -> str:
        return os.path.join(self.directory, SNAPSHOT_STATE)


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
    memory_file: str | None = None,
    share_memory: bool = False,
) -> list[str]:
    """The QEMU command line of one VM. A restore uses the same call with ``incoming=True``:
    only ``-incoming defer`` differs, as migration requires.

    Guest RAM is always the memory backend ``mem``, so that every VM's RAM block has the same
    name and any snapshot restores into any of them: anonymous memory, or ``memory_file``
    mapped shared (a template VM, whose RAM is then the checkpoint's file) or private (a VM
    restored from that checkpoint: its pages are the file's, in the host's page cache, shared
    by every VM restored from it, until the guest writes them)."""
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
    machine = ("microvm,acpi=on" if microvm else "q35") + ",memory-backend=mem"
    size = f"size={shape.memory_mb}M"
    if memory_file is None:
        backend = f"memory-backend-ram,id=mem,{size}"
    else:
        share = "on" if share_memory else "off"
        backend = f"memory-backend-file,id=mem,{size},mem-path={memory_file},share={share}"
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
        "-object",
        backend,
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
    if shape.control:
        argv += ["-chardev", f"socket,id=ctl0,path={paths.control},server=on,wait=off"]
        argv += ["-device", f"virtserialport,bus=vser0.0,chardev=ctl0,name={shape.control}"]
    if shape.network:
        if tap is None:
            raise DriverError("a networked VM shape needs a tap device")
        argv += ["-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no"]
        argv += ["-device", f"virtio-net-{suffix},netdev=net0" + (f",mac={mac}" if mac else "")]
    if incoming:
        argv += ["-S", "-incoming", "defer"]
    return argv


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


async def _ignore_shared_memory(qmp: Any, state: bool = True) -> None:
    """Leave shared file-backed RAM out of a migration, or not (both ends must agree; the
    stream records the setting)."""
    capability = {"capability": "x-ignore-shared", "state": state}
    await qmp.execute("migrate-set-capabilities", {"capabilities": [capability]})


def _sparsify(path: str, chunk: int = 1 << 16) -> int:
    """Punch holes where ``path`` (a template's RAM) holds only zeros, and flush it to disk;
    returns the bytes kept. ``init_on_free`` leaves most of a guest's RAM zero: as holes they
    cost neither disk nor page cache, and read as zeros in every VM mapped from the file. A
    file system without hole punching keeps the zeros."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    punch = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
    zero = bytes(chunk)
    kept = 0
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        for offset in range(0, size, chunk):
            data = os.pread(fd, chunk, offset)
            if data != zero[: len(data)]:
                kept += len(data)
            elif punch and libc.fallocate(fd, punch, offset, len(data)) != 0:
                punch = 0  # not supported here: keep the zeros
                kept += len(data)
            elif not punch:
                kept += len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return kept


async def _run(argv: Sequence[str]) -> str:
    """A short host tool (ip, qemu --version); its failure is a DriverError."""
    done = await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True, check=False)
    if done.returncode != 0:
        raise DriverError(f"{' '.join(argv)}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode(errors="replace")


# ---------------------------------------------------------------------------------------------
# The driver


class CheckpointBroken(DriverError):
    """A snapshot cannot be restored (QEMU changed, its image is gone, migration failed)."""


class QemuDriver:
    """The Driver for QEMU microVMs (see the module docstring).

    Beyond ``Driver`` it has the VM hooks the pool, node and sandbox group use when present
    (``cube/drivers/base.py``): ``park``/``unpark`` (the hot tier), ``suspend``/``wake``
    (E2B pause/resume: memory to disk, QEMU exits), ``adopt`` and ``describe_exit``.
    """

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
        self.suspended = os.path.join(self.root, "suspended")
        self.checkpoints = CheckpointStore(
            config.checkpoint_dir or os.path.join(self.root, "checkpoints")
        )
        # address leases are host-wide files: the owner names this node and the slot
        self.lease_tag = "vm-" + node_tag(self.config.state_dir)
        self.addresses = (
            AddressPool(config.ipam_dir, config.gateway, config.prefix_len)
            if config.gateway
            else None
        )
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
        shape = self._shape(SlotSpec(slot_id=slot, memory_mb=256, network=False), "kvm")
        started = time.monotonic()
        try:
            instance = await self._launch(
                slot, shape, spawn, timeout=self.config.kvm_probe_timeout, fresh_clock=False
            )
        except DriverError as e:
            await self.stop(Instance(slot, self.name, 0, "", os.path.join(self.slots, slot)))
            return "tcg", f"KVM probe failed: {e}"
        elapsed = time.monotonic() - started
        await self.stop(instance)
        return "kvm", f"KVM boot answered in {elapsed:.2f} s"

    async def _prepare(self, spawn: Spawner) -> str:
        """What every VM start needs once: the image, the accelerator, the TSC rate and the
        bridge. Returns the accelerator."""
        await self.ensure_image()
        accel = await self.accelerator(spawn)
        await self.tsc_khz()
        self._ensure_bridge()
        return accel

    # -- network ------------------------------------------------------------------------------

    def _ensure_bridge(self) -> None:
        """Create the node's bridge with the gateway address when it is missing (as the ns
        driver does); without a configured gateway the bridge is someone else's."""
        bridge, gateway = self.config.bridge, self.config.gateway
        if not gateway or link_index(bridge):
            return
        with Netlink() as nl:
            nl.create_bridge(bridge)
            index = link_index(bridge)
            nl.add_address(index, gateway, self.config.prefix_len)
            nl.set_up(index)

    async def close(self) -> None:
        """Remove the node's bridge once no VM of this driver is left (the node calls this
        when it stops; a VM kept for re-adoption keeps it)."""
        if not self.config.gateway or self.leftovers() or not link_index(self.config.bridge):
            return
        with Netlink() as nl:
            nl.delete_link(self.config.bridge)
        await trio.lowlevel.checkpoint()

    def _wants_network(self, spec: SlotSpec) -> bool:
        return spec.network and os.path.exists(f"/sys/class/net/{self.config.bridge}")

    def _owner(self, slot_id: str) -> str:
        return f"{self.lease_tag} {slot_id}"

    def _lease(self, slot_id: str) -> str | None:
        """An address of the node's subnet for the slot, or None without IPAM."""
        return self.addresses.acquire(self._owner(slot_id)) if self.addresses else None

    def _release(self, slot_id: str, ip: str | None) -> None:
        if self.addresses is None:
            return
        owner = self._owner(slot_id)
        for address in [ip] if ip else list(self.addresses.leases(owner)):
            self.addresses.release(address, owner)

    def _identity(self, slot_id: str, ip: str | None) -> GuestIdentity:
        """Who the slot's VM is on the bridge (what a restored VM is told)."""
        return GuestIdentity(
            mac=mac_address(slot_id),
            address=f"{ip}/{self.config.prefix_len}" if ip else "",
            gateway=self.config.gateway if ip else "",
            hostname=f"cube-{slot_id}",
            nameservers=tuple(self.config.nameservers or host_nameservers()),
        )

    async def _add_tap(self, slot_id: str, *, attach: bool = True) -> str:
        """The slot's tap, new; on the bridge and isolated there like the ns driver's veths
        (``attach=False`` for a template VM, whose MAC must never reach the bridge)."""
        tap = _tap_name(self.config.state_dir, slot_id)
        if os.path.exists(f"/sys/class/net/{tap}"):
            await _run(["ip", "link", "del", tap])
        await _run(["ip", "tuntap", "add", "dev", tap, "mode", "tap"])
        if attach:
            await _run(["ip", "link", "set", tap, "master", self.config.bridge, "up"])
            with Netlink() as nl:
                nl.configure_bridge_port(tap, alias=f"cube-vm {slot_id}")
        else:
            await _run(["ip", "link", "set", tap, "up"])
        return tap

    async def _del_tap(self, tap: str) -> None:
        if os.path.exists(f"/sys/class/net/{tap}"):
            await _run(["ip", "link", "del", tap])

    # -- starting VMs -------------------------------------------------------------------------

    def _shape(
        self,
        spec: SlotSpec,
        accel: str,
        *,
        network: bool = False,
        extra_cmdline: str = "",
        zero_freed: bool = True,
    ) -> VmShape:
        """The VM's shape. ``zero_freed=False`` drops the image's ``init_on_free=1``: it
        makes snapshots ~30% smaller (migration skips zero pages) but costs a cold boot ~1 s
        under TCG (the kernel zeroes all memory as it frees it at boot), which a VM that is
        never checkpointed need not pay."""
        cmdline = self.image.cmdline
        if not zero_freed:
            cmdline = " ".join(o for o in cmdline.split() if o != "init_on_free=1")
        if accel == "tcg" and self._tsc_khz:
            cmdline += f" tsc_early_khz={self._tsc_khz}"
        if extra_cmdline:
            cmdline += " " + extra_cmdline
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
            control=self.image.control_channel,
        )

    async def start(self, spec: SlotSpec, spawn: Spawner) -> Instance:
        """Make a VM for the slot and return once its agent answers.

        With the durable tier (the default) the VM is restored from the checkpoint of its
        shape, made now by one cold boot if there is none yet; otherwise it is cold booted.
        ``Instance.extra["tier"]`` says which: "durable", or "cold" when this start booted.
        """
        accel = await self._prepare(spawn)
        network = self._wants_network(spec)
        if not self.config.durable:
            return await self._boot(spec, spawn, accel, network)
        for attempt in range(2):
            key, made = await self._checkpoint(spec, spawn, accel, network)
            try:
                instance = await self.restore(spec, spawn, self.checkpoints.path(key))
            except CheckpointBroken:
                if made or attempt:
                    raise
                self.checkpoints.remove(key)  # e.g. its image was pruned: make it again
                continue
            instance.extra["tier"] = "cold" if made else "durable"
            return instance
        raise AssertionError("unreachable")

    async def _boot(self, spec: SlotSpec, spawn: Spawner, accel: str, network: bool) -> Instance:
        """Cold boot: the VM's address, gateway and hostname are on its kernel command line."""
        ip = self._lease(spec.slot_id) if network else None
        identity = self._identity(spec.slot_id, ip)
        options = f"cube.hostname={identity.hostname}"
        if ip:
            options += f" cube.ip={identity.address} cube.gw={identity.gateway}"
        shape = self._shape(spec, accel, network=network, extra_cmdline=options, zero_freed=False)
        try:
            instance = await self._launch(
                spec.slot_id,
                shape,
                spawn,
                timeout=self.config.boot_timeout,
                ip=ip,
                identity=identity,
            )
        except BaseException:
            self._release(spec.slot_id, ip)
            raise
        instance.extra["tier"] = "cold"
        return instance

    async def ensure_checkpoint(self, spec: SlotSpec, spawn: Spawner) -> tuple[str, bool]:
        """The directory of the durable checkpoint for ``spec``'s shape, made now (one cold
        boot) if there is none: (directory, made by this call)."""
        accel = await self._prepare(spawn)
        key, made = await self._checkpoint(spec, spawn, accel, self._wants_network(spec))
        return self.checkpoints.path(key), made

    async def _checkpoint(
        self, spec: SlotSpec, spawn: Spawner, accel: str, network: bool
    ) -> tuple[str, bool]:
        """The durable checkpoint for ``spec``'s shape: (key, made by this call)."""
        shape = self._shape(spec, accel, network=network)
        key = CheckpointStore.key(CHECKPOINT_FORMAT, await self.qemu_version(), shape)

        async def create(directory: str) -> dict[str, object]:
            return await self._make_checkpoint(directory, shape, spawn)

        _, made = await self.checkpoints.ensure(key, create)
        if made:
            self.checkpoints.prune(self.config.keep_checkpoints)
        return key, made

    async def _make_checkpoint(
        self, directory: str, shape: VmShape, spawn: Spawner
    ) -> dict[str, object]:
        """Cold boot a template VM of ``shape``, warm its envd up, and suspend it into
        ``directory``. Its tap is on no bridge and it has no address: every restored VM is
        given its own."""
        slot = f"tpl-{os.getpid()}-{secrets.token_hex(3)}"
        started = time.monotonic()
        instance = await self._launch(
            slot,
            shape,
            spawn,
            timeout=self.config.boot_timeout,
            mac=mac_address("template"),
            attach=False,
            fresh_clock=False,
            memory_file=os.path.join(directory, MEMORY_FILE),
            share_memory=True,
        )
        try:
            booted = time.monotonic() - started
            await warm_up_agent(instance.envd)
            snap = await self.snapshot(instance, directory, memory_file=MEMORY_FILE)
        finally:
            with trio.CancelScope(shield=True):
                await self.stop(instance)
        ram = os.path.join(directory, MEMORY_FILE)
        kept = await trio.to_thread.run_sync(_sparsify, ram)
        return {
            "boot_seconds": round(booted, 3),
            "snapshot_seconds": snap.seconds,
            "memory_bytes": kept,
        }

    async def _launch(
        self,
        slot_id: str,
        shape: VmShape,
        spawn: Spawner,
        *,
        timeout: float,
        snapshot: Snapshot | None = None,
        ip: str | None = None,
        mac: str | None = None,
        identity: GuestIdentity | None = None,
        attach: bool = True,
        fresh_clock: bool = True,
        memory_file: str | None = None,
        share_memory: bool = False,
    ) -> Instance:
        """Start QEMU for ``shape`` (restoring ``snapshot`` into it, if given), wait for the
        agent, then tell the guest ``identity`` and the time through its control port. On any
        failure everything of the slot is removed again (its lease too). ``memory_file``:
        see ``qemu_argv``; a snapshot with a memory file is restored from it."""
        if snapshot is not None and snapshot.memory_file:
            memory_file = os.path.join(snapshot.directory, snapshot.memory_file)
        paths = SlotPaths.under(self.slots, slot_id)
        shutil.rmtree(paths.directory, ignore_errors=True)
        os.makedirs(paths.directory, mode=0o700)
        mac = identity.mac if identity is not None else mac
        instance = Instance(
            slot_id=slot_id,
            driver=self.name,
            pid=0,
            envd=f"unix:{paths.agent}",
            state_dir=paths.directory,
            ip=ip,
            # channel: the envd socket is a virtio-console port, not a listener: a new
            # connection does not start a new session on the guest side, a hello does
            extra={
                "channel": "virtio-console",
                "qmp": paths.qmp,
                "console": paths.console,
                "control": paths.control if shape.control else "",
                "mac": mac or "",
                "shape": msgspec.to_builtins(shape),
            },
        )
        handle: Any = None
        try:
            tap = await self._add_tap(slot_id, attach=attach) if shape.network else None
            instance.host_if = tap
            argv = qemu_argv(
                self.config.qemu,
                shape,
                paths,
                tap=tap,
                mac=mac,
                incoming=snapshot is not None,
                tcg_tb_size_mb=self.config.tcg_tb_size_mb,
                name=f"cube-{slot_id}",
                memory_file=memory_file,
                share_memory=share_memory,
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
            await self._introduce(instance, shape, identity, fresh_clock=fresh_clock)
        except BaseException as e:
            with trio.CancelScope(shield=True):
                detail = self._log_tail(paths)
                if handle is not None and not self._running(instance):
                    with trio.move_on_after(1.0):  # the reaper collects the status soon
                        detail = f"QEMU: {await handle.wait()}\n{detail}"
                await self.stop(instance)
            if isinstance(e, DriverError) and detail:
                raise type(e)(f"{e}\n{detail}") from e
            raise
        return instance

    async def _introduce(
        self,
        instance: Instance,
        shape: VmShape,
        identity: GuestIdentity | None,
        *,
        fresh_clock: bool,
    ) -> None:
        """Through the control port: the VM's own MAC, address, hostname and nameservers (a
        restored VM wakes with its checkpoint's), and the host's time."""
        control = instance.extra.get("control")
        if not control:
            return  # an image without the control agent
        if identity is not None and identity.address and shape.network:
            await guest_control(control, "net", *identity.net_args())
        if fresh_clock:
            await set_guest_clock(control)

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

    # -- stopping -----------------------------------------------------------------------------

    async def stop(self, instance: Instance) -> None:
        """Kill the slot's QEMU (QMP quit, then SIGKILL) and remove its tap, address lease,
        directory and suspended state. Idempotent, and safe after QEMU was killed from
        outside."""
        paths = SlotPaths.under(self.slots, instance.slot_id)
        if self._running(instance):
            with trio.move_on_after(2.0):
                try:
                    async with open_qmp(paths.qmp, timeout=1.0) as qmp:
                        await qmp.quit()
                except QmpError:
                    pass  # it is killed below
            await self._kill(instance.pid, paths)
        for pid in self._qemu_pids(instance.slot_id):  # e.g. a second QEMU of the slot
            await self._kill(pid, paths)
        await self._del_tap(instance.host_if or _tap_name(self.config.state_dir, instance.slot_id))
        self._release(instance.slot_id, instance.ip)
        shutil.rmtree(paths.directory, ignore_errors=True)
        shutil.rmtree(self._suspend_dir(instance.slot_id), ignore_errors=True)

    async def _kill(self, pid: int, paths: SlotPaths, *, grace: float = 0.0) -> None:
        """SIGKILL ``pid`` if it is still this slot's QEMU after ``grace`` seconds (it was
        asked to quit), and wait until it has died."""
        with trio.move_on_after(grace):
            while self._is_slot_qemu(pid, paths):
                await trio.sleep(0.005)
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

    def _running(self, instance: Instance) -> bool:
        """Whether the slot's QEMU process runs."""
        return self._is_slot_qemu(instance.pid, SlotPaths.under(self.slots, instance.slot_id))

    def alive(self, instance: Instance) -> bool:
        """Whether the sandbox still exists: its QEMU runs, or it is suspended to disk (a
        paused sandbox has no process and is resumed from its saved state). A journaled pid
        can predate a wake, so a slot's QEMU is also looked for by its QMP socket."""
        return (
            self._running(instance)
            or self._is_suspended(instance.slot_id)
            or bool(self._qemu_pids(instance.slot_id))
        )

    # -- pause, park, suspend -----------------------------------------------------------------

    async def pause(self, instance: Instance) -> None:
        """Stop the vCPUs (QMP ``stop``); memory stays as it is."""
        async with open_qmp(instance.extra["qmp"], timeout=5.0) as qmp:
            await qmp.execute("stop")
        instance.paused = True

    async def resume(self, instance: Instance) -> None:
        """Run the vCPUs again (QMP ``cont``) and step the guest's clock to the host's: under
        TCG the guest's clocks stood still while it was stopped."""
        async with open_qmp(instance.extra["qmp"], timeout=5.0) as qmp:
            await qmp.execute("cont")
        instance.paused = False
        if instance.extra.get("control"):
            await set_guest_clock(instance.extra["control"])

    async def park(self, instance: Instance) -> None:
        """The hot tier: a warm pool slot waits with its vCPUs stopped (QMP ``stop``)."""
        await self.pause(instance)

    async def unpark(self, instance: Instance) -> None:
        """Bind time for a parked slot: ``cont`` and a fresh clock (about 3 ms here)."""
        await self.resume(instance)

    async def status(self, instance: Instance) -> str:
        """QEMU's run state of the VM ("running", "paused", ...), or "suspended"."""
        if not self._running(instance) and self._is_suspended(instance.slot_id):
            return "suspended"
        async with open_qmp(instance.extra["qmp"], timeout=5.0) as qmp:
            return await qmp.status()

    def _suspend_dir(self, slot_id: str) -> str:
        return os.path.join(self.suspended, slot_id)

    def _is_suspended(self, slot_id: str) -> bool:
        return os.path.exists(os.path.join(self._suspend_dir(slot_id), SNAPSHOT_META))

    async def suspend(self, instance: Instance) -> None:
        """E2B pause: save the VM's memory to disk and end its QEMU. The tap, the address
        and the directory of the suspended state stay; ``wake`` restores it. ``instance`` is
        updated (no pid; ``extra["suspended"]`` is the state's directory)."""
        directory = self._suspend_dir(instance.slot_id)
        shutil.rmtree(directory, ignore_errors=True)
        await self.snapshot(instance, directory)
        instance.pid = 0
        instance.paused = True
        instance.extra["suspended"] = directory

    async def wake(self, instance: Instance, spawn: Spawner) -> None:
        """E2B resume of a suspended VM: a new QEMU of the same slot (tap, address, MAC)
        restores the saved memory; the clock is stepped. ``instance`` is updated in place."""
        directory = self._suspend_dir(instance.slot_id)
        snap = self.load_snapshot(directory)
        await self._check_restorable(snap)
        woken = await self._launch(
            instance.slot_id,
            snap.shape,
            spawn,
            timeout=self.config.restore_timeout,
            snapshot=snap,
            ip=instance.ip,
            mac=instance.extra.get("mac") or None,
        )
        instance.pid = woken.pid
        instance.host_if = woken.host_if
        instance.paused = False
        instance.extra.update(woken.extra)
        instance.extra.pop("suspended", None)
        shutil.rmtree(directory, ignore_errors=True)

    async def adopt(self, instance: Instance) -> Instance:
        """The instance as it is now, after a service restart: the journal's copy may name a
        pid from before a suspend or a wake. DriverError if nothing of it is left."""
        pids = self._qemu_pids(instance.slot_id)
        if pids:
            instance.pid = pids[0]
            instance.extra.pop("suspended", None)
            with trio.move_on_after(5.0):
                try:
                    instance.paused = await self.status(instance) != "running"
                except QmpError:
                    pass  # keep what the journal said
            return instance
        if self._is_suspended(instance.slot_id):
            instance.pid = 0
            instance.paused = True
            instance.extra["suspended"] = self._suspend_dir(instance.slot_id)
            return instance
        raise DriverError(f"{instance.slot_id}: neither its QEMU nor its suspended state is left")

    def describe_exit(self, instance: Instance, returncode: int) -> ExitVerdict:
        """What QEMU's exit status means: 0 is the guest powering off (or resetting, which
        ``-no-reboot`` turns into an exit), a signal a crash, anything else a QEMU failure."""
        if returncode == 0:
            return ExitVerdict("powered_off", "the guest powered off (QEMU exited with status 0)")
        if returncode < 0:
            return ExitVerdict("crashed", f"QEMU was {describe_signal(returncode)}")
        tail = self._log_tail(SlotPaths.under(self.slots, instance.slot_id), lines=3)
        return ExitVerdict("failed", f"QEMU exited with status {returncode}\n{tail}".strip())

    # -- snapshot / restore -------------------------------------------------------------------

    async def snapshot(
        self,
        instance: Instance,
        directory: str,
        *,
        keep_running: bool = False,
        memory_file: str = "",
    ) -> Snapshot:
        """Save the VM to ``directory`` (its state file and snapshot.json).

        The VM is stopped, migrated to the file, then continued (``keep_running``) or ended
        with QMP ``quit`` (a suspend: call ``stop`` afterwards to remove the slot). A
        snapshot is complete only once snapshot.json exists; it is written last. If the
        migration fails the VM runs on. ``memory_file``: the VM was started with its RAM
        shared in that file of ``directory`` (a template), so the migration leaves RAM out
        (QEMU's ``x-ignore-shared``) and the snapshot records the file.
        """
        shape = msgspec.convert(instance.extra["shape"], VmShape)
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        (target / SNAPSHOT_META).unlink(missing_ok=True)
        partial = target / (SNAPSHOT_STATE + ".partial")
        started = time.monotonic()
        async with open_qmp(instance.extra["qmp"], timeout=5.0) as qmp:
            # a VM restored from a checkpoint had it on: a full snapshot must say it is off
            await _ignore_shared_memory(qmp, bool(memory_file))
            await qmp.execute("stop")
            try:
                await qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(partial))}"})
                await self._wait_migration(qmp, "saving")
            except DriverError:
                with trio.CancelScope(shield=True):
                    await qmp.execute("cont")
                raise
            seconds = time.monotonic() - started
            if keep_running:
                await qmp.execute("cont")
            else:
                await qmp.quit()
        if not keep_running:  # on return the QEMU process is gone
            paths = SlotPaths.under(self.slots, instance.slot_id)
            await self._kill(instance.pid, paths, grace=2.0)
        instance.paused = not keep_running
        partial.replace(target / SNAPSHOT_STATE)
        snap = Snapshot(
            directory=str(target),
            shape=shape,
            qemu_version=await self.qemu_version(),
            state_bytes=(target / SNAPSHOT_STATE).stat().st_size,
            seconds=round(seconds, 3),
            created=time.time(),
            memory_file=memory_file,
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
                    raise CheckpointBroken(
                        f"migration ({what}) {status}: {info.get('error-desc', '')}"
                    )
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
            raise CheckpointBroken(f"no complete snapshot in {directory}: {e}") from e
        return msgspec.structs.replace(snap, directory=directory)

    async def _check_restorable(self, snap: Snapshot) -> None:
        """CheckpointBroken when this QEMU cannot restore ``snap``: another QEMU version wrote
        it (migration streams are not portable), or its kernel, initramfs or state is gone."""
        version = await self.qemu_version()
        if snap.qemu_version != version:
            raise CheckpointBroken(
                f"snapshot {snap.directory} is from {snap.qemu_version}, this is {version}"
            )
        needed = [snap.shape.kernel, snap.shape.initrd, snap.state_file]
        if snap.memory_file:
            needed.append(os.path.join(snap.directory, snap.memory_file))
        for path in needed:
            if not os.path.exists(path):
                raise CheckpointBroken(f"snapshot {snap.directory} needs {path}, which is gone")

    async def restore(self, spec: SlotSpec, spawn: Spawner, snapshot: Snapshot | str) -> Instance:
        """Start a VM for ``spec`` from a snapshot and return once its agent answers, with its
        own MAC, address (when the node has IPAM) and a fresh clock.

        The VM gets the snapshot's shape (memory, vCPUs, devices), not ``spec``'s: migration
        needs the identical machine. CheckpointBroken when the snapshot cannot be restored.
        """
        snap = self.load_snapshot(snapshot) if isinstance(snapshot, str) else snapshot
        await self._check_restorable(snap)
        if snap.shape.network and not self._wants_network(spec):
            raise DriverError(
                f"snapshot {snap.directory} has a NIC but bridge {self.config.bridge} is missing"
            )
        self._ensure_bridge()
        ip = self._lease(spec.slot_id) if snap.shape.network else None
        try:
            return await self._launch(
                spec.slot_id,
                snap.shape,
                spawn,
                timeout=self.config.restore_timeout,
                snapshot=snap,
                ip=ip,
                identity=self._identity(spec.slot_id, ip),
            )
        except BaseException:
            self._release(spec.slot_id, ip)
            raise

    async def _migrate_in(
        self, instance: Instance, snap: Snapshot, alive: Callable[[], bool]
    ) -> None:
        """Feed the snapshot into a QEMU started with ``-incoming defer``, then run it."""
        async with open_qmp(instance.extra["qmp"], timeout=10.0, alive=alive) as qmp:
            if snap.memory_file:  # RAM is the mapped file, not in the stream
                await _ignore_shared_memory(qmp)
            await qmp.execute(
                "migrate-incoming", {"uri": f"exec:cat {shlex.quote(snap.state_file)}"}
            )
            await self._wait_migration(qmp, "loading")
            await qmp.execute("cont")

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

    def _leases(self) -> dict[str, str]:
        """Address -> slot of every address this driver holds."""
        if self.addresses is None:
            return {}
        owned = self.addresses.leases(f"{self.lease_tag} ")
        return {address: owner.split(" ", 1)[1] for address, owner in owned.items()}

    def leftovers(self, slot_ids: Sequence[str] | None = None) -> list[str]:
        """QEMU processes, slot directories, suspended states, taps and address leases of
        this driver still on the host."""
        wanted = None if slot_ids is None else set(slot_ids)
        found = []
        for pid in self._qemu_pids():
            slot = self._slot_of_pid(pid)
            if wanted is None or slot in wanted:
                found.append(f"process {pid} (qemu of {slot})")
        for label, root in (("directory", self.slots), ("suspended", self.suspended)):
            if os.path.isdir(root):
                for slot in sorted(os.listdir(root)):
                    if wanted is None or slot in wanted:
                        found.append(f"{label} {os.path.join(root, slot)}")
        taps = (
            {_tap_name(self.config.state_dir, slot): slot for slot in wanted}
            if wanted is not None
            else None
        )
        for tap in self._taps():
            if taps is None or tap in taps:
                found.append(f"tap {tap}")
        for address, slot in sorted(self._leases().items()):
            if wanted is None or slot in wanted:
                found.append(f"address {address} ({slot})")
        return found

    async def cleanup(self, keep: Sequence[str] = ()) -> list[str]:
        """Kill and remove everything of this driver except the slots in ``keep``."""
        kept = set(keep)
        removed = []
        slots: set[str] = set()
        for root in (self.slots, self.suspended):
            if os.path.isdir(root):
                slots.update(os.listdir(root))
        for pid in self._qemu_pids():
            slot = self._slot_of_pid(pid)
            if slot is not None:
                slots.add(slot)
        slots.update(self._leases().values())
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
