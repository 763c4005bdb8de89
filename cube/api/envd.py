"""envd's RPC surface: ``process.Process`` and ``filesystem.Filesystem`` over Connect JSON.

Each procedure is a thin translation: decode the Connect request into its Struct
(envd_messages.py), call the guest op of the same meaning (guest/protocol.py), encode the
result. Streams (``Start``, ``Connect``, ``WatchDir``) run through a ``Relay`` so keepalives
and client disconnects work; ``StreamInput`` reads the chunked request body as it arrives.
The plain-HTTP part of envd (``/files``, ``/health``) is in files.py, on the same app.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio

from guest import protocol
from guest.protocol import GuestError, InvalidArgument

from ..guestlink import LinkLost
from . import envd_messages as m
from .auth import BAD_TOKEN, basic_auth_user, token_matches
from .bodies import read_limited
from .connect import (
    JSON,
    STREAM_JSON,
    Done,
    EnvelopeReader,
    Failed,
    Keepalive,
    Relay,
    end_stream,
    envelope,
    keepalive_interval,
    parse_timeout,
)
from .context import ApiContext
from .errors import (
    ApiError,
    BadRequest,
    NotFound,
    SandboxGone,
    StreamAborted,
    Unauthorized,
    UnsupportedMediaType,
    connect_body,
    connect_code,
)
from .routing import sandbox_of
from .sandboxes import Target

__all__ = ["EnvdRpc", "register_rpc"]

EMPTY: Final = b"{}"


def _connect_error_response(error: Exception) -> Response:
    status, body = connect_body(error)
    return Response(body, status=status, content_type=JSON)


class EnvdRpc:
    """The Connect procedures of one server (see the module docstring)."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.unary: dict[str, tuple[type, Callable[[Target, Any, str | None, float | None], Awaitable[bytes]]]] = {
            "process.Process/List": (_AnyMessage, self.list_processes),
            "process.Process/SendInput": (m.SendInputRequest, self.send_input),
            "process.Process/SendSignal": (m.SendSignalRequest, self.send_signal),
            "process.Process/CloseStdin": (m.CloseStdinRequest, self.close_stdin),
            "process.Process/Update": (m.UpdateRequest, self.update),
            "filesystem.Filesystem/Stat": (m.PathRequest, self.stat),
            "filesystem.Filesystem/MakeDir": (m.PathRequest, self.make_dir),
            "filesystem.Filesystem/Move": (m.MoveRequest, self.move),
            "filesystem.Filesystem/ListDir": (m.ListDirRequest, self.list_dir),
            "filesystem.Filesystem/Remove": (m.PathRequest, self.remove),
            "filesystem.Filesystem/CreateWatcher": (m.CreateWatcherRequest, self.create_watcher),
            "filesystem.Filesystem/GetWatcherEvents": (m.WatcherRequest, self.watcher_events),
            "filesystem.Filesystem/RemoveWatcher": (m.WatcherRequest, self.remove_watcher),
        }
        self.server_streams: dict[str, tuple[type, Callable[..., Any]]] = {
            "process.Process/Start": (m.StartRequest, self.start),
            "process.Process/Connect": (m.ConnectRequest, self.connect),
            "filesystem.Filesystem/WatchDir": (m.CreateWatcherRequest, self.watch_dir),
        }

    # -- dispatch ------------------------------------------------------------------------------

    async def target(self) -> Target:
        """The running sandbox of this request, with its envd access token checked."""
        address = sandbox_of(request.scope)
        if address is None:
            raise SandboxGone("")
        target = await self.ctx.directory.resolve(address.sandbox_id)
        if not token_matches(request.headers.get("X-Access-Token"), target.record.envd_access_token):
            raise Unauthorized(BAD_TOKEN)
        return target

    async def handle(self, procedure: str) -> Response:
        metrics = self.ctx.metrics
        try:
            if procedure in self.unary:
                response = await self._unary(procedure)
            elif procedure in self.server_streams:
                response = await self._server_stream(procedure)
            elif procedure == "process.Process/StreamInput":
                response = await self._stream_input()
            else:
                raise NotFound(f"procedure /{procedure} is not implemented")
        except (ApiError, GuestError) as exc:
            known = procedure in self.unary or procedure in self.server_streams or procedure == "process.Process/StreamInput"
            metrics.rpcs.labels(procedure if known else "unknown", connect_code(exc).value).inc()
            if isinstance(exc, NotFound) and procedure not in self.unary:
                status, body = 404, msgspec.json.encode({"code": "unimplemented", "message": exc.message})
                return Response(body, status=status, content_type=JSON)
            return _connect_error_response(exc)
        metrics.rpcs.labels(procedure, "ok").inc()
        return response

    async def _unary(self, procedure: str) -> Response:
        kind, call = self.unary[procedure]
        content_type = (request.mimetype or "").lower()
        if content_type != JSON:
            raise UnsupportedMediaType(f"unary calls take {JSON}, not {content_type or 'nothing'}")
        timeout = parse_timeout(request.headers.get("Connect-Timeout-Ms"))
        target = await self.target()
        user = basic_auth_user(request.headers.get("Authorization"))
        body = await read_limited(self.ctx.limits.rpc_message)
        message: Any = self.ctx.decoders.decode(kind, body)
        result = await call(target, message, user, timeout)
        return Response(result, status=200, content_type=JSON)

    async def _server_stream(self, procedure: str) -> Response:
        kind, opener = self.server_streams[procedure]
        content_type = (request.mimetype or "").lower()
        if content_type != STREAM_JSON:
            raise UnsupportedMediaType(f"streaming calls take {STREAM_JSON}, not {content_type or 'nothing'}")
        timeout = parse_timeout(request.headers.get("Connect-Timeout-Ms"))
        keepalive = keepalive_interval(request.headers.get("Keepalive-Ping-Interval"))
        target = await self.target()
        user = basic_auth_user(request.headers.get("Authorization"))
        reader = EnvelopeReader(self.ctx.limits.rpc_message)
        messages = reader.feed(await read_limited(self.ctx.limits.rpc_message + 5))
        reader.finish()
        if len(messages) != 1 or messages[0][0] != 0:
            raise BadRequest("a server-streaming request carries exactly one message envelope")
        message: Any = self.ctx.decoders.decode(kind, messages[0][1])
        produce, deadline, encode, keepalive_message = opener(target, message, user, timeout)
        relay: Relay[Any] = Relay(self.ctx.nursery, produce, deadline=deadline)
        first = await relay.next()
        if isinstance(first, Failed):
            relay.close()
            raise first.error
        return Response(
            _stream_body(relay, first, encode, keepalive, keepalive_message),
            status=200,
            content_type=STREAM_JSON,
        )

    async def _stream_input(self) -> Response:
        content_type = (request.mimetype or "").lower()
        if content_type != STREAM_JSON:
            raise UnsupportedMediaType(f"streaming calls take {STREAM_JSON}, not {content_type or 'nothing'}")
        target = await self.target()
        user = basic_auth_user(request.headers.get("Authorization"))
        reader = EnvelopeReader(self.ctx.limits.rpc_message)
        selector: m.Selector | None = None
        error: Exception | None = None
        try:
            async for chunk in request.body:
                for flags, data in reader.feed(chunk):
                    if flags & 0x02:
                        continue  # a client's end-of-stream marker carries nothing for us
                    message = self.ctx.decoders.decode(m.StreamInputRequest, data)
                    if message.start is not None:
                        selector = message.start.process
                    elif message.data is not None:
                        if selector is None:
                            raise BadRequest("StreamInput must start with a start message")
                        await _send_input(target, selector, message.data.input, user)
            reader.finish()
        except (ApiError, GuestError) as exc:
            error = exc
        body = (envelope(EMPTY) if error is None else b"") + end_stream(error)
        return Response(body, status=200, content_type=STREAM_JSON)

    # -- process.Process -------------------------------------------------------------------------

    def start(self, target: Target, req: m.StartRequest, user: str | None, timeout: float | None) -> Any:
        config = req.process
        args = protocol.ProcessStart(
            process=protocol.ProcessConfig(
                cmd=config.cmd, args=list(config.args), envs=dict(config.envs), cwd=config.cwd
            ),
            pty=protocol.PtySize(cols=req.pty.size.cols, rows=req.pty.size.rows)
            if req.pty is not None and req.pty.size is not None
            else None,
            tag=req.tag,
            stdin=True if req.stdin is None else req.stdin,
            user=user,
            timeout_ms=int(timeout * 1000) if timeout else 0,
        )
        # The guest ends the process at timeout_ms and then the stream; a little slack lets
        # its end event through before the relay's own deadline would cut it.
        deadline = trio.current_time() + timeout + 5 if timeout else math.inf
        return _guest_stream(target, "process.start", args), deadline, m.process_event, m.PROCESS_KEEPALIVE

    def connect(self, target: Target, req: m.ConnectRequest, user: str | None, timeout: float | None) -> Any:
        args = protocol.ProcessConnect(**req.process.guest())
        deadline = trio.current_time() + timeout if timeout else math.inf
        return _guest_stream(target, "process.connect", args), deadline, m.process_event, m.PROCESS_KEEPALIVE

    async def list_processes(self, target: Target, req: Any, user: str | None, timeout: float | None) -> bytes:
        result = await target.client.call("process.list", protocol.Empty(), timeout=timeout)
        return m.encode(m.list_json(result))

    async def send_input(self, target: Target, req: m.SendInputRequest, user: str | None, timeout: float | None) -> bytes:
        await _send_input(target, req.process, req.input, user, timeout)
        return EMPTY

    async def send_signal(self, target: Target, req: m.SendSignalRequest, user: str | None, timeout: float | None) -> bytes:
        signal = req.signal
        if signal in ("SIGNAL_UNSPECIFIED", 0):
            raise InvalidArgument("a signal is required (SIGNAL_SIGTERM or SIGNAL_SIGKILL)")
        args = protocol.ProcessSignal(**req.process.guest(), signal=signal)
        await target.client.call("process.signal", args, timeout=timeout)
        return EMPTY

    async def close_stdin(self, target: Target, req: m.CloseStdinRequest, user: str | None, timeout: float | None) -> bytes:
        args = protocol.ProcessCloseStdin(**req.process.guest())
        await target.client.call("process.close_stdin", args, timeout=timeout)
        return EMPTY

    async def update(self, target: Target, req: m.UpdateRequest, user: str | None, timeout: float | None) -> bytes:
        if req.pty is None or req.pty.size is None:
            return EMPTY
        size = protocol.PtySize(cols=req.pty.size.cols, rows=req.pty.size.rows)
        args = protocol.ProcessResize(**req.process.guest(), pty=size)
        await target.client.call("process.resize", args, timeout=timeout)
        return EMPTY

    # -- filesystem.Filesystem -------------------------------------------------------------------

    async def stat(self, target: Target, req: m.PathRequest, user: str | None, timeout: float | None) -> bytes:
        result = await target.client.call("fs.stat", protocol.FsStat(path=req.path, user=user), timeout=timeout)
        return m.encode(m.EntryResponse(m.entry_json(result.entry)))

    async def make_dir(self, target: Target, req: m.PathRequest, user: str | None, timeout: float | None) -> bytes:
        result = await target.client.call("fs.make_dir", protocol.FsMakeDir(path=req.path, user=user), timeout=timeout)
        return m.encode(m.EntryResponse(m.entry_json(result.entry)))

    async def move(self, target: Target, req: m.MoveRequest, user: str | None, timeout: float | None) -> bytes:
        args = protocol.FsMove(source=req.source, destination=req.destination, user=user)
        result = await target.client.call("fs.move", args, timeout=timeout)
        return m.encode(m.EntryResponse(m.entry_json(result.entry)))

    async def list_dir(self, target: Target, req: m.ListDirRequest, user: str | None, timeout: float | None) -> bytes:
        args = protocol.FsList(path=req.path, depth=max(req.depth, 1), user=user)
        result = await target.client.call("fs.list", args, timeout=timeout)
        return m.encode(m.ListDirResponse([m.entry_json(e) for e in result.entries]))

    async def remove(self, target: Target, req: m.PathRequest, user: str | None, timeout: float | None) -> bytes:
        await target.client.call("fs.remove", protocol.FsRemove(path=req.path, user=user), timeout=timeout)
        return EMPTY

    async def create_watcher(self, target: Target, req: m.CreateWatcherRequest, user: str | None, timeout: float | None) -> bytes:
        args = protocol.FsWatch(path=req.path, recursive=req.recursive, include_entry=req.include_entry, user=user)
        result = await target.client.call("fs.watcher.create", args, timeout=timeout)
        return m.encode(m.CreateWatcherResponse(result.watcher_id))

    async def watcher_events(self, target: Target, req: m.WatcherRequest, user: str | None, timeout: float | None) -> bytes:
        args = protocol.WatcherId(watcher_id=req.watcher_id)
        result = await target.client.call("fs.watcher.events", args, timeout=timeout)
        return m.encode(m.GetWatcherEventsResponse([m.fs_event_json(e) for e in result.events]))

    async def remove_watcher(self, target: Target, req: m.WatcherRequest, user: str | None, timeout: float | None) -> bytes:
        args = protocol.WatcherId(watcher_id=req.watcher_id)
        await target.client.call("fs.watcher.remove", args, timeout=timeout)
        return EMPTY

    def watch_dir(self, target: Target, req: m.CreateWatcherRequest, user: str | None, timeout: float | None) -> Any:
        args = protocol.FsWatch(path=req.path, recursive=req.recursive, include_entry=req.include_entry, user=user)
        deadline = trio.current_time() + timeout if timeout else math.inf
        return _guest_stream(target, "fs.watch", args), deadline, _watch_event, m.WATCH_KEEPALIVE


