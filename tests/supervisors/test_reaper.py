"""The host reaper with real processes: spawn, exit reports, shutdown ladder, orphans, trees."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

import pytest
import trio

from actors import Actor, ActorRef, Crashed, Failure, Restarted, Stopped, open_actor_system
from supervisors import (
    BRUTAL,
    TRANSIENT,
    ChildSpec,
    ProcessActor,
    ProcessExited,
    ProcessFailed,
    Reaper,
    Spawn,
    Supervisor,
    become_subreaper,
    is_subreaper,
    kill_tree,
    terminate_child,
    tree_pids,
)
from supervisors.reaper import _ReaperKill

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


def alive(pid: int) -> bool:
    """True if ``pid`` exists at all (a zombie counts: it has not been reaped)."""
    return os.path.exists(f"/proc/{pid}")


def children_of_test_process() -> list[int]:
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if int(data[data.rindex(b")") + 2 :].split()[1]) == me:
                found.append(int(name))
    return found


@pytest.fixture(autouse=True)
def no_leaked_processes():
    before = set(children_of_test_process())
    yield
    leaked = set(children_of_test_process()) - before
    assert not leaked, f"processes left behind: {leaked}"


class Recorder(Actor[Any]):
    """Owns nothing; collects the ProcessExited notices it is sent."""

    def __init__(self) -> None:
        self.exits: list[ProcessExited] = []

    async def on_exit(self, msg: ProcessExited) -> None:
        self.exits.append(msg)


def test_become_subreaper_makes_this_process_the_reaper():
    assert become_subreaper() is True
    assert is_subreaper() is True


def test_freebsd_reaper_kill_struct_matches_the_contract_layout():
    assert ctypes.sizeof(_ReaperKill) == 80
    assert _ReaperKill.killed.offset == 12
    assert _ReaperKill.fpid.offset == 16


async def test_reaper_reports_exit_status_to_the_owner():
    async with open_actor_system() as system:
        reaper = await system.spawn(Reaper(), "reaper")
        recorder = await system.spawn(Recorder(), "recorder")
        handle = await reaper.call(Spawn(["sh", "-c", "exit 3"], owner=recorder))
        exit = await handle.wait()
        assert exit.returncode == 3 and exit.exit_code == 3 and exit.signal is None
        exits = await recorder.query(lambda a: list(a.exits))
        assert [e.pid for e in exits] == [handle.pid]
        assert not alive(handle.pid)


async def test_reaper_reports_death_by_signal_as_negative_returncode():
    async with open_actor_system() as system:
        reaper = await system.spawn(Reaper(), "reaper")
        handle = await reaper.call(Spawn(["sleep", "30"]))
        handle.send_signal(signal.SIGKILL)
        exit = await handle.wait()
        assert exit.returncode == -signal.SIGKILL
        assert exit.signal == signal.SIGKILL
        assert "SIGKILL" in str(exit)


async def test_stopping_a_process_actor_terminates_and_reaps_before_it_returns():
    async with open_actor_system() as system:
        reaper = await system.spawn(Reaper(), "reaper")
        ref = await system.spawn(ProcessActor(reaper, ["sleep", "30"]), "sleeper")
        pid = await ref.query(lambda a: a.pid)
        assert alive(pid)
        await system.stop(ref)
        assert not alive(pid)  # reaped, not even a zombie


async def test_process_ignoring_sigterm_is_killed_after_term_timeout():
    script = "trap '' TERM; while :; do sleep 0.05; done"
    async with open_actor_system() as system:
        reaper = await system.spawn(Reaper(), "reaper")
        actor = ProcessActor(reaper, ["sh", "-c", script], term_timeout=0.3)
        ref = await system.spawn(actor, "stubborn")
        pid = await ref.query(lambda a: a.pid)
        await trio.sleep(0.1)  # let the shell install its trap
        started = trio.current_time()
        await system.stop(ref)
        elapsed = trio.current_time() - started
        assert 0.3 <= elapsed < 2.0
        assert actor.process is not None and actor.process.exit is not None
        assert actor.process.exit.returncode == -signal.SIGKILL
        assert not alive(pid)


async def test_brutal_kill_of_a_process_actor_still_reaps_the_process():
    async with open_actor_system() as system:
        reaper = await system.spawn(Reaper(), "reaper")
        sup = await system.spawn(
            Supervisor([ChildSpec("p", ProcessActor, (reaper, ["sleep", "30"]), shutdown=BRUTAL)]),
            "sup",
        )
        pid = await system.lookup("/sup/p").query(lambda a: a.pid)
        await terminate_child(sup, "p")
        assert not alive(pid)


async def test_crashing_process_is_restarted_by_its_supervisor():
    async with open_actor_system() as system:
        reaper = await system.spawn(Reaper(), "reaper")
        spec = ChildSpec("crasher", ProcessActor, (reaper, ["sh", "-c", "exit 3"]), restart=TRANSIENT)
        await system.spawn(Supervisor([spec], intensity=100, period=60.0), "sup")
        await system.events.wait_for(
            Restarted,
            "/sup/crasher",
            lambda e: e.restarts >= 2,
        )
        info = system.tree().actors[1].children[0]
        assert info.restarts >= 2
        assert info.last_failure is not None and "exited with status 3" in info.last_failure


async def test_exit_zero_is_a_normal_exit_and_a_transient_child_stays_down():
    async with open_actor_system() as system:
        reaper = await system.spawn(Reaper(), "reaper")
        spec = ChildSpec("once", ProcessActor, (reaper, ["true"]), restart=TRANSIENT)
        await system.spawn(Supervisor([spec]), "sup")
        stopped = await system.events.wait_for(Stopped, "/sup/once")
        assert stopped.reason == "normal"
        await trio.sleep(0.05)
        assert system.tree().actors[1].children[0].restarts == 0


async def test_double_forked_orphan_is_reaped_and_reported_to_the_session_owner():
    async with open_actor_system() as system:
        reaper = await system.spawn(Reaper(orphan_interval=0.05), "reaper")
        recorder = await system.spawn(Recorder(), "recorder")
        # the middle shell exits at once, so its background child is reparented to us
        handle = await reaper.call(
            Spawn(["sh", "-c", "(sleep 0.2; exit 5) & exit 0"], owner=recorder)
        )
        await handle.wait()
        with trio.fail_after(5):
            while True:
                exits = await recorder.query(lambda a: list(a.exits))
                orphans = [e for e in exits if e.orphan]
                if orphans:
                    break
                await trio.sleep(0.05)
        assert orphans[0].returncode == 5
        assert not alive(orphans[0].pid)


async def test_kill_tree_kills_daemons_left_behind_by_the_process():
    async with open_actor_system() as system:
        reaper = await system.spawn(Reaper(orphan_interval=0.05), "reaper")
        handle = await reaper.call(Spawn(["sh", "-c", "sleep 60 & sleep 60 & sleep 0.1; exit 0"]))
        await trio.sleep(0.05)
        family = tree_pids(handle.pid)
        assert len(family) >= 3
        await handle.wait()
        survivors = [pid for pid in family if pid != handle.pid and alive(pid)]
        assert survivors, "the daemons should outlive their parent"
        assert kill_tree(handle.pid, include_root=False) >= len(survivors)
        with trio.fail_after(5):
            while any(alive(pid) for pid in survivors):
                await trio.sleep(0.05)


async def test_stopping_a_process_actor_also_kills_its_daemons():
    async with open_actor_system() as system:
        reaper = await system.spawn(Reaper(orphan_interval=0.05), "reaper")
        ref: ActorRef[Any] = await system.spawn(
            ProcessActor(reaper, ["sh", "-c", "sleep 60 & sleep 60 & wait"]), "forker"
        )
        pid = await ref.query(lambda a: a.pid)
        await trio.sleep(0.1)
        family = tree_pids(pid)
        assert len(family) >= 3
        await system.stop(ref)
        with trio.fail_after(5):
            while any(alive(p) for p in family):
                await trio.sleep(0.05)


async def test_reaper_does_not_steal_exit_statuses_of_trio_processes():
    async with open_actor_system() as system:
        await system.spawn(Reaper(orphan_interval=0.001), "reaper")
        results: list[int] = []

        async def run_one(code: int) -> None:
            done = await trio.run_process(["sh", "-c", f"sleep 0.01; exit {code}"], check=False)
            results.append(done.returncode)

        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(run_one, 10 + i)
        assert sorted(results) == list(range(10, 30))


async def test_process_failure_reason_names_the_status():
    async with open_actor_system() as system:
        reaper = await system.spawn(Reaper(), "reaper")
        actor = ProcessActor(reaper, ["sh", "-c", "exit 9"])
        await system.spawn(actor, "p")
        crashed = await system.events.wait_for(Crashed, "/p")
        assert "status 9" in crashed.error
        reason = actor.exit_reason()
        assert isinstance(reason, Failure) and isinstance(reason.error, ProcessFailed)
