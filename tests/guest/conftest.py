"""Fixtures for the guest tests: envd runs as a real subprocess, and must leave nothing behind."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from envd_kit import Envd, connect

from guest.client import GuestClient


@pytest.fixture(scope="session")
def envd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envd]:
    """One envd on a unix socket shared by the tests that need nothing special from it."""
    server = Envd(tmp_path_factory.mktemp("envd")).start()
    yield server
    server.stop()
    assert server.leaks() == []


@pytest.fixture
async def client(envd: Envd) -> AsyncIterator[GuestClient]:
    """A fresh connection (and session) to the shared envd."""
    async with connect(envd) as guest:
        yield guest


@pytest.fixture
def private_envd(tmp_path: Path) -> Iterator[Envd]:
    """A factory of envds for tests that need their own (options, transports, shutdown)."""
    started: list[Envd] = []

    def make(transport: str = "unix", *extra: str) -> Envd:
        server = Envd(tmp_path / f"envd{len(started)}", transport, extra).start()
        started.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in started:
        server.stop()
        assert server.leaks() == []