class _AnyMessage(msgspec.Struct, frozen=True):
    """A request message whose fields are all ignored (``ListRequest`` is empty)."""


def _watch_event(ev: str, body: Any) -> bytes | None:
    if ev == "start":
        return m.WATCH_START
    if ev == "event":
        return m.encode(m.WatchEvent(m.fs_event_json(body)))
    return None


async def _send_input(
    target: Target, selector: m.Selector, data: m.ProcessInput, user: str | None, timeout: float | None = None
) -> None:
    if data.stdin is None and data.pty is None:
        return
    args = protocol.ProcessInput(**selector.guest(), stdin=data.stdin, pty=data.pty)
    await target.client.call("process.input", args, timeout=timeout)


def _guest_stream(target: Target, op: str, args: protocol.Message) -> Callable[[trio.MemorySendChannel[Any]], Awaitable[None]]:
    async def produce(send: trio.MemorySendChannel[Any]) -> None:
        async with target.client.open_stream(op, args) as stream:
            async for item in stream:
                await send.send(item)

    return produce


async def _stream_body(
    relay: Relay[Any],
    first: Any,
    encode: Callable[[str, Any], bytes | None],
    keepalive: float,
    keepalive_message: bytes,
) -> AsyncIterator[bytes]:
    """The envelopes of a server stream: each event, keepalives when idle, the end of stream."""
    try:
        item = first
        while True:
            if isinstance(item, Done):
                yield end_stream()
                return
            if isinstance(item, Failed):
                if isinstance(item.error, LinkLost):
                    raise StreamAborted(str(item.error))
                yield end_stream(item.error)
                return
            if isinstance(item, Keepalive):
                yield envelope(keepalive_message)
            else:
                data = encode(*item)
                if data is not None:
                    yield envelope(data)
            item = await relay.next(keepalive)
    finally:
        relay.close()


def register_rpc(app: QuartTrio, ctx: ApiContext) -> EnvdRpc:
    """Add the Connect procedures to the envd app."""
    rpc = EnvdRpc(ctx)

    @app.post("/process.Process/<method>")
    async def process_rpc(method: str) -> Response:
        return await rpc.handle(f"process.Process/{method}")

    @app.post("/filesystem.Filesystem/<method>")
    async def filesystem_rpc(method: str) -> Response:
        return await rpc.handle(f"filesystem.Filesystem/{method}")

    return rpc
