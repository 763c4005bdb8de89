"""One listener for everything: the ASGI router in front of the three apps.

A request is sandbox traffic when it names a sandbox, by the ``E2b-Sandbox-Id`` and
``E2b-Sandbox-Port`` headers (what the SDK sends with ``E2B_SANDBOX_URL``) or by a host name
``<port>-<sandboxID>.<domain>`` (what it uses without). Port 49983 goes to the envd app,
49999 to the code-interpreter app; every other request goes to the control app. Routing is by
port, never by path: ``/health`` exists on both sandbox ports (docs/e2b-protocol.md §9.6).

The router also gives every request an id (``X-Request-Id``, echoed back), logs one JSON
line per request and counts it in the metrics.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from typing import Any, Final

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from .context import ENVD_PORT, INTERPRETER_PORT, ApiContext
from .errors import PortClosed, SandboxGone, StreamAborted, rest_body
from .sandboxes import SANDBOX_ID

__all__ = ["Router", "SandboxAddress", "sandbox_address"]

log = logging.getLogger("cube.api.access")

_HOST: Final = re.compile(r"^(\d{1,5})-([a-z0-9]{20})(?:\.|$)")
_REQUEST_ID: Final = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SANDBOX_KEY: Final = "cube.sandbox"
REQUEST_ID_KEY: Final = "cube.request_id"


class SandboxAddress:
    """The sandbox and port a request is addressed to."""

    __slots__ = ("port", "sandbox_id")

    def __init__(self, sandbox_id: str, port: int) -> None:
        self.sandbox_id = sandbox_id
        self.port = port


def _header(scope: Any, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")  # type: ignore[no-any-return]
    return None


def sandbox_address(scope: Any) -> SandboxAddress | None:
    """Where sandbox traffic is going, or None for control-plane requests."""
    sandbox_id = _header(scope, b"e2b-sandbox-id")
    port = _header(scope, b"e2b-sandbox-port")
    if sandbox_id is not None or port is not None:
        number = int(port) if port and port.isdigit() and len(port) <= 5 else 0
        return SandboxAddress((sandbox_id or "").strip(), number)
    host = _header(scope, b"host")
    if host:
        match = _HOST.match(host.lower())
        if match:
            return SandboxAddress(match.group(2), int(match.group(1)))
    return None


class Router:
    """The ASGI application Hypercorn serves (see the module docstring)."""

    def __init__(self, ctx: ApiContext, control: Any, envd: Any, interpreter: Any) -> None:
        self.ctx = ctx
        self.control = control
        self.envd = envd
        self.interpreter = interpreter

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        address = sandbox_address(scope)
        if address is None:
            query: Any = scope.get("query_string", b"")
            if scope.get("path") == "/files" and b"signature=" in query:
                app, surface = self.envd, "envd"  # a signed URL without routing headers
            else:
                app, surface = self.control, "control"
        elif address.port == ENVD_PORT:
            app, surface = self.envd, "envd"
        elif address.port == INTERPRETER_PORT:
            app, surface = self.interpreter, "interpreter"
        else:
            app, surface = None, "sandbox"
        request_id = _header(scope, b"x-request-id")
        if request_id is None or not _REQUEST_ID.match(request_id):
            request_id = secrets.token_hex(8)
        scope = {**scope, SANDBOX_KEY: address, REQUEST_ID_KEY: request_id}  # type: ignore[assignment]
        if kind == "websocket":
            await self._websocket(app if surface == "control" else None, scope, receive, send, request_id)
            return
        await self._http(app, surface, address, scope, receive, send, request_id)

    async def _http(
        self,
        app: Any,
        surface: str,
        address: SandboxAddress | None,
        scope: Scope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        request_id: str,
    ) -> None:
        metrics = self.ctx.metrics
        started = time.perf_counter()
        status = 0
        header_id = request_id.encode()

        async def send_wrapper(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                metrics.latency.labels(surface).observe(time.perf_counter() - started)
                message = dict(message)
                extra = [(b"x-request-id", header_id)]
                if not body_done:
                    # Answered before the body was read: the connection cannot be reused
                    # safely (the rest of the body would be taken for the next request).
                    extra.append((b"connection", b"close"))
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        received = await _prefetch_body(scope, receive)
        body_done = received is not None

        async def receive_wrapper() -> Any:
            nonlocal body_done
            if received:
                return received.pop(0)
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        gauge = metrics.in_flight.labels(surface)
        gauge.inc()
        try:
            if app is None:
                assert address is not None
                await self._closed_port(address, send_wrapper)
            else:
                try:
                    await app(scope, receive_wrapper, send_wrapper)
                except* StreamAborted:
                    # Returning without ending the body makes Hypercorn close the
                    # connection: the client sees the transfer break, as behind E2B's proxy.
                    status = status or 502
        finally:
            gauge.dec()
            method = scope.get("method", "")
            metrics.requests.labels(surface, method if method in METHODS else "OTHER", str(status)).inc()
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "surface": surface,
                    "method": scope.get("method"),
                    "path": scope.get("path"),
                    "status": status,
                    "sandbox_id": address.sandbox_id if address else None,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                },
            )

    async def _closed_port(self, address: SandboxAddress, send: ASGISendCallable) -> None:
        """Answer a request for a port no surface serves: the proxy's 502 (§6)."""
        error: PortClosed | SandboxGone
        try:
            await self.ctx.directory.resolve(address.sandbox_id)
            error = PortClosed(address.sandbox_id, address.port)
        except SandboxGone as gone:
            error = gone
        status, body = rest_body(error)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _websocket(
        self, app: Any, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable, request_id: str
    ) -> None:
        if app is None:
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": "no WebSocket here"})
            return
        gauge = self.ctx.metrics.in_flight.labels("websocket")
        gauge.inc()
        started = time.perf_counter()
        try:
            await app(scope, receive, send)
        finally:
            gauge.dec()
            log.info(
                "websocket",
                extra={
                    "request_id": request_id,
                    "surface": "websocket",
                    "path": scope.get("path"),
                    "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                },
            )

    async def _lifespan(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        apps = (self.control, self.envd, self.interpreter)
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                for app in apps:
                    app.nursery = self.ctx.nursery
                    await app.startup()
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                with trio.CancelScope(shield=True):
                    for app in apps:
                        await app.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


PREFETCH_LIMIT: Final = 1 << 20


async def _prefetch_body(scope: Any, receive: ASGIReceiveCallable) -> list[Any] | None:
    """Read a small request body (``Content-Length`` <= 1 MiB, or none) before the app runs.

    Hypercorn recycles a keep-alive connection only when the request was read to its end; an
    app that answers early (a 4xx before reading) races that and can leave the connection
    stuck. Reading small bodies first removes the race; larger and chunked bodies stream
    through as they come, and an early answer to one closes its connection.
    """
    length: int | None = None
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            length = int(value) if value.isdigit() else None
            if length is None:
                return None
        elif key == b"transfer-encoding":
            return None
    if length is not None and length > PREFETCH_LIMIT:
        return None
    messages: list[Any] = []
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request" or not message.get("more_body", False):
            return messages


def sandbox_of(scope: Any) -> SandboxAddress | None:
    """The address the router found for this request (None for control-plane requests)."""
    address: SandboxAddress | None = scope.get(SANDBOX_KEY)
    return address


def request_id_of(scope: Any) -> str:
    return str(scope.get(REQUEST_ID_KEY, ""))


__all__ += ["SANDBOX_ID", "request_id_of", "sandbox_of"]
