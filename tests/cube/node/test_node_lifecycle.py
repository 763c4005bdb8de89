"""The node end to end on real processes: create, run, files, kill, crash, timeouts, pools."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
from node_kit import envd_processes, node_config, pid_alive

from actors import Restarted
from cube.config import PoolConfig
from cube.drivers.process import ProcessDriver
from cube.node import Node, open_node
from cube.pool import PoolError, Status
from cube.registry import NotFound
from cube.store import Get, Phase


async def wait_until(predicate, timeout: float = 10.0, step: float = 0.02) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(step)


async def journal_state(node: Node, id: str) -> Phase:
    record = await node.services.store.call(Get(id))
    return record.state


async def test_create_binds_a_warm_sandbox_that_runs_commands(node: Node) -> None:
    sbx = await node.create("base", metadata={"owner": "test"}, envs={"GREETING": "hi"})
    result = await sbx.run("echo $GREETING; echo oops >&2; exit 3")
    assert result.stdout == "hi\n"
    assert result.stderr == "oops\n"
    assert result.exit_code == 3
    assert await journal_state(node, sbx.id) == Phase.RUNNING
    assert len(sbx.id) == 20 and sbx.id.isalnum() and sbx.id.islower()


async def test_files_written_are_read_back(node: Node) -> None:
    sbx = await node.create("base")
    entry = await sbx.files.write("dir/notes.txt", b"\x00binary\xff" * 1000)
    assert entry.size == 8000
    assert await sbx.files.read("dir/notes.txt") == b"\x00binary\xff" * 1000
    names = [e.name for e in await sbx.files.list("dir")]
    assert names == ["notes.txt"]


async def test_kill_ends_the_sandbox_and_journals_it(node: Node) -> None:
    sbx = await node.create("base")
    pid = sbx.info.instance.pid
    await sbx.kill()
    assert sbx.info.state == Phase.KILLED
    assert await journal_state(node, sbx.id) == Phase.KILLED
    assert not pid_alive(pid)
    with pytest.raises(NotFound):
        await node.get(sbx.id)


async def test_list_shows_running_sandboxes_filtered_by_metadata(node: Node) -> None:
    a = await node.create("base", metadata={"team": "a"})
    b = await node.create("base", metadata={"team": "b"})
    page = await node.list(metadata={"team": "b"})
    assert [r.id for r in page.items] == [b.id]
    await a.kill()
    page = await node.list()
    assert [r.id for r in page.items] == [b.id]


async def test_a_sandbox_whose_process_dies_is_marked_crashed(node: Node) -> None:
    sbx = await node.create("base")
    os.kill(sbx.info.instance.pid, signal.SIGKILL)

    async def crashed() -> bool:
        return await journal_state(node, sbx.id) == Phase.CRASHED

    await wait_until(crashed)
    record = await node.services.store.call(Get(sbx.id))
    assert record.reason is not None and "SIGKILL" in record.reason
    with pytest.raises(NotFound):
        await node.get(sbx.id)


async def test_a_sandbox_is_timed_out_at_its_deadline(node: Node) -> None:
    sbx = await node.create("base", timeout=0.3)

    async def timed_out() -> bool:
        return await journal_state(node, sbx.id) == Phase.TIMED_OUT

    await wait_until(timed_out, timeout=5)


async def test_set_timeout_moves_the_deadline(node: Node) -> None:
    sbx = await node.create("base", timeout=0.3)
    await sbx.set_timeout(60)
    await trio.sleep(0.6)
    assert await journal_state(node, sbx.id) == Phase.RUNNING


async def test_pause_stops_the_sandbox_and_resume_continues_it(node: Node) -> None:
    sbx = await node.create("base")
    await sbx.pause()
    assert await journal_state(node, sbx.id) == Phase.PAUSED
    with trio.move_on_after(0.3) as scope:
        await sbx.run("true")
    assert scope.cancelled_caught, "a paused sandbox must not run commands"
    await sbx.resume()
    assert (await sbx.run("echo back")).stdout == "back\n"
    assert await journal_state(node, sbx.id) == Phase.RUNNING


async def test_the_pool_refills_after_a_create(node: Node) -> None:
    pool = node.services.pool("base")
    await node.create("base")

    async def refilled() -> bool:
        return (await pool.call(Status())).warm == 1

    await wait_until(refilled)


async def test_a_warm_slot_that_dies_is_replaced(node: Node) -> None:
    pool = node.services.pool("base")

    async def warm() -> bool:
        return (await pool.call(Status())).warm == 1

    await wait_until(warm)
    slot_pids = [c.name for c in node.tree().actors[0].children if c.name == "sandboxes"]
    assert slot_pids
    sandboxes = node.services.system.lookup("/node/sandboxes")
    before = {c.ref.path for c in await __import__("supervisors").which_children(sandboxes)}
    pid = int(next(p for p in os.listdir("/proc") if p.isdigit() and _is_envd_of(p, node)))
    os.kill(pid, signal.SIGKILL)

    async def replaced() -> bool:
        now = {c.ref.path for c in await __import__("supervisors").which_children(sandboxes) if c.ref}
        return (await pool.call(Status())).warm == 1 and now.isdisjoint(before)

    await wait_until(replaced)


def _is_envd_of(pid: str, node: Node) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return "guest.envd" in cmd and node.config.state_dir in cmd


async def test_a_crashed_guest_link_is_restarted_without_disturbing_the_sandbox(node: Node) -> None:
    sbx = await node.create("base")
    await sbx.run("echo before > state.txt")
    path = f"/node/sandboxes/{sbx.id}/guest"
    node.services.system.inject_crash(path)
    await node.services.system.events.wait_for(Restarted, path)
    sbx._client = None
    assert (await sbx.run("cat state.txt")).stdout == "before\n"
    assert await journal_state(node, sbx.id) == Phase.RUNNING


async def test_a_pool_that_cannot_start_sandboxes_says_why(state_dir: Path) -> None:
    driver = ProcessDriver(str(state_dir), envd_argv=["false"], ready_timeout=2)
    config = node_config(state_dir)
    async with open_node(config, driver=driver) as node:
        with pytest.raises(PoolError, match="cannot start a sandbox"):
            await node.create("base", take_timeout=20)
        status = await node.services.pool("base").call(Status())
        assert status.failures >= 1 and status.last_error


async def test_an_unknown_template_is_refused(node: Node) -> None:
    with pytest.raises(KeyError):
        await node.create("no-such-template")


async def test_stopping_the_node_kills_its_sandboxes_and_journals_them(state_dir: Path) -> None:
    async with open_node(node_config(state_dir)) as node:
        sbx = await node.create("base")
        store = node.services
        ids = [sbx.id]
    assert envd_processes(state_dir) == []
    async with open_node(node_config(state_dir, pool_size=0)) as node:
        for id in ids:
            assert await journal_state(node, id) == Phase.KILLED
    del store


def test_pool_config_rejects_a_negative_size() -> None:
    with pytest.raises(ValueError):
        node_config(Path("/tmp"), pools={"base": PoolConfig(size=-1)})
