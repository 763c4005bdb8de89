"""Cgroups for ns sandboxes: limits, freeze/thaw, kill-all and removal, on cgroup v1 and v2.

A slot's cgroup is one directory per hierarchy named ``cube-<tag>-<slot>`` (v1: one in each
controller's mount, e.g. ``/sys/fs/cgroup/memory/cube-ab3xk-s1``; v2: one in the unified tree).
Which layout the host has is read from ``/proc/self/mountinfo`` at run time
(docs/freebsd-contract.md §5.3): a cgroup2 mount at ``/sys/fs/cgroup`` is v2; otherwise the v1
controller mounts are used, even on a hybrid host that also mounts cgroup2 at
``/sys/fs/cgroup/unified`` with no controllers in it.

The sandbox's first process writes itself into every ``cgroup.procs`` file before it forks, so
everything the sandbox ever runs is inside; the driver then uses the cgroup, not process trees,
to pause, resume and kill it.
"""

from __future__ import annotations

import errno
import os
import signal

import msgspec
import trio

from cube.drivers.base import DriverError

__all__ = ["CgroupLayout", "CgroupLimits", "SlotCgroup", "detect_layout", "named_cgroups"]

V1_REQUIRED = ("memory", "cpu", "pids", "freezer")
V1_OPTIONAL = ("devices",)
V2_CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000
# The character devices an ns sandbox's /dev holds (v1 devices controller allow-list):
# null, zero, full, random, urandom, tty, ptmx and every pty of its own devpts.
DEVICE_RULES = (
    "c 1:3 rwm",
    "c 1:5 rwm",
    "c 1:7 rwm",
    "c 1:8 rwm",
    "c 1:9 rwm",
    "c 5:0 rwm",
    "c 5:2 rwm",
    "c 136:* rwm",
)


class CgroupLayout(msgspec.Struct, frozen=True):
    """Where the host's cgroup hierarchies are mounted.

    ``version`` 1: ``mounts`` maps each controller to its hierarchy's mount point.
    ``version`` 2: ``mounts`` is ``{"": mount point of the unified tree}``.
    """

    version: int
    mounts: dict[str, str]

    def hierarchies(self) -> list[str]:
        """The distinct mount points a slot's cgroup needs one directory in."""
        seen: list[str] = []
        for mount in self.mounts.values():
            if mount not in seen:
                seen.append(mount)
        return seen

    def controller_dir(self, controller: str, name: str) -> str | None:
        """The directory of cgroup ``name`` that holds ``controller``'s files."""
        if self.version == 2:
            return os.path.join(self.mounts[""], name)
        mount = self.mounts.get(controller)
        return os.path.join(mount, name) if mount else None


class CgroupLimits(msgspec.Struct, frozen=True):
    """The resource limits of one sandbox."""

    memory_bytes: int
    cpus: float
    pids_max: int


def _mount_table(path: str = "/proc/self/mountinfo") -> list[tuple[str, str, set[str]]]:
    """(mount point, fs type, super options) of every mount."""
    table = []
    with open(path) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            mount_point = left.split()[4].replace("\\040", " ")
            fstype, _source, options = [*right.split(), "", "", ""][:3]
            table.append((mount_point, fstype, set(options.split(","))))
    return table


