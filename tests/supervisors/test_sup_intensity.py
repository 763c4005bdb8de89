"""Restart intensity under a MockClock: more than ``intensity`` restarts in ``period`` gives up."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from sup_kit import Boom, Crash, Ping, crash_and_wait, rec, ref_of, watch

from actors import ActorStopped, Crashed, Failure, GaveUp, Restarted, open_actor_system
from supervisors import Supervisor, SupervisorGaveUp


async def test_default_intensity_is_three_restarts_in_five_seconds() -> None:
    sup = Supervisor()
    assert (sup.intensity, sup.period) == (3, 5.0)


async def test_invalid_intensity_or_period_is_rejected() -> None:
    with pytest.raises(ValueError):
        Supervisor(intensity=-1)
    with pytest.raises(ValueError):
        Supervisor(period=0)


async def test_three_restarts_within_the_period_do_not_give_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("w", log)], intensity=3, period=5), "sup")
        for n in (1, 2, 3):
            await crash_and_wait(system, "/sup/w", n)
            await trio.sleep(1)
        assert system.events.of(GaveUp) == []
        assert await ref_of(system, "/sup/w").call(Ping()) == ("w", 4)


async def test_fourth_restart_within_the_period_gives_up_with_supervisor_gave_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("w", log)], intensity=3, period=5), "sup")
        downs = await watch(system, sup)
        for n in (1, 2, 3):
            await crash_and_wait(system, "/sup/w", n)
            await trio.sleep(1)
        await ref_of(system, "/sup/w").cast(Crash())  # the 4th, at t=3
        gave_up = await system.events.wait_for(GaveUp, "/sup")
        await trio.testing.wait_all_tasks_blocked()
        assert gave_up.at == pytest.approx(3.0)
        assert gave_up.child == "w"
        assert len(system.events.of(Restarted, "/sup/w")) == 3
        (down,) = downs
        assert type(down.reason) is Failure
        error = down.reason.error
        assert isinstance(error, SupervisorGaveUp)
        assert (error.path, error.child) == ("/sup", "w")
        assert isinstance(error.cause, Boom)
        assert system.events.of(Crashed, "/sup")[-1].error.startswith("SupervisorGaveUp")
        with pytest.raises(ActorStopped):
            await sup.call(Ping())


async def test_giving_up_stops_the_other_children_in_reverse_start_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    children = [rec(name, log) for name in ("a", "b", "c", "d")]
    async with open_actor_system() as system:
        await system.spawn(Supervisor(children, intensity=1, period=5), "sup")
        await crash_and_wait(system, "/sup/b", 1)
        log.clear()
        await ref_of(system, "/sup/b").cast(Crash())
        await system.events.wait_for(GaveUp, "/sup")
        await trio.testing.wait_all_tasks_blocked()
        # b's own terminate runs as it crashes; then the others, last started first
        assert log == ["stop:b", "stop:d", "stop:c", "stop:a"]
        assert len(system) == 0  # a top-level supervisor's whole subtree is gone


async def test_intensity_zero_gives_up_on_the_first_crash() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("w", log)], intensity=0), "sup")
        await ref_of(system, "/sup/w").cast(Crash())
        await system.events.wait_for(GaveUp, "/sup")
        assert system.events.of(Restarted) == []


async def test_the_same_crashes_spread_over_more_than_the_period_do_not_give_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("w", log)], intensity=3, period=5), "sup")
        for n in range(1, 9):  # 8 crashes, 2 s apart: at most 3 in any 5 s window
            await crash_and_wait(system, "/sup/w", n)
            await trio.sleep(2)
        assert system.events.of(GaveUp) == []
        assert await ref_of(system, "/sup/w").call(Ping()) == ("w", 9)


async def test_a_restart_older_than_the_period_no_longer_counts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("w", log)], intensity=3, period=5), "sup")
        for n, pause in ((1, 1.0), (2, 1.0), (3, 3.5)):  # crashes at t=0, 1, 2
            await crash_and_wait(system, "/sup/w", n)
            await trio.sleep(pause)
        await crash_and_wait(system, "/sup/w", 4)  # t=5.5: the one at t=0 has left the window
        assert system.events.of(GaveUp) == []


async def test_a_fourth_restart_just_inside_the_period_gives_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("w", log)], intensity=3, period=5), "sup")
        for n, pause in ((1, 1.0), (2, 1.0), (3, 2.9)):  # crashes at t=0, 1, 2
            await crash_and_wait(system, "/sup/w", n)
            await trio.sleep(pause)
        await ref_of(system, "/sup/w").cast(Crash())  # t=4.9
        gave_up = await system.events.wait_for(GaveUp, "/sup")
        assert gave_up.at == pytest.approx(4.9)


async def test_restarts_of_different_children_count_together(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("a", log), rec("b", log)], intensity=2, period=5), "sup")
        await crash_and_wait(system, "/sup/a", 1)
        await crash_and_wait(system, "/sup/b", 1)
        await ref_of(system, "/sup/a").cast(Crash())
        gave_up = await system.events.wait_for(GaveUp, "/sup")
        assert gave_up.child == "a"
