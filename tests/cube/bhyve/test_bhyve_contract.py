"""The bhyve driver against docs/freebsd-contract.md §1 and §7, with stand-in tools.

Each test runs the driver's operations and reads back the argv the stand-ins recorded; the
exit-status tests drive the driver's verdicts and, through a real node, the sandbox group's
reaction to them. What only a FreeBSD host can check is listed in docs/vm.md.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from standin_kit import StandinHost

from cube.drivers.base import SlotSpec
from cube.drivers.bhyve import BhyveDriver, bhyve_exit_verdict
from cube.vm import mac_address


def device_args(argv: list[str]) -> list[str]:
    """The ``-s``/``-l`` arguments of a bhyve argv, in order."""
    return [f"{a} {argv[i + 1]}" for i, a in enumerate(argv[:-1]) if a in ("-s", "-l")]


def without_slot(args: list[str], driver: BhyveDriver, slot: str) -> list[str]:
    """Device arguments with the slot's own names (sockets, tap, MAC) blanked out."""
    out = []
    for arg in args:
        arg = arg.replace(os.path.join(driver.slots, slot), "SLOT").replace(
            driver.tap_name(slot), "TAP"
        )
        out.append(arg.replace(mac_address(slot, "58:9c:fc"), "MAC"))
    return out


async def test_a_cold_boot_runs_the_contracts_uefi_argv(
    make_driver: Any, host: StandinHost, spawn: Any
) -> None:
    driver = make_driver(durable=False)
    instance = await driver.start(SlotSpec(slot_id="sb1", memory_mb=512, cpus=2), spawn)
    try:
        (boot,) = host.calls("bhyve")
        name, tap = driver.vm_name("sb1"), driver.tap_name("sb1")
        slot = os.path.join(driver.slots, "sb1")
        assert boot == [
            "-c", "2", "-m", "512M", "-A", "-H", "-P", "-w", "-u",
            "-s", "0,hostbridge", "-s", "31,lpc", "-l", "com1,stdio",
            "-l", "bootrom,/usr/local/share/uefi-firmware/BHYVE_UEFI.fd",
            "-s", f"2,virtio-blk,{driver._disk},ro",
            "-s", f"3,virtio-net,{tap},mac={mac_address('sb1', '58:9c:fc')}",
            "-s", f"4,virtio-console,agent={slot}/agent.sock,cube-ctl={slot}/ctl.sock",
            "-s", "5,virtio-rnd",
            name,
        ]  # fmt: skip
        assert tap.startswith("tap") and len(tap) <= 15  # bhyve picks the backend by "tap"
        assert len(name) <= 31  # VM_MAX_NAMELEN
        assert host.calls("ifconfig")[:6] == [
            ["cubetest0"],  # does the bridge exist? no:
            ["bridge", "create"],
            ["bridge0", "name", "cubetest0"],
            ["cubetest0", "inet", "10.251.0.1/16", "up"],
            [tap, "destroy"],  # a tap left by a crash
            ["tap", "create"],
        ]
        assert host.calls("ifconfig")[6:] == [
            ["tap0", "name", tap, "up"],
            ["cubetest0", "addm", tap, "private", tap],
        ]
        assert host.calls("bhyvectl") == [[f"--vm={name}", "--destroy"]]
        net, clock = host.calls("ctl")
        assert net == ["net", mac_address("sb1", "58:9c:fc"), f"{instance.ip}/16", "10.251.0.1",
                       "cube-sb1", "192.0.2.53"]  # fmt: skip
        assert clock[0] == "clock" and abs(int(clock[1]) / 1e9 - time.time()) < 60
        assert instance.extra["tier"] == "cold" and driver.alive(instance)
    finally:
        await driver.stop(instance)
    assert host.calls("bhyvectl")[-2:] == [
        [f"--vm={name}", "--force-poweroff"],
        [f"--vm={name}", "--destroy"],
    ]
    assert host.calls("ifconfig")[-1] == [tap, "destroy"]
    assert driver.leftovers() == [] and host.links() == ["cubetest0"]


