"""Real QEMU microVMs under TCG: boot, the agent channel, snapshot/restore, pause, kill -9."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import time
from typing import Any

import pytest
import trio
from vm_kit import TEST_IMAGES, AgentClient

from cube.drivers.base import SlotSpec
from cube.drivers.qemu import QemuConfig, QemuDriver, SlotPaths, agent_hello
from cube.images import Image
from cube.images.uefi_disk import build_uefi_disk


async def run(client: AgentClient, script: str) -> tuple[int, bytes]:
    """Run ``sh -c script`` through envd; (exit code, stdout)."""
    rid = await client.send(
        "process.start", {"process": {"cmd": "/bin/sh", "args": ["-c", script]}, "stdin": False}
    )
    frames = await client.stream(rid)
    assert "ok" in frames[-1], frames[-1]
    out = b"".join(
        base64.b64decode(f["body"]["stdout"])
        for f in frames
        if f.get("ev") == "data" and "stdout" in f["body"]
    )
    (end,) = [f["body"] for f in frames if f.get("ev") == "end"]
    return end["exit_code"], out


async def test_the_stand_in_agent_answers_a_line_on_the_virtio_console(
    standin_image: Image, state_dir: str, spawn: Any
):
    driver = QemuDriver(state_dir, image=standin_image, config=QemuConfig(accel="tcg"))
    try:
        instance = await driver.start(SlotSpec(slot_id="standin", memory_mb=256), spawn)
        assert instance.extra["hello"]["agent"] == "cube-standin"
        client = await AgentClient.connect(instance.envd)
        assert await client.call("echo", {"line": "hello, guest"}) == {"line": "hello, guest"}
        uname = await client.call(
            "sh", {"cmd": "uname -r; cat /sys/class/virtio-ports/*/name | sort"}
        )
        assert uname["stdout"].split() == [standin_image.kernel_version, "agent", "cube-ctl"]
        await client.aclose()
        await driver.stop(instance)
        assert driver.leftovers() == []
    finally:
        await driver.cleanup()


async def test_envd_in_a_booted_vm_runs_a_command_with_the_guest_python(
    envd_image: Image, state_dir: str, spawn: Any
):
    config = QemuConfig(accel="tcg", durable=False)  # a cold boot, not a restore
    driver = QemuDriver(state_dir, image=envd_image, config=config)
    try:
        instance = await driver.start(SlotSpec(slot_id="boot"), spawn)
        assert instance.extra["tier"] == "cold"
        client = await AgentClient.connect(instance.envd)
        assert await client.call("ping") == {}
        code, out = await run(
            client, "echo hi from $(uname -s); python3 -c 'import trio, ssl, sqlite3'"
        )
        assert (code, out) == (0, b"hi from Linux\n")
        await client.aclose()
        await driver.stop(instance)
        assert driver.leftovers() == []
    finally:
        await driver.cleanup()


async def test_a_restored_vm_keeps_its_processes_and_answers_again(
    driver: QemuDriver, spawn: Any, state_dir: str
):
    instance = await driver.start(SlotSpec(slot_id="snap"), spawn)
    client = await AgentClient.connect(instance.envd)
    rid = await client.send(
        "process.start",
        {"process": {"cmd": "/bin/sleep", "args": ["600"]}, "tag": "survivor", "stdin": False},
    )
    with trio.fail_after(20):
        while not any(
            p.get("tag") == "survivor" for p in (await client.call("process.list"))["processes"]
        ):
            await trio.sleep(0.05)
    snap = await driver.snapshot(instance, os.path.join(state_dir, "snap1"))
    await client.aclose()
    assert not driver.alive(instance)  # a suspend ends the QEMU process
    await driver.stop(instance)
    assert snap.state_bytes > 1 << 20

    restored = await driver.restore(SlotSpec(slot_id="snap-r"), spawn, snap.directory)
    assert restored.extra["hello"]["boot"] == instance.extra["hello"]["boot"]  # the same envd
    client = await AgentClient.connect(restored.envd)
    listed = (await client.call("process.list"))["processes"]
    assert [p["tag"] for p in listed if p.get("tag")] == ["survivor"]
    assert rid  # the stream of the old session is gone; the process itself lives on
    await client.aclose()
    await driver.stop(restored)
    assert driver.leftovers() == []


async def test_a_paused_vm_answers_only_after_resume(driver: QemuDriver, spawn: Any):
    instance = await driver.start(SlotSpec(slot_id="pause"), spawn)
    client = await AgentClient.connect(instance.envd)
    await driver.pause(instance)
    assert await driver.status(instance) == "paused"
    rid = await client.send("ping")
    with trio.move_on_after(0.5) as waited:
        await client.reply(rid)
    assert waited.cancelled_caught  # no vCPU ran to answer
    await driver.resume(instance)
    assert await driver.status(instance) == "running"
    with trio.fail_after(20):
        assert (await client.reply(rid))["ok"] == {}
    await client.aclose()
    await driver.stop(instance)


async def test_stop_after_kill_9_of_qemu_leaves_nothing_behind(driver: QemuDriver, spawn: Any):
    instance = await driver.start(SlotSpec(slot_id="kill"), spawn)
    assert driver.leftovers(["kill"]) != []
    os.kill(instance.pid, signal.SIGKILL)
    with trio.fail_after(5):
        while driver.alive(instance):
            await trio.sleep(0.01)
    await driver.stop(instance)
    assert driver.leftovers() == []
    assert not os.path.exists(instance.state_dir)


async def test_cleanup_removes_vms_it_was_not_told_to_keep(driver: QemuDriver, spawn: Any):
    started: dict[str, Any] = {}

    async def start(slot: str) -> None:
        started[slot] = await driver.start(SlotSpec(slot_id=slot, memory_mb=384), spawn)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start, "keep")
        nursery.start_soon(start, "drop")
    removed = await driver.cleanup(keep=["keep"])
    assert any("qemu of drop" in item for item in removed)
    assert driver.alive(started["keep"]) and not driver.alive(started["drop"])
    assert driver.leftovers(["drop"]) == []
    await driver.stop(started["keep"])


async def test_the_accelerator_probe_gives_a_cached_verdict_within_its_bound(
    driver: QemuDriver, spawn: Any
):
    config = QemuConfig(state_dir=driver.config.state_dir, accel="auto", kvm_probe_timeout=5.0)
    probe = QemuDriver(image=driver.image, config=config)
    started = time.monotonic()
    verdict = await probe.accelerator(spawn)
    assert verdict in ("kvm", "tcg")
    assert time.monotonic() - started < 5.0 + 5.0  # the bound, plus stopping the probe VM
    assert (
        await QemuDriver(image=driver.image, config=config).accelerator(spawn) == verdict
    )  # cached
    assert probe.leftovers() == []


OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"


@pytest.mark.skipif(
    not os.path.exists(OVMF_CODE) or shutil.which("mformat") is None,
    reason="needs ovmf and mtools (apt-get install ovmf mtools)",
)
async def test_the_uefi_disk_boots_through_firmware_as_bhyve_boots_it(
    standin_image: Image, state_dir: str, spawn: Any
):
    disk = await trio.to_thread.run_sync(build_uefi_disk, standin_image, TEST_IMAGES)
    shutil.copy(OVMF_VARS, os.path.join(state_dir, "vars.fd"))
    paths = SlotPaths.under(state_dir, "uefi")
    os.makedirs(paths.directory)
    # q35 + OVMF + virtio-pci, like bhyve's UEFI boot with -s slots; no -kernel: the
    # firmware finds \EFI\BOOT\BOOTX64.EFI (systemd-boot) on the disk
    argv = [
        "qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m", "256M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={OVMF_CODE}",
        "-drive", f"if=pflash,format=raw,unit=1,file={os.path.join(state_dir, 'vars.fd')}",
        "-drive", f"file={disk},format=raw,if=virtio,readonly=on",
        "-chardev", f"file,id=console0,path={paths.console}", "-serial", "chardev:console0",
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent0,path={paths.agent},server=on,wait=off",
        "-device", "virtserialport,bus=vser0.0,chardev=agent0,name=agent",
    ]  # fmt: skip
    handle = await spawn(argv)
    try:
        hello = await agent_hello(paths.agent, timeout=90, alive=lambda: bool(handle.running))
        assert hello["agent"] == "cube-standin"
    finally:
        handle.send_signal(signal.SIGKILL)
        await handle.wait()
