"""Observability and fault injection: tree(), dump(), lifecycle events, inject_crash, suspend."""

from __future__ import annotations

from contextlib import aclosing

import msgspec
import pytest
import trio
import trio.testing
from actor_kit import Add, Block, Boom, Counter, Crash, Get, counter_class

from actors import (
    ActorCrashed,
    ActorInfo,
    Crashed,
    Event,
    EventBus,
    GaveUp,
    Lagged,
    MailboxFullEvent,
    NoSuchActor,
    Overflow,
    Restarted,
    Restarting,
    Started,
    Starting,
    Stopped,
    TreeSnapshot,
    open_actor_system,
)
from supervisors import ChildSpec, Supervisor


def by_path(snapshot: TreeSnapshot) -> dict[str, ActorInfo]:
    out: dict[str, ActorInfo] = {}

    def walk(nodes: list[ActorInfo]) -> None:
        for node in nodes:
            out[node.path] = node
            walk(node.children)

    walk(snapshot.actors)
    return out


# -- tree() and dump() ----------------------------------------------------------------------


async def test_tree_nests_children_under_their_supervisor() -> None:
    async with open_actor_system("obs") as system:
        await system.spawn(Supervisor([ChildSpec("a", Counter), ChildSpec("b", Counter)]), "sup")
        await system.spawn(Counter(), "loose")
        snapshot = system.tree()
        assert snapshot.system == "obs"
        assert snapshot.count == 4
        assert [n.path for n in snapshot.actors] == ["/sup", "/loose"]
        assert [c.path for c in snapshot.actors[0].children] == ["/sup/a", "/sup/b"]
        assert snapshot.actors[0].kind == "supervisor"
        assert snapshot.actors[0].children[0].kind == "worker"


async def test_tree_reports_state_restarts_handled_mailbox_and_last_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        await system.spawn(
            Supervisor([ChildSpec("a", counter_class(8), args=(gate,)), ChildSpec("b", Counter)]),
            "sup",
        )
        a, b = system.lookup("/sup/a"), system.lookup("/sup/b")
        await trio.sleep(3)
        await b.cast(Crash())
        await system.events.wait_for(Restarted, "/sup/b")
        for n in range(3):
            await a.call(Add(n))
        a.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        for n in range(5):
            a.cast_nowait(Add(n))
        nodes = by_path(system.tree())
        node_a, node_b = nodes["/sup/a"], nodes["/sup/b"]
        assert (node_a.state, node_a.restarts, node_a.incarnation) == ("running", 0, 1)
        assert node_a.handled == 3
        assert (node_a.mailbox_used, node_a.mailbox_capacity, node_a.mailbox_peak) == (5, 8, 5)
        assert node_a.last_failure is None
        assert node_a.uptime == pytest.approx(3.0)
        assert (node_b.state, node_b.restarts, node_b.incarnation) == ("running", 1, 2)
        assert node_b.last_failure == "Boom: boom"
        assert node_b.last_failure_at == pytest.approx(3.0)
        gate.set()


async def test_tree_shows_a_stopped_actor_only_until_it_is_unregistered() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        assert "/counter" in system
        await system.stop(ref)
        assert "/counter" not in system
        assert system.tree().count == 0
        with pytest.raises(NoSuchActor):
            system.lookup("/counter")


async def test_tree_snapshot_is_a_msgspec_struct_that_encodes_to_json() -> None:
    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("a", Counter)]), "sup")
        data = msgspec.json.decode(msgspec.json.encode(system.tree()))
        assert data["actors"][0]["children"][0]["path"] == "/sup/a"


async def test_dump_draws_a_pstree_like_tree() -> None:
    async with open_actor_system("dumped") as system:
        await system.spawn(Supervisor([ChildSpec("a", Counter), ChildSpec("b", Counter)]), "sup")
        await system.spawn(Counter(), "loose")
        await system.lookup("/sup/b").cast(Crash())
        await system.events.wait_for(Restarted, "/sup/b")
        lines = system.dump().splitlines()
        assert lines[0] == "dumped (4 actors)"
        assert lines[1].startswith("├─ sup [supervisor running]")
        assert lines[2].startswith("│  ├─ a [worker running] restarts=0 mbox=0/64")
        assert lines[3].startswith("│  └─ b [worker running] restarts=1")
        assert "last_failure='Boom: boom'" in lines[3]
        assert lines[4].startswith("└─ loose [worker running]")
        assert len(lines) == 5