def detect_layout(
    version: int | None = None, *, mountinfo: str = "/proc/self/mountinfo"
) -> CgroupLayout:
    """Find the cgroup layout of this host; ``version`` forces one (DriverError if absent)."""
    table = _mount_table(mountinfo)
    unified = [mp for mp, fstype, _ in table if fstype == "cgroup2"]
    v1: dict[str, str] = {}
    for mount_point, fstype, options in table:
        if fstype == "cgroup":
            for controller in (*V1_REQUIRED, *V1_OPTIONAL):
                if controller in options:
                    v1.setdefault(controller, mount_point)
    want_v2 = version == 2 or (version is None and "/sys/fs/cgroup" in unified)
    if want_v2:
        if not unified:
            raise DriverError("cgroups: no cgroup2 mount found")
        root = "/sys/fs/cgroup" if "/sys/fs/cgroup" in unified else unified[0]
        return CgroupLayout(2, {"": root})
    missing = [c for c in V1_REQUIRED if c not in v1]
    if missing:
        if version is None and unified:
            return CgroupLayout(2, {"": unified[0]})
        raise DriverError(f"cgroups: v1 controllers not mounted: {', '.join(missing)}")
    return CgroupLayout(1, v1)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _keyed(path: str, key: str) -> int:
    """The value of ``key`` in a flat-keyed cgroup file (``memory.events``, ``oom_control``)."""
    try:
        for line in _read(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except OSError:
        pass
    return 0


class SlotCgroup:
    """The cgroup of one slot, across every hierarchy of the layout."""

    def __init__(self, layout: CgroupLayout, name: str) -> None:
        self.layout = layout
        self.name = name
        self.dirs = [os.path.join(mount, name) for mount in layout.hierarchies()]

    def exists(self) -> bool:
        return any(os.path.isdir(d) for d in self.dirs)

    def procs_files(self) -> list[str]:
        """The ``cgroup.procs`` files a process writes its pid into to join the slot."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def _file(self, controller: str, name: str) -> str | None:
        directory = self.layout.controller_dir(controller, self.name)
        return os.path.join(directory, name) if directory else None

    # creation ----------------------------------------------------------------------------------

    def create(self, limits: CgroupLimits | None) -> None:
        """Make the directories and write ``limits`` (None: no limits, used by tests of the
        freezer on a unified tree without controllers)."""
        try:
            if self.layout.version == 2 and limits is not None:
                self._enable_v2_controllers()
            for directory in self.dirs:
                os.makedirs(directory, exist_ok=True)
            if limits is not None:
                if self.layout.version == 2:
                    self._limit_v2(limits)
                else:
                    self._limit_v1(limits)
        except OSError as exc:
            raise DriverError(f"cgroup {self.name}: create: {exc}") from exc

    def _enable_v2_controllers(self) -> None:
        root = self.layout.mounts[""]
        available = _read(os.path.join(root, "cgroup.controllers")).split()
        missing = [c for c in V2_CONTROLLERS if c not in available]
        if missing:
            raise DriverError(
                f"cgroup {self.name}: v2 controllers unavailable: {', '.join(missing)}"
            )
        enabled = _read(os.path.join(root, "cgroup.subtree_control")).split()
        wanted = [c for c in V2_CONTROLLERS if c not in enabled]
        if wanted:
            _write(os.path.join(root, "cgroup.subtree_control"), " ".join(f"+{c}" for c in wanted))

    def _limit_v2(self, limits: CgroupLimits) -> None:
        directory = self.dirs[0]
        _write(os.path.join(directory, "memory.max"), str(limits.memory_bytes))
        swap = os.path.join(directory, "memory.swap.max")
        if os.path.exists(swap):
            _write(swap, "0")
        quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
        _write(os.path.join(directory, "cpu.max"), f"{quota} {CPU_PERIOD_US}")
        _write(os.path.join(directory, "pids.max"), str(limits.pids_max))

    def _limit_v1(self, limits: CgroupLimits) -> None:
        memory = self.layout.controller_dir("memory", self.name)
        cpu = self.layout.controller_dir("cpu", self.name)
        pids = self.layout.controller_dir("pids", self.name)
        assert memory and cpu and pids  # detect_layout guarantees the required controllers
        _write(os.path.join(memory, "memory.limit_in_bytes"), str(limits.memory_bytes))
        memsw = os.path.join(memory, "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):  # only with swap accounting; keeps the sandbox out of swap
            _write(memsw, str(limits.memory_bytes))
        _write(os.path.join(cpu, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
        _write(
            os.path.join(cpu, "cpu.cfs_quota_us"), str(max(1000, int(limits.cpus * CPU_PERIOD_US)))
        )
        _write(os.path.join(pids, "pids.max"), str(limits.pids_max))
        devices = self.layout.controller_dir("devices", self.name)
        if devices:
            _write(os.path.join(devices, "devices.deny"), "a")
            for rule in DEVICE_RULES:
                _write(os.path.join(devices, "devices.allow"), rule)

    # inspection --------------------------------------------------------------------------------

    def pids(self) -> set[int]:
        """Every process in the slot's cgroup, in any hierarchy."""
        found: set[int] = set()
        for path in self.procs_files():
            try:
                found.update(int(p) for p in _read(path).split())
            except (FileNotFoundError, ProcessLookupError):
                continue
        return found

    def oom_kills(self) -> int:
        """How many processes the kernel's OOM killer has killed in this cgroup."""
        if self.layout.version == 2:
            path = self._file("", "memory.events")
        else:
            path = self._file("memory", "memory.oom_control")
        return _keyed(path, "oom_kill") if path else 0

    def memory_bytes(self) -> int:
        """Memory charged to the cgroup now (processes and tmpfs pages)."""
        name = "memory.current" if self.layout.version == 2 else "memory.usage_in_bytes"
        path = self._file("memory", name)
        try:
            return int(_read(path)) if path else 0
        except (OSError, ValueError):
            return 0

    def pids_current(self) -> int:
        path = self._file("pids", "pids.current")
        try:
            return int(_read(path)) if path else 0
        except (OSError, ValueError):
            return 0

    # freezer -----------------------------------------------------------------------------------

    def _freezer_file(self) -> tuple[str, str, str] | None:
        """(file, frozen value, thawed value) of the freezer, None if the cgroup is gone."""
        if self.layout.version == 2:
            path = os.path.join(self.dirs[0], "cgroup.freeze")
            return (path, "1", "0") if os.path.exists(path) else None
        directory = self.layout.controller_dir("freezer", self.name)
        path = os.path.join(directory, "freezer.state") if directory else ""
        return (path, "FROZEN", "THAWED") if path and os.path.exists(path) else None

    def is_frozen(self) -> bool:
        if self.layout.version == 2:
            return _keyed(os.path.join(self.dirs[0], "cgroup.events"), "frozen") == 1
        freezer = self._freezer_file()
        return freezer is not None and _read(freezer[0]).strip() == "FROZEN"

    async def freeze(self, *, timeout: float = 5.0) -> None:
        """Stop every process of the slot, keeping its memory; return once all are frozen."""
        freezer = self._freezer_file()
        if freezer is None:
            raise DriverError(f"cgroup {self.name}: freeze: no freezer (cgroup gone?)")
        _write(freezer[0], freezer[1])
        with trio.move_on_after(timeout):
            while not self.is_frozen():
                await trio.sleep(0.001)
            return
        raise DriverError(f"cgroup {self.name}: freeze: not frozen after {timeout} s")

    def thaw(self) -> None:
        """Let the slot's processes run again."""
        freezer = self._freezer_file()
        if freezer is not None:
            _write(freezer[0], freezer[2])

    # teardown ----------------------------------------------------------------------------------

    async def kill(self, *, timeout: float = 5.0) -> None:
        """SIGKILL every process in the cgroup and wait until none is left.

        v2 with ``cgroup.kill`` (Linux 5.14+): one write. Otherwise SIGKILL every listed pid
        and thaw (a frozen task dies only once thawed). In an ns sandbox that is enough: the
        death of its pid 1 makes the kernel kill the rest of the pid namespace, and nothing
        can fork into it after that. Should processes remain anyway, each further round
        freezes first, so that nothing forks while ``cgroup.procs`` is read.
        """
        if not self.exists():
            return
        kill_file = os.path.join(self.dirs[0], "cgroup.kill")
        rounds = 0
        with trio.move_on_after(timeout):
            while self.pids():
                if self.layout.version == 2 and os.path.exists(kill_file):
                    _write(kill_file, "1")
                else:
                    await self._kill_listed(freeze=rounds > 0)
                rounds += 1
                await trio.sleep(0.001)
            return
        raise DriverError(
            f"cgroup {self.name}: kill: processes left after {timeout} s: {sorted(self.pids())}"
        )

    async def _kill_listed(self, *, freeze: bool) -> None:
        freezer = self._freezer_file()
        if freeze and freezer is not None:
            _write(freezer[0], freezer[1])
            with trio.move_on_after(1.0):
                while not self.is_frozen():
                    await trio.sleep(0.001)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if freezer is not None:
            _write(freezer[0], freezer[2])

    async def remove(self, *, timeout: float = 5.0) -> None:
        """Remove every directory; waits for exiting processes to leave (EBUSY)."""
        with trio.move_on_after(timeout):
            for directory in self.dirs:
                while True:
                    try:
                        os.rmdir(directory)
                        break
                    except FileNotFoundError:
                        break
                    except OSError as exc:
                        if exc.errno != errno.EBUSY:
                            raise DriverError(
                                f"cgroup {self.name}: rmdir {directory}: {exc}"
                            ) from exc
                        await trio.sleep(0.002)
            return
        raise DriverError(f"cgroup {self.name}: rmdir: still busy after {timeout} s")


def named_cgroups(layout: CgroupLayout, prefix: str) -> list[str]:
    """Names of the cgroups directly under each hierarchy's root that start with ``prefix``."""
    names: list[str] = []
    for mount in layout.hierarchies():
        try:
            entries = os.listdir(mount)
        except OSError:
            continue
        for entry in entries:
            if (
                entry.startswith(prefix)
                and entry not in names
                and os.path.isdir(os.path.join(mount, entry))
            ):
                names.append(entry)
    return sorted(names)
