"""The host↔guest wire protocol: NDJSON frames multiplexed by request id over one byte stream.

Shared by `guest.envd` (inside the sandbox) and the host's GuestLink. It imports only msgspec and
the standard library, so the host can use it without trio or anything else from `guest`.

Frames, one JSON object per line (docs/guest.md walks through them one by one):

host → guest
    ``{"id": 7, "op": "process.start", "args": {...}}``   a request; ``args`` may be omitted
    ``{"id": 7, "op": "cancel"}``                          stop request 7
    ``{"id": 7, "op": "credit", "args": {"bytes": N}}``    let stream 7 send N more bytes
    ``{"id": 7, "op": "input", "args": {"data": "..", "eof": false}}``   input for stream 7
    ``{"id": 1, "op": "hello", "args": {"version": 1, "session": "..."}}``   (re)start a session
    ``{"op": "keepalive"}``                                ignored; keeps an idle line warm

guest → host
    ``{"id": 7, "ev": "start" | "data" | "end" | ..., "body": {...}}``   a stream event
    ``{"id": 7, "ok": {...}}``                             the final reply of request 7
    ``{"id": 7, "err": {"code": "not_found", "message": "..."}}``   the final error of request 7
    ``{"id": 7, "ev": "credit", "body": {"bytes": N}}``    the host may send N more input bytes
    ``{"id": 0, "ev": "hello" | "keepalive", "body": {...}}``   unsolicited, on the control id 0

Every request gets exactly one final ``ok`` or ``err``. ``bytes`` fields travel as standard
base64 (msgspec does this for every ``bytes`` field). Events and replies nest their payload under
one key so the receiver routes a frame by its ``id`` and decodes the payload lazily
(`msgspec.Raw`) with the decoder of the op it sent.
"""

import enum
import types
from collections.abc import Mapping
from typing import Any, ClassVar, Final, NamedTuple

import msgspec

PROTOCOL_VERSION: Final = 1

# One frame is one line; a longer line is discarded and answered with invalid_argument.
MAX_FRAME: Final = 4 << 20
# Per-stream flow-control window in bytes of encoded frames (guest → host) unless hello says.
DEFAULT_WINDOW: Final = 1 << 20
# Input bytes (host → guest) a stream may have in flight before the guest grants more credit.
DEFAULT_INPUT_WINDOW: Final = 1 << 20
# Payload size of one file chunk; with base64 a frame stays well under MAX_FRAME.
FILE_CHUNK: Final = 256 << 10
# The id of unsolicited frames (hello and keepalive from the guest, malformed-frame errors).
CONTROL_ID: Final = 0


# --------------------------------------------------------------------------------------------
# Errors


class ErrorCode(enum.StrEnum):
    """The error codes of a final ``err`` frame; the names and meanings of Connect's codes."""

    CANCELED = "canceled"
    UNKNOWN = "unknown"
    INVALID_ARGUMENT = "invalid_argument"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    NOT_FOUND = "not_found"
    ALREADY_EXISTS = "already_exists"
    PERMISSION_DENIED = "permission_denied"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    FAILED_PRECONDITION = "failed_precondition"
    ABORTED = "aborted"
    OUT_OF_RANGE = "out_of_range"
    UNIMPLEMENTED = "unimplemented"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    DATA_LOSS = "data_loss"
    UNAUTHENTICATED = "unauthenticated"


class GuestError(Exception):
    """An error the guest reports to the host as an ``err`` frame; one subclass per code.

    Handlers raise these for expected failures (a missing file, a bad argument); the session
    turns them into the final reply. On the host, `GuestError.from_wire` rebuilds the same type,
    so callers catch `NotFound` on either side of the wire.
    """

    code: ClassVar[ErrorCode] = ErrorCode.UNKNOWN

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> "ErrorBody":
        """The ``err`` payload for this error."""
        return ErrorBody(code=self.code, message=self.message)

    @staticmethod
    def from_wire(body: "ErrorBody") -> "GuestError":
        """The exception for a received ``err`` payload (unknown codes become `Unknown`)."""
        cls = _ERROR_TYPES.get(body.code, Unknown)
        return cls(body.message)


