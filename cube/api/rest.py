"""The REST control API (docs/e2b-protocol.md §2): create, list, get, kill, timeout, connect,
pause, resume, metrics, logs, refreshes — with E2B's exact statuses and bodies.

Each handler parses and validates its input into a Struct (shapes.py), makes one call on the
node or its registry, and shapes the answer. Errors are raised and mapped once, by
``rest_error``, to ``{"code", "message"}``.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio

from actors import ActorError, CallTimeout

from ..netpolicy import EgressPolicy
from ..pool import PoolError
from ..registry import Get, PauseSandbox, ResumeSandbox, SetTimeout, StateConflict
from ..registry import List as ListLive
from ..registry import NotFound as RegistryNotFound
from ..store import Get as StoreGet
from ..store import InvalidQuery, Phase, SandboxRecord
from ..store import List as ListRecords
from ..store import NotFound as StoreNotFound
from . import shapes
from .bodies import read_limited
from .context import ApiContext
from .errors import ApiError, BadRequest, Conflict, NotFound, ServiceUnavailable, rest_body
from .usage import UsageSampler

__all__ = ["ControlApi", "decode_metadata_filter", "register_rest", "rest_error"]

S = TypeVar("S")
_ENCODER: Final = msgspec.json.Encoder()
MAX_PAGE: Final = 100


class TooManySandboxes(ApiError):
    status = 429


class GatewayTimeout(ApiError):
    status = 504


def rest_error(error: Exception) -> Response:
    """The one mapping from an error to a REST answer."""
    if isinstance(error, RegistryNotFound | StoreNotFound):
        error = NotFound(str(error))
    elif isinstance(error, StateConflict):
        error = Conflict(str(error))
    elif isinstance(error, InvalidQuery):
        error = BadRequest(str(error))
    elif isinstance(error, PoolError):
        error = ServiceUnavailable(str(error))
    elif isinstance(error, CallTimeout):
        error = GatewayTimeout("the node did not answer in time")
    elif isinstance(error, ActorError):
        error = ServiceUnavailable(f"the node is not available: {error}")
    status, body = rest_body(error)
    return Response(body, status=status, content_type="application/json")


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_ENCODER.encode(value), status=status, content_type="application/json", headers=headers)


def decode_metadata_filter(raw: str | None) -> dict[str, str] | None:
    """E2B's list filter: ``metadata`` is a query string, URL-encoded once more (§2.3)."""
    if not raw:
        return None
    pairs: dict[str, str] = {}
    for item in urllib.parse.unquote(raw).split("&"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise BadRequest(f"metadata filter {item!r} is not key=value")
        pairs[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
    return pairs or None


def _parse_time(value: str, name: str) -> float:
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise BadRequest(f"{name} must be an RFC 3339 date-time, not {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _int_param(name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, not {raw!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return value


IDEMPOTENCY_KEY: Final = re.compile(r"^[a-z0-9-]{1,255}$")


class IdempotentCreates:
    """Creates by ``Idempotency-Key``: a retried create gets the sandbox the first one made.

    Keys are remembered for ``ttl`` seconds, at most ``size`` of them; a retry that arrives
    while the first create still runs waits for it.
    """

    def __init__(self, ttl: float = 600.0, size: int = 4096) -> None:
        self.ttl = ttl
        self.size = size
        self._done: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._running: dict[str, trio.Event] = {}

    async def create(
        self,
        key: str,
        make: Callable[[], Awaitable[SandboxRecord]],
        find: Callable[[str], Awaitable[SandboxRecord]],
    ) -> SandboxRecord:
        while key in self._running:
            await self._running[key].wait()
        now = time.monotonic()
        while self._done and next(iter(self._done.values()))[0] < now:
            self._done.popitem(last=False)
        if key in self._done:
            return await find(self._done[key][1])
        self._running[key] = done = trio.Event()
        try:
            record = await make()
            self._done[key] = (now + self.ttl, record.id)
            if len(self._done) > self.size:
                self._done.popitem(last=False)
            return record
        finally:
            del self._running[key]
            done.set()


class ControlApi:
    """The REST handlers of one server."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.node = ctx.node
        self.registry = ctx.node.services.registry
        self.usage = UsageSampler()
        self.idempotent = IdempotentCreates()

    async def body(self, kind: type[S], *, required: bool = True) -> S:
        """The request's JSON body decoded into ``kind``; ``BadRequest`` when it does not fit."""
        data = await read_limited(self.ctx.limits.rest_body)
        if not data.strip():
            if required:
                raise BadRequest("a JSON body is required")
            data = b"{}"
        elif (request.mimetype or "").lower() not in ("application/json", ""):
            raise BadRequest(f"the body must be application/json, not {request.mimetype}")
        return self.ctx.decoders.decode(kind, data)

    async def record(self, sandbox_id: str) -> SandboxRecord:
        if not shapes_id_ok(sandbox_id):
            raise NotFound(f"sandbox {sandbox_id[:40]} not found")
        record: SandboxRecord = await self.registry.call(Get(sandbox_id))
        return record

    def _check_timeout(self, seconds: int | None) -> None:
        if seconds is not None and seconds > self.node.config.max_timeout:
            raise BadRequest(f"timeout must be at most {self.node.config.max_timeout:g} s")

    def _template(self, template_id: str) -> str:
        templates = self.node.config.templates
        if template_id in templates:
            return template_id
        name, _, tag = template_id.partition(":")
        if name in templates and tag in ("", "latest", "default"):
            return name
        raise NotFound(f"template '{template_id}' not found")

    # -- lifecycle ---------------------------------------------------------------------------

    async def create(self) -> Response:
        key = request.headers.get("Idempotency-Key")
        if key is None:
            record = await self._create()
        elif not IDEMPOTENCY_KEY.match(key):
            raise BadRequest("Idempotency-Key must be 1-255 characters of [a-z0-9-]")
        else:
            record = await self.idempotent.create(key, self._create, self.record)
        return _json(shapes.sandbox_from_record(record), 201)

    async def _create(self) -> SandboxRecord:
        req = await self.body(shapes.NewSandbox)
        template = self._template(req.templateID)
        self._check_timeout(req.timeout)
        try:
            policy = (
                EgressPolicy.from_e2b(req.allow_internet_access, req.network)
                if req.allow_internet_access is not None or req.network
                else None
            )
        except ValueError as exc:
            raise BadRequest(f"invalid network settings: {exc}") from None
        for key in (req.envVars or {}):
            if "=" in key or "\0" in key:
                raise BadRequest(f"invalid environment variable name {key!r}")
        live: list[SandboxRecord] = await self.registry.call(ListLive())
        if len(live) >= self.node.config.max_sandboxes:
            raise TooManySandboxes(
                f"the node runs its maximum of {self.node.config.max_sandboxes} sandboxes"
            )
        started = time.perf_counter()
        try:
            handle = await self.node.create(
                template,
                timeout=req.timeout,
                metadata=req.metadata,
                envs=req.envVars,
                network=policy,
                on_timeout="pause" if req.autoPause else "kill",
                auto_resume=bool(req.autoResume and req.autoResume.enabled),
                network_spec=req.network,
            )
        except ValueError as exc:
            self.ctx.metrics.sandbox_ops.labels("create", "error").inc()
            raise BadRequest(str(exc)) from None
        except Exception:
            self.ctx.metrics.sandbox_ops.labels("create", "error").inc()
            raise
        self.ctx.metrics.create_latency.observe(time.perf_counter() - started)
        self.ctx.metrics.sandbox_ops.labels("create", "ok").inc()
        return handle.info

    async def get(self, sandbox_id: str) -> Response:
        return _json(shapes.detail_from_record(await self.record(sandbox_id)))

    async def kill(self, sandbox_id: str) -> Response:
        await self.record(sandbox_id)
        await self.node.kill(sandbox_id)
        self.usage.forget(sandbox_id)
        self.ctx.metrics.sandbox_ops.labels("kill", "ok").inc()
        return Response(b"", status=204)

    async def set_timeout(self, sandbox_id: str) -> Response:
        req = await self.body(shapes.TimeoutRequest)
        self._check_timeout(req.timeout)
        await self.record(sandbox_id)
        await self.registry.call(SetTimeout(sandbox_id, float(req.timeout)))
        return Response(b"", status=204)

    async def refresh(self, sandbox_id: str) -> Response:
        req = await self.body(shapes.RefreshRequest, required=False)
        record = await self.record(sandbox_id)
        duration = req.duration if req.duration is not None else 15
        if record.end_at is not None and time.time() + duration > record.end_at:
            await self.registry.call(SetTimeout(sandbox_id, float(duration)))
        return Response(b"", status=204)

    async def connect(self, sandbox_id: str) -> Response:
        req = await self.body(shapes.ConnectSandbox, required=False)
        self._check_timeout(req.timeout)
        record = await self.record(sandbox_id)
        if record.state == Phase.PAUSED:
            timeout = float(req.timeout) if req.timeout is not None else self.node.config.default_timeout
            record = await self.registry.call(ResumeSandbox(sandbox_id, timeout), timeout=60)
            self.ctx.metrics.sandbox_ops.labels("resume", "ok").inc()
            return _json(shapes.sandbox_from_record(record), 201)
        if req.timeout is not None:
            wanted = time.time() + req.timeout
            if record.end_at is None or wanted > record.end_at:
                record = await self.registry.call(SetTimeout(sandbox_id, float(req.timeout)))
        return _json(shapes.sandbox_from_record(record), 200)

    async def pause(self, sandbox_id: str) -> Response:
        await self.body(shapes.PauseRequest, required=False)
        await self.record(sandbox_id)
        await self.registry.call(PauseSandbox(sandbox_id), timeout=60)
        self.ctx.metrics.sandbox_ops.labels("pause", "ok").inc()
        return Response(b"", status=204)

    async def resume(self, sandbox_id: str) -> Response:
        req = await self.body(shapes.ResumeRequest, required=False)
        self._check_timeout(req.timeout)
        record = await self.record(sandbox_id)
        if record.state != Phase.PAUSED:
            raise Conflict(f"sandbox {sandbox_id} is already running")
        timeout = float(req.timeout) if req.timeout is not None else self.node.config.default_timeout
        record = await self.registry.call(ResumeSandbox(sandbox_id, timeout), timeout=60)
        self.ctx.metrics.sandbox_ops.labels("resume", "ok").inc()
        return _json(shapes.sandbox_from_record(record), 201)

    # -- queries -----------------------------------------------------------------------------

    async def list_v2(self) -> Response:
        args = request.args
        states: tuple[Phase, ...] = (Phase.RUNNING, Phase.PAUSED)
        if args.get("state"):
            try:
                states = tuple(Phase(s.strip()) for s in args["state"].split(",") if s.strip())
            except ValueError:
                raise BadRequest("state must be a comma-separated list of running, paused") from None
            if any(s not in (Phase.RUNNING, Phase.PAUSED) for s in states):
                raise BadRequest("state must be a comma-separated list of running, paused")
        order = args.get("order") or "desc"
        if order not in ("asc", "desc"):
            raise BadRequest("order must be asc or desc")
        started_after = _parse_time(args["startedAfter"], "startedAfter") if args.get("startedAfter") else None
        limit = _int_param("limit", MAX_PAGE, 1, MAX_PAGE)
        query = ListRecords(
            state=states,
            metadata=decode_metadata_filter(args.get("metadata")),
            template=args.get("template") or None,
            started_after=started_after,
            order=order,  # type: ignore[arg-type]
            limit=limit or MAX_PAGE,
            next_token=args.get("nextToken") or None,
        )
        page = await self.node.services.store.call(query)
        headers = {"X-Next-Token": page.next_token} if page.next_token else None
        return _json([shapes.listed_from_record(r) for r in page.items], headers=headers)

    async def list_v1(self) -> Response:
        metadata = decode_metadata_filter(request.args.get("metadata"))
        live: list[SandboxRecord] = await self.registry.call(
            ListLive(state=[Phase.RUNNING.value], metadata=metadata)
        )
        live.sort(key=lambda r: r.started_at, reverse=True)
        return _json([shapes.listed_from_record(r) for r in live])

    async def metrics(self, sandbox_id: str) -> Response:
        start = _int_param("start", None, 0, 1 << 40)
        end = _int_param("end", None, 0, 1 << 40)
        record = await self.record(sandbox_id)
        # One sample, taken now; it belongs to the answer only if the range holds "now" or
        # the sandbox's life (E2B's samples fall in 5 s buckets: allow that much slack).
        now = time.time()
        if (end is not None and end < record.started_at - 5) or (start is not None and start > now + 5):
            return _json([])
        return _json([await self.usage.sample(record)])

    async def metrics_many(self) -> Response:
        ids = [i for i in (request.args.get("sandbox_ids") or "").split(",") if i]
        if not ids or len(ids) > 100:
            raise BadRequest("sandbox_ids must name 1 to 100 sandboxes")
        found: dict[str, shapes.SandboxMetric] = {}
        for sandbox_id in ids:
            try:
                record = await self.record(sandbox_id)
            except (RegistryNotFound, NotFound):
                continue
            found[sandbox_id] = await self.usage.sample(record)
        return _json(shapes.SandboxesMetrics(found))

    async def _log_entries(self, sandbox_id: str) -> list[shapes.LogEntry]:
        if not shapes_id_ok(sandbox_id):
            raise NotFound(f"sandbox {sandbox_id[:40]} not found")
        record: SandboxRecord = await self.node.services.store.call(StoreGet(sandbox_id))
        entries = [
            shapes.LogEntry(
                shapes.rfc3339(record.started_at),
                f"sandbox {record.id} started from template {record.template}",
                "info",
                {"event": "started", "template": record.template},
            )
        ]
        if record.state == Phase.PAUSED:
            entries.append(
                shapes.LogEntry(shapes.rfc3339(record.updated_at), "sandbox paused", "info", {"event": "paused"})
            )
        elif record.state not in (Phase.RUNNING, Phase.STARTING):
            reason = record.reason or record.state.value
            level = "error" if record.state == Phase.CRASHED else "info"
            entries.append(
                shapes.LogEntry(
                    shapes.rfc3339(record.end_at or record.updated_at),
                    f"sandbox ended: {reason}",
                    level,
                    {"event": record.state.value},
                )
            )
        return entries

    async def logs_v1(self, sandbox_id: str) -> Response:
        start = _int_param("start", 0, 0, 1 << 50) or 0
        limit = _int_param("limit", 1000, 0, 10000) or 0
        entries = [e for e in await self._log_entries(sandbox_id) if _ms(e.timestamp) >= start][:limit]
        lines = [shapes.LogLine(e.timestamp, e.message) for e in entries]
        return _json(shapes.SandboxLogs(lines, entries))

    async def logs_v2(self, sandbox_id: str) -> Response:
        args = request.args
        cursor = _int_param("cursor", None, 0, 1 << 50)
        limit = _int_param("limit", 1000, 0, 1000) or 0
        direction = args.get("direction") or "forward"
        if direction not in ("forward", "backward"):
            raise BadRequest("direction must be forward or backward")
        levels = ("debug", "info", "warn", "error")
        level = args.get("level")
        if level is not None and level not in levels:
            raise BadRequest("level must be one of debug, info, warn, error")
        entries = await self._log_entries(sandbox_id)
        if level is not None:
            entries = [e for e in entries if levels.index(e.level) >= levels.index(level)]
        if args.get("search"):
            entries = [e for e in entries if args["search"] in e.message]
        if cursor is not None:
            entries = [e for e in entries if (_ms(e.timestamp) >= cursor if direction == "forward" else _ms(e.timestamp) <= cursor)]
        if direction == "backward":
            entries.reverse()
        return _json(shapes.SandboxLogsV2(entries[:limit]))


def _ms(timestamp: str) -> int:
    return int(_parse_time(timestamp, "timestamp") * 1000)


def shapes_id_ok(sandbox_id: str) -> bool:
    from .sandboxes import SANDBOX_ID

    return bool(SANDBOX_ID.match(sandbox_id))


def register_rest(app: QuartTrio, ctx: ApiContext) -> ControlApi:
    """Add the REST routes to the control app."""
    api = ControlApi(ctx)
    add = app.add_url_rule
    add("/sandboxes", "create_v1", api.create, methods=["POST"])
    add("/v2/sandboxes", "create_v2", api.create, methods=["POST"])
    add("/sandboxes", "list_v1", api.list_v1, methods=["GET"])
    add("/v2/sandboxes", "list_v2", api.list_v2, methods=["GET"])
    add("/sandboxes/metrics", "metrics_many", api.metrics_many, methods=["GET"])
    add("/sandboxes/<sandbox_id>", "get", api.get, methods=["GET"])
    add("/sandboxes/<sandbox_id>", "kill", api.kill, methods=["DELETE"])
    add("/sandboxes/<sandbox_id>/timeout", "timeout", api.set_timeout, methods=["POST"])
    add("/sandboxes/<sandbox_id>/refreshes", "refresh", api.refresh, methods=["POST"])
    add("/sandboxes/<sandbox_id>/connect", "connect_v1", api.connect, methods=["POST"])
    add("/v2/sandboxes/<sandbox_id>/connect", "connect_v2", api.connect, methods=["POST"])
    add("/sandboxes/<sandbox_id>/pause", "pause", api.pause, methods=["POST"])
    add("/sandboxes/<sandbox_id>/resume", "resume", api.resume, methods=["POST"])
    add("/sandboxes/<sandbox_id>/metrics", "sandbox_metrics", api.metrics, methods=["GET"])
    add("/sandboxes/<sandbox_id>/logs", "logs_v1", api.logs_v1, methods=["GET"])
    add("/v2/sandboxes/<sandbox_id>/logs", "logs_v2", api.logs_v2, methods=["GET"])
    return api
