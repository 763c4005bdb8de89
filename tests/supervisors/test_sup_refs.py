"""References stay valid across restarts; the supervisor owns the mailbox."""

from __future__ import annotations

import trio
import trio.testing
from sup_kit import Crash, Ping, crash_and_wait, rec, ref_of

from actors import open_actor_system
from supervisors import ONE_FOR_ALL, Supervisor, which_children


async def test_the_same_ref_object_works_after_the_supervisor_restarted_the_child() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("w", log)]), "sup")
        ref = ref_of(system, "/sup/w")
        assert await ref.call(Ping()) == ("w", 1)
        for n in (1, 2):
            await crash_and_wait(system, "/sup/w", n)
            assert ref.alive
            assert await ref.call(Ping()) == ("w", n + 1)
        assert system.lookup("/sup/w") is ref


async def test_which_children_returns_the_same_ref_before_and_after_a_restart() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        sup = await system.spawn(
            Supervisor([rec("a", log), rec("b", log)], strategy=ONE_FOR_ALL), "sup"
        )
        before = [r.ref for r in await which_children(sup)]
        await crash_and_wait(system, "/sup/a", 1)
        await trio.testing.wait_all_tasks_blocked()
        after = [r.ref for r in await which_children(sup)]
        assert all(x is y for x, y in zip(before, after, strict=True))


async def test_a_cast_sent_while_the_child_restarts_reaches_the_next_incarnation() -> None:
    log: list[str] = []
    async with open_actor_system() as system:
        await system.spawn(Supervisor([rec("w", log)]), "sup")
        ref = ref_of(system, "/sup/w")
        await ref.cast(Crash())
        await ref.cast(Crash())  # queued behind the first crash: handled by incarnation 2
        await trio.testing.wait_all_tasks_blocked()
        assert await ref.call(Ping()) == ("w", 3)
