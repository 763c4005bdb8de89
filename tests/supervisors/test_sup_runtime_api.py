"""The OTP runtime API: which_children, count_children, start/terminate/restart/delete_child."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from sup_kit import Boom, Crash, Ping, rec, ref_of

from actors import ActorStopped, Restarted, open_actor_system
from supervisors import (
    TEMPORARY,
    AlreadyPresent,
    AlreadyStarted,
    ChildCounts,
    ChildNotFound,
    ChildRunning,
    ChildSpec,
    ChildStartFailed,
    Supervisor,
    count_children,
    delete_child,
    restart_child,
    start_child,
    terminate_child,
    which_children,
)


def inner() -> Supervisor:
    return Supervisor([])


async def test_which_children_lists_children_in_start_order_with_refs() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(
            Supervisor([rec("a", log), ChildSpec("inner", inner), rec("b", log)]), "sup"
        )
        rows = await which_children(sup)
        assert [(r.id, r.kind, r.restart, r.status) for r in rows] == [
            ("a", "worker", "permanent", "running"),
            ("inner", "supervisor", "permanent", "running"),
            ("b", "worker", "permanent", "running"),
        ]
        assert [r.ref for r in rows] == [system.lookup(f"/sup/{r.id}") for r in rows]


async def test_count_children_counts_specs_active_supervisors_and_workers() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(
            Supervisor([rec("a", log), ChildSpec("inner", inner), rec("b", log)]), "sup"
        )
        await terminate_child(sup, "b")
        assert await count_children(sup) == ChildCounts(specs=3, active=2, supervisors=1, workers=2)


async def test_start_child_adds_and_starts_a_child_after_the_others() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("a", log)]), "sup")
        ref = await start_child(sup, rec("b", log))
        assert ref.path == "/sup/b"
        assert await ref.call(Ping()) == ("b", 1)
        assert [r.id for r in await which_children(sup)] == ["a", "b"]


async def test_a_started_child_is_supervised_like_the_static_ones() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([]), "sup")
        ref = await start_child(sup, rec("b", log))
        await ref.cast(Crash())
        await system.events.wait_for(Restarted, "/sup/b")
        assert await ref.call(Ping()) == ("b", 2)


async def test_start_child_with_a_running_id_raises_already_started() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("a", log)]), "sup")
        with pytest.raises(AlreadyStarted):
            await start_child(sup, rec("a", log))


async def test_start_child_with_a_terminated_id_raises_already_present() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("a", log)]), "sup")
        await terminate_child(sup, "a")
        with pytest.raises(AlreadyPresent):
            await start_child(sup, rec("a", log))


async def test_start_child_whose_init_fails_raises_child_start_failed_and_keeps_no_spec() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("a", log)]), "sup")
        with pytest.raises(ChildStartFailed) as info:
            await start_child(sup, rec("bad", log, fail_init=True))
        assert info.value.child == "bad"
        assert isinstance(info.value.cause, Boom)
        assert [r.id for r in await which_children(sup)] == ["a"]
        assert "/sup/bad" not in system
        assert sup.alive


async def test_terminate_child_stops_it_and_keeps_its_spec() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("a", log), rec("b", log)]), "sup")
        ref = ref_of(system, "/sup/a")
        log.clear()
        await terminate_child(sup, "a")
        assert log == ["stop:a"]
        rows = await which_children(sup)
        assert (rows[0].id, rows[0].status, rows[0].ref) == ("a", "stopped", None)
        with pytest.raises(ActorStopped):
            await ref.call(Ping())


async def test_terminate_child_of_a_temporary_child_removes_its_spec() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("t", log, restart=TEMPORARY)]), "sup")
        await terminate_child(sup, "t")
        assert await which_children(sup) == []


async def test_restart_child_starts_a_terminated_child_again_behind_the_same_ref() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("a", log)]), "sup")
        ref = ref_of(system, "/sup/a")
        await terminate_child(sup, "a")
        again = await restart_child(sup, "a")
        assert again is ref
        assert await ref.call(Ping()) == ("a", 2)
        assert (await which_children(sup))[0].status == "running"


async def test_restart_child_of_a_running_child_raises_child_running() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("a", log)]), "sup")
        with pytest.raises(ChildRunning):
            await restart_child(sup, "a")


async def test_delete_child_of_a_running_child_raises_child_running() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("a", log)]), "sup")
        with pytest.raises(ChildRunning):
            await delete_child(sup, "a")


async def test_delete_child_removes_a_terminated_childs_spec() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("a", log), rec("b", log)]), "sup")
        await terminate_child(sup, "a")
        await delete_child(sup, "a")
        assert [r.id for r in await which_children(sup)] == ["b"]
        assert "/sup/a" not in system
        await start_child(sup, rec("a", log))  # the id is free again


@pytest.mark.parametrize("operation", ["terminate", "restart", "delete"])
async def test_unknown_child_id_raises_child_not_found(operation: str) -> None:
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([]), "sup")
        call = {"terminate": terminate_child, "restart": restart_child, "delete": delete_child}
        with pytest.raises(ChildNotFound):
            await call[operation](sup, "ghost")
        assert sup.alive  # runtime API errors are replies, not crashes


async def test_runtime_api_errors_leave_the_supervisor_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("a", log)]), "sup")
        for _ in range(3):
            with pytest.raises(AlreadyStarted):
                await start_child(sup, rec("a", log))
        assert await ref_of(system, "/sup/a").call(Ping()) == ("a", 1)
        assert system.tree().actors[0].incarnation == 1
