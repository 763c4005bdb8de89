"""Messages of the system lane: stop requests, monitor and link notices, child exits."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from .calls import PendingCall
from .exits import ExitReason

if TYPE_CHECKING:
    from .actor import ActorRef

__all__ = ["ChildExited", "Down", "Exit", "Monitor"]


class Monitor:
    """A one-shot monitor: its ``Down`` is delivered once, when the watched incarnation ends."""

    __slots__ = ("target", "watcher")

    def __init__(self, watcher: Any, target: Any) -> None:
        self.watcher = watcher
        self.target = target


class Down(msgspec.Struct, frozen=True):
    """A monitored actor's incarnation ended with ``reason``."""

    ref: ActorRef[Any]
    reason: ExitReason
    monitor: Monitor


class Exit(msgspec.Struct, frozen=True):
    """A linked actor ended with ``reason`` (delivered only to actors that trap exits)."""

    ref: ActorRef[Any]
    reason: ExitReason


class ChildExited(msgspec.Struct, frozen=True):
    """Sent to a supervising actor when one of its children's incarnations ends."""

    ref: ActorRef[Any]
    reason: ExitReason
    incarnation: int


class StopRequest(msgspec.Struct, frozen=True):
    reason: ExitReason


class Query(msgspec.Struct, frozen=True):
    fn: Callable[[Any], Any]
    call: PendingCall


class Suspend(msgspec.Struct, frozen=True):
    pass


class Resume(msgspec.Struct, frozen=True):
    pass


class InjectCrash(msgspec.Struct, frozen=True):
    error: BaseException
