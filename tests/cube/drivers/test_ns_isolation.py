"""What a sandbox of the ns driver can and cannot see or touch, checked from inside through the
real envd (as root, the strongest user in there)."""

from __future__ import annotations

import os
import socket

import pytest
import trio
from driver_kit import Spawner, connect, requires_ns, sh, start_background

from cube.drivers.base import SlotSpec
from cube.drivers.ns import KEEP_CAPS, NsDriver
from guest.protocol import GuestError

pytestmark = requires_ns

ROOT_ENTRIES = {
    "bin",
    "dev",
    "etc",
    "home",
    "lib",
    "lib64",
    "opt",
    "proc",
    "root",
    "run",
    "sbin",
    "tmp",
    "usr",
    "var",
}


async def test_the_root_holds_nothing_of_the_host_but_read_only_usr(
    ns: NsDriver, spawn: Spawner
) -> None:
    instance = await ns.start(SlotSpec("root"), spawn)
    async with connect(instance) as client:
        listing = await sh(client, "ls -A /")
        host_paths = await sh(client, f"ls -d /work {ns.state_dir} /old_root /mnt /srv 2>&1; true")
        usr = await sh(client, "touch /usr/cube-test 2>&1; echo $?")
        etc = await sh(
            client,
            "cat /etc/passwd /etc/hostname; find /tmp /home/user /dev/shm -mindepth 1 | wc -l",
        )
        dev = await sh(client, "ls /dev | tr '\\n' ' '")
        umask = await sh(client, "umask", user="user")
    assert set(listing.stdout.split()) <= ROOT_ENTRIES | {"lib32", "libx32"}
    assert host_paths.stdout.count("No such file or directory") == 5
    assert umask.stdout.strip() == "0022"
    assert "Read-only file system" in usr.stdout
    assert "user:x:1000:1000:user:/home/user:/bin/bash" in etc.stdout
    assert "cube-root" in etc.stdout and etc.stdout.split()[-1] == "0"
    assert set(dev.stdout.split()) == {
        "full", "null", "random", "urandom", "zero", "tty", "ptmx", "pts", "shm", "fd",
        "stdin", "stdout", "stderr",
    }  # fmt: skip
    await ns.stop(instance)


async def test_two_sandboxes_see_neither_each_others_files_nor_processes(
    ns: NsDriver, spawn: Spawner
) -> None:
    a = await ns.start(SlotSpec("iso-a"), spawn)
    b = await ns.start(SlotSpec("iso-b"), spawn)
    async with connect(a) as client_a, connect(b) as client_b:
        await sh(
            client_a,
            "echo secret > /home/user/a-secret; echo secret > /tmp/a-secret; echo s > /dev/shm/a-secret",
        )
        await start_background(client_a, "exec sleep 4242")
        files = await sh(client_b, "find /home/user /tmp /dev/shm /run/cube -mindepth 1")
        processes = await sh(client_b, "ps -eo args")
        mine = await sh(client_a, "ps -eo args")
    assert files.stdout.split() == ["/run/cube/envd.sock"]
    assert "sleep 4242" not in processes.stdout and "sleep 4242" in mine.stdout
    assert len(processes.stdout.splitlines()) <= 5  # header, init, envd, sh, ps
    await ns.stop(a)
    await ns.stop(b)


async def test_a_sandbox_can_neither_see_nor_signal_host_processes(
    ns: NsDriver, spawn: Spawner
) -> None:
    victim = await spawn(["sleep", "600"])
    instance = await ns.start(SlotSpec("signals"), spawn)
    async with connect(instance) as client:
        seen = await sh(
            client, f"test -e /proc/{victim.pid} && echo visible; kill -9 {victim.pid}; echo $?"
        )
        everything = await sh(client, "ps -e | wc -l")
        assert seen.stdout.split()[-1] != "0"  # kill failed
        assert "visible" not in seen.stdout
        assert int(everything.stdout) <= 6  # header, init, envd, sh, ps, wc
        # root in the sandbox kills every process it can see: envd with the rest, so the
        # channel closes and the sandbox ends, while the host's process lives on
        with pytest.raises(GuestError):
            await sh(client, "kill -9 -1; sleep 5")
    with trio.fail_after(5):
        await spawn.handle(instance.pid).wait()
    assert victim.running
    victim.send_signal(9)
    await victim.wait()
    await ns.stop(instance)


async def test_the_hostname_is_the_sandboxes_own(ns: NsDriver, spawn: Spawner) -> None:
    instance = await ns.start(SlotSpec("named"), spawn)
    async with connect(instance) as client:
        result = await sh(client, "hostname; hostname other 2>&1; hostname")
    assert result.stdout.splitlines()[0] == "cube-named"
    assert result.stdout.splitlines()[-1] == "cube-named"  # no CAP_SYS_ADMIN to change it
    assert socket.gethostname() != "cube-named"
    await ns.stop(instance)


async def test_root_inside_has_a_bounded_capability_set_and_cannot_remount_or_write_sysctls(
    ns: NsDriver, spawn: Spawner
) -> None:
    instance = await ns.start(SlotSpec("caps"), spawn)
    async with connect(instance) as client:
        caps = await sh(client, "grep CapBnd /proc/self/status")
        mount = await sh(client, "mount -t tmpfs x /tmp 2>&1; echo $?")
        sysctl = await sh(client, "echo 1 > /proc/sys/kernel/sysrq 2>&1; echo $?")
        netadmin = await sh(client, "ip addr add 10.99.7.7/16 dev eth0 2>&1; echo $?")
        mknod = await sh(client, "mknod /tmp/disk b 254 0 2>&1; echo $?")
    assert int(caps.stdout.split()[1], 16) == sum(1 << cap for cap in KEEP_CAPS)
    for result in (mount, sysctl, netadmin, mknod):
        assert result.stdout.split()[-1] != "0", result
    await ns.stop(instance)


