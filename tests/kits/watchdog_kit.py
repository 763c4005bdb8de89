"""A watchdog so that a kernel regression fails a test instead of hanging the suite.

pytest-trio only runs the async fixtures a test names in its signature, so the watchdog is
not a fixture. The hook below is a wrapper that runs before pytest-trio's: it wraps each of
guarded test function in a deadline before pytest-trio turns them into a trio.run.
Under a MockClock the autojump reaches the deadline as soon as a test deadlocks; under the
real clock it takes REAL_LIMIT seconds.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

MOCK_LIMIT = 3600.0  # trio seconds under a MockClock: longer than any test sleeps
REAL_LIMIT = 10.0  # real seconds otherwise


def watchdog_hook(prefix: str) -> Callable[[pytest.Item], Iterator[None]]:
    """A ``pytest_runtest_call`` hook guarding the tests in files named ``prefix*``; a
    conftest binds it: ``pytest_runtest_call = watchdog_hook("test_actor_")``."""

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
        _guard(item, prefix)
        return (yield)

    return pytest_runtest_call


def _guard(item: pytest.Item, prefix: str) -> None:
    fn = getattr(item, "obj", None)
    if fn is None or not inspect.iscoroutinefunction(fn) or getattr(fn, "_watchdog", False):
        return
    if not item.path.name.startswith(prefix):
        return

    @functools.wraps(fn)
    async def guarded(**kwargs: Any) -> None:
        mock = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
        limit = MOCK_LIMIT if mock else REAL_LIMIT
        with trio.move_on_after(limit) as scope:
            await fn(**kwargs)
        if scope.cancelled_caught:
            pytest.fail(f"still running after {limit:g} s of trio time: a deadlock?")

    guarded._watchdog = True  # type: ignore[attr-defined]
    item.obj = guarded  # type: ignore[attr-defined]
