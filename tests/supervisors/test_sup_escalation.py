"""Escalation through nested supervisors, and failures while starting."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from sup_kit import Boom, Crash, Ping, Rec, rec, ref_of, strip

from actors import Crashed, GaveUp, Restarted, StartFailed, open_actor_system
from supervisors import (
    ONE_FOR_ALL,
    ChildSpec,
    DynamicSupervisor,
    Supervisor,
    start_dynamic_child,
    which_children,
)


def mid_supervisor(log: list[Any]) -> ChildSpec:
    return ChildSpec("mid", lambda: Supervisor([rec("w", log)], intensity=0))


async def test_nested_supervisor_that_gives_up_is_restarted_by_its_parent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([mid_supervisor(log)]), "top")
        worker = ref_of(system, "/top/mid/w")
        await worker.cast(Crash())
        gave_up = await system.events.wait_for(GaveUp, "/top/mid")
        assert gave_up.child == "w"
        with trio.fail_after(10):
            await system.events.wait_for(Restarted, "/top/mid")
        assert system.events.of(GaveUp, "/top") == []
        assert strip(log)[-1] == "init:w"  # the new mid started w again
        # the grandchild's ref survives its supervisor's restart
        assert system.lookup("/top/mid/w") is worker
        assert await worker.call(Ping()) == ("w", 2)


async def test_a_nested_supervisor_giving_up_reports_supervisor_gave_up_to_its_parent() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([mid_supervisor(log)], intensity=0), "top")
        await ref_of(system, "/top/mid/w").cast(Crash())
        gave_up = await system.events.wait_for(GaveUp, "/top")
        assert gave_up.child == "mid"
        assert "SupervisorGaveUp" in gave_up.error


async def test_one_for_all_restart_of_a_child_supervisor_restarts_its_children(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []

    def inner() -> Supervisor:
        return Supervisor([rec("x", log)])

    async with open_actor_system() as system:
        await system.spawn(
            Supervisor([ChildSpec("inner", inner), rec("b", log)], strategy=ONE_FOR_ALL), "top"
        )
        log.clear()
        await ref_of(system, "/top/b").cast(Crash())
        with trio.fail_after(10):
            await system.events.wait_for(Restarted, "/top/b")
        assert strip(log) == ["stop:b", "stop:x", "init:x", "init:b"]
        assert await system.lookup("/top/inner/x").call(Ping()) == ("x", 2)


async def test_child_init_failure_fails_the_supervisor_start_and_stops_started_children() -> None:
    log: list[str] = []
    children = [rec("a", log), rec("b", log), rec("bad", log, fail_init=True), rec("c", log)]
    async with open_actor_system() as system:
        with pytest.raises(StartFailed) as info:
            await system.spawn(Supervisor(children), "sup")
        assert info.value.path == "/sup"
        cause = info.value.cause
        assert isinstance(cause, StartFailed) and cause.path == "/sup/bad"
        assert isinstance(cause.cause, Boom)
        assert strip(log) == ["init:a", "init:b", "init:bad", "stop:b", "stop:a"]
        assert len(system) == 0


async def test_a_restart_whose_init_fails_counts_as_a_crash_toward_intensity() -> None:
    log: list[str] = []
    starts: list[int] = []

    def flaky() -> Rec:
        starts.append(1)
        return Rec("w", log, fail_init=len(starts) > 1)  # only the first start succeeds

    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("w", flaky)], intensity=2), "sup")
        await ref_of(system, "/sup/w").cast(Crash())
        gave_up = await system.events.wait_for(GaveUp, "/sup")
        assert len(starts) == 1 + 2  # the first start, then two restarts whose init failed
        assert "cannot start" in gave_up.error


async def test_a_restarted_dynamic_supervisor_can_start_children_again() -> None:
    log: list[str] = []
    pool = ChildSpec("pool", lambda: DynamicSupervisor(ChildSpec("w", Rec)))
    async with open_actor_system() as system:
        await system.spawn(Supervisor([pool]), "top")
        await start_dynamic_child(system.lookup("/top/pool"), "a", log)
        system.inject_crash("/top/pool")
        await system.events.wait_for(Restarted, "/top/pool")
        # OTP: dynamic children are lost when their supervisor restarts; the ids start over
        assert await which_children(system.lookup("/top/pool")) == []
        ref = await start_dynamic_child(system.lookup("/top/pool"), "b", log)
        assert ref.path == "/top/pool/w-1"


async def test_a_child_whose_terminate_raises_keeps_its_exit_reason_and_is_restarted() -> None:
    log: list[str] = []

    class BadTerminate(Rec):
        async def terminate(self, reason: object) -> None:
            raise Boom("terminate failed")

    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("w", BadTerminate, args=("w", log))]), "sup")
        await ref_of(system, "/sup/w").cast(Crash())
        await system.events.wait_for(Restarted, "/sup/w")
        assert system.events.of(Crashed, "/sup/w")[0].error == "Boom: w crashed"
        assert await ref_of(system, "/sup/w").call(Ping()) == ("w", 2)
