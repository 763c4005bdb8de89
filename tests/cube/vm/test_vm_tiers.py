"""The pieces of the VM tiers that need no VM: the durable checkpoint store and the host end
of the guest's control port (against the guest agent's own request handler)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from cube.drivers.base import DriverError
from cube.images import guestctl
from cube.vm import CHECKPOINT_DONE, CheckpointStore, GuestIdentity, guest_control


async def test_a_checkpoint_is_made_once_however_many_ask_for_it(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"))
    made: list[str] = []

    async def create(directory: str) -> dict[str, object]:
        made.append(directory)
        await trio.sleep(0.05)
        Path(directory, "state").write_text("memory")
        return {"boot_seconds": 1.0}

    results: list[tuple[str, bool]] = []

    async def ask() -> None:
        results.append(await store.ensure("k1", create))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ask)
    assert len(made) == 1 and Path(made[0]).name.startswith(".tmp-k1-")
    assert sorted(made_now for _, made_now in results) == [False, False, True]
    assert {directory for directory, _ in results} == {store.path("k1")}
    assert Path(store.path("k1"), "state").read_text() == "memory"
    assert Path(store.path("k1"), CHECKPOINT_DONE).exists()  # written last


async def test_a_failed_checkpoint_leaves_nothing_and_is_tried_again(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"))

    async def fail(directory: str) -> dict[str, object]:
        Path(directory, "state").write_text("half")
        raise DriverError("the template did not boot")

    with pytest.raises(DriverError):
        await store.ensure("k1", fail)
    assert not store.complete("k1")
    assert [n for n in os.listdir(store.root) if not n.endswith(".lock")] == []

    async def succeed(directory: str) -> dict[str, object]:
        return {}

    assert await store.ensure("k1", succeed) == (store.path("k1"), True)


async def test_prune_keeps_the_newest_and_drops_what_dead_makers_left(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "ckpt"))

    async def create(directory: str) -> dict[str, object]:
        return {}

    for key in ("a", "b", "c"):
        await store.ensure(key, create)
        os.utime(store.path(key), (0, {"a": 1, "b": 2, "c": 3}[key]))
    stale = Path(store.root, ".tmp-d-999999999")  # a pid that cannot exist
    stale.mkdir()
    assert store.prune(2) == ["a"]
    assert store.keys() == ["b", "c"] and not stale.exists()
    assert not Path(store.root, "a.lock").exists()


async def test_guest_control_ignores_stale_replies_and_reports_errors(tmp_path: Path) -> None:
    """The host end against the guest agent's handler, over a unix socket as QEMU gives it."""
    path = str(tmp_path / "ctl.sock")
    listener = trio.socket.socket(trio.socket.AF_UNIX)
    await listener.bind(path)
    listener.listen(4)

    async def guest(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            conn, _ = await listener.accept()
            with conn:
                await conn.send(b"0123 ok\n")  # an answer meant for a previous host
                buffer = b""
                while b"\n" not in buffer.lstrip(b"\n"):
                    buffer += await conn.recv(4096)
                replies = b"".join(guestctl.answer(line) for line in buffer.split(b"\n"))
                await conn.send(replies)

    async with trio.open_nursery() as nursery:
        await nursery.start(guest)
        assert await guest_control(path, "ping", timeout=5) == ""
        with pytest.raises(DriverError, match="unknown command"):
            await guest_control(path, "reboot", timeout=5)
        with pytest.raises(DriverError, match="ValueError"):
            await guest_control(path, "net", "only-two", "args", timeout=5)
        nursery.cancel_scope.cancel()
    listener.close()


def test_a_guest_identity_becomes_the_net_commands_arguments() -> None:
    identity = GuestIdentity(
        mac="52:54:00:aa:bb:cc",
        address="10.1.2.3/16",
        gateway="10.1.0.1",
        hostname="cube-x",
        nameservers=("192.0.2.1", "192.0.2.2"),
    )
    assert identity.net_args() == [
        "52:54:00:aa:bb:cc",
        "10.1.2.3/16",
        "10.1.0.1",
        "cube-x",
        "192.0.2.1,192.0.2.2",
    ]
    assert GuestIdentity(mac="m").net_args()[2:] == ["-", "sandbox", "-"]
