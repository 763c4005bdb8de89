"""The ns driver's envd zygote: a sandbox's envd forked from it is the envd an ``execve`` would
have made (same namespaces, cgroups, capabilities, pid 2 under pid 1), shares the zygote's
memory, ends the sandbox when it dies, and the zygote itself is replaced, refused to strangers,
stopped and cleaned up."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import trio
from driver_kit import Spawner, connect, requires_ns, sh

from cube.drivers.base import Instance, SlotSpec
from cube.drivers.ns import NsDriver
from guest import protocol as p

pytestmark = requires_ns

IDENTITY = (
    "Umask",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
    "Seccomp",
    "SigBlk",
    "SigIgn",
    "SigCgt",
)
NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "uts")


def envd_pid(instance: Instance) -> int:
    """envd's pid on the host: the only child of the sandbox's pid 1."""
    init = instance.extra["init_pid"]
    with open(f"/proc/{init}/task/{init}/children") as f:
        (child,) = f.read().split()
    return int(child)


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def cgroups(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


def identity(pid: int) -> dict[str, str]:
    found = {key: status(pid)[key] for key in IDENTITY}
    found["root"] = os.readlink(f"/proc/{pid}/root")
    found["cwd"] = os.readlink(f"/proc/{pid}/cwd")
    return found


def fd_target(pid: int, fd: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}")
    except FileNotFoundError:
        return ""  # closed meanwhile


def uss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return sum(
            int(line.split()[1])
            for line in f
            if line.startswith(("Private_Clean", "Private_Dirty"))
        )


async def test_envd_from_the_zygote_is_the_envd_execve_would_make(
    make_driver: Callable[..., Any], spawn: Spawner
) -> None:
    forked: NsDriver = make_driver(NsDriver)
    executed: NsDriver = make_driver(NsDriver, zygote=False)
    a = await forked.start(SlotSpec("forked"), spawn)
    b = await executed.start(SlotSpec("executed"), spawn)
    assert forked._zygote is not None and executed._zygote is None
    for instance in (a, b):
        async with connect(instance) as client:
            assert client.hello is not None and client.hello.pid == 2
            result = await sh(client, "id -un; cat /proc/2/stat | cut -d' ' -f4-6", user="user")
            # pid 2's parent is pid 1 and it leads its own session (pgrp 2, session 2)
            assert result.stdout.split() == ["user", "1", "2", "2"]
    pid_a, pid_b = envd_pid(a), envd_pid(b)
    assert identity(pid_a) == identity(pid_b)
    init = a.extra["init_pid"]
    for name in NAMESPACES:
        assert os.readlink(f"/proc/{pid_a}/ns/{name}") == os.readlink(f"/proc/{init}/ns/{name}")
    assert cgroups(pid_a) == cgroups(init) and cgroups(pid_b) == cgroups(b.extra["init_pid"])
    # stdio as an executed envd has it, and nothing the zygote holds (its socket, its peers)
    assert [fd_target(pid_a, fd) for fd in (0, 1, 2)] == [
        "/dev/null",
        a.extra["log"],
        a.extra["log"],
    ]
    zygote = forked._zygote.pid
    held = {fd_target(zygote, int(fd)) for fd in os.listdir(f"/proc/{zygote}/fd")}
    mine = {fd_target(pid_a, int(fd)) for fd in os.listdir(f"/proc/{pid_a}/fd")}
    assert not (held & mine) - {"/dev/null", ""}
    # the fork shares the zygote's pages: an executed envd keeps ~18 MB of its own
    assert uss_kb(pid_a) < 0.7 * uss_kb(pid_b)
    await forked.stop(a)
    await executed.stop(b)


async def test_the_code_kernel_starts_next_to_a_forked_envd(ns: NsDriver, spawn: Spawner) -> None:
    # envd finds its files inside (/opt/cube/src), not where the zygote imported them from
    instance = await ns.start(SlotSpec("kernel"), spawn)
    results = []
    execute = p.Execute(code="6 * 7")
    async with connect(instance) as client, client.stream("code.execute", execute) as remote:
        async for event, body in remote:
            if event == "result":
                results.append(body.text)
    assert results == ["42"]
    await ns.stop(instance)


async def test_a_killed_envd_ends_the_sandbox_with_its_signal(ns: NsDriver, spawn: Spawner) -> None:
    instance = await ns.start(SlotSpec("envd-dies"), spawn)
    os.kill(envd_pid(instance), signal.SIGKILL)
    with trio.fail_after(5):
        exit = await spawn.handle(instance.pid).wait()
    assert exit.returncode == 128 + signal.SIGKILL  # pid 1 reaped its child envd
    await ns.stop(instance)


async def test_a_dead_zygote_is_replaced_and_running_sandboxes_go_on(
    ns: NsDriver, spawn: Spawner
) -> None:
    first = await ns.start(SlotSpec("before"), spawn)
    old = ns._zygote.pid
    os.kill(old, signal.SIGKILL)
    with trio.fail_after(5):
        await spawn.handle(old).wait()
    async with connect(first) as client:
        assert (await sh(client, "echo alive")).stdout == "alive\n"
    second = await ns.start(SlotSpec("after"), spawn)
    assert ns._zygote.pid != old
    async with connect(second) as client:
        assert client.hello is not None and client.hello.pid == 2
    await ns.stop(first)
    await ns.stop(second)


async def test_the_zygote_refuses_a_process_that_is_not_a_sandbox_holder(
    ns: NsDriver, spawn: Spawner
) -> None:
    instance = await ns.start(SlotSpec("owner"), spawn)
    path = os.path.join(ns._zygote_dir, "sock")
    with socket.socket(socket.AF_UNIX) as stranger:  # root, but in the host's namespaces
        stranger.settimeout(5)
        stranger.connect(path)
        stranger.sendall(b"g")
        answer = stranger.recv(4096)
    assert answer.startswith(b"error")
    await ns.stop(instance)


async def test_close_stops_the_zygote_and_a_new_driver_cleans_up_a_stale_one(
    make_driver: Callable[..., Any], spawn: Spawner
) -> None:
    first: NsDriver = make_driver(NsDriver)
    instance = await first.start(SlotSpec("z"), spawn)
    await first.stop(instance)
    assert first.leftovers() == []  # its own running zygote is not a leftover
    zygote = first._zygote.pid
    later = NsDriver(first.state_dir)  # a restarted service on the same state dir
    stale = later.leftovers()
    assert any(f"process {zygote}:" in item for item in stale)
    assert any(item.startswith("directory ") and "zygote-" in item for item in stale)
    await later.cleanup()
    assert later.leftovers() == []
    assert not os.path.exists(f"/proc/{zygote}") or status(zygote)["State"].startswith("Z")
    second = await first.start(SlotSpec("z2"), spawn)  # first's zygote is gone: a new one
    await first.stop(second)
    await first.close()
    assert first._zygote is None and first.leftovers() == []
