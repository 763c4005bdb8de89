"""WebSocket sessions on the control listener: live command output and interactive terminals.

``/sandboxes/{id}/commands`` starts a command or attaches to a running one and streams it as
JSON text frames::

    client → {"type": "start", "cmd": "make test", "cwd": "/src", "envs": {}, "user": null,
              "timeout": 0, "stdin": false}           or  {"type": "connect", "pid": 42}
    server → {"type": "start", "pid": 42}
    server → {"type": "stdout", "data": "..."} / {"type": "stderr", "data": "..."}
    client → {"type": "stdin", "data": "..."} / {"type": "close_stdin"} / {"type": "signal", "signal": "SIGTERM"}
    server → {"type": "exit", "exit_code": 0, "exited": true, "status": "exit status 0", "error": null}
    server → {"type": "error", "code": "not_found", "message": "..."}   (then the socket closes)

``/sandboxes/{id}/terminal?cols=80&rows=24`` runs an interactive login shell on a PTY: binary
frames both ways carry terminal bytes (text frames that are not JSON count as input too, as
xterm.js sends them); ``{"type": "resize", "cols": 120, "rows": 40}`` resizes; the server ends
with ``{"type": "exit", ...}``. ``?pid=N`` attaches to a PTY process that already runs.

Auth: ``X-API-KEY`` (header, or ``api_key`` query parameter for browsers), or the sandbox's
``envdAccessToken`` (``X-Access-Token`` header or ``access_token`` parameter). A command or
shell that a session started is killed when the session ends; one it attached to is not.
"""

from __future__ import annotations

import codecs
import json
import logging
from typing import Any, Final

import msgspec
import trio
from quart import Response, websocket
from quart_trio import QuartTrio

from guest import protocol
from guest.protocol import GuestError

from .auth import token_matches
from .context import ApiContext
from .errors import ApiError, BadRequest, SandboxGone, rest_body
from .sandboxes import Target

__all__ = ["register_websockets"]

log = logging.getLogger("cube.api.websocket")

