"""The Store actor: the journal in a supervision tree; crashes lose no acknowledged write."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from store_kit import files_in, new_id, record, write_lock_held

from actors import ActorRef, ActorSystem, Restarted, open_actor_system
from cube.store import (
    CommitFailed,
    EnsureSetting,
    Get,
    GetSetting,
    IllegalTransition,
    Insert,
    InvalidQuery,
    JournalClosed,
    List,
    Live,
    NotFound,
    Phase,
    Purge,
    Remove,
    Save,
    SetSetting,
    Stats,
    Store,
    Transition,
    Update,
)
from supervisors import ChildSpec, Supervisor

STORE = "/node/store"


@asynccontextmanager
async def running_store(
    db: Path, **options: Any
) -> AsyncIterator[tuple[ActorSystem, ActorRef[Any]]]:
    """A system with ``/node/store`` under a one_for_one supervisor, as a node has it."""
    async with open_actor_system("test") as system:
        spec = ChildSpec("store", lambda: Store(db, **options))
        await system.spawn(Supervisor([spec], intensity=5, period=5.0), "node")
        yield system, system.lookup(STORE)


def restarts(system: ActorSystem) -> int:
    return system.tree().actors[0].children[0].restarts


async def test_the_store_answers_every_request(tmp_path: Path) -> None:
    async with running_store(tmp_path / "journal.db") as (_, store):
        sandbox = await store.call(Insert(record(metadata={"app": "prod"})))
        assert await store.call(Get(sandbox.id)) == sandbox
        running = await store.call(Transition(sandbox.id, Phase.RUNNING, {"end_at": 5.0}))
        assert (running.state, running.end_at) == (Phase.RUNNING, 5.0)
        updated = await store.call(Update(sandbox.id, {"metadata": {"app": "dev"}}))
        assert updated.metadata == {"app": "dev"}
        saved = await store.call(Save(record(state=Phase.PAUSED)))
        page = await store.call(List(state=(Phase.RUNNING, Phase.PAUSED), limit=1))
        assert len(page.items) == 1 and page.next_token is not None
        assert {r.id for r in await store.call(Live())} == {sandbox.id, saved.id}
        await store.call(Transition(saved.id, Phase.KILLED))
        assert await store.call(Purge(-60.0)) == 1
        assert await store.call(Remove(sandbox.id)) is True
        assert await store.call(EnsureSetting("api_key", "k1")) == "k1"
        await store.call(SetSetting("api_key", "k2"))
        assert await store.call(GetSetting("api_key")) == "k2"
        assert (await store.call(Stats())).writes >= 8


async def test_declared_errors_are_replies_and_the_store_keeps_running(tmp_path: Path) -> None:
    async with running_store(tmp_path / "journal.db") as (system, store):
        sandbox = await store.call(Insert(record(state=Phase.KILLED)))
        with pytest.raises(IllegalTransition):
            await store.call(Transition(sandbox.id, Phase.RUNNING))
        with pytest.raises(NotFound):
            await store.call(Get(new_id()))
        with pytest.raises(InvalidQuery):
            await store.call(List(next_token="garbage!"))
        assert (await store.call(Get(sandbox.id))).state is Phase.KILLED
        assert restarts(system) == 0


async def test_a_crashed_store_is_restarted_with_every_acknowledged_write(tmp_path: Path) -> None:
    async with running_store(tmp_path / "journal.db") as (system, store):
        written = [await store.call(Insert(record())) for _ in range(20)]
        await store.call(Transition(written[0].id, Phase.RUNNING))
        system.inject_crash(STORE)
        await system.events.wait_for(Restarted, STORE)
        assert restarts(system) == 1
        for sandbox in written[1:]:
            assert await store.call(Get(sandbox.id)) == sandbox
        assert (await store.call(Get(written[0].id))).state is Phase.RUNNING


async def test_a_crash_during_a_transaction_keeps_what_was_acknowledged(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    acknowledged: list[str] = []
    refused: list[str] = []

    async def insert(store: ActorRef[Any]) -> None:
        sandbox = record()
        try:
            await store.call(Insert(sandbox), timeout=30)
        except JournalClosed:
            refused.append(sandbox.id)  # queued behind the crash: not written, and told so
        else:
            acknowledged.append(sandbox.id)

    async with running_store(db) as (system, store):
        async with trio.open_nursery() as nursery:
            with write_lock_held(db):
                for _ in range(40):
                    nursery.start_soon(insert, store)
                await trio.testing.wait_all_tasks_blocked()  # one transaction on the lock
                system.inject_crash(STORE)
                await trio.testing.wait_all_tasks_blocked()  # terminate waits for it
        await system.events.wait_for(Restarted, STORE)
        assert len(acknowledged) + len(refused) == 40
        assert acknowledged  # the transaction in flight committed before the store went down
        for id in acknowledged:
            assert (await store.call(Get(id))).id == id
        for id in refused:
            with pytest.raises(NotFound):
                await store.call(Get(id))


async def test_requests_that_arrive_together_share_transactions(tmp_path: Path) -> None:
    async with running_store(tmp_path / "journal.db") as (_, store):
        before = await store.call(Stats())
        async with trio.open_nursery() as nursery:
            for _ in range(200):
                nursery.start_soon(store.call, Insert(record()))
        after = await store.call(Stats())
    assert after.writes - before.writes == 200
    assert after.transactions - before.transactions <= 20


async def test_a_failed_commit_crashes_the_store_which_comes_back(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    async with running_store(db, busy_timeout=0.05) as (system, store):
        with write_lock_held(db), pytest.raises(CommitFailed):
            await store.call(Insert(record()))
        await system.events.wait_for(Restarted, STORE)
        sandbox = await store.call(Insert(record()))
        assert (await store.call(Get(sandbox.id))).id == sandbox.id
        assert restarts(system) == 1


async def test_stopping_the_node_closes_the_journal_and_leaves_only_its_file(
    tmp_path: Path,
) -> None:
    db = tmp_path / "journal.db"
    async with running_store(db) as (_, store):
        for _ in range(30):
            await store.call(Insert(record()))
        assert f"{db.name}-wal" in files_in(tmp_path)
    assert files_in(tmp_path) == [db.name]


async def test_a_killed_store_still_closes_its_journal(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    async with open_actor_system("test") as system:
        store = await system.spawn(Store(db), "store", shutdown=0)  # killed: no terminate
        for _ in range(30):
            await store.call(Insert(record()))
        assert f"{db.name}-wal" in files_in(tmp_path)
        await system.stop(store)
        assert files_in(tmp_path) == [db.name]
