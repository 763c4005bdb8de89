"""The code interpreter's surface on sandbox port 49999: ``/execute`` and ``/contexts`` (§5).

``/execute`` answers NDJSON, one object per line and never a blank line: the guest's
``code.execute`` events in order (``stdout``/``stderr`` with their timestamps, ``result``,
``error``), then ``number_of_executions`` and ``end_of_execution``; ``keepalive`` lines after
5 s of silence. A client that hangs up cancels the request, which interrupts the kernel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Final

import msgspec
from quart import Response, request
from quart_trio import QuartTrio

from guest import protocol
from guest.protocol import GuestError
from guest.protocol import NotFound as GuestNotFound

from .auth import BAD_TOKEN, token_matches
from .bodies import read_limited
from .connect import Done, Failed, Keepalive, Relay
from .context import ApiContext
from .errors import ApiError, BadRequest, NotFound, SandboxGone, Unauthorized, rest_body
from .routing import sandbox_of
from .sandboxes import Target

__all__ = ["register_interpreter"]

KEEPALIVE_SECONDS: Final = 5.0
NDJSON: Final = "application/x-ndjson"
_ENCODER: Final = msgspec.json.Encoder()
_ALIASES: Final = {"js": "javascript", "ts": "typescript", "py": "python", "sh": "bash"}


class ExecuteRequest(msgspec.Struct, frozen=True):
    code: Annotated[str, msgspec.Meta(max_length=16 << 20)]
    context_id: str | None = None
    language: str | None = None
    env_vars: dict[str, str] | None = None


class CreateContext(msgspec.Struct, frozen=True):
    language: str | None = None
    cwd: str | None = None


class _Line(msgspec.Struct, frozen=True, tag_field="type"):
    pass


class StdoutLine(_Line, frozen=True, tag="stdout"):
    text: str
    timestamp: str


class StderrLine(_Line, frozen=True, tag="stderr"):
    text: str
    timestamp: str


class ErrorLine(_Line, frozen=True, tag="error"):
    name: str
    value: str
    traceback: str


class CountLine(_Line, frozen=True, tag="number_of_executions"):
    execution_count: int


class ResultLine(_Line, frozen=True, tag="result", omit_defaults=True):
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


END_LINE: Final = b'{"type":"end_of_execution"}\n'
KEEPALIVE_LINE: Final = b'{"type":"keepalive"}\n'


def normalise_language(language: str | None) -> str | None:
    if language is None:
        return None
    name = language.strip().lower()
    return _ALIASES.get(name, name)


def _line(ev: str, body: Any) -> bytes | None:
    if ev == "stdout":
        line: _Line = StdoutLine(body.text, body.timestamp)
    elif ev == "stderr":
        line = StderrLine(body.text, body.timestamp)
    elif ev == "result":
        r: protocol.ExecutionResult = body
        line = ResultLine(
            r.text, r.html, r.markdown, r.svg, r.png, r.jpeg, r.pdf, r.latex, r.json,
            r.javascript, r.data, r.chart, r.extra, r.is_main_result,
        )
    elif ev == "error":
        line = ErrorLine(body.name, body.value, body.traceback)
    else:
        return None
    return _ENCODER.encode(line) + b"\n"


def _text_error(error: Exception) -> Response:
    """Errors of the interpreter surface: the SDK reads the body as text (404, 400)."""
    if isinstance(error, SandboxGone):
        status, body = rest_body(error)
        return Response(body, status=status, content_type="application/json")
    status, body = rest_body(error)
    message = getattr(error, "message", "") or str(error)
    return Response(message, status=status, content_type="text/plain")


class Interpreter:
    """The handlers of the code-interpreter surface of one server."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx

    async def target(self) -> Target:
        address = sandbox_of(request.scope)
        target = await self.ctx.directory.resolve(address.sandbox_id if address else "")
        record = target.record
        traffic = request.headers.get("E2B-Traffic-Access-Token")
        access = request.headers.get("X-Access-Token")
        if not (
            token_matches(traffic, record.traffic_access_token)
            or token_matches(access, record.envd_access_token)
        ):
            raise Unauthorized(BAD_TOKEN)
        return target

    async def execute(self) -> Response:
        try:
            target = await self.target()
            body = await read_limited(self.ctx.limits.execute_body)
            req = self.ctx.decoders.decode(ExecuteRequest, body)
            if req.context_id and req.language:
                raise BadRequest("give either context_id or language, not both")
            if req.context_id:
                await self._require_context(target, req.context_id)
            args = protocol.Execute(
                code=req.code,
                context_id=req.context_id or None,
                language=normalise_language(req.language),
                envs=dict(req.env_vars) if req.env_vars else None,
            )

            async def produce(send: Any) -> None:
                async with target.client.open_stream("code.execute", args) as stream:
                    async for item in stream:
                        await send.send(item)
                    await send.send(("done", stream.result))

            relay: Relay[Any] = Relay(self.ctx.nursery, produce)
        except (ApiError, GuestError) as exc:
            return _text_error(exc)
        return Response(_execute_body(relay), status=200, content_type=NDJSON)

    async def _require_context(self, target: Target, context_id: str) -> None:
        result: protocol.ContextList = await target.client.call("code.list", protocol.Empty())
        if not any(c.id == context_id for c in result.contexts):
            raise NotFound(f"Context {context_id} not found")

    async def create_context(self) -> Response:
        try:
            target = await self.target()
            req = self.ctx.decoders.decode(CreateContext, await read_limited(self.ctx.limits.rest_body))
            args = protocol.ContextCreate(language=normalise_language(req.language) or "python", cwd=req.cwd)
            info: protocol.ContextInfo = await target.client.call("code.create", args)
        except (ApiError, GuestError) as exc:
            return _text_error(exc)
        return Response(_ENCODER.encode(info), status=200, content_type="application/json")

    async def list_contexts(self) -> Response:
        try:
            target = await self.target()
            result: protocol.ContextList = await target.client.call("code.list", protocol.Empty())
        except (ApiError, GuestError) as exc:
            return _text_error(exc)
        return Response(_ENCODER.encode(result.contexts), status=200, content_type="application/json")

    async def restart_context(self, context_id: str) -> Response:
        return await self._context_op("code.restart", context_id)

    async def delete_context(self, context_id: str) -> Response:
        return await self._context_op("code.delete", context_id)

    async def _context_op(self, op: str, context_id: str) -> Response:
        try:
            target = await self.target()
            await target.client.call(op, protocol.ContextId(id=context_id))
        except GuestNotFound:
            return _text_error(NotFound(f"Context {context_id} not found"))
        except (ApiError, GuestError) as exc:
            return _text_error(exc)
        return Response(b"", status=204)


