"""What the journal stores: the sandbox record, its lifecycle phases, and the legal transitions.

A ``SandboxRecord`` holds everything the E2B REST shapes show (``Sandbox``, ``ListedSandbox``,
``SandboxDetail``) and everything a restarted node needs to re-adopt or clean up the sandbox
(the driver's ``Instance``). It is stored as msgspec JSON, so adding a field with a default
needs no schema migration: old rows decode with the default, and an older cube reading a
newer row ignores what it does not know.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, Final, Literal

import msgspec

from ..drivers.base import Instance
from .errors import IllegalTransition, InvalidRecord

__all__ = [
    "LIVE",
    "TERMINAL",
    "TRANSITIONS",
    "Page",
    "Phase",
    "SandboxId",
    "SandboxRecord",
    "check_transition",
    "decode_record",
    "encode_record",
    "updatable_fields",
]


class Phase(enum.StrEnum):
    """Where a sandbox is in its life; the ``state`` of a record.

    E2B shows only ``running`` and ``paused``; the others are this node's own, kept so that
    a sandbox's end (and why) can be inspected and so that restarts know what to clean up.
    """

    STARTING = "starting"  # bound, its isolation or envd not confirmed yet
    RUNNING = "running"
    PAUSED = "paused"  # frozen, memory kept
    KILLED = "killed"  # ended on request
    CRASHED = "crashed"  # its root process died on its own; ``reason`` says how
    TIMED_OUT = "timed_out"  # ended at its deadline


LIVE: Final = frozenset({Phase.STARTING, Phase.RUNNING, Phase.PAUSED})
"""Phases in which the sandbox may still have processes on the host (re-adopt or clean up)."""

TERMINAL: Final = frozenset({Phase.KILLED, Phase.CRASHED, Phase.TIMED_OUT})
"""Phases a sandbox never leaves."""

TRANSITIONS: Final[Mapping[Phase, frozenset[Phase]]] = MappingProxyType(
    {
        Phase.STARTING: frozenset({Phase.RUNNING}) | TERMINAL,
        Phase.RUNNING: frozenset({Phase.PAUSED}) | TERMINAL,
        # A paused sandbox can time out too: its retention, not its run time, expires.
        Phase.PAUSED: frozenset({Phase.RUNNING}) | TERMINAL,
        Phase.KILLED: frozenset(),
        Phase.CRASHED: frozenset(),
        Phase.TIMED_OUT: frozenset(),
    }
)
"""``TRANSITIONS[a]`` is the set of phases a record in phase ``a`` may move to."""


def check_transition(id: str, current: Phase, requested: Phase) -> None:
    """Raise ``IllegalTransition`` unless ``current -> requested`` is in ``TRANSITIONS``.

    Staying in the same phase is illegal too: a second pause or kill is a caller's bug (or a
    409 at the API edge), not a no-op to hide.
    """
    if requested not in TRANSITIONS[current]:
        raise IllegalTransition(id, current.value, requested.value)


SandboxId = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9]{20}$")]
"""E2B's sandbox id: 20 characters of ``[a-z0-9]`` (its proxy and host routing need this)."""


class SandboxRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One sandbox as the journal knows it. Times are wall-clock seconds since the epoch."""

    id: SandboxId
    template: str  # E2B templateID
    driver: str  # the isolation driver that runs it: process, ns, qemu, jail, bhyve
    state: Phase = Phase.STARTING
    alias: str | None = None  # the template's alias, if it was created through one
    instance: Instance | None = None  # what re-adoption and cleanup need; None before start
    metadata: dict[str, str] = {}
    env_vars: dict[str, str] = {}
    allow_internet_access: bool = True
    network: dict[str, Any] = {}  # E2B's ``network`` object as given (allowOut, denyOut, ...)
    on_timeout: Literal["kill", "pause"] = "kill"
    auto_resume: bool = False
    user: str = "user"  # the default user of commands
    cpu_count: Annotated[int, msgspec.Meta(ge=1)] = 1
    memory_mb: Annotated[int, msgspec.Meta(ge=1)] = 512
    disk_mb: Annotated[int, msgspec.Meta(ge=1)] = 1024
    created_at: float = msgspec.field(default_factory=time.time)
    started_at: float = msgspec.field(default_factory=time.time)  # E2B startedAt; list order
    end_at: float | None = None  # the deadline (E2B endAt); None: no deadline
    updated_at: float = 0.0  # set by the journal on every write
    reason: str | None = None  # why it ended (crash text, "timeout", who killed it)
    envd_version: str | None = None
    envd_access_token: str | None = None
    traffic_access_token: str | None = None
    client_id: str | None = None  # E2B clientID (deprecated upstream, still required there)
    extra: dict[str, Any] = {}  # room for later features without a schema change


class Page(msgspec.Struct, frozen=True):
    """One page of a list: the records and, if more match, the token for the next page."""

    items: list[SandboxRecord]
    next_token: str | None = None


_FIXED: Final = frozenset({"id", "state", "created_at", "updated_at"})


def updatable_fields() -> frozenset[str]:
    """The fields ``update`` and ``transition`` may set (``state`` only through transition)."""
    return frozenset(SandboxRecord.__struct_fields__) - _FIXED


def check_field_names(fields: Mapping[str, Any]) -> None:
    """Raise ``InvalidRecord`` for a field that does not exist or may not be set directly."""
    allowed = updatable_fields()
    for name in fields:
        if name not in allowed:
            why = "use transition() to change state" if name == "state" else "not settable"
            if name not in SandboxRecord.__struct_fields__:
                why = "no such field"
            raise InvalidRecord(f"field {name!r}: {why}")


_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(SandboxRecord)


def encode_record(record: SandboxRecord) -> bytes:
    """The record's JSON form, as stored in the journal."""
    return _ENCODER.encode(record)


def decode_record(data: bytes | str) -> SandboxRecord:
    """A record from its JSON form, validated (id pattern, types, ranges).

    Raises ``InvalidRecord`` if it does not fit the schema.
    """
    try:
        return _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise InvalidRecord(str(exc)) from exc


def validated(record: SandboxRecord) -> tuple[SandboxRecord, bytes]:
    """The record after a round trip through its JSON form, and that JSON.

    Constructing a Struct checks no types or constraints; the round trip does, so nothing
    the schema forbids reaches the journal.
    """
    try:
        data = _ENCODER.encode(record)
    except (TypeError, ValueError) as exc:
        raise InvalidRecord(f"sandbox {record.id!r}: {exc}") from exc
    return decode_record(data), data
