"""Fixtures for the nft policy tests: the private test network and a policy on it."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator

import pytest
from netpolicy_kit import Topology, network

from cube.netpolicy import NftPolicy


def _why_not_real() -> str | None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "needs root (network namespaces and nftables)"
    if shutil.which("nft") is None or shutil.which("ip") is None:
        return "needs the nft and ip commands (Debian: nftables, iproute2)"
    return None


@pytest.fixture(scope="session")
def topology() -> Iterator[Topology]:
    """The bridge, the two sandboxes and the internet namespace, for the whole session."""
    reason = _why_not_real()
    if reason is not None:
        pytest.skip(reason)
    with network() as topo:
        yield topo


@pytest.fixture
async def policy(topology: Topology) -> AsyncIterator[NftPolicy]:
    """An ensured policy on the test bridge (libnftables when it loads, else nft);
    its tables are destroyed afterwards."""
    driver = NftPolicy(topology.config())
    await driver.ensure()
    try:
        yield driver
    finally:
        await driver.destroy()
        driver.close()
