"""Fixtures for the QEMU tests: a cached guest image, a host reaper, a driver per test."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from vm_kit import CHECKPOINTS, TEST_IMAGES

from actors import open_actor_system
from cube.drivers.qemu import QemuConfig, QemuDriver
from cube.images import Image, ImageSpec, build_image
from supervisors import Reaper, Spawn

if not sys.platform.startswith("linux") or shutil.which("qemu-system-x86_64") is None:
    pytest.skip(
        "needs Linux and qemu-system-x86_64 (apt-get install qemu-system-x86)",
        allow_module_level=True,
    )


@pytest.fixture(scope="session")
def standin_image() -> Image:
    """The image with the stand-in agent (echo, count, sh): the channel without envd."""
    return build_image(ImageSpec(agent="standin"), TEST_IMAGES)


@pytest.fixture(scope="session")
def envd_image() -> Image:
    """The image with the real guest.envd (a broken envd import fails, never skips)."""
    check = subprocess.run(
        [sys.executable, "-c", "import guest.envd"], capture_output=True, check=False
    )
    if check.returncode != 0:
        pytest.fail(f"guest.envd does not import: {check.stderr.decode()[-2000:]}")
    return build_image(ImageSpec(agent="envd"), TEST_IMAGES)


@pytest.fixture
def state_dir() -> Iterator[str]:
    """A short state directory (unix socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="cq-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def spawn() -> AsyncIterator[Any]:
    """The ``spawn`` a driver gets: processes started and reaped by a real host Reaper."""
    async with open_actor_system() as system:
        reaper = await system.spawn(Reaper(), "reaper")

        async def spawn(argv: list[str], **kwargs: Any) -> Any:
            return await reaper.call(Spawn(list(argv), **kwargs))

        yield spawn


@pytest.fixture
async def driver(envd_image: Image, state_dir: str, spawn: Any) -> AsyncIterator[QemuDriver]:
    """A TCG driver on the envd image whose starts restore the shared durable checkpoint
    (made by the first start on this machine); whatever a test leaves running is removed
    after (before the reaper stops, so that the reaper collects it)."""
    config = QemuConfig(accel="tcg", checkpoint_dir=CHECKPOINTS)
    qemu = QemuDriver(state_dir, image=envd_image, config=config)
    yield qemu
    await qemu.cleanup()
