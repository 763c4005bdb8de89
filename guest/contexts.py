"""Code contexts (the code interpreter): one `ContextActor` per context, under a supervisor.

A context is a persistent interpreter process (`guest.kernel`) with its own cwd, env and user.
``code.execute`` streams what the kernel sends (stdout, stderr, results, an error) to the
request and ends with the execution count, as E2B's code-interpreter server does (§5 of
docs/e2b-protocol.md). Cells queue in the actor's mailbox and run one at a time. A kernel that
dies crashes its actor and the DynamicSupervisor restarts it with a fresh kernel under the same
id (state lost, as after a Jupyter kernel restart); ``code.restart`` replaces the kernel on
request; an interrupt is SIGINT into the kernel's process group and leaves the context alive.
"""

import collections
import contextlib
import logging
import os
import shutil
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import msgspec
import trio

from actors import Actor, ActorCrashed, ActorRef, ActorStopped, ExitReason, Request
from guest import protocol
from guest.channel import Call, Handler, Reply
from guest.children import NULL, Child
from guest.processes import signal_tree
from guest.protocol import (
    ContextInfo,
    DeadlineExceeded,
    GuestError,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from guest.users import Account, Accounts
from supervisors import ChildNotFound, ChildStartFailed, start_dynamic_child, terminate_child

log = logging.getLogger("guest.contexts")

KERNEL_PATH = str(Path(__file__).with_name("kernel.py"))
BOOTSTRAP = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__cube_kernel__')"
LANGUAGES = {"python": "python", "python3": "python", "bash": "bash", "sh": "bash"}
# How long a kernel may take to say it is ready.
START_TIMEOUT = 30.0
# After an interrupt, how long the kernel gets to finish the cell before it is restarted.
INTERRUPT_GRACE = 2.0


class KernelMessage(msgspec.Struct, frozen=True):
    """One line from the kernel; ``body`` is passed on to the host untouched."""

    t: str
    body: msgspec.Raw = msgspec.Raw()


_KERNEL_DECODER = msgspec.json.Decoder(KernelMessage)
_ENCODER = msgspec.json.Encoder()


class KernelDied(Exception):
    """The kernel process ended (or closed its pipe) in the middle of a conversation."""


def normalise_language(language: str | None) -> str:
    """The canonical language name; InvalidArgument for one envd has no kernel for."""
    name = (language or "python").strip().lower()
    name = {"js": "javascript", "ts": "typescript"}.get(name, name)
    if name not in LANGUAGES:
        raise InvalidArgument(f"language {name!r} is not supported (python, bash)")
    return LANGUAGES[name]


class Kernel:
    """One running kernel process and the two pipes to it."""

    def __init__(
        self,
        process: Child,
        to_kernel: trio.lowlevel.FdStream,
        from_kernel: trio.lowlevel.FdStream,
    ) -> None:
        self.process = process
        self.pid = process.pid
        self._to = to_kernel
        self._from = from_kernel
        self._lines = protocol.LineBuffer(64 << 20)
        self._pending: collections.deque[bytes] = collections.deque()
        self.scratch: str | None = None  # a directory the kernel keeps files in

    @classmethod
    async def spawn(
        cls,
        python: str,
        language: str,
        cwd: str,
        env: dict[str, str],
        credentials: dict[str, object],
    ) -> "Kernel":
        """Start a kernel and wait until it is ready. Raises `Unavailable` if it is not."""
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        try:
            process = Child.spawn(
                [python, "-c", BOOTSTRAP, KERNEL_PATH, language, str(to_r), str(from_w)],
                stdin=NULL,
                stdout=NULL,
                stderr=None,  # the kernel's own complaints go to envd's log
                pass_fds=(to_r, from_w),
                cwd=cwd,
                env=env,
                start_new_session=True,
                **credentials,
            )
        except OSError as exc:
            os.close(to_w)
            os.close(from_r)
            raise Unavailable(f"cannot start a {language} kernel: {exc}") from None
        finally:
            os.close(to_r)  # the kernel has its copies
            os.close(from_w)
        kernel = cls(process, trio.lowlevel.FdStream(to_w), trio.lowlevel.FdStream(from_r))
        try:
            with trio.fail_after(START_TIMEOUT):
                ready = await kernel.receive()
            if ready.t != "ready":
                raise KernelDied(f"kernel said {ready.t!r} before ready")
            kernel.scratch = msgspec.json.decode(ready.body).get("scratch")
        except (KernelDied, trio.TooSlowError) as exc:
            await kernel.kill()
            raise Unavailable(f"the {language} kernel did not start: {exc}") from None
        return kernel

    async def send(self, message: dict[str, object]) -> None:
        """Send one request line to the kernel."""
        try:
            await self._to.send_all(_ENCODER.encode(message) + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise KernelDied("the kernel closed its input") from exc

    async def receive(self) -> KernelMessage:
        """The next message from the kernel. Raises `KernelDied` at its end."""
        while not self._pending:
            try:
                data = await self._from.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                raise KernelDied("the kernel's output ended")
            self._pending.extend(self._lines.feed(data))
        line = self._pending.popleft()
        try:
            return _KERNEL_DECODER.decode(line)
        except msgspec.DecodeError as exc:
            raise KernelDied(f"the kernel sent garbage: {exc}") from None

    def interrupt(self) -> None:
        """SIGINT into the kernel's process group: the running cell stops, the kernel lives."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGINT)

    async def kill(self, grace: float = 0.5) -> None:
        """Stop the kernel (politely first: end of input), kill what is left, reap it."""
        with trio.CancelScope(shield=True):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._to.aclose()  # an idle kernel exits at the end of its input
            with trio.move_on_after(grace):
                await self.process.wait()
            signal_tree(self.pid, signal.SIGKILL, alive=self.process.returncode is None)
            with trio.move_on_after(5):
                await self.process.wait()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._from.aclose()
            if self.scratch:
                shutil.rmtree(self.scratch, ignore_errors=True)


class ContextRecord:
    """What envd knows about one code context; survives its actor's restarts."""

    def __init__(
        self, language: str, cwd: str, env: dict[str, str], account: Account
    ) -> None:
        self.id = str(uuid.uuid4())
        self.language = language
        self.cwd = cwd
        self.env = env
        self.account = account
        self.ref: ActorRef[Any] | None = None
        self.kernel: Kernel | None = None  # the current incarnation's kernel
        self.running: Call | None = None  # the request whose cell is running now

    def info(self) -> ContextInfo:
        """This context as ``/contexts`` lists it."""
        return ContextInfo(id=self.id, language=self.language, cwd=self.cwd)

    def interrupt(self) -> None:
        """Interrupt the running cell, if any (a signal needs no queue)."""
        if self.kernel is not None:
            self.kernel.interrupt()


class RunCell(Request[Any], frozen=True):
    """Run one cell, streaming to ``call``; the reply is an ExecuteDone or a GuestError."""

    call: Any
    args: Any


class ReplaceKernel(Request[None], frozen=True):
    """Start a fresh kernel (state cleared, id kept)."""


class ContextActor(Actor[Any]):
    """One code context's kernel: started by ``init``, watched, and replaced when it dies.

    A kernel that dies by itself (the user's code killed the interpreter) crashes the actor,
    and the supervisor restarts it with a fresh kernel under the same id; an explicit
    ``code.restart`` replaces the kernel without counting as a crash.
    """

    background_tasks = True

    def __init__(self, service: "ContextService", record: ContextRecord) -> None:
        self._service = service
        self._record = record
        self._kernel: Kernel | None = None
        self._replacing = False

    async def init(self) -> None:
        await self._start_kernel()

    async def terminate(self, reason: ExitReason) -> None:
        await self._stop_kernel()

    async def _start_kernel(self) -> None:
        record = self._record
        kernel = await Kernel.spawn(
            self._service.python,
            record.language,
            record.cwd,
            record.env,
            self._service.accounts.spawn_credentials(record.account),
        )
        self._kernel = record.kernel = kernel
        self.ctx.start_soon(self._watch, kernel)

    async def _stop_kernel(self) -> None:
        kernel, self._kernel = self._kernel, None
        if self._record.kernel is kernel:
            self._record.kernel = None
        if kernel is not None:
            await kernel.kill()

    async def _watch(self, kernel: Kernel) -> None:
        try:
            await kernel.process.wait()
        finally:
            if kernel.process.returncode is None:
                signal_tree(kernel.pid, signal.SIGKILL)  # killed with the actor
        if kernel is self._kernel and not self._replacing:
            raise KernelDied(f"kernel {kernel.pid} exited with {kernel.process.returncode}")

    async def on_replace_kernel(self, msg: ReplaceKernel) -> None:
        self._replacing = True
        try:
            await self._stop_kernel()
            await self._start_kernel()
        finally:
            self._replacing = False

    async def on_run_cell(self, msg: RunCell) -> protocol.ExecuteDone | GuestError:
        # Expected failures (a timeout) are the reply, not a crash: the context goes on.
        call: Call = msg.call
        args: protocol.Execute = msg.args
        if call.closed:
            return protocol.ExecuteDone(execution_count=0)  # its request went away meanwhile
        kernel = self._kernel
        if kernel is None:
            return Unavailable(f"context {self._record.id} has no kernel")
        record = self._record
        record.running = call
        try:
            return await self._execute(kernel, call, args)
        except GuestError as exc:
            return exc
        finally:
            record.running = None

    async def _execute(
        self, kernel: Kernel, call: Call, args: protocol.Execute
    ) -> protocol.ExecuteDone:
        timeout = args.timeout_ms / 1000 if args.timeout_ms > 0 else float("inf")
        finished = False
        try:
            await kernel.send({"op": "execute", "code": args.code, "envs": args.envs or {}})
            with trio.move_on_after(timeout) as deadline:
                count = await _relay(kernel, call)
                finished = True
            if deadline.cancelled_caught:
                kernel.interrupt()
                with trio.move_on_after(INTERRUPT_GRACE):
                    await _relay(kernel, None)
                    finished = True
                raise DeadlineExceeded(f"execution exceeded {args.timeout_ms} ms")
            return protocol.ExecuteDone(execution_count=count)
        except KernelDied:
            finished = True
            await call.emit("error", unexpected_end())
            return protocol.ExecuteDone(execution_count=0)
        finally:
            if not finished:
                # Timed out twice, or the kernel stopped talking: kill it; the watcher's crash
                # makes the supervisor start a fresh one.
                signal_tree(kernel.pid, signal.SIGKILL)


def unexpected_end() -> protocol.ExecutionError:
    """The error reported when a kernel dies in the middle of a cell."""
    return protocol.ExecutionError(
        name="UnexpectedEndOfExecution",
        value="the kernel died during the execution; the context restarts it",
        traceback="",
    )


async def _relay(kernel: Kernel, call: Call | None) -> int:
    """Pass the kernel's messages to ``call`` (or drop them) until ``done``; its count."""
    while True:
        message = await kernel.receive()
        if message.t == "done":
            done = msgspec.json.decode(message.body if len(message.body) else b"{}")
            return int(done.get("execution_count", 0))
        if call is not None and message.t in ("stdout", "stderr", "result", "error"):
            await call.emit(message.t, message.body)


class ContextService:
    """Creates, lists, restarts and deletes code contexts, and runs code in them."""

    def __init__(
        self, accounts: Accounts, sandbox_env: dict[str, str], python: str = sys.executable
    ) -> None:
        self.accounts = accounts
        self.python = python
        self._sandbox_env = sandbox_env
        self.supervisor: ActorRef[Any] | None = None  # the DynamicSupervisor, once started
        self._contexts: dict[str, ContextRecord] = {}
        self._defaults: dict[str, str] = {}
        self._creating: dict[str, trio.Lock] = {}

    @property
    def handlers(self) -> dict[str, Handler]:
        """The ops this service answers."""
        return {
            "code.create": Handler(self.create),
            "code.list": Handler(self.list_contexts, inline=True),
            "code.restart": Handler(self.restart),
            "code.delete": Handler(self.delete),
            "code.interrupt": Handler(self.interrupt, inline=True),
            "code.execute": Handler(self.execute),
        }

    async def _create(
        self, language: str, cwd: str | None, envs: dict[str, str], user: str | None
    ) -> ContextRecord:
        account = self.accounts.resolve(user)
        directory = self.accounts.resolve_path(account, cwd or "")
        if not os.path.isdir(directory):
            if cwd:
                raise InvalidArgument(f"cwd '{directory}' does not exist")
            directory = "/"
        env = self.accounts.environment(account)
        env.update(self._sandbox_env)
        env.update(envs)
        record = ContextRecord(language, directory, env, account)
        assert self.supervisor is not None
        try:
            record.ref = await start_dynamic_child(
                self.supervisor, record, id=record.id, timeout=START_TIMEOUT + 5
            )
        except ChildStartFailed as exc:
            if isinstance(exc.cause, GuestError):
                raise exc.cause from None
            raise Unavailable(f"cannot start a {language} kernel: {exc.cause}") from None
        self._contexts[record.id] = record
        return record

    async def create(self, call: Call, args: protocol.ContextCreate) -> ContextInfo:
        """``code.create``: a new context with its own kernel."""
        language = normalise_language(args.language)
        record = await self._create(language, args.cwd, dict(args.envs), args.user)
        return record.info()

    def list_contexts(self, reply: Reply, args: protocol.Empty) -> None:
        """``code.list``: every context, the default ones included."""
        reply.ok(protocol.ContextList(contexts=[c.info() for c in self._contexts.values()]))

    def _get(self, context_id: str) -> ContextRecord:
        record = self._contexts.get(context_id)
        if record is None:
            raise NotFound(f"Context {context_id} not found")
        return record

    async def restart(self, call: Call, args: protocol.ContextId) -> None:
        """``code.restart``: a fresh kernel for the context (after the running cell)."""
        record = self._get(args.id)
        assert record.ref is not None
        await _ask(record, ReplaceKernel(), timeout=START_TIMEOUT + 5)

    async def delete(self, call: Call, args: protocol.ContextId) -> None:
        """``code.delete``: stop the context and forget it."""
        record = self._get(args.id)
        del self._contexts[args.id]
        for language, context_id in list(self._defaults.items()):
            if context_id == args.id:
                del self._defaults[language]
        record.interrupt()
        assert self.supervisor is not None
        with contextlib.suppress(ChildNotFound):
            await terminate_child(self.supervisor, record.id, timeout=30)

    def interrupt(self, reply: Reply, args: protocol.ContextId) -> None:
        """``code.interrupt``: stop the running cell; the context stays."""
        self._get(args.id).interrupt()
        reply.ok()

    async def _default(self, language: str) -> ContextRecord:
        """The default context of ``language``, created on first use."""
        lock = self._creating.setdefault(language, trio.Lock())
        async with lock:
            context_id = self._defaults.get(language)
            if context_id is not None and context_id in self._contexts:
                return self._contexts[context_id]
            record = await self._create(language, None, {}, None)
            self._defaults[language] = record.id
            return record

    async def execute(self, call: Call, args: protocol.Execute) -> protocol.ExecuteDone:
        """``code.execute``: run a cell in a context (by id, by language, or the default)."""
        if args.context_id is not None and args.language is not None:
            raise InvalidArgument("give either context_id or language, not both")
        if args.context_id is not None:
            record = self._get(args.context_id)
        else:
            record = await self._default(normalise_language(args.language))
        try:
            result = await _ask(record, RunCell(call, args))
        except ActorCrashed:
            # The kernel died under the cell; the supervisor is already starting a new one.
            await call.emit("error", unexpected_end())
            return protocol.ExecuteDone(execution_count=0)
        finally:
            if record.running is call:
                record.interrupt()  # the host went away: stop the cell, the context stays
        if isinstance(result, GuestError):
            raise result
        done: protocol.ExecuteDone = result
        return done


async def _ask(record: ContextRecord, message: Any, timeout: float | None = None) -> Any:
    assert record.ref is not None
    try:
        return await record.ref.call(message, timeout=timeout)
    except ActorStopped:
        raise Unavailable(f"context {record.id} is not running") from None
