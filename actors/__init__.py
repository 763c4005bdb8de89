"""The actor kernel: supervised trio actors with OTP semantics, embeddable in any trio program.

    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        await ref.cast(Add(2))
        assert await ref.call(Get()) == 2

See docs/actors.md for the model; supervision lives in the ``supervisors`` package.
"""

from .actor import (
    DEFAULT_TIMEOUT,
    Actor,
    ActorCell,
    ActorRef,
    Context,
    FunctionActor,
    Inbox,
    State,
)
from .calls import PendingCall, Request
from .errors import (
    ActorCrashed,
    ActorError,
    ActorStopped,
    CallTimeout,
    LinkedExit,
    MailboxFull,
    NoSuchActor,
    ReplyError,
    StartFailed,
    UnknownMessage,
)
from .events import (
    Crashed,
    Event,
    EventBus,
    GaveUp,
    HandlerStuck,
    Lagged,
    Restarted,
    Restarting,
    Started,
    Starting,
    Stopped,
    Stopping,
)
from .events import MailboxFull as MailboxFullEvent
from .exits import KILLED, NORMAL, ExitReason, Failure, Killed, Normal, Shutdown, is_normal
from .mailbox import Mailbox, Overflow
from .signals import ChildExited, Down, Exit, Monitor
from .system import ActorInfo, ActorSystem, TreeSnapshot, open_actor_system

__all__ = [
    "DEFAULT_TIMEOUT",
    "KILLED",
    "NORMAL",
    "Actor",
    "ActorCell",
    "ActorCrashed",
    "ActorError",
    "ActorInfo",
    "ActorRef",
    "ActorStopped",
    "ActorSystem",
    "CallTimeout",
    "ChildExited",
    "Context",
    "Crashed",
    "Down",
    "Event",
    "EventBus",
    "Exit",
    "ExitReason",
    "Failure",
    "FunctionActor",
    "GaveUp",
    "HandlerStuck",
    "Inbox",
    "Killed",
    "Lagged",
    "LinkedExit",
    "Mailbox",
    "MailboxFull",
    "MailboxFullEvent",
    "Monitor",
    "NoSuchActor",
    "Normal",
    "Overflow",
    "PendingCall",
    "ReplyError",
    "Request",
    "Restarted",
    "Restarting",
    "Shutdown",
    "StartFailed",
    "Started",
    "Starting",
    "State",
    "Stopped",
    "Stopping",
    "TreeSnapshot",
    "UnknownMessage",
    "is_normal",
    "open_actor_system",
]
