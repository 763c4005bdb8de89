"""Monitors (Down, one-shot, noproc, demonitor) and links (Exit, trap_exits)."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import trio
import trio.testing
from actor_kit import (
    Boom,
    Counter,
    Crash,
    Get,
    LinkTo,
    TrappingWatcher,
    Unwatch,
    Watch,
    Watcher,
)

from actors import (
    NORMAL,
    ActorStopped,
    Crashed,
    Down,
    Exit,
    Failure,
    LinkedExit,
    Normal,
    Restarted,
    Shutdown,
    open_actor_system,
)
from supervisors import ChildSpec, Supervisor

# -- monitors -------------------------------------------------------------------------------


async def test_monitor_delivers_down_with_the_crash_reason() -> None:
    notices: list[Any] = []
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        watcher = await system.spawn(Watcher(notices), "watcher")
        token = await watcher.call(Watch(target))
        await target.cast(Crash())
        await trio.testing.wait_all_tasks_blocked()
        assert len(notices) == 1
        down = notices[0]
        assert isinstance(down, Down)
        assert down.ref is target
        assert down.monitor is token
        assert type(down.reason) is Failure and isinstance(down.reason.error, Boom)
        assert await watcher.call(Get()) == "alive"  # a monitor never kills the watcher


async def test_monitor_delivers_down_with_the_stop_reason() -> None:
    notices: list[Any] = []
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        watcher = await system.spawn(Watcher(notices), "watcher")
        await watcher.call(Watch(target))
        await system.stop(target, Shutdown("bye"))
        await trio.testing.wait_all_tasks_blocked()
        assert [n.reason for n in notices] == [Shutdown("bye")]


async def test_monitors_stack_and_each_delivers_its_own_down() -> None:
    notices: list[Any] = []
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        watcher = await system.spawn(Watcher(notices), "watcher")
        first = await watcher.call(Watch(target))
        second = await watcher.call(Watch(target))
        await target.cast(Crash())
        await trio.testing.wait_all_tasks_blocked()
        assert [n.monitor for n in notices] == [first, second]


def restarted_n(n: int, event: Restarted) -> bool:
    return event.restarts == n


async def test_monitor_is_one_shot_across_restarts() -> None:
    notices: list[Any] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("w", Counter)]), "sup")
        target = system.lookup("/sup/w")
        watcher = await system.spawn(Watcher(notices), "watcher")
        await watcher.call(Watch(target))
        for n in (1, 2):
            await target.cast(Crash())
            await system.events.wait_for(Restarted, "/sup/w", functools.partial(restarted_n, n))
        await trio.testing.wait_all_tasks_blocked()
        assert len(notices) == 1


async def test_monitoring_a_stopped_actor_delivers_down_noproc_at_once() -> None:
    notices: list[Any] = []
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        await system.stop(target)
        watcher = await system.spawn(Watcher(notices), "watcher")
        await watcher.call(Watch(target))
        await trio.testing.wait_all_tasks_blocked()
        assert len(notices) == 1
        assert notices[0].reason == Shutdown("noproc")


async def test_demonitor_cancels_the_down() -> None:
    notices: list[Any] = []
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        watcher = await system.spawn(Watcher(notices), "watcher")
        token = await watcher.call(Watch(target))
        await watcher.call(Unwatch(token))
        await target.cast(Crash())
        await trio.testing.wait_all_tasks_blocked()
        assert notices == []


# -- links ----------------------------------------------------------------------------------


async def test_abnormal_exit_kills_a_linked_actor_that_does_not_trap_exits() -> None:
    log: list[Any] = []
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        linked = await system.spawn(Watcher([], log), "linked")
        await linked.call(LinkTo(target))
        await target.cast(Crash())
        await trio.testing.wait_all_tasks_blocked()
        assert not linked.alive
        with pytest.raises(ActorStopped):
            await linked.call(Get())
        assert log == []  # killed: terminate does not run
        crashed = system.events.of(Crashed, "/linked")
        assert len(crashed) == 1 and "LinkedExit" in crashed[0].error


async def test_links_are_bidirectional() -> None:
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        linker = await system.spawn(Watcher([]), "linker")
        await linker.call(LinkTo(target))
        await linker.cast(Crash())  # the side that made the link dies
        await trio.testing.wait_all_tasks_blocked()
        assert not target.alive
        assert "LinkedExit" in (system.events.of(Crashed, "/target")[0].error)


async def test_linked_exit_reason_names_the_dead_actor() -> None:
    notices: list[Any] = []
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        linked = await system.spawn(Watcher([]), "linked")
        watcher = await system.spawn(Watcher(notices), "watcher")
        await watcher.call(Watch(linked))
        await linked.call(LinkTo(target))
        await target.cast(Crash())
        await trio.testing.wait_all_tasks_blocked()
        reason = notices[0].reason
        assert type(reason) is Failure and isinstance(reason.error, LinkedExit)
        assert reason.error.path == "/target"


async def test_trap_exits_turns_a_linked_crash_into_an_exit_message() -> None:
    notices: list[Any] = []
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        trapper = await system.spawn(TrappingWatcher(notices), "trapper")
        await trapper.call(LinkTo(target))
        await target.cast(Crash())
        await trio.testing.wait_all_tasks_blocked()
        assert await trapper.call(Get()) == "alive"
        assert len(notices) == 1
        exit_ = notices[0]
        assert isinstance(exit_, Exit)
        assert exit_.ref is target
        assert type(exit_.reason) is Failure and isinstance(exit_.reason.error, Boom)


async def test_trap_exits_also_reports_a_normal_exit() -> None:
    notices: list[Any] = []
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        trapper = await system.spawn(TrappingWatcher(notices), "trapper")
        await trapper.call(LinkTo(target))
        await system.stop(target, NORMAL)
        await trio.testing.wait_all_tasks_blocked()
        assert [type(n.reason) for n in notices] == [Normal]


async def test_normal_exit_does_not_kill_a_linked_actor() -> None:
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        linked = await system.spawn(Watcher([]), "linked")
        await linked.call(LinkTo(target))
        await system.stop(target, NORMAL)
        await trio.testing.wait_all_tasks_blocked()
        assert linked.alive
        assert await linked.call(Get()) == "alive"


async def test_shutdown_exit_kills_a_linked_actor_as_in_erlang() -> None:
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        linked = await system.spawn(Watcher([]), "linked")
        await linked.call(LinkTo(target))
        await system.stop(target, Shutdown())
        await trio.testing.wait_all_tasks_blocked()
        assert not linked.alive


async def test_link_to_a_stopped_actor_raises_actor_stopped() -> None:
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        await system.stop(target)
        linker = await system.spawn(Watcher([]), "linker")
        assert isinstance(await linker.call(LinkTo(target)), ActorStopped)
        assert await linker.call(Get()) == "alive"


async def test_a_crash_propagates_along_a_chain_of_links() -> None:
    async with open_actor_system() as system:
        first = await system.spawn(Watcher([]), "first")
        middle = await system.spawn(Watcher([]), "middle")
        last = await system.spawn(Counter(), "last")
        await first.call(LinkTo(middle))
        await middle.call(LinkTo(last))
        await last.cast(Crash())
        await trio.testing.wait_all_tasks_blocked()
        assert not middle.alive and not first.alive


async def test_demonitor_after_the_down_was_delivered_is_harmless() -> None:
    notices: list[Any] = []
    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        watcher = await system.spawn(Watcher(notices), "watcher")
        token = await watcher.call(Watch(target))
        await system.stop(target)
        await trio.testing.wait_all_tasks_blocked()
        await watcher.call(Unwatch(token))
        assert len(notices) == 1
        assert await watcher.call(Get()) == "alive"


async def test_a_monitor_dies_with_the_watchers_incarnation() -> None:
    notices: list[Any] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("watcher", Watcher, args=(notices,))]), "sup")
        watcher = system.lookup("/sup/watcher")
        target = await system.spawn(Counter(), "target")
        await watcher.call(Watch(target))
        await watcher.cast(Crash())  # the incarnation that set up the monitor ends
        await system.events.wait_for(Restarted, "/sup/watcher")
        await system.stop(target)
        await trio.testing.wait_all_tasks_blocked()
        assert notices == []  # as in Erlang: a dead process's monitors are gone
