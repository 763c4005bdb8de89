"""Start and stop order, the three strategies, and the three restart types."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from sup_kit import Crash, Finish, Ping, crash_and_wait, rec, ref_of, strip

from actors import ActorStopped, Restarted, Shutdown, Stopped, open_actor_system
from supervisors import (
    ONE_FOR_ALL,
    REST_FOR_ONE,
    TEMPORARY,
    TRANSIENT,
    ChildSpec,
    Supervisor,
    terminate_child,
    which_children,
)

# -- order ----------------------------------------------------------------------------------


async def test_children_start_in_spec_order_each_init_complete_before_the_next(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[object] = []
    children = [rec(name, log, init_delay=1.0, timed=True) for name in ("a", "b", "c")]
    async with open_actor_system() as system:
        await system.spawn(Supervisor(children), "sup")
        assert log == [
            ("init:a", 0.0),
            ("ready:a", 1.0),
            ("init:b", 1.0),
            ("ready:b", 2.0),
            ("init:c", 2.0),
            ("ready:c", 3.0),
        ]


async def test_supervisor_start_returns_only_after_every_child_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    children = [rec(name, log, init_delay=1.0) for name in ("a", "b")]
    async with open_actor_system() as system:
        await system.spawn(Supervisor(children), "sup")
        assert trio.current_time() == pytest.approx(2.0)
        assert [c.status for c in await which_children(system.lookup("/sup"))] == [
            "running",
            "running",
        ]


async def test_children_stop_in_reverse_start_order_on_system_exit() -> None:
    log: list[str] = []
    children = [rec(name, log) for name in ("a", "b", "c")]
    async with open_actor_system() as system:
        await system.spawn(Supervisor(children), "sup")
        log.clear()
    assert log == ["stop:c", "stop:b", "stop:a"]


async def test_each_child_finishes_stopping_before_the_previous_one_is_asked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[object] = []
    children = [rec(name, log, terminate_delay=1.0, timed=True) for name in ("a", "b")]
    async with open_actor_system() as system:
        await system.spawn(Supervisor(children), "sup")
        log.clear()
    assert log == [("stop:b", 0.0), ("stop-done:b", 1.0), ("stop:a", 1.0), ("stop-done:a", 2.0)]


async def test_nested_supervisors_stop_depth_first_in_reverse_order() -> None:
    log: list[str] = []

    def inner() -> Supervisor:
        return Supervisor([rec("x", log), rec("y", log)])

    async with open_actor_system() as system:
        await system.spawn(
            Supervisor([rec("a", log), ChildSpec("inner", inner), rec("b", log)]), "sup"
        )
        assert strip(log) == ["init:a", "init:x", "init:y", "init:b"]
        log.clear()
    assert log == ["stop:b", "stop:y", "stop:x", "stop:a"]


# -- strategies -----------------------------------------------------------------------------


async def test_one_for_one_restarts_only_the_crashed_child() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec(n, log) for n in ("a", "b", "c")]), "sup")
        log.clear()
        await crash_and_wait(system, "/sup/b", 1)
        assert strip(log) == ["stop:b", "init:b"]
        for name, incarnation in (("a", 1), ("b", 2), ("c", 1)):
            assert await ref_of(system, f"/sup/{name}").call(Ping()) == (name, incarnation)


async def test_one_for_all_stops_the_others_in_reverse_order_then_restarts_all_in_start_order() -> (
    None
):
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(
            Supervisor([rec(n, log) for n in ("a", "b", "c", "d")], strategy=ONE_FOR_ALL), "sup"
        )
        log.clear()
        await ref_of(system, "/sup/b").cast(Crash())
        await system.events.wait_for(Restarted, "/sup/d")
        assert strip(log) == [
            "stop:b",  # the crashed child's own terminate
            "stop:d",
            "stop:c",
            "stop:a",
            "init:a",
            "init:b",
            "init:c",
            "init:d",
        ]
        for name in ("a", "b", "c", "d"):
            assert await ref_of(system, f"/sup/{name}").call(Ping()) == (name, 2)


async def test_one_for_all_counts_one_restart_per_crash_against_intensity() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(
            Supervisor([rec(n, log) for n in ("a", "b", "c")], strategy=ONE_FOR_ALL, intensity=1),
            "sup",
        )
        await ref_of(system, "/sup/a").cast(Crash())
        await system.events.wait_for(Restarted, "/sup/c")
        assert await ref_of(system, "/sup/c").call(Ping()) == ("c", 2)  # did not give up


async def test_rest_for_one_restarts_the_crashed_child_and_those_started_after_it() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(
            Supervisor([rec(n, log) for n in ("a", "b", "c", "d")], strategy=REST_FOR_ONE), "sup"
        )
        log.clear()
        await ref_of(system, "/sup/b").cast(Crash())
        await system.events.wait_for(Restarted, "/sup/d")
        assert strip(log) == ["stop:b", "stop:d", "stop:c", "init:b", "init:c", "init:d"]
        expected = {"a": 1, "b": 2, "c": 2, "d": 2}
        for name, incarnation in expected.items():
            assert await ref_of(system, f"/sup/{name}").call(Ping()) == (name, incarnation)


async def test_rest_for_one_crash_of_the_last_child_restarts_only_it() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(
            Supervisor([rec(n, log) for n in ("a", "b", "c")], strategy=REST_FOR_ONE), "sup"
        )
        log.clear()
        await crash_and_wait(system, "/sup/c", 1)
        assert strip(log) == ["stop:c", "init:c"]


# -- restart types --------------------------------------------------------------------------


async def test_permanent_child_is_restarted_even_after_a_normal_exit() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("w", log)]), "sup")
        await ref_of(system, "/sup/w").cast(Finish())
        await system.events.wait_for(Restarted, "/sup/w")
        assert await ref_of(system, "/sup/w").call(Ping()) == ("w", 2)


async def test_transient_child_is_not_restarted_after_a_normal_exit() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("w", log, restart=TRANSIENT)]), "sup")
        ref = ref_of(system, "/sup/w")
        await ref.cast(Finish())
        await system.events.wait_for(Stopped, "/sup/w")
        await trio.testing.wait_all_tasks_blocked()
        assert system.events.of(Restarted) == []
        (info,) = await which_children(sup)
        assert (info.id, info.status, info.ref) == ("w", "stopped", None)
        with pytest.raises(ActorStopped):
            await ref.call(Ping())


@pytest.mark.parametrize(
    "reason", [Shutdown(), Shutdown("done")], ids=["shutdown", "shutdown-term"]
)
async def test_transient_child_is_not_restarted_after_a_shutdown_exit(reason: Shutdown) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("w", log, restart=TRANSIENT)]), "sup")
        await ref_of(system, "/sup/w").cast(Finish(reason))
        await system.events.wait_for(Stopped, "/sup/w")
        await trio.testing.wait_all_tasks_blocked()
        assert system.events.of(Restarted) == []


async def test_transient_child_is_restarted_after_a_crash() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("w", log, restart=TRANSIENT)]), "sup")
        await crash_and_wait(system, "/sup/w", 1)
        assert await ref_of(system, "/sup/w").call(Ping()) == ("w", 2)


async def test_temporary_child_is_never_restarted_and_its_spec_is_removed() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(
            Supervisor([rec("t", log, restart=TEMPORARY), rec("p", log)]), "sup"
        )
        await ref_of(system, "/sup/t").cast(Crash())
        await trio.testing.wait_all_tasks_blocked()
        assert system.events.of(Restarted) == []
        assert [c.id for c in await which_children(sup)] == ["p"]
        assert "/sup/t" not in system


async def test_temporary_child_stopped_by_a_sibling_death_under_one_for_all_is_not_restarted() -> (
    None
):
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(
            Supervisor(
                [rec("a", log), rec("t", log, restart=TEMPORARY), rec("c", log)],
                strategy=ONE_FOR_ALL,
            ),
            "sup",
        )
        log.clear()
        await ref_of(system, "/sup/a").cast(Crash())
        await system.events.wait_for(Restarted, "/sup/c")
        assert strip(log) == ["stop:a", "stop:c", "stop:t", "init:a", "init:c"]
        assert [c.id for c in await which_children(sup)] == ["a", "c"]
        assert system.events.of(Restarted, "/sup/t") == []


async def test_temporary_child_stopped_under_rest_for_one_is_not_restarted() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(
            Supervisor(
                [rec("a", log), rec("t", log, restart=TEMPORARY), rec("c", log)],
                strategy=REST_FOR_ONE,
            ),
            "sup",
        )
        log.clear()
        await ref_of(system, "/sup/a").cast(Crash())
        await system.events.wait_for(Restarted, "/sup/c")
        assert strip(log) == ["stop:a", "stop:c", "stop:t", "init:a", "init:c"]
        assert [c.id for c in await which_children(sup)] == ["a", "c"]


async def test_terminate_child_does_not_trigger_a_restart() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("w", log)]), "sup")
        await terminate_child(sup, "w")
        await trio.testing.wait_all_tasks_blocked()
        assert system.events.of(Restarted) == []
        assert (await which_children(sup))[0].status == "stopped"
