"""Function actors: ``body(ctx, inbox)`` with its own loop, under the same rules."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from actor_kit import Boom, Counter, Watch, Watcher

from actors import (
    ActorCrashed,
    ActorStopped,
    CallTimeout,
    Crashed,
    Down,
    FunctionActor,
    PendingCall,
    Restarted,
    Stopped,
    open_actor_system,
)
from supervisors import ChildSpec, Supervisor


async def test_function_actor_receives_casts_in_order() -> None:
    received: list[Any] = []

    async def body(ctx: Any, inbox: Any) -> None:
        async for msg in inbox:
            received.append(msg)

    async with open_actor_system() as system:
        ref = await system.spawn(FunctionActor(body), "fn")
        for word in ("a", "b", "c"):
            await ref.cast(word)
        await trio.testing.wait_all_tasks_blocked()
        assert received == ["a", "b", "c"]
        assert system.tree().actors[0].kind == "function"


async def test_function_actor_answers_calls_with_pending_call_reply() -> None:
    async def body(ctx: Any, inbox: Any) -> None:
        async for msg in inbox:
            assert isinstance(msg, PendingCall)
            msg.reply(msg.msg * 2)

    async with open_actor_system() as system:
        ref = await system.spawn(FunctionActor(body), "fn")
        assert await ref.call(21) == 42
        assert await ref.call("ab") == "abab"


async def test_function_actor_fails_a_call_with_pending_call_fail() -> None:
    async def body(ctx: Any, inbox: Any) -> None:
        async for msg in inbox:
            msg.fail(KeyError(msg.msg))

    async with open_actor_system() as system:
        ref = await system.spawn(FunctionActor(body), "fn")
        with pytest.raises(KeyError):
            await ref.call("missing")
        assert ref.alive


async def test_stop_request_cancels_the_body_and_runs_its_finally_blocks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cleaned: list[str] = []

    async def body(ctx: Any, inbox: Any) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cleaned.append("finally")

    async with open_actor_system() as system:
        ref = await system.spawn(FunctionActor(body), "fn")
        start = trio.current_time()
        await system.stop(ref)
        assert trio.current_time() - start == 0  # cancelled at once, not killed after 5 s
        assert cleaned == ["finally"]
        assert not ref.alive
        assert system.events.of(Stopped, "/fn")[-1].reason == "shutdown"


async def test_function_actor_returning_ends_it_normally() -> None:
    async def body(ctx: Any, inbox: Any) -> None:
        await inbox.receive()

    async with open_actor_system() as system:
        ref = await system.spawn(FunctionActor(body), "fn")
        await ref.cast("go")
        await trio.testing.wait_all_tasks_blocked()
        assert not ref.alive
        assert system.events.of(Stopped, "/fn")[-1].reason == "normal"


async def test_function_actor_raising_crashes_it() -> None:
    async def body(ctx: Any, inbox: Any) -> None:
        await inbox.receive()
        raise Boom("fn boom")

    async with open_actor_system() as system:
        ref = await system.spawn(FunctionActor(body), "fn")
        await ref.cast("go")
        await trio.testing.wait_all_tasks_blocked()
        assert not ref.alive
        assert system.events.of(Crashed, "/fn")[-1].error == "Boom: fn boom"


async def test_function_actor_background_task_failure_crashes_it() -> None:
    async def failing() -> None:
        raise Boom("background")

    async def body(ctx: Any, inbox: Any) -> None:
        ctx.start_soon(failing)
        await trio.sleep_forever()

    async with open_actor_system() as system:
        ref = await system.spawn(FunctionActor(body), "fn")
        await trio.testing.wait_all_tasks_blocked()
        assert not ref.alive
        assert "Boom: background" in system.events.of(Crashed, "/fn")[-1].error


async def test_function_actor_receives_down_in_its_inbox() -> None:
    notices: list[Any] = []

    async def body(ctx: Any, inbox: Any) -> None:
        async for msg in inbox:
            if isinstance(msg, PendingCall):
                msg.reply(ctx.monitor(msg.msg))
            else:
                notices.append(msg)

    async with open_actor_system() as system:
        target = await system.spawn(Counter(), "target")
        ref = await system.spawn(FunctionActor(body), "fn")
        await ref.call(target)
        await system.stop(target)
        await trio.testing.wait_all_tasks_blocked()
        assert len(notices) == 1 and isinstance(notices[0], Down)
        assert notices[0].ref is target


async def test_function_actor_can_be_monitored_like_any_actor() -> None:
    notices: list[Any] = []

    async def body(ctx: Any, inbox: Any) -> None:
        await inbox.receive()
        raise Boom("fn boom")

    async with open_actor_system() as system:
        ref = await system.spawn(FunctionActor(body), "fn")
        watcher = await system.spawn(Watcher(notices), "watcher")
        await watcher.call(Watch(ref))
        await ref.cast("go")
        await trio.testing.wait_all_tasks_blocked()
        assert isinstance(notices[0].reason.error, Boom)


async def test_function_actor_crash_with_an_unanswered_call_raises_actor_crashed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def body(ctx: Any, inbox: Any) -> None:
        await inbox.receive()
        raise Boom("dropped the call")

    async with open_actor_system() as system:
        ref = await system.spawn(FunctionActor(body), "fn")
        with pytest.raises(ActorCrashed):
            try:
                await ref.call("question", timeout=10)
            except CallTimeout:
                pytest.fail("the crash was reported as a timeout")


async def test_function_actor_stopped_with_an_unanswered_call_raises_actor_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def body(ctx: Any, inbox: Any) -> None:
        await inbox.receive()
        await trio.sleep_forever()

    async with open_actor_system() as system:
        ref = await system.spawn(FunctionActor(body), "fn")
        async with trio.open_nursery() as nursery:

            async def caller() -> None:
                with pytest.raises(ActorStopped):
                    await ref.call("question", timeout=10)

            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            await system.stop(ref)


async def test_supervised_function_actor_is_restarted_with_a_fresh_body() -> None:
    runs: list[int] = []

    async def body(ctx: Any, inbox: Any) -> None:
        runs.append(ctx.incarnation)
        async for msg in inbox:
            if isinstance(msg, PendingCall):
                msg.reply(ctx.incarnation)
            else:
                raise Boom("fn boom")

    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("fn", FunctionActor, args=(body,))]), "sup")
        ref = system.lookup("/sup/fn")
        await ref.cast("crash")
        await system.events.wait_for(Restarted, "/sup/fn")
        assert await ref.call("which") == 2
        assert runs == [1, 2]


async def test_suspended_function_actor_gets_no_user_messages_until_resumed() -> None:
    received: list[Any] = []

    async def body(ctx: Any, inbox: Any) -> None:
        async for msg in inbox:
            received.append(msg)

    async with open_actor_system() as system:
        ref = await system.spawn(FunctionActor(body), "fn")
        system.suspend("/fn")
        await trio.testing.wait_all_tasks_blocked()
        await ref.cast("held")
        await trio.testing.wait_all_tasks_blocked()
        assert received == []
        system.resume("/fn")
        await trio.testing.wait_all_tasks_blocked()
        assert received == ["held"]