_ENCODER: Final = msgspec.json.Encoder()
PTY_ENV: Final = {"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class StartCommand(msgspec.Struct, frozen=True, tag="start", tag_field="type"):
    cmd: str
    cwd: str | None = None
    envs: dict[str, str] = {}
    user: str | None = None
    timeout: float = 0
    stdin: bool = False
    tag: str | None = None


class AttachCommand(msgspec.Struct, frozen=True, tag="connect", tag_field="type"):
    pid: int


class StdinMessage(msgspec.Struct, frozen=True, tag="stdin", tag_field="type"):
    data: str


class InputMessage(msgspec.Struct, frozen=True, tag="input", tag_field="type"):
    data: str


class CloseStdinMessage(msgspec.Struct, frozen=True, tag="close_stdin", tag_field="type"):
    pass


class SignalMessage(msgspec.Struct, frozen=True, tag="signal", tag_field="type"):
    signal: str | int = "SIGTERM"


class ResizeMessage(msgspec.Struct, frozen=True, tag="resize", tag_field="type"):
    cols: int
    rows: int


_OPEN: Final = msgspec.json.Decoder(StartCommand | AttachCommand)
_CONTROL: Final = msgspec.json.Decoder(
    StdinMessage | InputMessage | CloseStdinMessage | SignalMessage | ResizeMessage
)


class SessionError(Exception):
    """A client message the session cannot act on; reported as an error frame."""


class Sessions:
    """The WebSocket endpoints of one server."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def authorize(self, sandbox_id: str) -> Target:
        """The running sandbox, if the client may use it."""
        target = await self.ctx.directory.resolve(sandbox_id)
        args = websocket.args
        headers = websocket.headers
        token = headers.get("X-Access-Token") or args.get("access_token")
        if token_matches(token, target.record.envd_access_token):
            return target
        self.ctx.keys.check(headers.get("X-API-KEY") or args.get("api_key"))
        return target

    async def refuse(self, error: Exception) -> Response:
        status, body = rest_body(error)
        return Response(body, status=status, content_type="application/json")

    # -- commands ------------------------------------------------------------------------------

    async def commands(self, sandbox_id: str) -> Response | None:
        try:
            target = await self.authorize(sandbox_id)
        except (ApiError, SandboxGone) as exc:
            return await self.refuse(exc)
        await websocket.accept()
        try:
            opening = await self._opening()
        except SessionError as exc:
            await _send_json({"type": "error", "code": "invalid_argument", "message": str(exc)})
            await websocket.close(1008)
            return None
        if isinstance(opening, StartCommand):
            op = "process.start"
            args: protocol.Message = protocol.ProcessStart(
                process=protocol.ProcessConfig(
                    cmd="/bin/bash", args=["-l", "-c", opening.cmd], envs=dict(opening.envs), cwd=opening.cwd
                ),
                stdin=opening.stdin,
                user=opening.user,
                tag=opening.tag,
                timeout_ms=int(opening.timeout * 1000) if opening.timeout > 0 else 0,
            )
        else:
            op, args = "process.connect", protocol.ProcessConnect(pid=opening.pid)
        await self._run(target, op, args, owned=isinstance(opening, StartCommand), pty=False)
        return None

    async def _opening(self) -> StartCommand | AttachCommand:
        args = websocket.args
        if args.get("cmd"):
            return StartCommand(cmd=args["cmd"], cwd=args.get("cwd"), user=args.get("user"))
        if args.get("pid"):
            if not args["pid"].isdigit():
                raise SessionError("pid must be a number")
            return AttachCommand(pid=int(args["pid"]))
        with trio.move_on_after(30):
            message = await websocket.receive()
            try:
                return _OPEN.decode(message)
            except msgspec.DecodeError as exc:
                raise SessionError(f"the first message must start or connect a command: {exc}") from None
        raise SessionError("no start or connect message within 30 s")

    # -- terminals -----------------------------------------------------------------------------

    async def terminal(self, sandbox_id: str) -> Response | None:
        try:
            target = await self.authorize(sandbox_id)
            cols = _cells(websocket.args.get("cols"), 80)
            rows = _cells(websocket.args.get("rows"), 24)
        except (ApiError, SandboxGone) as exc:
            return await self.refuse(exc)
        await websocket.accept()
        pid = websocket.args.get("pid")
        if pid:
            if not pid.isdigit():
                await _send_json({"type": "error", "code": "invalid_argument", "message": "pid must be a number"})
                await websocket.close(1008)
                return None
            await self._run(target, "process.connect", protocol.ProcessConnect(pid=int(pid)), owned=False, pty=True)
            return None
        args = protocol.ProcessStart(
            process=protocol.ProcessConfig(
                cmd="/bin/bash", args=["-i", "-l"], envs=dict(PTY_ENV), cwd=websocket.args.get("cwd")
            ),
            pty=protocol.PtySize(cols=cols, rows=rows),
            user=websocket.args.get("user"),
        )
        await self._run(target, "process.start", args, owned=True, pty=True)
        return None

    # -- the session ---------------------------------------------------------------------------

    async def _run(self, target: Target, op: str, args: protocol.Message, *, owned: bool, pty: bool) -> None:
        pid: int | None = None
        decoders = {"stdout": codecs.getincrementaldecoder("utf-8")("replace"),
                    "stderr": codecs.getincrementaldecoder("utf-8")("replace")}
        failure: GuestError | None = None
        try:
            async with target.client.open_stream(op, args) as stream, trio.open_nursery() as nursery:
                try:
                    async for ev, body in stream:
                        if ev == "start":
                            pid = body.pid
                            await _send_json({"type": "start", "pid": pid})
                            nursery.start_soon(self._pump_input, target, pid, pty)
                        elif ev == "data":
                            await self._output(body, pty, decoders)
                        elif ev == "end":
                            owned = False
                            await _send_json(
                                {"type": "exit", "exit_code": body.exit_code, "exited": body.exited,
                                 "status": body.status, "error": body.error}
                            )
                except GuestError as exc:
                    failure = exc
                nursery.cancel_scope.cancel()
            if failure is not None:
                await _send_json({"type": "error", "code": failure.code, "message": failure.message})
        finally:
            if owned and pid is not None:
                with trio.CancelScope(shield=True):
                    await _quietly(target.client.call("process.signal", protocol.ProcessSignal(pid=pid, signal=9), timeout=5))
        with trio.move_on_after(5):
            await websocket.close(1000)

    async def _output(self, body: protocol.ProcessOutput, pty: bool, decoders: dict[str, Any]) -> None:
        if pty:
            if body.pty:
                await websocket.send(body.pty)
            return
        for name in ("stdout", "stderr"):
            chunk = getattr(body, name)
            if chunk:
                await _send_json({"type": name, "data": decoders[name].decode(chunk)})

    async def _pump_input(self, target: Target, pid: int, pty: bool) -> None:
        """Forward the client's frames to the process until the socket closes."""
        while True:
            message = await websocket.receive()
            try:
                await self._control(target, pid, pty, message)
            except (SessionError, GuestError) as exc:
                await _send_json({"type": "error", "code": getattr(exc, "code", "invalid_argument"), "message": str(exc)})

    async def _control(self, target: Target, pid: int, pty: bool, message: str | bytes) -> None:
        client = target.client
        if isinstance(message, bytes):
            if not pty:
                raise SessionError("binary frames are terminal input; send {\"type\": \"stdin\"} here")
            await client.call("process.input", protocol.ProcessInput(pid=pid, pty=message))
            return
        try:
            control = _CONTROL.decode(message)
        except msgspec.DecodeError as exc:
            if pty and not _looks_like_json(message):
                await client.call("process.input", protocol.ProcessInput(pid=pid, pty=message.encode()))
                return
            raise SessionError(f"unknown message: {exc}") from None
        if isinstance(control, StdinMessage | InputMessage):
            data = control.data.encode()
            args = protocol.ProcessInput(pid=pid, pty=data) if pty else protocol.ProcessInput(pid=pid, stdin=data)
            await client.call("process.input", args)
        elif isinstance(control, CloseStdinMessage):
            await client.call("process.close_stdin", protocol.ProcessCloseStdin(pid=pid))
        elif isinstance(control, SignalMessage):
            await client.call("process.signal", protocol.ProcessSignal(pid=pid, signal=control.signal))
        elif isinstance(control, ResizeMessage):
            if not pty:
                raise SessionError("only terminals can be resized")
            size = protocol.PtySize(cols=_cells(str(control.cols), 80), rows=_cells(str(control.rows), 24))
            await client.call("process.resize", protocol.ProcessResize(pid=pid, pty=size))


def _looks_like_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _cells(value: str | None, default: int) -> int:
    if value is None or value == "":
        return default
    if not value.isdigit() or not 1 <= int(value) <= 1000:
        raise BadRequest("terminal size must be 1-1000 cells")
    return int(value)


async def _send_json(message: dict[str, Any]) -> None:
    await websocket.send(_ENCODER.encode(message).decode())


async def _quietly(call: Any) -> None:
    try:
        await call
    except GuestError:
        pass


def register_websockets(app: QuartTrio, ctx: ApiContext) -> Sessions:
    """Add the WebSocket endpoints to the control app."""
    sessions = Sessions(ctx)

    @app.websocket("/sandboxes/<sandbox_id>/commands")
    async def commands(sandbox_id: str) -> Response | None:
        return await sessions.commands(sandbox_id)

    @app.websocket("/sandboxes/<sandbox_id>/terminal")
    async def terminal(sandbox_id: str) -> Response | None:
        return await sessions.terminal(sandbox_id)

    return sessions
