"""The channel: framing, bad input, cancellation, sessions and flow control, over a real envd."""

from __future__ import annotations

import json

import pytest
import trio
from envd_kit import collect, first_event, shell

from guest import protocol as p
from guest.channel import MAX_CALLS
from guest.client import GuestClient
from guest.processes import READ_SIZE


async def raw_lines(stream: trio.SocketStream, count: int, timeout: float = 5.0) -> list[dict]:
    """Read ``count`` frames from a raw connection."""
    lines = p.LineBuffer()
    frames: list[dict] = []
    with trio.fail_after(timeout):
        while len(frames) < count:
            frames += [json.loads(line) for line in lines.feed(await stream.receive_some(65536))]
    return frames


@pytest.fixture
async def raw(envd):
    """A raw connection to envd, past its unsolicited hello."""
    stream = await trio.open_unix_socket(envd.socket)
    [hello] = await raw_lines(stream, 1)
    assert hello["ev"] == "hello" and hello["id"] == 0
    yield stream
    await stream.aclose()


async def test_envd_announces_itself_when_a_host_connects(envd):
    stream = await trio.open_unix_socket(envd.socket)
    [hello] = await raw_lines(stream, 1)
    body = hello["body"]
    assert body["version"] == p.PROTOCOL_VERSION and body["boot"] and "process.start" in body["capabilities"]
    await stream.aclose()


async def test_a_line_that_is_not_json_gets_an_error_frame_and_envd_keeps_serving(raw):
    await raw.send_all(b"this is not json\n")
    [error] = await raw_lines(raw, 1)
    assert error == {"id": 0, "err": {"code": "invalid_argument", "message": error["err"]["message"]}}
    await raw.send_all(b'{"id": 1, "op": "ping"}\n')
    assert await raw_lines(raw, 1) == [{"id": 1, "ok": {}}]


async def test_a_frame_of_the_wrong_shape_gets_an_error_frame(raw):
    await raw.send_all(b'[1, 2, 3]\n{"id": "seven", "op": "ping"}\n')
    frames = await raw_lines(raw, 2)
    assert [f["err"]["code"] for f in frames] == ["invalid_argument", "invalid_argument"]


async def test_an_unknown_op_is_unimplemented(raw):
    await raw.send_all(b'{"id": 3, "op": "teleport"}\n')
    [frame] = await raw_lines(raw, 1)
    assert frame["id"] == 3 and frame["err"]["code"] == "unimplemented"


async def test_args_that_do_not_fit_the_op_are_an_invalid_argument(raw):
    await raw.send_all(b'{"id": 4, "op": "fs.stat", "args": {"path": 42}}\n')
    [frame] = await raw_lines(raw, 1)
    assert frame["id"] == 4 and frame["err"]["code"] == "invalid_argument"


async def test_a_request_needs_a_positive_id(raw):
    await raw.send_all(b'{"id": 0, "op": "process.list"}\n')
    [frame] = await raw_lines(raw, 1)
    assert frame["err"]["code"] == "invalid_argument"


async def test_an_oversized_frame_is_refused_and_the_next_one_served(raw):
    await raw.send_all(b'{"id": 5, "op": "ping", "pad": "' + b"x" * (p.MAX_FRAME + 10) + b'"}\n')
    await raw.send_all(b'{"id": 6, "op": "ping"}\n')
    frames = await raw_lines(raw, 2, timeout=20)
    assert frames[0]["err"]["code"] == "invalid_argument" and frames[1] == {"id": 6, "ok": {}}


async def test_a_request_id_in_use_is_refused_without_disturbing_the_first(raw):
    start = json.dumps({"id": 9, "op": "process.start", "args": {"process": {"cmd": "/bin/sleep", "args": ["0.3"]}}})
    await raw.send_all(start.encode() + b"\n" + start.encode() + b"\n")
    frames = await raw_lines(raw, 4)  # start, the refusal, end, ok
    refusals = [f for f in frames if "err" in f]
    assert len(refusals) == 1 and refusals[0]["err"]["code"] == "invalid_argument"
    assert {"id": 9, "ok": {}} in frames


