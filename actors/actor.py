"""Actors: the stable reference, the cell that outlives restarts, and the two kinds of actor.

An ``ActorCell`` is the persistent part of an actor: its path, mailbox, counters, monitors
and links. Each start or restart runs one *incarnation* of it: a fresh ``Actor`` instance in a
task with its own cancel scope. ``ActorRef`` points at the cell, so a reference stays valid
across restarts and messages queued during a restart are kept (unless the actor says
otherwise with ``on_restart = "discard"``).
"""

from __future__ import annotations

import enum
import typing
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, TypeVar, overload

import trio

from .calls import Handshake, PendingCall, Request
from .errors import (
    ActorCrashed,
    ActorStopped,
    CallTimeout,
    LinkedExit,
    MailboxFull,
    ReplyError,
    StartFailed,
    UnknownMessage,
)
from .events import Crashed, Started, Starting, Stopped, Stopping, describe
from .exits import KILLED, NORMAL, ExitReason, Failure, Normal, Shutdown
from .mailbox import Mailbox, Overflow
from .signals import (
    ChildExited,
    Down,
    Exit,
    InjectCrash,
    Monitor,
    Query,
    Resume,
    StopRequest,
    Suspend,
)

if TYPE_CHECKING:
    from .system import ActorSystem

__all__ = [
    "DEFAULT_TIMEOUT",
    "Actor",
    "ActorCell",
    "ActorRef",
    "Context",
    "FunctionActor",
    "Inbox",
    "State",
]

DEFAULT_TIMEOUT = 5.0  # OTP's gen_server:call default
_BATCH = 64  # messages handled per wakeup before yielding to other tasks
_NOPROC = Shutdown("noproc")

M = TypeVar("M")
R = TypeVar("R")


