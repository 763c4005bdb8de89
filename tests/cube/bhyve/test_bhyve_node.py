"""A node on the bhyve driver (stand-in tools): how bhyve's exit statuses drive the sandbox
group, the hot tier's SIGSTOP, and E2B pause/resume through ``bhyvectl --suspend``/``-r``."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from standin_kit import StandinHost

from cube.config import load_config
from cube.drivers.bhyve import BhyveDriver
from cube.netpolicy import NoNetPolicy
from cube.node import Node, open_node
from cube.pool import PoolFilled, PoolTaken
from cube.store import Get, Phase


@pytest.fixture
async def node(make_driver: Any, workdir: Path) -> AsyncIterator[Node]:
    # no network: the node's policy on FreeBSD is pf, which is not in this issue
    config = load_config(
        env={},
        overrides={
            "state_dir": str(workdir / "node"),
            "driver": "bhyve",
            "pools": {"base": {"size": 1, "concurrency": 1}},
            "templates": {"base": {"network": False}},
        },
    )
    driver = make_driver(gateway="")
    async with open_node(config, driver=driver, policy=NoNetPolicy()) as running:
        yield running
    assert driver.leftovers() == []


async def record_of(node: Node, id: str) -> Any:
    return await node.services.store.call(Get(id))


async def wait_for_phase(node: Node, id: str, phase: Phase) -> Any:
    with trio.fail_after(20):
        while (record := await record_of(node, id)).state != phase:
            await trio.sleep(0.02)
    return record


def proc_state(pid: int) -> str:
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data.rsplit(b")", 1)[1].split()[0].decode()


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (0, "rebooted"),
        (1, "powered off"),
        (2, "halted"),
        (3, "triple-faulted"),
        (4, "bhyve failed"),
    ],
)
async def test_a_bound_sandbox_whose_bhyve_exits_is_reported_crashed_with_why(
    node: Node, host: StandinHost, code: int, words: str
) -> None:
    sbx = await node.create("base")
    driver: BhyveDriver = node.services.driver  # type: ignore[assignment]
    host.exit_vm(driver.vm_name(sbx.id), code)
    record = await wait_for_phase(node, sbx.id, Phase.CRASHED)
    assert words in (record.reason or "")
    with trio.fail_after(10):
        while driver.leftovers([sbx.id]):  # the group's teardown destroys the VM
            await trio.sleep(0.02)
    assert [f"--vm={driver.vm_name(sbx.id)}", "--destroy"] in host.calls("bhyvectl")


async def test_a_parked_pool_slot_whose_bhyve_exits_is_replaced(
    node: Node, host: StandinHost
) -> None:
    events = node.services.system.events
    first = await events.wait_for(PoolFilled, "/node/pools/base")
    assert first.tier == "cold"  # the first fill made the checkpoint
    driver: BhyveDriver = node.services.driver  # type: ignore[assignment]
    pid = int(Path(driver.slots, first.sandbox, "bhyve.pid").read_text())
    assert proc_state(pid) == "T"  # parked: SIGSTOPped
    host.exit_vm(driver.vm_name(first.sandbox), 3)
    os.kill(pid, signal.SIGCONT)  # a stopped stand-in cannot see its exit file
    replaced = await events.wait_for(
        PoolFilled, "/node/pools/base", lambda e: e.sandbox != first.sandbox
    )
    assert replaced.tier == "durable"  # restored with bhyve -r, not booted


async def test_create_takes_a_hot_slot_and_pause_resume_go_through_disk(
    node: Node, host: StandinHost
) -> None:
    events = node.services.system.events
    await events.wait_for(PoolFilled, "/node/pools/base")
    sbx = await node.create("base")
    taken = await events.wait_for(PoolTaken, "/node/pools/base")
    assert (taken.sandbox, taken.tier) == (sbx.id, "hot")
    driver: BhyveDriver = node.services.driver  # type: ignore[assignment]
    name = driver.vm_name(sbx.id)
    client = await sbx.client()
    await client.call("ping")

    await sbx.pause()
    assert (await record_of(node, sbx.id)).state == Phase.PAUSED
    assert [f"--vm={name}", f"--suspend={driver.suspended}/{sbx.id}/state"] in host.calls(
        "bhyvectl"
    )
    await trio.sleep(0.2)  # bhyve's exit 0 after the suspend must not count as a crash
    assert (await record_of(node, sbx.id)).state == Phase.PAUSED
    assert (await record_of(node, sbx.id)).instance.pid == 0  # journaled: nothing runs

    await sbx.resume()
    assert (await record_of(node, sbx.id)).state == Phase.RUNNING
    restore = host.calls("bhyve")[-1]
    assert restore[-1] == name and "-r" in restore
    client = await sbx.client()
    await client.call("ping")
    assert os.path.exists(driver.slots) and not os.path.exists(f"{driver.suspended}/{sbx.id}")
    await sbx.kill()
