"""The node on the ns driver, as root: isolation, network policy, limits, faults, leaks.

The "internet" is a network namespace of this test behind a veth on 198.18.77.0/24 (a
benchmarking range, not private, so the default policy lets sandboxes reach it through the
node's NAT). Nothing leaves this machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
from netns_kit import sh, socket_in_netns
from node_kit import envd_processes, node_config

from cube.netpolicy import EgressPolicy
from cube.node import Node, SandboxHandle, open_node
from cube.registry import NotFound
from cube.store import Get, Phase

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not sys.platform.startswith("linux"), reason="the ns driver needs root"
)

NET = "198.18.77"


@pytest.fixture(scope="module")
def internet() -> Iterator[str]:
    """A namespace with two addresses, NET.1 and NET.2, reached from the host by a veth."""
    name = f"cube-t-inet-{os.getpid()}"
    host_if = f"ctin{os.getpid() % 100000}"
    remove_stale_internets()
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "inet0", "netns", name)
        sh("ip", "addr", "add", f"{NET}.254/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        for cmd in (
            ["ip", "addr", "add", f"{NET}.1/24", "dev", "inet0"],
            ["ip", "addr", "add", f"{NET}.2/24", "dev", "inet0"],
            ["ip", "link", "set", "inet0", "up"],
            ["ip", "link", "set", "lo", "up"],
            ["ip", "route", "add", "default", "via", f"{NET}.254"],
        ):
            sh("ip", "netns", "exec", name, *cmd)
        yield name
    finally:
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", name, check=False)


def remove_stale_internets() -> None:
    """Remove what a killed earlier run of this module left (its veth would own NET)."""
    for line in sh("ip", "-o", "link", "show").stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0]
        if link.startswith("ctin") and not os.path.exists(f"/proc/{link[4:]}"):
            sh("ip", "link", "del", link, check=False)
    for line in sh("ip", "netns", "list").stdout.splitlines():
        netns = line.split()[0]
        if netns.startswith("cube-t-inet-") and not os.path.exists(f"/proc/{netns[12:]}"):
            sh("ip", "netns", "del", netns, check=False)


async def serve(nursery: trio.Nursery, netns: str | None, address: str, port: int) -> None:
    """Answer every TCP connection to ``address:port`` in ``netns`` with "hello"."""
    sock = trio.socket.from_stdlib_socket(socket_in_netns(netns))
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
    await sock.bind((address, port))
    sock.listen(16)

    async def loop() -> None:
        with sock:
            while True:
                conn, _ = await sock.accept()
                with conn:
                    await conn.send(b"hello\n")

    nursery.start_soon(loop)


async def reaches(sbx: SandboxHandle, address: str, port: int) -> bool:
    """Whether the sandbox can open a TCP connection to ``address:port`` (1 s budget)."""
    probe = f"timeout 1 bash -c 'exec 3<>/dev/tcp/{address}/{port} && head -c5 <&3'"
    result = await sbx.run(probe)
    return result.exit_code == 0 and result.stdout == "hello"


@pytest.fixture
async def ns_node(state_dir: Path) -> AsyncIterator[Node]:
    config = node_config(state_dir, pool_size=2, driver="ns")
    async with open_node(config) as node:
        yield node
        policy = node.services.policy
    assert node.services.driver.leftovers() == [], "the ns driver left resources behind"
    assert await policy.leftovers(()) == [], "nft objects left behind"
    assert envd_processes(state_dir) == []


async def test_a_sandbox_runs_as_user_in_its_own_namespaces(ns_node: Node) -> None:
    sbx = await ns_node.create("base")
    result = await sbx.run("id -un; hostname; ls /proc | grep -c '^[0-9]'")
    user, hostname, processes = result.stdout.split()
    assert user == "user"
    assert hostname.endswith(sbx.id)
    assert int(processes) < 10, "a sandbox must see only its own processes"


async def test_sandboxes_cannot_see_each_others_files_or_processes(ns_node: Node) -> None:
    a = await ns_node.create("base")
    b = await ns_node.create("base")
    await a.run("echo secret > /home/user/a.txt; sleep 30 & echo started")
    assert (await b.run("cat /home/user/a.txt")).exit_code != 0
    assert "sleep 30" not in (await b.run("ps ax")).stdout
    assert (await b.run("ls /tmp/cube* /work 2>&1; true")).stdout.count("No such file") >= 1


async def test_a_sandbox_cannot_signal_host_processes(ns_node: Node) -> None:
    sbx = await ns_node.create("base")
    result = await sbx.run(f"kill -0 {os.getpid()}")
    assert result.exit_code != 0


async def test_a_sandbox_reaches_the_internet_through_nat(ns_node: Node, internet: str) -> None:
    async with trio.open_nursery() as nursery:
        await serve(nursery, internet, f"{NET}.1", 8080)
        sbx = await ns_node.create("base")
        assert await reaches(sbx, f"{NET}.1", 8080)
        nursery.cancel_scope.cancel()


async def test_policy_allows_only_allow_out_without_internet_access(
    ns_node: Node, internet: str
) -> None:
    async with trio.open_nursery() as nursery:
        await serve(nursery, internet, f"{NET}.1", 8081)
        await serve(nursery, internet, f"{NET}.2", 8081)
        policy = EgressPolicy(allow_internet=False, allow_out=(f"{NET}.1/32",))
        sbx = await ns_node.create("base", network=policy)
        assert await reaches(sbx, f"{NET}.1", 8081)
        assert not await reaches(sbx, f"{NET}.2", 8081)
        nursery.cancel_scope.cancel()


async def test_deny_out_blocks_an_address_and_allow_beats_deny(ns_node: Node, internet: str) -> None:
    async with trio.open_nursery() as nursery:
        await serve(nursery, internet, f"{NET}.1", 8082)
        await serve(nursery, internet, f"{NET}.2", 8082)
        policy = EgressPolicy(deny_out=(f"{NET}.0/24",), allow_out=(f"{NET}.2/32",))
        sbx = await ns_node.create("base", network=policy)
        assert not await reaches(sbx, f"{NET}.1", 8082)
        assert await reaches(sbx, f"{NET}.2", 8082)
        nursery.cancel_scope.cancel()


async def test_a_sandbox_cannot_reach_host_services(ns_node: Node) -> None:
    async with trio.open_nursery() as nursery:
        await serve(nursery, None, "0.0.0.0", 8083)
        sbx = await ns_node.create("base")
        gateway = sbx.info.instance.ip.rsplit(".", 2)[0] + ".0.1"
        assert not await reaches(sbx, gateway, 8083)
        assert not await reaches(sbx, "127.0.0.1", 8083)
        nursery.cancel_scope.cancel()


async def test_a_sandbox_cannot_reach_another_sandbox(ns_node: Node) -> None:
    a = await ns_node.create("base")
    b = await ns_node.create("base")
    server = (
        "python3 -c \"import socket; s=socket.socket(); "
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('0.0.0.0', 8084)); "
        "s.listen(); c,_=s.accept(); c.send(b'hello')\" > /dev/null 2>&1 &"
    )
    await a.run(server)
    await trio.sleep(0.3)
    assert await reaches(a, "127.0.0.1", 8084), "the server must be reachable from inside"
    await a.run(server)
    await trio.sleep(0.3)
    assert not await reaches(b, a.info.instance.ip, 8084)


async def test_a_fork_bomb_stops_at_the_pids_limit(ns_node: Node) -> None:
    sbx = await ns_node.create("base")
    await sbx.files.write("bomb.py", FORK_BOMB)
    result = await sbx.run("python3 bomb.py", timeout=60)
    forked = int(result.stdout.split()[-1])
    assert result.stdout.startswith("EAGAIN") and forked < 256
    assert (await sbx.run("echo alive")).stdout == "alive\n"


FORK_BOMB = """
import os, time
n = 0
while True:
    try:
        pid = os.fork()
    except OSError:
        print("EAGAIN", n)
        break
    if pid == 0:
        os.close(1); os.close(2); time.sleep(30); os._exit(0)
    n += 1
