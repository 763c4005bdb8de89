"""The journal's records: create, read, update, transitions, settings, and the schema."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
from store_kit import files_in, new_id, peek, record

from cube.drivers.base import Instance
from cube.store import (
    MIGRATIONS,
    TRANSITIONS,
    AlreadyExists,
    IllegalTransition,
    InvalidRecord,
    Journal,
    JournalClosed,
    NotFound,
    Phase,
    SchemaTooNew,
)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


async def test_insert_then_get_returns_the_same_record_with_updated_at_set(db: Path) -> None:
    original = record(metadata={"app": "prod"}, env_vars={"FOO": "bar"}, alias="python")
    async with Journal.open(db) as journal:
        stored = await journal.insert(original)
        assert stored.updated_at > 0
        assert await journal.get(original.id) == stored
        assert msgspec.structs.replace(stored, updated_at=0.0) == original


async def test_insert_refuses_a_known_id(db: Path) -> None:
    first = record()
    async with Journal.open(db) as journal:
        await journal.insert(first)
        with pytest.raises(AlreadyExists):
            await journal.insert(record(id=first.id, template="other"))
        assert (await journal.get(first.id)).template == "base"


@pytest.mark.parametrize("bad_id", ["short", "UPPERCASE0123456789A", "has-dash-0123456789a", ""])
async def test_insert_refuses_an_id_that_is_not_20_lowercase_alphanumerics(
    db: Path, bad_id: str
) -> None:
    async with Journal.open(db) as journal:
        with pytest.raises(InvalidRecord):
            await journal.insert(record(id=bad_id))


async def test_insert_refuses_values_the_schema_forbids(db: Path) -> None:
    async with Journal.open(db) as journal:
        with pytest.raises(InvalidRecord):
            await journal.insert(record(memory_mb=0))
        with pytest.raises(InvalidRecord):
            await journal.insert(record(metadata={"n": 1}))


async def test_get_of_an_unknown_id_raises_not_found(db: Path) -> None:
    async with Journal.open(db) as journal:
        with pytest.raises(NotFound):
            await journal.get(new_id())


async def test_instance_round_trips_as_the_drivers_struct(db: Path) -> None:
    instance = Instance(
        slot_id="slot-1",
        driver="ns",
        pid=4242,
        envd="unix:/run/cube/slot-1/envd.sock",
        state_dir="/var/lib/cube/slots/slot-1",
        cgroups=["/sys/fs/cgroup/cube/slot-1"],
        netns="cube-slot-1",
        extra={"veth": "cb1"},
    )
    async with Journal.open(db) as journal:
        sandbox = await journal.insert(record())
        await journal.transition(sandbox.id, Phase.RUNNING, instance=instance)
        got = await journal.get(sandbox.id)
    assert isinstance(got.instance, Instance)
    assert got.instance == instance


async def test_update_sets_fields_and_touches_updated_at(db: Path) -> None:
    async with Journal.open(db) as journal:
        before = await journal.insert(record())
        after = await journal.update(before.id, end_at=123.0, metadata={"k": "v"})
        assert after.end_at == 123.0
        assert after.metadata == {"k": "v"}
        assert after.updated_at >= before.updated_at
        assert await journal.get(before.id) == after


@pytest.mark.parametrize(
    "fields",
    [{"state": "running"}, {"id": "x" * 20}, {"created_at": 1.0}, {"no_such_field": 1}],
)
async def test_update_refuses_fields_it_may_not_set(db: Path, fields: dict[str, Any]) -> None:
    async with Journal.open(db) as journal:
        sandbox = await journal.insert(record())
        with pytest.raises(InvalidRecord):
            await journal.update(sandbox.id, **fields)
        assert await journal.get(sandbox.id) == sandbox


async def test_update_with_a_badly_typed_value_changes_nothing(db: Path) -> None:
    async with Journal.open(db) as journal:
        sandbox = await journal.insert(record())
        with pytest.raises(InvalidRecord):
            await journal.update(sandbox.id, memory_mb="lots")
        assert await journal.get(sandbox.id) == sandbox


async def test_update_of_an_unknown_id_raises_not_found(db: Path) -> None:
    async with Journal.open(db) as journal:
        with pytest.raises(NotFound):
            await journal.update(new_id(), end_at=1.0)


async def test_a_sandbox_lives_through_pause_and_resume_to_its_kill(db: Path) -> None:
    async with Journal.open(db) as journal:
        sandbox = await journal.insert(record())
        for state in ("running", "paused", "running"):
            assert (await journal.transition(sandbox.id, state)).state == state
        ended = await journal.transition(sandbox.id, Phase.KILLED, reason="DELETE /sandboxes")
        assert ended.state is Phase.KILLED
        assert ended.reason == "DELETE /sandboxes"


async def test_transition_from_killed_to_running_is_illegal_and_changes_nothing(db: Path) -> None:
    async with Journal.open(db) as journal:
        sandbox = await journal.insert(record(state=Phase.RUNNING))
        killed = await journal.transition(sandbox.id, Phase.KILLED)
        with pytest.raises(IllegalTransition, match="killed -> running"):
            await journal.transition(sandbox.id, Phase.RUNNING, reason="resurrected")
        assert await journal.get(sandbox.id) == killed


async def test_transitions_follow_the_table_for_every_pair_of_states(db: Path) -> None:
    wrong = []
    async with Journal.open(db) as journal:
        for current in Phase:
            for requested in Phase:
                sandbox = await journal.insert(record(state=current))
                legal = requested in TRANSITIONS[current]
                try:
                    await journal.transition(sandbox.id, requested)
                except IllegalTransition:
                    if legal:
                        wrong.append(f"{current} -> {requested} refused")
                else:
                    if not legal:
                        wrong.append(f"{current} -> {requested} allowed")
    assert wrong == []
    assert TRANSITIONS[Phase.RUNNING] >= {Phase.PAUSED, Phase.KILLED, Phase.CRASHED}
    assert all(not TRANSITIONS[end] for end in (Phase.KILLED, Phase.CRASHED, Phase.TIMED_OUT))


async def test_transition_records_the_crash_reason_with_the_state(db: Path) -> None:
    async with Journal.open(db) as journal:
        sandbox = await journal.insert(record(state=Phase.RUNNING))
        await journal.transition(sandbox.id, "crashed", reason="init exited with signal 9")
        got = await journal.get(sandbox.id)
    assert (got.state, got.reason) == (Phase.CRASHED, "init exited with signal 9")


async def test_transition_to_an_unknown_state_is_invalid(db: Path) -> None:
    async with Journal.open(db) as journal:
        sandbox = await journal.insert(record())
        with pytest.raises(InvalidRecord):
            await journal.transition(sandbox.id, "exploded")


async def test_save_inserts_then_checks_the_transition_of_a_whole_record(db: Path) -> None:
    async with Journal.open(db) as journal:
        sandbox = await journal.save(record(state=Phase.RUNNING))
        paused = await journal.save(msgspec.structs.replace(sandbox, state=Phase.PAUSED))
        assert (await journal.get(sandbox.id)).state is Phase.PAUSED
        killed = await journal.save(msgspec.structs.replace(paused, state=Phase.KILLED))
        with pytest.raises(IllegalTransition):
            await journal.save(msgspec.structs.replace(killed, state=Phase.RUNNING))


async def test_live_lists_only_sandboxes_that_may_still_have_processes(db: Path) -> None:
    async with Journal.open(db) as journal:
        by_state = {state: await journal.insert(record(state=state)) for state in Phase}
        live = await journal.live()
    assert {r.id for r in live} == {
        by_state[s].id for s in (Phase.STARTING, Phase.RUNNING, Phase.PAUSED)
    }


async def test_remove_deletes_a_record_and_reports_whether_it_existed(db: Path) -> None:
    async with Journal.open(db) as journal:
        sandbox = await journal.insert(record())
        assert await journal.remove(sandbox.id) is True
        assert await journal.remove(sandbox.id) is False
        with pytest.raises(NotFound):
            await journal.get(sandbox.id)


async def test_purge_deletes_only_old_records_of_ended_sandboxes(db: Path) -> None:
    async with Journal.open(db) as journal:
        old_killed = await journal.insert(record(state=Phase.KILLED))
        old_running = await journal.insert(record(state=Phase.RUNNING))
        await trio.sleep(0.01)  # a wall-clock gap between the two generations
        new_crashed = await journal.insert(record(state=Phase.CRASHED))
        assert await journal.purge_older_than(0.005) == 1
        with pytest.raises(NotFound):
            await journal.get(old_killed.id)
        await journal.get(old_running.id)
        await journal.get(new_crashed.id)


async def test_settings_store_a_value_once_and_overwrite_on_request(db: Path) -> None:
    async with Journal.open(db) as journal:
        assert await journal.get_setting("api_key") is None
        assert await journal.ensure_setting("api_key", "first") == "first"
        assert await journal.ensure_setting("api_key", "second") == "first"
        await journal.set_setting("api_key", "rotated")
        assert await journal.get_setting("api_key") == "rotated"
    async with Journal.open(db) as journal:
        assert await journal.get_setting("api_key") == "rotated"


async def test_the_file_is_in_wal_mode_and_private(db: Path) -> None:
    async with Journal.open(db):
        assert peek(db, "PRAGMA journal_mode") == [("wal",)]
        assert stat.S_IMODE(db.stat().st_mode) == 0o600


async def test_closing_leaves_only_the_database_file(db: Path) -> None:
    async with Journal.open(db) as journal:
        for _ in range(50):
            await journal.insert(record())
        assert f"{db.name}-wal" in files_in(db.parent)
    assert files_in(db.parent) == [db.name]


async def test_reopening_applies_each_migration_once(db: Path) -> None:
    async with Journal.open(db):
        pass
    async with Journal.open(db):
        pass
    versions = [v for (v,) in peek(db, "SELECT version FROM schema_version")]
    assert versions == [m.version for m in MIGRATIONS]


async def test_a_journal_written_by_a_newer_cube_is_refused(db: Path) -> None:
    async with Journal.open(db):
        pass
    peek(db, "INSERT INTO schema_version VALUES (999, 'from the future', 0)")
    with pytest.raises(SchemaTooNew):
        await Journal.connect(db)
    assert files_in(db.parent) == [db.name]


async def test_a_closed_journal_refuses_reads_and_writes(db: Path) -> None:
    journal = await Journal.connect(db)
    await journal.aclose()
    await journal.aclose()  # idempotent
    with pytest.raises(JournalClosed):
        await journal.insert(record())
    with pytest.raises(JournalClosed):
        await journal.get(new_id())
