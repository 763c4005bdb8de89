"""The ``ns`` driver: Linux namespaces and cgroups, the jail analogue (root only).

A slot is envd running in its own mount, pid, net, uts, ipc and cgroup namespaces, inside a
cgroup that limits memory, CPU and processes, on a root filesystem that holds nothing of the
host but a read-only ``/usr`` (docs/drivers.md has the layout). ``start`` does all the slow
work, ahead of time, in a pool slot:

1. host: make sure the bridge ``cubebr0`` (gateway 10.99.0.1/16) exists, lease an address
   (``ns_ipam``), create the slot directory and cgroup (``ns_cgroup``), and write the plan;
2. spawn ``ns_init.py`` through the caller's ``spawn`` (the host reaper). It joins the cgroup,
   creates the netns and veth over netlink (``ns_netlink``), unshares the other namespaces,
   builds the root on a tmpfs, pivots into it and forks pid 1, which runs envd;
3. wait until envd listens on ``<slot dir>/run/envd.sock`` (``/run/cube/envd.sock`` inside).

envd itself comes from the node's zygote (``ns_zygote``) when envd is the real ``guest.envd``:
one pre-imported envd per node, spawned through the reaper at the first start, that forks into
each sandbox's namespaces and cgroups on pid 1's request, so a sandbox neither waits for envd's
imports nor keeps a private copy of them. Without a zygote (it failed, or a custom envd
command), pid 1 executes envd itself.

Every resource is named after the node's tag (a hash of its state directory) and the slot id,
so ``leftovers`` and ``cleanup`` find exactly this node's resources and two nodes on one host
never touch each other's:

=========  ==========================================================
cgroup     ``cube-<tag>-<slot>`` in each hierarchy (v1) or the unified tree (v2)
netns      ``/run/netns/cube-<tag>-<slot>`` (a bind mount of the namespace)
veth       ``cv<tag><hash of slot, 8>`` on the host, ``eth0`` inside; alias ``cube-<tag>-<slot>``
address    lease file ``/run/cube-ipam/<ip>`` holding ``<tag> <slot>``
directory  ``<state_dir>/slots/<slot>/`` (plan, log, ``run/`` with the envd socket)
processes  everything in the cgroup; the holder and pid 1 also name the plan in their argv
zygote     ``<state_dir>/zygote-<id>/`` (plan, socket, log) and one process naming it
=========  ==========================================================

The mounts of the sandbox live only in its own mount namespace and vanish with it; the only
host mount is the netns pin.
"""

from __future__ import annotations

import compileall
import ctypes
import errno
import functools
import importlib.util
import logging
import marshal
import os
import re
import secrets
import signal
import sys
import sysconfig
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec
import trio

from cube.drivers.base import DriverError, Instance, SlotSpec, Spawner
from cube.drivers.ns_cgroup import (
    CgroupLayout,
    CgroupLimits,
    SlotCgroup,
    detect_layout,
    named_cgroups,
)
from cube.drivers.ns_init import MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY
from cube.drivers.ns_ipam import AddressPool
from cube.drivers.ns_netlink import Netlink, link_index
from cube.drivers.process import (
    UNIX_PATH_MAX,
    check_slot_id,
    kill_and_wait,
    make_slot_dir,
    node_tag,
    process_state,
    remove_tree,
    scan_processes,
    short_hash,
    slot_dirs,
    wait_until_listening,
)

__all__ = [
    "NsDriver",
    "ResourceUsage",
    "dev_ops",
    "etc_files",
    "host_nameservers",
    "pid1_ops",
    "root_ops",
]

log = logging.getLogger("cube.drivers.ns")

INIT_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ns_init.py")
ZYGOTE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ns_zygote.py")
ZYGOTE_RETRY = 60.0  # seconds before a zygote that failed to start is tried again
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SOCKET_INSIDE = "/run/cube/envd.sock"
SRC_INSIDE = "/opt/cube/src"
SITE_INSIDE = "/opt/cube/site-packages"
USER_UID = 1000
MS_SHARED = 1 << 20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 2

# Capabilities envd and everything under it keep (the bounding set): Docker's default set minus
# NET_RAW (no spoofed packets; ping works through ping_group_range) and MKNOD (no devices).
# Without SYS_ADMIN, NET_ADMIN, SYS_PTRACE, DAC_READ_SEARCH or SYS_MODULE, the sandbox's root
# cannot undo the mounts, change its address, trace pid 1 or open files by handle.
KEEP_CAPS = (
    0,  # CHOWN
    1,  # DAC_OVERRIDE
    3,  # FOWNER
    4,  # FSETID
    5,  # KILL (its own pid namespace only)
    6,  # SETGID
    7,  # SETUID
    8,  # SETPCAP
    10,  # NET_BIND_SERVICE
    18,  # SYS_CHROOT
    29,  # AUDIT_WRITE
    31,  # SETFCAP
)
# /proc entries hidden from the sandbox (as Docker does): files get /dev/null over them,
# directories an empty read-only tmpfs; the rest are bound read-only onto themselves.
PROC_MASKED_FILES = ("kcore", "keys", "latency_stats", "timer_list", "timer_stats", "sched_debug")
PROC_MASKED_DIRS = ("acpi", "asound", "scsi")
PROC_READ_ONLY = ("bus", "fs", "irq", "sys", "sysrq-trigger")
# Host files the generated /etc borrows, read-only, when the host has them.
ETC_BORROWED = ("ld.so.cache", "services", "protocols", "alternatives", "ssl/certs")
DEFAULT_NAMESERVERS = ("8.8.8.8", "1.1.1.1")

