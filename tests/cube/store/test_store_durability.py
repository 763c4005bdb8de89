"""Durability and concurrency: what is acknowledged survives; writes batch; the loop stays free."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from store_kit import files_in, new_id, peek, record, write_lock_held

from cube.store import (
    CommitFailed,
    IllegalTransition,
    Journal,
    NotFound,
    Phase,
    SandboxRecord,
)

WRITER = Path(__file__).with_name("store_writer.py")


async def test_records_and_transitions_survive_a_reopen(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    async with Journal.open(db) as journal:
        sandbox = await journal.insert(record(metadata={"k": "v"}))
        await journal.transition(sandbox.id, Phase.RUNNING, end_at=1e10)
        final = await journal.transition(sandbox.id, Phase.PAUSED)
    async with Journal.open(db) as journal:
        assert await journal.get(sandbox.id) == final
        assert [r.id for r in await journal.live()] == [sandbox.id]


async def test_full_synchronous_mode_works_the_same(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    async with Journal.open(db, synchronous="FULL") as journal:
        sandbox = await journal.insert(record())
        assert peek(db, "PRAGMA journal_mode") == [("wal",)]
    async with Journal.open(db) as journal:
        assert (await journal.get(sandbox.id)).id == sandbox.id


async def _acknowledged_by_a_killed_writer(db: Path, mode: str, count: int) -> list[str]:
    """Run store_writer.py until it has acknowledged ``count`` writes and is dead."""
    argv = [sys.executable, str(WRITER), str(db), mode, str(count)]
    process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, cwd=WRITER.parent)
    assert process.stdout is not None
    output = b""
    killed = False
    with trio.fail_after(30):
        while True:
            chunk = await process.stdout.receive_some()
            if not chunk:
                break  # EOF: the writer is gone; everything it acknowledged has been read
            output += chunk
            if mode == "forever" and not killed and output.count(b"\n") >= count:
                process.kill()  # SIGKILL, most likely in the middle of a transaction
                killed = True
        await process.wait()
    assert process.returncode == (-9 if mode == "forever" else 0)
    return [line.decode() for line in output.splitlines() if len(line) == 20]


@pytest.mark.parametrize("mode", ["forever", "exit"])
async def test_every_acknowledged_write_survives_a_killed_writer_process(
    tmp_path: Path, mode: str
) -> None:
    db = tmp_path / "journal.db"
    acknowledged = await _acknowledged_by_a_killed_writer(db, mode, 300)
    assert len(acknowledged) >= 300
    assert f"{db.name}-wal" in files_in(tmp_path)  # nobody checkpointed: recovery has work
    async with Journal.open(db) as journal:
        assert peek(db, "PRAGMA integrity_check") == [("ok",)]
        present = {r.id for r in (await journal.list(limit=100_000)).items}
    assert set(acknowledged) <= present
    assert files_in(tmp_path) == [db.name]


async def test_concurrent_writes_from_many_tasks_share_a_few_transactions(
    tmp_path: Path,
) -> None:
    made: list[SandboxRecord] = []
    async with Journal.open(tmp_path / "journal.db") as journal:

        async def insert() -> None:
            made.append(await journal.insert(record()))

        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(insert)
        stats = journal.stats()
        stored = (await journal.list(limit=1000)).items
    assert len(made) == 200
    assert {r.id for r in stored} == {r.id for r in made}
    assert stats.writes == 200
    assert stats.transactions <= 10
    assert stats.largest_batch >= 100


async def test_one_bad_write_fails_alone_in_its_shared_transaction(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    outcomes: dict[str, object] = {}
    good_a, good_b = record(), record()
    async with Journal.open(db) as journal:
        killed = await journal.insert(record(state=Phase.KILLED))

        async def attempt(name: str, write: Callable[..., Awaitable[object]], *args: Any) -> None:
            try:
                outcomes[name] = await write(*args)
            except (IllegalTransition, NotFound) as exc:
                outcomes[name] = exc

        before = journal.stats().transactions
        async with trio.open_nursery() as nursery:
            with write_lock_held(db):
                nursery.start_soon(attempt, "lead", journal.insert, record())
                await trio.testing.wait_all_tasks_blocked()  # its transaction waits for the lock
                nursery.start_soon(attempt, "a", journal.insert, good_a)
                nursery.start_soon(attempt, "bad", journal.transition, killed.id, "running")
                nursery.start_soon(attempt, "missing", journal.update, new_id())
                nursery.start_soon(attempt, "b", journal.insert, good_b)
                await trio.testing.wait_all_tasks_blocked()  # all four queued behind it
        assert journal.stats().transactions - before == 2
        assert isinstance(outcomes["bad"], IllegalTransition)
        assert isinstance(outcomes["missing"], NotFound)
        assert await journal.get(good_a.id) == outcomes["a"]
        assert await journal.get(good_b.id) == outcomes["b"]
        assert (await journal.get(killed.id)).state is Phase.KILLED


async def test_a_write_cancelled_while_queued_is_withdrawn_and_never_written(
    tmp_path: Path,
) -> None:
    db = tmp_path / "journal.db"
    lead, queued = record(), record()
    async with Journal.open(db) as journal:
        async with trio.open_nursery() as nursery:
            with write_lock_held(db):
                nursery.start_soon(journal.insert, lead)
                await trio.testing.wait_all_tasks_blocked()
                with trio.move_on_after(0.05) as scope:
                    await journal.insert(queued)
        assert scope.cancelled_caught
        assert (await journal.get(lead.id)).id == lead.id
        with pytest.raises(NotFound):
            await journal.get(queued.id)
        assert journal.stats().writes == 1


async def test_a_write_cancelled_once_its_transaction_runs_still_hears_it_committed(
    tmp_path: Path,
) -> None:
    db = tmp_path / "journal.db"
    sandbox = record()
    heard: list[SandboxRecord] = []

    async def insert(scope: trio.CancelScope) -> None:
        with scope:
            heard.append(await journal.insert(sandbox))
            await trio.sleep_forever()  # the cancellation lands here, after the reply

    async with Journal.open(db) as journal:
        scope = trio.CancelScope()
        async with trio.open_nursery() as nursery:
            with write_lock_held(db):
                nursery.start_soon(insert, scope)
                await trio.testing.wait_all_tasks_blocked()  # in the transaction, on the lock
                scope.cancel()
        assert scope.cancelled_caught
        assert [r.id for r in heard] == [sandbox.id]
        assert (await journal.get(sandbox.id)).id == sandbox.id


async def test_a_failed_commit_fails_its_writes_and_the_journal_carries_on(
    tmp_path: Path,
) -> None:
    db = tmp_path / "journal.db"
    lost, later = record(), record()
    async with Journal.open(db, busy_timeout=0.05) as journal:
        with write_lock_held(db), pytest.raises(CommitFailed):
            await journal.insert(lost)
        await journal.insert(later)
        with pytest.raises(NotFound):
            await journal.get(lost.id)
        assert (await journal.get(later.id)).id == later.id


async def _worst_lateness(work: Callable[[], Awaitable[object]], period: float = 0.001) -> float:
    """How late, at worst, a task sleeping ``period`` at a time woke while ``work`` ran."""
    worst = 0.0

    async def ticker(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal worst
        task_status.started()
        while True:
            before = trio.current_time()
            await trio.sleep(period)
            worst = max(worst, trio.current_time() - before - period)

    async with trio.open_nursery() as nursery:
        await nursery.start(ticker)
        await work()
        nursery.cancel_scope.cancel()
    return worst


async def test_the_trio_loop_stays_responsive_during_a_large_write_burst(
    tmp_path: Path,
) -> None:
    async def burst(journal: Journal, count: int) -> None:
        for _ in range(count):
            await journal.insert(record(metadata={"burst": "yes"}, env_vars={"A": "b" * 200}))

    async def four_thousand_writes() -> None:
        async with trio.open_nursery() as writers:
            for _ in range(50):
                writers.start_soon(burst, journal, 80)

    # A full collection of the test session's heap pauses any loop for tens of ms; freeze
    # what exists now so that what is measured is the journal, not the session's garbage.
    gc.collect()
    gc.freeze()
    try:
        async with Journal.open(tmp_path / "journal.db") as journal:
            started = trio.current_time()
            worst = await _worst_lateness(four_thousand_writes)
            elapsed = trio.current_time() - started
            assert journal.stats().writes == 4000
        # The same ticker with nothing else to do, for as long: what this machine's own noise
        # (other processes on two cores) costs the loop in this run.
        idle = await _worst_lateness(partial(trio.sleep, elapsed))
    finally:
        gc.unfreeze()
    print(
        f"4000 writes in {elapsed:.2f} s; worst loop lateness {worst * 1000:.1f} ms"
        f" (idle: {idle * 1000:.1f} ms)"
    )
    assert worst < 0.1 + idle
