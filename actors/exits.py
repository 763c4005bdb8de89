"""Exit reasons: why an actor incarnation ended, with OTP's notion of a *normal* exit."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["KILLED", "NORMAL", "ExitReason", "Failure", "Killed", "Normal", "Shutdown", "is_normal"]


class Normal(msgspec.Struct, frozen=True, tag=True):
    """The actor finished its work and stopped by itself."""

    def __str__(self) -> str:
        return "normal"


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    """The actor was asked to stop (by its supervisor, the system or itself)."""

    detail: str = ""

    def __str__(self) -> str:
        return f"shutdown({self.detail})" if self.detail else "shutdown"


class Killed(msgspec.Struct, frozen=True, tag=True):
    """The actor was cancelled without running ``terminate`` (brutal kill or shutdown timeout)."""

    def __str__(self) -> str:
        return "killed"


class Failure(msgspec.Struct, frozen=True, tag=True):
    """The actor crashed; ``error`` is the exception."""

    error: Any

    def __str__(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"


ExitReason = Normal | Shutdown | Killed | Failure

NORMAL = Normal()
KILLED = Killed()


def is_normal(reason: ExitReason) -> bool:
    """Whether a transient child exiting with this reason stays down (OTP: normal, shutdown)."""
    return type(reason) is Normal or type(reason) is Shutdown
