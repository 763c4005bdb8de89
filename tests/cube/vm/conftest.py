"""Fixtures for the VM node tests: real QEMU (TCG here) behind a real node."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from vmnode_kit import TEST_IMAGES, host_leftovers, vm_config, vm_driver

from cube.images import Image, ImageSpec, build_image
from cube.node import Node, open_node

if not sys.platform.startswith("linux") or shutil.which("qemu-system-x86_64") is None:
    pytest.skip(
        "needs Linux and qemu-system-x86_64 (apt-get install qemu-system-x86)",
        allow_module_level=True,
    )
if __import__("os").geteuid() != 0:
    pytest.skip("VM sandboxes need root (taps, the bridge, nftables)", allow_module_level=True)


@pytest.fixture(scope="session")
def envd_image() -> Image:
    check = subprocess.run(
        [sys.executable, "-c", "import guest.envd"], capture_output=True, check=False
    )
    if check.returncode != 0:
        pytest.fail(f"guest.envd does not import: {check.stderr.decode()[-2000:]}")
    return build_image(ImageSpec(agent="envd"), TEST_IMAGES)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # short: the slots' unix sockets live under it
    path = Path(tempfile.mkdtemp(prefix="cv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def node(state_dir: Path, envd_image: Image) -> AsyncIterator[Node]:
    """A node on the qemu driver with one warm (parked) slot; nothing of it may be left
    on the host afterwards."""
    config = vm_config(state_dir)
    driver = vm_driver(config, envd_image)
    async with open_node(config, driver=driver) as running:
        yield running
    assert host_leftovers(config, driver) == []