"""


async def test_a_memory_hog_is_killed_at_the_limit_and_reported(ns_node: Node) -> None:
    sbx = await ns_node.create("base")
    await sbx.files.write("hog.py", "b = bytearray(2 * 1024 ** 3)\nprint('survived')\n")
    result = await sbx.run("python3 hog.py", timeout=60)
    assert result.exit_code != 0 and "survived" not in result.stdout
    usage = ns_node.services.driver.usage(sbx.info.instance)
    assert usage.oom_kills >= 1
    assert (await sbx.run("echo alive")).stdout == "alive\n"


async def test_killing_the_sandbox_init_marks_it_crashed_and_cleans_up(ns_node: Node) -> None:
    sbx = await ns_node.create("base")
    os.kill(sbx.info.instance.pid, signal.SIGKILL)
    with trio.fail_after(10):
        while (await ns_node.services.store.call(Get(sbx.id))).state != Phase.CRASHED:
            await trio.sleep(0.05)
    with pytest.raises(NotFound):
        await ns_node.get(sbx.id)
    slot = sbx.info.instance.slot_id
    with trio.fail_after(10):
        while ns_node.services.driver.leftovers([slot]):
            await trio.sleep(0.05)


SURVIVOR = """
import os, sys, trio
sys.path.insert(0, {tests!r})
from node_kit import node_config
from cube.node import open_node

async def main():
    async with open_node(node_config({state!r}, pool_size=0, driver="ns")) as node:
        sbx = await node.create("base")
        await sbx.run("echo kept > /home/user/state.txt")
        print(sbx.id, flush=True)
        os.kill(os.getpid(), 9)

trio.run(main)
"""


async def test_sandboxes_survive_a_killed_service_and_are_re_adopted(state_dir: Path) -> None:
    script = SURVIVOR.format(tests=str(Path(__file__).parent), state=str(state_dir))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    id = done.stdout.strip()
    async with open_node(node_config(state_dir, pool_size=0, driver="ns")) as node:
        sbx = await node.get(id)
        assert (await sbx.run("cat /home/user/state.txt")).stdout == "kept\n"
        await sbx.kill()
        driver = node.services.driver
    assert driver.leftovers() == []
