"""A minimal rtnetlink client: the few link, address and route operations the ns driver needs.

The ns driver wires every sandbox to the host bridge with a handful of netlink messages
instead of several ``ip`` processes (docs/drivers.md): the whole network of a slot costs well
under a millisecond. The sandbox's init (``ns_init``) imports this module too, before anything
else exists, so it uses only ``_socket``, ``struct`` and ``os``: the public ``socket`` module
pulls in ``enum`` and ``selectors`` and would add milliseconds to every sandbox start.

Every request is acknowledged (``NLM_F_ACK``); a kernel error raises ``NetlinkError`` with
the errno and the operation that failed.
"""

from __future__ import annotations

import _socket
import errno
import os
import struct

__all__ = [
    "Netlink",
    "NetlinkError",
    "ipv4_bytes",
    "link_index",
]

AF_NETLINK = 16
AF_INET = 2
NETLINK_ROUTE = 0
SOCK_RAW = 3
SOCK_CLOEXEC = 0o2000000

RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_NEWADDR = 20
RTM_NEWROUTE = 24

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000

IFF_UP = 0x1
IFLA_IFNAME = 3
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_INFO_SLAVE_KIND = 4
IFLA_INFO_SLAVE_DATA = 5
VETH_INFO_PEER = 1
IFLA_BRPORT_ISOLATED = 33

IFA_ADDRESS = 1
IFA_LOCAL = 2
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # rtmsg: family, dst/src len, tos, table, proto, scope, type, flags
_ERROR = struct.Struct("=i")


class NetlinkError(OSError):
    """The kernel refused a netlink request; ``errno`` says why, the message says what."""


def ipv4_bytes(address: str) -> bytes:
    """The four bytes of a dotted IPv4 address."""
    return bytes(int(part) for part in address.split("."))


def link_index(name: str) -> int:
    """The index of interface ``name`` in this process's network namespace, 0 if absent."""
    try:
        return int(_socket.if_nametoindex(name))
    except OSError:
        return 0


def _attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute (type-length-value), padded to four bytes."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _nested(kind: int, *attrs: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(attrs))


def _name(kind: int, value: str) -> bytes:
    return _attr(kind, value.encode() + b"\0")


def _u32(kind: int, value: int) -> bytes:
    return _attr(kind, struct.pack("=I", value))


class Netlink:
    """An rtnetlink socket bound to the network namespace current when it was opened.

    The socket stays in that namespace even after the opening thread moves elsewhere, which
    is how the init creates a veth in the host namespace after it has entered its own.
    Use as a context manager, or call ``close``.
    """

    def __init__(self) -> None:
        self._sock = _socket.socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._seq = 0

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()

    def request(self, what: str, kind: int, flags: int, body: bytes) -> None:
        """Send one request and wait for its acknowledgement; raise ``NetlinkError``."""
        self._seq += 1
        header = _HEADER.pack(
            _HEADER.size + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, self._seq, 0
        )
        self._sock.send(header + body)
        while True:
            data = self._sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(data):
                length, msg_type, _, seq, _ = _HEADER.unpack_from(data, offset)
                if msg_type == NLMSG_ERROR and seq == self._seq:
                    (code,) = _ERROR.unpack_from(data, offset + _HEADER.size)
                    if code:
                        raise NetlinkError(-code, f"{what}: {os.strerror(-code)}")
                    return
                offset += max(length, _HEADER.size) + (-length % 4)

    # links ------------------------------------------------------------------------------------

    def create_bridge(self, name: str) -> bool:
        """Create bridge ``name``, up; False if it already exists."""
        body = _IFINFO.pack(0, 0, 0, IFF_UP, IFF_UP)
        body += _name(IFLA_IFNAME, name) + _nested(IFLA_LINKINFO, _name(IFLA_INFO_KIND, "bridge"))
        try:
            self.request(f"create bridge {name}", RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)
        except NetlinkError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise
        return True

    def create_veth(
        self,
        name: str,
        peer: str,
        *,
        peer_netns_fd: int,
        master: int = 0,
    ) -> None:
        """Create veth ``name`` here, up (and enslaved to ``master`` if given), with its
        peer ``peer`` created directly in the namespace ``peer_netns_fd`` (so the peer's name
        never has to be free in this namespace)."""
        peer_body = _IFINFO.pack(0, 0, 0, 0, 0) + _name(IFLA_IFNAME, peer)
        peer_body += _u32(IFLA_NET_NS_FD, peer_netns_fd)
        info = _nested(
            IFLA_LINKINFO,
            _name(IFLA_INFO_KIND, "veth"),
            _nested(IFLA_INFO_DATA, _attr(VETH_INFO_PEER, peer_body)),
        )
        body = _IFINFO.pack(0, 0, 0, IFF_UP, IFF_UP) + _name(IFLA_IFNAME, name) + info
        if master:
            body += _u32(IFLA_MASTER, master)
        self.request(f"create veth {name}", RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    def configure_bridge_port(self, name: str, *, alias: str, isolated: bool = True) -> None:
        """Label bridge port ``name`` (``ip link`` shows the alias) and isolate it: an
        isolated port exchanges frames only with non-isolated ports (the bridge itself),
        never with another sandbox. Addressed by name, so it works from any namespace the
        socket's namespace can see; the kernel ignores both settings at creation."""
        slave = _attr(IFLA_BRPORT_ISOLATED, b"\1" if isolated else b"\0")
        info = _nested(
            IFLA_LINKINFO,
            _name(IFLA_INFO_SLAVE_KIND, "bridge"),
            _nested(IFLA_INFO_SLAVE_DATA, slave),
        )
        body = (
            _IFINFO.pack(0, 0, 0, 0, 0)
            + _name(IFLA_IFNAME, name)
            + _name(IFLA_IFALIAS, alias)
            + info
        )
        self.request(f"configure bridge port {name}", RTM_NEWLINK, 0, body)

    def set_up(self, index: int) -> None:
        """Bring link ``index`` up."""
        body = _IFINFO.pack(0, 0, index, IFF_UP, IFF_UP)
        self.request(f"set link {index} up", RTM_NEWLINK, 0, body)

    def delete_link(self, name: str) -> bool:
        """Delete link ``name`` (a veth takes its peer along); False if there was none."""
        body = _IFINFO.pack(0, 0, 0, 0, 0) + _name(IFLA_IFNAME, name)
        try:
            self.request(f"delete link {name}", RTM_DELLINK, 0, body)
        except NetlinkError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                return False
            raise
        return True

    # addresses and routes ---------------------------------------------------------------------

    def add_address(self, index: int, address: str, prefix: int) -> bool:
        """Add IPv4 ``address/prefix`` to link ``index``; False if it is already there."""
        raw = ipv4_bytes(address)
        body = _IFADDR.pack(AF_INET, prefix, 0, RT_SCOPE_UNIVERSE, index)
        body += _attr(IFA_LOCAL, raw) + _attr(IFA_ADDRESS, raw)
        try:
            self.request(
                f"add address {address}/{prefix}", RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body
            )
        except NetlinkError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise
        return True

    def add_default_route(self, gateway: str) -> None:
        """Route everything via ``gateway`` in the main table."""
        body = _RTMSG.pack(
            AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
        )
        body += _attr(RTA_GATEWAY, ipv4_bytes(gateway))
        self.request(
            f"add default route via {gateway}", RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body
        )
