"""call, cast, try_cast, cast_nowait, and every outcome a call can end in."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from actor_kit import (
    Add,
    Block,
    Boom,
    Counter,
    Crash,
    CrashAfterGate,
    Fail,
    Get,
    Incarnation,
    Invalid,
    Sleep,
    Unhandled,
    counter_class,
    info,
)

from actors import (
    DEFAULT_TIMEOUT,
    ActorCrashed,
    ActorStopped,
    CallTimeout,
    Crashed,
    MailboxFull,
    Restarted,
    UnknownMessage,
    open_actor_system,
)
from supervisors import ChildSpec, Supervisor

# -- the happy paths --------------------------------------------------------------------


async def test_call_returns_the_handlers_return_value() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        assert await ref.call(Add(2)) == 2
        assert await ref.call(Add(3)) == 5


async def test_casts_are_handled_in_the_order_they_were_sent() -> None:
    async with open_actor_system() as system:
        actor = Counter()
        ref = await system.spawn(actor, "counter")
        for n in range(1, 6):
            await ref.cast(Add(n))
        assert await ref.call(Get()) == 15
        assert actor.seen == [1, 2, 3, 4, 5]


async def test_try_cast_returns_true_when_queued_and_false_when_the_mailbox_is_full() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        actor = counter_class(2)(gate)
        ref = await system.spawn(actor, "counter")
        assert ref.try_cast(Block())
        await trio.testing.wait_all_tasks_blocked()  # the actor is now inside on_block
        assert ref.try_cast(Add(1))
        assert ref.try_cast(Add(2))
        assert not ref.try_cast(Add(3))
        gate.set()
        assert await ref.call(Get()) == 3
        assert actor.seen == [1, 2]


async def test_cast_nowait_raises_mailbox_full_when_the_mailbox_is_full() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(1)(gate), "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        ref.cast_nowait(Add(1))
        with pytest.raises(MailboxFull) as excinfo:
            ref.cast_nowait(Add(2))
        assert excinfo.value.path == "/counter"
        gate.set()


async def test_cast_nowait_raises_actor_stopped_after_the_actor_stopped() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        await system.stop(ref)
        with pytest.raises(ActorStopped):
            ref.cast_nowait(Add(1))


async def test_cast_and_try_cast_to_a_stopped_actor_do_nothing() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        await system.stop(ref)
        await ref.cast(Add(1))  # OTP: a cast always "succeeds"
        assert ref.try_cast(Add(1)) is False


# -- reply errors -------------------------------------------------------------------------


async def test_reply_error_reaches_the_caller_and_the_actor_keeps_its_state() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        await ref.call(Add(5))
        with pytest.raises(Invalid, match="bad argument"):
            await ref.call(Fail())
        assert await ref.call(Get()) == 5
        assert await ref.call(Incarnation()) == 1
        assert system.events.of(Crashed) == []


async def test_reply_error_from_a_cast_handler_is_ignored_and_the_actor_keeps_running() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        await ref.cast(Fail())
        assert await ref.call(Add(1)) == 1
        assert system.events.of(Crashed) == []


async def test_call_with_no_handler_raises_unknown_message_and_the_actor_keeps_running() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        with pytest.raises(UnknownMessage, match="Unhandled"):
            await ref.call(Unhandled())
        assert await ref.call(Add(1)) == 1
        assert system.events.of(Crashed) == []


# -- timeouts -----------------------------------------------------------------------------


async def test_call_times_out_after_exactly_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        start = trio.current_time()
        with pytest.raises(CallTimeout) as excinfo:
            await ref.call(Sleep(100), timeout=2.0)
        assert trio.current_time() - start == pytest.approx(2.0, abs=1e-9)
        assert excinfo.value.timeout == 2.0
        assert excinfo.value.path == "/counter"


async def test_call_default_timeout_is_five_seconds(autojump_clock: trio.testing.MockClock) -> None:
    assert DEFAULT_TIMEOUT == 5.0
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        start = trio.current_time()
        with pytest.raises(CallTimeout):
            await ref.call(Sleep(100))
        assert trio.current_time() - start == pytest.approx(5.0, abs=1e-9)


async def test_call_with_timeout_none_waits_longer_than_the_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        assert await ref.call(Sleep(60), timeout=None) == "slept"


async def test_late_reply_after_a_timeout_is_dropped_and_the_actor_keeps_serving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        with pytest.raises(CallTimeout):
            await ref.call(Sleep(4), timeout=1.0)
        # The next call from the same caller is queued behind the slow handler; it must get
        # its own reply (0), never the late "slept" of the abandoned call.
        assert await ref.call(Get()) == 0
        assert trio.current_time() == pytest.approx(4.0, abs=1e-6)
        assert await ref.call(Add(1)) == 1
        assert system.timers.pending() == 0
        assert system.events.of(Crashed) == []


async def test_call_timeout_counts_the_wait_for_mailbox_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(1)(gate), "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        ref.cast_nowait(Add(1))  # the mailbox is now full and stays full
        start = trio.current_time()
        with pytest.raises(CallTimeout):
            await ref.call(Get(), timeout=3.0)
        assert trio.current_time() - start == pytest.approx(3.0, abs=1e-9)
        gate.set()


async def test_call_timeout_reports_the_callers_timeout_after_waiting_for_room(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(1)(gate), "counter")
        ref.cast_nowait(Sleep(1))  # frees the mailbox after 1 s
        await trio.testing.wait_all_tasks_blocked()
        ref.cast_nowait(Block())  # then the actor blocks for good
        start = trio.current_time()
        with pytest.raises(CallTimeout) as excinfo:
            await ref.call(Get(), timeout=3.0)
        assert trio.current_time() - start == pytest.approx(3.0, abs=1e-9)
        gate.set()
        assert excinfo.value.timeout == 3.0


# -- crashes and stops --------------------------------------------------------------------


async def test_in_flight_call_gets_actor_crashed_with_the_cause() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        with pytest.raises(ActorCrashed) as excinfo:
            await ref.call(Crash())
        assert isinstance(excinfo.value.cause, Boom)
        assert excinfo.value.path == "/counter"


async def test_queued_callers_of_a_crashed_top_level_actor_all_get_actor_crashed() -> None:
    gate = trio.Event()
    outcomes: list[BaseException | int] = []

    async def caller(msg: object) -> None:
        try:
            outcomes.append(await ref.call(msg))
        except ActorCrashed as exc:
            outcomes.append(exc)

    async with open_actor_system() as system:
        ref = await system.spawn(Counter(gate), "counter")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, CrashAfterGate())
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(5):
                nursery.start_soon(caller, Get())
            await trio.testing.wait_all_tasks_blocked()
            assert info(system, "/counter").mailbox_used == 5
            gate.set()
        assert len(outcomes) == 6
        assert all(isinstance(o, ActorCrashed) for o in outcomes)
        causes = {id(o.cause) for o in outcomes if isinstance(o, ActorCrashed)}
        assert len(causes) == 1  # every caller sees the one exception that crashed it
        assert all(isinstance(o.cause, Boom) for o in outcomes if isinstance(o, ActorCrashed))


DiscardingCounter = counter_class(64, on_restart="discard")


async def test_crash_fails_the_in_flight_call_and_every_queued_call_with_discard() -> None:
    gate = trio.Event()
    outcomes: list[BaseException | int] = []

    async def caller(msg: object) -> None:
        try:
            outcomes.append(await ref.call(msg))
        except ActorCrashed as exc:
            outcomes.append(exc)

    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("w", DiscardingCounter, args=(gate,))]), "sup")
        ref = system.lookup("/sup/w")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, CrashAfterGate())
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(4):
                nursery.start_soon(caller, Incarnation())
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        await system.events.wait_for(Restarted, "/sup/w")
        assert len(outcomes) == 5
        assert all(isinstance(o, ActorCrashed) and isinstance(o.cause, Boom) for o in outcomes)
        assert await ref.call(Incarnation()) == 2  # the next incarnation serves new calls


async def test_queued_callers_are_served_by_the_next_incarnation_with_keep() -> None:
    gate = trio.Event()
    outcomes: list[BaseException | int] = []

    async def caller(msg: object) -> None:
        try:
            outcomes.append(await ref.call(msg))
        except ActorCrashed as exc:
            outcomes.append(exc)

    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("w", Counter, args=(gate,))]), "sup")
        ref = system.lookup("/sup/w")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, CrashAfterGate())
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(4):
                nursery.start_soon(caller, Incarnation())
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        assert isinstance(outcomes[0], ActorCrashed)
        assert outcomes[1:] == [2, 2, 2, 2]


async def test_call_to_a_stopped_top_level_actor_raises_actor_stopped() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        alive_before = ref.alive
        await system.stop(ref)
        assert (alive_before, ref.alive) == (True, False)
        with pytest.raises(ActorStopped) as excinfo:
            await ref.call(Get())
        assert excinfo.value.path == "/counter"


async def test_call_queued_when_a_top_level_actor_stops_raises_actor_stopped() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(gate), "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:

            async def queued_caller() -> None:
                with pytest.raises(ActorStopped):
                    await ref.call(Get())

            nursery.start_soon(queued_caller)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(system.stop, ref)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()


async def test_cancelled_caller_abandons_the_call_and_the_actor_keeps_running(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        with trio.move_on_after(1.0) as scope:
            await ref.call(Sleep(5), timeout=None)
        assert scope.cancelled_caught
        assert trio.current_time() == pytest.approx(1.0)
        assert await ref.call(Add(7)) == 7  # served after the abandoned handler finishes
        assert trio.current_time() == pytest.approx(5.0)
        assert system.events.of(Crashed) == []


async def test_a_shorter_timeout_armed_after_a_longer_one_fires_on_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ends: dict[str, float] = {}
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")

        async def caller(name: str, timeout: float) -> None:
            with pytest.raises(CallTimeout):
                await ref.call(Sleep(100), timeout=timeout)
            ends[name] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller, "long", 10.0)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(caller, "short", 1.0)
            nursery.start_soon(caller, "middle", 4.0)
        assert ends == pytest.approx({"short": 1.0, "middle": 4.0, "long": 10.0})


async def test_calls_with_the_same_timeout_each_time_out_from_their_own_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ends: list[float] = []
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")

        async def caller() -> None:
            with pytest.raises(CallTimeout):
                await ref.call(Sleep(100), timeout=2.0)
            ends.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(caller)
                await trio.sleep(0.5)
        assert ends == pytest.approx([2.0, 2.5, 3.0])


async def test_deferred_reply_is_delivered_when_the_actor_answers_later() -> None:
    async with open_actor_system() as system:
        actor = Deferring()
        ref = await system.spawn(actor, "deferring")
        async with trio.open_nursery() as nursery:
            results: list[object] = []

            async def caller() -> None:
                results.append(await ref.call(Get()))

            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            assert results == []  # the handler returned, but the reply was deferred
            await ref.cast(Add(41))
        assert results == [41]


async def test_defer_reply_outside_a_call_raises_runtime_error() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Deferring(), "deferring")
        assert isinstance(await ref.query(lambda a: _try_defer(a)), RuntimeError)


def _try_defer(actor: Deferring) -> BaseException | None:
    try:
        actor.ctx.defer_reply()
    except RuntimeError as exc:
        return exc
    return None


class Deferring(Counter):
    """Defers every Get and answers it with the value of the next Add."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []

    async def on_get(self, msg: Get) -> int:
        self.waiting.append(self.ctx.defer_reply())
        return -1  # ignored: the reply was deferred

    async def on_add(self, msg: Add) -> int:
        for call in self.waiting:
            call.reply(msg.n)
        self.waiting.clear()
        return msg.n
