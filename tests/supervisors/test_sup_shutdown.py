"""Shutdown specifications: a timeout then kill, BRUTAL, INFINITY, and the defaults."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from sup_kit import Rec, rec

from actors import Stopped, open_actor_system
from supervisors import BRUTAL, INFINITY, ChildSpec, Supervisor, terminate_child, which_children


async def test_hanging_terminate_is_killed_after_the_shutdown_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(
            Supervisor([rec("w", log, shutdown=2.0, hang_terminate=True)]), "sup"
        )
        start = trio.current_time()
        await terminate_child(sup, "w")
        assert trio.current_time() - start == pytest.approx(2.0, abs=0.01)
        assert log[-1] == "stop:w"  # terminate began and never finished
        assert system.events.of(Stopped, "/sup/w")[-1].reason == "killed"
        assert (await which_children(sup))[0].status == "stopped"


async def test_terminate_that_finishes_within_the_timeout_is_not_killed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(
            Supervisor([rec("w", log, shutdown=2.0, terminate_delay=1.5)]), "sup"
        )
        start = trio.current_time()
        await terminate_child(sup, "w")
        assert trio.current_time() - start == pytest.approx(1.5, abs=0.01)
        assert log[-2:] == ["stop:w", "stop-done:w"]
        assert system.events.of(Stopped, "/sup/w")[-1].reason == "shutdown"


async def test_default_worker_shutdown_is_five_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("w", log, hang_terminate=True)]), "sup")
        start = trio.current_time()
        await terminate_child(sup, "w")
        assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)


async def test_brutal_kills_at_once_without_terminate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("w", log, shutdown=BRUTAL)]), "sup")
        log.clear()
        start = trio.current_time()
        await terminate_child(sup, "w")
        assert trio.current_time() - start == 0
        assert log == []
        assert system.events.of(Stopped, "/sup/w")[-1].reason == "killed"


async def test_infinity_waits_for_a_slow_terminate(autojump_clock: trio.testing.MockClock) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(
            Supervisor([rec("w", log, shutdown=INFINITY, terminate_delay=100.0)]), "sup"
        )
        start = trio.current_time()
        await terminate_child(sup, "w")
        assert trio.current_time() - start == pytest.approx(100.0, abs=0.01)
        assert log[-1] == "stop-done:w"
        assert system.events.of(Stopped, "/sup/w")[-1].reason == "shutdown"


async def test_child_supervisor_waits_forever_by_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []

    def inner() -> Supervisor:
        return Supervisor([rec("slow", log, shutdown=INFINITY, terminate_delay=60.0)])

    assert ChildSpec("inner", inner).shutdown_for("supervisor") is None
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([ChildSpec("inner", inner)]), "sup")
        start = trio.current_time()
        await terminate_child(sup, "inner")
        assert trio.current_time() - start == pytest.approx(60.0, abs=0.01)
        assert log[-1] == "stop-done:slow"


async def test_shutdown_timeout_applies_on_system_exit_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(
            Supervisor([rec("a", log), rec("b", log, shutdown=3.0, hang_terminate=True)]), "sup"
        )
        log.clear()
        start = trio.current_time()
    assert trio.current_time() - start == pytest.approx(3.0, abs=0.01)
    assert log == ["stop:b", "stop:a"]


async def test_top_level_worker_is_killed_after_five_seconds_on_system_exit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Rec("w", log, hang_terminate=True), "w")
        start = trio.current_time()
    assert trio.current_time() - start == pytest.approx(5.0, abs=0.01)
