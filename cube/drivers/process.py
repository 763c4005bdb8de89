"""The ``process`` driver: envd as a plain subprocess in its own directory. NO isolation.

The fallback when the service is not root or not on Linux, and the default of research
harnesses: each slot is a directory ``<state_dir>/slots/<slot_id>/`` holding envd's unix socket
(``envd.sock``), its log (``envd.log``) and a ``home/`` that is envd's working directory and
``$HOME``. envd runs as the service's own user with the service's view of files, processes and
network, so a sandbox can do anything the service can. The driver says so with a warning when
it is created.

The slot's root process is a few lines of Python (``REAPER_INIT``) that makes itself a
subreaper (``PR_SET_CHILD_SUBREAPER``), runs envd as its child and reaps every orphan: a daemon
that double-forks and calls ``setsid`` to leave envd's tree and session is reparented to it,
so ``stop`` still finds and kills it through the process tree.

This module also holds what every driver that runs envd behind a unix socket shares with the
``ns`` driver: slot ids and node tags, the slot directory, waiting for envd to listen, and
finding processes by what they reference.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import sys
from collections.abc import Sequence

import trio

from cube.drivers.base import DriverError, Instance, SlotSpec, Spawner
from supervisors.reaper import tree_pids

__all__ = [
    "ProcessDriver",
    "check_slot_id",
    "is_listening",
    "log_tail",
    "node_tag",
    "process_state",
    "scan_processes",
    "wait_until_listening",
]

log = logging.getLogger("cube.drivers.process")

SLOT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,47}$")
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL
DRIVER_MARKER = "driver"  # file in each slot directory naming the driver that made it
# The slot's root process on Linux: subreaper of everything envd starts; exits with envd.
REAPER_INIT = """\
import ctypes, os, sys
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans come back to us
child = os.fork()
if child == 0:
    try:
        os.execvp(sys.argv[1], sys.argv[1:])
    finally:
        os._exit(127)
while True:
    pid, status = os.wait()
    if pid == child:
        code = os.waitstatus_to_exitcode(status)
        os._exit(code if code >= 0 else 128 - code)
"""
NO_ISOLATION_WARNING = (
    "the process driver gives NO isolation: every sandbox runs as a plain process of the "
    "service's user, sees every file, process and network the service can, and is limited "
    "by nothing; use the ns driver (Linux, root) for untrusted code"
)


# ------------------------------------------------------------------------------------------
# shared by the unix-socket drivers


def check_slot_id(slot_id: str, op: str) -> str:
    """``slot_id`` if it can name host resources (``[a-z0-9][a-z0-9-]{0,47}``)."""
    if not SLOT_ID.match(slot_id):
        raise DriverError(
            f"{op} {slot_id!r}: a slot id is 1-48 characters of [a-z0-9-], not starting with '-'"
        )
    return slot_id


def node_tag(state_dir: str) -> str:
    """Five characters naming the node of ``state_dir`` in host-wide resource names, so that
    two nodes on one host (two state directories) never touch each other's resources."""
    digest = hashlib.sha256(os.path.realpath(state_dir).encode()).digest()
    return base64.b32encode(digest).decode().lower()[:5]


def short_hash(text: str, length: int) -> str:
    """``length`` characters of [a-z2-7] derived from ``text``."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode().lower()[:length]


def process_state(pid: int) -> tuple[str, int] | None:
    """(state letter, parent pid) of ``pid`` from /proc, None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


