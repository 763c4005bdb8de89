"""The process service: one `ProcessActor` per running command, under a DynamicSupervisor.

Semantics follow E2B's envd (docs/e2b-protocol.md §3.3): the first event of a stream is
``start``, output arrives as it is produced, ``end`` carries envd's exit code and status text,
``timeout_ms`` is the process's lifetime, and a process keeps running when the streams watching
it go away. Every command leads a session of its own, so a signal reaches its whole tree
(`supervisors.kill_tree`: descendants plus whatever stayed in the session, daemons included).

The actor owns the process from spawn (its ``init``) to reaping (its ``terminate``); the
service keeps a `ProcessRecord` per process for lookups (``process.list``, by pid, by tag) and
for the requests that wait on it. Control ops reach the actor as casts from the channel's
reader, so they keep their arrival order (stdin bytes are written in the order sent).
"""

import collections
import contextlib
import errno
import fcntl
import logging
import os
import signal
import struct
import termios
import time
from typing import Any

import msgspec
import trio

from actors import (
    Actor,
    ActorCrashed,
    ActorRef,
    ActorStopped,
    ExitReason,
    MailboxFull,
    Request,
)
from guest import protocol
from guest.channel import Call, Handler, Reply, Sink
from guest.children import NULL, PIPE, Child
from guest.protocol import (
    DeadlineExceeded,
    FailedPrecondition,
    GuestError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProcessEnded,
    ProcessOutput,
    ResourceExhausted,
)
from guest.users import Account, Accounts
from supervisors import ChildStartFailed, MaxChildren, kill_tree, start_dynamic_child

log = logging.getLogger("guest.processes")

# Bytes read from a pipe at a time (the pipes are this wide, see guest.children); one data
# event each.
READ_SIZE = 256 << 10
# After the main process exits, output is drained until the pipes stay quiet this long (a
# daemon that inherited stdout would otherwise hold the stream open for ever).
EXIT_DRAIN_GRACE = 0.05
# Bytes of stdin one process may have queued and not yet written.
STDIN_QUEUE_LIMIT = 1 << 20
# How many exited processes are remembered for a late process.connect, and for how long.
EXITED_KEEP = 128
EXITED_TTL = 300.0
# How many processes may run at once (the supervisor refuses more).
MAX_PROCESSES = 4096

# Go's ProcessState.String() spells signals like this (syscall.Signal.String on Linux).
_GO_SIGNAL_TEXT = {
    "SIGHUP": "hangup",
    "SIGINT": "interrupt",
    "SIGQUIT": "quit",
    "SIGILL": "illegal instruction",
    "SIGTRAP": "trace/breakpoint trap",
    "SIGABRT": "aborted",
    "SIGBUS": "bus error",
    "SIGFPE": "floating point exception",
    "SIGKILL": "killed",
    "SIGUSR1": "user defined signal 1",
    "SIGSEGV": "segmentation fault",
    "SIGUSR2": "user defined signal 2",
    "SIGPIPE": "broken pipe",
    "SIGALRM": "alarm clock",
    "SIGTERM": "terminated",
    "SIGSTKFLT": "stack fault",
    "SIGCHLD": "child exited",
    "SIGCONT": "continued",
    "SIGSTOP": "stopped (signal)",
    "SIGTSTP": "stopped",
    "SIGTTIN": "stopped (tty input)",
    "SIGTTOU": "stopped (tty output)",
    "SIGURG": "urgent I/O condition",
    "SIGXCPU": "CPU time limit exceeded",
    "SIGXFSZ": "file size limit exceeded",
    "SIGVTALRM": "virtual timer expired",
    "SIGPROF": "profiling timer expired",
    "SIGWINCH": "window changed",
    "SIGIO": "I/O possible",
    "SIGPWR": "power failure",
    "SIGSYS": "bad system call",
}


def exit_report(returncode: int) -> ProcessEnded:
    """The end event for a Popen-style return code, with E2B envd's values."""
    if returncode >= 0:
        status = f"exit status {returncode}"
        return ProcessEnded(
            exit_code=returncode,
            exited=True,
            status=status,
            error=status if returncode else None,
        )
    number = -returncode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = ""
    status = f"signal: {_GO_SIGNAL_TEXT.get(name, f'signal {number}')}"
    return ProcessEnded(exit_code=-1, exited=False, status=status, error=status)


