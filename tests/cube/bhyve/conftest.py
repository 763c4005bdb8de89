"""Fixtures for the bhyve contract tests: stand-in tools, a fake image, a host reaper."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from standin_kit import StandinHost, install_standins

from actors import open_actor_system
from cube.drivers.bhyve import BhyveConfig, BhyveDriver
from cube.images import Image
from supervisors import Reaper, Spawn


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short directory (unix socket paths are limited) for tools and state."""
    path = Path(tempfile.mkdtemp(prefix="cb-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def host(workdir: Path) -> StandinHost:
    return install_standins(workdir / "bin")


@pytest.fixture
def image(workdir: Path) -> Image:
    """An image record as the builder writes it; the stand-in bhyve never reads the files."""
    return Image(
        key="0123456789abcdef0123",
        directory=str(workdir / "image"),
        kernel=str(workdir / "image/vmlinuz"),
        initrd=str(workdir / "image/initramfs.cpio"),
        kernel_version="6.1.0-test",
        cmdline="console=ttyS0",
        channel="agent",
        agent="envd",
        inputs={},
        initrd_bytes=0,
        files=0,
        build_seconds=0.0,
        control_channel="cube-ctl",
    )


def bhyve_config(host: StandinHost, workdir: Path, **overrides: Any) -> BhyveConfig:
    settings: dict[str, Any] = {
        "state_dir": str(workdir / "state"),
        "bhyve": host.bhyve,
        "bhyvectl": host.bhyvectl,
        "ifconfig": host.ifconfig,
        "firmware": "/usr/local/share/uefi-firmware/BHYVE_UEFI.fd",
        "gateway": "10.251.0.1",
        "bridge": "cubetest0",
        "ipam_dir": str(workdir / "ipam"),
        "nameservers": ("192.0.2.53",),
        "boot_timeout": 10.0,
        "restore_timeout": 10.0,
        "suspend_timeout": 10.0,
    }
    settings.update(overrides)
    return BhyveConfig(**settings)


@pytest.fixture
def make_driver(host: StandinHost, workdir: Path, image: Image) -> Any:
    def make(**overrides: Any) -> BhyveDriver:
        config = bhyve_config(host, workdir, **overrides)
        return BhyveDriver(image=image, disk=str(workdir / "disk.raw"), config=config)

    return make


@pytest.fixture
async def spawn() -> AsyncIterator[Any]:
    """Processes started and reaped by a real host Reaper, as the node's are."""
    async with open_actor_system() as system:
        reaper = await system.spawn(Reaper(), "reaper")

        async def spawn(argv: list[str], **kwargs: Any) -> Any:
            return await reaper.call(Spawn(list(argv), **kwargs))

        yield spawn
