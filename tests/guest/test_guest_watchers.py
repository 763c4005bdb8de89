"""Directory watching through a real envd: inotify streams, polled watchers, the poll backend."""

from __future__ import annotations

import os

import pytest
import trio
from envd_kit import connect

from guest import protocol as p
from guest.protocol import EventType as E
from guest.watchers import _Seen, diff


async def events_until(remote, count: int, timeout: float = 5.0) -> list[p.FsEvent]:
    seen: list[p.FsEvent] = []
    with trio.move_on_after(timeout):
        while len(seen) < count:
            event = await remote.next_event()
            assert event is not None
            if event[0] == "event":
                seen.append(event[1])
    return seen


def kinds(events: list[p.FsEvent]) -> list[tuple[str, E]]:
    return [(e.name, e.type) for e in events]


async def test_a_watch_starts_with_start_then_reports_create_write_chmod_rename_remove(client, tmp_path):
    async with client.stream("fs.watch", p.FsWatch(path=str(tmp_path))) as remote:
        assert (await remote.next_event())[0] == "start"
        (tmp_path / "a").write_bytes(b"x")  # create, then write
        (tmp_path / "a").chmod(0o600)
        (tmp_path / "a").rename(tmp_path / "b")
        (tmp_path / "b").unlink()
        seen = kinds(await events_until(remote, 6))
    assert seen[0] == ("a", E.CREATE)
    assert ("a", E.WRITE) in seen and ("a", E.CHMOD) in seen
    assert seen[-3:] == [("a", E.RENAME), ("b", E.CREATE), ("b", E.REMOVE)]


async def test_a_recursive_watch_names_events_relative_to_the_root(client, tmp_path):
    async with client.stream("fs.watch", p.FsWatch(path=str(tmp_path), recursive=True)) as remote:
        await remote.next_event()
        (tmp_path / "sub").mkdir()
        await trio.sleep(0.1)  # let the new directory be watched
        (tmp_path / "sub" / "f").write_text("x")
        seen = kinds(await events_until(remote, 3))
    assert ("sub", E.CREATE) in seen and ("sub/f", E.CREATE) in seen


async def test_a_non_recursive_watch_ignores_subdirectories(client, tmp_path):
    (tmp_path / "sub").mkdir()
    async with client.stream("fs.watch", p.FsWatch(path=str(tmp_path))) as remote:
        await remote.next_event()
        (tmp_path / "sub" / "hidden").write_text("x")
        (tmp_path / "visible").write_text("x")
        seen = kinds(await events_until(remote, 2, timeout=1.0))
    assert all(not name.startswith("sub/") for name, _ in seen)
    assert ("visible", E.CREATE) in seen


async def test_include_entry_attaches_entries_to_create_and_write_events(client, tmp_path):
    request = p.FsWatch(path=str(tmp_path), include_entry=True)
    async with client.stream("fs.watch", request) as remote:
        await remote.next_event()
        (tmp_path / "f").write_text("hello")
        written = await events_until(remote, 2)
        (tmp_path / "f").unlink()
        removed = await events_until(remote, 1)
    assert [e.type for e in written] == [E.CREATE, E.WRITE]
    assert written[1].entry is not None and written[1].entry.name == "f"
    assert written[1].entry.size == 5
    assert removed[0].type == E.REMOVE and removed[0].entry is None


async def test_watching_a_missing_path_is_not_found_and_a_file_invalid(client, tmp_path):
    with pytest.raises(p.NotFound):
        await client.call("fs.watch", p.FsWatch(path=str(tmp_path / "nope")))
    (tmp_path / "f").write_text("x")
    with pytest.raises(p.InvalidArgument):
        await client.call("fs.watch", p.FsWatch(path=str(tmp_path / "f")))


async def test_a_polled_watcher_collects_events_between_polls(client, tmp_path):
    created = await client.call("fs.watcher.create", p.FsWatch(path=str(tmp_path)))
    ident = p.WatcherId(watcher_id=created.watcher_id)
    (tmp_path / "one").write_text("1")
    await trio.sleep(0.2)
    first = await client.call("fs.watcher.events", ident)
    assert ("one", E.CREATE) in kinds(first.events)
    assert (await client.call("fs.watcher.events", ident)).events == []
    await client.call("fs.watcher.remove", ident)
    with pytest.raises(p.NotFound):
        await client.call("fs.watcher.events", ident)


async def test_an_unknown_watcher_id_is_not_found(client):
    with pytest.raises(p.NotFound):
        await client.call("fs.watcher.events", p.WatcherId(watcher_id="nope"))
    with pytest.raises(p.NotFound):
        await client.call("fs.watcher.remove", p.WatcherId(watcher_id="nope"))


async def test_the_poll_backend_reports_the_same_kinds_of_events(private_envd, tmp_path):
    envd = private_envd("unix", "--watcher", "poll", "--poll-interval", "0.05")
    async with connect(envd) as client:
        assert "watch:poll" in client.hello.capabilities
        watched = tmp_path / "w"
        watched.mkdir()
        async with client.stream("fs.watch", p.FsWatch(path=str(watched), recursive=True)) as remote:
            await remote.next_event()
            (watched / "a").write_text("x")
            await trio.sleep(0.2)
            (watched / "a").write_text("xy")
            await trio.sleep(0.2)
            (watched / "a").rename(watched / "b")
            await trio.sleep(0.2)
            (watched / "b").chmod(0o600)
            await trio.sleep(0.2)
            os.unlink(watched / "b")
            seen = kinds(await events_until(remote, 6))
    assert seen == [
        ("a", E.CREATE), ("a", E.WRITE), ("a", E.RENAME), ("b", E.CREATE),
        ("b", E.CHMOD), ("b", E.REMOVE),
    ]


def _seen(ino: int, *, size: int = 0, mode: int = 0o100644) -> _Seen:
    return _Seen(ino=ino, dev=1, is_dir=False, mtime=0, size=size, mode=mode, uid=0, gid=0)


def test_a_snapshot_diff_turns_a_moved_inode_into_rename_and_create():
    assert diff({"a": _seen(5)}, {"b": _seen(5)}) == [("a", E.RENAME), ("b", E.CREATE)]


def test_a_snapshot_diff_reports_writes_and_mode_changes():
    before = {"f": _seen(1), "g": _seen(2)}
    after = {"f": _seen(1, size=3), "g": _seen(2, mode=0o100600)}
    assert diff(before, after) == [("f", E.WRITE), ("g", E.CHMOD)]