# -- lifecycle events -----------------------------------------------------------------------


async def test_events_trace_start_crash_and_restart_in_order() -> None:
    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("w", Counter)]), "sup")
        await system.lookup("/sup/w").cast(Crash())
        await system.events.wait_for(Restarted, "/sup/w")
        trace = [type(e) for e in system.events.recent() if e.path == "/sup/w"]
        assert trace == [Starting, Started, Crashed, Restarting, Starting, Started, Restarted]
        assert system.events.of(Restarted, "/sup/w")[0].restarts == 1
        assert system.events.of(Crashed, "/sup/w")[0].error == "Boom: boom"


async def test_stopped_event_carries_the_reason() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        await system.stop(ref)
        (stopped,) = system.events.of(Stopped, "/counter")
        assert stopped.reason == "shutdown"


async def test_gave_up_event_names_the_supervisor_and_the_child() -> None:
    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("w", Counter)], intensity=0), "sup")
        await system.lookup("/sup/w").cast(Crash())
        gave_up = await system.events.wait_for(GaveUp, "/sup")
        assert gave_up.child == "w"
        assert "Boom" in gave_up.error


async def test_mailbox_full_is_an_event() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(counter_class(1, Overflow.FAIL)(gate), "counter")
        ref.cast_nowait(Block())
        await trio.testing.wait_all_tasks_blocked()
        ref.cast_nowait(Add(1))
        assert not ref.try_cast(Add(2))
        event = await system.events.wait_for(MailboxFullEvent, "/counter")
        assert (event.policy, event.dropped) == ("fail", 1)
        gate.set()


async def test_event_times_come_from_trios_clock(autojump_clock: trio.testing.MockClock) -> None:
    async with open_actor_system() as system:
        await trio.sleep(42)
        ref = await system.spawn(Counter(), "counter")
        await trio.sleep(8)
        await system.stop(ref)
        assert system.events.of(Started, "/counter")[0].at == pytest.approx(42.0)
        assert system.events.of(Stopped, "/counter")[0].at == pytest.approx(50.0)


async def test_event_bus_keeps_only_the_last_capacity_events() -> None:
    async with open_actor_system(event_capacity=8) as system:
        for n in range(10):
            await system.spawn(Counter(), f"c{n}")
        recent = system.events.recent()
        assert len(recent) == 8
        assert recent[-1].path == "/c9"


async def test_slow_subscriber_gets_lagged_instead_of_blocking_publishers() -> None:
    bus = EventBus(capacity=4)
    async with aclosing(bus.subscribe()) as events:
        first: list[Event] = []
        async with trio.open_nursery() as nursery:

            async def read_one() -> None:
                first.append(await events.__anext__())

            nursery.start_soon(read_one)
            await trio.testing.wait_all_tasks_blocked()  # the subscriber waits at its cursor
            bus.publish(Started("/first", 0.0))
        assert first[0].path == "/first"
        for n in range(10):  # the subscriber is not reading: publishing must not wait
            bus.publish(Started(f"/e{n}", float(n)))
        lagged = await events.__anext__()
        assert isinstance(lagged, Lagged)
        assert lagged.missed == 6
        rest = [(await events.__anext__()).path for _ in range(4)]
        assert rest == ["/e6", "/e7", "/e8", "/e9"]


async def test_subscription_starts_when_subscribe_is_called() -> None:
    bus = EventBus(capacity=4)
    async with aclosing(bus.subscribe()) as events:
        bus.publish(Started("/after-subscribe", 0.0))
        with trio.move_on_after(1):
            assert (await events.__anext__()).path == "/after-subscribe"
            return
        pytest.fail("the event published after subscribe() never arrived")