class Canceled(GuestError):
    """The request was cancelled by the host or its session ended."""

    code = ErrorCode.CANCELED


class Unknown(GuestError):
    """An error whose code the receiver does not know."""

    code = ErrorCode.UNKNOWN


class InvalidArgument(GuestError):
    """The request is malformed or names something of the wrong kind (a file, not a dir)."""

    code = ErrorCode.INVALID_ARGUMENT


class DeadlineExceeded(GuestError):
    """A deadline elapsed: a process outlived its timeout, an execution ran too long."""

    code = ErrorCode.DEADLINE_EXCEEDED


class NotFound(GuestError):
    """The path, process, context or watcher does not exist."""

    code = ErrorCode.NOT_FOUND


class AlreadyExists(GuestError):
    """The thing to create is already there."""

    code = ErrorCode.ALREADY_EXISTS


class PermissionDenied(GuestError):
    """The user (or envd itself) may not do this."""

    code = ErrorCode.PERMISSION_DENIED


class ResourceExhausted(GuestError):
    """A bound was hit: too many requests in flight, a full queue, a full disk."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class FailedPrecondition(GuestError):
    """The target is in the wrong state (stdin closed, not a pty)."""

    code = ErrorCode.FAILED_PRECONDITION


class Aborted(GuestError):
    """The operation was aborted by a concurrent one."""

    code = ErrorCode.ABORTED


class OutOfRange(GuestError):
    """An offset or size outside the valid range."""

    code = ErrorCode.OUT_OF_RANGE


class Unimplemented(GuestError):
    """The op (or an option of it) is not supported by this envd."""

    code = ErrorCode.UNIMPLEMENTED


class Internal(GuestError):
    """A bug or an unexpected failure inside envd."""

    code = ErrorCode.INTERNAL


class Unavailable(GuestError):
    """The guest (or the link to it) is not there right now; retrying may help."""

    code = ErrorCode.UNAVAILABLE


class DataLoss(GuestError):
    """Data was lost or corrupted."""

    code = ErrorCode.DATA_LOSS


class Unauthenticated(GuestError):
    """The requested user does not exist."""

    code = ErrorCode.UNAUTHENTICATED


_ERROR_TYPES: Final[Mapping[str, type[GuestError]]] = types.MappingProxyType(
    {cls.code.value: cls for cls in GuestError.__subclasses__()}
)


# --------------------------------------------------------------------------------------------
# Frames


class Message(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True):
    """Base of every payload: immutable, defaults left off the wire, keyword construction."""


class ErrorBody(Message, frozen=True):
    """The payload of an ``err`` frame."""

    code: str
    message: str = ""


class Request(Message, frozen=True):
    """A host → guest frame: a request, or a stream op (cancel, credit, input) on its id."""

    id: int = 0
    op: str = ""
    args: msgspec.Raw = msgspec.Raw()


class Frame(Message, frozen=True):
    """A guest → host frame as the host decodes it: exactly one of ev, ok, err is set."""

    id: int = 0
    ev: str | None = None
    body: msgspec.Raw = msgspec.Raw()
    ok: msgspec.Raw = msgspec.Raw()
    err: ErrorBody | None = None


class OutRequest(Message, frozen=True):
    """A host → guest request as the host encodes it (typed args)."""

    id: int
    op: str
    args: Any = None


class OutEvent(Message, frozen=True):
    """A guest → host stream event as the guest encodes it."""

    id: int
    ev: str
    body: Any = None


class OutOk(Message, omit_defaults=False, frozen=True):
    """A guest → host final success reply as the guest encodes it."""

    id: int
    ok: Any


class OutErr(Message, frozen=True):
    """A guest → host final error reply as the guest encodes it."""

    id: int
    err: ErrorBody


# --------------------------------------------------------------------------------------------
# Control payloads


class Empty(Message, frozen=True):
    """An empty payload: ``{}``."""


class Hello(Message, omit_defaults=False, frozen=True):
    """Args of ``hello``: the host (re)starts a session; a new ``session`` resets the old one.

    ``window`` is the per-stream credit the guest may use before the host grants more
    (0 turns flow control off: the host promises to read as fast as the guest writes).
    """

    version: int = PROTOCOL_VERSION
    session: str = ""
    window: int = DEFAULT_WINDOW


class HelloInfo(Message, omit_defaults=False, frozen=True):
    """The guest's side of a hello: sent unsolicited on connect and as the reply to ``hello``.

    ``boot`` changes whenever envd restarts; a host that sees a new boot id knows every process
    it knew about is gone. ``session`` echoes the host's nonce (empty when unsolicited).
    """

    version: int = PROTOCOL_VERSION
    session: str = ""
    boot: str = ""
    agent: str = ""
    pid: int = 0
    capabilities: list[str] = []
    input_window: int = DEFAULT_INPUT_WINDOW
    max_frame: int = MAX_FRAME
    user: str = ""
    home: str = ""


class Keepalive(Message, omit_defaults=False, frozen=True):
    """Body of the guest's idle ``keepalive`` event."""

    version: int = PROTOCOL_VERSION