async def _execute_body(relay: Relay[Any]) -> AsyncIterator[bytes]:
    try:
        while True:
            item = await relay.next(KEEPALIVE_SECONDS)
            if isinstance(item, Keepalive):
                yield KEEPALIVE_LINE
            elif isinstance(item, Failed):
                error = item.error
                name = type(error).__name__
                message = getattr(error, "message", "") or str(error)
                yield _ENCODER.encode(ErrorLine(name, message, "")) + b"\n" + END_LINE
                return
            elif isinstance(item, Done):
                yield END_LINE
                return
            elif item[0] == "done":
                done: protocol.ExecuteDone = item[1]
                yield _ENCODER.encode(CountLine(done.execution_count)) + b"\n"
            else:
                line = _line(*item)
                if line is not None:
                    yield line
    finally:
        relay.close()


def register_interpreter(app: QuartTrio, ctx: ApiContext) -> Interpreter:
    """Add the code-interpreter routes to the interpreter app."""
    interpreter = Interpreter(ctx)

    @app.post("/execute")
    async def execute() -> Response:
        return await interpreter.execute()

    @app.post("/contexts")
    async def create_context() -> Response:
        return await interpreter.create_context()

    @app.get("/contexts")
    async def list_contexts() -> Response:
        return await interpreter.list_contexts()

    @app.post("/contexts/<context_id>/restart")
    async def restart_context(context_id: str) -> Response:
        return await interpreter.restart_context(context_id)

    @app.delete("/contexts/<context_id>")
    async def delete_context(context_id: str) -> Response:
        return await interpreter.delete_context(context_id)

    @app.get("/health")
    async def health() -> Response:
        address = sandbox_of(request.scope)
        try:
            await ctx.directory.resolve(address.sandbox_id if address else "")
        except SandboxGone as exc:
            return _text_error(exc)
        return Response(b'"OK"', status=200, content_type="application/json")

    return interpreter
