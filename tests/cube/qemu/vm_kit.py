"""Helpers for the QEMU tests: an NDJSON client for the guest agent's channel."""

from __future__ import annotations

import itertools
import json
import os
import secrets
from typing import Any

import trio

# Built once per machine (the key changes when an input does), shared by every test run.
TEST_IMAGES = os.environ.get("CUBE_TEST_IMAGES", "/var/tmp/cube-test-images")
# The durable checkpoints of the test image, shared by every test (and test run) likewise.
CHECKPOINTS = os.path.join(TEST_IMAGES, "checkpoints")


class AgentClient:
    """A minimal host end of the agent channel: one request at a time, replies by id."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream_ = stream
        self.buffer = b""
        self.ids = itertools.count(100)

    @classmethod
    async def connect(cls, envd: str) -> AgentClient:
        assert envd.startswith("unix:"), envd
        client = cls(await trio.open_unix_socket(envd[len("unix:") :]))
        info = await client.call("hello", {"version": 1, "session": secrets.token_hex(8)})
        assert info["version"] == 1
        return client

    async def send(self, op: str, args: dict[str, Any] | None = None) -> int:
        rid = next(self.ids)
        frame = {"id": rid, "op": op, "args": args or {}}
        await self.stream_.send_all(json.dumps(frame).encode() + b"\n")
        return rid

    async def reply(self, rid: int) -> dict[str, Any]:
        """The final frame (ok or err) of request ``rid``; stream events are skipped."""
        while True:
            while b"\n" not in self.buffer:
                chunk = await self.stream_.receive_some(65536)
                assert chunk, "the agent channel closed"
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\n", 1)
            if not line.strip():
                continue  # envd starts a session with a bare newline (ends any partial line)
            frame = json.loads(line)
            if frame.get("id") == rid and ("ok" in frame or "err" in frame):
                return frame

    async def stream(self, rid: int) -> list[dict[str, Any]]:
        """Every frame of request ``rid`` up to and including its final ok or err."""
        frames = []
        while True:
            while b"\n" not in self.buffer:
                chunk = await self.stream_.receive_some(65536)
                assert chunk, "the agent channel closed"
                self.buffer += chunk
            line, self.buffer = self.buffer.split(b"\n", 1)
            if not line.strip():
                continue  # envd starts a session with a bare newline (ends any partial line)
            frame = json.loads(line)
            if frame.get("id") == rid:
                frames.append(frame)
                if "ok" in frame or "err" in frame:
                    return frames

    async def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        frame = await self.reply(await self.send(op, args))
        assert "ok" in frame, frame
        return frame["ok"]

    async def aclose(self) -> None:
        await self.stream_.aclose()
