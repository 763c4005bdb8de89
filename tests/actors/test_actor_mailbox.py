"""Bounded mailboxes: the four overflow policies, capacity 0, and the system lane."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from actor_kit import Add, Block, Counter, CrashAfterGate, Get, Sleep, counter_class, info

from actors import (
    ActorCrashed,
    ActorStopped,
    Mailbox,
    MailboxFull,
    MailboxFullEvent,
    Overflow,
    Restarted,
    Shutdown,
    Stopped,
    open_actor_system,
)
from supervisors import ChildSpec, Supervisor


async def test_default_mailbox_is_bounded_at_64_and_blocks() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        assert info(system, ref.path).mailbox_capacity == 64
        assert Counter.overflow is Overflow.BLOCK


async def test_negative_capacity_is_rejected() -> None:
    with pytest.raises(ValueError):
        Mailbox(-1, Overflow.BLOCK, "/x")


# -- block ----------------------------------------------------------------------------------


async def test_block_cast_waits_for_room_then_is_delivered() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        actor = counter_class(2)(gate)
        ref = await system.spawn(actor, "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        await ref.cast(Add(1))
        await ref.cast(Add(2))
        delivered: list[int] = []

        async def blocked_caster(n: int) -> None:
            await ref.cast(Add(n))
            delivered.append(n)

        async with trio.open_nursery() as nursery:
            for n in (3, 4):
                nursery.start_soon(blocked_caster, n)
                await trio.testing.wait_all_tasks_blocked()
            assert delivered == []  # backpressure: the senders wait
            assert info(system, "/counter").senders_waiting == 2
            gate.set()
        assert sorted(delivered) == [3, 4]
        assert await ref.call(Get()) == 10
        assert actor.seen == [1, 2, 3, 4]


async def test_block_senders_are_admitted_in_fifo_order() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        actor = counter_class(1)(gate)
        ref = await system.spawn(actor, "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        ref.cast_nowait(Add(1))
        async with trio.open_nursery() as nursery:
            for n in (2, 3, 4):
                nursery.start_soon(ref.cast, Add(n))
                await trio.testing.wait_all_tasks_blocked()
            assert info(system, "/counter").senders_waiting == 3
            gate.set()
        await ref.call(Get())
        assert actor.seen == [1, 2, 3, 4]


async def test_cancelled_blocked_sender_leaves_the_mailbox_unchanged() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        actor = counter_class(1)(gate)
        ref = await system.spawn(actor, "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        ref.cast_nowait(Add(1))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.cast, Add(2))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert info(system, "/counter").senders_waiting == 0
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert actor.seen == [1]
        assert info(system, "/counter").mailbox_used == 0


# -- fail, drop_newest, drop_oldest -------------------------------------------------------


async def test_fail_cast_raises_mailbox_full() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(1, Overflow.FAIL)(gate), "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        await ref.cast(Add(1))
        with pytest.raises(MailboxFull):
            await ref.cast(Add(2))
        gate.set()


async def test_fail_call_raises_mailbox_full() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(1, Overflow.FAIL)(gate), "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        ref.cast_nowait(Add(1))
        with pytest.raises(MailboxFull):
            await ref.call(Get())
        gate.set()


async def test_drop_newest_drops_the_new_cast_and_keeps_the_queued_ones() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        actor = counter_class(2, Overflow.DROP_NEWEST)(gate)
        ref = await system.spawn(actor, "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        for n in (1, 2, 3, 4):
            await ref.cast(Add(n))  # never raises, never blocks
        assert info(system, "/counter").dropped == 2
        gate.set()
        await trio.testing.wait_all_tasks_blocked()  # drained: a call now finds room
        await ref.call(Get())
        assert actor.seen == [1, 2]


async def test_drop_newest_fails_a_call_with_mailbox_full() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(1, Overflow.DROP_NEWEST)(gate), "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        ref.cast_nowait(Add(1))
        with pytest.raises(MailboxFull):
            await ref.call(Get())
        gate.set()


async def test_drop_oldest_evicts_the_oldest_queued_cast() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        actor = counter_class(2, Overflow.DROP_OLDEST)(gate)
        ref = await system.spawn(actor, "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        for n in (1, 2, 3, 4):
            await ref.cast(Add(n))
        assert info(system, "/counter").dropped == 2
        gate.set()
        await trio.testing.wait_all_tasks_blocked()  # drained: a call now finds room
        await ref.call(Get())
        assert actor.seen == [3, 4]


async def test_drop_oldest_fails_an_evicted_call_with_mailbox_full() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(1, Overflow.DROP_OLDEST)(gate), "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:

            async def evicted_caller() -> None:
                with pytest.raises(MailboxFull):
                    await ref.call(Get())

            nursery.start_soon(evicted_caller)
            await trio.testing.wait_all_tasks_blocked()
            ref.cast_nowait(Add(9))  # evicts the queued call
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert await ref.call(Get()) == 9


# -- capacity 0 -----------------------------------------------------------------------------


async def test_capacity_zero_hands_a_cast_to_an_idle_actor() -> None:
    async with open_actor_system() as system:
        actor = counter_class(0)()
        ref = await system.spawn(actor, "counter")
        await trio.testing.wait_all_tasks_blocked()
        assert ref.try_cast(Add(1))
        await trio.testing.wait_all_tasks_blocked()  # handled; the actor waits again
        assert await ref.call(Add(2)) == 3


async def test_capacity_zero_try_cast_fails_while_the_actor_is_busy() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(0)(gate), "counter")
        await trio.testing.wait_all_tasks_blocked()
        assert ref.try_cast(Block())
        await trio.testing.wait_all_tasks_blocked()
        assert not ref.try_cast(Add(1))
        gate.set()


async def test_capacity_zero_blocked_cast_is_delivered_once_the_actor_is_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_actor_system() as system:
        actor = counter_class(0)()
        ref = await system.spawn(actor, "counter")
        await trio.testing.wait_all_tasks_blocked()
        assert ref.try_cast(Sleep(1))
        with trio.fail_after(10):
            await ref.cast(Add(5))  # waits for the actor to finish Sleep, then rendezvous
            assert await ref.call(Get()) == 5


async def test_blocked_sender_is_not_stranded_when_a_restart_discards_the_mailbox(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    cls = counter_class(1, on_restart="discard")
    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("w", cls, args=(gate,))]), "sup")
        ref = system.lookup("/sup/w")
        ref.cast_nowait(CrashAfterGate())
        await trio.testing.wait_all_tasks_blocked()
        ref.cast_nowait(Add(1))  # full
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ref.cast, Add(2))  # blocked sender
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
            await system.events.wait_for(Restarted, "/sup/w")
            with trio.fail_after(10):
                await ref.call(Get())  # the new incarnation must not be wedged


# -- the system lane ------------------------------------------------------------------------


async def test_stop_overtakes_a_full_mailbox(autojump_clock: trio.testing.MockClock) -> None:
    gate = trio.Event()
    log: list[object] = []
    async with open_actor_system() as system:
        actor = counter_class(2)(gate, log)
        ref = await system.spawn(actor, "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        ref.cast_nowait(Add(1))
        ref.cast_nowait(Add(2))
        assert not ref.try_cast(Add(3))  # the user lane is full
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(system.stop, ref)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()  # the handler in progress returns; stop comes before queued messages
        assert trio.current_time() - start < 1.0  # stopped, not killed after its 5 s timeout
        assert actor.seen == []  # none of the queued user messages ran
        assert log == [("terminate", Shutdown())]
        assert system.events.of(Stopped, "/counter")[-1].reason == "shutdown"


async def test_stop_releases_blocked_senders(autojump_clock: trio.testing.MockClock) -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(1)(gate), "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        ref.cast_nowait(Add(1))
        outcomes: list[str] = []

        async def blocked_caster() -> None:
            await ref.cast(Add(2))
            outcomes.append("cast returned")

        async def blocked_caller() -> None:
            try:
                await ref.call(Get(), timeout=None)
            except ActorStopped:
                outcomes.append("call stopped")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_caster)
            nursery.start_soon(blocked_caller)
            await trio.testing.wait_all_tasks_blocked()
            assert info(system, "/counter").senders_waiting == 2
            nursery.start_soon(system.stop, ref)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
        assert sorted(outcomes) == ["call stopped", "cast returned"]


async def test_query_travels_on_the_system_lane_past_a_full_mailbox() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(1)(gate), "counter")
        ref.cast_nowait(Add(4))
        await trio.testing.wait_all_tasks_blocked()
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        ref.cast_nowait(Add(1))  # full, and the actor is blocked
        async with trio.open_nursery() as nursery:

            async def ask() -> None:
                # answered between Block and the queued Add(1)
                assert await ref.query(lambda actor: actor.total) == 4

            nursery.start_soon(ask)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()


# -- MailboxFull events ---------------------------------------------------------------------


async def test_mailbox_full_event_reports_the_policy_and_the_dropped_count() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(1, Overflow.DROP_NEWEST)(gate), "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        ref.try_cast(Add(1))
        ref.try_cast(Add(2))
        ref.try_cast(Add(3))
        events = system.events.of(MailboxFullEvent, "/counter")
        assert [(e.policy, e.dropped) for e in events] == [("drop_newest", 1), ("drop_newest", 2)]
        gate.set()


async def test_tree_shows_the_dropped_count_and_the_peak() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(2, Overflow.DROP_OLDEST)(gate), "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        for n in range(5):
            ref.try_cast(Add(n))
        info = system.tree().actors[0]
        assert (info.mailbox_used, info.mailbox_peak, info.dropped) == (2, 2, 3)
        gate.set()


async def test_a_crash_with_a_full_mailbox_fails_the_queued_calls() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(1)(gate), "counter")
        ref.cast_nowait(CrashAfterGate())
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as nursery:

            async def queued_caller() -> None:
                with pytest.raises(ActorCrashed):
                    await ref.call(Get())

            nursery.start_soon(queued_caller)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()
