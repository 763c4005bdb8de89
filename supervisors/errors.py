"""Errors of supervision: the escalation reason, and the replies of the runtime API."""

from __future__ import annotations

from actors import ActorError, ReplyError

__all__ = [
    "AlreadyPresent",
    "AlreadyStarted",
    "ChildNotFound",
    "ChildRunning",
    "ChildStartFailed",
    "MaxChildren",
    "SupervisorError",
    "SupervisorGaveUp",
]


class SupervisorGaveUp(ActorError):
    """A supervisor saw more than ``intensity`` restarts within ``period`` and stopped.

    This is the supervisor's exit reason; its own supervisor counts it as a child crash.
    """

    def __init__(self, path: str, child: str, cause: object) -> None:
        super().__init__(f"{path} gave up after restarts of {child}: {cause}")
        self.path = path
        self.child = child
        self.cause = cause


class SupervisorError(ReplyError):
    """Base of the errors the runtime API (start_child, ...) replies with."""


class AlreadyStarted(SupervisorError):
    """A child with this id is already running."""


class AlreadyPresent(SupervisorError):
    """A child spec with this id exists (not running); use restart_child or delete_child."""


class ChildNotFound(SupervisorError, LookupError):
    """No child with this id."""


class ChildRunning(SupervisorError):
    """The child is running; terminate it first."""


class MaxChildren(SupervisorError):
    """The dynamic supervisor already has ``max_children`` children."""


class ChildStartFailed(SupervisorError):
    """The child's ``init`` raised; ``cause`` says why."""

    def __init__(self, child: str, cause: BaseException) -> None:
        super().__init__(f"child {child} failed to start: {type(cause).__name__}: {cause}")
        self.child = child
        self.cause = cause