async def test_a_stalled_subscriber_never_slows_the_system() -> None:
    seen: list[Event] = []
    release = trio.Event()
    async with open_actor_system(event_capacity=16) as system:

        async def slow_subscriber() -> None:
            async with aclosing(system.events.subscribe()) as events:
                async for event in events:
                    seen.append(event)
                    await release.wait()  # stalls after the first event

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_subscriber)
            await trio.testing.wait_all_tasks_blocked()
            for n in range(50):  # 100 events through a 16-slot bus
                await system.spawn(Counter(), f"c{n}")
            assert len(seen) == 1
            release.set()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        lagged = [e for e in seen if isinstance(e, Lagged)]
        assert len(lagged) == 1 and lagged[0].missed == 100 - 1 - 16
        assert len(seen) == 1 + 1 + 16


async def test_wait_for_returns_an_event_already_published() -> None:
    async with open_actor_system() as system:
        await system.spawn(Counter(), "counter")
        event = await system.events.wait_for(Started, "/counter")
        assert event.path == "/counter"


async def test_wait_for_waits_for_a_future_event_matching_path_and_predicate(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("w", Counter)], intensity=10), "sup")
        ref = system.lookup("/sup/w")

        async def crash_twice() -> None:
            for _ in range(2):
                await trio.sleep(1)
                await ref.cast(Crash())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(crash_twice)
            event = await system.events.wait_for(Restarted, "/sup/w", lambda e: e.restarts == 2)
        assert event.at == pytest.approx(2.0)


async def test_sync_hook_sees_every_event() -> None:
    seen: list[str] = []
    async with open_actor_system() as system:
        remove = system.events.add_hook(lambda e: seen.append(type(e).__name__))
        ref = await system.spawn(Counter(), "counter")
        remove()
        await system.stop(ref)
    assert seen == ["Starting", "Started"]


# -- fault injection ------------------------------------------------------------------------


async def test_inject_crash_crashes_a_top_level_actor_with_the_given_error() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        system.inject_crash("/counter", Boom("injected"))
        await trio.testing.wait_all_tasks_blocked()
        assert not ref.alive
        assert system.events.of(Crashed, "/counter")[-1].error == "Boom: injected"


async def test_inject_crash_of_a_supervised_actor_restarts_it() -> None:
    async with open_actor_system() as system:
        await system.spawn(Supervisor([ChildSpec("w", Counter)]), "sup")
        system.inject_crash("/sup/w")
        event = await system.events.wait_for(Restarted, "/sup/w")
        assert event.restarts == 1
        assert "injected crash in /sup/w" in system.events.of(Crashed, "/sup/w")[0].error


async def test_inject_crash_fails_the_call_in_progress_when_it_lands() -> None:
    gate = trio.Event()
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(gate), "counter")
        async with trio.open_nursery() as nursery:

            async def caller() -> None:
                with pytest.raises(ActorCrashed):
                    await ref.call(Get())

            ref.cast_nowait(Block())
            await trio.testing.wait_all_tasks_blocked()
            system.inject_crash("/counter", Boom("injected"))
            nursery.start_soon(caller)
            await trio.testing.wait_all_tasks_blocked()
            gate.set()  # the crash lands before the queued call is handled


async def test_inject_crash_of_an_unknown_path_raises_no_such_actor() -> None:
    async with open_actor_system() as system:
        with pytest.raises(NoSuchActor):
            system.inject_crash("/nobody")


async def test_suspend_holds_user_messages_until_resume() -> None:
    async with open_actor_system() as system:
        actor = Counter()
        ref = await system.spawn(actor, "counter")
        system.suspend("/counter")
        await ref.cast(Add(1))
        await trio.testing.wait_all_tasks_blocked()
        assert actor.seen == []
        assert await ref.query(lambda a: a.total) == 0  # the system lane is still served
        system.resume("/counter")
        assert await ref.call(Get()) == 1


async def test_suspended_actor_with_queued_messages_sleeps_instead_of_spinning() -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(Counter(), "counter")
        system.suspend("/counter")
        await ref.cast(Add(1))
        with trio.move_on_after(0.5) as scope:
            await trio.testing.wait_all_tasks_blocked()  # never returns while a task spins
        assert not scope.cancelled_caught
        system.resume("/counter")


async def test_events_are_immutable_structs_that_round_trip_through_json() -> None:
    event = Started("/x", 1.0)
    with pytest.raises(AttributeError):
        event.path = "/y"  # type: ignore[misc]
    assert msgspec.json.decode(msgspec.json.encode(event), type=Started) == event
