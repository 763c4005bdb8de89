"""The ns driver's lifecycle with real namespaces, cgroups, veths and the real envd: start,
connect, stop, failures, crashes of its processes, leftovers and cleanup."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
import trio
from driver_kit import LISTENER, Spawner, Stopwatch, connect, requires_ns, sh

from cube.drivers.base import DriverError, Instance, SlotSpec
from cube.drivers.ns import NsDriver

pytestmark = requires_ns


async def test_envd_in_a_started_slot_answers_on_the_socket_and_stop_leaves_nothing(
    ns: NsDriver, spawn: Spawner
) -> None:
    clock = Stopwatch()
    instance = await ns.start(SlotSpec("s1"), spawn)
    started_ms = clock.ms
    async with connect(instance) as client:
        assert client.hello is not None and client.hello.pid == 2  # pid 1 is the init
        result = await sh(client, "id -un; echo $HOME; hostname", user="user")
    assert result.exit_code == 0
    assert result.stdout.split() == ["user", "/home/user", "cube-s1"]
    assert ns.alive(instance)
    clock = Stopwatch()
    await ns.stop(instance)
    print(f"ns start {started_ms:.0f} ms (real envd), stop {clock.ms:.0f} ms")
    assert not ns.alive(instance)
    assert ns.leftovers() == []


async def test_instance_names_every_resource_of_the_slot(ns: NsDriver, spawn: Spawner) -> None:
    instance = await ns.start(SlotSpec("names", network=True), spawn)
    assert instance.driver == "ns" and instance.netns == f"cube-{ns.tag}-names"
    assert instance.host_if is not None and len(instance.host_if) <= 15
    assert instance.ip is not None and instance.ip.startswith("10.99.")
    assert os.path.exists(f"/run/netns/{instance.netns}")
    assert os.path.exists(f"/sys/class/net/{instance.host_if}")
    with open(f"/sys/class/net/{instance.host_if}/master/uevent") as f:
        assert "INTERFACE=cubebr0" in f.read()
    with open(f"/sys/class/net/{instance.host_if}/brport/isolated") as f:
        assert f.read().strip() == "1"
    with open(f"/sys/class/net/{instance.host_if}/ifalias") as f:
        assert f.read().strip() == instance.netns
    assert all(os.path.isdir(d) for d in instance.cgroups)
    kinds = {item.split(" ")[0] for item in ns.leftovers(["names"])}
    assert kinds >= {"directory", "process", "cgroup", "netns", "mount", "veth", "address"}
    await ns.stop(instance)
    assert ns.leftovers(["names"]) == []


async def test_stop_is_idempotent(ns: NsDriver, spawn: Spawner) -> None:
    instance = await ns.start(SlotSpec("twice"), spawn)
    await ns.stop(instance)
    await ns.stop(instance)
    assert ns.leftovers() == []


@pytest.mark.parametrize("victim", ["init", "holder"])
async def test_kill_9_of_a_sandbox_process_ends_it_and_stop_leaves_nothing(
    make_driver: Callable[..., Any], spawn: Spawner, victim: str
) -> None:
    ns: NsDriver = make_driver(NsDriver, envd_argv=LISTENER)
    instance = await ns.start(SlotSpec("crash"), spawn)
    holder = spawn.handle(instance.pid)
    os.kill(instance.extra["init_pid"] if victim == "init" else instance.pid, signal.SIGKILL)
    with trio.fail_after(5):
        exit = await holder.wait()
    assert exit.returncode in (128 + signal.SIGKILL, -signal.SIGKILL)
    assert not ns.alive(instance)
    await ns.stop(instance)
    assert ns.leftovers() == []


async def test_an_envd_that_cannot_start_fails_start_with_its_log_and_leaves_nothing(
    make_driver: Callable[..., Any], spawn: Spawner
) -> None:
    ns: NsDriver = make_driver(
        NsDriver, envd_argv=["/bin/sh", "-c", "echo envd-is-broken >&2; exit 3"]
    )
    with pytest.raises(DriverError, match="envd-is-broken"):
        await ns.start(SlotSpec("broken"), spawn)
    assert ns.leftovers() == []


async def test_a_cancelled_start_leaves_nothing(
    make_driver: Callable[..., Any], spawn: Spawner
) -> None:
    ns: NsDriver = make_driver(NsDriver, envd_argv=["/bin/sleep", "60"])  # never listens
    with trio.move_on_after(0.3):
        await ns.start(SlotSpec("cancelled"), spawn)
    assert ns.leftovers() == []


async def test_a_slot_id_that_cannot_name_resources_is_refused(
    ns: NsDriver, spawn: Spawner
) -> None:
    for bad in ("", "Upper", "-lead", "a/b", "x" * 49):
        with pytest.raises(DriverError, match="slot id"):
            await ns.start(SlotSpec(bad), spawn)


async def test_starting_a_slot_that_was_not_stopped_is_refused(
    make_driver: Callable[..., Any], spawn: Spawner
) -> None:
    ns: NsDriver = make_driver(NsDriver, envd_argv=LISTENER)
    instance = await ns.start(SlotSpec("dup"), spawn)
    with pytest.raises(DriverError, match="exists"):
        await ns.start(SlotSpec("dup"), spawn)
    assert ns.alive(instance)
    await ns.stop(instance)


async def test_cleanup_removes_every_slot_but_the_kept_ones(
    make_driver: Callable[..., Any], spawn: Spawner
) -> None:
    ns: NsDriver = make_driver(NsDriver, envd_argv=LISTENER)
    kept = await ns.start(SlotSpec("kept"), spawn)
    gone = await ns.start(SlotSpec("gone"), spawn)
    removed = await ns.cleanup(keep=["kept"])
    assert any("gone" in item for item in removed)
    assert not any("kept" in item for item in removed)
    assert ns.leftovers(["gone"]) == []
    assert not ns.alive(gone)
    assert ns.alive(kept)
    await ns.stop(kept)


async def test_two_nodes_on_one_host_never_touch_each_others_slots(
    make_driver: Callable[..., Any], spawn: Spawner
) -> None:
    first: NsDriver = make_driver(NsDriver, envd_argv=LISTENER)
    second: NsDriver = make_driver(NsDriver, envd_argv=LISTENER)
    assert first.tag != second.tag
    a = await first.start(SlotSpec("same"), spawn)
    b = await second.start(SlotSpec("same"), spawn)
    assert a.ip != b.ip and a.host_if != b.host_if and a.netns != b.netns
    assert not any(second.tag in item for item in first.leftovers())
    await first.cleanup()
    assert first.leftovers() == []
    assert second.alive(b)
    await second.stop(b)


async def test_start_and_stop_times_with_a_bare_listener(
    make_driver: Callable[..., Any], spawn: Spawner
) -> None:
    """The driver's own cost, without envd's import time (printed for docs/drivers.md)."""
    ns: NsDriver = make_driver(NsDriver, envd_argv=LISTENER)
    starts, stops = [], []
    for index in range(5):
        clock = Stopwatch()
        instance = await ns.start(SlotSpec(f"t{index}"), spawn)
        starts.append(clock.ms)
        clock = Stopwatch()
        await ns.stop(instance)
        stops.append(clock.ms)
    starts.sort()
    stops.sort()
    print(f"ns start p50 {starts[2]:.0f} ms, stop p50 {stops[2]:.0f} ms (bare listener)")
    assert starts[2] < 2000 and stops[2] < 2000


async def test_a_restarted_service_readopts_a_slot_from_its_journal_entry_and_stops_it(
    make_driver: Callable[..., Any], spawn: Spawner
) -> None:
    before: NsDriver = make_driver(NsDriver, envd_argv=LISTENER)
    instance = await before.start(SlotSpec("journaled"), spawn)
    entry = msgspec.json.encode(instance)
    after = NsDriver(before.state_dir, envd_argv=LISTENER)  # a new service, same state dir
    readopted = msgspec.json.decode(entry, type=Instance)
    assert after.alive(readopted)
    assert after.leftovers() == before.leftovers()
    await after.pause(readopted)
    await after.resume(readopted)
    await after.stop(readopted)
    assert before.leftovers() == []


async def test_slots_start_and_stop_concurrently(
    make_driver: Callable[..., Any], spawn: Spawner
) -> None:
    ns: NsDriver = make_driver(NsDriver, envd_argv=LISTENER)
    instances: list[Instance] = []

    async def start(slot: str) -> None:
        instances.append(await ns.start(SlotSpec(slot), spawn))

    clock = Stopwatch()
    async with trio.open_nursery() as nursery:
        for index in range(6):
            nursery.start_soon(start, f"c{index}")
    print(f"6 concurrent ns starts: {clock.ms:.0f} ms")
    assert len({i.ip for i in instances}) == 6 and all(ns.alive(i) for i in instances)
    async with trio.open_nursery() as nursery:
        for instance in instances:
            nursery.start_soon(ns.stop, instance)
    assert ns.leftovers() == []


SERVICE_THAT_DIES = """
import os, sys, msgspec, trio
from actors import open_actor_system
from supervisors import Reaper, Spawn
from cube.drivers.base import SlotSpec
from cube.drivers.ns import NsDriver

async def main():
    async with open_actor_system("doomed") as system:
        reaper = await system.spawn(Reaper(), "reaper")
        async def spawn(argv, **kw):
            return await reaper.call(Spawn(list(argv), owner=None, **kw))
        driver = NsDriver(sys.argv[1], envd_argv=sys.argv[2:])
        instance = await driver.start(SlotSpec("survivor"), spawn)
        sys.stdout.buffer.write(msgspec.json.encode(instance))
        sys.stdout.flush()
        os._exit(0)  # the service dies without stopping anything

trio.run(main)
"""


async def test_a_sandbox_survives_the_service_that_started_it_and_is_readopted(
    make_driver: Callable[..., Any],
) -> None:
    ns: NsDriver = make_driver(NsDriver, envd_argv=LISTENER)
    done = await trio.run_process(
        [sys.executable, "-c", SERVICE_THAT_DIES, ns.state_dir, *LISTENER], capture_stdout=True
    )
    instance = msgspec.json.decode(done.stdout, type=Instance)
    assert ns.alive(instance)  # reparented away from the dead service, still running
    async with await trio.open_unix_socket(instance.envd.removeprefix("unix:")):
        pass
    await ns.stop(instance)
    assert ns.leftovers() == []
