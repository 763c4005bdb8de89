"""The ns driver's cgroup: the pids and memory limits hold, pause freezes and resume thaws,
and the v2 code path (freeze, kill, remove) works on this host's unified hierarchy."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import trio
from driver_kit import (
    Spawner,
    Stopwatch,
    connect,
    read_inside,
    requires_ns,
    sh,
    start_background,
    wait_for_file,
)

from cube.drivers.base import DriverError, SlotSpec
from cube.drivers.ns import NsDriver
from cube.drivers.ns_cgroup import CgroupLayout, SlotCgroup, detect_layout

pytestmark = requires_ns


async def test_a_fork_bomb_stops_at_the_pids_limit_and_stop_still_cleans_up(
    ns: NsDriver, spawn: Spawner
) -> None:
    instance = await ns.start(SlotSpec("bomb", pids_max=64), spawn)
    forker = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    while True:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60); os._exit(0)\n"
        "        n += 1\n"
        "except OSError as exc:\n"
        "    print(n, exc.errno)\n"
    )
    async with connect(instance) as client:
        counted = await sh(client, f"python3 -c '{forker}'")
        forks, error = map(int, counted.stdout.split())
        assert error == 11 and forks < 64  # EAGAIN from the pids controller
        await start_background(client, "bomb() { bomb | bomb & }; bomb")
        await trio.sleep(1.0)
        assert ns.usage(instance).pids <= 64
    clock = Stopwatch()
    await ns.stop(instance)
    print(f"stop of a fork-bombed sandbox: {clock.ms:.0f} ms")
    assert ns.leftovers() == []


async def test_a_memory_hog_is_killed_at_the_memory_limit_and_reported(
    ns: NsDriver, spawn: Spawner
) -> None:
    instance = await ns.start(SlotSpec("hog", memory_mb=128), spawn)
    async with connect(instance) as client:
        hog = await sh(client, "exec python3 -c 'b = b\"x\" * (400 << 20); print(len(b))'")
        after = await sh(client, "echo still here")
    assert hog.exit_code == -1 and hog.status == "signal: killed"
    assert ns.usage(instance).oom_kills >= 1
    assert after.stdout.strip() == "still here"  # the sandbox itself survives
    await ns.stop(instance)


async def test_pause_freezes_the_sandbox_and_resume_thaws_it(ns: NsDriver, spawn: Spawner) -> None:
    instance = await ns.start(SlotSpec("freeze"), spawn)
    async with connect(instance) as client:
        await start_background(
            client, "i=0; while :; do i=$((i+1)); echo $i > /tmp/n.new; mv /tmp/n.new /tmp/n; done"
        )
        await wait_for_file(instance, "/tmp/n")
        await ns.pause(instance)
        assert instance.paused
        frozen = read_inside(instance, "/tmp/n")
        await trio.sleep(0.3)
        assert read_inside(instance, "/tmp/n") == frozen
        await ns.resume(instance)
        assert not instance.paused
        await trio.sleep(0.3)
        assert int(read_inside(instance, "/tmp/n")) > int(frozen)
        assert (await sh(client, "echo thawed")).stdout.strip() == "thawed"
    await ns.stop(instance)


async def test_a_paused_sandbox_can_be_stopped(ns: NsDriver, spawn: Spawner) -> None:
    instance = await ns.start(SlotSpec("frozen-stop"), spawn)
    await ns.pause(instance)
    await ns.stop(instance)
    assert ns.leftovers() == []


async def test_the_limits_are_written_to_the_cgroup(ns: NsDriver, spawn: Spawner) -> None:
    instance = await ns.start(SlotSpec("limits", memory_mb=200, cpus=0.5, pids_max=77), spawn)
    cgroup = SlotCgroup(ns.layout, ns.resource_name("limits"))
    if ns.layout.version == 1:
        files = {
            "memory": ("memory.limit_in_bytes", str(200 << 20)),
            "cpu": ("cpu.cfs_quota_us", "50000"),
            "pids": ("pids.max", "77"),
        }
        for controller, (name, value) in files.items():
            directory = ns.layout.controller_dir(controller, cgroup.name)
            assert directory is not None
            with open(os.path.join(directory, name)) as f:
                assert f.read().strip() == value
    assert cgroup.pids() >= {instance.pid, instance.extra["init_pid"]}
    await ns.stop(instance)


def test_this_hosts_layout_is_detected() -> None:
    layout = detect_layout()
    with open("/proc/self/mountinfo") as f:
        unified_root = " /sys/fs/cgroup rw" in f.read() and layout.version == 2
    if not unified_root:
        assert layout.version == 1 and {"memory", "cpu", "pids", "freezer"} <= set(layout.mounts)


def test_a_unified_root_mount_is_detected_as_v2(tmp_path: pytest.TempPathFactory) -> None:
    mountinfo = tmp_path / "mountinfo"  # type: ignore[operator]
    mountinfo.write_text("31 23 0:28 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n")
    assert detect_layout(mountinfo=str(mountinfo)) == CgroupLayout(2, {"": "/sys/fs/cgroup"})


async def test_the_v2_freezer_and_kill_work_on_the_unified_hierarchy() -> None:
    """Exercises the v2 code path on a v1 host's cgroup2 mount (no controllers needed)."""
    try:
        layout = detect_layout(2)
    except DriverError as exc:  # no cgroup2 mount at all: nothing to test
        pytest.skip(str(exc))
    cgroup = SlotCgroup(layout, f"cube-test-v2-{os.getpid()}")
    cgroup.create(None)
    child = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        with open(cgroup.procs_files()[0], "w") as f:
            f.write(str(child.pid))
        await cgroup.freeze()
        assert cgroup.is_frozen()
        with open(f"/proc/{child.pid}/stat") as f:
            before = f.read().split()[13]
        await trio.sleep(0.2)
        with open(f"/proc/{child.pid}/stat") as f:
            assert f.read().split()[13] == before  # no CPU time while frozen
        cgroup.thaw()
        await cgroup.kill()
        assert child.wait(timeout=5) == -signal.SIGKILL
        assert cgroup.pids() == set()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        await cgroup.remove()
    assert not cgroup.exists()
