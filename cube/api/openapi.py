"""The OpenAPI 3.1 document of the REST control API, served at ``GET /openapi.json``.

Built from the same Structs the handlers decode and encode (msgspec's JSON Schema), so the
document cannot drift from what the server accepts and answers.
"""

from __future__ import annotations

from typing import Any

import msgspec

from . import shapes
from .errors import RestErrorBody

__all__ = ["openapi_document"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): {"description": "error", **_json_body(_ref("Error"))} for s in statuses}


def openapi_document(version: str) -> dict[str, Any]:
    """The document; ``version`` is cube's version."""
    structs = [
        shapes.NewSandbox,
        shapes.Sandbox,
        shapes.ListedSandbox,
        shapes.SandboxDetail,
        shapes.SandboxMetric,
        shapes.SandboxesMetrics,
        shapes.TimeoutRequest,
        shapes.ConnectSandbox,
        shapes.PauseRequest,
        shapes.ResumeRequest,
        shapes.RefreshRequest,
        shapes.SandboxLogs,
        shapes.SandboxLogsV2,
        RestErrorBody,
    ]
    _, components = msgspec.json.schema_components(structs, ref_template="#/components/schemas/{name}")
    components["Error"] = components.pop("RestErrorBody")
    sid = {"name": "sandboxID", "in": "path", "required": True, "schema": {"type": "string", "pattern": "^[a-z0-9]{20}$"}}
    sandbox_ok = {"description": "the sandbox", **_json_body(_ref("Sandbox"))}

    def op(summary: str, responses: dict[str, Any], *, body: str | None = None, params: list[Any] | None = None) -> dict[str, Any]:
        operation: dict[str, Any] = {"summary": summary, "responses": responses}
        if body is not None:
            operation["requestBody"] = {"required": True, **_json_body(_ref(body))}
        if params:
            operation["parameters"] = params
        return operation

    query = [
        {"name": n, "in": "query", "required": False, "schema": {"type": t}}
        for n, t in (("metadata", "string"), ("state", "string"), ("order", "string"), ("startedAfter", "string"),
                     ("template", "string"), ("nextToken", "string"), ("limit", "integer"))
    ]
    listed = {"description": "sandboxes", "headers": {"X-Next-Token": {"schema": {"type": "string"}}},
              **_json_body({"type": "array", "items": _ref("ListedSandbox")})}
    no_content = {"204": {"description": "done"}}
    paths: dict[str, Any] = {
        "/sandboxes": {
            "post": op("Create a sandbox (v1)", {"201": sandbox_ok, **_errors(400, 401, 404, 429, 503)}, body="NewSandbox"),
            "get": op("List running sandboxes (v1)", {"200": listed, **_errors(400, 401)}, params=query[:1]),
        },
        "/v2/sandboxes": {
            "post": op("Create a sandbox", {"201": sandbox_ok, **_errors(400, 401, 404, 429, 503)}, body="NewSandbox"),
            "get": op("List sandboxes", {"200": listed, **_errors(400, 401)}, params=query),
        },
        "/sandboxes/{sandboxID}": {
            "get": op("Get a sandbox", {"200": {"description": "detail", **_json_body(_ref("SandboxDetail"))}, **_errors(401, 404)}, params=[sid]),
            "delete": op("Kill a sandbox", {**no_content, **_errors(401, 404)}, params=[sid]),
        },
        "/sandboxes/{sandboxID}/timeout": {
            "post": op("Set the timeout (from now)", {**no_content, **_errors(400, 401, 404)}, body="TimeoutRequest", params=[sid]),
        },
        "/sandboxes/{sandboxID}/refreshes": {
            "post": op("Keep a sandbox alive a little longer", {**no_content, **_errors(400, 401, 404)}, body="RefreshRequest", params=[sid]),
        },
        "/sandboxes/{sandboxID}/connect": {
            "post": op("Connect (resumes a paused sandbox)", {"200": sandbox_ok, "201": sandbox_ok, **_errors(400, 401, 404)}, body="ConnectSandbox", params=[sid]),
        },
        "/v2/sandboxes/{sandboxID}/connect": {
            "post": op("Connect (resumes a paused sandbox)", {"200": sandbox_ok, "201": sandbox_ok, **_errors(400, 401, 404)}, body="ConnectSandbox", params=[sid]),
        },
        "/sandboxes/{sandboxID}/pause": {
            "post": op("Pause", {**no_content, **_errors(401, 404, 409)}, body="PauseRequest", params=[sid]),
        },
        "/sandboxes/{sandboxID}/resume": {
            "post": op("Resume (deprecated: use connect)", {"201": sandbox_ok, **_errors(401, 404, 409)}, body="ResumeRequest", params=[sid]),
        },
        "/sandboxes/{sandboxID}/metrics": {
            "get": op("Resource use", {"200": {"description": "metrics", **_json_body({"type": "array", "items": _ref("SandboxMetric")})}, **_errors(401, 404)}, params=[sid]),
        },
        "/sandboxes/metrics": {
            "get": op("Resource use of several sandboxes", {"200": {"description": "metrics", **_json_body(_ref("SandboxesMetrics"))}, **_errors(400, 401)}),
        },
        "/sandboxes/{sandboxID}/logs": {
            "get": op("Lifecycle logs (v1)", {"200": {"description": "logs", **_json_body(_ref("SandboxLogs"))}, **_errors(401, 404)}, params=[sid]),
        },
        "/v2/sandboxes/{sandboxID}/logs": {
            "get": op("Lifecycle logs", {"200": {"description": "logs", **_json_body(_ref("SandboxLogsV2"))}, **_errors(400, 401, 404)}, params=[sid]),
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "cube control API (E2B-compatible)", "version": version},
        "components": {
            "schemas": components,
            "securitySchemes": {"ApiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        },
        "security": [{"ApiKeyAuth": []}],
        "paths": paths,
    }
