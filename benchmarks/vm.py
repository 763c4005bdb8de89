"""Benchmark of the VM tiers on the qemu driver: cold boot, durable restore, hot hit, refill.

    python benchmarks/vm.py [--json] [--rounds N] [--cache DIR]

* ``accel``: the accelerator the driver chose (``kvm`` when a probe boot answers in time).
* ``cold_boot_s``: QEMU start to envd's hello, booting the image (no checkpoint).
* ``restore_s``: QEMU start from the durable checkpoint to envd's hello, with the VM's own
  identity and clock applied (what a pool fill costs).
* ``hot_hit_ms``: ``node.create()`` taking a parked slot (unpark: ``cont`` + clock + link
  ping, journal, registry) until an envd ``ping`` through the new sandbox answers.
* ``refill_s``: a pool fill, per entry (``PoolFilled.seconds`` of durable fills).
* ``vm_uss_mb``: unique memory of one bound VM's QEMU process after a command ran (the
  pages it shares with other VMs through the checkpoint's RAM file are not unique).

Ratios are to a baseline of the same run: ``cold_over_restore`` (what the durable tier saves
per VM) and ``restore_over_hot`` (what the hot tier saves per create). Every figure is the
median over the rounds. The image and checkpoint are cached under ``--cache`` (by default
/var/tmp/cube-bench-vm), so a second run measures without building anything. Needs root
(taps, the bridge, nftables) and qemu-system-x86_64.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # benchmarks/ must not shadow the project's packages

import trio  # noqa: E402

from actors import open_actor_system  # noqa: E402
from cube.config import load_config  # noqa: E402
from cube.drivers.base import SlotSpec  # noqa: E402
from cube.drivers.qemu import QemuConfig, QemuDriver  # noqa: E402
from cube.images import ImageSpec, build_image  # noqa: E402
from cube.node import open_node  # noqa: E402
from cube.pool import PoolFilled, Status  # noqa: E402
from supervisors import Reaper, Spawn  # noqa: E402

GOALS = {"hot_hit_ms": 25.0, "restore_s": 1.5, "cold_boot_s": 6.0}  # under TCG (issue 6)


def uss_mb(pid: int) -> float:
    """Unique set size of ``pid`` (its private pages) in MiB."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


async def measure_driver(cache: Path, state: Path, rounds: int, spawn: Any) -> dict[str, Any]:
    """Cold boots and restores, straight through the driver."""
    image = await trio.to_thread.run_sync(build_image, ImageSpec(agent="envd"), str(cache))
    checkpoints = str(cache / "checkpoints")
    cold = QemuDriver(str(state), image=image, config=QemuConfig(durable=False))
    accel = await cold.accelerator(spawn)
    tiered = QemuDriver(
        str(state), image=image, config=QemuConfig(accel=accel, checkpoint_dir=checkpoints)
    )
    spec = SlotSpec(slot_id="bench", network=False)
    directory, made = await tiered.ensure_checkpoint(spec, spawn)
    boots, restores = [], []
    for i in range(rounds):
        started = time.monotonic()
        instance = await cold.start(SlotSpec(slot_id=f"cold{i}", network=False), spawn)
        boots.append(time.monotonic() - started)
        await cold.stop(instance)
        started = time.monotonic()
        instance = await tiered.restore(
            SlotSpec(slot_id=f"warm{i}", network=False), spawn, directory
        )
        restores.append(time.monotonic() - started)
        await tiered.stop(instance)
    snapshot = tiered.load_snapshot(directory)
    ram = os.stat(os.path.join(directory, snapshot.memory_file)) if snapshot.memory_file else None
    return {
        "accel": accel,
        "cold_boot_s": round(statistics.median(boots), 2),
        "restore_s": round(statistics.median(restores), 3),
        "checkpoint_made_now": made,
        "checkpoint_state_mb": round(snapshot.state_bytes / 1e6, 2),
        # the template's RAM file: its allocated blocks (zero pages are holes)
        "checkpoint_ram_mb": round(ram.st_blocks * 512 / 1e6, 1) if ram else None,
        "image": image.key,
    }


async def measure_node(cache: Path, state: Path, rounds: int, accel: str) -> dict[str, Any]:
    """Hot hits and refills through a node with one warm slot, and a bound VM's USS."""
    image = await trio.to_thread.run_sync(build_image, ImageSpec(agent="envd"), str(cache))
    config = load_config(
        env={},
        overrides={
            "state_dir": str(state),
            "driver": "qemu",
            "pools": {"base": {"size": 1, "concurrency": 1}},
            "templates": {"base": {}},
        },
    )
    qemu = QemuConfig(
        accel=accel,  # type: ignore[arg-type]
        bridge=config.bridge,
        gateway=config.subnet.replace(".0.0/16", ".0.1"),
        checkpoint_dir=str(cache / "checkpoints"),
    )
    driver = QemuDriver(str(state), image=image, config=qemu)
    hits, fills, usages = [], [], []
    async with open_node(config, driver=driver) as node:
        fill_times: list[float] = []
        node.services.system.events.add_hook(
            lambda e: (
                fill_times.append(e.seconds)
                if isinstance(e, PoolFilled) and e.tier == "durable"
                else None
            )
        )
        pool = node.services.pool("base")
        for _ in range(rounds):
            with trio.fail_after(120):
                while (await pool.call(Status())).warm < 1:
                    await trio.sleep(0.02)
            await trio.sleep(0.2)  # let the host settle after the fill
            started = time.perf_counter()
            sbx = await node.create("base")
            await (await sbx.client()).call("ping")
            hits.append((time.perf_counter() - started) * 1000)
            await sbx.run("true")
            assert sbx.info.instance is not None
            usages.append(uss_mb(sbx.info.instance.pid))
            await sbx.kill()
        with trio.fail_after(120):
            while (await pool.call(Status())).warm < 1:
                await trio.sleep(0.02)
        fills = fill_times
    return {
        "hot_hit_ms": round(statistics.median(hits), 1),
        "hot_hit_ms_max": round(max(hits), 1),
        "refill_s": round(statistics.median(fills), 3) if fills else None,
        "vm_uss_mb": round(statistics.median(usages), 1),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    state = Path(tempfile.mkdtemp(prefix="cbv-", dir="/tmp"))
    try:
        async with open_actor_system("bench") as system:
            reaper = await system.spawn(Reaper(), "reaper")

            async def spawn(argv: list[str], **kwargs: Any) -> Any:
                return await reaper.call(Spawn(list(argv), **kwargs))

            result = await measure_driver(cache, state / "d", args.rounds, spawn)
        result |= await measure_node(cache, state / "n", args.rounds, result["accel"])
    finally:
        shutil.rmtree(state, ignore_errors=True)
    result["ratios"] = {
        "cold_over_restore": round(result["cold_boot_s"] / result["restore_s"], 1),
        "restore_over_hot": round(result["restore_s"] * 1000 / result["hot_hit_ms"], 1),
    }
    result["goals"] = {
        name: {"goal": goal, "met": result[name] <= goal} for name, goal in GOALS.items()
    }
    result["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--cache", default=os.environ.get("CUBE_BENCH_CACHE", "/var/tmp/cube-bench-vm")
    )
    ns = parser.parse_args()
    out = trio.run(main, ns)
    if ns.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:>20}: {value}")
