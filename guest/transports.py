"""The byte streams envd can serve: a unix socket, AF_VSOCK, a character device, or stdio.

Listeners (unix, vsock) accept any number of host connections, each served as its own channel;
a host that reconnects simply connects again. A character device (a virtio-console port such
as ``/dev/virtio-ports/<name>`` or ``/dev/vtcon/<name>``) and stdio are one stream for envd's
whole life: there is no accept and, for the device, no end-of-file when the host reconnects,
so the protocol's hello resynchronises sessions instead (see `guest.channel`).
"""

import contextlib
import errno
import os
import socket
import stat
import sys
import termios
import tty

import trio


async def open_unix_listener(path: str) -> trio.SocketListener:
    """Listen on a unix socket at ``path``, replacing a stale socket left there."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    # Bind under a temporary name and rename once listening: whoever sees the path can connect.
    staging = f"{path}.{os.getpid()}.tmp"
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(staging)
        os.chmod(staging, 0o660)
        sock.listen(128)
        os.rename(staging, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
    return trio.SocketListener(sock)


def vsock_available() -> bool:
    """Whether this kernel lets us open an AF_VSOCK socket."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        return False
    try:
        socket.socket(family, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


async def open_vsock_listener(port: int) -> trio.SocketListener:
    """Listen on AF_VSOCK ``port`` for any context id (the host connects to the guest's CID)."""
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise OSError(errno.EAFNOSUPPORT, "this Python has no AF_VSOCK")
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.bind((socket.VMADDR_CID_ANY, port))
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


class DeviceStream(trio.abc.Stream):
    """A character device as a stream that never ends.

    When no host is attached a virtio-console port reads as end-of-file and a pty whose master
    is closed fails with EIO; both mean "nobody there yet", so the stream waits and tries again.
    Writes that fail the same way are dropped: whoever attaches next starts with a hello.
    """

    def __init__(self, path: str, retry_interval: float = 0.1) -> None:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        if os.isatty(fd):
            # Raw mode: no echo, no line editing, no newline translation; bytes are bytes.
            tty.setraw(fd, termios.TCSANOW)
        self._fd = trio.lowlevel.FdStream(fd)
        self._retry = retry_interval
        self.path = path

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            try:
                data = await self._fd.receive_some(max_bytes)
            except trio.BrokenResourceError:
                data = b""
            if data:
                return data
            await trio.sleep(self._retry)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._fd.send_all(data)
        except trio.BrokenResourceError:
            await trio.sleep(self._retry)

    def fileno(self) -> int:
        """The device's (non-blocking) descriptor."""
        return self._fd.fileno()

    async def wait_send_all_might_not_block(self) -> None:
        await self._fd.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._fd.aclose()


def open_stdio() -> trio.StapledStream[trio.lowlevel.FdStream, trio.lowlevel.FdStream]:
    """envd's stdin and stdout as the host stream; stray prints then go to stderr instead."""
    receive = trio.lowlevel.FdStream(os.dup(0))
    send = trio.lowlevel.FdStream(os.dup(1))
    # Nothing else may write to the protocol stream: fd 1 becomes a copy of stderr and fd 0
    # reads nothing, and child processes never inherit the host's pipes.
    os.dup2(2, 1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout = sys.stderr
    return trio.StapledStream(send, receive)
