"""VM sandboxes through the node, on real QEMU (TCG here): the tiers, envd over the
virtio-console, the network identity, pause/resume through disk, kill -9, and a restart.

Every test starts from the shared durable checkpoint, so a fill is a restore (about a second
under TCG), and leaves nothing on the host (the ``node`` fixture checks).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import trio
from vmnode_kit import host_leftovers, record_of, vm_config, vm_driver, wait_for_phase

from cube.drivers.qemu import QemuDriver
from cube.images import Image
from cube.node import Node, open_node
from cube.pool import PoolFilled, PoolTaken
from cube.store import Phase

POOL = "/node/pools/base"


def process_runs(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (the reaper collects exits soon after)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b")", 1)[1].split()[0] != b"Z"


async def test_a_vm_sandbox_serves_commands_files_and_code_as_itself(node: Node) -> None:
    events = node.services.system.events
    filled = await events.wait_for(PoolFilled, POOL)
    assert filled.tier in ("durable", "cold")  # cold only if this run made the checkpoint
    sbx = await node.create("base")
    taken = await events.wait_for(PoolTaken, POOL)
    assert (taken.sandbox, taken.tier) == (sbx.id, "hot")
    instance = sbx.info.instance
    assert instance is not None and instance.ip and instance.host_if

    # restored from the shared checkpoint, yet it is itself: address, MAC, name, clock
    out = await sbx.run(
        "ip -4 -o addr show eth0; cat /sys/class/net/eth0/address; hostname; date +%s"
    )
    assert out.exit_code == 0, out
    addr, mac, hostname, clock = out.stdout.splitlines()
    assert f"inet {instance.ip}/16" in addr
    assert (mac, hostname) == (instance.extra["mac"], f"cube-{sbx.id}")
    assert abs(int(clock) - time.time()) < 5

    await sbx.files.write("/home/user/notes.txt", "kept in the guest")
    assert await sbx.files.read("/home/user/notes.txt") == b"kept in the guest"
    assert "notes.txt" in [entry.name for entry in await sbx.files.list("/home/user")]
    # E2B's file metadata is user.* xattrs: /home and /tmp are on the image's ext2 RAM disk
    xattr = "import os; p = '/tmp/m'; open(p, 'w'); os.setxattr(p, 'user.k', b'v'); print(os.getxattr(p, 'user.k'))"
    assert (await sbx.run(f'python3 -c "{xattr}"')).stdout == "b'v'\n"
    execution = await sbx.execute("x = 40\nx + 2")
    assert [r.text for r in execution["result"]] == ["42"]

    # the node's nftables policy covers the VM's tap and address as it covers a veth
    rules = await node.services.policy.leftovers([])
    assert any(line.startswith(f"{sbx.id}:") and instance.host_if in line for line in rules)
    await sbx.kill()
    assert not any(
        line.startswith(f"{sbx.id}:") for line in await node.services.policy.leftovers([])
    )


async def test_pause_saves_the_vm_to_disk_and_resume_brings_it_back(node: Node) -> None:
    sbx = await node.create("base")
    await sbx.run("echo before > /tmp/in-memory")  # /tmp is RAM: only a restore keeps it
    driver: QemuDriver = node.services.driver  # type: ignore[assignment]
    pid = sbx.info.instance.pid
    await sbx.pause()
    record = await record_of(node, sbx.id)
    assert record.state == Phase.PAUSED and record.instance.pid == 0
    assert not process_runs(pid)  # QEMU exited
    assert os.path.exists(os.path.join(driver.suspended, sbx.id, "snapshot.json"))
    await trio.sleep(1.5)  # the guest's clock stands still meanwhile; resume must fix it

    await sbx.resume()
    record = await record_of(node, sbx.id)
    assert record.state == Phase.RUNNING and record.instance.pid not in (0, pid)
    out = await sbx.run("cat /tmp/in-memory; date +%s")
    memory, clock = out.stdout.splitlines()
    assert memory == "before" and abs(int(clock) - time.time()) < 3
    await sbx.kill()


async def test_kill_9_replaces_a_pool_slot_and_crashes_a_bound_sandbox(node: Node) -> None:
    events = node.services.system.events
    driver: QemuDriver = node.services.driver  # type: ignore[assignment]
    sbx = await node.create("base")
    warm = await events.wait_for(PoolFilled, POOL, lambda e: e.sandbox != sbx.id)

    # a parked (stopped) pool slot: the pool replaces it
    (slot_pid,) = driver._qemu_pids(warm.sandbox)
    os.kill(slot_pid, signal.SIGKILL)
    await events.wait_for(PoolFilled, POOL, lambda e: e.sandbox not in (sbx.id, warm.sandbox))
    assert driver.leftovers([warm.sandbox]) == []

    # a bound sandbox: reported crashed, with why, and cleaned up
    os.kill(sbx.info.instance.pid, signal.SIGKILL)
    record = await wait_for_phase(node, sbx.id, Phase.CRASHED)
    assert "QEMU was killed by SIGKILL" in (record.reason or "")
    with trio.fail_after(10):
        while driver.leftovers([sbx.id]):
            await trio.sleep(0.05)


SURVIVOR = """
import os, sys, trio
sys.path[:0] = [{tests!r}]
from vmnode_kit import vm_config, vm_driver
from cube.images import ImageSpec, build_image
from cube.node import open_node
from pathlib import Path

async def main():
    config = vm_config(Path({state!r}))
    image = build_image(ImageSpec(agent="envd"), {images!r})
    async with open_node(config, driver=vm_driver(config, image)) as node:
        running = await node.create("base")
        paused = await node.create("base")
        for sbx in (running, paused):
            await sbx.run(f"echo {{sbx.id}} > /tmp/who")
        await paused.pause()
        print(running.id, paused.id, flush=True)
        os.kill(os.getpid(), 9)

trio.run(main)
"""


async def test_a_restarted_service_re_adopts_running_and_paused_vms(
    state_dir: Path, envd_image: Image
) -> None:
    script = SURVIVOR.format(
        tests=str(Path(__file__).parent),
        state=str(state_dir),
        images=envd_image.directory.rsplit("/images/", 1)[0],
    )
    done = await trio.run_process(
        [sys.executable, "-c", script], capture_stdout=True, capture_stderr=True, check=False
    )
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    running_id, paused_id = done.stdout.decode().split()

    config = vm_config(state_dir, pool_size=0)
    driver = vm_driver(config, envd_image)
    async with open_node(config, driver=driver) as node:
        # the old run's warm slot was nobody's: cleaned up; the two sandboxes were kept
        kept = [line for line in driver.leftovers() if line.startswith(("directory", "suspended"))]
        assert {line.rsplit("/", 1)[-1] for line in kept} == {running_id, paused_id}
        assert sorted(driver._leases().values()) == sorted([running_id, paused_id])
        running = await node.get(running_id)
        assert (await running.run("cat /tmp/who")).stdout == f"{running_id}\n"
        paused = await node.get(paused_id)
        assert paused.info.state == Phase.PAUSED
        await paused.resume()
        assert (await paused.run("cat /tmp/who")).stdout == f"{paused_id}\n"
        await running.kill()
        await paused.kill()
    assert host_leftovers(config, driver) == []
