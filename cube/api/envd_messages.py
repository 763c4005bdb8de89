"""envd's Connect messages in proto3 JSON (lowerCamelCase), as msgspec Structs (§3.2-§3.4).

Requests are decoded straight into these (unknown fields are ignored, as connect-go's JSON
codec does); responses are built from the guest protocol's results by the ``*_json``
functions. ``bytes`` fields are standard base64, enums travel by name.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec

from guest import protocol

__all__ = [
    "CloseStdinRequest",
    "ConnectRequest",
    "CreateWatcherRequest",
    "ListDirRequest",
    "MoveRequest",
    "PathRequest",
    "SendInputRequest",
    "SendSignalRequest",
    "StartRequest",
    "StreamInputRequest",
    "UpdateRequest",
    "WatcherRequest",
    "entry_json",
    "fs_event_json",
    "process_event",
]

UInt32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
PtyCells = Annotated[int, msgspec.Meta(ge=1, le=10000)]


class _In(msgspec.Struct, frozen=True, rename="camel"):
    """Base of request messages: camelCase keys, unknown keys ignored."""


class ProcessConfig(_In, frozen=True):
    cmd: Annotated[str, msgspec.Meta(min_length=1, max_length=65536)]
    args: list[str] = []
    envs: dict[str, str] = {}
    cwd: str | None = None


class PtySize(_In, frozen=True):
    cols: PtyCells
    rows: PtyCells


class Pty(_In, frozen=True):
    size: PtySize | None = None


class Selector(_In, frozen=True):
    pid: UInt32 | None = None
    tag: str | None = None

    def guest(self) -> dict[str, Any]:
        return {"pid": self.pid, "tag": self.tag}


class StartRequest(_In, frozen=True):
    process: ProcessConfig
    pty: Pty | None = None
    tag: str | None = None
    stdin: bool | None = None


class ConnectRequest(_In, frozen=True):
    process: Selector


class UpdateRequest(_In, frozen=True):
    process: Selector
    pty: Pty | None = None


class ProcessInput(_In, frozen=True):
    stdin: bytes | None = None
    pty: bytes | None = None


class SendInputRequest(_In, frozen=True):
    process: Selector
    input: ProcessInput


class SendSignalRequest(_In, frozen=True):
    process: Selector
    signal: str | int = "SIGNAL_UNSPECIFIED"


class CloseStdinRequest(_In, frozen=True):
    process: Selector


class StreamStart(_In, frozen=True):
    process: Selector


class StreamData(_In, frozen=True):
    input: ProcessInput


class StreamInputRequest(_In, frozen=True):
    start: StreamStart | None = None
    data: StreamData | None = None
    keepalive: dict[str, Any] | None = None


class PathRequest(_In, frozen=True):
    path: str


class ListDirRequest(_In, frozen=True):
    path: str
    depth: UInt32 = 0


class MoveRequest(_In, frozen=True):
    source: str
    destination: str


class CreateWatcherRequest(_In, frozen=True):
    path: str
    recursive: bool = False
    include_entry: bool = False
    allow_network_mounts: bool = False


class WatcherRequest(_In, frozen=True):
    watcher_id: str


# -- responses -----------------------------------------------------------------------------------


class _Out(msgspec.Struct, frozen=True, omit_defaults=True, rename="camel"):
    """Base of response messages."""


class EntryInfo(_Out, frozen=True):
    name: str
    type: str
    path: str
    size: int = 0
    mode: int = 0
    permissions: str = ""
    owner: str = ""
    group: str = ""
    modified_time: str | None = None
    symlink_target: str | None = None
    metadata: dict[str, str] = {}
    is_symlink: bool = False


def entry_json(entry: protocol.EntryInfo) -> EntryInfo:
    return EntryInfo(
        name=entry.name,
        type=entry.type.value if isinstance(entry.type, protocol.FileType) else str(entry.type),
        path=entry.path,
        size=entry.size,
        mode=entry.mode,
        permissions=entry.permissions,
        owner=entry.owner,
        group=entry.group,
        modified_time=entry.modified_time,
        symlink_target=entry.symlink_target,
        metadata=dict(entry.metadata),
        is_symlink=entry.is_symlink,
    )


class EntryResponse(_Out, frozen=True):
    entry: EntryInfo


class ListDirResponse(_Out, frozen=True, omit_defaults=False):
    entries: list[EntryInfo]


class FilesystemEvent(_Out, frozen=True):
    name: str
    type: str
    entry: EntryInfo | None = None


def fs_event_json(event: protocol.FsEvent) -> FilesystemEvent:
    return FilesystemEvent(
        name=event.name,
        type=event.type.value if isinstance(event.type, protocol.EventType) else str(event.type),
        entry=entry_json(event.entry) if event.entry is not None else None,
    )


class WatchStart(_Out, frozen=True):
    start: dict[str, Any]


class WatchEvent(_Out, frozen=True):
    filesystem: FilesystemEvent


class WatchKeepalive(_Out, frozen=True):
    keepalive: dict[str, Any]


class CreateWatcherResponse(_Out, frozen=True):
    watcher_id: str


class GetWatcherEventsResponse(_Out, frozen=True, omit_defaults=False):
    events: list[FilesystemEvent]


class OutConfig(_Out, frozen=True):
    cmd: str
    args: list[str] = []
    envs: dict[str, str] = {}
    cwd: str | None = None


class OutProcessInfo(_Out, frozen=True):
    config: OutConfig
    pid: int
    tag: str | None = None


class ListResponse(_Out, frozen=True, omit_defaults=False):
    processes: list[OutProcessInfo]


def list_json(result: protocol.ProcessList) -> ListResponse:
    return ListResponse(
        [
            OutProcessInfo(
                config=OutConfig(p.config.cmd, list(p.config.args), dict(p.config.envs), p.config.cwd),
                pid=p.pid,
                tag=p.tag,
            )
            for p in result.processes
        ]
    )


class _StartEvent(_Out, frozen=True):
    pid: int


class _DataEvent(_Out, frozen=True):
    stdout: bytes | None = None
    stderr: bytes | None = None
    pty: bytes | None = None


class _EndEvent(_Out, frozen=True, omit_defaults=False):
    exit_code: int
    exited: bool
    status: str
    error: str | None = None


class _ProcessEvent(_Out, frozen=True):
    start: _StartEvent | None = None
    data: _DataEvent | None = None
    end: _EndEvent | None = None
    keepalive: dict[str, Any] | None = None


class _EventMessage(_Out, frozen=True):
    event: _ProcessEvent


_ENCODER: Final = msgspec.json.Encoder()
PROCESS_KEEPALIVE: Final = b'{"event":{"keepalive":{}}}'
WATCH_KEEPALIVE: Final = b'{"keepalive":{}}'
WATCH_START: Final = b'{"start":{}}'


def process_event(ev: str, body: Any) -> bytes | None:
    """The JSON of one ``StartResponse``/``ConnectResponse`` for a guest stream event."""
    if ev == "data":
        event = _ProcessEvent(data=_DataEvent(body.stdout, body.stderr, body.pty))
    elif ev == "start":
        event = _ProcessEvent(start=_StartEvent(body.pid))
    elif ev == "end":
        event = _ProcessEvent(end=_EndEvent(body.exit_code, body.exited, body.status, body.error))
    else:
        return None
    return _ENCODER.encode(_EventMessage(event))


def encode(message: msgspec.Struct) -> bytes:
    return _ENCODER.encode(message)