class State(enum.Enum):
    """Where an actor is in its life; shown in ``system.tree()``."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"


class ActorRef(Generic[M]):
    """A stable handle to an actor: send it messages; valid across the actor's restarts."""

    __slots__ = ("_cell", "_mailbox")

    def __init__(self, cell: ActorCell) -> None:
        self._cell = cell
        self._mailbox = cell.mailbox

    @property
    def path(self) -> str:
        return self._cell.path

    @property
    def alive(self) -> bool:
        """True while the actor can still receive messages (running or about to restart)."""
        return not self._cell.mailbox.closed

    def __repr__(self) -> str:
        return f"<ActorRef {self._cell.path}>"

    @overload
    async def call(self, msg: Request[R], timeout: float | None = DEFAULT_TIMEOUT) -> R: ...
    @overload
    async def call(self, msg: M, timeout: float | None = DEFAULT_TIMEOUT) -> Any: ...

    async def call(self, msg: Any, timeout: float | None = DEFAULT_TIMEOUT) -> Any:
        """Send ``msg`` and wait for the handler's return value.

        Ends in exactly one of: the reply; the handler's ``ReplyError`` raised here;
        ``CallTimeout`` after ``timeout`` seconds (None waits forever); ``ActorCrashed`` if
        the actor died with the call queued or in progress; ``ActorStopped`` if it is not
        running and will not run again; ``MailboxFull`` if the overflow policy refused it.
        Cancelling the caller abandons the call; its reply, if any, is dropped.
        """
        cell = self._cell
        mailbox = cell.mailbox
        await trio.lowlevel.checkpoint_if_cancelled()
        if mailbox.closed:
            raise ActorStopped(cell.path)
        pending = PendingCall(msg, cell.path, timeout)
        if not mailbox.put_nowait(pending):
            await self._enqueue_slowly(pending, timeout)
        elif timeout is not None:
            cell.system.timers.arm(pending, timeout)
        return await pending.wait()

    async def _enqueue_slowly(self, pending: PendingCall, timeout: float | None) -> None:
        """Queue a call into a full mailbox; the wait for room counts against the timeout."""
        cell = self._cell
        mailbox = cell.mailbox
        if mailbox.closed:
            raise ActorStopped(cell.path)
        if mailbox.overflow is not Overflow.BLOCK:
            raise MailboxFull(cell.path)
        deadline = trio.current_time() + timeout if timeout is not None else float("inf")
        with trio.move_on_at(deadline) as scope:
            queued = await mailbox.put(pending)
        if scope.cancelled_caught:
            raise CallTimeout(cell.path, timeout or 0.0)
        if not queued:
            raise ActorStopped(cell.path)
        if timeout is not None:
            cell.system.timers.arm(pending, max(deadline - trio.current_time(), 0.0))

    async def cast(self, msg: M) -> None:
        """Send ``msg`` without waiting for it to be handled; waits for room when the mailbox is
        full (BLOCK), raises ``MailboxFull`` (FAIL), or drops (DROP_*). A checkpoint.

        Casting to a stopped actor does nothing, as in OTP.
        """
        await self._cell.mailbox.put(msg)

    def try_cast(self, msg: M) -> bool:
        """Send ``msg`` if there is room now; never blocks and is not a checkpoint.

        Returns False if it was not queued. A loop of ``try_cast`` must await something
        eventually, or the receiver never runs.
        """
        mailbox = self._mailbox
        user = mailbox.user
        if len(user) < mailbox.capacity and not mailbox._senders and not mailbox.closed:
            user.append(msg)  # Mailbox.put_nowait's fast path, one call less
            used = len(user)
            if used > mailbox.peak:
                mailbox.peak = used
            task = mailbox._receiver
            if task is not None:
                mailbox._receiver = None
                trio.lowlevel.reschedule(task)
            return True
        return mailbox.put_nowait(msg)

    def cast_nowait(self, msg: M) -> None:
        """Like ``try_cast`` but raises ``MailboxFull`` (or ``ActorStopped``) when not queued."""
        cell = self._cell
        if not cell.mailbox.put_nowait(msg):
            if cell.mailbox.closed:
                raise ActorStopped(cell.path)
            raise MailboxFull(cell.path)

    def notify(self, msg: Any) -> None:
        """Deliver a control notice on the system lane: never blocks, never dropped.

        For small, rare notices (a process exit, a timer); the actor handles it with the
        handler for its type, ahead of queued user messages.
        """
        if not self._cell.mailbox.closed:
            self._cell.mailbox.put_system(msg)

    async def query(self, fn: Callable[[Any], R], timeout: float | None = DEFAULT_TIMEOUT) -> R:
        """Run ``fn(actor)`` inside the actor, between messages, and return its result.

        Travels on the system lane, so it works even when the mailbox is full.
        """
        cell = self._cell
        await trio.lowlevel.checkpoint_if_cancelled()
        if cell.mailbox.closed:
            raise ActorStopped(cell.path)
        pending = PendingCall(None, cell.path, timeout)
        cell.mailbox.put_system(Query(fn, pending))
        if timeout is not None:
            cell.system.timers.arm(pending, timeout)
        result: R = await pending.wait()
        return result

    async def stop(self, reason: ExitReason | None = None, timeout: float | None = 5.0) -> None:
        """Ask the actor to stop (``terminate`` runs) and wait for it; kill after ``timeout``.

        For an actor under a supervisor prefer the supervisor's ``terminate_child``: a
        permanent child stopped this way is restarted.
        """
        await self._cell.shutdown(reason or Shutdown(), timeout)


