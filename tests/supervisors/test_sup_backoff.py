"""Restart backoff: delays measured on trio's clock, seeded jitter, and intensity."""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing
from sup_kit import Crash, Ping, rec, ref_of

from actors import ActorSystem, Crashed, GaveUp, Restarted, Restarting, open_actor_system
from supervisors import Backoff, Supervisor, terminate_child, which_children

BACKOFF = Backoff(min=1.0, max=10.0, jitter=0.2, reset_after=30.0)
SEED = 7


def expected_delays(count: int, attempts: list[int] | None = None) -> list[float]:
    rng = random.Random(SEED)
    return [BACKOFF.delay(n, rng) for n in (attempts or range(1, count + 1))]


async def crash_and_measure(system: ActorSystem, path: str, restarts: int) -> tuple[float, float]:
    """Crash the child; return (the Restarting delay, the time until Restarted)."""
    start = trio.current_time()
    await ref_of(system, path).cast(Crash())
    restarted = await system.events.wait_for(Restarted, path, lambda e: e.restarts == restarts)
    restarting = system.events.of(Restarting, path)[-1]
    return restarting.delay, restarted.at - start


async def test_backoff_delays_the_restart_by_the_seeded_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("w", log, backoff=BACKOFF)], seed=SEED), "sup")
        (expected,) = expected_delays(1)
        assert 1.0 <= expected <= 1.2
        delay, waited = await crash_and_measure(system, "/sup/w", 1)
        assert delay == pytest.approx(expected)
        assert waited == pytest.approx(expected, abs=1e-6)


async def test_backoff_grows_exponentially_with_consecutive_failures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(
            Supervisor([rec("w", log, backoff=BACKOFF)], seed=SEED, intensity=10, period=100),
            "sup",
        )
        measured = [await crash_and_measure(system, "/sup/w", n) for n in (1, 2, 3, 4, 5)]
        expected = expected_delays(5)
        assert [m[1] for m in measured] == pytest.approx(expected, abs=1e-6)
        bases = [1.0, 2.0, 4.0, 8.0, 10.0]  # min * 2**(n-1), the 5th capped at max
        for delay, base in zip(expected, bases, strict=True):
            assert base <= delay <= base * (1 + BACKOFF.jitter)


async def test_the_backoff_sequence_resets_after_the_child_ran_long_enough(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(
            Supervisor([rec("w", log, backoff=BACKOFF)], seed=SEED, intensity=10, period=100),
            "sup",
        )
        first = await crash_and_measure(system, "/sup/w", 1)
        second = await crash_and_measure(system, "/sup/w", 2)
        await trio.sleep(BACKOFF.reset_after + 1)  # the child has now run long enough
        third = await crash_and_measure(system, "/sup/w", 3)
        expected = expected_delays(3, attempts=[1, 2, 1])
        assert [first[1], second[1], third[1]] == pytest.approx(expected, abs=1e-6)


async def test_backoff_delayed_restarts_still_count_toward_intensity(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(
            Supervisor([rec("w", log, backoff=BACKOFF)], seed=SEED, intensity=1, period=5), "sup"
        )
        await crash_and_measure(system, "/sup/w", 1)
        await ref_of(system, "/sup/w").cast(Crash())
        await system.events.wait_for(GaveUp, "/sup")
        assert len(system.events.of(Restarted, "/sup/w")) == 1


async def test_a_child_waiting_out_its_backoff_is_shown_as_restarting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("w", log, backoff=BACKOFF)], seed=SEED), "sup")
        await ref_of(system, "/sup/w").cast(Crash())
        await system.events.wait_for(Crashed, "/sup/w")
        await trio.testing.wait_all_tasks_blocked()
        assert (await which_children(sup))[0].status == "restarting"
        assert system.tree().actors[0].children[0].state == "restarting"


async def test_calls_sent_during_the_backoff_are_served_by_the_next_incarnation(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("w", log, backoff=BACKOFF)], seed=SEED), "sup")
        ref = ref_of(system, "/sup/w")
        await ref.cast(Crash())
        await system.events.wait_for(Crashed, "/sup/w")
        start = trio.current_time()
        assert await ref.call(Ping()) == ("w", 2)
        assert trio.current_time() - start == pytest.approx(expected_delays(1)[0], abs=1e-6)


async def test_terminate_child_cancels_a_pending_backoff_restart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(Supervisor([rec("w", log, backoff=BACKOFF)], seed=SEED), "sup")
        await ref_of(system, "/sup/w").cast(Crash())
        await system.events.wait_for(Crashed, "/sup/w")
        await terminate_child(sup, "w")
        await trio.sleep(60)
        assert system.events.of(Restarted) == []
        assert (await which_children(sup))[0].status == "stopped"


async def test_system_exit_during_a_backoff_does_not_wait_for_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    log: list[str] = []
    slow = Backoff(min=1000.0, max=1000.0, jitter=0.0)
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("w", log, backoff=slow)]), "sup")
        await ref_of(system, "/sup/w").cast(Crash())
        await system.events.wait_for(Crashed, "/sup/w")
        start = trio.current_time()
    assert trio.current_time() - start == 0
    assert system.events.of(Restarted) == []


async def test_invalid_backoff_is_rejected() -> None:
    with pytest.raises(ValueError):
        Backoff(min=-1.0)
    with pytest.raises(ValueError):
        Backoff(min=2.0, max=1.0)
    with pytest.raises(ValueError):
        Backoff(jitter=-0.1)
