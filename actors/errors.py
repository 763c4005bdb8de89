"""The errors of the actor kernel: one type for each outcome a caller can act on."""

from __future__ import annotations

__all__ = [
    "ActorCrashed",
    "ActorError",
    "ActorStopped",
    "CallTimeout",
    "LinkedExit",
    "MailboxFull",
    "NoSuchActor",
    "ReplyError",
    "StartFailed",
    "UnknownMessage",
]


class ActorError(Exception):
    """Base class of every error the kernel raises to a caller."""


class CallTimeout(ActorError):
    """A call got no reply before its timeout; a reply that arrives later is dropped."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(f"call to {path} timed out after {timeout:g} s")
        self.path = path
        self.timeout = timeout


class ActorCrashed(ActorError):
    """The actor died while the call was queued or being handled (OTP's monitor semantics).

    ``cause`` is the exception that crashed it.
    """

    def __init__(self, path: str, cause: BaseException) -> None:
        super().__init__(f"{path} crashed: {type(cause).__name__}: {cause}")
        self.path = path
        self.cause = cause


class ActorStopped(ActorError):
    """The actor is not running and will not run again (OTP's ``noproc``)."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} is stopped")
        self.path = path


class MailboxFull(ActorError):
    """The mailbox was full and its overflow policy refused or evicted this message."""

    def __init__(self, path: str) -> None:
        super().__init__(f"mailbox of {path} is full")
        self.path = path


class NoSuchActor(ActorError, LookupError):
    """No actor has this path in the system."""


class StartFailed(ActorError):
    """An actor's ``init`` raised, so it never started; ``cause`` says why."""

    def __init__(self, path: str, cause: BaseException) -> None:
        super().__init__(f"{path} failed to start: {type(cause).__name__}: {cause}")
        self.path = path
        self.cause = cause


class LinkedExit(ActorError):
    """An actor was killed because an actor linked to it exited abnormally."""

    def __init__(self, path: str, reason: object) -> None:
        super().__init__(f"linked actor {path} exited: {reason}")
        self.path = path
        self.reason = reason


class ReplyError(Exception):
    """Base class for *declared* errors: raised by a handler, sent to the caller as the reply.

    These are validation errors as protocol (a missing file, a bad argument). The actor keeps
    running. Any other exception from a handler is a crash and goes to the supervisor.
    """


class UnknownMessage(ReplyError):
    """The actor has no handler for this message type."""
