"""What the driver tests share (not a test module): spawning through the real Reaper, short
state directories, talking to the real envd in a slot, and reading files a sandbox wrote."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from cube.drivers.base import Instance
from guest import protocol as p
from guest.client import GuestClient
from supervisors import ProcessHandle, Reaper, Spawn

# A stand-in for envd where only the slot's lifecycle matters: a bare listener on the socket.
# It starts in ~15 ms where envd takes ~0.5 s, which keeps the suite short.
LISTENER = [
    "/usr/bin/python3",
    "-S",
    "-c",
    "import _socket, sys, time\n"
    "s = _socket.socket(1, 1); s.bind(sys.argv[1]); s.listen(8)\n"
    "while True: time.sleep(3600)",
    "{socket}",
]


class Spawner:
    """``spawn`` for a driver, backed by a real ``Reaper`` actor; remembers every handle."""

    def __init__(self, reaper: Any) -> None:
        self.reaper = reaper
        self.handles: list[ProcessHandle] = []

    async def __call__(self, argv: list[str], **kwargs: Any) -> ProcessHandle:
        handle: ProcessHandle = await self.reaper.call(Spawn(list(argv), owner=None, **kwargs))
        self.handles.append(handle)
        return handle

    def handle(self, pid: int) -> ProcessHandle:
        return next(h for h in self.handles if h.pid == pid)


def make_reaper() -> Reaper:
    return Reaper(orphan_interval=0.05)


@contextlib.contextmanager
def state_dir() -> Iterator[str]:
    """A short state directory (unix socket paths must fit in 107 bytes)."""
    path = tempfile.mkdtemp(prefix="cube-t", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def connect(instance: Instance) -> AsyncIterator[GuestClient]:
    """A session with the slot's envd over its unix socket."""
    stream = await trio.open_unix_socket(instance.envd.removeprefix("unix:"))
    async with stream, GuestClient.open(stream) as client:
        yield client


@dataclass
class Result:
    """How a command run through envd ended."""

    exit_code: int
    status: str
    stdout: str
    stderr: str


async def sh(
    client: GuestClient, script: str, *, user: str = "root", timeout: float = 30.0
) -> Result:
    """Run ``/bin/sh -c script`` in the sandbox through envd and wait for its end."""
    args = p.ProcessStart(process=p.ProcessConfig(cmd="/bin/sh", args=["-c", script]), user=user)
    out: list[bytes] = []
    err: list[bytes] = []
    end: p.ProcessEnded | None = None
    with trio.fail_after(timeout):
        remote = await client.start("process.start", args)
        async for kind, body in remote:
            if kind == "data":
                out.append(body.stdout or b"")
                err.append(body.stderr or b"")
            elif kind == "end":
                end = body
    assert end is not None, "the process stream ended without an end event"
    return Result(end.exit_code, end.status, b"".join(out).decode(), b"".join(err).decode())


async def start_background(client: GuestClient, script: str, *, user: str = "root") -> None:
    """Start ``script`` in the sandbox and return once it runs, without waiting for its end."""
    args = p.ProcessStart(
        process=p.ProcessConfig(cmd="/bin/sh", args=["-c", script]), user=user, stdin=False
    )
    remote = await client.start("process.start", args)
    kind, _ = await remote.next_event() or ("", None)
    assert kind == "start"


def read_inside(instance: Instance, path: str) -> str:
    """A file of the sandbox, read from the host through pid 1's root."""
    assert instance.root is not None
    with open(os.path.join(instance.root, path.lstrip("/"))) as f:
        return f.read()


async def wait_for_file(instance: Instance, path: str, timeout: float = 10.0) -> str:
    """Wait until the sandbox has written a non-empty ``path``; return its content."""
    with trio.fail_after(timeout):
        while True:
            try:
                text = read_inside(instance, path).strip()
            except FileNotFoundError:
                text = ""
            if text:
                return text
            await trio.sleep(0.01)


class Stopwatch:
    """Milliseconds since creation."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    @property
    def ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


def ns_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "Linux namespaces"
    if os.geteuid() != 0:
        return "needs root (namespaces, cgroups, veths)"
    if not os.path.exists("/usr/bin/python3"):
        return "needs the host's /usr/bin/python3 for the sandbox"
    return None


requires_ns = pytest.mark.skipif(ns_unavailable() is not None, reason=ns_unavailable() or "")
