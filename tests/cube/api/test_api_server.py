"""The server in-process: a real node (process driver) behind ``serve``, spoken to over HTTP."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from cube.api import ApiKeys, ensure_api_keys, serve
from cube.config import load_config
from cube.node import Node, open_node

KEY = "e2b_" + "5" * 40


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    state_dir = tempfile.mkdtemp(prefix="cube-", dir="/tmp")  # short: slots hold unix sockets
    config = load_config(
        env={"CUBE_STATE_DIR": state_dir, "CUBE_DRIVER": "process"},
        overrides={"pools": {"base": {"size": 1}}},
    )
    try:
        async with open_node(config) as running:
            yield running
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture
async def base_url(node: Node) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: serve(node, ApiKeys([KEY]), host="127.0.0.1", port=0, task_status=task_status)
        )
        yield binds[0]
        nursery.cancel_scope.cancel()


async def test_generated_key_is_kept_across_restarts(node: Node) -> None:
    keys, generated = await ensure_api_keys(node, [])
    assert generated is not None and re.fullmatch(r"e2b_[0-9a-f]{40}", generated)
    keys.check(generated)
    _, again = await ensure_api_keys(node, [])
    assert again == generated
    configured, none = await ensure_api_keys(node, ["e2b_configured"])
    assert none is None
    configured.check("e2b_configured")


async def test_create_run_and_kill_over_http(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url, headers={"X-API-KEY": KEY}, timeout=30) as api:
        assert (await api.get("/health")).status_code == 200
        created = await api.post("/v2/sandboxes", json={"templateID": "base", "metadata": {"a": "b"}})
        assert created.status_code == 201, created.text
        sandbox = created.json()
        envd = {
            "E2b-Sandbox-Id": sandbox["sandboxID"],
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": sandbox["envdAccessToken"],
        }
        listed = await api.post("/process.Process/List", json={}, headers=envd)
        assert listed.status_code == 200 and "processes" in listed.json()
        stat = await api.post("/filesystem.Filesystem/Stat", json={"path": "/"}, headers=envd)
        assert stat.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY"
        assert (await api.delete(f"/sandboxes/{sandbox['sandboxID']}")).status_code == 204
        gone = await api.get("/health", headers=envd)
        assert gone.status_code == 502


async def test_requests_without_a_key_are_refused(base_url: str) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as plain:
        refused = await plain.get("/v2/sandboxes")
        assert refused.status_code == 401 and refused.json()["code"] == 401


def test_cube_serve_once_starts_and_stops() -> None:
    state_dir = tempfile.mkdtemp(prefix="cube-", dir="/tmp")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "cube.cli", "serve", "--once", "--driver", "process",
             "--state-dir", state_dir, "--port", "0", "--log-level", "warning"],
            capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": state_dir},
        )
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    assert re.search(r"API key \(generated.*\): e2b_[0-9a-f]{40}", result.stderr)
    assert "serving on http://127.0.0.1:" in result.stderr
    assert "registry" in result.stdout
