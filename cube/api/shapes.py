"""The REST control API's bodies, field for field E2B's OpenAPI shapes (docs/e2b-protocol.md §2.2).

Request bodies are decoded (and validated) straight into these Structs; responses are built
from the journal's ``SandboxRecord`` by the ``*_from_record`` functions.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Final, Literal

import msgspec

from ..store import Phase, SandboxRecord

__all__ = [
    "CLIENT_ID",
    "ENVD_VERSION",
    "ConnectSandbox",
    "ListedSandbox",
    "NewSandbox",
    "PauseRequest",
    "RefreshRequest",
    "ResumeRequest",
    "Sandbox",
    "SandboxDetail",
    "SandboxMetric",
    "TimeoutRequest",
    "listed_from_record",
    "rfc3339",
    "sandbox_from_record",
]

ENVD_VERSION: Final = "0.6.4"
"""The envd version cube speaks: every SDK feature gate up to 0.6.4 (§3.9) is implemented."""

CLIENT_ID: Final = "cube"
"""E2B's deprecated ``clientID``: still required by the SDK's parser, any constant works."""

Seconds = Annotated[int, msgspec.Meta(ge=0)]
EnvMap = dict[Annotated[str, msgspec.Meta(min_length=1, max_length=256)], Annotated[str, msgspec.Meta(max_length=32768)]]
MetaMap = dict[Annotated[str, msgspec.Meta(max_length=256)], Annotated[str, msgspec.Meta(max_length=4096)]]


def rfc3339(seconds: float) -> str:
    """``2024-01-02T03:04:05.123Z`` for a unix time."""
    moment = dt.datetime.fromtimestamp(seconds, dt.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# -- requests -----------------------------------------------------------------------------------


class AutoResume(msgspec.Struct, frozen=True):
    enabled: bool = False


class VolumeMount(msgspec.Struct, frozen=True):
    name: str
    path: str


class NewSandbox(msgspec.Struct, frozen=True):
    """``NewSandbox`` (v1) and ``NewSandboxV2``: the body of create."""

    templateID: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    timeout: Seconds | None = None
    metadata: MetaMap | None = None
    envVars: EnvMap | None = None
    autoPause: bool | None = None
    autoPauseMemory: bool | None = None
    autoResume: AutoResume | None = None
    allow_internet_access: bool | None = None
    network: dict[str, Any] | None = None
    secure: bool | None = None
    mcp: dict[str, Any] | None = None
    iam: dict[str, Any] | None = None
    volumeMounts: list[VolumeMount] | None = None


class ConnectSandbox(msgspec.Struct, frozen=True):
    """The body of connect (v1 requires ``timeout``; v2 may leave it out)."""

    timeout: Seconds | None = None
    memory: bool | None = None


class TimeoutRequest(msgspec.Struct, frozen=True):
    timeout: Seconds


class PauseRequest(msgspec.Struct, frozen=True):
    memory: bool | None = None
    requireHealthyGuest: bool | None = None


class ResumeRequest(msgspec.Struct, frozen=True):
    timeout: Seconds | None = None
    autoPause: bool | None = None
    memory: bool | None = None


class RefreshRequest(msgspec.Struct, frozen=True):
    duration: Annotated[int, msgspec.Meta(ge=0, le=3600)] | None = None


# -- responses ----------------------------------------------------------------------------------


class Sandbox(msgspec.Struct, frozen=True, omit_defaults=True):
    """The body of create, connect and resume."""

    templateID: str
    sandboxID: str
    clientID: str
    envdVersion: str
    envdAccessToken: str | None = None
    trafficAccessToken: str | None = None
    domain: str | None = None
    alias: str | None = None


class Lifecycle(msgspec.Struct, frozen=True):
    autoResume: bool
    onTimeout: Literal["kill", "pause"]


class ListedSandbox(msgspec.Struct, frozen=True, omit_defaults=True):
    """One item of list."""

    templateID: str
    sandboxID: str
    clientID: str
    startedAt: str
    endAt: str
    cpuCount: int
    memoryMB: int
    diskSizeMB: int
    state: str
    envdVersion: str
    metadata: dict[str, str] = {}
    alias: str | None = None


class SandboxDetail(msgspec.Struct, frozen=True, omit_defaults=True):
    """The body of get info."""

    templateID: str
    sandboxID: str
    clientID: str
    startedAt: str
    endAt: str
    cpuCount: int
    memoryMB: int
    diskSizeMB: int
    state: str
    envdVersion: str
    metadata: dict[str, str] = {}
    alias: str | None = None
    envdAccessToken: str | None = None
    domain: str | None = None
    allowInternetAccess: bool | None = None
    network: dict[str, Any] | None = None
    lifecycle: Lifecycle | None = None


class SandboxMetric(msgspec.Struct, frozen=True):
    timestamp: str
    timestampUnix: int
    cpuCount: int
    cpuUsedPct: float
    memUsed: int
    memTotal: int
    memCache: int
    diskUsed: int
    diskTotal: int


class LogLine(msgspec.Struct, frozen=True):
    timestamp: str
    line: str


class LogEntry(msgspec.Struct, frozen=True):
    timestamp: str
    message: str
    level: str
    fields: dict[str, str] = {}


class SandboxLogs(msgspec.Struct, frozen=True):
    logs: list[LogLine]
    logEntries: list[LogEntry]


class SandboxLogsV2(msgspec.Struct, frozen=True):
    logs: list[LogEntry]


class SandboxesMetrics(msgspec.Struct, frozen=True):
    sandboxes: dict[str, SandboxMetric]


# -- from records -------------------------------------------------------------------------------


def _state(record: SandboxRecord) -> str:
    return "paused" if record.state == Phase.PAUSED else "running"


def _end(record: SandboxRecord) -> float:
    return record.end_at if record.end_at is not None else record.started_at


def sandbox_from_record(record: SandboxRecord) -> Sandbox:
    return Sandbox(
        templateID=record.template,
        sandboxID=record.id,
        clientID=record.client_id or CLIENT_ID,
        envdVersion=record.envd_version or ENVD_VERSION,
        envdAccessToken=record.envd_access_token,
        trafficAccessToken=record.traffic_access_token,
        alias=record.alias,
    )


def listed_from_record(record: SandboxRecord) -> ListedSandbox:
    return ListedSandbox(
        templateID=record.template,
        sandboxID=record.id,
        clientID=record.client_id or CLIENT_ID,
        startedAt=rfc3339(record.started_at),
        endAt=rfc3339(_end(record)),
        cpuCount=record.cpu_count,
        memoryMB=record.memory_mb,
        diskSizeMB=record.disk_mb,
        state=_state(record),
        envdVersion=record.envd_version or ENVD_VERSION,
        metadata=dict(record.metadata),
        alias=record.alias,
    )


def detail_from_record(record: SandboxRecord) -> SandboxDetail:
    return SandboxDetail(
        templateID=record.template,
        sandboxID=record.id,
        clientID=record.client_id or CLIENT_ID,
        startedAt=rfc3339(record.started_at),
        endAt=rfc3339(_end(record)),
        cpuCount=record.cpu_count,
        memoryMB=record.memory_mb,
        diskSizeMB=record.disk_mb,
        state=_state(record),
        envdVersion=record.envd_version or ENVD_VERSION,
        metadata=dict(record.metadata),
        alias=record.alias,
        envdAccessToken=record.envd_access_token,
        allowInternetAccess=record.allow_internet_access,
        network=dict(record.network) if record.network else None,
        lifecycle=Lifecycle(autoResume=record.auto_resume, onTimeout=record.on_timeout),
    )