async def test_slots_are_restored_from_one_suspended_template_with_dash_r(
    make_driver: Any, host: StandinHost, spawn: Any
) -> None:
    driver = make_driver()
    first = await driver.start(SlotSpec(slot_id="sb1"), spawn)
    second = await driver.start(SlotSpec(slot_id="sb2"), spawn)
    try:
        template, restored1, restored2 = host.calls("bhyve")
        assert "-r" not in template
        tpl_name = template[-1]
        (suspend,) = [
            c for c in host.calls("bhyvectl") if any(a.startswith("--suspend=") for a in c)
        ]
        # suspended into a staging directory, renamed into place once complete
        (key,) = driver.checkpoints.keys()
        staging = os.path.join(driver.checkpoints.root, f".tmp-{key}-{os.getpid()}")
        assert suspend == [f"--vm={tpl_name}", f"--suspend={staging}/state"]
        for slot, argv in (("sb1", restored1), ("sb2", restored2)):
            assert argv[argv.index("-r") + 1] == os.path.join(driver.checkpoints.path(key), "state")
            assert argv[-1] == driver.vm_name(slot)
        # the devices are the template's, but for the slot's own sockets, tap and MAC
        tpl_devices = [
            d for d in device_args(template) if "virtio-net" not in d and "virtio-console" not in d
        ]
        for slot, argv in (("sb1", restored1), ("sb2", restored2)):
            devices = without_slot(device_args(argv), driver, slot)
            assert [
                d for d in devices if "virtio-net" not in d and "virtio-console" not in d
            ] == tpl_devices
            assert "-s 3,virtio-net,TAP,mac=MAC" in devices
        assert (first.extra["tier"], second.extra["tier"]) == ("cold", "durable")
        assert first.ip != second.ip
        nets = [c for c in host.calls("ctl") if c[0] == "net"]
        assert [n[1] for n in nets] == [
            mac_address("sb1", "58:9c:fc"),
            mac_address("sb2", "58:9c:fc"),
        ]
    finally:
        await driver.stop(first)
        await driver.stop(second)
    assert driver.leftovers() == []


async def test_suspend_writes_the_checkpoint_and_wake_restores_it(
    make_driver: Any, host: StandinHost, spawn: Any
) -> None:
    driver = make_driver(durable=False)
    instance = await driver.start(SlotSpec(slot_id="sb1"), spawn)
    old_pid = instance.pid
    try:
        await driver.suspend(instance)
        name = driver.vm_name("sb1")
        state = os.path.join(driver.suspended, "sb1", "state")
        assert [f"--vm={name}", f"--suspend={state}"] in host.calls("bhyvectl")
        assert instance.pid == 0 and instance.paused
        assert all(os.path.exists(state + s) for s in ("", ".kern", ".meta"))
        assert driver.alive(instance)  # suspended: no process, still a sandbox
        assert driver.describe_exit(instance, 0).kind == "rebooted"  # no suspend in flight
        await driver.wake(instance, spawn)
        restore = host.calls("bhyve")[-1]
        assert restore[restore.index("-r") + 1] == state and restore[-1] == name
        assert instance.pid not in (0, old_pid) and not instance.paused
        assert host.calls("ctl")[-1][0] == "clock"
        assert not os.path.exists(os.path.dirname(state))  # consumed
    finally:
        await driver.stop(instance)
    assert driver.leftovers() == []


async def test_a_restore_of_a_missing_checkpoint_fails_with_a_restore_verdict(
    make_driver: Any, host: StandinHost, spawn: Any
) -> None:
    driver = make_driver(durable=False)
    instance = await driver.start(SlotSpec(slot_id="sb1"), spawn)
    await driver.suspend(instance)
    os.unlink(os.path.join(driver.suspended, "sb1", "state"))
    with pytest.raises(Exception, match="exited before the agent answered"):
        await driver.wake(instance, spawn)
    assert driver.describe_exit(instance, 1).reason.startswith("the guest powered off")
    instance.extra["restoring"] = True  # what a launch with -r says until the guest answers
    assert "could not restore" in driver.describe_exit(instance, 1).reason
    await driver.stop(instance)
    assert driver.leftovers() == []


async def test_park_stops_the_bhyve_process_and_unpark_continues_it(
    make_driver: Any, host: StandinHost, spawn: Any
) -> None:
    driver = make_driver(durable=False)
    instance = await driver.start(SlotSpec(slot_id="sb1"), spawn)
    try:
        await driver.park(instance)
        with trio.fail_after(2):  # a signal is delivered asynchronously
            while _proc_state(instance.pid) != "T":
                await trio.sleep(0.01)
        await driver.unpark(instance)
        assert _proc_state(instance.pid) in ("S", "R")
        assert host.calls("ctl")[-1][0] == "clock"
    finally:
        await driver.stop(instance)


def _proc_state(pid: int) -> str:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data.rsplit(b")", 1)[1].split()[0].decode()


@pytest.mark.parametrize(
    ("code", "kind", "words"),
    [
        (0, "rebooted", "rebooted"),
        (1, "powered_off", "powered off"),
        (2, "halted", "halted"),
        (3, "crashed", "triple-faulted"),
        (4, "failed", "bhyve failed"),
        (64, "failed", "EX_USAGE"),
        (65, "failed", "EX_DATAERR"),
        (71, "failed", "EX_OSERR"),
        (100, "failed", "unknown suspend reason"),
        (-6, "crashed", "SIGABRT"),
    ],
)
def test_each_bhyve_exit_status_has_the_contracts_meaning(code: int, kind: str, words: str) -> None:
    verdict = bhyve_exit_verdict(code)
    assert verdict.kind == kind and words in verdict.reason and verdict.ends_sandbox


def test_exit_0_after_a_requested_suspend_is_not_a_death() -> None:
    assert not bhyve_exit_verdict(0, suspending=True).ends_sandbox
    assert bhyve_exit_verdict(1, restoring=True).kind == "failed"
