"""Fixtures for node tests: a real node on the process driver, in a temporary state dir."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from node_kit import envd_processes, node_config

from cube.node import Node, open_node


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # short: envd's unix socket lives under it, and sun_path holds 107 bytes
    path = Path(tempfile.mkdtemp(prefix="cube-node-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def node(state_dir: Path) -> AsyncIterator[Node]:
    async with open_node(node_config(state_dir)) as running:
        yield running
    assert running.services.driver.leftovers() == [], "the driver left resources behind"
    assert envd_processes(state_dir) == []