Op = tuple[object, ...]


class ResourceUsage(msgspec.Struct, frozen=True):
    """What a sandbox uses now, and how often the kernel enforced its memory limit."""

    memory_bytes: int
    pids: int
    oom_kills: int


# ------------------------------------------------------------------------------------------
# the plan: what ns_init builds, as data


def etc_files(
    hostname: str, ip: str | None, nameservers: Sequence[str]
) -> dict[str, tuple[str, int]]:
    """The generated /etc: path -> (content, mode). The login profile is deliberately tiny:
    the E2B SDK runs every command as ``bash -l -c``, so anything here is paid per command."""
    return {
        "passwd": (
            "root:x:0:0:root:/root:/bin/bash\n"
            f"user:x:{USER_UID}:{USER_UID}:user:/home/user:/bin/bash\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
            0o644,
        ),
        "group": (
            f"root:x:0:\ntty:x:5:\nusers:x:100:user\nuser:x:{USER_UID}:\nnogroup:x:65534:\n",
            0o644,
        ),
        "shadow": ("root:*:19000:0:99999:7:::\nuser:*:19000:0:99999:7:::\n", 0o600),
        "hostname": (f"{hostname}\n", 0o644),
        "hosts": (
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"{ip or '127.0.1.1'}\t{hostname}\n",
            0o644,
        ),
        "resolv.conf": ("".join(f"nameserver {ns}\n" for ns in nameservers), 0o644),
        "nsswitch.conf": (
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\n"
            "protocols: files\nservices: files\nethers: files\nrpc: files\n",
            0o644,
        ),
        "profile": (
            "# generated by cube: kept minimal, every E2B command runs through bash -l\n"
            f"PATH={SANDBOX_PATH}\nexport PATH\n",
            0o644,
        ),
        "shells": ("/bin/sh\n/bin/bash\n/usr/bin/sh\n/usr/bin/bash\n", 0o644),
    }


def host_nameservers(path: str = "/etc/resolv.conf") -> list[str]:
    """The host's IPv4 nameservers a sandbox can reach (not loopback ones); public ones if none."""
    found = []
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if (
                    len(parts) >= 2
                    and parts[0] == "nameserver"
                    and re.fullmatch(r"[0-9.]+", parts[1])
                    and not parts[1].startswith("127.")
                ):
                    found.append(parts[1])
    except OSError:
        pass
    return found or list(DEFAULT_NAMESERVERS)


def root_ops(
    *,
    etc: dict[str, tuple[str, int]],
    run_dir: str,
    disk_mb: int,
    packages: dict[str, str],
    site_packages: Sequence[str],
) -> list[Op]:
    """The filesystem steps the holder runs on the new root (paths relative to it)."""
    ro = MS_RDONLY | MS_NOSUID | MS_NODEV
    ops: list[Op] = [
        ("dir", "usr", 0o755, 0, 0),
        ("bind", "/usr", "usr", MS_RDONLY | MS_NODEV),
    ]
    for entry in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = f"/{entry}"
        if os.path.islink(host):
            ops.append(("symlink", os.readlink(host), entry))  # merged /usr: bin -> usr/bin
        elif os.path.isdir(host):
            ops += [("dir", entry, 0o755, 0, 0), ("bind", host, entry, MS_RDONLY | MS_NODEV)]
    ops += [
        ("dir", d, mode, 0, 0)
        for d, mode in (
            ("etc", 0o755),
            ("root", 0o700),
            ("var", 0o755),
            ("var/tmp", 0o1777),
            ("run", 0o755),
            ("run/cube", 0o700),
            ("proc", 0o555),
        )
    ]
    ops += [
        ("file", f"etc/{name}", content.encode(), mode, 0, 0)
        for name, (content, mode) in etc.items()
    ]
    for name in ("os-release", "localtime"):
        if os.path.islink(f"/etc/{name}"):
            ops.append(("symlink", os.readlink(f"/etc/{name}"), f"etc/{name}"))
    for name in ETC_BORROWED:
        host = f"/etc/{name}"
        if os.path.isdir(host):
            ops += [("dir", f"etc/{name}", 0o755, 0, 0), ("bind", host, f"etc/{name}", ro)]
        elif os.path.isfile(host):
            ops += [("file", f"etc/{name}", b"", 0o644, 0, 0), ("bind", host, f"etc/{name}", ro)]
    ops += dev_ops(disk_mb)
    ops += [
        ("dir", "tmp", 0o1777, 0, 0),
        ("mount", "tmpfs", "tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=1777"),
        ("dir", "home/user", 0o755, 0, 0),
        (
            "mount",
            "tmpfs",
            "home/user",
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            f"size={disk_mb}m,mode=755,uid={USER_UID},gid={USER_UID}",
        ),
        ("bind", run_dir, "run/cube", MS_NOSUID | MS_NODEV | MS_NOEXEC),
    ]
    for name, host in packages.items():
        target = f"{SRC_INSIDE.lstrip('/')}/{name}"
        ops += [("dir", target, 0o755, 0, 0), ("bind", host, target, ro)]
    for index, host in enumerate(site_packages):
        target = SITE_INSIDE.lstrip("/") + (f"-{index}" if index else "")
        ops += [("dir", target, 0o755, 0, 0), ("bind", host, target, ro)]
    return ops