async def test_cancel_ends_a_request_with_canceled(client):
    remote = await client.start("process.start", shell("sleep 30"))
    pid = (await first_event(remote, "start")).pid
    await remote.cancel()
    with pytest.raises(p.Canceled):
        await remote.wait()
    await client.call("process.signal", p.ProcessSignal(pid=pid, signal="SIGKILL"))


async def test_cancelling_an_unknown_or_finished_request_is_harmless(client):
    remote = await client.start("ping")
    await remote.wait()
    await client._send(remote.id, "cancel")
    await client._send(12345, "cancel")
    await client.call("ping")


async def test_a_stream_without_credit_stalls_alone(envd):
    # Window of 64 KiB: a flood stops at the window while other requests go on.
    stream = await trio.open_unix_socket(envd.socket)
    async with stream, GuestClient.open(stream, window=64 << 10) as client:
        flood = await client.start("process.start", shell("yes"))
        await trio.sleep(0.5)
        buffered = sum(size for _, _, size in flood._events)
        one_frame = READ_SIZE * 4 // 3 + 1024  # base64 plus the envelope
        assert 0 < buffered <= (64 << 10) + one_frame  # the window plus the frame that crossed it
        with trio.fail_after(2):
            assert (await client.call("process.list")).processes
        pid = flood._events[0][1]  # the start event's raw body
        pid = p.decode_payload(p.ProcessStarted, pid).pid
        await client.call("process.signal", p.ProcessSignal(pid=pid, signal="SIGKILL"))
        run = await collect(flood)
        assert run.end.status == "signal: killed"


async def test_credit_lets_a_stalled_stream_continue(envd):
    stream = await trio.open_unix_socket(envd.socket)
    async with stream, GuestClient.open(stream, window=16 << 10) as client:
        # 1 MiB through a 16 KiB window: only works if credit keeps flowing back.
        result = await collect(await client.start("process.start", shell("head -c 1048576 /dev/zero")))
    assert len(result.stdout) == 1 << 20 and result.end.exit_code == 0


async def test_a_window_of_zero_turns_flow_control_off(envd):
    stream = await trio.open_unix_socket(envd.socket)
    async with stream, GuestClient.open(stream, window=0) as client:
        result = await collect(await client.start("process.start", shell("head -c 4000000 /dev/zero")))
    assert len(result.stdout) == 4_000_000


async def test_more_requests_in_flight_than_allowed_are_resource_exhausted(client):
    remote = await client.start("process.start", shell("sleep 30"))
    pid = (await first_event(remote, "start")).pid
    waiting = [await client.start("process.connect", p.ProcessConnect(pid=pid)) for _ in range(MAX_CALLS)]
    refused = [w for w in waiting if w.done and isinstance(w.error, p.ResourceExhausted)]
    with trio.fail_after(10):
        while not refused:
            await trio.sleep(0.01)
            refused = [w for w in waiting if w.done and isinstance(w.error, p.ResourceExhausted)]
    assert len(refused) == 1  # the first request plus MAX_CALLS - 1 connects fit
    await client.call("process.signal", p.ProcessSignal(pid=pid, signal="SIGKILL"))
    await collect(remote)


async def test_a_hello_with_a_new_session_cancels_the_old_sessions_requests(client):
    remote = await client.start("process.start", shell("sleep 30"))
    pid = (await first_event(remote, "start")).pid
    await client.say_hello("a-new-session", resync=True)
    assert remote.done is False or remote.error is not None  # the old stream gets no more frames
    listed = {i.pid for i in (await client.call("process.list")).processes}
    assert pid in listed  # the process survived the session
    await client.call("process.signal", p.ProcessSignal(pid=pid, signal="SIGKILL"))


async def test_a_hello_with_the_same_session_changes_nothing(client):
    remote = await client.start("process.start", shell("read x; echo $x"))
    pid = (await first_event(remote, "start")).pid
    await client.say_hello(client.hello.session)
    await client.call("process.input", p.ProcessInput(pid=pid, stdin=b"still\n"))
    assert (await collect(remote)).stdout == b"still\n"


async def test_keepalives_arrive_when_the_channel_is_idle(private_envd):
    envd = private_envd("unix", "--keepalive", "0.1")
    stream = await trio.open_unix_socket(envd.socket)
    async with stream, GuestClient.open(stream) as client:
        await trio.sleep(0.5)
        assert client.keepalives >= 2