class ActorCell:
    """The persistent part of an actor, and the ``ctx`` an actor uses to act on the system."""

    __slots__ = (
        "_exited",
        "_kill_reason",
        "actor",
        "body_scope",
        "children",
        "current_call",
        "exit_reason",
        "handed",
        "handled",
        "incarnation",
        "kind",
        "last_failure",
        "links",
        "mailbox",
        "monitors",
        "name",
        "nursery",
        "on_restart",
        "parent",
        "path",
        "ref",
        "restarts",
        "scope",
        "started",
        "started_at",
        "state",
        "suspended",
        "system",
        "trap_exits",
        "watching",
    )

    def __init__(
        self,
        system: ActorSystem,
        name: str,
        parent: ActorCell | None,
        *,
        capacity: int = 64,
        overflow: Overflow = Overflow.BLOCK,
        kind: str = "worker",
    ) -> None:
        if not name or "/" in name:
            raise ValueError(f"invalid actor name {name!r}")
        self.system = system
        self.name = name
        self.parent = parent
        self.path: str = f"{parent.path if parent else ''}/{name}"
        self.kind = kind
        self.mailbox = Mailbox(capacity, overflow, self.path)
        self.mailbox.on_overflow = system._mailbox_overflowed
        self.ref: ActorRef[Any] = ActorRef(self)
        self.children: dict[str, ActorCell] | None = None
        self.state = State.STARTING
        self.actor: Actor[Any] | None = None
        self.incarnation = 0
        self.restarts = 0
        self.handled = 0
        self.started_at = 0.0
        self.started = False
        self.last_failure: tuple[str, float] | None = None
        self.exit_reason: ExitReason | None = None
        self.scope: trio.CancelScope | None = None
        self.body_scope: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None
        self.current_call: PendingCall | None = None
        self.handed: list[PendingCall] | None = None
        self.monitors: list[Monitor] | None = None  # monitors others hold on us
        self.watching: list[Monitor] | None = None  # monitors we hold on others
        self.links: set[ActorCell] | None = None
        self.trap_exits = False
        self.suspended = False
        self.on_restart: str = "keep"
        self._exited: trio.Event | None = None
        self._kill_reason: ExitReason | None = None

    def __repr__(self) -> str:
        return f"<ActorCell {self.path} {self.state.value}>"

    # -- the public context API ----------------------------------------------------------

    @property
    def self(self) -> ActorRef[Any]:
        """This actor's own reference."""
        return self.ref

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run a background task that lives as long as this incarnation.

        Needs ``background_tasks = True`` on the actor class. If the task raises, the actor
        crashes.
        """
        if self.nursery is None:
            raise RuntimeError(f"{type(self.actor).__name__} needs background_tasks = True")
        self.nursery.start_soon(fn, *args)

    def stop(self, reason: ExitReason = NORMAL) -> None:
        """Stop this actor after the current message; ``terminate(reason)`` runs."""
        self.request_stop(reason)

    def defer_reply(self) -> PendingCall:
        """Take over the reply to the call being handled (OTP's ``noreply``).

        The handler's return value is then ignored; answer later with ``reply(value)`` or
        ``fail(error)`` on the returned object, from this actor or a task it owns. If this
        incarnation ends first, the caller gets ``ActorCrashed`` or ``ActorStopped``.
        """
        call = self.current_call
        if call is None:
            raise RuntimeError("defer_reply() is only valid while handling a call")
        self.current_call = None
        self._track(call)
        return call

    def monitor(self, ref: ActorRef[Any]) -> Monitor:
        """Watch ``ref``: a ``Down`` arrives on this actor's system lane when its current
        incarnation ends (immediately, with reason ``shutdown(noproc)``, if it is stopped)."""
        target = ref._cell
        token = Monitor(self, target)
        if target.mailbox.closed:
            self.mailbox.put_system(Down(ref, _NOPROC, token))
        else:
            if target.monitors is None:
                target.monitors = []
            target.monitors.append(token)
            if self.watching is None:
                self.watching = []
            self.watching.append(token)
        return token

    def demonitor(self, token: Monitor) -> None:
        """Cancel a monitor; a ``Down`` already queued is not withdrawn."""
        monitors = token.target.monitors
        if monitors and token in monitors:
            monitors.remove(token)
        watching = self.watching
        if watching and token in watching:
            watching.remove(token)

    def link(self, ref: ActorRef[Any]) -> None:
        """Link this actor and ``ref``: when one ends abnormally the other is killed, unless it
        traps exits, in which case it receives ``Exit``. Raises ActorStopped if ``ref`` is."""
        other = ref._cell
        if other.mailbox.closed:
            raise ActorStopped(other.path)
        if self.links is None:
            self.links = set()
        if other.links is None:
            other.links = set()
        self.links.add(other)
        other.links.add(self)

    def unlink(self, ref: ActorRef[Any]) -> None:
        other = ref._cell
        if self.links:
            self.links.discard(other)
        if other.links:
            other.links.discard(self)

    # -- lifecycle, used by the system and by supervisors --------------------------------

    def adopt(self, child: ActorCell) -> None:
        if self.children is None:
            self.children = {}
        self.children[child.name] = child

    def forget(self, child: ActorCell) -> None:
        if self.children and self.children.get(child.name) is child:
            del self.children[child.name]

    @property
    def running(self) -> bool:
        return self.scope is not None

    def request_stop(self, reason: ExitReason) -> None:
        """Ask the current incarnation to stop with ``reason`` (terminate runs)."""
        if self.scope is None:
            return
        if self.state is State.RUNNING:
            self.state = State.STOPPING
            self.system.events.publish(Stopping(self.path, trio.current_time(), str(reason)))
        if self.body_scope is not None:
            self._kill_reason = reason  # function actors: the body is cancelled
            self.body_scope.cancel()
        else:
            self.mailbox.put_system(StopRequest(reason))

    def kill(self, reason: ExitReason = KILLED) -> None:
        """Cancel the current incarnation; ``terminate`` does not run."""
        if self.scope is not None:
            if self._kill_reason is None:
                self._kill_reason = reason
            self.scope.cancel()

    async def wait_exited(self) -> None:
        """Wait until the current incarnation (if any) has ended and been reported."""
        if self.scope is None:
            await trio.lowlevel.checkpoint()
            return
        if self._exited is None:
            self._exited = trio.Event()
        await self._exited.wait()

    async def shutdown(self, reason: ExitReason, timeout: float | None) -> None:
        """The shutdown ladder: stop request, wait ``timeout`` (None = forever), kill, wait.

        ``timeout=0`` kills at once (OTP's brutal_kill). If the actor does not end after being
        cancelled (it is stuck in synchronous code) a ``HandlerStuck`` event is published
        every second while waiting.
        """
        if self.scope is None:
            await trio.lowlevel.checkpoint()
            return
        if timeout == 0:
            self.kill()
        else:
            self.request_stop(reason)
            with trio.move_on_after(timeout if timeout is not None else float("inf")):
                await self.wait_exited()
                return
            self.kill()
        await self.system._wait_killed(self)

    def retire(self) -> None:
        """Refuse messages and end queued calls while not running (a later start reopens)."""
        reason = self.exit_reason
        self.state = State.STOPPED
        if type(reason) is Failure:
            cause = reason.error
            self.mailbox.close(lambda: ActorCrashed(self.path, cause))
        else:
            self.mailbox.close(None)

    def reopen(self) -> None:
        """Accept messages again, before a retired actor is started anew."""
        self.mailbox.closed = False

    def close(self) -> None:
        """Mark the actor and its descendants stopped for good, and unregister them."""
        self.retire()
        if self.children:
            for child in list(self.children.values()):
                child.close()
        self.system._unregister(self)

    async def start_in(self, nursery: trio.Nursery, actor: Actor[Any]) -> ActorRef[Any]:
        """Start an incarnation with ``actor`` in ``nursery``; return once its init is done.

        Like ``nursery.start(self.run, actor)`` without trio's temporary nursery (about 8 us
        less per start). Raises ``StartFailed`` if init raises; the child task then ends
        quietly instead of raising into ``nursery``.
        """
        handshake = Handshake(self.kill)
        nursery.start_soon(self.run, actor, handshake)
        ref: ActorRef[Any] = await handshake.wait()
        return ref

    async def run(
        self,
        actor: Actor[Any],
        handshake: Handshake | None = None,
        *,
        task_status: trio.TaskStatus[ActorRef[Any]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run one incarnation of this cell with ``actor``; for ``nursery.start``.

        Returns the ref once ``actor.init()`` has completed. If init raises, this raises
        ``StartFailed`` out of ``nursery.start``. Once started it never raises (except
        cancellation from outside): the exit is reported to monitors, links and the parent.
        """
        actor.ctx = self
        self.actor = actor
        self.incarnation += 1
        self.trap_exits = actor.trap_exits
        self.state = State.STARTING if self.restarts == 0 else State.RESTARTING
        self.started = False
        self.exit_reason = None
        self._kill_reason = None
        self.system.events.publish(Starting(self.path, trio.current_time()))
        reason: ExitReason = KILLED
        start_error: BaseException | None = None
        # whatever reports "started" keeps trio's temporary start nursery (about 1 KB) alive:
        # hand it over in a box that _live empties once it has been used
        status: list[Any] = [handshake if handshake is not None else task_status]
        del task_status
        scope = trio.CancelScope()
        self.scope = scope
        try:
            with scope:
                try:
                    if actor.background_tasks:
                        async with trio.open_nursery() as nursery:
                            self.nursery = nursery
                            reason = await self._live(actor, status)
                            nursery.cancel_scope.cancel()
                    else:
                        reason = await self._live(actor, status)
                except Exception as exc:
                    error = _unwrap(exc)
                    if not self.started:
                        start_error = error
                    else:
                        reason = Failure(error)
                        await self._terminate(actor, reason)
            if scope.cancelled_caught:
                reason = self._kill_reason or KILLED
        finally:
            self.scope = None
            self.nursery = None
            self.body_scope = None
            self.actor = None
            self._exit(reason if start_error is None else Failure(start_error), self.started)
        if not self.started:
            cause = start_error or RuntimeError(f"ended during init: {reason}")
            if handshake is not None:
                handshake.failed(StartFailed(self.path, cause))
                return
            raise StartFailed(self.path, cause)

    async def _live(self, actor: Actor[Any], status: list[Any]) -> ExitReason:
        await actor.init()
        self.state = State.RUNNING
        self.started = True
        now = trio.current_time()
        self.started_at = now
        self.system.events.publish(Started(self.path, now))
        status.pop().started(self.ref)
        try:
            reason = await actor._main(self)
        except Exception as exc:
            reason = Failure(_unwrap(exc))
        await self._terminate(actor, reason)
        return reason

    async def _terminate(self, actor: Actor[Any], reason: ExitReason) -> None:
        if type(reason) is Failure:
            call = self.current_call
            if call is not None:
                self.current_call = None
                call.fail(ActorCrashed(self.path, reason.error))
        try:
            await actor.terminate(reason)
        except Exception as exc:  # the exit reason stays the original one
            self.system.log_failure(self.path, "terminate", exc)

    def _exit(self, reason: ExitReason, started: bool) -> None:
        """Report the end of an incarnation to everyone who must know.

        The parent hears of it through ``ChildExited`` only if the incarnation had started:
        a failed start is reported to the starter by ``StartFailed`` instead.
        """
        self.exit_reason = reason
        self.state = State.STOPPED
        calls = [self.current_call] if self.current_call is not None else []
        self.current_call = None
        if self.handed:
            calls += self.handed
            self.handed = None
        for call in calls:
            if type(reason) is Failure:
                call.fail(ActorCrashed(self.path, reason.error))
            else:
                call.fail(ActorStopped(self.path))
        now = trio.current_time()
        events = self.system.events
        if type(reason) is Failure:
            text = describe(reason.error)
            self.last_failure = (text, now)
            events.publish(Crashed(self.path, now, text))
        else:
            events.publish(Stopped(self.path, now, str(reason)))
        ref = self.ref
        monitors = self.monitors
        if monitors:
            self.monitors = None
            for token in monitors:
                watcher = token.watcher
                if watcher.watching and token in watcher.watching:
                    watcher.watching.remove(token)
                watcher.mailbox.put_system(Down(ref, reason, token))
        watching = self.watching
        if watching:  # our own monitors die with this incarnation, as in Erlang
            self.watching = None
            for token in watching:
                theirs = token.target.monitors
                if theirs and token in theirs:
                    theirs.remove(token)
        links = self.links
        if links:
            self.links = None
            for other in links:
                if other.links:
                    other.links.discard(self)
                if other.trap_exits:
                    other.mailbox.put_system(Exit(ref, reason))
                elif type(reason) is not Normal:
                    other.kill(Failure(LinkedExit(self.path, reason)))
        exited = self._exited
        if exited is not None:
            self._exited = None
            exited.set()
        parent = self.parent
        if parent is not None and parent.actor is not None and parent.actor.supervises:
            if started:
                parent.mailbox.put_system(ChildExited(ref, reason, self.incarnation))
        else:
            self.close()

    # -- the receiving side, for function actors -----------------------------------------

    def _track(self, call: PendingCall) -> None:
        """Remember a call handed to a function actor's body, to end it if the actor dies."""
        handed = self.handed
        if handed is None:
            handed = self.handed = []
        elif len(handed) > 32:
            handed[:] = [c for c in handed if not c.done]
        handed.append(call)

    async def receive(self) -> Any:
        """Wait for the next message: a system notice (``Down``, ``Exit``, ...) or a user
        message; a call arrives as a ``PendingCall`` to answer with ``reply``/``fail``."""
        mailbox = self.mailbox
        while True:
            if mailbox.system:
                msg = mailbox.take_system()
                if type(msg) is StopRequest:
                    self._kill_reason = msg.reason
                    if self.body_scope is not None:
                        self.body_scope.cancel()
                    await trio.lowlevel.checkpoint()
                    continue
                if not _handle_control(self, msg):
                    return msg
                continue
            if mailbox.user and not self.suspended:
                self.handled += 1
                item = mailbox.take()
                if type(item) is PendingCall:
                    self._track(item)
                return item
            await mailbox.wait(not self.suspended)


def _handle_control(cell: ActorCell, msg: Any) -> bool:
    """Handle a kernel control message in place; False if ``msg`` is for the actor."""
    kind = type(msg)
    if kind is Query:
        try:
            msg.call.reply(msg.fn(cell.actor))
        except Exception as exc:
            msg.call.fail(exc)
        return True
    if kind is Suspend:
        cell.suspended = True
        return True
    if kind is Resume:
        cell.suspended = False
        return True
    if kind is InjectCrash:
        raise msg.error
    return False


def _unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


Handler = Callable[[Any, Any], Awaitable[Any]]


class Actor(Generic[M]):
    """A class actor, gen_server style.

    Subclass it, override ``init`` and ``terminate`` if needed, and write one ``async def
    on_<anything>(self, msg: SomeType)`` per message type: the annotation picks the handler.
    A handler's return value is the reply to a ``call``. Raise a ``ReplyError`` to answer a
    call with an error and keep running; any other exception crashes the actor.

    Class attributes set the actor's options: ``mailbox_size`` (64), ``overflow``
    (``Overflow.BLOCK``), ``trap_exits`` (False), ``on_restart`` ("keep": messages queued
    across a restart are handled by the next incarnation; "discard": queued calls fail with
    ``ActorCrashed`` and casts are dropped), ``background_tasks`` (False; True gives
    ``ctx.start_soon``).
    """

    mailbox_size: ClassVar[int] = 64
    overflow: ClassVar[Overflow] = Overflow.BLOCK
    trap_exits: ClassVar[bool] = False
    on_restart: ClassVar[Literal["keep", "discard"]] = "keep"
    background_tasks: ClassVar[bool] = False
    supervises: ClassVar[bool] = False
    kind: ClassVar[str] = "worker"

    ctx: ActorCell
    _handlers: ClassVar[dict[type, Handler] | None] = None

    async def init(self) -> None:
        """Prepare the actor; the next sibling starts only after this returns."""

    async def terminate(self, reason: ExitReason) -> None:
        """Clean up; runs on a stop request and after a crash, not when the actor is killed."""

    async def handle_info(self, msg: Any) -> None:
        """Called for a cast or notice with no handler; ignores it by default."""

    @classmethod
    def _table(cls) -> dict[type, Handler]:
        table = cls.__dict__.get("_handlers")
        if table is None:
            table = _build_handler_table(cls)
            cls._handlers = table
        return table

    def _lookup(self, kind: type) -> Handler | None:
        table = type(self)._table()
        for base in kind.__mro__[1:]:
            handler = table.get(base)
            if handler is not None:
                table[kind] = handler
                return handler
        return None

    async def _main(self, cell: ActorCell) -> ExitReason:
        """The gen_server loop: system lane first, then up to ``_BATCH`` user messages."""
        mailbox = cell.mailbox
        system = mailbox.system
        user = mailbox.user
        table = type(self)._table()
        budget = _BATCH
        while True:
            if system:
                msg = system.pop(0)
                kind = type(msg)
                if kind is StopRequest:
                    return msg.reason  # type: ignore[no-any-return]
                if not _handle_control(cell, msg):
                    if kind is Exit and not cell.trap_exits:
                        continue
                    handler = table.get(kind) or self._lookup(kind)
                    if handler is not None:
                        await handler(self, msg)
                    elif kind is not Down and kind is not Exit and kind is not ChildExited:
                        await self.handle_info(msg)
                continue
            if user and not cell.suspended:
                item = mailbox.take() if mailbox._senders else user.popleft()
                kind = type(item)
                if kind is PendingCall:
                    msg = item.msg
                    handler = table.get(type(msg)) or self._lookup(type(msg))
                    if handler is None:
                        item.fail(UnknownMessage(f"{cell.path} has no handler for {type(msg).__name__}"))
                    else:
                        cell.current_call = item
                        try:
                            result = await handler(self, msg)
                        except ReplyError as exc:
                            item.fail(exc)
                        else:
                            if cell.current_call is item:  # not deferred with defer_reply()
                                item.reply(result)
                        cell.current_call = None
                else:
                    handler = table.get(kind) or self._lookup(kind)
                    if handler is None:
                        await self.handle_info(item)
                    else:
                        try:
                            await handler(self, item)
                        except ReplyError:
                            pass  # a declared error with no caller to tell
                cell.handled += 1
                budget -= 1
                if budget == 0:
                    budget = _BATCH
                    await trio.lowlevel.checkpoint()
                continue
            budget = _BATCH
            # mailbox.wait(), inlined: one coroutine frame (~0.4 KB) less per idle actor
            if mailbox._senders and not user:
                mailbox._admit()
            if (user and not cell.suspended) or system:
                await trio.lowlevel.checkpoint()
            else:
                mailbox.full_reported = False
                mailbox._receiver = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(mailbox.abort_wait)


Context = ActorCell


def _build_handler_table(cls: type) -> dict[type, Handler]:
    table: dict[type, Handler] = {}
    for klass in reversed(cls.__mro__):
        for name, fn in vars(klass).items():
            if not name.startswith("on_") or not callable(fn):
                continue
            try:
                hints = typing.get_type_hints(fn)
            except Exception as exc:
                raise TypeError(f"cannot resolve the annotations of {cls.__name__}.{name}: {exc}") from exc
            params = [p for p in hints if p != "return"]
            if not params:
                continue
            annotation = hints[params[0]]
            members = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
            for member in members:
                origin = typing.get_origin(member) or member
                if isinstance(origin, type):
                    table[origin] = fn
    return table


def _is_union(annotation: Any) -> bool:
    import types

    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


class Inbox:
    """The receiving end given to a function actor's body."""

    __slots__ = ("_cell",)

    def __init__(self, cell: ActorCell) -> None:
        self._cell = cell

    async def receive(self) -> Any:
        """The next message (see ``ActorCell.receive``)."""
        return await self._cell.receive()

    def __aiter__(self) -> Inbox:
        return self

    async def __anext__(self) -> Any:
        return await self._cell.receive()


Body = Callable[[ActorCell, Inbox], Awaitable[None]]


class FunctionActor(Actor[Any]):
    """An actor whose behaviour is one async function with its own loop.

    ``async def body(ctx, inbox)`` reads messages with ``await inbox.receive()`` (or ``async
    for``), answers calls with ``msg.reply(value)``, and may run background tasks with
    ``ctx.start_soon``. Returning ends the actor normally; raising crashes it. A stop request
    cancels the body, so cleanup belongs in ``finally`` blocks.
    """

    background_tasks = True
    kind = "function"

    def __init__(self, body: Body) -> None:
        self.body = body

    async def _main(self, cell: ActorCell) -> ExitReason:
        with trio.CancelScope() as scope:
            cell.body_scope = scope
            await self.body(cell, Inbox(cell))
            cell.body_scope = None
            return NORMAL
        cell.body_scope = None
        reason = cell._kill_reason or Shutdown()
        cell._kill_reason = None
        return reason