def parse_signal(value: int | str) -> int:
    """A signal number from a number or a name (``9``, ``KILL``, ``SIGKILL``, ``SIGNAL_SIGKILL``)."""
    if isinstance(value, int):
        number = value
    else:
        text = value.strip().upper().removeprefix("SIGNAL_")
        if text.isdigit():
            number = int(text)
        else:
            name = text if text.startswith("SIG") else "SIG" + text
            try:
                number = int(signal.Signals[name])
            except KeyError:
                raise InvalidArgument(f"unknown signal {value!r}") from None
    try:
        signal.Signals(number)
    except ValueError:
        raise InvalidArgument(f"unknown signal {value!r}") from None
    return number


def signal_tree(root: int, number: int, *, alive: bool = True) -> int:
    """Signal ``root``'s whole tree; how many processes got it (0: nothing left)."""
    try:
        return kill_tree(root, number, include_root=alive)
    except OSError:
        # Where the subtree cannot be walked (FreeBSD without the reaper role): its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(root, number)
            return 1
        return 0


def set_window_size(fd: int, size: protocol.PtySize) -> None:
    """Set a terminal's size in character cells."""
    if not (0 < size.cols <= 0xFFFF and 0 < size.rows <= 0xFFFF):
        raise InvalidArgument(f"bad pty size {size.cols}x{size.rows}")
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))


def _make_controlling_tty() -> None:  # pragma: no cover - runs in the child before exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


# --------------------------------------------------------------------------------------------
# Messages to a process actor (casts from the channel's reader; each answers its Reply)


class WriteInput(msgspec.Struct, frozen=True):
    """Queue bytes for the process's stdin pipe (or its pty when ``pty``)."""

    data: bytes
    pty: bool
    reply: Any


class CloseStdin(msgspec.Struct, frozen=True):
    """Close stdin once what is queued has been written."""

    reply: Any


class Resize(msgspec.Struct, frozen=True):
    """Give the process's pty a new size."""

    size: protocol.PtySize
    reply: Any


class Attach(Request[None], frozen=True):
    """Subscribe another stream: it gets start, the output from now on, and end."""

    sink: Any


# --------------------------------------------------------------------------------------------


class ProcessRecord:
    """What envd knows about one process; outlives the actor so late requests can ask."""

    def __init__(self, request: protocol.ProcessStart) -> None:
        self.request = request
        self.pid = 0
        self.tag = request.tag
        self.config = request.process
        self.ref: ActorRef[Any] | None = None
        self.ended: ProcessEnded | None = None
        self.deadline_hit = False
        self.reaped = False  # once true, the pid may already belong to someone else
        self.finished = trio.Event()
        self.exited_at = 0.0

    def info(self) -> protocol.ProcessInfo:
        """This process as ``process.list`` shows it."""
        return protocol.ProcessInfo(config=self.config, pid=self.pid, tag=self.tag)


class _StdinItem:
    __slots__ = ("close", "data", "reply")

    def __init__(self, data: bytes, reply: Reply | None, close: bool = False) -> None:
        self.data = data
        self.reply = reply
        self.close = close