async def test_a_sandbox_cannot_reach_host_loopback_or_abstract_sockets(
    ns: NsDriver, spawn: Spawner
) -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0cube-test-{os.getpid()}")
    abstract.listen()
    probe = (
        "import socket, sys\n"
        "for family, address in ((socket.AF_INET, ('127.0.0.1', int(sys.argv[1]))), (socket.AF_UNIX, sys.argv[2])):\n"
        "    s = socket.socket(family)\n"
        "    s.settimeout(2)\n"
        "    try:\n"
        "        s.connect(address); print('reached')\n"
        "    except OSError as exc:\n"
        "        print('refused', exc.errno)\n"
    )
    instance = await ns.start(SlotSpec("loopback"), spawn)
    try:
        async with connect(instance) as client:
            result = await sh(
                client,
                f"python3 -c \"$(cat <<'EOF'\n{probe}EOF\n)\" {tcp.getsockname()[1]} @cube-test-{os.getpid()}",
            )
        assert "reached" not in result.stdout, result
        assert result.stdout.count("refused") == 2, result
    finally:
        tcp.close()
        abstract.close()
        await ns.stop(instance)


async def test_the_host_reaches_a_sandbox_over_the_bridge_but_another_sandbox_does_not(
    ns: NsDriver, spawn: Spawner
) -> None:
    """Host -> sandbox is routed over the bridge whatever the nft policy does (sandbox -> host
    is the policy's to allow, so it is not tested here); sandbox -> sandbox stops at the
    bridge because their ports are isolated."""
    a = await ns.start(SlotSpec("net-a"), spawn)
    b = await ns.start(SlotSpec("net-b"), spawn)
    assert a.ip is not None
    listen = "python3 -c 'import socket,time; s=socket.socket(); s.bind((\"\",7777)); s.listen(); time.sleep(60)'"
    try:
        async with connect(a) as client_a, connect(b) as client_b:
            addr = await sh(client_a, "ip -4 -o addr show eth0; ip route")
            await start_background(client_a, listen)
            await connect_when_listening(a.ip, 7777)
            neighbour = await sh(
                client_b,
                "python3 -c 'import socket,sys; socket.create_connection((sys.argv[1], 7777), "
                f'timeout=1); print("connected")\' {a.ip} 2>&1 | tail -1',
            )
        assert f"{a.ip}/16" in addr.stdout and f"default via {ns.gateway}" in addr.stdout
        with open("/proc/net/fib_trie") as f:
            assert ns.gateway in f.read()  # the bridge holds the gateway address
        assert "connected" not in neighbour.stdout  # bridge ports are isolated from each other
    finally:
        await ns.stop(a)
        await ns.stop(b)


async def connect_when_listening(host: str, port: int) -> None:
    """Connect from the host, retrying while the sandbox's server is still starting."""
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return


async def test_a_login_shell_is_lean(ns: NsDriver, spawn: Spawner) -> None:
    instance = await ns.start(SlotSpec("profile"), spawn)
    timing = (
        "import subprocess, time\n"
        "t = time.perf_counter()\n"
        "for _ in range(10): subprocess.run(['/bin/bash', '-l', '-c', 'true'], check=True)\n"
        "print((time.perf_counter() - t) * 100)\n"
    )
    async with connect(instance) as client:
        result = await sh(client, f'python3 -c "{timing}"', user="user")
        path = await sh(client, "bash -l -c 'echo $PATH'", user="user")
    per_shell_ms = float(result.stdout)
    print(f"bash -l -c true inside: {per_shell_ms:.1f} ms")
    assert per_shell_ms < 50
    assert "/usr/bin" in path.stdout
    await ns.stop(instance)


async def test_the_home_is_writable_by_user_and_limited_to_disk_mb(
    ns: NsDriver, spawn: Spawner
) -> None:
    instance = await ns.start(SlotSpec("disk", disk_mb=8), spawn)
    async with connect(instance) as client:
        ok = await sh(
            client, "echo hi > ~/note && cat ~/note && stat -c %U /home/user", user="user"
        )
        full = await sh(
            client, "dd if=/dev/zero of=/home/user/big bs=1M count=20 2>&1; echo $?", user="user"
        )
    assert ok.stdout.split() == ["hi", "user"]
    assert "No space left on device" in full.stdout and full.stdout.split()[-1] != "0"
    await ns.stop(instance)


async def test_the_venv_packages_are_mounted_read_only_for_envd_only(
    ns: NsDriver, spawn: Spawner
) -> None:
    instance = await ns.start(SlotSpec("pkgs"), spawn)
    async with connect(instance) as client:
        listing = await sh(
            client, "ls /opt/cube/src; touch /opt/cube/site-packages/x 2>&1; echo $?"
        )
    assert set(listing.stdout.split()[:3]) == {"actors", "guest", "supervisors"}
    assert "Read-only file system" in listing.stdout
    await ns.stop(instance)


async def test_a_slot_without_network_has_only_loopback(ns: NsDriver, spawn: Spawner) -> None:
    instance = await ns.start(SlotSpec("offline", network=False), spawn)
    assert instance.ip is None and instance.host_if is None
    async with connect(instance) as client:
        links = await sh(client, "ls /sys/class/net 2>/dev/null || cat /proc/net/dev")
        loopback = await sh(
            client,
            'python3 -c \'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(); socket.create_connection(s.getsockname()); print("lo up")\'',
        )
    assert "eth0" not in links.stdout and "lo" in links.stdout
    assert loopback.stdout.strip() == "lo up"
    await ns.stop(instance)
