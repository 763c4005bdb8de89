"""The Connect codec: envelopes, end-of-stream, timeouts, and the relay's outcomes."""

from __future__ import annotations

import json
import math
import struct

import pytest
import trio

from cube.api.connect import (
    Done,
    EnvelopeReader,
    Failed,
    Keepalive,
    Relay,
    end_stream,
    envelope,
    keepalive_interval,
    parse_timeout,
)
from cube.api.errors import BadRequest, NotFound
from guest.protocol import DeadlineExceeded, InvalidArgument


def test_envelope_is_flags_length_and_payload() -> None:
    assert envelope(b"{}") == b"\x00\x00\x00\x00\x02{}"
    assert envelope(b"{}", 2)[:1] == b"\x02"


def test_end_stream_carries_an_empty_object_or_the_error() -> None:
    assert end_stream() == b"\x02\x00\x00\x00\x02{}"
    body = json.loads(end_stream(NotFound("no such pid"))[5:])
    assert body == {"error": {"code": "not_found", "message": "no such pid"}}
    body = json.loads(end_stream(InvalidArgument("cwd '/x' does not exist"))[5:])
    assert body["error"]["code"] == "invalid_argument"


def test_reader_reassembles_envelopes_split_anywhere() -> None:
    data = envelope(b'{"a":1}') + envelope(b'{"b":2}') + envelope(b"{}", 2)
    reader = EnvelopeReader()
    out = []
    for i in range(len(data)):
        out += reader.feed(data[i : i + 1])
    reader.finish()
    assert out == [(0, b'{"a":1}'), (0, b'{"b":2}'), (2, b"{}")]


@pytest.mark.parametrize(
    "data",
    [
        envelope(b"{}", 1),  # compressed
        envelope(b"{}", 0x80),  # unknown flag
        struct.pack(">BI", 0, 10 << 20),  # too large
    ],
)
def test_reader_rejects_bad_envelopes(data: bytes) -> None:
    with pytest.raises(BadRequest):
        EnvelopeReader(max_message=1 << 20).feed(data)


def test_reader_rejects_a_body_that_stops_inside_an_envelope() -> None:
    reader = EnvelopeReader()
    assert reader.feed(envelope(b'{"x":1}')[:-2]) == []
    with pytest.raises(BadRequest):
        reader.finish()


@pytest.mark.parametrize(("header", "seconds"), [(None, None), ("", None), ("0", None), ("1500", 1.5)])
def test_parse_timeout(header: str | None, seconds: float | None) -> None:
    assert parse_timeout(header) == seconds


@pytest.mark.parametrize("header", ["-1", "1.5", "soon", "99999999999"])
def test_parse_timeout_rejects_garbage(header: str) -> None:
    with pytest.raises(BadRequest):
        parse_timeout(header)


def test_keepalive_interval_defaults_to_envds_90_seconds() -> None:
    assert keepalive_interval("50") == 50
    assert keepalive_interval(None) == 90
    assert keepalive_interval("x") == 90


async def test_relay_delivers_items_then_done() -> None:
    async def produce(send: trio.MemorySendChannel[object]) -> None:
        for i in range(3):
            await send.send(i)

    async with trio.open_nursery() as nursery:
        relay: Relay[int] = Relay(nursery, produce)
        items = [item async for item in relay.items()]
    assert items[:3] == [0, 1, 2] and isinstance(items[3], Done)


async def test_relay_reports_guest_errors_and_deadlines() -> None:
    async def fails(send: trio.MemorySendChannel[object]) -> None:
        raise InvalidArgument("bad")

    async def hangs(send: trio.MemorySendChannel[object]) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        failed = await Relay(nursery, fails).next()
        assert isinstance(failed, Failed) and isinstance(failed.error, InvalidArgument)
        late = await Relay(nursery, hangs, deadline=trio.current_time() + 0.05).next()
        assert isinstance(late, Failed) and isinstance(late.error, DeadlineExceeded)


async def test_relay_keepalive_and_close_cancel_the_producer() -> None:
    cancelled = trio.Event()

    async def slow(send: trio.MemorySendChannel[object]) -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async with trio.open_nursery() as nursery:
        relay: Relay[object] = Relay(nursery, slow, deadline=math.inf)
        assert isinstance(await relay.next(keepalive=0.01), Keepalive)
        relay.close()
        with trio.fail_after(1):
            await cancelled.wait()
