"""The host's GuestLink and GuestClient against a real envd subprocess on a unix socket."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from envd_kit import Envd

from actors import Crashed, Restarted, open_actor_system
from cube.guestlink import GetClient, GuestClient, GuestLink, LinkLost, open_transport
from guest import protocol
from supervisors import ChildSpec, Supervisor


@pytest.fixture
def envd() -> Iterator[Envd]:
    workdir = Path(tempfile.mkdtemp(prefix="cube-gl-", dir="/tmp"))  # sun_path is short
    server = Envd(workdir).start()
    yield server
    server.stop()
    assert server.leaks() == []


def shell(script: str, tag: str | None = None) -> protocol.ProcessStart:
    config = protocol.ProcessConfig(cmd="/bin/sh", args=["-c", script])
    return protocol.ProcessStart(process=config, tag=tag, stdin=False)


async def test_a_guest_link_connects_says_hello_and_answers_calls(envd: Envd) -> None:
    async with open_actor_system() as system:
        ref = await system.spawn(GuestLink(f"unix:{envd.socket}"), "guest")
        client: GuestClient = await ref.call(GetClient())
        assert client.info is not None and client.info.version == protocol.PROTOCOL_VERSION
        assert client.info.session == client.session
        assert await client.call("ping") == protocol.Empty()


async def test_a_guest_error_travels_back_with_its_code(envd: Envd) -> None:
    async with open_actor_system() as system:
        client = await (await system.spawn(GuestLink(f"unix:{envd.socket}"), "guest")).call(GetClient())
        with pytest.raises(protocol.NotFound):
            await client.call("fs.stat", protocol.FsStat(path="/no/such/file"))


async def test_output_larger_than_the_window_flows_as_credit_is_returned(envd: Envd) -> None:
    async with open_actor_system() as system:
        client = await (await system.spawn(GuestLink(f"unix:{envd.socket}"), "guest")).call(GetClient())
        size = 0
        async with client.open_stream("process.start", shell("head -c 8000000 /dev/zero")) as stream:
            async for ev, body in stream:
                if ev == "data" and body.stdout:
                    size += len(body.stdout)
        assert size == 8_000_000
        assert size > client.window * 4, "the stream must have needed credit to finish"


async def test_file_input_is_sent_within_the_guests_window(envd: Envd) -> None:
    data = os.urandom(3_000_000)
    target = str(envd.workdir / "upload.bin")
    async with open_actor_system() as system:
        client = await (await system.spawn(GuestLink(f"unix:{envd.socket}"), "guest")).call(GetClient())
        async with client.open_stream("fs.write", protocol.FsWrite(path=target)) as stream:
            await stream.send_input(data, eof=True)
            result = await stream.wait()
        assert result.entry.size == len(data)
    assert Path(target).read_bytes() == data
    os.unlink(target)


async def test_a_hung_guest_is_declared_lost_by_the_keepalive_watchdog(envd: Envd) -> None:
    assert envd.process is not None
    async with open_actor_system() as system:
        await system.spawn(GuestLink(f"unix:{envd.socket}", dead_after=0.5), "guest")
        os.kill(envd.process.pid, signal.SIGSTOP)
        try:
            with trio.fail_after(5):
                crashed = await system.events.wait_for(Crashed, "/guest")
        finally:
            os.kill(envd.process.pid, signal.SIGCONT)
        assert "no word from the guest" in crashed.error


async def test_a_restarted_link_reattaches_to_a_process_that_kept_running(envd: Envd) -> None:
    spec = ChildSpec("guest", GuestLink, (f"unix:{envd.socket}",))
    async with open_actor_system() as system:
        await system.spawn(Supervisor([spec]), "sandbox")
        link = system.lookup("/sandbox/guest")
        client = await link.call(GetClient())
        async with client.open_stream("process.start", shell("sleep 30", tag="long")) as stream:
            async for ev, body in stream:
                if ev == "start":
                    pid = body.pid
                    break
        system.inject_crash("/sandbox/guest")
        await system.events.wait_for(Restarted, "/sandbox/guest")
        fresh = await link.call(GetClient())
        assert fresh is not client and fresh.session != client.session
        listed = await fresh.call("process.list")
        assert pid in [p.pid for p in listed.processes]
        selector = protocol.ProcessConnect(tag="long")
        async with fresh.open_stream("process.connect", selector) as attached:
            await fresh.call("process.signal", protocol.ProcessSignal(pid=pid, signal="SIGKILL"))
            events = [ev async for ev, _ in attached]
        assert events[0] == "start" and events[-1] == "end"


async def test_requests_in_flight_fail_with_link_lost_when_the_guest_goes(envd: Envd) -> None:
    stream = await open_transport(f"unix:{envd.socket}")
    client = GuestClient(stream, name="test")
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        failed: list[BaseException] = []

        async def slow_call() -> None:
            try:
                async with client.open_stream("process.start", shell("sleep 30")) as s:
                    await s.wait()
            except LinkLost as exc:
                failed.append(exc)

        nursery.start_soon(slow_call)
        await trio.sleep(0.2)
        await client.aclose()
    assert len(failed) == 1