def _read_proc(pid: str, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:  # gone, or not ours to read
        return b""


def scan_processes(*, cmdline: bytes) -> dict[int, str]:
    """Live processes whose command line contains ``cmdline``, mapped to their command line.
    Zombies have no command line, so they are never found."""
    me = str(os.getpid())
    found: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit() or name == me:
            continue
        args = _read_proc(name, "cmdline")
        if cmdline in args:
            found[int(name)] = args.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def log_tail(path: str, limit: int = 2000) -> str:
    """The last ``limit`` bytes of a log file, for error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def is_listening(path: str) -> bool:
    """Whether a server accepts connections on unix socket ``path`` (connects and hangs up)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except BlockingIOError:
        return True  # the backlog is full: someone is listening
    except OSError:
        return False
    finally:
        probe.close()
    return True


async def wait_until_listening(
    what: str, socket_path: str, handle: object, log_path: str, timeout: float
) -> None:
    """Wait until envd listens on ``socket_path``; DriverError (with the log's tail) if the
    process behind ``handle`` (a ``ProcessHandle``) exits first or ``timeout`` passes."""
    delay = 0.001
    with trio.move_on_after(timeout):
        while True:
            exit = getattr(handle, "exit", None)
            if exit is not None:
                raise DriverError(
                    f"{what}: envd's process ended before listening ({exit}): {log_tail(log_path)}"
                )
            if is_listening(socket_path):
                return
            await trio.sleep(delay)
            delay = min(delay * 2, 0.01)
    raise DriverError(
        f"{what}: envd not listening on {socket_path} after {timeout} s: {log_tail(log_path)}"
    )


async def kill_and_wait(pids: Sequence[int], *, root: int = 0, timeout: float = 5.0) -> list[int]:
    """SIGKILL ``pids`` and wait until each is gone or a zombie; reap the zombies that are
    our children except ``root`` (the reaper's own process: it collects that exit itself).
    Returns the pids still running after ``timeout``."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    me = os.getpid()
    remaining = list(pids)
    with trio.move_on_after(timeout):
        while remaining:
            still = []
            for pid in remaining:
                state = process_state(pid)
                if state is None:
                    continue
                if state[0] == "Z":
                    if state[1] == me and pid != root:
                        try:
                            os.waitpid(pid, os.WNOHANG)
                        except ChildProcessError:
                            pass
                    continue
                still.append(pid)
            remaining = still
            if remaining:
                await trio.sleep(0.002)
    return remaining


def remove_tree(path: str) -> None:
    """``rm -rf path``; a path that is already gone is fine."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


def slot_dirs(slots_dir: str, driver: str) -> list[str]:
    """Slot ids with a directory under ``slots_dir`` made by ``driver`` (or by no known driver:
    a directory whose marker was never written is an orphan of a crashed start)."""
    try:
        names = sorted(os.listdir(slots_dir))
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        try:
            with open(os.path.join(slots_dir, name, DRIVER_MARKER)) as f:
                owner = f.read().strip()
        except FileNotFoundError:
            owner = ""
        except NotADirectoryError:
            continue
        if owner in ("", driver):
            found.append(name)
    return found


def make_slot_dir(path: str, driver: str, op: str) -> None:
    """Create a slot's directory (private to the service's user) and mark whose it is."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError as exc:
        raise DriverError(f"{op}: slot directory {path} exists: stop the slot first") from exc
    with open(os.path.join(path, DRIVER_MARKER), "w") as f:
        f.write(driver + "\n")


# ------------------------------------------------------------------------------------------


class ProcessDriver:
    """Run envd as an unisolated subprocess per slot; see the module docstring.

    ``envd_argv`` replaces the envd command; ``{socket}`` in any argument becomes the slot's
    socket path. ``ready_timeout`` bounds how long ``start`` waits for envd to listen.
    ``python`` runs envd and, on Linux, the slot's subreaper init.
    """

    name = "process"
    isolated = False
    warning = NO_ISOLATION_WARNING

    def __init__(
        self,
        state_dir: str,
        *,
        envd_argv: Sequence[str] | None = None,
        python: str = sys.executable,
        ready_timeout: float = 30.0,
    ) -> None:
        self.state_dir = os.path.realpath(state_dir)
        self.slots_dir = os.path.join(self.state_dir, "slots")
        self.tag = node_tag(self.state_dir)
        self.envd_argv = list(
            envd_argv or [python, "-m", "guest.envd", "--listen", "unix:{socket}"]
        )
        self.python = python
        self.ready_timeout = ready_timeout
        self.project_dir = os.path.dirname(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        )
        log.warning("%s (state dir %s)", NO_ISOLATION_WARNING, self.state_dir)

    def _slot_dir(self, slot_id: str) -> str:
        return os.path.join(self.slots_dir, slot_id)

    async def start(self, spec: SlotSpec, spawn: Spawner) -> Instance:
        """Make the slot directory and start envd in it; return once envd listens."""
        slot = check_slot_id(spec.slot_id, "start")
        op = f"start {slot}"
        directory = self._slot_dir(slot)
        sock = os.path.join(directory, "envd.sock")
        if len(sock.encode()) > UNIX_PATH_MAX:
            raise DriverError(
                f"{op}: socket path {sock} is longer than {UNIX_PATH_MAX} bytes; use a shorter state dir"
            )
        make_slot_dir(directory, self.name, op)
        instance = Instance(
            slot_id=slot, driver=self.name, pid=0, envd=f"unix:{sock}", state_dir=directory
        )
        try:
            home = os.path.join(directory, "home")
            os.mkdir(home, 0o700)
            env = {
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                "HOME": home,
                "LANG": os.environ.get("LANG", "C.UTF-8"),
                "PYTHONPATH": os.pathsep.join(
                    [self.project_dir, *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
            }
            argv = [arg.replace("{socket}", sock) for arg in self.envd_argv]
            if sys.platform.startswith("linux"):
                argv = [self.python, "-S", "-E", "-c", REAPER_INIT, *argv]
            log_path = os.path.join(directory, "envd.log")
            with open(log_path, "ab") as log_file:
                handle = await spawn(argv, cwd=home, env=env, stdout=log_file, stderr=log_file)
            instance.pid = handle.pid
            instance.extra = {"tag": self.tag, "home": home, "log": log_path}
            await wait_until_listening(op, sock, handle, log_path, self.ready_timeout)
        except BaseException as exc:
            with trio.CancelScope(shield=True):
                await self.stop(instance)
            if isinstance(exc, OSError):
                raise DriverError(f"{op}: {exc}") from exc
            raise
        return instance

    def _roots(self, instance: Instance) -> list[int]:
        """The slot's root processes: its init (or envd) by pid when it is still that process,
        and any process naming the slot's directory in its argv (after a restart, or when
        ``instance`` comes from ``cleanup`` without a pid)."""
        roots = [instance.pid] if instance.pid and self.alive(instance) else []
        for pid in scan_processes(
            cmdline=os.path.join(self._slot_dir(instance.slot_id), "").encode()
        ):
            if pid not in roots:
                roots.append(pid)
        return roots

    def _pids(self, instance: Instance) -> list[int]:
        """Every live process of the slot: the roots, their descendants (orphans included:
        the init is their subreaper) and whatever is left in their sessions."""
        pids: list[int] = []
        for root in self._roots(instance):
            pids += [pid for pid in tree_pids(root) if pid not in pids]
        return pids

    def _owns(self, pid: int, slot_id: str) -> bool:
        return os.path.join(self._slot_dir(slot_id), "").encode() in _read_proc(str(pid), "cmdline")

    async def stop(self, instance: Instance) -> None:
        """Kill every process of the slot and remove its directory; idempotent."""
        slot = instance.slot_id
        left = await kill_and_wait(self._pids(instance), root=instance.pid)
        if left:
            raise DriverError(f"stop {slot}: kill: processes still running: {left}")
        try:
            remove_tree(self._slot_dir(slot))
        except OSError as exc:
            raise DriverError(f"stop {slot}: remove directory: {exc}") from exc

    async def pause(self, instance: Instance) -> None:
        """SIGSTOP every process of the slot, rescanning until no new one appears (a child
        forked while the first round ran is caught by the next)."""
        self._check_alive(instance, "pause")
        stopped: set[int] = set()
        for _ in range(10):
            fresh = [pid for pid in self._pids(instance) if pid not in stopped]
            if not fresh:
                break
            for pid in fresh:
                _signal(pid, signal.SIGSTOP)
            stopped.update(fresh)
            await trio.sleep(0.001)
        instance.paused = True

    async def resume(self, instance: Instance) -> None:
        """SIGCONT what ``pause`` stopped."""
        self._check_alive(instance, "resume")
        for pid in self._pids(instance):
            _signal(pid, signal.SIGCONT)
        instance.paused = False
        await trio.lowlevel.checkpoint()

    def _check_alive(self, instance: Instance, op: str) -> None:
        if not self.alive(instance):
            raise DriverError(f"{op} {instance.slot_id}: envd (pid {instance.pid}) is not running")

    def alive(self, instance: Instance) -> bool:
        """Whether the slot's envd still runs (and the pid is still that envd)."""
        state = process_state(instance.pid) if instance.pid else None
        if state is None or state[0] == "Z":
            return False
        return self._owns(instance.pid, instance.slot_id)

    def leftovers(self, slot_ids: Sequence[str] | None = None) -> list[str]:
        """Slot directories and processes of this node's process-driver slots."""
        wanted = set(slot_ids) if slot_ids is not None else None
        found = []
        for slot in slot_dirs(self.slots_dir, self.name):
            if wanted is None or slot in wanted:
                found.append(f"directory {self._slot_dir(slot)}")
        for slot in sorted(self._running_slots()):
            if wanted is None or slot in wanted:
                instance = Instance(
                    slot_id=slot, driver=self.name, pid=0, envd="", state_dir=self._slot_dir(slot)
                )
                for pid in self._pids(instance):
                    cmd = (
                        _read_proc(str(pid), "cmdline")
                        .replace(b"\0", b" ")
                        .decode(errors="replace")
                        .strip()
                    )
                    found.append(f"process {pid} ({slot}): {cmd[:160]}")
        return found

    def _running_slots(self) -> set[str]:
        """Slot ids named in the argv of a live process (the init, envd)."""
        prefix = os.path.join(self.slots_dir, "")
        slots = set()
        for cmd in scan_processes(cmdline=prefix.encode()).values():
            match = re.search(re.escape(prefix) + r"([a-z0-9][a-z0-9-]*)/", cmd)
            if match:
                slots.add(match.group(1))
        return slots

    async def cleanup(self, keep: Sequence[str] = ()) -> list[str]:
        """Stop every slot of this node except ``keep``; returns what was removed."""
        keep_set = set(keep)
        slots = set(slot_dirs(self.slots_dir, self.name)) | self._running_slots()
        removed: list[str] = []
        for slot in sorted(s for s in slots if s and s not in keep_set):
            removed.extend(self.leftovers([slot]))
            await self.stop(
                Instance(
                    slot_id=slot, driver=self.name, pid=0, envd="", state_dir=self._slot_dir(slot)
                )
            )
        return removed