class Credit(Message, frozen=True):
    """Args of ``credit`` (host → guest) and body of the ``credit`` event (guest → host)."""

    bytes: int


class Input(Message, frozen=True):
    """Args of ``input``: the next piece of a stream's input; ``eof`` ends it."""

    data: bytes = b""
    eof: bool = False


class Configure(Message, frozen=True):
    """Args of ``envd.configure``: sandbox-wide settings the host applies once at bind time."""

    envs: dict[str, str] | None = None
    default_user: str | None = None
    default_workdir: str | None = None


# --------------------------------------------------------------------------------------------
# Process service (mirrors E2B's process.Process, §3.3 of docs/e2b-protocol.md)


class ProcessConfig(Message, frozen=True):
    """What to run: an executable, its arguments, extra env vars and a working directory."""

    cmd: str
    args: list[str] = []
    envs: dict[str, str] = {}
    cwd: str | None = None


class PtySize(Message, frozen=True):
    """A terminal size in character cells."""

    cols: int
    rows: int


class ProcessStart(Message, frozen=True):
    """Args of ``process.start``: a stream of start, data*, end events, then ``ok {}``.

    ``stdin`` gives the process a pipe (true, the default as in E2B) or /dev/null.
    ``timeout_ms`` > 0 is the process's lifetime: envd kills it when it elapses and the stream
    ends with the end event followed by ``err deadline_exceeded``.
    """

    process: ProcessConfig
    pty: PtySize | None = None
    tag: str | None = None
    stdin: bool = True
    user: str | None = None
    timeout_ms: int = 0


class ProcessSelector(Message, frozen=True):
    """Args naming one process by pid or by tag (pid wins when both are given)."""

    pid: int | None = None
    tag: str | None = None


class ProcessConnect(ProcessSelector, frozen=True):
    """Args of ``process.connect``: re-attach to a running or recently exited process."""


class ProcessInput(ProcessSelector, frozen=True):
    """Args of ``process.input``: bytes for the process's stdin pipe or its pty."""

    stdin: bytes | None = None
    pty: bytes | None = None


class ProcessSignal(ProcessSelector, frozen=True):
    """Args of ``process.signal``: a number, or a name like ``SIGKILL`` / ``SIGNAL_SIGKILL``."""

    signal: int | str = 9


class ProcessResize(ProcessSelector, kw_only=True, frozen=True):
    """Args of ``process.resize``: a new pty size."""

    pty: PtySize


