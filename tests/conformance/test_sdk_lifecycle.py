"""Sandbox lifecycle through the real ``e2b`` SDK (sync client) and the raw REST routes."""

from __future__ import annotations

import datetime as dt
import secrets
import time

import httpx
import pytest
from conformance_kit import LiveServer
from e2b import (
    AuthenticationException,
    Sandbox,
    SandboxNotFoundException,
    SandboxNotRunningException,
    SandboxQuery,
    SandboxState,
)


def _api(server: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"X-API-KEY": server.api_key}, timeout=30)


def test_create_returns_a_running_sandbox_with_metadata_and_envs(server: LiveServer) -> None:
    sbx = Sandbox.create(timeout=120, metadata={"k": "v"}, envs={"FOO": "bar"})
    try:
        assert len(sbx.sandbox_id) == 20
        info = sbx.get_info()
        assert info.metadata == {"k": "v"}
        assert info.template_id == "base"
        assert info.state == SandboxState.RUNNING
        assert 100 <= (info.end_at - info.started_at).total_seconds() <= 121
        assert sbx.commands.run("echo $FOO").stdout == "bar\n"
        assert sbx.is_running()
    finally:
        sbx.kill()


def test_set_timeout_moves_the_end_both_ways(sbx: Sandbox) -> None:
    sbx.set_timeout(30)
    end = sbx.get_info().end_at
    assert 25 <= (end - dt.datetime.now(dt.UTC)).total_seconds() <= 31
    sbx.set_timeout(600)
    end = sbx.get_info().end_at
    assert (end - dt.datetime.now(dt.UTC)).total_seconds() > 500


def test_kill_ends_the_sandbox_and_every_request_to_it(server: LiveServer) -> None:
    sbx = Sandbox.create(timeout=60)
    assert sbx.is_running()
    sbx.kill()
    assert not sbx.is_running()
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("true")
    assert Sandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id)


def test_kill_and_get_info_of_unknown_ids(server: LiveServer) -> None:
    assert Sandbox.kill("a" * 20) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info("b" * 20)


def test_sandbox_expires_at_its_timeout(server: LiveServer) -> None:
    sbx = Sandbox.create(timeout=1)
    deadline = time.monotonic() + 10
    while sbx.is_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not sbx.is_running()


def test_list_filters_by_metadata_and_state_and_pages(server: LiveServer) -> None:
    tag = secrets.token_hex(4)
    made = [Sandbox.create(timeout=120, metadata={"run": tag, "n": str(i), "odd key&": "a=b"}) for i in range(3)]
    try:
        query = SandboxQuery(metadata={"run": tag})
        paginator = Sandbox.list(query=query, limit=2)
        first = paginator.next_items()
        assert len(first) == 2 and paginator.has_next
        second = paginator.next_items()
        assert len(second) == 1 and not paginator.has_next
        ids = {s.sandbox_id for s in first + second}
        assert ids == {s.sandbox_id for s in made}
        # newest first by default
        assert [s.metadata["n"] for s in first] == ["2", "1"]
        odd = Sandbox.list(query=SandboxQuery(metadata={"run": tag, "odd key&": "a=b", "n": "0"})).next_items()
        assert [s.sandbox_id for s in odd] == [made[0].sandbox_id]
        paused = Sandbox.list(query=SandboxQuery(metadata={"run": tag}, state=[SandboxState.PAUSED])).next_items()
        assert paused == []
    finally:
        for s in made:
            s.kill()
    assert Sandbox.list(query=SandboxQuery(metadata={"run": tag})).next_items() == []


def test_connect_to_a_running_sandbox_extends_only(server: LiveServer) -> None:
    sbx = Sandbox.create(timeout=300)
    try:
        end = sbx.get_info().end_at
        again = Sandbox.connect(sbx.sandbox_id, timeout=10)
        assert again.sandbox_id == sbx.sandbox_id
        assert again.get_info().end_at == end  # never shortened
        assert again.commands.run("echo hi").stdout == "hi\n"
    finally:
        sbx.kill()


def test_pause_then_connect_resumes(server: LiveServer) -> None:
    sbx = Sandbox.create(timeout=120)
    try:
        sbx.commands.run("echo kept > /tmp/cube-pause-$$-probe || true")
        assert sbx.pause() is True
        assert sbx.get_info().state == SandboxState.PAUSED
        assert not sbx.is_running()
        assert Sandbox.pause(sbx.sandbox_id) is False  # 409: already paused
        resumed = Sandbox.connect(sbx.sandbox_id)
        assert resumed.get_info().state == SandboxState.RUNNING
        assert resumed.commands.run("echo back").stdout == "back\n"
    finally:
        sbx.kill()


