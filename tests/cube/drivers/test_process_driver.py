"""The process driver: envd as a plain subprocess in its slot directory (no isolation, no root)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import pytest
import trio
from driver_kit import LISTENER, Spawner, Stopwatch, connect, sh, start_background

from cube.drivers.base import DriverError, SlotSpec
from cube.drivers.process import ProcessDriver, scan_processes


async def test_envd_starts_in_its_slot_directory_and_stop_leaves_nothing(
    process_driver: ProcessDriver, spawn: Spawner
) -> None:
    clock = Stopwatch()
    instance = await process_driver.start(SlotSpec("p1"), spawn)
    started_ms = clock.ms
    directory = os.path.join(process_driver.state_dir, "slots", "p1")
    assert instance.envd == f"unix:{directory}/envd.sock" and instance.state_dir == directory
    async with connect(instance) as client:
        assert client.hello is not None
        envd = client.hello.pid
        result = await sh(client, "echo $PPID")
    assert os.readlink(f"/proc/{envd}/cwd") == f"{directory}/home"
    with open(f"/proc/{envd}/environ", "rb") as f:
        assert f"HOME={directory}/home".encode() in f.read().split(b"\0")
    assert int(result.stdout) == envd
    clock = Stopwatch()
    await process_driver.stop(instance)
    print(f"process start {started_ms:.0f} ms (real envd), stop {clock.ms:.0f} ms")
    assert not process_driver.alive(instance)
    assert not os.path.exists(directory)
    assert process_driver.leftovers() == []


async def test_the_driver_says_loudly_that_it_gives_no_isolation(
    make_driver: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cube.drivers.process"):
        driver: ProcessDriver = make_driver(ProcessDriver)
    assert driver.isolated is False
    assert any("NO isolation" in record.getMessage() for record in caplog.records)
    assert caplog.records[0].levelno == logging.WARNING


async def test_pause_stops_the_slots_processes_and_resume_continues_them(
    process_driver: ProcessDriver, spawn: Spawner
) -> None:
    instance = await process_driver.start(SlotSpec("paused"), spawn)
    counter = os.path.join(instance.state_dir, "home", "n")
    script = (
        f"i=0; while :; do i=$((i+1)); echo $i > {counter}.new; mv {counter}.new {counter}; done"
    )
    async with connect(instance) as client:
        await start_background(client, script)
        with trio.fail_after(10):
            while not os.path.exists(counter):
                await trio.sleep(0.01)
        await process_driver.pause(instance)
        frozen = read(counter)
        await trio.sleep(0.3)
        assert read(counter) == frozen
        await process_driver.resume(instance)
        await trio.sleep(0.3)
        assert int(read(counter)) > int(frozen)
    await process_driver.stop(instance)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


async def test_stop_kills_daemons_that_left_envds_process_tree_and_session(
    process_driver: ProcessDriver, spawn: Spawner
) -> None:
    instance = await process_driver.start(SlotSpec("daemon"), spawn)
    async with connect(instance) as client:
        await sh(client, "setsid sh -c 'sleep 4343 & exit 0' </dev/null >/dev/null 2>&1")
    with trio.fail_after(5):
        while not scan_processes(cmdline=b"sleep\x004343"):
            await trio.sleep(0.01)
    await process_driver.stop(instance)
    assert not scan_processes(cmdline=b"sleep\x004343")


async def test_a_failing_envd_fails_start_with_its_log_and_leaves_nothing(
    make_driver: Callable[..., Any], spawn: Spawner
) -> None:
    driver: ProcessDriver = make_driver(
        ProcessDriver, envd_argv=["/bin/sh", "-c", "echo no-envd-here >&2; exit 2"]
    )
    with pytest.raises(DriverError, match="no-envd-here"):
        await driver.start(SlotSpec("broken"), spawn)
    assert driver.leftovers() == []


async def test_cleanup_removes_every_slot_but_the_kept_ones(
    make_driver: Callable[..., Any], spawn: Spawner
) -> None:
    driver: ProcessDriver = make_driver(ProcessDriver, envd_argv=LISTENER)
    kept = await driver.start(SlotSpec("kept"), spawn)
    gone = await driver.start(SlotSpec("gone"), spawn)
    removed = await driver.cleanup(keep=["kept"])
    assert removed and all("gone" in item for item in removed)
    assert not driver.alive(gone) and driver.alive(kept)
    assert driver.leftovers(["kept"]) != [] and driver.leftovers(["gone"]) == []
    await driver.stop(kept)