class ProcessCloseStdin(ProcessSelector, frozen=True):
    """Args of ``process.close_stdin``."""


class ProcessStarted(Message, frozen=True):
    """Body of the ``start`` event: always the first event of a process stream."""

    pid: int


class ProcessOutput(Message, frozen=True):
    """Body of the ``data`` event: exactly one of the three is set."""

    stdout: bytes | None = None
    stderr: bytes | None = None
    pty: bytes | None = None


class ProcessEnded(Message, omit_defaults=False, frozen=True):
    """Body of the ``end`` event, with E2B envd's values.

    ``exit_code`` is the exit status, or -1 when a signal killed the process; ``exited`` is true
    only for a normal exit; ``status`` is Go's ``ProcessState.String()`` (``exit status 3``,
    ``signal: killed``); ``error`` repeats it when the exit was not clean.
    """

    exit_code: int
    exited: bool
    status: str
    error: str | None = None


class ProcessInfo(Message, frozen=True):
    """One running process in ``process.list``."""

    config: ProcessConfig
    pid: int
    tag: str | None = None


class ProcessList(Message, omit_defaults=False, frozen=True):
    """Result of ``process.list``: the running processes."""

    processes: list[ProcessInfo]


# --------------------------------------------------------------------------------------------
# Filesystem service (mirrors E2B's filesystem.Filesystem, §3.4)


class FileType(enum.StrEnum):
    """The type of an entry; the names of E2B's FileType enum."""

    UNSPECIFIED = "FILE_TYPE_UNSPECIFIED"
    FILE = "FILE_TYPE_FILE"
    DIRECTORY = "FILE_TYPE_DIRECTORY"
    SYMLINK = "FILE_TYPE_SYMLINK"


class EventType(enum.StrEnum):
    """The kind of a filesystem watch event; the names of E2B's EventType enum."""

    CREATE = "EVENT_TYPE_CREATE"
    WRITE = "EVENT_TYPE_WRITE"
    REMOVE = "EVENT_TYPE_REMOVE"
    RENAME = "EVENT_TYPE_RENAME"
    CHMOD = "EVENT_TYPE_CHMOD"


class EntryInfo(Message, frozen=True):
    """One filesystem entry, field for field E2B's EntryInfo (snake_case, proto enum names).

    ``mode`` holds permission bits only; ``permissions`` is Go's ``FileMode.String()``;
    ``owner``/``group`` are names; ``modified_time`` is RFC 3339 in UTC. For a symlink,
    ``type`` and ``mode`` describe its target, ``symlink_target`` is the resolved path and
    ``is_symlink`` is true. ``metadata`` holds the ``user.e2b.*`` xattrs without the prefix.
    """

    name: str
    type: FileType
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


class PathArgs(Message, frozen=True):
    """Args naming one path, resolved against the user's home when relative."""

    path: str
    user: str | None = None


class FsStat(PathArgs, frozen=True):
    """Args of ``fs.stat`` → ``EntryResult``."""


class FsMakeDir(PathArgs, frozen=True):
    """Args of ``fs.make_dir`` (parents too; already_exists if it is a dir) → ``EntryResult``."""


class FsRemove(PathArgs, frozen=True):
    """Args of ``fs.remove``: remove-all; a missing path is not an error → ``{}``."""


class FsList(PathArgs, frozen=True):
    """Args of ``fs.list``: entries down to ``depth`` levels (0 means 1) → ``EntryList``."""

    depth: int = 1


class FsMove(Message, frozen=True):
    """Args of ``fs.move``: rename, creating the destination's parents → ``EntryResult``."""

    source: str
    destination: str
    user: str | None = None


class FsRead(PathArgs, frozen=True):
    """Args of ``fs.read``: a stream of ``start`` (EntryInfo), ``data`` chunks, then ``ReadDone``."""

    offset: int = 0
    length: int | None = None


