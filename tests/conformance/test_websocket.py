"""The WebSocket endpoints, driven by trio-websocket clients."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import trio
from conformance_kit import LiveServer
from e2b import Sandbox
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url


@pytest.fixture
async def sandbox(server: LiveServer) -> AsyncIterator[Sandbox]:
    sbx = await trio.to_thread.run_sync(lambda: Sandbox.create(timeout=120))
    try:
        yield sbx
    finally:
        await trio.to_thread.run_sync(sbx.kill)


def ws_url(server: LiveServer, sandbox: Sandbox, endpoint: str, query: str = "") -> str:
    base = server.url.replace("http://", "ws://")
    return f"{base}/sandboxes/{sandbox.sandbox_id}/{endpoint}?api_key={server.api_key}{query}"


async def frames_until_exit(ws: object) -> list[dict[str, object]]:
    frames: list[dict[str, object]] = []
    with trio.fail_after(15):
        while True:
            try:
                message = await ws.get_message()  # type: ignore[attr-defined]
            except ConnectionClosed:
                return frames
            if isinstance(message, str):  # terminals also send binary output frames
                frames.append(json.loads(message))


async def test_command_streams_stdout_stderr_and_exit(server: LiveServer, sandbox: Sandbox) -> None:
    async with open_websocket_url(ws_url(server, sandbox, "commands")) as ws:
        await ws.send_message(json.dumps({"type": "start", "cmd": "echo out; echo err >&2; exit 4"}))
        frames = await frames_until_exit(ws)
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "start" and kinds[-1] == "exit"
    assert "".join(str(f["data"]) for f in frames if f["type"] == "stdout") == "out\n"
    assert "".join(str(f["data"]) for f in frames if f["type"] == "stderr") == "err\n"
    assert frames[-1]["exit_code"] == 4


async def test_command_takes_stdin_and_signals(server: LiveServer, sandbox: Sandbox) -> None:
    async with open_websocket_url(ws_url(server, sandbox, "commands")) as ws:
        await ws.send_message(json.dumps({"type": "start", "cmd": "cat", "stdin": True}))
        start = json.loads(await ws.get_message())
        assert start["type"] == "start"
        await ws.send_message(json.dumps({"type": "stdin", "data": "ping\n"}))
        echoed = json.loads(await ws.get_message())
        assert echoed == {"type": "stdout", "data": "ping\n"}
        await ws.send_message(json.dumps({"type": "signal", "signal": "SIGTERM"}))
        frames = await frames_until_exit(ws)
    assert frames[-1]["type"] == "exit" and frames[-1]["exited"] is False


async def test_attach_to_a_running_pid(server: LiveServer, sandbox: Sandbox) -> None:
    handle = await trio.to_thread.run_sync(
        lambda: sandbox.commands.run("sleep 0.5; echo attached", background=True, timeout=0)
    )
    async with open_websocket_url(ws_url(server, sandbox, "commands", f"&pid={handle.pid}")) as ws:
        frames = await frames_until_exit(ws)
    assert frames[0] == {"type": "start", "pid": handle.pid}
    assert any(f.get("data") == "attached\n" for f in frames)


async def test_unknown_pid_is_an_error_frame(server: LiveServer, sandbox: Sandbox) -> None:
    async with open_websocket_url(ws_url(server, sandbox, "commands")) as ws:
        await ws.send_message(json.dumps({"type": "connect", "pid": 999999}))
        frames = await frames_until_exit(ws)
    assert frames == [{"type": "error", "code": "not_found", "message": frames[0]["message"]}]


async def test_terminal_echoes_input_and_resizes(server: LiveServer, sandbox: Sandbox) -> None:
    async with open_websocket_url(ws_url(server, sandbox, "terminal", "&cols=80&rows=24")) as ws:
        assert json.loads(await ws.get_message())["type"] == "start"
        await ws.send_message(json.dumps({"type": "resize", "cols": 120, "rows": 33}))
        await ws.send_message(b"stty size; echo t$((6*7))t\n")
        seen = b""
        with trio.fail_after(15):
            while b"t42t" not in seen:
                message = await ws.get_message()
                if isinstance(message, bytes):
                    seen += message
        assert b"33 120" in seen
        await ws.send_message("exit\n")  # plain text is terminal input too
        frames = await frames_until_exit(ws)
    assert frames and frames[-1]["type"] == "exit"


async def test_bad_credentials_are_rejected(server: LiveServer, sandbox: Sandbox) -> None:
    url = ws_url(server, sandbox, "commands").replace(server.api_key, "e2b_" + "1" * 40)
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url):
            pass
    assert info.value.status_code == 401


async def test_access_token_opens_a_session(server: LiveServer, sandbox: Sandbox) -> None:
    base = server.url.replace("http://", "ws://")
    token = sandbox._envd_access_token
    url = f"{base}/sandboxes/{sandbox.sandbox_id}/commands?access_token={token}&cmd=echo%20tok"
    async with open_websocket_url(url) as ws:
        frames = await frames_until_exit(ws)
    assert {"type": "stdout", "data": "tok\n"} in frames
