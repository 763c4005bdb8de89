"""The filesystem service through a real envd: E2B's EntryInfo, errors and streamed I/O."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
import trio

from guest import protocol as p


async def entry(client, path: str, **options) -> p.EntryInfo:
    return (await client.call("fs.stat", p.FsStat(path=path, **options))).entry


async def test_stat_describes_a_file_as_e2b_does(client, tmp_path):
    target = tmp_path / "file.txt"
    target.write_bytes(b"hello")
    target.chmod(0o640)
    info = await entry(client, str(target))
    me = pwd.getpwuid(os.getuid()).pw_name
    assert (info.name, info.path, info.type, info.size) == ("file.txt", str(target), p.FileType.FILE, 5)
    assert (info.mode, info.permissions) == (0o640, "-rw-r-----")
    assert info.owner == me and info.group
    assert info.modified_time.endswith("Z") and info.modified_time.startswith("20")
    assert info.symlink_target is None and not info.is_symlink


async def test_stat_of_a_directory_has_permission_bits_only(client, tmp_path):
    (tmp_path / "d").mkdir(mode=0o755)
    info = await entry(client, str(tmp_path / "d"))
    assert (info.type, info.mode, info.permissions) == (p.FileType.DIRECTORY, 0o755, "drwxr-xr-x")


async def test_a_symlink_reports_its_target_type_and_path(client, tmp_path):
    (tmp_path / "real").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    info = await entry(client, str(tmp_path / "link"))
    assert info.is_symlink and info.symlink_target == str(tmp_path / "real")
    assert info.type == p.FileType.FILE and info.permissions.startswith("L")


async def test_stat_of_a_missing_path_is_not_found(client, tmp_path):
    with pytest.raises(p.NotFound):
        await entry(client, str(tmp_path / "missing"))


async def test_a_relative_path_starts_at_the_users_home(client):
    info = await entry(client, ".")
    assert info.path == client.hello.home


async def test_list_returns_one_level_by_default_and_more_with_depth(client, tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c.txt").write_text("c")
    (tmp_path / "top.txt").write_text("t")
    one = await client.call("fs.list", p.FsList(path=str(tmp_path)))
    assert [e.name for e in one.entries] == ["a", "top.txt"]
    zero = await client.call("fs.list", p.FsList(path=str(tmp_path), depth=0))
    assert [e.name for e in zero.entries] == ["a", "top.txt"]
    three = await client.call("fs.list", p.FsList(path=str(tmp_path), depth=3))
    assert [e.path for e in three.entries] == [
        str(tmp_path / "a"), str(tmp_path / "a" / "b"), str(tmp_path / "a" / "b" / "c.txt"),
        str(tmp_path / "top.txt"),
    ]


async def test_listing_a_file_is_an_invalid_argument_and_a_missing_dir_not_found(client, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(p.InvalidArgument):
        await client.call("fs.list", p.FsList(path=str(tmp_path / "f")))
    with pytest.raises(p.NotFound):
        await client.call("fs.list", p.FsList(path=str(tmp_path / "nope")))


async def test_make_dir_creates_parents_and_then_says_already_exists(client, tmp_path):
    target = tmp_path / "x" / "y" / "z"
    made = await client.call("fs.make_dir", p.FsMakeDir(path=str(target)))
    assert made.entry.type == p.FileType.DIRECTORY and target.is_dir()
    with pytest.raises(p.AlreadyExists):
        await client.call("fs.make_dir", p.FsMakeDir(path=str(target)))


async def test_make_dir_over_a_file_is_an_invalid_argument(client, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(p.InvalidArgument):
        await client.call("fs.make_dir", p.FsMakeDir(path=str(tmp_path / "f")))


async def test_move_renames_creates_the_destination_parents_and_returns_its_entry(client, tmp_path):
    (tmp_path / "old").write_text("x")
    moved = await client.call(
        "fs.move", p.FsMove(source=str(tmp_path / "old"), destination=str(tmp_path / "n" / "new"))
    )
    assert moved.entry.path == str(tmp_path / "n" / "new") and moved.entry.size == 1
    assert not (tmp_path / "old").exists()


async def test_moving_a_missing_source_is_not_found(client, tmp_path):
    with pytest.raises(p.NotFound):
        await client.call("fs.move", p.FsMove(source=str(tmp_path / "a"), destination=str(tmp_path / "b")))


async def test_remove_deletes_a_whole_tree_and_a_missing_path_is_fine(client, tmp_path):
    (tmp_path / "t" / "u").mkdir(parents=True)
    (tmp_path / "t" / "u" / "f").write_text("x")
    await client.call("fs.remove", p.FsRemove(path=str(tmp_path / "t")))
    assert not (tmp_path / "t").exists()
    await client.call("fs.remove", p.FsRemove(path=str(tmp_path / "t")))


async def test_remove_of_a_symlink_to_a_dir_removes_only_the_link(client, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("x")
    (tmp_path / "l").symlink_to(tmp_path / "d")
    await client.call("fs.remove", p.FsRemove(path=str(tmp_path / "l")))
    assert (tmp_path / "d" / "keep").exists() and not (tmp_path / "l").exists()


async def read_all(client, path: str, **options) -> tuple[p.EntryInfo, bytes, int]:
    chunks = []
    async with client.stream("fs.read", p.FsRead(path=path, **options)) as remote:
        start = await remote.next_event()
        assert start is not None and start[0] == "start"
        async for kind, body in remote:
            assert kind == "data"
            chunks.append(body.data)
        return start[1].entry, b"".join(chunks), remote.result.size


async def test_read_streams_the_file_after_a_start_with_its_entry(client, tmp_path):
    (tmp_path / "f").write_bytes(b"abc" * 1000)
    info, data, size = await read_all(client, str(tmp_path / "f"))
    assert info.size == 3000 and data == b"abc" * 1000 and size == 3000


async def test_read_honours_offset_and_length(client, tmp_path):
    (tmp_path / "f").write_bytes(b"0123456789")
    _, data, size = await read_all(client, str(tmp_path / "f"), offset=2, length=5)
    assert data == b"23456" and size == 5


async def test_reading_a_directory_is_an_invalid_argument_and_a_missing_file_not_found(client, tmp_path):
    with pytest.raises(p.InvalidArgument):
        await client.call("fs.read", p.FsRead(path=str(tmp_path)))
    with pytest.raises(p.NotFound):
        await client.call("fs.read", p.FsRead(path=str(tmp_path / "nope")))


async def test_write_with_inline_data_creates_parents_and_returns_the_entry(client, tmp_path):
    target = tmp_path / "deep" / "er" / "f.txt"
    written = await client.call("fs.write", p.FsWrite(path=str(target), data=b"hi"))
    assert target.read_bytes() == b"hi" and written.entry.size == 2
    assert written.entry.mode == 0o644


async def test_write_without_create_parents_fails_when_the_dir_is_missing(client, tmp_path):
    with pytest.raises(p.NotFound):
        await client.call(
            "fs.write", p.FsWrite(path=str(tmp_path / "no" / "f"), data=b"x", create_parents=False)
        )


async def test_write_sets_the_requested_mode_and_can_append(client, tmp_path):
    target = tmp_path / "f"
    await client.call("fs.write", p.FsWrite(path=str(target), data=b"a", mode=0o600))
    await client.call("fs.write", p.FsWrite(path=str(target), data=b"b", append=True))
    assert target.read_bytes() == b"ab" and stat.S_IMODE(target.stat().st_mode) == 0o600


async def test_write_over_a_directory_is_an_invalid_argument(client, tmp_path):
    with pytest.raises(p.InvalidArgument):
        await client.call("fs.write", p.FsWrite(path=str(tmp_path), data=b"x"))


async def test_write_stores_metadata_as_xattrs_that_stat_returns(client, tmp_path):
    target = tmp_path / "f"
    try:
        os.setxattr(tmp_path, "user.probe", b"1")
    except OSError:
        pytest.skip("this filesystem has no user xattrs")
    await client.call("fs.write", p.FsWrite(path=str(target), data=b"x", metadata={"Owner": "me"}))
    assert (await entry(client, str(target))).metadata == {"owner": "me"}


async def write_streamed(client, path: str, size: int, chunk: int = 1 << 20) -> tuple[p.EntryInfo, str]:
    digest = hashlib.sha256()
    block = os.urandom(chunk)
    async with client.stream("fs.write", p.FsWrite(path=path)) as remote:
        sent = 0
        while sent < size:
            piece = block[: min(chunk, size - sent)]
            digest.update(piece)
            await remote.send_input(piece)
            sent += len(piece)
        await remote.send_input(eof=True)
        result = await remote.wait()
    return result.entry, digest.hexdigest()


async def test_a_100_mb_file_goes_in_and_comes_back_intact(client, tmp_path):
    size = 100 << 20
    target = str(tmp_path / "big.bin")
    with trio.fail_after(60):
        info, sent_digest = await write_streamed(client, target, size)
        assert info.size == size
        digest = hashlib.sha256()
        received = 0
        async with client.stream("fs.read", p.FsRead(path=target)) as remote:
            async for kind, body in remote:
                if kind == "data":
                    digest.update(body.data)
                    received += len(body.data)
    assert received == size and digest.hexdigest() == sent_digest
    os.unlink(target)


async def test_input_beyond_the_granted_window_is_refused_with_resource_exhausted(client, tmp_path):
    async with client.stream("fs.write", p.FsWrite(path=str(tmp_path / "f"))) as remote:
        # Ignore the guest's credit and push more than the window it allows.
        await client._send(remote.id, "input", p.Input(data=b"x" * (client.input_window + 1)))
        with pytest.raises(p.ResourceExhausted):
            await remote.wait()


@pytest.fixture
def world_dir():
    """A directory every user can reach (pytest's own temp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="guest-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
async def test_file_operations_run_with_the_users_permissions(client, world_dir):
    private = world_dir / "private"
    private.mkdir(mode=0o711)
    secret = private / "secret"
    secret.write_text("s")
    secret.chmod(0o600)
    with pytest.raises(p.PermissionDenied):
        await client.call("fs.read", p.FsRead(path=str(secret), user="nobody"))
    with pytest.raises(p.PermissionDenied):
        await client.call("fs.write", p.FsWrite(path=str(private / "new"), data=b"x", user="nobody"))
    with pytest.raises(p.PermissionDenied):
        await client.call("fs.make_dir", p.FsMakeDir(path=str(private / "d"), user="nobody"))
    info = await entry(client, str(secret), user="nobody")  # stat needs only the x bit
    assert info.owner == "root"


@pytest.mark.skipif(os.geteuid() != 0, reason="acting as another user needs root")
async def test_files_a_user_creates_belong_to_that_user(client, world_dir):
    shared = world_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    written = await client.call(
        "fs.write", p.FsWrite(path=str(shared / "sub" / "f"), data=b"x", user="nobody")
    )
    assert written.entry.owner == "nobody"
    assert (shared / "sub").stat().st_uid == pwd.getpwnam("nobody").pw_uid


async def test_an_unexpected_io_failure_is_an_internal_error(client):
    # Offset 0 of a process's memory is never mapped: the read fails with EIO.
    with pytest.raises(p.Internal):
        await client.call("fs.read", p.FsRead(path="/proc/self/mem"))


async def test_reading_or_writing_a_fifo_is_refused_instead_of_blocking(client, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with trio.fail_after(5):
        with pytest.raises(p.InvalidArgument):
            await client.call("fs.read", p.FsRead(path=str(fifo)))
        with pytest.raises(p.InvalidArgument):  # no reader: the open fails at once (ENXIO)
            await client.call("fs.write", p.FsWrite(path=str(fifo), data=b"x"))
        await client.call("ping")
