"""The actor system: spawn, lookup, independent systems, and no task left behind."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from actor_kit import Add, Boom, Counter, Crash, Get, all_tasks

from actors import (
    Actor,
    ActorStopped,
    Crashed,
    ExitReason,
    NoSuchActor,
    StartFailed,
    open_actor_system,
)
from supervisors import ChildSpec, DynamicSupervisor, Supervisor, start_dynamic_child


class FailingInit(Actor[Any]):
    async def init(self) -> None:
        raise Boom("init failed")


class SlowInit(Actor[Any]):
    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def init(self) -> None:
        await trio.sleep(1)
        self.log.append("init done")


class Recorder(Actor[Any]):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def terminate(self, reason: ExitReason) -> None:
        self.log.append(self.name)


# -- spawn and lookup -----------------------------------------------------------------------


async def test_spawn_returns_once_init_has_completed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(SlowInit(log), "slow")
        assert log == ["init done"]
        assert trio.current_time() == pytest.approx(1.0)


async def test_spawn_raises_start_failed_when_init_raises_and_frees_the_name() -> None:
    async with open_actor_system() as system:
        with pytest.raises(StartFailed) as info:
            await system.spawn(FailingInit(), "bad")
        assert isinstance(info.value.cause, Boom)
        assert info.value.path == "/bad"
        assert "/bad" not in system
        await system.spawn(Counter(), "bad")  # the name is free again


async def test_spawn_accepts_a_factory_and_names_the_actor_after_its_class() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter)
        assert ref.path.startswith("/counter-")
        assert system.lookup(ref.path) is ref


async def test_two_top_level_actors_cannot_share_a_name() -> None:
    async with open_actor_system() as system:
        await system.spawn(Counter(), "same")
        with pytest.raises(ValueError):
            await system.spawn(Counter(), "same")


async def test_lookup_returns_the_stable_ref_and_raises_no_such_actor_for_unknown_paths() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        assert system.lookup("/counter") is ref
        with pytest.raises(NoSuchActor):
            system.lookup("/nobody")


async def test_system_stop_refuses_a_supervised_actor() -> None:
    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("w", Counter)]), "sup")
        with pytest.raises(ValueError):
            await system.stop(system.lookup("/sup/w"))


async def test_system_exit_stops_top_level_actors_in_reverse_spawn_order() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        for name in ("a", "b", "c"):
            await system.spawn(Recorder(name, log), name)
    assert log == ["c", "b", "a"]


async def test_spawn_after_the_system_began_closing_is_refused() -> None:
    async with open_actor_system() as system:
        pass
    with pytest.raises(RuntimeError):
        await system.spawn(Counter(), "late")


# -- independence -------------------------------------------------------------------------


async def test_two_systems_in_one_run_have_independent_names() -> None:
    async with open_actor_system("one") as one, open_actor_system("two") as two:
        ref1 = await one.spawn(Counter(), "x")
        ref2 = await two.spawn(Counter(), "x")
        assert ref1 is not ref2
        await ref1.call(Add(1))
        await ref2.call(Add(10))
        assert await ref1.call(Get()) == 1
        assert await ref2.call(Get()) == 10
        assert one.lookup("/x") is ref1
        assert two.lookup("/x") is ref2


async def test_a_crash_in_one_system_does_not_touch_the_other() -> None:
    async with open_actor_system("one") as one, open_actor_system("two") as two:
        ref1 = await one.spawn(Counter(), "x")
        ref2 = await two.spawn(Counter(), "x")
        await ref1.cast(Crash())
        await trio.testing.wait_all_tasks_blocked()
        assert not ref1.alive
        assert ref2.alive and await ref2.call(Get()) == 0
        assert one.events.of(Crashed) and not two.events.of(Crashed)


async def test_closing_one_system_leaves_the_other_running() -> None:
    async with open_actor_system("two") as two:
        ref2 = await two.spawn(Counter(), "x")
        async with open_actor_system("one") as one:
            ref1 = await one.spawn(Counter(), "x")
        with pytest.raises(ActorStopped):
            await ref1.call(Get())
        assert await ref2.call(Add(1)) == 1


async def test_each_system_has_its_own_call_timer(autojump_clock: trio.testing.MockClock) -> None:
    async with open_actor_system("one") as one, open_actor_system("two") as two:
        await one.spawn(Counter(), "x")
        await two.spawn(Counter(), "x")
        await one.lookup("/x").call(Get())
        assert one.timers is not two.timers
        assert one.timers.pending() == 0 and two.timers.pending() == 0


# -- nothing left behind --------------------------------------------------------------------


async def test_no_task_is_left_after_the_system_block_exits() -> None:
    before = all_tasks()
    nurseries = list(trio.lowlevel.current_task().child_nurseries)
    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("a", Counter), ChildSpec("b", Counter)]), "sup")
        await system.spawn(Counter(), "loose")
        assert len(all_tasks()) > len(before)
        assert len(trio.lowlevel.current_task().child_nurseries) == len(nurseries) + 1
    assert all_tasks() == before
    assert trio.lowlevel.current_task().child_nurseries == nurseries


async def test_no_task_is_left_when_the_block_exits_by_an_exception() -> None:
    before = all_tasks()
    # the system unwraps its strict nursery's group: the caller gets its own error back
    with pytest.raises(Boom):
        async with open_actor_system() as system:
            await system.spawn(Supervisor([ChildSpec("a", Counter)]), "sup")
            raise Boom("user code failed")
    assert all_tasks() == before


async def test_no_task_is_left_when_the_block_is_cancelled(
    autojump_clock: trio.testing.MockClock,
) -> None:
    before = all_tasks()
    with trio.move_on_after(1):
        async with open_actor_system() as system:
            await system.spawn(Supervisor([ChildSpec("a", Counter)]), "sup")
            await trio.sleep_forever()
    assert all_tasks() == before


async def test_no_task_is_left_after_crashes_and_restarts() -> None:
    before = all_tasks()
    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("a", Counter)], intensity=10), "sup")
        for _ in range(5):
            await system.lookup("/sup/a").cast(Crash())
            await trio.testing.wait_all_tasks_blocked()
    assert all_tasks() == before


async def test_spawning_many_actors_and_exiting_cleans_up() -> None:
    before = all_tasks()
    async with open_actor_system() as system:
        for n in range(20):
            children = [ChildSpec(f"w{i}", Counter) for i in range(20)]
            await system.spawn(Supervisor(children), f"sup{n}")
        pool = await system.spawn(DynamicSupervisor(ChildSpec("slot", Counter)), "pool")
        for _ in range(100):
            await start_dynamic_child(pool)
        for n in range(100):
            await system.spawn(Counter(), f"loose{n}")
        assert len(system) == 20 * 21 + 101 + 100
    assert all_tasks() == before
    assert len(system) == 0
