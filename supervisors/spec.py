"""Child specifications and supervisor flags, with OTP's meanings and defaults."""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from typing import Any

import msgspec

from actors import Actor

__all__ = [
    "BRUTAL",
    "INFINITY",
    "AutoShutdown",
    "Backoff",
    "ChildSpec",
    "Restart",
    "Strategy",
]


class Strategy(enum.Enum):
    """Which children restart when one dies."""

    ONE_FOR_ONE = "one_for_one"  #: only the dead child
    ONE_FOR_ALL = "one_for_all"  #: every child: the others are stopped, then all start
    REST_FOR_ONE = "rest_for_one"  #: the dead child and those started after it


class Restart(enum.Enum):
    """When a child is restarted (OTP restart types)."""

    PERMANENT = "permanent"  #: always
    TRANSIENT = "transient"  #: only after an abnormal exit (not normal or shutdown)
    TEMPORARY = "temporary"  #: never, not even when a sibling's death stopped it


class AutoShutdown(enum.Enum):
    """Whether the supervisor stops itself when significant children exit by themselves."""

    NEVER = "never"
    ANY_SIGNIFICANT = "any_significant"
    ALL_SIGNIFICANT = "all_significant"


INFINITY: float | None = None  #: shutdown: wait for the child forever (supervisors' default)
BRUTAL: float = 0.0  #: shutdown: kill at once, no ``terminate`` (OTP's brutal_kill)
WORKER_SHUTDOWN = 5.0  #: shutdown: workers' default timeout, as OTP's 5000 ms


class Backoff(msgspec.Struct, frozen=True):
    """Delay restarts exponentially: ``min * 2**(n-1)`` capped at ``max``, times a random
    factor in ``[1, 1 + jitter]``, where n counts restarts since the child last ran for
    ``reset_after`` seconds. Delayed restarts still count toward the restart intensity."""

    min: float = 0.1
    max: float = 10.0
    jitter: float = 0.2
    reset_after: float = 30.0

    def __post_init__(self) -> None:
        if self.min < 0 or self.max < self.min or self.jitter < 0 or self.reset_after < 0:
            raise ValueError(f"invalid backoff {self}")

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The delay before restart number ``attempt`` (1-based) of a run of failures."""
        base = min(self.max, self.min * 2.0 ** max(attempt - 1, 0))
        return base * (1.0 + self.jitter * rng.random())


class ChildSpec(msgspec.Struct, frozen=True):
    """How to start, restart and stop one child.

    ``start(*args)`` returns a new ``Actor`` for each incarnation (a class or a factory).
    ``shutdown`` is seconds to wait after the stop request before killing; ``INFINITY`` waits
    forever, ``BRUTAL`` (0) kills at once; by default 5 s for workers and forever for
    supervisors. ``significant`` children end their supervisor when ``auto_shutdown`` says so;
    it is invalid for permanent children.
    """

    id: str
    start: Callable[..., Actor[Any]]
    args: tuple[Any, ...] = ()
    restart: Restart = Restart.PERMANENT
    shutdown: float | str | None = "default"
    significant: bool = False
    backoff: Backoff | None = None

    def __post_init__(self) -> None:
        if not self.id or "/" in self.id:
            raise ValueError(f"invalid child id {self.id!r}")
        if self.significant and self.restart is Restart.PERMANENT:
            raise ValueError(f"child {self.id}: a permanent child cannot be significant")
        if isinstance(self.shutdown, str) and self.shutdown != "default":
            raise ValueError(f"child {self.id}: shutdown must be seconds, INFINITY or BRUTAL")
        if isinstance(self.shutdown, (int, float)) and self.shutdown < 0:
            raise ValueError(f"child {self.id}: shutdown must be >= 0")

    def shutdown_for(self, kind: str) -> float | None:
        """The effective shutdown timeout for a child of this ``kind``."""
        if self.shutdown == "default":
            return INFINITY if kind == "supervisor" else WORKER_SHUTDOWN
        assert not isinstance(self.shutdown, str)
        return self.shutdown
