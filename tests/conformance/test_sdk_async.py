"""The real ``e2b`` SDK's async client (``AsyncSandbox``), run under asyncio."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conformance_kit import LiveServer
from e2b import (
    AsyncSandbox,
    CommandExitException,
    FileNotFoundException,
    PtySize,
    SandboxNotRunningException,
    SandboxQuery,
    TimeoutException,
)
from e2b.sandbox.filesystem.watch_handle import FilesystemEvent


def run(scenario: Callable[[AsyncSandbox], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        sandbox = await AsyncSandbox.create(timeout=120, metadata={"suite": "async"})
        try:
            return await scenario(sandbox)
        finally:
            await sandbox.kill()

    return asyncio.run(main())


def test_async_lifecycle(server: LiveServer) -> None:
    async def main() -> None:
        tag = secrets.token_hex(4)
        sandbox = await AsyncSandbox.create(timeout=60, metadata={"tag": tag}, envs={"X": "1"})
        assert await sandbox.is_running()
        info = await sandbox.get_info()
        assert info.metadata == {"tag": tag}
        await sandbox.set_timeout(90)
        listed = await AsyncSandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
        assert [s.sandbox_id for s in listed] == [sandbox.sandbox_id]
        again = await AsyncSandbox.connect(sandbox.sandbox_id)
        assert (await again.commands.run("echo $X")).stdout == "1\n"
        assert await sandbox.pause() is True
        resumed = await AsyncSandbox.connect(sandbox.sandbox_id)
        assert await resumed.is_running()
        assert len(await sandbox.get_metrics()) == 1
        await sandbox.kill()
        assert not await sandbox.is_running()
        with pytest.raises(SandboxNotRunningException):
            await sandbox.commands.run("true")
        assert await AsyncSandbox.kill(sandbox.sandbox_id) is False

    asyncio.run(main())


def test_async_commands(server: LiveServer) -> None:
    async def scenario(sbx: AsyncSandbox) -> None:
        seen: list[str] = []
        result = await sbx.commands.run("echo a; echo b", on_stdout=seen.append)
        assert result.stdout == "a\nb\n" and "".join(seen) == "a\nb\n"
        with pytest.raises(CommandExitException):
            await sbx.commands.run("exit 2")
        with pytest.raises(TimeoutException):
            await sbx.commands.run("sleep 20", timeout=2)
        handle = await sbx.commands.run("cat", background=True, stdin=True, timeout=0)
        await sbx.commands.send_stdin(handle.pid, "piped")
        await sbx.commands.close_stdin(handle.pid)
        assert (await handle.wait()).stdout == "piped"
        sleeper = await sbx.commands.run("echo up; sleep 60", background=True, timeout=0, on_stdout=seen.append)
        while "up\n" not in seen:  # let its login shell finish first (see test_sdk_commands.started)
            await asyncio.sleep(0.05)
        assert sleeper.pid in [p.pid for p in await sbx.commands.list()]
        assert await sbx.commands.kill(sleeper.pid) is True

    run(scenario)


def test_async_pty(server: LiveServer) -> None:
    async def scenario(sbx: AsyncSandbox) -> None:
        output: list[bytes] = []
        got = asyncio.Event()

        def on_data(data: bytes) -> None:
            output.append(data)
            if b"pty1ok" in b"".join(output):
                got.set()

        terminal = await sbx.pty.create(PtySize(rows=24, cols=80), on_data=on_data, timeout=0)
        await sbx.pty.resize(terminal.pid, PtySize(rows=30, cols=90))
        await sbx.pty.send_stdin(terminal.pid, b"stty size; echo pty$((1))ok\n")
        await asyncio.wait_for(got.wait(), 10)
        assert b"30 90" in b"".join(output)
        assert await sbx.pty.kill(terminal.pid) is True

    run(scenario)


def test_async_files_and_watch_stream(server: LiveServer) -> None:
    async def scenario(sbx: AsyncSandbox) -> None:
        base = f"/tmp/cube-conformance/{secrets.token_hex(6)}"
        await sbx.files.make_dir(base)
        events: list[FilesystemEvent] = []
        seen = asyncio.Event()

        def on_event(event: FilesystemEvent) -> None:
            events.append(event)
            if event.name == "x.txt":
                seen.set()

        handle = await sbx.files.watch_dir(base, on_event=on_event, recursive=True)
        await sbx.files.write(f"{base}/x.txt", "data")
        await asyncio.wait_for(seen.wait(), 10)
        await handle.stop()
        assert await sbx.files.read(f"{base}/x.txt") == "data"
        await sbx.files.write_files([{"path": f"{base}/y", "data": b"y"}, {"path": f"{base}/z", "data": "z"}])
        assert sorted(e.name for e in await sbx.files.list(base)) == ["x.txt", "y", "z"]
        await sbx.files.write(f"{base}/gz", "g" * 5000, gzip=True)
        assert await sbx.files.read(f"{base}/gz", gzip=True) == "g" * 5000
        assert await sbx.files.exists(f"{base}/y")
        await sbx.files.rename(f"{base}/y", f"{base}/y2")
        await sbx.files.remove(f"{base}/y2")
        with pytest.raises(FileNotFoundException):
            await sbx.files.read(f"{base}/y2")

    run(scenario)
