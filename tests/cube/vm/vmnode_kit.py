"""Helpers for the VM node tests: a node on the qemu driver with the shared test image and
durable checkpoint (both cached under /var/tmp/cube-test-images, so only the first run on a
machine builds the image and cold boots the template)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import trio

from cube.config import NodeConfig, load_config
from cube.drivers.qemu import QemuConfig, QemuDriver
from cube.images import Image
from cube.node import Node
from cube.store import Get, Phase

TEST_IMAGES = os.environ.get("CUBE_TEST_IMAGES", "/var/tmp/cube-test-images")
CHECKPOINTS = os.path.join(TEST_IMAGES, "checkpoints")


def vm_config(state_dir: Path, pool_size: int = 1) -> NodeConfig:
    return load_config(
        env={},
        overrides={
            "state_dir": str(state_dir),
            "driver": "qemu",
            "pools": {"base": {"size": pool_size, "concurrency": 1}},
            "templates": {"base": {"memory_mb": 512}},
        },
    )


def vm_driver(config: NodeConfig, image: Image) -> QemuDriver:
    """The node's qemu driver as ``make_driver`` makes it, on the test image, under TCG."""
    gateway = config.subnet.replace(".0.0/16", ".0.1")
    qemu = QemuConfig(
        accel="tcg", bridge=config.bridge, gateway=gateway, checkpoint_dir=CHECKPOINTS
    )
    return QemuDriver(config.state_dir, image=image, config=qemu)


async def record_of(node: Node, id: str) -> Any:
    return await node.services.store.call(Get(id))


async def wait_for_phase(node: Node, id: str, phase: Phase, timeout: float = 30.0) -> Any:
    with trio.fail_after(timeout):
        while (record := await record_of(node, id)).state != phase:
            await trio.sleep(0.05)
    return record


def host_leftovers(config: NodeConfig, driver: QemuDriver) -> list[str]:
    """What a node of ``config`` could leave on the host: the driver's processes, taps,
    directories and leases, and the node's bridge."""
    found = driver.leftovers()
    if os.path.exists(f"/sys/class/net/{config.bridge}"):
        found.append(f"bridge {config.bridge}")
    return found
