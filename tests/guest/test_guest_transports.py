"""The transports: unix socket, a pty standing in for a virtio-console device, stdio, vsock."""

from __future__ import annotations

import os
import socket

import pytest
import trio
from envd_kit import collect, connect, first_event, run, shell

from guest import protocol as p
from guest.client import GuestClient
from guest.transports import vsock_available


def device_stream(envd) -> trio.StapledStream:
    """The host's end of the pty, as a stream (its own descriptors, closed with it)."""
    return trio.StapledStream(
        trio.lowlevel.FdStream(os.dup(envd.device)), trio.lowlevel.FdStream(os.dup(envd.device))
    )


async def wait_for_announcement(stream: trio.abc.ReceiveStream) -> None:
    """envd says hello once it has the device in raw mode; only then is it safe to write."""
    seen = b""
    with trio.fail_after(10):
        while b'"ev":"hello"' not in seen:
            seen += await stream.receive_some(65536)


async def test_a_host_that_reconnects_to_the_unix_socket_finds_its_process(private_envd):
    envd = private_envd()
    async with connect(envd) as first:
        remote = await first.start("process.start", shell("read x; echo bye $x", tag="survivor"))
        await first_event(remote, "start")
    # The first connection is gone without a word; the process is not.
    async with connect(envd) as second:
        attached = await second.start("process.connect", p.ProcessConnect(tag="survivor"))
        pid = (await first_event(attached, "start")).pid
        await second.call("process.input", p.ProcessInput(pid=pid, stdin=b"now\n"))
        assert (await collect(attached)).stdout == b"bye now\n"


async def test_envd_serves_a_character_device(private_envd):
    envd = private_envd("device")
    stream = device_stream(envd)
    await wait_for_announcement(stream)
    async with stream, GuestClient.open(stream, resync=True) as client:
        assert (await run(client, "echo over the device")).stdout == b"over the device\n"


async def test_a_host_that_reconnects_to_the_device_mid_stream_resynchronises(private_envd):
    envd = private_envd("device")
    stream = device_stream(envd)
    await wait_for_announcement(stream)
    script = "i=0; while [ $i -lt 100 ]; do echo line-$i; i=$((i+1)); sleep 0.005; done; read x; echo end-$x"
    async with GuestClient.open(stream, session="first", resync=True) as first:
        remote = await first.start("process.start", shell(script, tag="long"))
        await first_event(remote, "data")
    # The first host vanished mid-stream and a half-written frame is left on the line; the device
    # gives no end-of-file and no new connection, only the next host's hello.
    await stream.send_all(b'{"id": 77, "op": "process.sig')
    async with GuestClient.open(stream, session="second", resync=True) as second:
        assert second.hello.session == "second"
        tagged = [i for i in (await second.call("process.list")).processes if i.tag == "long"]
        assert len(tagged) == 1
        attached = await second.start("process.connect", p.ProcessConnect(tag="long"))
        pid = (await first_event(attached, "start")).pid
        await second.call("process.input", p.ProcessInput(pid=pid, stdin=b"ok\n"))
        result = await collect(attached)
        assert result.stdout.endswith(b"end-ok\n") and result.end.exit_code == 0
        assert second.frames_dropped >= 1  # the old session's frames never reached the new host
    await stream.aclose()


async def test_envd_serves_stdio_and_exits_when_the_host_closes_it(private_envd):
    envd = private_envd("stdio")
    stream = trio.StapledStream(
        trio.lowlevel.FdStream(os.dup(envd.process.stdin.fileno())),
        trio.lowlevel.FdStream(os.dup(envd.process.stdout.fileno())),
    )
    envd.process.stdin.close()
    envd.process.stdout.close()
    async with GuestClient.open(stream) as client:
        assert (await run(client, "echo via stdio")).stdout == b"via stdio\n"
        remote = await client.start("process.start", shell("sleep 60"))
        await first_event(remote, "start")
    await stream.aclose()
    with trio.fail_after(15):
        while envd.process.poll() is None:
            await trio.sleep(0.05)
    assert envd.process.returncode == 0
    assert envd.leaks() == []  # the sleeper was killed on the way out


async def test_sigterm_stops_envd_and_kills_every_process_tree(private_envd):
    envd = private_envd()
    async with connect(envd) as client:
        remote = await client.start("process.start", shell("sleep 60 & sleep 60"))
        await first_event(remote, "start")
        await client.call("code.create", p.ContextCreate(language="bash"))
    assert envd.stop() == 0
    assert envd.leaks() == []


@pytest.mark.skipif(not vsock_available(), reason="this kernel has no AF_VSOCK")
async def test_envd_serves_vsock(private_envd):
    port = 50_000 + os.getpid() % 10_000
    private_envd("none", "--vsock", str(port))
    sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    local_cid = 1  # VMADDR_CID_LOCAL: needs the kernel's vsock loopback transport
    with trio.move_on_after(0.5) as attempt:
        try:
            await sock.connect((local_cid, port))
        except OSError as exc:
            sock.close()
            pytest.skip(f"no vsock loopback in this kernel ({exc}); envd listens on {port}")
    if attempt.cancelled_caught:
        sock.close()
        pytest.skip(f"no vsock loopback in this kernel; envd listens on {port}")
    async with trio.SocketStream(sock) as stream, GuestClient.open(stream) as client:
        assert (await run(client, "echo over vsock")).stdout == b"over vsock\n"