class FsWrite(PathArgs, frozen=True):
    """Args of ``fs.write``: the content comes inline in ``data`` or as ``input`` frames.

    Without ``data``, the guest answers with ``credit`` events and the host sends ``input``
    frames until one has ``eof``. ``mode`` applies to a newly created file (default 0o644).
    ``metadata`` replaces the file's ``user.e2b.*`` xattrs. → ``EntryResult``.
    """

    data: bytes | None = None
    mode: int | None = None
    create_parents: bool = True
    append: bool = False
    metadata: dict[str, str] | None = None


class FsWatch(PathArgs, frozen=True):
    """Args of ``fs.watch`` (a stream) and ``fs.watcher.create`` (a polled watcher)."""

    recursive: bool = False
    include_entry: bool = False


class WatcherId(Message, frozen=True):
    """Args of ``fs.watcher.events`` / ``fs.watcher.remove``; result of ``fs.watcher.create``."""

    watcher_id: str


class EntryResult(Message, frozen=True):
    """Result holding one entry."""

    entry: EntryInfo


class EntryList(Message, omit_defaults=False, frozen=True):
    """Result of ``fs.list``."""

    entries: list[EntryInfo]


class FileChunk(Message, frozen=True):
    """Body of a ``data`` event of ``fs.read``."""

    data: bytes


class ReadDone(Message, omit_defaults=False, frozen=True):
    """Result of ``fs.read``: how many bytes were sent."""

    size: int


class FsEvent(Message, frozen=True):
    """Body of an ``event`` event of ``fs.watch``; ``name`` is relative to the watched dir."""

    name: str
    type: EventType
    entry: EntryInfo | None = None


class WatcherEvents(Message, omit_defaults=False, frozen=True):
    """Result of ``fs.watcher.events``: the events since the last poll."""

    events: list[FsEvent]


# --------------------------------------------------------------------------------------------
# Code contexts (the code interpreter, §5 of docs/e2b-protocol.md)


class ContextCreate(Message, frozen=True):
    """Args of ``code.create`` → ``ContextInfo``."""

    language: str = "python"
    cwd: str | None = None
    envs: dict[str, str] = {}
    user: str | None = None


class ContextInfo(Message, omit_defaults=False, frozen=True):
    """One code context, as E2B's ``/contexts`` returns it."""

    id: str
    language: str
    cwd: str


class ContextId(Message, frozen=True):
    """Args of ``code.restart``, ``code.delete`` and ``code.interrupt``."""

    id: str


class ContextList(Message, omit_defaults=False, frozen=True):
    """Result of ``code.list``."""

    contexts: list[ContextInfo]


class Execute(Message, frozen=True):
    """Args of ``code.execute``: stdout/stderr/result/error events, then ``ExecuteDone``.

    ``context_id`` and ``language`` are exclusive; neither means the default python context.
    ``envs`` apply to this execution only. ``timeout_ms`` > 0 interrupts the execution when it
    elapses and ends the request with ``err deadline_exceeded``.
    """

    code: str
    context_id: str | None = None
    language: str | None = None
    envs: dict[str, str] | None = None
    timeout_ms: int = 0


class OutputText(Message, frozen=True):
    """Body of the ``stdout`` / ``stderr`` events of an execution."""

    text: str
    timestamp: str


class ExecutionResult(Message, frozen=True):
    """Body of a ``result`` event: one display bundle mapped to E2B's result keys."""

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json: Any = None
    javascript: str | None = None
    data: Any = None
    chart: Any = None
    extra: dict[str, Any] | None = None
    is_main_result: bool = False


class ExecutionError(Message, frozen=True):
    """Body of the ``error`` event: the exception of a failed execution."""

    name: str
    value: str
    traceback: str


class ExecuteDone(Message, omit_defaults=False, frozen=True):
    """Result of ``code.execute``."""

    execution_count: int


# --------------------------------------------------------------------------------------------
# The op table


