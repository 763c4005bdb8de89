"""envd as a real subprocess, and the helpers the guest tests share (not a test module)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from guest import protocol as p
from guest.client import GuestClient, RemoteStream

ROOT = Path(__file__).resolve().parents[2]
MARK = "CUBE_GUEST_TEST"


def marked_processes(marker: str) -> list[int]:
    """Pids of live processes whose environment carries ``MARK=marker`` (envd's children)."""
    needle = f"{MARK}={marker}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z" and needle in environ.split(b"\0"):
            found.append(int(name))
    return found


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


@dataclass
class Envd:
    """One envd subprocess; every process it starts carries a marker to find leaks with."""

    workdir: Path
    transport: str = "unix"
    extra: tuple[str, ...] = ()
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    process: subprocess.Popen[bytes] | None = None
    device: int | None = None  # the host's end of the pty standing in for a device

    @property
    def socket(self) -> str:
        return str(self.workdir / "envd.sock")

    @property
    def tmp(self) -> Path:
        return self.workdir / "tmp"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "guest.envd"]
        if self.transport == "unix":
            argv += ["--listen", f"unix:{self.socket}"]
        elif self.transport == "stdio":
            argv += ["--stdio"]
        elif self.transport == "device":
            assert self.device is not None
            argv += ["--device", os.ttyname(self._slave)]
        # any other transport comes entirely from ``extra`` (e.g. --vsock PORT)
        return [
            *argv,
            "--default-user",
            "user",
            "--env",
            f"{MARK}={self.marker}",
            "--env",
            f"TMPDIR={self.tmp}",
            "--keepalive",
            "0",
            *self.extra,
        ]

    def start(self) -> Envd:
        self.tmp.mkdir(parents=True, exist_ok=True)
        options: dict[str, Any] = {"cwd": ROOT, "stderr": None}
        if self.transport == "device":
            self.device, self._slave = os.openpty()
        if self.transport == "stdio":
            options.update(stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.process = subprocess.Popen(self.argv(), **options)
        if self.transport == "unix":
            assert wait_until(lambda: os.path.exists(self.socket)), "envd did not listen"
        return self

    def stop(self) -> int:
        """Stop envd with SIGTERM and check that nothing it started is left."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("envd did not stop on SIGTERM") from None
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        if self.device is not None:
            os.close(self.device)
            os.close(self._slave)
            self.device = None
        return code

    def leaks(self) -> list[str]:
        """What envd left behind: processes, its socket, temporary files."""
        left = [f"process {pid}" for pid in marked_processes(self.marker)]
        if os.path.exists(self.socket):
            left.append(f"socket {self.socket}")
        if self.tmp.exists():
            left += [f"temp file {path}" for path in self.tmp.iterdir()]
        return left


@contextlib.asynccontextmanager
async def connect(envd: Envd, **options: Any) -> AsyncIterator[GuestClient]:
    """A client on a fresh unix-socket connection to ``envd``."""
    stream = await trio.open_unix_socket(envd.socket)
    async with stream, GuestClient.open(stream, **options) as client:
        yield client


@dataclass
class Run:
    """Everything one process stream produced."""

    events: list[tuple[str, Any]]
    end: p.ProcessEnded | None
    error: p.GuestError | None

    @property
    def stdout(self) -> bytes:
        return b"".join(b.stdout or b"" for ev, b in self.events if ev == "data")

    @property
    def stderr(self) -> bytes:
        return b"".join(b.stderr or b"" for ev, b in self.events if ev == "data")

    @property
    def pty(self) -> bytes:
        return b"".join(b.pty or b"" for ev, b in self.events if ev == "data")

    @property
    def pid(self) -> int:
        kind, body = self.events[0]
        assert kind == "start"
        return int(body.pid)


async def collect(remote: RemoteStream) -> Run:
    """Consume a process stream to its end."""
    events: list[tuple[str, Any]] = []
    error = None
    try:
        with trio.fail_after(60):  # a hang is a failure, not a stuck suite
            async for event in remote:
                events.append(event)
    except p.GuestError as exc:
        error = exc
    ends = [body for ev, body in events if ev == "end"]
    return Run(events, ends[-1] if ends else None, error)


def shell(script: str, **options: Any) -> p.ProcessStart:
    """A ProcessStart for ``/bin/sh -c script``."""
    config_keys = {"envs", "cwd"}
    config = {k: v for k, v in options.items() if k in config_keys}
    rest = {k: v for k, v in options.items() if k not in config_keys}
    return p.ProcessStart(
        process=p.ProcessConfig(cmd="/bin/sh", args=["-c", script], **config), **rest
    )


async def run(client: GuestClient, script: str, **options: Any) -> Run:
    """Run a shell script through envd and collect its stream."""
    return await collect(await client.start("process.start", shell(script, **options)))


async def first_event(remote: RemoteStream, kind: str, timeout: float = 10.0) -> Any:
    """Skip events until one of ``kind`` arrives; return its body."""
    with trio.fail_after(timeout):
        while True:
            event = await remote.next_event()
            assert event is not None, f"stream ended before a {kind} event"
            if event[0] == kind:
                return event[1]