def dev_ops(disk_mb: int) -> list[Op]:
    """A minimal /dev: the usual character devices, a private devpts for PTYs, and /dev/shm."""
    ops: list[Op] = [
        ("dir", "dev", 0o755, 0, 0),
        ("mount", "tmpfs", "dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755"),
    ]
    for name, minor in (("null", 3), ("zero", 5), ("full", 7), ("random", 8), ("urandom", 9)):
        ops.append(("mknod", f"dev/{name}", 0o666, 1, minor))
    ops += [
        ("mknod", "dev/tty", 0o666, 5, 0),
        ("dir", "dev/pts", 0o755, 0, 0),
        (
            "mount",
            "devpts",
            "dev/pts",
            "devpts",
            MS_NOSUID | MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620,gid=5",
        ),
        ("symlink", "pts/ptmx", "dev/ptmx"),
        ("dir", "dev/shm", 0o1777, 0, 0),
        ("mount", "tmpfs", "dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=1777"),
        ("symlink", "/proc/self/fd", "dev/fd"),
        ("symlink", "/proc/self/fd/0", "dev/stdin"),
        ("symlink", "/proc/self/fd/1", "dev/stdout"),
        ("symlink", "/proc/self/fd/2", "dev/stderr"),
    ]
    return ops


def pid1_ops() -> list[Op]:
    """What pid 1 mounts once it exists: /proc of the new pid namespace, with the parts that
    would reveal or change the host masked (only those this kernel has)."""
    ops: list[Op] = [("mount", "proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)]
    for name in PROC_MASKED_FILES:
        if os.path.isfile(f"/proc/{name}"):
            ops.append(("bind", "/dev/null", f"proc/{name}", 0))
    for name in PROC_MASKED_DIRS:
        if os.path.isdir(f"/proc/{name}"):
            ops.append(
                (
                    "mount",
                    "tmpfs",
                    f"proc/{name}",
                    "tmpfs",
                    MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                    "size=0",
                )
            )
    for name in PROC_READ_ONLY:
        if os.path.exists(f"/proc/{name}"):
            ops.append(
                (
                    "bind",
                    f"/proc/{name}",
                    f"proc/{name}",
                    MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                )
            )
    return ops


# ------------------------------------------------------------------------------------------


class NsDriver:
    """Sandboxes in Linux namespaces with cgroup limits; see the module docstring.

    ``envd_argv`` replaces the envd command run inside (``{socket}`` becomes
    ``/run/cube/envd.sock``); ``python`` is the sandbox's interpreter (the host's own
    ``/usr/bin/python3``, which must match the service's Python minor version so that the
    venv's compiled extensions load); ``packages`` are the project packages mounted at
    ``/opt/cube/src``; ``site_packages`` defaults to this interpreter's. ``cgroup_version``
    forces v1 or v2 instead of detecting it. ``zygote=False`` makes every sandbox execute its
    own envd instead of forking the node's zygote (the zygote is only used for the default
    ``envd_argv``).
    """

    name = "ns"
    isolated = True

    def __init__(
        self,
        state_dir: str,
        *,
        envd_argv: Sequence[str] | None = None,
        python: str = "/usr/bin/python3",
        bridge: str = "cubebr0",
        gateway: str = "10.99.0.1",
        prefix_len: int = 16,
        packages: Sequence[str] = ("guest", "actors", "supervisors"),
        site_packages: Sequence[str] | None = None,
        cgroup_version: int | None = None,
        ready_timeout: float = 30.0,
        ipam_dir: str = "/run/cube-ipam",
        netns_dir: str = "/run/netns",
        zygote: bool = True,
    ) -> None:
        self.state_dir = os.path.realpath(state_dir)
        self.slots_dir = os.path.join(self.state_dir, "slots")
        self.tag = node_tag(self.state_dir)
        self.prefix = f"cube-{self.tag}-"
        self.python = python
        self.envd_argv = list(
            envd_argv or [python, "-m", "guest.envd", "--listen", "unix:{socket}"]
        )
        # the zygote forks guest.envd and nothing else
        self.zygote = zygote and self.envd_argv[:3] == [python, "-m", "guest.envd"]
        self._zygote: Any = None  # the zygote's ProcessHandle
        self._zygote_dir = os.path.join(self.state_dir, f"zygote-{secrets.token_hex(3)}")
        self._zygote_lock = trio.Lock()
        self._zygote_retry_at = 0.0
        self.bridge = bridge
        self.gateway = gateway
        self.prefix_len = prefix_len
        self.package_names = tuple(packages)
        self.site_packages = list(site_packages) if site_packages is not None else _site_packages()
        self.layout: CgroupLayout = detect_layout(cgroup_version)
        self.ready_timeout = ready_timeout
        self.netns_dir = netns_dir
        self.pool = AddressPool(ipam_dir, gateway, prefix_len)
        self.nameservers = host_nameservers()
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        self._libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._packages: dict[str, str] | None = None  # name -> host dir, found at first start
        self._host_ready = False
        self._compiled = False
        _warn_on_python_mismatch(python)

    # names -------------------------------------------------------------------------------------

    def resource_name(self, slot_id: str) -> str:
        """The cgroup and netns name of a slot."""
        return self.prefix + slot_id

    def host_if(self, slot_id: str) -> str:
        """The host end of a slot's veth: ``cv`` + tag + 8 characters of the slot's hash (15)."""
        return f"cv{self.tag}{short_hash(slot_id, 8)}"

    def _owner(self, slot_id: str) -> str:
        return f"{self.tag} {slot_id}"

    def _slot_dir(self, slot_id: str) -> str:
        return os.path.join(self.slots_dir, slot_id)

    def _plan_path(self, slot_id: str) -> str:
        return os.path.join(self._slot_dir(slot_id), "init.plan")

    # host preparation --------------------------------------------------------------------------

    def _prepare_host(self) -> None:
        """Once per driver (and again if the bridge vanished): the bridge with the gateway
        address, a shared ``/run/netns`` mount point as ``ip netns`` makes it, the packages."""
        if self._host_ready and link_index(self.bridge):
            return
        with Netlink() as nl:
            nl.create_bridge(self.bridge)
            index = link_index(self.bridge)
            nl.add_address(index, self.gateway, self.prefix_len)
            nl.set_up(index)
        self._share_netns_dir()
        self._packages = self._find_packages()
        self._host_ready = True

    async def close(self) -> None:
        """Stop the zygote, and remove the node's bridge once no sandbox uses it (called when
        the node stops)."""
        await self._stop_zygotes(every=False)
        if self.leftovers():
            return  # a sandbox still runs (kept for re-adoption): its bridge stays
        with Netlink() as nl:
            nl.delete_link(self.bridge)
        self._host_ready = False
        await trio.lowlevel.checkpoint()

    def _share_netns_dir(self) -> None:
        """Make ``/run/netns`` a shared mount point, as ``ip netns add`` does, so that a later
        ``ip netns add`` never bind-mounts the directory over our pins and hides them."""
        os.makedirs(self.netns_dir, mode=0o755, exist_ok=True)
        path = self.netns_dir.encode()
        if self._libc.mount(b"", path, b"none", MS_SHARED | MS_REC, None) == 0:
            return
        if ctypes.get_errno() != errno.EINVAL:
            raise OSError(ctypes.get_errno(), f"make {self.netns_dir} shared")
        if self._libc.mount(path, path, b"none", MS_BIND | MS_REC, None) != 0:
            raise OSError(ctypes.get_errno(), f"bind {self.netns_dir} onto itself")
        if self._libc.mount(b"", path, b"none", MS_SHARED | MS_REC, None) != 0:
            raise OSError(ctypes.get_errno(), f"make {self.netns_dir} shared")

    def _find_packages(self) -> dict[str, str]:
        found = {}
        for name in self.package_names:
            spec = importlib.util.find_spec(name)
            if spec is None or not spec.submodule_search_locations:
                raise DriverError(f"ns: package {name} not found on this interpreter's path")
            found[name] = os.path.realpath(next(iter(spec.submodule_search_locations)))
        return found

    async def _compile_packages(self) -> None:
        """Byte-compile the mounted packages on the host: inside they are read-only, and
        envd would otherwise compile every module in memory at every start."""
        assert self._packages is not None
        for directory in self._packages.values():
            await trio.to_thread.run_sync(
                functools.partial(compileall.compile_dir, directory, quiet=1)
            )

    def _plan(self, spec: SlotSpec, ip: str | None, zygote: str | None = None) -> dict[str, object]:
        slot = spec.slot_id
        directory = self._slot_dir(slot)
        hostname = f"cube-{slot}"
        assert self._packages is not None
        veth = None
        if ip is not None:
            veth = {
                "bridge": self.bridge,
                "host_if": self.host_if(slot),
                "alias": self.resource_name(slot),
                "ip": ip,
                "prefix": self.prefix_len,
                "gateway": self.gateway,
            }
        sysctls = [("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")]
        if os.path.isdir("/proc/sys/net/ipv6"):  # no IPv6, so no link-local path around the policy
            sysctls += [
                (f"/proc/sys/net/ipv6/conf/{c}/disable_ipv6", "1") for c in ("all", "default")
            ]
        src = ":".join(
            [SRC_INSIDE]
            + [SITE_INSIDE + (f"-{i}" if i else "") for i in range(len(self.site_packages))]
        )
        return {
            "zygote": zygote,
            "log": os.path.join(directory, "init.log"),
            "cgroup_procs": SlotCgroup(self.layout, self.resource_name(slot)).procs_files(),
            "net": {
                "veth": veth,
                "sysctls": sysctls,
                "netns_path": os.path.join(self.netns_dir, self.resource_name(slot)),
            },
            "hostname": hostname,
            "root": os.path.join(directory, "root"),
            "root_options": "size=16m,mode=755",
            "setup": root_ops(
                etc=etc_files(hostname, ip, self.nameservers),
                run_dir=os.path.join(directory, "run"),
                disk_mb=spec.disk_mb,
                packages=self._packages,
                site_packages=self.site_packages,
            ),
            "pid1": pid1_ops(),
            "keep_caps": list(KEEP_CAPS),
            "envd": {
                "argv": [arg.replace("{socket}", SOCKET_INSIDE) for arg in self.envd_argv],
                "env": {
                    "PATH": SANDBOX_PATH,
                    "HOME": "/root",
                    "LANG": "C.UTF-8",
                    "PYTHONPATH": src,
                    "PYTHONDONTWRITEBYTECODE": "1",
                },
                "cwd": "/",
            },
        }

    # lifecycle ---------------------------------------------------------------------------------

    async def start(self, spec: SlotSpec, spawn: Spawner) -> Instance:
        """Create the slot's cgroup, network, namespaces and root; start envd in them; return
        once envd listens. On any failure everything made so far is removed again."""
        slot = check_slot_id(spec.slot_id, "start")
        op = f"start {slot}"
        directory = self._slot_dir(slot)
        sock = os.path.join(directory, "run", "envd.sock")
        if len(sock.encode()) > UNIX_PATH_MAX:
            raise DriverError(
                f"{op}: socket path {sock} is longer than {UNIX_PATH_MAX} bytes; use a shorter state dir"
            )
        name = self.resource_name(slot)
        cgroup = SlotCgroup(self.layout, name)
        log_path = os.path.join(directory, "init.log")
        make_slot_dir(directory, self.name, op)
        instance = Instance(
            slot_id=slot,
            driver=self.name,
            pid=0,
            envd=f"unix:{sock}",
            state_dir=directory,
            cgroups=cgroup.dirs,
            netns=name,
            host_if=self.host_if(slot) if spec.network else None,
            extra={"tag": self.tag, "log": log_path, "cgroup_version": self.layout.version},
        )
        step = "prepare host"
        try:
            self._prepare_host()
            if not self._compiled:
                step = "compile packages"
                await self._compile_packages()
                self._compiled = True
            step = "start the envd zygote"
            zygote = await self._zygote_socket(spawn)
            step = "lease address"
            if spec.network:
                instance.ip = self.pool.acquire(self._owner(slot))
            step = "write plan"
            for sub in ("run", "root"):
                os.mkdir(os.path.join(directory, sub), 0o700)
            with open(self._plan_path(slot), "wb") as f:
                marshal.dump(self._plan(spec, instance.ip, zygote), f)
            step = "create cgroup"
            cgroup.create(CgroupLimits(spec.memory_mb << 20, spec.cpus, spec.pids_max))
            step = "spawn init"
            argv = [self.python, "-S", "-E", INIT_SCRIPT, self._plan_path(slot)]
            with open(log_path, "ab") as log_file:
                handle = await spawn(
                    argv, cwd="/", env={"PATH": SANDBOX_PATH}, stdout=log_file, stderr=log_file
                )
            instance.pid = handle.pid
            step = "wait for envd"
            await wait_until_listening(op, sock, handle, log_path, self.ready_timeout)
            init_pid = _first_child(handle.pid)
            instance.extra["init_pid"] = init_pid
            instance.root = f"/proc/{init_pid}/root" if init_pid else None
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                try:
                    await self.stop(instance)
                except DriverError as cleanup_error:
                    log.error("%s: cleanup after failure: %s", op, cleanup_error)
            if isinstance(exc, OSError):
                raise DriverError(f"{op}: {step}: {exc}") from exc
            raise
        return instance

    # the envd zygote -----------------------------------------------------------------------------

    async def _zygote_socket(self, spawn: Spawner) -> str | None:
        """The socket of the node's envd zygote, started through ``spawn`` if it is not running;
        None when there is none (disabled, or it failed lately: pid 1 then executes envd)."""
        if not self.zygote:
            return None
        async with self._zygote_lock:
            handle = self._zygote
            socket_path = os.path.join(self._zygote_dir, "sock")
            if self._running_zygote():
                return socket_path
            if trio.current_time() < self._zygote_retry_at:
                return None
            if handle is not None:
                log.warning("ns: the envd zygote exited (%s); starting another", handle.exit)
                await self._stop_zygotes(every=False)
            try:
                self._zygote = await self._start_zygote(spawn, socket_path)
            except (OSError, DriverError) as exc:
                log.warning("ns: no envd zygote, sandboxes execute envd themselves: %s", exc)
                self._zygote_retry_at = trio.current_time() + ZYGOTE_RETRY
                await self._stop_zygotes(every=False)
                return None
            return socket_path

    async def _start_zygote(self, spawn: Spawner, socket_path: str) -> Any:
        directory = self._zygote_dir
        if len(socket_path.encode()) > UNIX_PATH_MAX:
            raise DriverError(f"zygote socket path {socket_path} is too long")
        assert self._packages is not None
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # import the packages from a directory holding only them, as /opt/cube/src inside does
        src = os.path.join(directory, "src")
        os.makedirs(src, mode=0o700, exist_ok=True)
        inside = {src: SRC_INSIDE}
        for name, host in self._packages.items():
            link = os.path.join(src, name)
            if not os.path.islink(link):
                os.symlink(host, link)
        for index, site in enumerate(self.site_packages):
            inside[site] = SITE_INSIDE + (f"-{index}" if index else "")
        plan = {
            "socket": socket_path,
            "path": [src, *self.site_packages],
            "inside": inside,
            "slots_dir": self.slots_dir,
            "init_script": INIT_SCRIPT,
            "warm": True,
        }
        plan_path = os.path.join(directory, "plan")
        with open(plan_path, "wb") as f:
            marshal.dump(plan, f)
        log_path = os.path.join(directory, "log")
        env = {"PATH": SANDBOX_PATH, "HOME": "/root", "LANG": "C.UTF-8"}
        with open(log_path, "ab") as log_file:
            handle = await spawn(
                [self.python, "-S", "-E", ZYGOTE_SCRIPT, plan_path],
                cwd="/",
                env=env,
                stdout=log_file,
                stderr=log_file,
            )
        try:
            await wait_until_listening("ns zygote", socket_path, handle, log_path, self.ready_timeout)
        except BaseException:
            with trio.CancelScope(shield=True):
                await _kill_zygote(handle.pid, self.state_dir)
            raise
        log.info("ns: envd zygote %d ready on %s", handle.pid, socket_path)
        return handle

    def _running_zygote(self) -> int:
        """The pid of this driver's zygote while it runs (0 if none): its handle has seen no
        exit and the pid still names the zygote (the reaper may not have collected it yet)."""
        handle = self._zygote
        if handle is None or handle.exit is not None:
            return 0
        return handle.pid if _is_zygote(handle.pid, self.state_dir) else 0

    def _zygotes(self) -> dict[int, str]:
        """This node's zygote processes (any run's) in the host's pid namespace, by pid: the
        zygote's envds carry its command line too, but live in their sandboxes' namespaces,
        and the zygote's short-lived forks are left to it."""
        own_ns = os.readlink("/proc/self/ns/pid")
        own = self._running_zygote()
        found = {}
        for pid, cmd in scan_processes(cmdline=os.path.join(self.state_dir, "zygote-").encode()).items():
            try:
                if os.readlink(f"/proc/{pid}/ns/pid") != own_ns:
                    continue
            except OSError:
                continue
            state = process_state(pid)
            if state is not None and own and state[1] == own:
                continue
            found[pid] = cmd
        return found

    def _zygote_dirs(self) -> list[str]:
        try:
            names = os.listdir(self.state_dir)
        except FileNotFoundError:
            return []
        return sorted(os.path.join(self.state_dir, n) for n in names if n.startswith("zygote-"))

    async def _stop_zygotes(self, *, every: bool) -> list[str]:
        """Stop this driver's zygote (``every``: all of this node's, stale ones of earlier runs
        too) and remove their directories; returns what was removed."""
        handle, self._zygote = self._zygote, None
        removed = []
        # not collected yet: the pid is still the zygote, or its zombie
        if handle is not None and handle.exit is None and await _kill_zygote(handle.pid, self.state_dir):
            removed.append(f"process {handle.pid}: zygote")
        if every:
            for pid, cmd in self._zygotes().items():
                if await _kill_zygote(pid, self.state_dir):
                    removed.append(f"process {pid}: {cmd}")
        for directory in self._zygote_dirs():
            if every or directory == self._zygote_dir:
                removed.append(f"directory {directory}")
                remove_tree(directory)
        return removed

    async def stop(self, instance: Instance) -> None:
        """Kill every process of the slot and remove every resource; idempotent. Each step
        runs even if an earlier one failed; the DriverError names every step that failed."""
        slot = instance.slot_id
        name = self.resource_name(slot)
        cgroup = SlotCgroup(self.layout, name)
        failures: list[str] = []

        async def kill() -> None:
            outside = self._processes_outside_cgroup(instance)
            await cgroup.kill()
            init_pid = instance.extra.get("init_pid", 0)
            left = await kill_and_wait(
                [*outside, *([init_pid] if init_pid else [])], root=instance.pid
            )
            if left:
                raise DriverError(f"still running: {left}")

        async def delete_veth() -> None:
            # unregistering a netdev waits for RCU grace periods (10-30 ms): not on the loop
            await trio.to_thread.run_sync(self._delete_veth, instance.host_if or self.host_if(slot))

        async def unpin() -> None:
            self._unpin(os.path.join(self.netns_dir, name))

        async def release() -> None:
            self._release(slot, instance.ip)

        async def remove_directory() -> None:
            remove_tree(self._slot_dir(slot))

        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("kill processes", kill),
            ("remove cgroup", cgroup.remove),
            ("delete veth", delete_veth),
            ("remove netns", unpin),
            ("release address", release),
            ("remove directory", remove_directory),
        ]
        for step, action in steps:
            try:
                await action()
            except (OSError, DriverError) as exc:
                failures.append(f"{step}: {exc}")
        if failures:
            raise DriverError(f"stop {slot}: " + "; ".join(failures))

    def _processes_outside_cgroup(self, instance: Instance) -> list[int]:
        """The holder and pid 1 if they never joined the cgroup (a start that failed early),
        found by the plan path in their argv."""
        if instance.pid:
            return [instance.pid] if self._is_holder(instance.pid, instance.slot_id) else []
        return list(scan_processes(cmdline=self._plan_path(instance.slot_id).encode()))

    def _is_holder(self, pid: int, slot_id: str) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return self._plan_path(slot_id).encode() in f.read()
        except OSError:
            return False

    def _delete_veth(self, host_if: str) -> None:
        with Netlink() as nl:
            nl.delete_link(host_if)

    def _unpin(self, path: str) -> None:
        """Unmount and remove a netns pin; a pin that is gone is fine."""
        if self._libc.umount2(path.encode(), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            if err not in (errno.EINVAL, errno.ENOENT):
                raise OSError(err, f"umount {path}: {os.strerror(err)}")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _release(self, slot_id: str, ip: str | None) -> None:
        owner = self._owner(slot_id)
        addresses = [ip] if ip else list(self.pool.leases(owner))
        for address in addresses:
            self.pool.release(address, owner)

    async def pause(self, instance: Instance) -> None:
        """Freeze every process of the sandbox (memory kept) and wait until all are frozen."""
        await SlotCgroup(self.layout, self.resource_name(instance.slot_id)).freeze()
        instance.paused = True

    async def resume(self, instance: Instance) -> None:
        """Thaw what ``pause`` froze."""
        cgroup = SlotCgroup(self.layout, self.resource_name(instance.slot_id))
        if not cgroup.exists():
            raise DriverError(f"resume {instance.slot_id}: cgroup {cgroup.name} is gone")
        cgroup.thaw()
        instance.paused = False
        await trio.lowlevel.checkpoint()

    def alive(self, instance: Instance) -> bool:
        """Whether the slot's holder process runs (and the pid is still that holder)."""
        state = process_state(instance.pid) if instance.pid else None
        return (
            state is not None
            and state[0] != "Z"
            and self._is_holder(instance.pid, instance.slot_id)
        )

    def usage(self, instance: Instance) -> ResourceUsage:
        """Memory and processes in use, and the OOM kills so far (a memory hog shows here)."""
        cgroup = SlotCgroup(self.layout, self.resource_name(instance.slot_id))
        return ResourceUsage(cgroup.memory_bytes(), cgroup.pids_current(), cgroup.oom_kills())

    # leftovers and cleanup ---------------------------------------------------------------------

    def _resources(self) -> list[tuple[str, str]]:
        """(slot id, description) of every resource of this node on the host; the slot is ""
        for a veth whose alias was never set."""
        found: list[tuple[str, str]] = []
        for slot in slot_dirs(self.slots_dir, self.name):
            found.append((slot, f"directory {self._slot_dir(slot)}"))
        plan_prefix = os.path.join(self.slots_dir, "")
        for pid, cmd in sorted(scan_processes(cmdline=plan_prefix.encode()).items()):
            match = re.search(re.escape(plan_prefix) + r"([a-z0-9-]+)/init\.plan", cmd)
            if match:
                found.append((match.group(1), f"process {pid}: {cmd}"))
        for name in named_cgroups(self.layout, self.prefix):
            slot = name[len(self.prefix) :]
            found.append((slot, f"cgroup {name}"))
            for pid in sorted(SlotCgroup(self.layout, name).pids()):
                found.append((slot, f"process {pid} in cgroup {name}"))
        try:
            pins = sorted(n for n in os.listdir(self.netns_dir) if n.startswith(self.prefix))
        except FileNotFoundError:
            pins = []
        found += [(n[len(self.prefix) :], f"netns {n}") for n in pins]
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mount_point = line.split()[4]
                for base in (os.path.join(self.netns_dir, self.prefix), plan_prefix):
                    if mount_point.startswith(base):
                        rest = mount_point[len(base) :]
                        found.append((rest.split("/")[0], f"mount {mount_point}"))
        for link in sorted(os.listdir("/sys/class/net")):
            if link.startswith(f"cv{self.tag}"):
                found.append((self._veth_slot(link), f"veth {link}"))
        for address, owner in sorted(self.pool.leases(f"{self.tag} ").items()):
            found.append((owner.split(" ", 1)[1], f"address {address}"))
        # the running zygote is the driver's, not a leftover: ``close`` and ``cleanup`` stop it
        own = self._running_zygote()
        running = own != 0
        for pid, cmd in sorted(self._zygotes().items()):
            if pid != own:
                found.append(("", f"process {pid}: {cmd}"))
        for directory in self._zygote_dirs():
            if not (running and directory == self._zygote_dir):
                found.append(("", f"directory {directory}"))
        return found

    def _veth_slot(self, link: str) -> str:
        try:
            with open(f"/sys/class/net/{link}/ifalias") as f:
                alias = f.read().strip()
        except OSError:
            return ""
        return alias[len(self.prefix) :] if alias.startswith(self.prefix) else ""

    def leftovers(self, slot_ids: Sequence[str] | None = None) -> list[str]:
        """Every resource of this node still on the host (or of these slots): processes,
        cgroups, netns pins and mounts, veths, address leases, directories."""
        if slot_ids is None:
            return [what for _, what in self._resources()]
        wanted = set(slot_ids)
        links = {self.host_if(s) for s in wanted}
        return [
            what
            for slot, what in self._resources()
            if slot in wanted or what.split(" ")[-1] in links
        ]

    async def cleanup(self, keep: Sequence[str] = ()) -> list[str]:
        """Remove every resource of this node except those of the slots in ``keep``."""
        keep_set = set(keep)
        resources = self._resources()
        removed: list[str] = []
        slots = sorted({slot for slot, _ in resources if slot and slot not in keep_set})
        for slot in slots:
            removed += [what for s, what in resources if s == slot]
            await self.stop(
                Instance(
                    slot_id=slot, driver=self.name, pid=0, envd="", state_dir=self._slot_dir(slot)
                )
            )
        kept_links = {self.host_if(s) for s in keep_set}
        for slot, what in resources:
            link = what.split(" ")[-1]
            if not slot and what.startswith("veth ") and link not in kept_links:
                self._delete_veth(link)
                removed.append(what)
        removed += await self._stop_zygotes(every=True)
        return removed


def _is_zygote(pid: int, state_dir: str) -> bool:
    """Whether ``pid`` is a zygote of the node at ``state_dir`` (by its command line)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.join(state_dir, "zygote-").encode() in f.read()
    except OSError:
        return False


async def _kill_zygote(pid: int, state_dir: str, timeout: float = 5.0) -> bool:
    """SIGKILL the zygote ``pid`` of ``state_dir`` and wait until it is gone, reaping it if it
    is our child (the reaper may have stopped before the node closes its driver). A pid that
    is no longer that zygote is left alone. Returns whether it was killed."""
    state = process_state(pid)
    if state is None:
        return False
    if state[0] == "Z":  # dead already; collect it if it is ours (else its parent will)
        if state[1] == os.getpid():
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        return False
    if not _is_zygote(pid, state_dir):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    with trio.move_on_after(timeout):
        while True:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    break
            except ChildProcessError:
                state = process_state(pid)
                if state is None or state[0] == "Z":
                    break
            await trio.sleep(0.002)
    return True


def _first_child(pid: int) -> int:
    """The first child of ``pid`` (the holder's only child is pid 1), 0 if none."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: look at every parent link
        children = []
        for name in os.listdir("/proc"):
            state = process_state(int(name)) if name.isdigit() else None
            if state is not None and state[1] == pid:
                children.append(int(name))
    return min(children) if children else 0


def _site_packages() -> list[str]:
    """This interpreter's site-packages directories (the venv's), deduplicated."""
    found: list[str] = []
    for key in ("purelib", "platlib"):
        path = os.path.realpath(sysconfig.get_paths()[key])
        if path not in found and os.path.isdir(path):
            found.append(path)
    return found


def _warn_on_python_mismatch(python: str) -> None:
    """Warn when the sandbox's Python is not this one's minor version: the venv's compiled
    extensions (msgspec) would not load inside."""
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    real = os.path.basename(os.path.realpath(python))
    if real != want:
        log.warning(
            "ns: sandbox python %s is %s, the service runs %s: envd may not import",
            python,
            real,
            want,
        )
