"""Child processes for envd: spawned in the event loop, pipes as trio streams, exit by pidfd.

``trio.lowlevel.open_process`` runs ``Popen`` in a worker thread so that a slow fork cannot stall
the loop. envd is small and CPython spawns with vfork, so a spawn costs a few hundred
microseconds; the hop to a thread and back costs more than that on a loaded two-core machine.
envd therefore calls ``Popen`` directly (keeping its C-level handling of users, sessions and
descriptors) and waits for the exit with a pidfd (Linux), a kqueue process filter (BSD), or a
worker thread as the last resort.
"""

import contextlib
import fcntl
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import trio

PIPE = "pipe"
NULL = "null"

Wiring = str | int | None  # PIPE, NULL, an fd to hand over as it is, or None to inherit


class Child:
    """One child process: its pid, the parent's ends of its pipes, and its exit status."""

    def __init__(
        self,
        popen: "subprocess.Popen[bytes]",
        stdin: trio.lowlevel.FdStream | None,
        stdout: trio.lowlevel.FdStream | None,
        stderr: trio.lowlevel.FdStream | None,
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
        self._pidfd = _open_pidfd(popen.pid)
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._waiting = trio.Lock()

    @classmethod
    def spawn(
        cls,
        argv: Sequence[str],
        *,
        stdin: Wiring = NULL,
        stdout: Wiring = None,
        stderr: Wiring = None,
        **options: Any,
    ) -> "Child":
        """Start ``argv`` now; ``options`` go to `subprocess.Popen` (env, cwd, user, ...).

        Raises OSError as Popen does (a missing executable, a bad cwd, EAGAIN).
        """
        ours: list[int | None] = [None, None, None]
        theirs: list[int | None] = [None, None, None]
        opened: list[int] = []
        try:
            for index, wiring in enumerate((stdin, stdout, stderr)):
                if wiring == PIPE:
                    read, write = os.pipe()
                    opened += [read, write]
                    if index > 0:
                        _widen(read)
                    ours[index], theirs[index] = (write, read) if index == 0 else (read, write)
                elif wiring == NULL:
                    theirs[index] = subprocess.DEVNULL
                elif isinstance(wiring, int):
                    theirs[index] = wiring
            popen = subprocess.Popen(
                list(argv),
                stdin=theirs[0],
                stdout=theirs[1],
                stderr=theirs[2],
                close_fds=True,
                **options,
            )
        except BaseException:
            for fd in opened:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        for mine, child_end in zip(ours, theirs, strict=True):
            if mine is not None and child_end is not None:
                os.close(child_end)  # the child has its copy
        streams = [trio.lowlevel.FdStream(fd) if fd is not None else None for fd in ours]
        return cls(popen, *streams)

    async def wait(self) -> int:
        """Wait for the child to exit and reap it; its return code (negative: a signal)."""
        async with self._waiting:
            if self.returncode is None:
                if self._pidfd >= 0:
                    await trio.lowlevel.wait_readable(self._pidfd)
                else:
                    await _wait_exit(self.pid)
                try:
                    _, status = os.waitpid(self.pid, 0)
                    returncode = os.waitstatus_to_exitcode(status)
                except ChildProcessError:
                    returncode = 255  # someone else reaped it: its status is lost
                self._settle(returncode)
        assert self.returncode is not None
        return self.returncode

    def _settle(self, returncode: int) -> None:
        self.returncode = returncode
        self._popen.returncode = returncode  # Popen must never wait for it itself
        if self._pidfd >= 0:
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    async def aclose_pipes(self) -> None:
        """Close the parent's ends of the pipes."""
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.aclose()


# Output pipes are widened from the default 64 KiB so a fast writer hands over bigger chunks:
# fewer wakeups and fewer, larger frames per megabyte. Not more: the kernel charges pipe
# buffers to the user, and a failure here only means the default size stays.
PIPE_SIZE = 256 << 10
_F_SETPIPE_SZ = 1031  # Linux fcntl


def _widen(fd: int) -> None:
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_SIZE)


def _open_pidfd(pid: int) -> int:
    """A pidfd for ``pid`` (readable once it exits), or -1 where there is none."""
    if not hasattr(os, "pidfd_open"):
        return -1
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return -1
    os.set_inheritable(fd, False)
    return fd


async def _wait_exit(pid: int) -> None:
    """Return once process ``pid`` (our child) has exited, without reaping it."""
    if sys.platform != "linux" and hasattr(trio.lowlevel, "monitor_kevent"):  # pragma: no cover
        import select

        kqueue = trio.lowlevel.current_kqueue()  # type: ignore[attr-defined]
        event = select.kevent(  # type: ignore[attr-defined]
            pid,
            filter=select.KQ_FILTER_PROC,  # type: ignore[attr-defined]
            flags=select.KQ_EV_ADD | select.KQ_EV_ONESHOT,  # type: ignore[attr-defined]
            fflags=select.KQ_NOTE_EXIT,  # type: ignore[attr-defined]
        )
        try:
            kqueue.control([event], 0)
        except ProcessLookupError:
            return  # already gone
        with trio.lowlevel.monitor_kevent(pid, select.KQ_FILTER_PROC) as queue:  # type: ignore[attr-defined]
            await queue.receive()
        return
    await trio.to_thread.run_sync(  # pragma: no cover - neither pidfd nor kqueue
        lambda: os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT), abandon_on_cancel=True
    )
