"""DynamicSupervisor: children from one template, max_children, concurrent shutdown."""

from __future__ import annotations

import functools
from typing import Any

import msgspec
import pytest
import trio
import trio.testing
from sup_kit import Crash, Rec, crash_and_wait, rec

from actors import Actor, Restarted, open_actor_system
from supervisors import (
    TEMPORARY,
    TRANSIENT,
    AlreadyStarted,
    ChildSpec,
    ChildStartFailed,
    DynamicSupervisor,
    MaxChildren,
    count_children,
    start_child,
    start_dynamic_child,
    terminate_child,
    which_children,
)


class Describe(msgspec.Struct, frozen=True):
    pass


class Slot(Actor[Any]):
    def __init__(self, pool: str, number: int) -> None:
        self.pool = pool
        self.number = number

    async def on_describe(self, msg: Describe) -> tuple[str, int, int]:
        return (self.pool, self.number, self.ctx.incarnation)

    async def on_crash(self, msg: Crash) -> None:
        raise RuntimeError("slot crashed")


SLOT = ChildSpec("slot", Slot, args=("pool-a",))


async def test_start_dynamic_child_starts_the_template_with_extra_args() -> None:
    async with open_actor_system() as system:
        pool = await system.spawn(DynamicSupervisor(SLOT), "pool")
        first = await start_dynamic_child(pool, 1)
        second = await start_dynamic_child(pool, 2)
        assert (first.path, second.path) == ("/pool/slot-1", "/pool/slot-2")
        assert await first.call(Describe()) == ("pool-a", 1, 1)
        assert await second.call(Describe()) == ("pool-a", 2, 1)
        assert [c.id for c in await which_children(pool)] == ["slot-1", "slot-2"]


async def test_start_dynamic_child_accepts_an_explicit_id_and_refuses_a_duplicate() -> None:
    async with open_actor_system() as system:
        pool = await system.spawn(DynamicSupervisor(SLOT), "pool")
        ref = await start_dynamic_child(pool, 7, id="vm-7")
        assert ref.path == "/pool/vm-7"
        with pytest.raises(AlreadyStarted):
            await start_dynamic_child(pool, 8, id="vm-7")


async def test_max_children_refuses_one_more_child_with_max_children() -> None:
    async with open_actor_system() as system:
        pool = await system.spawn(DynamicSupervisor(SLOT, max_children=2), "pool")
        await start_dynamic_child(pool, 1)
        await start_dynamic_child(pool, 2)
        with pytest.raises(MaxChildren):
            await start_dynamic_child(pool, 3)
        assert (await count_children(pool)).active == 2


async def test_terminate_child_removes_a_dynamic_child_and_frees_its_slot() -> None:
    async with open_actor_system() as system:
        pool = await system.spawn(DynamicSupervisor(SLOT, max_children=2), "pool")
        await start_dynamic_child(pool, 1)
        await start_dynamic_child(pool, 2)
        await terminate_child(pool, "slot-1")
        assert [c.id for c in await which_children(pool)] == ["slot-2"]
        assert "/pool/slot-1" not in system
        await start_dynamic_child(pool, 3)  # room again under max_children


async def test_dynamic_children_stop_concurrently_on_shutdown(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[Any] = []
    template = ChildSpec("w", functools.partial(Rec, terminate_delay=1.0, timed=True))
    async with open_actor_system() as system:
        pool = await system.spawn(DynamicSupervisor(template), "pool")
        for name in ("a", "b", "c"):
            await start_dynamic_child(pool, name, log, id=name)
        log.clear()
        start = trio.current_time()
        await system.stop(pool)
        assert trio.current_time() - start == pytest.approx(1.0, abs=0.01)
    stops = [at for entry, at in log if entry.startswith("stop:")]
    dones = [at for entry, at in log if entry.startswith("stop-done:")]
    assert len(stops) == 3 and len(dones) == 3
    assert max(stops) < min(dones)  # every terminate began before any finished: they overlap


async def test_crashed_dynamic_child_is_restarted_alone() -> None:
    async with open_actor_system() as system:
        pool = await system.spawn(DynamicSupervisor(SLOT), "pool")
        one = await start_dynamic_child(pool, 1)
        two = await start_dynamic_child(pool, 2)
        await crash_and_wait(system, "/pool/slot-1", 1)
        assert await one.call(Describe()) == ("pool-a", 1, 2)
        assert await two.call(Describe()) == ("pool-a", 2, 1)


async def test_crashed_temporary_dynamic_child_is_removed() -> None:
    template = ChildSpec("slot", Slot, args=("pool-a",), restart=TEMPORARY)
    async with open_actor_system() as system:
        pool = await system.spawn(DynamicSupervisor(template), "pool")
        await start_dynamic_child(pool, 1)
        await system.lookup("/pool/slot-1").cast(Crash())
        await trio.testing.wait_all_tasks_blocked()
        assert await which_children(pool) == []
        assert system.events.of(Restarted) == []


async def test_dynamic_supervisor_refuses_start_child() -> None:
    async with open_actor_system() as system:
        pool = await system.spawn(DynamicSupervisor(SLOT), "pool")
        with pytest.raises(ChildStartFailed):
            await start_child(pool, rec("x", []))


async def test_dynamic_supervisor_rejects_a_significant_template() -> None:
    template = ChildSpec("slot", Slot, restart=TRANSIENT, significant=True)
    with pytest.raises(ValueError):
        DynamicSupervisor(template)


async def test_failed_dynamic_start_raises_child_start_failed_and_leaves_no_child() -> None:
    async with open_actor_system() as system:
        pool = await system.spawn(
            DynamicSupervisor(ChildSpec("w", functools.partial(Rec, fail_init=True))), "pool"
        )
        with pytest.raises(ChildStartFailed):
            await start_dynamic_child(pool, "bad", [])
        assert await which_children(pool) == []
        assert len(system) == 1


async def test_a_factory_that_raises_fails_the_start_not_the_supervisor() -> None:
    async with open_actor_system() as system:
        pool = await system.spawn(DynamicSupervisor(SLOT), "pool")
        survivor = await start_dynamic_child(pool, 1)
        with pytest.raises(ChildStartFailed):
            await start_dynamic_child(pool, 2, "one argument too many")
        assert pool.alive
        assert await survivor.call(Describe()) == ("pool-a", 1, 1)
