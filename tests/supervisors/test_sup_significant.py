"""Significant children and auto_shutdown (OTP 24+)."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from sup_kit import Crash, Finish, Ping, crash_and_wait, rec, ref_of

from actors import Stopped, open_actor_system
from supervisors import (
    ALL_SIGNIFICANT,
    ANY_SIGNIFICANT,
    NEVER,
    TEMPORARY,
    TRANSIENT,
    ChildSpec,
    ChildStartFailed,
    Supervisor,
    start_child,
    terminate_child,
)


async def test_any_significant_stops_the_supervisor_when_one_significant_child_exits() -> None:
    log: list[str] = []
    children = [
        rec("vm", log, restart=TRANSIENT, significant=True),
        rec("jail", log, restart=TRANSIENT, significant=True),
        rec("net", log),
    ]
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor(children, auto_shutdown=ANY_SIGNIFICANT), "sup")
        log.clear()
        await ref_of(system, "/sup/vm").cast(Finish())
        stopped = await system.events.wait_for(Stopped, "/sup")
        assert stopped.reason == "shutdown(auto_shutdown)"
        assert log == ["stop:vm", "stop:net", "stop:jail"]
        assert not sup.alive


async def test_all_significant_waits_for_the_last_significant_child() -> None:
    log: list[str] = []
    children = [
        rec("a", log, restart=TRANSIENT, significant=True),
        rec("b", log, restart=TRANSIENT, significant=True),
        rec("other", log),
    ]
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor(children, auto_shutdown=ALL_SIGNIFICANT), "sup")
        await ref_of(system, "/sup/a").cast(Finish())
        await system.events.wait_for(Stopped, "/sup/a")
        await trio.testing.wait_all_tasks_blocked()
        assert sup.alive  # b is still running
        await ref_of(system, "/sup/b").cast(Finish())
        stopped = await system.events.wait_for(Stopped, "/sup")
        assert stopped.reason == "shutdown(auto_shutdown)"


async def test_temporary_significant_child_crash_triggers_auto_shutdown() -> None:
    log: list[str] = []
    children = [rec("job", log, restart=TEMPORARY, significant=True), rec("helper", log)]
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor(children, auto_shutdown=ANY_SIGNIFICANT), "sup")
        await ref_of(system, "/sup/job").cast(Crash())
        await system.events.wait_for(Stopped, "/sup")
        assert not sup.alive


async def test_crashed_transient_significant_child_is_restarted_without_auto_shutdown() -> None:
    log: list[str] = []
    children = [rec("vm", log, restart=TRANSIENT, significant=True)]
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor(children, auto_shutdown=ANY_SIGNIFICANT), "sup")
        await crash_and_wait(system, "/sup/vm", 1)
        assert sup.alive
        assert await ref_of(system, "/sup/vm").call(Ping()) == ("vm", 2)


async def test_terminate_child_of_a_significant_child_does_not_trigger_auto_shutdown() -> None:
    log: list[str] = []
    children = [rec("vm", log, restart=TRANSIENT, significant=True), rec("net", log)]
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor(children, auto_shutdown=ANY_SIGNIFICANT), "sup")
        await terminate_child(sup, "vm")
        await trio.testing.wait_all_tasks_blocked()
        assert sup.alive
        assert await ref_of(system, "/sup/net").call(Ping()) == ("net", 1)


async def test_non_significant_child_exit_does_not_trigger_auto_shutdown() -> None:
    log: list[str] = []
    children = [
        rec("vm", log, restart=TRANSIENT, significant=True),
        rec("side", log, restart=TRANSIENT),
    ]
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor(children, auto_shutdown=ANY_SIGNIFICANT), "sup")
        await ref_of(system, "/sup/side").cast(Finish())
        await system.events.wait_for(Stopped, "/sup/side")
        await trio.testing.wait_all_tasks_blocked()
        assert sup.alive


async def test_significant_permanent_child_is_rejected() -> None:
    with pytest.raises(ValueError, match="permanent"):
        rec("vm", [], significant=True)


async def test_significant_child_without_auto_shutdown_is_rejected() -> None:
    with pytest.raises(ValueError, match="auto_shutdown"):
        Supervisor([rec("vm", [], restart=TRANSIENT, significant=True)], auto_shutdown=NEVER)


async def test_start_child_refuses_a_significant_child_without_auto_shutdown() -> None:
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([]), "sup")
        spec = rec("vm", [], restart=TRANSIENT, significant=True)
        with pytest.raises(ChildStartFailed):
            await start_child(sup, spec)


async def test_invalid_child_specs_are_rejected() -> None:
    with pytest.raises(ValueError):
        ChildSpec("a/b", Supervisor)
    with pytest.raises(ValueError):
        ChildSpec("w", Supervisor, shutdown=-1.0)
    with pytest.raises(ValueError):
        ChildSpec("w", Supervisor, shutdown="soon")
    with pytest.raises(ValueError):
        Supervisor([rec("w", []), rec("w", [])])
