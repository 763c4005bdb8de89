"""The host reaper: the service as subreaper of every process it spawns.

``Reaper`` is an actor that makes this process a subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``
on Linux, ``procctl(PROC_REAP_ACQUIRE)`` on FreeBSD), spawns the processes other actors own,
reports each exit to its owner, reaps orphans that are reparented to us, and kills whole
process subtrees. ``ProcessActor`` is the actor that owns one such process and plugs it into
the shutdown ladder: stop request, ``term_timeout``, SIGTERM, SIGKILL, reaped — all before
its supervisor reports it stopped.

Stealing exit statuses is the trap (docs/freebsd-contract.md §4.3): a ``waitpid(-1)`` would
take the status of children that trio or ``subprocess`` are waiting for. So the reaper never
waits for "any" child. It waits for the pids it spawned, one by one (pidfd on Linux, kqueue
on FreeBSD, polling elsewhere). Other zombie children are orphans to reap when they are in
the session of a process it spawned (it starts each one as a session leader); any other
zombie is reaped only after staying unclaimed for ``orphan_grace`` seconds, because trio and
``subprocess`` collect their own children within moments of the exit.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from typing import IO, Any

import msgspec
import trio

from actors import (
    NORMAL,
    Actor,
    ActorRef,
    ExitReason,
    Failure,
    Request,
)

__all__ = [
    "UNKNOWN_STATUS",
    "ProcessActor",
    "ProcessExited",
    "ProcessFailed",
    "ProcessHandle",
    "ProcessTable",
    "Reaper",
    "Spawn",
    "Watch",
    "become_subreaper",
    "clear_session",
    "is_subreaper",
    "kill_tree",
    "tree_pids",
]

# Linux prctl(2)
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
# FreeBSD procctl(2), docs/freebsd-contract.md §4.1
P_PID = 0
PROC_REAP_ACQUIRE = 2
PROC_REAP_STATUS = 4
PROC_REAP_KILL = 6
REAPER_STATUS_OWNED = 0x1
REAPER_KILL_SUBTREE = 0x2

PLATFORM: str = sys.platform  # a plain str, so type checkers keep every platform's branch


class ProcessExited(msgspec.Struct, frozen=True):
    """A process ended. ``returncode`` is negative for a signal, as in ``subprocess``."""

    pid: int
    returncode: int
    orphan: bool = False  # an orphan of this owner's subtree, not its own process

    @property
    def signal(self) -> int | None:
        return -self.returncode if self.returncode < 0 else None

    @property
    def exit_code(self) -> int | None:
        return self.returncode if self.returncode >= 0 else None

    def __str__(self) -> str:
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = str(-self.returncode)
            return f"pid {self.pid} killed by {name}"
        return f"pid {self.pid} exited with status {self.returncode}"


class ProcessFailed(Exception):
    """A process-owning actor's process exited with a status it does not accept."""

    def __init__(self, argv: Sequence[str], exit: ProcessExited) -> None:
        super().__init__(f"{argv[0] if argv else '?'}: {exit}")
        self.exit = exit


