"""Fixtures for the driver tests: a real Reaper, drivers on short state directories, and the
check that every test leaves nothing behind (``leftovers()`` is empty after each one)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from driver_kit import Spawner, make_reaper, ns_unavailable, state_dir

from actors import open_actor_system
from cube.drivers.ns import NsDriver
from cube.drivers.process import ProcessDriver


@pytest.fixture
async def spawn() -> AsyncIterator[Spawner]:
    """``spawn`` backed by a Reaper in a fresh actor system (closed after the drivers)."""
    async with open_actor_system("drivers") as system:
        reaper = await system.spawn(make_reaper(), "reaper")
        yield Spawner(reaper)


@pytest.fixture
async def make_driver(spawn: Spawner) -> AsyncIterator[Callable[..., Any]]:
    """``make_driver(cls, **options)``: a driver on its own state directory. Afterwards its
    ``leftovers()`` must be empty; whatever is left is cleaned up anyway, then reported."""
    drivers: list[Any] = []
    with contextlib.ExitStack() as dirs:

        def make(cls: type, **options: Any) -> Any:
            driver = cls(dirs.enter_context(state_dir()), **options)
            drivers.append(driver)
            return driver

        yield make
        leaked = {d.state_dir: d.leftovers() for d in drivers}
        for driver in drivers:
            await driver.cleanup()
        assert all(not items for items in leaked.values()), f"resources left behind: {leaked}"


@pytest.fixture
def ns(make_driver: Callable[..., Any]) -> NsDriver:
    """An ns driver running the real envd."""
    reason = ns_unavailable()
    if reason:
        pytest.skip(reason)
    driver: NsDriver = make_driver(NsDriver)
    return driver


@pytest.fixture
def process_driver(make_driver: Callable[..., Any]) -> ProcessDriver:
    """A process driver running the real envd."""
    driver: ProcessDriver = make_driver(ProcessDriver)
    return driver