def test_get_metrics_reports_resources(sbx: Sandbox) -> None:
    metrics = sbx.get_metrics()
    assert len(metrics) == 1
    sample = metrics[0]
    assert sample.cpu_count >= 1
    assert sample.mem_total == 512 * 1024 * 1024
    assert sample.mem_used > 0
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    assert sbx.get_metrics(start=long_ago, end=long_ago + dt.timedelta(minutes=5)) == []


def test_wrong_api_key_is_refused(server: LiveServer) -> None:
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="e2b_" + "0" * 40)


def test_v1_routes_create_and_connect(server: LiveServer) -> None:
    with _api(server) as api:
        created = api.post("/sandboxes", json={"templateID": "base", "timeout": 60, "secure": True, "metadata": {}})
        assert created.status_code == 201
        body = created.json()
        assert {"templateID", "sandboxID", "clientID", "envdVersion", "envdAccessToken"} <= body.keys()
        sid = body["sandboxID"]
        connected = api.post(f"/sandboxes/{sid}/connect", json={"timeout": 60})
        assert connected.status_code == 200
        assert connected.json()["envdAccessToken"] == body["envdAccessToken"]
        listed = api.get("/sandboxes")
        assert sid in [s["sandboxID"] for s in listed.json()]
        assert api.post(f"/sandboxes/{sid}/resume", json={}).status_code == 409
        assert api.post(f"/sandboxes/{sid}/pause", json={}).status_code == 204
        resumed = api.post(f"/sandboxes/{sid}/resume", json={"timeout": 60})
        assert resumed.status_code == 201
        assert api.post(f"/sandboxes/{sid}/refreshes", json={"duration": 10}).status_code == 204
        assert api.delete(f"/sandboxes/{sid}").status_code == 204
        assert api.delete(f"/sandboxes/{sid}").status_code == 404


def test_logs_and_bulk_metrics(server: LiveServer, sbx: Sandbox) -> None:
    with _api(server) as api:
        logs = api.get(f"/sandboxes/{sbx.sandbox_id}/logs")
        assert logs.status_code == 200
        assert logs.json()["logs"][0]["line"].startswith("sandbox")
        v2 = api.get(f"/v2/sandboxes/{sbx.sandbox_id}/logs", params={"direction": "backward", "level": "info"})
        assert v2.status_code == 200 and v2.json()["logs"]
        bulk = api.get("/sandboxes/metrics", params={"sandbox_ids": sbx.sandbox_id})
        assert sbx.sandbox_id in bulk.json()["sandboxes"]


def test_operations_endpoints(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as plain:
        assert plain.get("/health").status_code == 200
        metrics = plain.get("/metrics")
        assert metrics.status_code == 200
        assert "cube_http_requests_total" in metrics.text
        assert "cube_sandboxes" in metrics.text
        document = plain.get("/openapi.json").json()
        assert document["openapi"].startswith("3.")
        assert "/v2/sandboxes" in document["paths"]
        echoed = plain.get("/health", headers={"X-Request-Id": "req-123"})
        assert echoed.headers["x-request-id"] == "req-123"


def test_a_retried_create_with_the_same_idempotency_key_gets_the_same_sandbox(server: LiveServer) -> None:
    key = f"retry-{secrets.token_hex(6)}"
    first = Sandbox.create(timeout=60, idempotency_key=key)
    try:
        second = Sandbox.create(timeout=60, idempotency_key=key)
        assert second.sandbox_id == first.sandbox_id
    finally:
        first.kill()
    with _api(server) as api:
        bad = api.post("/v2/sandboxes", json={"templateID": "base"}, headers={"Idempotency-Key": "NOT VALID"})
        assert bad.status_code == 400


def test_on_timeout_pause_keeps_the_sandbox_and_traffic_resumes_it(server: LiveServer) -> None:
    sbx = Sandbox.create(timeout=1, lifecycle={"on_timeout": "pause", "auto_resume": True})
    try:
        info = sbx.get_info()
        assert info.lifecycle == {"on_timeout": "pause", "auto_resume": True}
        deadline = time.monotonic() + 10
        while Sandbox.get_info(sbx.sandbox_id).state != SandboxState.PAUSED:
            assert time.monotonic() < deadline, "not paused at its timeout"
            time.sleep(0.2)
        assert sbx.commands.run("echo awake").stdout == "awake\n"  # traffic resumes it
        assert sbx.get_info().state == SandboxState.RUNNING
    finally:
        sbx.kill()
