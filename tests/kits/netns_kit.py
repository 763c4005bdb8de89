"""Real network namespaces for tests: run commands, and open sockets inside a namespace.

Sockets are put into a namespace by creating them there: ``socket_in_netns`` switches the
calling thread into the netns for the one ``socket()`` call and straight back, and the
socket keeps its namespace for life. So servers and probes are plain trio sockets in the
test process: no helper processes, no start-up latency.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run one command (ip, nft, ...), raising with its stderr if it fails."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def socket_in_netns(
    netns: str | None, kind: socket.SocketKind = socket.SOCK_STREAM
) -> socket.socket:
    """A new IPv4 socket that lives in ``netns`` (None: the host's namespace)."""
    if netns is None:
        return socket.socket(socket.AF_INET, kind)
    with open("/proc/thread-self/ns/net") as own, open(f"/run/netns/{netns}") as target:
        _setns(target.fileno())
        try:
            return socket.socket(socket.AF_INET, kind)
        finally:
            _setns(own.fileno())