class ProcessHandle:
    """One spawned process: its pid, and the exit once the reaper has collected it."""

    __slots__ = ("_exited", "argv", "exit", "owner", "pid", "popen", "watched")

    def __init__(self, popen: subprocess.Popen[bytes], argv: Sequence[str], owner: ActorRef[Any] | None) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.argv = list(argv)
        self.owner = owner
        self.exit: ProcessExited | None = None
        self.watched = True  # False once no reaper watches it (the reaper stopped first)
        self._exited = trio.Event()

    @property
    def running(self) -> bool:
        return self.exit is None

    async def wait(self) -> ProcessExited:
        """Wait until the process has exited and been reaped.

        If the reaper stopped before the process did, this reaps it itself.
        """
        while self.exit is None:
            if self.watched:
                with trio.move_on_after(0.05):
                    await self._exited.wait()
            else:
                self._reap_self()
                await trio.sleep(0.01)
        await trio.lowlevel.checkpoint()
        return self.exit

    def _reap_self(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8
        if pid:
            self._settle(os.waitstatus_to_exitcode(status))

    def send_signal(self, sig: int) -> bool:
        """Send ``sig`` to the process (not its subtree); False if it is gone."""
        if self.exit is not None:
            return False
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            return False
        return True

    def kill_tree(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` to the process and every descendant, orphans included."""
        if self.exit is not None:
            return kill_tree(self.pid, sig, include_root=False)
        return kill_tree(self.pid, sig)

    def _settle(self, returncode: int) -> None:
        self.exit = ProcessExited(self.pid, returncode)
        self.popen.returncode = returncode  # so that Popen never waits for it itself
        self._exited.set()


class ProcessTable:
    """Every process the reaper spawned and has not reaped yet; survives reaper restarts."""

    def __init__(self) -> None:
        self.live: dict[int, ProcessHandle] = {}
        # session id -> owner, for sessions whose leader has exited but may have left
        # orphans behind; dropped once the session is empty
        self.dead_sessions: dict[int, ActorRef[Any] | None] = {}
        self.orphans_reaped = 0
        self.suspects: dict[int, float] = {}  # unowned zombie pid -> when first seen


class Spawn(Request[ProcessHandle], frozen=True):
    """Start ``argv`` owned by ``owner`` (which gets ``ProcessExited`` on its system lane).

    The process leads a new session, so its subtree can be found and killed as a unit.
    ``stdin``/``stdout``/``stderr`` take what ``subprocess.Popen`` takes (default: /dev/null
    for stdin, inherited for the others).
    """

    argv: list[str]
    owner: Any = None
    cwd: str | None = None
    env: dict[str, str] | None = None
    stdin: Any = subprocess.DEVNULL
    stdout: Any = None
    stderr: Any = None
    pass_fds: tuple[int, ...] = ()


class Watch(Request[None], frozen=True):
    """Report the exit of ``pid``, a process that is not our child (one a previous run of the
    service spawned and that we re-adopted), to ``owner`` as ``ProcessExited`` with
    ``returncode`` ``UNKNOWN_STATUS``: only a parent can learn the real status."""

    pid: int
    owner: Any


UNKNOWN_STATUS = -255


class KillTree(Request[int], frozen=True):
    pid: int
    sig: int = signal.SIGKILL


def _libc() -> ctypes.CDLL:
    name = "libc.so.7" if PLATFORM.startswith("freebsd") else None
    return ctypes.CDLL(name, use_errno=True)


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; False where unsupported."""
    libc = _libc()
    if PLATFORM.startswith("linux"):
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return True
    if PLATFORM.startswith("freebsd"):
        libc.procctl.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
        if libc.procctl(P_PID, os.getpid(), PROC_REAP_ACQUIRE, None) != 0:
            err = ctypes.get_errno()
            if err != errno.EBUSY:  # already the reaper
                raise OSError(err, os.strerror(err))
        return True
    return False


def is_subreaper() -> bool:
    """Whether this process is currently a subreaper."""
    libc = _libc()
    if PLATFORM.startswith("linux"):
        value = ctypes.c_int(0)
        libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0)
        return value.value == 1
    if PLATFORM.startswith("freebsd"):
        status = (ctypes.c_uint * 20)()
        libc.procctl.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
        if libc.procctl(P_PID, os.getpid(), PROC_REAP_STATUS, status) != 0:
            return False
        return bool(status[0] & REAPER_STATUS_OWNED) and status[3] == os.getpid()
    return False


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, session) of ``pid`` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[1]), int(rest[3])


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant, plus processes left in its session (orphans that
    were reparented away from it). Linux only; the root first."""
    table: dict[int, tuple[str, int, int]] = {}
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat is not None:
            table[pid] = stat
    root_stat = table.get(root)
    session = root_stat[2] if root_stat else root
    children: dict[int, list[int]] = {}
    for pid, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    seen: set[int] = set()
    queue = [root] if root in table else []
    if session > 1 and session != os.getsid(0):  # never our own session: it holds our shell
        queue += [pid for pid, (_, _, sid) in table.items() if sid == session]
    while queue:
        pid = queue.pop(0)
        if pid in seen or pid == os.getpid():
            continue
        seen.add(pid)
        found.append(pid)
        queue.extend(children.get(pid, ()))
    return found


def kill_tree(root: int, sig: int = signal.SIGKILL, *, include_root: bool = True) -> int:
    """Send ``sig`` to ``root``'s whole subtree, orphans included; returns how many got it.

    FreeBSD: ``procctl(PROC_REAP_KILL, REAPER_KILL_SUBTREE)``, which follows orphans itself.
    Linux: descendants by parent links plus the root's session (the reaper starts every
    process as a session leader, and orphans stay in it unless they call setsid).
    """
    if PLATFORM.startswith("freebsd"):
        return _freebsd_reap_kill(root, sig)
    count = 0
    for pid in tree_pids(root):
        if pid == root and not include_root:
            continue
        try:
            os.kill(pid, sig)
            count += 1
        except ProcessLookupError:
            pass
    return count


class _ReaperKill(ctypes.Structure):
    _fields_ = [
        ("sig", ctypes.c_int),
        ("flags", ctypes.c_uint),
        ("subtree", ctypes.c_int),
        ("killed", ctypes.c_uint),
        ("fpid", ctypes.c_int),
        ("pad", ctypes.c_uint * 15),
    ]


def _freebsd_reap_kill(root: int, sig: int) -> int:
    libc = _libc()
    libc.procctl.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_void_p]
    request = _ReaperKill(sig=sig, flags=REAPER_KILL_SUBTREE, subtree=root)
    if libc.procctl(P_PID, os.getpid(), PROC_REAP_KILL, ctypes.byref(request)) != 0:
        err = ctypes.get_errno()
        if err == errno.ESRCH:
            return 0
        raise OSError(err, os.strerror(err))
    return int(request.killed)


def session_members(session: int) -> list[tuple[int, str]]:
    """(pid, state) of every process in ``session`` (Linux /proc); never our own session."""
    if session <= 1 or session == os.getsid(0):
        return []
    members = []
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat is not None and stat[2] == session:
            members.append((pid, stat[0]))
    return members


async def clear_session(session: int, *, limit: float = 5.0) -> bool:
    """SIGKILL every process left in ``session`` and reap those that are our children, until
    none is left (processes forked while we kill are caught on the next round). Returns
    False if some remain after ``limit`` seconds (e.g. stuck in uninterruptible sleep)."""
    if not PLATFORM.startswith("linux"):
        return True
    me = os.getpid()
    with trio.move_on_after(limit):
        while True:
            members = session_members(session)
            if not members:
                return True
            for pid, state in members:
                if state == "Z":
                    stat = _proc_stat(pid)
                    if stat is not None and stat[1] == me:
                        try:
                            os.waitpid(pid, os.WNOHANG)
                        except ChildProcessError:
                            pass
                else:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            await trio.sleep(0.005)
    return False


def _zombie_children() -> list[tuple[int, int]]:
    """(pid, session) of this process's zombie children (Linux /proc)."""
    me = os.getpid()
    pids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    except OSError:
        pids = [pid for pid in _all_pids() if (_proc_stat(pid) or ("", 0, 0))[1] == me]
    zombies = []
    for pid in pids:
        stat = _proc_stat(pid)
        if stat is not None and stat[0] == "Z":
            zombies.append((pid, stat[2]))
    return zombies


class Reaper(Actor[Any]):
    """The host's process supervisor: spawn, watch, reap, kill subtrees.

    Put one under the node's supervisor, first in start order, and hand its ref to the
    process-owning actors. ``orphan_interval`` is how often orphans are swept for.
    """

    background_tasks = True

    def __init__(
        self,
        table: ProcessTable | None = None,
        *,
        orphan_interval: float = 0.25,
        orphan_grace: float = 1.0,
    ) -> None:
        self.table = table if table is not None else ProcessTable()
        self.orphan_interval = orphan_interval
        self.orphan_grace = orphan_grace
        self.subreaper = False

    async def init(self) -> None:
        self.subreaper = become_subreaper()
        for handle in list(self.table.live.values()):
            self.ctx.start_soon(self._watch, handle)  # we restarted: resume watching
        if PLATFORM.startswith("linux"):
            self.ctx.start_soon(self._sweep_orphans)

    async def terminate(self, reason: ExitReason) -> None:
        # a last look for orphans, without the grace period: we are going away
        self.sweep_once(grace=0.0)

    async def on_spawn(self, msg: Spawn) -> ProcessHandle:
        popen = subprocess.Popen(
            msg.argv,
            cwd=msg.cwd,
            env=msg.env,
            stdin=msg.stdin,
            stdout=msg.stdout,
            stderr=msg.stderr,
            pass_fds=msg.pass_fds,
            start_new_session=True,
            close_fds=True,
        )
        handle = ProcessHandle(popen, msg.argv, msg.owner)
        self.table.live[handle.pid] = handle
        self.ctx.start_soon(self._watch, handle)
        return handle

    async def on_watch(self, msg: Watch) -> None:
        self.ctx.start_soon(self._watch_foreign, msg.pid, msg.owner)

    async def _watch_foreign(self, pid: int, owner: ActorRef[Any]) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            owner.notify(ProcessExited(pid, UNKNOWN_STATUS))
            return
        except (AttributeError, OSError):
            pidfd = -1
        try:
            if pidfd >= 0:
                await trio.lowlevel.wait_readable(pidfd)
            else:
                while _proc_stat(pid) is not None:
                    await trio.sleep(0.1)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        owner.notify(ProcessExited(pid, UNKNOWN_STATUS))

    async def on_kill_tree(self, msg: KillTree) -> int:
        return kill_tree(msg.pid, msg.sig)

    def _collect(self, handle: ProcessHandle) -> bool:
        """Reap ``handle``'s process if it has exited; True when it has."""
        try:
            pid, status = os.waitpid(handle.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = handle.pid, 255 << 8  # someone else took it: report a failure
        if pid == 0:
            return False
        self.table.live.pop(handle.pid, None)
        self.table.dead_sessions[handle.pid] = handle.owner
        handle._settle(os.waitstatus_to_exitcode(status))
        assert handle.exit is not None
        if handle.owner is not None:
            handle.owner.notify(handle.exit)
        return True

    async def _watch(self, handle: ProcessHandle) -> None:
        """Wait for one owned process to exit, then reap it and tell its owner."""
        handle.watched = True
        if self._collect(handle):
            return
        pidfd = -1
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(handle.pid)
            except OSError:
                pidfd = -1
        try:
            if pidfd >= 0:
                await trio.lowlevel.wait_readable(pidfd)
                while not self._collect(handle):
                    await trio.sleep(0.001)
            elif PLATFORM.startswith("freebsd") and hasattr(trio.lowlevel, "monitor_kevent"):
                await self._wait_kevent(handle)
            else:
                while not self._collect(handle):
                    await trio.sleep(0.02)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
            if handle.running:
                handle.watched = False

    async def _wait_kevent(self, handle: ProcessHandle) -> None:
        import select

        kqueue = trio.lowlevel.current_kqueue()  # type: ignore[attr-defined]
        event = select.kevent(  # type: ignore[attr-defined]
            handle.pid,
            filter=select.KQ_FILTER_PROC,  # type: ignore[attr-defined]
            flags=select.KQ_EV_ADD | select.KQ_EV_ONESHOT,  # type: ignore[attr-defined]
            fflags=select.KQ_NOTE_EXIT,  # type: ignore[attr-defined]
        )
        try:
            kqueue.control([event], 0)
        except ProcessLookupError:
            self._collect(handle)
            return
        with trio.lowlevel.monitor_kevent(handle.pid, select.KQ_FILTER_PROC) as queue:  # type: ignore[attr-defined]
            await queue.receive()
        while not self._collect(handle):
            await trio.sleep(0.001)

    async def _sweep_orphans(self) -> None:
        while True:
            await trio.sleep(self.orphan_interval)
            self.sweep_once()

    def sweep_once(self, grace: float | None = None) -> int:
        """Reap orphaned zombie children; returns how many.

        A zombie in the session of a process we spawned is ours and is reaped at once. Any
        other zombie child might belong to trio or ``subprocess``, which collect theirs
        within moments of the exit, so it is reaped only after ``grace`` seconds unclaimed
        (default ``orphan_grace``).
        """
        grace = self.orphan_grace if grace is None else grace
        now = trio.current_time()
        seen: dict[int, float] = {}
        reaped = 0
        table = self.table
        owners: dict[int, ActorRef[Any] | None] = dict(table.dead_sessions)
        owners.update((handle.pid, handle.owner) for handle in table.live.values())
        for pid, session in _zombie_children():
            if pid in table.live:
                continue
            if session not in owners:
                first = seen[pid] = table.suspects.get(pid, now)
                if now - first < grace:
                    continue
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                continue
            if got == 0:
                continue
            reaped += 1
            self.table.orphans_reaped += 1
            owner = owners.get(session)
            if owner is not None:
                owner.notify(ProcessExited(pid, os.waitstatus_to_exitcode(status), orphan=True))
        table.suspects = seen
        if table.dead_sessions:
            live_sessions = {stat[2] for stat in map(_proc_stat, _all_pids()) if stat}
            for session in [s for s in table.dead_sessions if s not in live_sessions]:
                del table.dead_sessions[session]
        return reaped


class ProcessActor(Actor[Any]):
    """An actor that owns one OS process, spawned through the ``Reaper``.

    The process's exit ends the actor: normally if its status is in ``normal_codes``,
    otherwise as a crash with ``ProcessFailed`` (so a supervisor restarts it). Stopping the
    actor sends SIGTERM to the process tree, waits ``term_timeout``, then SIGKILLs it, and
    returns only once the process has been reaped. Killing the actor (BRUTAL or a shutdown
    timeout) SIGKILLs the tree and also waits for the reap.
    """

    def __init__(
        self,
        reaper: ActorRef[Any],
        argv: Sequence[str],
        *,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        term_timeout: float = 5.0,
        normal_codes: Sequence[int] = (0,),
    ) -> None:
        self.reaper = reaper
        self.argv = list(argv)
        self.cwd = cwd
        self.env = env
        self.stdout = stdout
        self.stderr = stderr
        self.term_timeout = term_timeout
        self.normal_codes = tuple(normal_codes)
        self.process: ProcessHandle | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def init(self) -> None:
        self.process = await self.reaper.call(
            Spawn(
                self.argv,
                owner=self.ctx.self,
                cwd=self.cwd,
                env=self.env,
                stdout=self.stdout,
                stderr=self.stderr,
            )
        )

    async def on_exited(self, msg: ProcessExited) -> None:
        if msg.orphan or self.process is None or msg.pid != self.process.pid:
            return
        if msg.returncode in self.normal_codes:
            self.ctx.stop(NORMAL)
        else:
            raise ProcessFailed(self.argv, msg)

    async def terminate(self, reason: ExitReason) -> None:
        process = self.process
        if process is None:
            return
        if process.running:
            process.kill_tree(signal.SIGTERM)
            with trio.move_on_after(self.term_timeout):
                await process.wait()
        await self._kill_and_reap(process)

    async def _kill_and_reap(self, process: ProcessHandle) -> None:
        with trio.CancelScope(shield=True):
            process.kill_tree(signal.SIGKILL)
            await process.wait()
            # and whatever it left behind in its session, reparented to us or not
            await clear_session(process.pid)

    async def _main(self, cell: Any) -> ExitReason:
        try:
            return await super()._main(cell)
        except BaseException:  # killed (cancelled): terminate will not run, so reap here
            if self.process is not None and self.process.running:
                await self._kill_and_reap(self.process)
            raise

    def exit_reason(self) -> ExitReason:
        """How the process ended, as an exit reason (for inspection and tests)."""
        process = self.process
        if process is None or process.exit is None:
            return NORMAL
        if process.exit.returncode in self.normal_codes:
            return NORMAL
        return Failure(ProcessFailed(self.argv, process.exit))