class OpSpec(NamedTuple):
    """What one op takes and gives: its args, its final result, its events, and input."""

    args: type[Message]
    result: type[Message]
    events: Mapping[str, type[Message]] = types.MappingProxyType({})
    takes_input: bool = False


def _events(**kinds: type[Message]) -> Mapping[str, type[Message]]:
    return types.MappingProxyType(kinds)


OPS: Final[Mapping[str, OpSpec]] = types.MappingProxyType(
    {
        "hello": OpSpec(Hello, HelloInfo),
        "ping": OpSpec(Empty, Empty),
        "envd.configure": OpSpec(Configure, Empty),
        "process.start": OpSpec(
            ProcessStart,
            Empty,
            _events(start=ProcessStarted, data=ProcessOutput, end=ProcessEnded),
        ),
        "process.connect": OpSpec(
            ProcessConnect,
            Empty,
            _events(start=ProcessStarted, data=ProcessOutput, end=ProcessEnded),
        ),
        "process.list": OpSpec(Empty, ProcessList),
        "process.input": OpSpec(ProcessInput, Empty),
        "process.close_stdin": OpSpec(ProcessCloseStdin, Empty),
        "process.signal": OpSpec(ProcessSignal, Empty),
        "process.resize": OpSpec(ProcessResize, Empty),
        "fs.stat": OpSpec(FsStat, EntryResult),
        "fs.list": OpSpec(FsList, EntryList),
        "fs.make_dir": OpSpec(FsMakeDir, EntryResult),
        "fs.move": OpSpec(FsMove, EntryResult),
        "fs.remove": OpSpec(FsRemove, Empty),
        "fs.read": OpSpec(FsRead, ReadDone, _events(start=EntryResult, data=FileChunk)),
        "fs.write": OpSpec(FsWrite, EntryResult, _events(credit=Credit), takes_input=True),
        "fs.watch": OpSpec(FsWatch, Empty, _events(start=Empty, event=FsEvent)),
        "fs.watcher.create": OpSpec(FsWatch, WatcherId),
        "fs.watcher.events": OpSpec(WatcherId, WatcherEvents),
        "fs.watcher.remove": OpSpec(WatcherId, Empty),
        "code.create": OpSpec(ContextCreate, ContextInfo),
        "code.list": OpSpec(Empty, ContextList),
        "code.restart": OpSpec(ContextId, Empty),
        "code.delete": OpSpec(ContextId, Empty),
        "code.interrupt": OpSpec(ContextId, Empty),
        "code.execute": OpSpec(
            Execute,
            ExecuteDone,
            _events(
                stdout=OutputText,
                stderr=OutputText,
                result=ExecutionResult,
                error=ExecutionError,
            ),
        ),
    }
)

# Ops that act on an open stream (their id is the stream's) rather than opening one.
STREAM_OPS: Final = frozenset({"cancel", "credit", "input", "keepalive"})


# --------------------------------------------------------------------------------------------
# Codec: encoders and decoders are built once, here, and shared.

_ENCODER: Final = msgspec.json.Encoder()
_REQUEST_DECODER: Final = msgspec.json.Decoder(Request)
_FRAME_DECODER: Final = msgspec.json.Decoder(Frame)
_ARGS_DECODERS: Final[Mapping[str, msgspec.json.Decoder[Any]]] = types.MappingProxyType(
    {
        **{op: msgspec.json.Decoder(spec.args) for op, spec in OPS.items()},
        "credit": msgspec.json.Decoder(Credit),
        "input": msgspec.json.Decoder(Input),
    }
)
_RESULT_DECODERS: Final[Mapping[type[Message], msgspec.json.Decoder[Any]]] = (
    types.MappingProxyType(
        {
            t: msgspec.json.Decoder(t)
            for spec in OPS.values()
            for t in (spec.result, *spec.events.values())
        }
        | {HelloInfo: msgspec.json.Decoder(HelloInfo), Keepalive: msgspec.json.Decoder(Keepalive)}
    )
)
_EMPTY_OBJECT: Final = b"{}"


