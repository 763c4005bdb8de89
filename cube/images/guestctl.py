"""cube-guestctl: the guest end of the VM control port (clock and network after a restore).

Every VM restored from one checkpoint wakes with the checkpoint's clock, MAC address, IP
address and hostname, and a VM kept paused in the hot tier wakes with its clock behind by the
time it was paused (under TCG the guest's clocks stop with the VM). The host fixes both
through this small agent, on its own virtio-console port (``cube-ctl``), rather than through
envd: setting the clock must take a millisecond on the request path, and a process started
through envd takes 60-120 ms under TCG. This agent stays resident (started by /init next to
envd, and so part of every checkpoint) and needs no fork for the clock.

It imports only C modules (``_signal`` rather than ``signal``, which would import ``enum``):
it starts in every cold boot, where each import costs ten times what it costs natively.

The protocol is one text line per request and per reply; ids let a host ignore replies meant
for a previous host (the port has no connections, only bytes)::

    host  -> guest   "<id> ping"
                     "<id> clock <unix time in ns>"
                     "<id> net <mac> <addr/len> <gateway|-> <hostname> <dns,dns|->"
    guest -> host    "<id> ok"  |  "<id> err <message>"

While no host is attached, a virtio-console port reads as end-of-file at once, so the agent
asks for SIGIO (the port signals when a host attaches) and waits for it instead of spinning.
"""

import _signal
import fcntl
import os
import sys
import time

# When a host attaches the port raises SIGIO; this is only the fallback if that is missed.
IDLE_WAIT = 1.0
MAX_LINE = 4096

NET_SCRIPT = r"""
set -e
ip link set eth0 down
ip link set eth0 address "$CUBE_MAC"
ip addr flush dev eth0
ip addr add "$CUBE_ADDR" dev eth0
ip link set eth0 up
if [ "$CUBE_GW" != "-" ]; then ip route replace default via "$CUBE_GW"; fi
hostname "$CUBE_HOSTNAME"
echo "$CUBE_HOSTNAME" > /etc/hostname
if [ "$CUBE_DNS" != "-" ]; then
    : > /etc/resolv.conf
    for server in $(echo "$CUBE_DNS" | tr , ' '); do echo "nameserver $server" >> /etc/resolv.conf; done
fi
"""


def set_clock(args: list[str]) -> str:
    """``clock NS``: step the real-time clock to the host's time."""
    time.clock_settime_ns(time.CLOCK_REALTIME, int(args[0]))
    return ""


def set_network(args: list[str]) -> str:
    """``net MAC ADDR GW HOSTNAME DNS``: give eth0 this VM's own identity."""
    mac, addr, gateway, hostname, dns = args
    env = dict(os.environ)
    env.update(CUBE_MAC=mac, CUBE_ADDR=addr, CUBE_GW=gateway, CUBE_HOSTNAME=hostname, CUBE_DNS=dns)
    pid = os.posix_spawn("/bin/sh", ["/bin/sh", "-c", NET_SCRIPT], env)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"network setup exited with status {code}")
    return ""


COMMANDS = {"ping": lambda args: "", "clock": set_clock, "net": set_network}


def answer(line: bytes) -> bytes:
    """The reply line to one request line (empty for a blank line: a host's resync)."""
    parts = line.decode(errors="replace").split()
    if not parts:
        return b""
    rid, command, args = parts[0], parts[1] if len(parts) > 1 else "", parts[2:]
    handler = COMMANDS.get(command)
    if handler is None:
        return f"{rid} err unknown command {command!r}\n".encode()
    try:
        detail = handler(args)
    except (OSError, ValueError, RuntimeError, IndexError) as e:
        return f"{rid} err {type(e).__name__}: {e}\n".replace("\n", " ").encode() + b"\n"
    return f"{rid} ok{' ' + detail if detail else ''}\n".encode()


def open_port(path: str) -> int:
    """Open the port, asking for SIGIO when a host attaches (and blocking SIGIO, so that it
    is only ever collected by ``sigtimedwait``)."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    _signal.pthread_sigmask(_signal.SIG_BLOCK, {_signal.SIGIO})
    fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)
    return fd


def serve(path: str) -> None:
    """Answer requests on the port at ``path`` forever."""
    fd = open_port(path)
    buffer = b""
    while True:
        try:
            data = os.read(fd, MAX_LINE)
        except OSError:
            data = b""
        if not data:  # no host attached: wait until one is
            buffer = b""
            _signal.sigtimedwait({_signal.SIGIO}, IDLE_WAIT)
            continue
        buffer += data
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            reply = answer(line)
            if reply:
                os.write(fd, reply)
        if len(buffer) > MAX_LINE:
            buffer = b""  # not a request of ours


if __name__ == "__main__":
    serve(sys.argv[1])