class ProcessActor(Actor[Any]):
    """Owns one spawned command: output pumps, stdin, deadline, exit, and cleanup.

    ``init`` spawns the process (a failure there is the request's error); a background task
    fans its output out to the subscribed streams, parking when a subscriber has no credit
    (which in turn pauses the process), and reports the end to everyone before the actor
    stops. ``terminate`` (and, should the actor be killed, the background task's ``finally``)
    kills the tree and reaps it. A process is never restarted: the child spec is temporary.
    """

    background_tasks = True
    on_restart = "discard"
    mailbox_size = 256

    def __init__(
        self,
        service: "ProcessService",
        record: ProcessRecord,
        account: Account,
        first: Sink,
    ) -> None:
        self._service = service
        self._record = record
        self._account = account
        self._subscribers: list[Sink] = [first]
        self.process: Child | None = None
        self._pty: trio.lowlevel.FdStream | None = None
        self._stdin: trio.abc.SendStream | None = None
        self._stdin_open = False
        self._stdin_queue: collections.deque[_StdinItem] = collections.deque()
        self._stdin_queued = 0
        self._stdin_wakeup = trio.lowlevel.ParkingLot()
        self._read_scopes: set[trio.CancelScope] = set()
        self._exit_seen = False

    # -- life ------------------------------------------------------------------------------

    async def init(self) -> None:
        self.process, self._pty = self._service.spawn(self._record, self._account)
        self._record.pid = self.process.pid
        self._stdin = self._pty or self.process.stdin
        self._stdin_open = self._stdin is not None
        self.ctx.start_soon(self._live)

    async def terminate(self, reason: ExitReason) -> None:
        with trio.CancelScope(shield=True):
            await self._cleanup()

    async def _live(self) -> None:
        """Stream the process from its start event to its end event, then stop the actor."""
        process = self.process
        assert process is not None
        try:
            # The start event goes first, before any output is read (E2B's first-event rule).
            await self._publish("start", protocol.ProcessStarted(pid=process.pid))
            async with trio.open_nursery() as helpers:
                if self._stdin is not None:
                    helpers.start_soon(self._write_stdin)
                timeout = self._record.request.timeout_ms
                if timeout > 0:
                    helpers.start_soon(self._enforce_deadline, timeout / 1000)
                async with trio.open_nursery() as pumps:
                    if self._pty is not None:
                        pumps.start_soon(self._pump, self._pty, "pty")
                    else:
                        assert process.stdout is not None and process.stderr is not None
                        pumps.start_soon(self._pump, process.stdout, "stdout")
                        pumps.start_soon(self._pump, process.stderr, "stderr")
                    await process.wait()
                    self._record.reaped = True
                    self._record.exited_at = time.monotonic()
                    self._begin_exit_drain()
                helpers.cancel_scope.cancel()
            ended = exit_report(process.returncode if process.returncode is not None else 0)
            self._record.ended = ended
            await self._publish("end", ended)
            # The streams are complete: their requests may answer now, cleanup runs after.
            self._service.exited(self._record)
            self._record.finished.set()
            self.ctx.stop()
        finally:
            if process.returncode is None:
                # Killed (cancelled) rather than stopped: still leave no process behind.
                signal_tree(process.pid, signal.SIGKILL)

    async def _cleanup(self) -> None:
        """Whatever happened, leave no process, pipe or pty behind; tell the waiters."""
        process = self.process
        record = self._record
        if process is not None:
            if process.returncode is None:
                signal_tree(process.pid, signal.SIGKILL)
                with trio.move_on_after(5):
                    await process.wait()
            record.reaped = True
            if record.ended is None:
                record.ended = exit_report(
                    process.returncode if process.returncode is not None else -signal.SIGKILL
                )
            await process.aclose_pipes()
            if self._pty is not None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._pty.aclose()
        for item in self._stdin_queue:
            if item.reply is not None:
                item.reply.err(NotFound(f"process {record.pid} has exited"))
        self._stdin_queue.clear()
        self._stdin_open = False
        if not record.exited_at:
            record.exited_at = time.monotonic()
        self._service.exited(record)
        record.finished.set()

    # -- output ----------------------------------------------------------------------------

    async def _pump(self, stream: trio.abc.ReceiveStream, kind: str) -> None:
        """Forward one output stream to the subscribers until EOF (or quiet after exit)."""
        while True:
            scope = trio.CancelScope()
            if self._exit_seen:
                scope.deadline = trio.current_time() + EXIT_DRAIN_GRACE
            self._read_scopes.add(scope)
            data: bytes | bytearray = b""
            try:
                with scope:
                    data = await stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""  # a pty reports EIO once the last writer is gone
            finally:
                self._read_scopes.discard(scope)
            if not data:
                return
            await self._publish("data", ProcessOutput(**{kind: bytes(data)}))

    def _begin_exit_drain(self) -> None:
        """The process exited: reads still pending may now wait only a short grace."""
        self._exit_seen = True
        deadline = trio.current_time() + EXIT_DRAIN_GRACE
        for scope in self._read_scopes:
            scope.deadline = deadline

    async def _publish(self, ev: str, body: protocol.Message) -> None:
        for sink in list(self._subscribers):
            if not await sink.emit(ev, body):
                with contextlib.suppress(ValueError):
                    self._subscribers.remove(sink)

    async def _enforce_deadline(self, timeout: float) -> None:
        await trio.sleep(timeout)
        self._record.deadline_hit = True
        assert self.process is not None
        signal_tree(self.process.pid, signal.SIGKILL)

    # -- messages --------------------------------------------------------------------------

    async def on_attach(self, msg: Attach) -> None:
        record = self._record
        sink: Sink = msg.sink
        await sink.emit("start", protocol.ProcessStarted(pid=record.pid))
        if record.ended is not None:
            await sink.emit("end", record.ended)
        else:
            self._subscribers.append(sink)

    async def on_write_input(self, msg: WriteInput) -> None:
        reply: Reply = msg.reply
        pid = self._record.pid
        try:
            if msg.pty and self._pty is None:
                raise FailedPrecondition(f"process {pid} has no pty; send stdin instead")
            if not msg.pty and self._pty is not None:
                raise FailedPrecondition(f"process {pid} has a pty; send pty input instead")
            if not self._stdin_open:
                raise FailedPrecondition(f"stdin of process {pid} is not enabled or closed")
            if self._stdin_queued + len(msg.data) > STDIN_QUEUE_LIMIT:
                raise ResourceExhausted(f"stdin queue of process {pid} is full")
        except GuestError as exc:
            reply.err(exc)
            return
        self._stdin_queued += len(msg.data)
        self._stdin_queue.append(_StdinItem(msg.data, reply))
        self._stdin_wakeup.unpark_all()

    async def on_close_stdin(self, msg: CloseStdin) -> None:
        reply: Reply = msg.reply
        if self._pty is not None:
            reply.err(
                FailedPrecondition(
                    f"process {self._record.pid} has a pty; send Ctrl-D (0x04) instead"
                )
            )
        elif not self._stdin_open:
            reply.ok()  # as E2B envd: closing a closed (or absent) stdin is fine
        else:
            self._stdin_open = False
            self._stdin_queue.append(_StdinItem(b"", reply, close=True))
            self._stdin_wakeup.unpark_all()

    async def on_resize(self, msg: Resize) -> None:
        reply: Reply = msg.reply
        if self._pty is None:
            reply.err(FailedPrecondition(f"process {self._record.pid} has no pty"))
            return
        try:
            set_window_size(self._pty.fileno(), msg.size)
        except GuestError as exc:
            reply.err(exc)
            return
        reply.ok()

    async def _write_stdin(self) -> None:
        stream = self._stdin
        assert stream is not None
        pid = self._record.pid
        while True:
            while not self._stdin_queue:
                await self._stdin_wakeup.park()
            item = self._stdin_queue[0]
            try:
                if item.close:
                    await stream.aclose()
                else:
                    await stream.send_all(item.data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._stdin_open = False
                for pending in self._stdin_queue:
                    if pending.reply is None:
                        continue
                    if pending.close:
                        pending.reply.ok()
                    else:
                        pending.reply.err(FailedPrecondition(f"stdin of process {pid} is closed"))
                self._stdin_queue.clear()
                self._stdin_queued = 0
                return
            self._stdin_queue.popleft()
            self._stdin_queued -= len(item.data)
            if item.reply is not None:
                item.reply.ok()
            if item.close:
                return


# --------------------------------------------------------------------------------------------
# The service


class ProcessService:
    """Starts commands as supervised actors and keeps the table of running and exited ones."""

    def __init__(self, accounts: Accounts, sandbox_env: dict[str, str]) -> None:
        self._accounts = accounts
        self._sandbox_env = sandbox_env
        self.supervisor: ActorRef[Any] | None = None  # the DynamicSupervisor, once started
        self._running: dict[int, ProcessRecord] = {}
        self._exited: collections.OrderedDict[int, ProcessRecord] = collections.OrderedDict()

    @property
    def handlers(self) -> dict[str, Handler]:
        """The ops this service answers."""
        return {
            "process.start": Handler(self.start),
            "process.connect": Handler(self.connect),
            "process.list": Handler(self.list_processes, inline=True),
            "process.input": Handler(self.send_input, inline=True),
            "process.close_stdin": Handler(self.close_stdin, inline=True),
            "process.signal": Handler(self.send_signal, inline=True),
            "process.resize": Handler(self.resize, inline=True),
        }

    def exited(self, record: ProcessRecord) -> None:
        """Move a process from the running table to the recently exited one."""
        if self._running.get(record.pid) is record:
            del self._running[record.pid]
        if record.pid:
            self._exited[record.pid] = record
            self._exited.move_to_end(record.pid)
        now = time.monotonic()
        while self._exited:
            pid, oldest = next(iter(self._exited.items()))
            if len(self._exited) > EXITED_KEEP or now - oldest.exited_at > EXITED_TTL:
                del self._exited[pid]
            else:
                break

    def kill_leftovers(self) -> None:
        """Kill what exited processes left behind (daemons), as envd stops."""
        for record in list(self._exited.values()):
            if record.pid not in self._running:
                signal_tree(record.pid, signal.SIGKILL, alive=False)

    # -- lookup --------------------------------------------------------------------------------

    def _find(self, selector: protocol.ProcessSelector, *, exited: bool) -> ProcessRecord:
        if selector.pid is not None:
            record = self._running.get(selector.pid)
            if record is None and exited:
                record = self._exited.get(selector.pid)
            if record is None:
                raise NotFound(f"process with pid {selector.pid} not found")
            return record
        if selector.tag is not None:
            for record in self._running.values():
                if record.tag == selector.tag:
                    return record
            if exited:
                for record in reversed(self._exited.values()):
                    if record.tag == selector.tag:
                        return record
            raise NotFound(f"process with tag {selector.tag!r} not found")
        raise InvalidArgument("select a process by pid or tag")

    @staticmethod
    def _tell(record: ProcessRecord, message: Any) -> None:
        """Cast a control message to a process's actor, in order, without blocking."""
        assert record.ref is not None
        try:
            record.ref.cast_nowait(message)
        except MailboxFull:
            raise ResourceExhausted(f"process {record.pid} is busy; retry") from None
        except ActorStopped:
            raise NotFound(f"process with pid {record.pid} not found") from None

    # -- ops -----------------------------------------------------------------------------------

    async def start(self, call: Call, args: protocol.ProcessStart) -> None:
        """``process.start``: spawn, stream start/data/end; the process outlives the stream."""
        account = self._accounts.resolve(args.user)
        record = ProcessRecord(args)
        assert self.supervisor is not None
        try:
            record.ref = await start_dynamic_child(
                self.supervisor, record, account, call, timeout=30
            )
        except ChildStartFailed as exc:
            if isinstance(exc.cause, GuestError):
                raise exc.cause from None
            raise Internal(f"cannot start the process: {exc.cause}") from None
        except MaxChildren:
            raise ResourceExhausted(f"more than {MAX_PROCESSES} processes") from None
        await record.finished.wait()
        if record.deadline_hit:
            raise DeadlineExceeded(
                f"process {record.pid} exceeded its {args.timeout_ms} ms timeout and was killed"
            )

    async def connect(self, call: Call, args: protocol.ProcessConnect) -> None:
        """``process.connect``: start, live output, end, for a running or recently exited one."""
        record = self._find(args, exited=True)
        attached = False
        if record.ended is None and record.ref is not None:
            try:
                await record.ref.call(Attach(call), timeout=None)
                attached = True
            except (ActorStopped, ActorCrashed):
                pass
        if attached:
            await record.finished.wait()
        else:
            # The process ended before the actor saw us: report start and end ourselves.
            await call.emit("start", protocol.ProcessStarted(pid=record.pid))
            await record.finished.wait()
            if record.ended is not None:
                await call.emit("end", record.ended)

    def list_processes(self, reply: Reply, args: protocol.Empty) -> None:
        """``process.list``: the running processes."""
        reply.ok(protocol.ProcessList(processes=[r.info() for r in self._running.values()]))

    def send_input(self, reply: Reply, args: protocol.ProcessInput) -> None:
        """``process.input``: queue stdin or pty bytes; answered once written, in order."""
        record = self._find(args, exited=False)
        if args.pty is not None:
            self._tell(record, WriteInput(args.pty, True, reply))
        else:
            self._tell(record, WriteInput(args.stdin or b"", False, reply))

    def close_stdin(self, reply: Reply, args: protocol.ProcessCloseStdin) -> None:
        """``process.close_stdin``: EOF for the process after what is queued."""
        self._tell(self._find(args, exited=False), CloseStdin(reply))

    def send_signal(self, reply: Reply, args: protocol.ProcessSignal) -> None:
        """``process.signal``: signal the tree; for an exited process, what is left of it."""
        number = parse_signal(args.signal)
        if number == 0:
            raise InvalidArgument("signal 0 is not a signal")
        try:
            record = self._find(args, exited=False)
        except NotFound:
            record = self._find(args, exited=True)
            if not signal_tree(record.pid, number, alive=False):
                raise
            reply.ok()
            return
        # A signal is one syscall and must get through even when the actor's mailbox is full,
        # so it does not queue behind stdin; until the reap, the pid is still this process's.
        signal_tree(record.pid, number, alive=not record.reaped)
        reply.ok()

    def resize(self, reply: Reply, args: protocol.ProcessResize) -> None:
        """``process.resize``: a new pty size."""
        self._tell(self._find(args, exited=False), Resize(args.pty, reply))

    # -- spawning ------------------------------------------------------------------------------

    def _environment(self, account: Account, request_env: dict[str, str]) -> dict[str, str]:
        env = self._accounts.environment(account)
        env.update(self._sandbox_env)
        env.update(request_env)
        return env

    def _cwd(self, account: Account, cwd: str | None) -> str:
        path = self._accounts.resolve_path(account, cwd or "")
        if not os.path.isdir(path):
            if cwd:
                raise InvalidArgument(f"cwd '{path}' does not exist")
            return "/"  # the user has no home here; E2B's templates always have one
        return path

    def spawn(
        self, record: ProcessRecord, account: Account
    ) -> tuple[Child, trio.lowlevel.FdStream | None]:
        """Start the command of ``record`` as ``account``; its process and pty master."""
        args = record.request
        config = args.process
        if not config.cmd:
            raise InvalidArgument("cmd is empty")
        cwd = self._cwd(account, config.cwd)
        record.config = protocol.ProcessConfig(
            cmd=config.cmd, args=config.args, envs=config.envs, cwd=cwd
        )
        options: dict[str, Any] = {
            "env": self._environment(account, config.envs),
            "cwd": cwd,
            "start_new_session": True,
            **self._accounts.spawn_credentials(account),
        }
        argv = [config.cmd, *config.args]
        master: int | None = None
        try:
            if args.pty is not None:
                master, slave = os.openpty()
                try:
                    set_window_size(slave, args.pty)
                    options["preexec_fn"] = _make_controlling_tty
                    process = Child.spawn(argv, stdin=slave, stdout=slave, stderr=slave, **options)
                finally:
                    os.close(slave)
            else:
                process = Child.spawn(
                    argv, stdin=PIPE if args.stdin else NULL, stdout=PIPE, stderr=PIPE, **options
                )
        except OSError as exc:
            if master is not None:
                os.close(master)
            message = f"error starting process '{config.cmd}': {exc}"
            if isinstance(exc, PermissionError):
                raise PermissionDenied(message) from None
            if exc.errno == errno.EAGAIN:
                raise ResourceExhausted(message) from None
            raise InvalidArgument(message) from None
        self._running[process.pid] = record
        return process, (trio.lowlevel.FdStream(master) if master is not None else None)