def encode(payload: Message) -> bytes:
    """The JSON encoding of one payload, without a newline."""
    return _ENCODER.encode(payload)


def encode_request(id: int, op: str, args: Message | None = None) -> bytes:
    """One host → guest request line, newline included."""
    return _ENCODER.encode(OutRequest(id=id, op=op, args=args)) + b"\n"


def encode_event(id: int, ev: str, body: Message | msgspec.Raw | None = None) -> bytes:
    """One guest → host event line, newline included."""
    return _ENCODER.encode(OutEvent(id=id, ev=ev, body=body)) + b"\n"


def encode_ok(id: int, result: Message | msgspec.Raw | None = None) -> bytes:
    """One guest → host success line, newline included (``{}`` when there is no result)."""
    return _ENCODER.encode(OutOk(id=id, ok=Empty() if result is None else result)) + b"\n"


def encode_err(id: int, error: GuestError) -> bytes:
    """One guest → host error line, newline included."""
    return _ENCODER.encode(OutErr(id=id, err=error.to_wire())) + b"\n"


def decode_request(line: bytes | bytearray | memoryview) -> Request:
    """Decode one host → guest line. Raises `InvalidArgument` if it is not a request frame."""
    try:
        return _REQUEST_DECODER.decode(line)
    except msgspec.DecodeError as exc:
        raise InvalidArgument(f"malformed frame: {exc}") from None


def decode_args(op: str, raw: msgspec.Raw) -> Any:
    """Decode a request's args with the decoder of its op.

    Raises `Unimplemented` for an unknown op and `InvalidArgument` for args that do not match.
    """
    decoder = _ARGS_DECODERS.get(op)
    if decoder is None:
        raise Unimplemented(f"unknown op {op!r}")
    try:
        return decoder.decode(raw if len(raw) else _EMPTY_OBJECT)
    except msgspec.DecodeError as exc:
        raise InvalidArgument(f"bad args for {op}: {exc}") from None


def decode_frame(line: bytes | bytearray | memoryview) -> Frame:
    """Decode one guest → host line into its envelope. Raises `msgspec.DecodeError`."""
    return _FRAME_DECODER.decode(line)


def decode_payload(kind: type[Message], raw: msgspec.Raw) -> Any:
    """Decode an event body or ok payload as ``kind`` (one of the types in `OPS`)."""
    decoder = _RESULT_DECODERS.get(kind)
    data = raw if len(raw) else _EMPTY_OBJECT
    if decoder is None:
        return msgspec.json.decode(data, type=kind)
    return decoder.decode(data)


# --------------------------------------------------------------------------------------------
# Sans-IO framing


class LineBuffer:
    """Splits a byte stream into frames (lines), bounding memory by ``max_frame``.

    Feed it whatever the transport returns; it hands back complete lines. A line longer than
    ``max_frame`` is dropped whole (up to its newline) and reported once as an oversized line, so
    a peer that goes wrong can never make the reader buffer without bound. Blank lines are
    skipped: they are how both sides terminate a partial line when they resynchronise.
    """

    OVERSIZED: Final = b"\x00oversized"

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._max = max_frame
        self._buf = bytearray()
        self._skipping = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add received bytes; return the complete lines they finish (without newlines).

        An oversized line is returned as `LineBuffer.OVERSIZED` in its place.
        """
        lines: list[bytes] = []
        buf = self._buf
        buf += data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            elif end - start > self._max:
                lines.append(self.OVERSIZED)
            elif end > start:
                lines.append(bytes(buf[start:end]))
            start = end + 1
        del buf[:start]
        if len(buf) > self._max:
            if not self._skipping:
                lines.append(self.OVERSIZED)
            self._skipping = True
            buf.clear()
        return lines

    def discard_partial(self) -> None:
        """Forget a partial line (the peer reconnected; what came before is meaningless)."""
        self._buf.clear()
        self._skipping = False
