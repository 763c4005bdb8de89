"""A small private network for the nft policy tests, built from real namespaces.

    host ── bridge cbt<pid>br 10.231.N.1/24 ──┬── veth cbt<pid>a ── netns cbt-<pid>-a  10.231.N.2
                                              └── veth cbt<pid>b ── netns cbt-<pid>-b  10.231.N.3
    host ── veth cbt<pid>i 198.18.N.254/24 ───── netns cbt-<pid>-net 198.18.N.1 and .2 ("the internet")
                                                                     172.31.N.1 (a private LAN host)

``add_sandbox`` builds a third sandbox (c, 10.231.N.4) for tests that misconfigure it.

Every name carries the test process's pid, so a later run can remove what a killed run
left behind (``sweep_stale``) without touching a concurrent run. Nothing here sends a
packet anywhere but loopback and these namespaces.

Sockets are put into a namespace by creating them there: ``socket_in_netns`` switches
the calling thread into the netns for the one ``socket()`` call and straight back, and the
socket keeps its namespace for life. So servers and probes are plain trio sockets in this
process: no helper processes, no start-up latency.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import trio
from netns_kit import sh, socket_in_netns

from cube.netpolicy import EgressPolicy, NftConfig, PortMap, SandboxNet

DENIED_TIMEOUT = 0.3  # seconds a probe waits before calling a destination unreachable



@dataclass(frozen=True)
class Topology:
    """Names and addresses of the test network."""

    pid: int

    @property
    def n(self) -> int:
        return self.pid % 250

    @property
    def tag(self) -> str:
        return f"cbt{self.pid}"

    @property
    def bridge(self) -> str:
        return f"cbt{self.pid}br"

    @property
    def subnet(self) -> str:
        return f"10.231.{self.n}.0/24"

    @property
    def gateway(self) -> str:
        return f"10.231.{self.n}.1"

    @property
    def uplink(self) -> str:
        return f"cbt{self.pid}i"

    @property
    def uplink_ip(self) -> str:
        return f"198.18.{self.n}.254"

    @property
    def inet(self) -> str:
        return f"cbt-{self.pid}-net"

    def internet(self, host: int) -> str:
        return f"198.18.{self.n}.{host}"

    @property
    def private(self) -> str:
        """An address in a blocked private range (172.16.0.0/12), on the internet netns."""
        return f"172.31.{self.n}.1"

    def netns(self, name: str) -> str:
        return f"cbt-{self.pid}-{name}"

    def host_if(self, name: str) -> str:
        return f"cbt{self.pid}{name}"

    def ip(self, name: str) -> str:
        return f"10.231.{self.n}.{2 + 'abc'.index(name)}"

    def config(self, **overrides: object) -> NftConfig:
        fields: dict[str, object] = {"tag": self.tag, "bridge": self.bridge, "subnet": self.subnet}
        fields.update(overrides)
        return NftConfig(**fields)  # type: ignore[arg-type]

    def sandbox(
        self,
        name: str,
        policy: EgressPolicy | None = None,
        ports: tuple[PortMap, ...] = (),
    ) -> SandboxNet:
        return SandboxNet(
            sandbox_id=f"sbx{name}",
            ip=self.ip(name),
            host_if=self.host_if(name),
            policy=policy or EgressPolicy(),
            ports=ports,
        )


def add_sandbox(topo: Topology, name: str) -> None:
    """A sandbox netns with its veth on the bridge, as the ns driver makes one."""
    ns, veth = topo.netns(name), topo.host_if(name)
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "link", "set", veth, "master", topo.bridge, "up")
    sh("ip", "-n", ns, "addr", "add", f"{topo.ip(name)}/24", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "-n", ns, "route", "add", "default", "via", topo.gateway)


def remove_sandbox(topo: Topology, name: str) -> None:
    """Delete a sandbox netns; its veth goes with it."""
    sh("ip", "netns", "del", topo.netns(name), check=False)
    sh("ip", "link", "del", topo.host_if(name), check=False)


def build(topo: Topology) -> None:
    """Create the bridge, sandboxes a and b and the internet namespace."""
    br = topo.bridge
    sh("ip", "link", "add", br, "type", "bridge")
    sh("ip", "addr", "add", f"{topo.gateway}/24", "dev", br)
    sh("ip", "link", "set", br, "up")
    for name in "ab":
        add_sandbox(topo, name)
    ns = topo.inet
    sh("ip", "netns", "add", ns)
    sh("ip", "link", "add", topo.uplink, "type", "veth", "peer", "name", "eth0", "netns", ns)
    sh("ip", "addr", "add", f"{topo.uplink_ip}/24", "dev", topo.uplink)
    sh("ip", "link", "set", topo.uplink, "up")
    for host in (1, 2):
        sh("ip", "-n", ns, "addr", "add", f"{topo.internet(host)}/24", "dev", "eth0")
    sh("ip", "-n", ns, "addr", "add", f"{topo.private}/24", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", ns, "link", "set", "lo", "up")
    # The private LAN is on-link behind the uplink; the route goes when the veth does.
    sh("ip", "route", "add", f"172.31.{topo.n}.0/24", "dev", topo.uplink)


def tear_down(pid: int) -> None:
    """Remove everything a run with this pid created; quiet about what is already gone."""
    topo = Topology(pid)
    for name in ("a", "b", "c", "net"):
        sh("ip", "netns", "del", topo.netns(name), check=False)
    links = (topo.bridge, topo.uplink, *(topo.host_if(name) for name in "abc"))
    for link in links:
        sh("ip", "link", "del", link, check=False)
    for family in ("inet", "bridge"):
        sh("nft", "delete", "table", family, f"cube-{topo.tag}", check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> None:
    """Tear down what earlier, killed runs left (their pid is gone)."""
    pids: set[int] = set()
    for line in sh("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith("cbt-") and name.count("-") == 2:
            with contextlib.suppress(ValueError):
                pids.add(int(name.split("-")[1]))
    links = json.loads(sh("ip", "-j", "link", "show").stdout or "[]")
    for link in links:
        name = link.get("ifname", "")
        if name.startswith("cbt") and name.endswith("br") and name[3:-2].isdigit():
            pids.add(int(name[3:-2]))
    for pid in pids:
        if pid != os.getpid() and not _alive(pid):
            tear_down(pid)


@contextlib.contextmanager
def network() -> Iterator[Topology]:
    """The test network for this process, removed afterwards whatever happens."""
    sweep_stale()
    topo = Topology(os.getpid())
    tear_down(topo.pid)
    try:
        build(topo)
        yield topo
    finally:
        tear_down(topo.pid)


# ------------------------------------------------------------------ servers and probes


async def serve(
    netns: str | None,
    address: str,
    port: int,
    name: str,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A TCP server in ``netns``: says ``<name> <peer address>``, then echoes lines.

    Reports the bound port through ``task_status`` (pass port 0 for any).
    """
    sock = socket_in_netns(netns)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(64)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    task_status.started(sock.getsockname()[1])

    async def handle(stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()[0]
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(f"{name} {peer}\n".encode())
            async for data in stream:
                await stream.send_all(data)

    await trio.serve_listeners(handle, [listener])


async def serve_udp(
    netns: str | None,
    address: str,
    port: int,
    name: str,
    received: list[str] | None = None,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A UDP server in ``netns`` answering every datagram with ``<name> <peer address>``.

    Appends each datagram's text to ``received`` if given.
    """
    sock = trio.socket.from_stdlib_socket(socket_in_netns(netns, socket.SOCK_DGRAM))
    await sock.bind((address, port))
    task_status.started(sock.getsockname()[1])
    with sock:
        while True:
            data, peer = await sock.recvfrom(2048)
            if received is not None:
                received.append(data.decode(errors="replace"))
            await sock.sendto(f"{name} {peer[0]}\n".encode(), peer)


async def send_udp(netns: str, address: str, port: int, text: str, source: str) -> None:
    """Send one datagram from ``netns`` with the given source address; expect nothing."""
    sock = trio.socket.from_stdlib_socket(socket_in_netns(netns, socket.SOCK_DGRAM))
    with sock:
        await sock.bind((source, 0))
        await sock.sendto(text.encode(), (address, port))


async def probe(
    netns: str | None,
    address: str,
    port: int,
    *,
    source: str | None = None,
    timeout: float = 3.0,
) -> str:
    """What a TCP client in ``netns`` gets from ``address:port``: the server's greeting,
    an errno name (ECONNREFUSED, EHOSTUNREACH, ...) or ``timeout``.

    The default timeout is for connections expected to work (slow only when they fail);
    checks for denial pass ``DENIED_TIMEOUT``."""
    sock = trio.socket.from_stdlib_socket(socket_in_netns(netns))
    with sock:
        if source is not None:
            await sock.bind((source, 0))
        with trio.move_on_after(timeout):
            try:
                await sock.connect((address, port))
                return (await _read_line(sock)) or "closed"
            except OSError as exc:
                return errno.errorcode.get(exc.errno or 0, str(exc))
    return "timeout"


async def probe_udp(netns: str | None, address: str, port: int, timeout: float = 3.0) -> str:
    """The answer a UDP client in ``netns`` gets from ``address:port``, or ``timeout``."""
    sock = trio.socket.from_stdlib_socket(socket_in_netns(netns, socket.SOCK_DGRAM))
    with sock, trio.move_on_after(timeout):
        try:
            await sock.sendto(b"ping", (address, port))
            data, _ = await sock.recvfrom(2048)
            return data.decode().strip()
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, str(exc))
    return "timeout"


async def _read_line(sock: trio.socket.SocketType) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await sock.recv(256)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


class Conversation:
    """An open TCP connection from a namespace, to test what happens to a live flow."""

    def __init__(self, sock: trio.socket.SocketType, greeting: str) -> None:
        self.sock = sock
        self.greeting = greeting

    @classmethod
    async def open(cls, netns: str, address: str, port: int) -> Conversation:
        sock = trio.socket.from_stdlib_socket(socket_in_netns(netns))
        with trio.fail_after(2):
            await sock.connect((address, port))
            greeting = await _read_line(sock)
        return cls(sock, greeting)

    async def echo(self, text: str, timeout: float = DENIED_TIMEOUT) -> str | None:
        """The server's echo of ``text``, or None if none came back within ``timeout``."""
        with trio.move_on_after(timeout):
            try:
                await self.sock.send(text.encode() + b"\n")
                return await _read_line(self.sock)
            except OSError:
                return None
        return None

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    """A TCP port nothing on the host listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
