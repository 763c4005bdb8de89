"""One live ``cube serve`` for the whole conformance suite, driven by the real E2B SDKs."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from conformance_kit import LiveServer


@pytest.fixture(scope="session")
def server() -> Iterator[LiveServer]:
    live = LiveServer().start()
    saved = {k: os.environ.get(k) for k in live.env()}
    os.environ.update(live.env())
    try:
        yield live
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        live.stop()


@pytest.fixture
def workdir() -> str:
    """A fresh absolute directory for a test's files inside the sandbox."""
    return f"/tmp/cube-conformance/{secrets.token_hex(6)}"


@pytest.fixture
def sbx(server: LiveServer) -> Iterator[object]:
    """A sync ``e2b.Sandbox`` killed after the test."""
    from e2b import Sandbox

    sandbox = Sandbox.create(timeout=120, metadata={"suite": "conformance"})
    try:
        yield sandbox
    finally:
        sandbox.kill()
