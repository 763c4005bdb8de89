"""The server: three Quart-trio apps behind one router on one Hypercorn listener.

    control      REST control API, WebSockets, /health, /metrics, /openapi.json
    envd         sandbox port 49983: Connect RPCs, /files, /health
    interpreter  sandbox port 49999: /execute, /contexts, /health

``serve`` runs it for a node until cancelled; ``ensure_api_keys`` finds the keys to accept
(configured ones, or a key generated once and kept in the journal).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any, Final

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from guest.protocol import GuestError

from ..node import Node
from ..registry import List as ListLive
from ..store import EnsureSetting
from .auth import API_KEY_SETTING, ApiKeys, generate_api_key
from .context import ApiContext, Limits
from .envd import register_rpc
from .errors import ApiError, connect_body, rest_body
from .files import register_files
from .interpreter import register_interpreter
from .metrics import CONTENT_TYPE_LATEST, ApiMetrics
from .openapi import openapi_document
from .rest import register_rest, rest_error
from .routing import Router
from .websocket import register_websockets

__all__ = ["build_router", "ensure_api_keys", "serve"]

log = logging.getLogger("cube.api")

PUBLIC_PATHS: Final = frozenset({"/health", "/metrics", "/openapi.json"})
_ENCODER: Final = msgspec.json.Encoder()


def cube_version() -> str:
    try:
        return package_version("cube")
    except PackageNotFoundError:
        return "0"


def _new_app(name: str) -> QuartTrio:
    app = QuartTrio(name)
    app.config.update(
        RESPONSE_TIMEOUT=None,  # streams (commands, watches, executions) live as long as they need
        BODY_TIMEOUT=None,  # StreamInput bodies too
        MAX_CONTENT_LENGTH=None,  # each handler bounds what it reads (Limits)
        PROVIDE_AUTOMATIC_OPTIONS=False,
    )
    return app


def _unexpected(error: Exception) -> None:
    if not isinstance(error, ApiError | GuestError | HTTPException):
        log.error("unhandled error", exc_info=error)


def control_app(ctx: ApiContext) -> QuartTrio:
    app = _new_app("cube.control")
    register_rest(app, ctx)
    register_websockets(app, ctx)

    @app.before_request
    async def require_api_key() -> None:
        if request.path not in PUBLIC_PATHS:
            ctx.keys.check(request.headers.get("X-API-KEY"))

    @app.get("/health")
    async def health() -> Response:
        return Response(b'{"status":"ok"}', status=200, content_type="application/json")

    @app.get("/metrics")
    async def metrics() -> Response:
        live = await ctx.node.services.registry.call(ListLive())
        counts: dict[str, int] = {}
        for record in live:
            counts[record.state.value] = counts.get(record.state.value, 0) + 1
        ctx.metrics.count_sandboxes(counts)
        return Response(ctx.metrics.render(), status=200, content_type=CONTENT_TYPE_LATEST)

    document = _ENCODER.encode(openapi_document(cube_version()))

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return Response(document, status=200, content_type="application/json")

    @app.get("/admin/tree")
    async def tree() -> Response:
        """The node's live supervision tree: JSON, or pstree-like text with ?format=text."""
        snapshot = ctx.node.tree()
        if request.args.get("format") == "text":
            return Response(snapshot.dump() + "\n", status=200, content_type="text/plain")
        return Response(_ENCODER.encode(snapshot), status=200, content_type="application/json")

    @app.errorhandler(Exception)
    async def on_error(error: Exception) -> Response:
        if isinstance(error, HTTPException):
            status = error.code or 500
            body = _ENCODER.encode({"code": status, "message": error.description or error.name})
            return Response(body, status=status, content_type="application/json")
        _unexpected(error)
        return rest_error(error)

    return app


def envd_app(ctx: ApiContext) -> QuartTrio:
    app = _new_app("cube.envd")
    register_rpc(app, ctx)
    register_files(app, ctx)

    @app.get("/admin/tree")
    async def tree() -> Response:
        """The node's live supervision tree: JSON, or pstree-like text with ?format=text."""
        snapshot = ctx.node.tree()
        if request.args.get("format") == "text":
            return Response(snapshot.dump() + "\n", status=200, content_type="text/plain")
        return Response(_ENCODER.encode(snapshot), status=200, content_type="application/json")

    @app.errorhandler(Exception)
    async def on_error(error: Exception) -> Response:
        rpc = request.path.startswith(("/process.Process/", "/filesystem.Filesystem/"))
        if isinstance(error, HTTPException):
            status = error.code or 500
            message = error.description or error.name
            if rpc:
                body = _ENCODER.encode({"code": "unimplemented" if status in (404, 405) else "unknown", "message": message})
            else:
                body = _ENCODER.encode({"code": status, "message": message})
            return Response(body, status=status, content_type="application/json")
        _unexpected(error)
        status, data = connect_body(error) if rpc else rest_body(error)
        return Response(data, status=status, content_type="application/json")

    return app


def interpreter_app(ctx: ApiContext) -> QuartTrio:
    app = _new_app("cube.interpreter")
    register_interpreter(app, ctx)

    @app.get("/admin/tree")
    async def tree() -> Response:
        """The node's live supervision tree: JSON, or pstree-like text with ?format=text."""
        snapshot = ctx.node.tree()
        if request.args.get("format") == "text":
            return Response(snapshot.dump() + "\n", status=200, content_type="text/plain")
        return Response(_ENCODER.encode(snapshot), status=200, content_type="application/json")

    @app.errorhandler(Exception)
    async def on_error(error: Exception) -> Response:
        if isinstance(error, HTTPException):
            return Response(error.description or error.name, status=error.code or 500, content_type="text/plain")
        _unexpected(error)
        status, body = rest_body(error)
        return Response(body, status=status, content_type="application/json")

    return app


def build_router(ctx: ApiContext) -> Router:
    """The ASGI application for ``ctx``: the router and its three apps."""
    return Router(ctx, control_app(ctx), envd_app(ctx), interpreter_app(ctx))


async def ensure_api_keys(node: Node, configured: list[str]) -> tuple[ApiKeys, str | None]:
    """The keys to accept, and the generated key if there was no configured one.

    Without configured keys, a key is generated on first start and kept in the journal's
    settings, so it stays the same across restarts.
    """
    if configured:
        return ApiKeys(configured), None
    stored: str = await node.services.store.call(EnsureSetting(API_KEY_SETTING, generate_api_key()))
    return ApiKeys([stored]), stored


async def serve(
    node: Node,
    keys: ApiKeys,
    *,
    host: str,
    port: int,
    limits: Limits | None = None,
    domain: str | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    shutdown_trigger: Callable[..., Awaitable[Any]] | None = None,
) -> None:
    """Serve the API for ``node`` on ``host:port`` until cancelled (or ``shutdown_trigger``).

    Reports the bound addresses (``http://host:port``) through ``task_status``.
    """
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.graceful_timeout = 3
    config.h11_max_incomplete_size = 64 * 1024
    config.websocket_max_message_size = 4 << 20
    async with trio.open_nursery() as nursery:
        ctx = ApiContext(node, keys, nursery, metrics=ApiMetrics(), limits=limits, domain=domain)
        router = build_router(ctx)

        async def run_listener(task_status: trio.TaskStatus[list[str]]) -> None:
            await hypercorn_serve(router, config, shutdown_trigger=shutdown_trigger, task_status=task_status)
            nursery.cancel_scope.cancel()  # the listener is done: end the streams it left

        binds: list[str] = await nursery.start(run_listener)
        task_status.started(binds)
