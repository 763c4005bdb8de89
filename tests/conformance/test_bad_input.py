"""Bad input of every kind gets a clean 4xx (or Connect error) and the server keeps serving."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import httpx
import pytest
from conformance_kit import LiveServer
from e2b import Sandbox


@pytest.fixture(scope="module")
def target(server: LiveServer) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(timeout=300)
    try:
        yield sandbox
    finally:
        sandbox.kill()


@pytest.fixture
def api(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"X-API-KEY": server.api_key}, timeout=15) as client:
        yield client


def envd_headers(sandbox: Sandbox, **extra: str) -> dict[str, str]:
    return {
        "E2b-Sandbox-Id": sandbox.sandbox_id,
        "E2b-Sandbox-Port": "49983",
        "X-Access-Token": sandbox._envd_access_token or "",
        **extra,
    }


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


def rest_error(response: httpx.Response, status: int) -> dict[str, object]:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status and isinstance(body["message"], str) and body["message"]
    return body  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"{not json", "application/json"),
        (b'{"templateID": 5}', "application/json"),
        (b"{}", "application/json"),
        (b'{"templateID": "base", "timeout": -1}', "application/json"),
        (b'{"templateID": "base", "envVars": {"A=B": "x"}}', "application/json"),
        (b'{"templateID": "base", "network": {"allowOut": ["not-an-ip"]}}', "application/json"),
        (b"templateID=base", "application/x-www-form-urlencoded"),
        (b"", "application/json"),
    ],
)
def test_create_rejects_bad_bodies(api: httpx.Client, content: bytes, content_type: str) -> None:
    rest_error(api.post("/v2/sandboxes", content=content, headers={"Content-Type": content_type}), 400)


def test_create_rejects_unknown_templates_and_huge_bodies(api: httpx.Client) -> None:
    rest_error(api.post("/v2/sandboxes", json={"templateID": "no-such-template"}), 404)
    huge = {"templateID": "base", "metadata": {"k": "v" * (2 << 20)}}
    rest_error(api.post("/v2/sandboxes", json=huge), 413)


@pytest.mark.parametrize(
    "params",
    [
        {"state": "exploded"},
        {"state": "killed"},
        {"order": "sideways"},
        {"limit": "0"},
        {"limit": "many"},
        {"startedAfter": "yesterday"},
        {"nextToken": "garbage!"},
        {"metadata": "novalue"},
    ],
)
def test_list_rejects_bad_queries(api: httpx.Client, params: dict[str, str]) -> None:
    rest_error(api.get("/v2/sandboxes", params=params), 400)


@pytest.mark.parametrize("sandbox_id", ["a" * 20, "UPPERCASE12345678901", "..%2F..%2Fetc%2Fpasswd", "x" * 300])
def test_unknown_or_malformed_ids_are_404(api: httpx.Client, sandbox_id: str) -> None:
    rest_error(api.get(f"/sandboxes/{sandbox_id}"), 404)
    rest_error(api.post(f"/sandboxes/{sandbox_id}/timeout", json={"timeout": 10}), 404)
    rest_error(api.post(f"/v2/sandboxes/{sandbox_id}/connect", json={}), 404)


def test_auth_and_routing_errors(server: LiveServer, api: httpx.Client, target: Sandbox) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as plain:
        rest_error(plain.get("/v2/sandboxes"), 401)
        rest_error(plain.get("/v2/sandboxes", headers={"X-API-KEY": "e2b_" + "f" * 40}), 401)
    rest_error(api.get("/no/such/route"), 404)
    rest_error(api.put("/v2/sandboxes"), 405)
    rest_error(api.post(f"/sandboxes/{target.sandbox_id}/timeout", json={"timeout": "soon"}), 400)
    rest_error(api.post(f"/sandboxes/{target.sandbox_id}/timeout", json={"timeout": 10**9}), 400)


def test_connect_rpc_errors(server: LiveServer, target: Sandbox) -> None:
    url = server.url
    stat = f"{url}/filesystem.Filesystem/Stat"
    start = f"{url}/process.Process/Start"
    with httpx.Client(timeout=10) as http:
        bad_json = http.post(stat, content=b"{", headers=envd_headers(target, **{"Content-Type": "application/json"}))
        assert bad_json.status_code == 400 and bad_json.json()["code"] == "invalid_argument"
        wrong_field = http.post(stat, json={"path": 7}, headers=envd_headers(target))
        assert wrong_field.json()["code"] == "invalid_argument"
        wrong_type = http.post(stat, content=b"{}", headers=envd_headers(target, **{"Content-Type": "text/plain"}))
        assert wrong_type.status_code == 415
        no_token = http.post(stat, json={"path": "/"}, headers={**envd_headers(target), "X-Access-Token": "nope"})
        assert no_token.status_code == 401 and no_token.json()["code"] == "unauthenticated"
        unknown = http.post(f"{url}/process.Process/Teleport", json={}, headers=envd_headers(target))
        assert unknown.status_code == 404 and unknown.json()["code"] == "unimplemented"
        stream = {"Content-Type": "application/connect+json"}
        message = json.dumps({"process": {"cmd": "/bin/true"}}).encode()
        truncated = http.post(start, content=envelope(message)[:-3], headers=envd_headers(target, **stream))
        assert truncated.status_code == 400 and truncated.json()["code"] == "invalid_argument"
        two = http.post(start, content=envelope(message) * 2, headers=envd_headers(target, **stream))
        assert two.json()["code"] == "invalid_argument"
        compressed = http.post(start, content=envelope(message, flags=1), headers=envd_headers(target, **stream))
        assert compressed.json()["code"] == "invalid_argument"
        oversized = http.post(start, content=struct.pack(">BI", 0, 64 << 20), headers=envd_headers(target, **stream))
        assert oversized.json()["code"] == "invalid_argument"
        as_unary = http.post(start, content=message, headers=envd_headers(target, **{"Content-Type": "application/json"}))
        assert as_unary.status_code == 415
        bad_deadline = http.post(stat, json={"path": "/"}, headers=envd_headers(target, **{"Connect-Timeout-Ms": "-5"}))
        assert bad_deadline.json()["code"] == "invalid_argument"


def test_sandbox_traffic_for_unknown_sandboxes_and_ports(server: LiveServer, target: Sandbox) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for sandbox_id in ("z" * 20, "../../etc", ""):
            gone = http.get("/health", headers={"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"})
            assert gone.status_code == 502 and "was not found" in gone.json()["message"]
        closed = http.get("/", headers={"E2b-Sandbox-Id": target.sandbox_id, "E2b-Sandbox-Port": "8080"})
        assert closed.status_code == 502
        assert closed.json() == {
            "sandboxId": target.sandbox_id,
            "message": "The sandbox is running but port is not open",
            "code": 502,
            "port": 8080,
        }
        by_host = http.get("/health", headers={"Host": f"49983-{target.sandbox_id}.cube.test"})
        assert by_host.status_code == 204


def test_files_errors_and_traversal(server: LiveServer, target: Sandbox) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as http:
        headers = envd_headers(target)
        rest_error(http.get("/files", headers=headers), 400)
        rest_error(http.get("/files", params={"path": "/no/such/file"}, headers=headers), 404)
        rest_error(http.get("/files", params={"path": "/tmp"}, headers=headers), 400)
        rest_error(http.get("/files", params={"path": "/etc/hostname"}, headers={**headers, "X-Access-Token": "x"}), 401)
        rest_error(http.get("/files", params={"path": "/etc/hostname", "signature": "v1_forged"}), 401)
        rest_error(http.post("/files", content=b"data", headers={**headers, "Content-Type": "application/octet-stream"}), 400)
        rest_error(http.post("/files", params={"path": "/tmp/x"}, content=b"x", headers={**headers, "Content-Type": "text/plain"}), 400)
        rest_error(
            http.post(
                "/files",
                params={"path": "/tmp/x.gz"},
                content=b"not gzip at all",
                headers={**headers, "Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
            ),
            400,
        )
        rest_error(
            http.post("/files", content=b"--b\r\nbroken", headers={**headers, "Content-Type": "multipart/form-data; boundary=b"}),
            400,
        )
        # The API never maps a request path onto the host's filesystem.
        for path in ("/files/../../etc/passwd", "/..%2F..%2Fetc%2Fpasswd", "/static/../../etc/passwd"):
            response = http.get(path, headers=headers)
            assert response.status_code == 404 and b"root:" not in response.content


def test_execute_errors(server: LiveServer) -> None:
    from e2b_code_interpreter import Sandbox as CodeSandbox

    sandbox = CodeSandbox.create(timeout=120)
    try:
        headers = {
            "E2b-Sandbox-Id": sandbox.sandbox_id,
            "E2b-Sandbox-Port": "49999",
            "E2B-Traffic-Access-Token": sandbox.traffic_access_token or "",
        }
        with httpx.Client(base_url=server.url, timeout=10) as http:
            assert http.post("/execute", content=b"{", headers=headers).status_code == 400
            both = http.post("/execute", json={"code": "1", "context_id": "c", "language": "python"}, headers=headers)
            assert both.status_code == 400
            missing = http.post("/execute", json={"code": "1", "context_id": "nope"}, headers=headers)
            assert missing.status_code == 404 and missing.text == "Context nope not found"
            assert http.delete("/contexts/nope", headers=headers).status_code == 404
    finally:
        sandbox.kill()


def test_the_server_still_serves_after_all_that(server: LiveServer, target: Sandbox) -> None:
    assert target.commands.run("echo alive").stdout == "alive\n"
    with httpx.Client(base_url=server.url, timeout=5) as http:
        assert http.get("/health").status_code == 200
