"""The server side of the Connect protocol with the JSON codec (docs/e2b-protocol.md §3.1).

Unary calls are one JSON message each way. Streams are 5-byte-prefixed envelopes
(``flags:uint8 | length:uint32 BE | JSON``); a response stream ends with one end-of-stream
envelope (flags 0x02) carrying ``{}`` or ``{"error": {...}}``.

``Relay`` runs a guest stream in the server's nursery and hands its items to the HTTP
response body, so a response can wait for the next item with a timeout (keepalives) without
cancelling the guest stream, and a client that goes away cancels the guest request at once.
"""

from __future__ import annotations

import logging
import math
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Generic, TypeVar

import msgspec
import trio

from guest.protocol import DeadlineExceeded, GuestError, Internal

from .errors import BadRequest, connect_code, connect_message

__all__ = [
    "END_STREAM",
    "JSON",
    "STREAM_JSON",
    "EnvelopeReader",
    "Relay",
    "end_stream",
    "envelope",
    "parse_timeout",
]

log = logging.getLogger("cube.api.connect")

JSON: Final = "application/json"
STREAM_JSON: Final = "application/connect+json"
END_STREAM: Final = 0x02
COMPRESSED: Final = 0x01
MAX_MESSAGE: Final = 4 << 20
_HEADER: Final = struct.Struct(">BI")
_ENCODER: Final = msgspec.json.Encoder()


def envelope(message: bytes, flags: int = 0) -> bytes:
    """One enveloped message."""
    return _HEADER.pack(flags, len(message)) + message


class _StreamError(msgspec.Struct):
    code: str
    message: str


class _EndStream(msgspec.Struct, omit_defaults=True):
    error: _StreamError | None = None


def end_stream(error: Exception | None = None) -> bytes:
    """The end-of-stream envelope: ``{}`` on success, ``{"error": ...}`` otherwise."""
    body = _EndStream()
    if error is not None:
        body = _EndStream(_StreamError(connect_code(error).value, connect_message(error)))
    return envelope(_ENCODER.encode(body), END_STREAM)


class EnvelopeReader:
    """Splits a request body into enveloped messages, bounding each by ``max_message``.

    Raises ``BadRequest`` for a compressed or oversized envelope and for a body that ends
    inside one.
    """

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_message

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """Add body bytes; return the complete ``(flags, message)`` pairs they finish."""
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        while len(buf) >= _HEADER.size:
            flags, length = _HEADER.unpack_from(buf)
            if flags & COMPRESSED:
                raise BadRequest("compressed envelopes are not supported (identity only)")
            if flags & ~(COMPRESSED | END_STREAM):
                raise BadRequest(f"unknown envelope flags {flags:#x}")
            if length > self._max:
                raise BadRequest(f"message of {length} bytes exceeds the {self._max} byte limit")
            end = _HEADER.size + length
            if len(buf) < end:
                break
            out.append((flags, bytes(buf[_HEADER.size : end])))
            del buf[:end]
        return out

    def finish(self) -> None:
        """The body ended; raise ``BadRequest`` if it stopped inside an envelope."""
        if self._buf:
            raise BadRequest("the request body ends inside an envelope")


def parse_timeout(value: str | None) -> float | None:
    """Seconds from a ``Connect-Timeout-Ms`` header (None when absent or 0)."""
    if value is None or value == "":
        return None
    if not value.isdigit() or len(value) > 10:
        raise BadRequest(f"Connect-Timeout-Ms must be a positive integer, not {value!r}")
    ms = int(value)
    return ms / 1000 if ms > 0 else None


def keepalive_interval(value: str | None, default: float = 90.0) -> float:
    """Seconds from a ``Keepalive-Ping-Interval`` header (envd's default when absent)."""
    if value and value.isdigit() and 0 < int(value) <= 3600:
        return float(value)
    return default


T = TypeVar("T")


class Done(msgspec.Struct, frozen=True):
    """The producer finished without error."""


class Failed(msgspec.Struct, frozen=True):
    """The producer failed; ``error`` says how."""

    error: Exception


class Keepalive(msgspec.Struct, frozen=True):
    """Nothing came for one keepalive interval."""


KEEPALIVE: Final = Keepalive()

Producer = Callable[[trio.MemorySendChannel[Any]], Awaitable[None]]


class Relay(Generic[T]):
    """A producer task in ``nursery`` feeding items to one response, with backpressure.

    ``produce(send)`` sends items; the relay then delivers ``Done()``, or ``Failed(error)``
    when it raised a ``GuestError`` or when ``deadline`` (trio clock) passed. ``close``
    cancels the producer (the guest request with it). Items beyond a small buffer wait for
    the consumer, so a slow client slows only its own stream.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        produce: Producer,
        *,
        deadline: float = math.inf,
        buffer: int = 8,
    ) -> None:
        self._send, self._recv = trio.open_memory_channel[Any](buffer)
        self._scope = trio.CancelScope(deadline=deadline)
        self._closed = False
        nursery.start_soon(self._run, produce)

    async def _run(self, produce: Producer) -> None:
        async with self._send:
            outcome: Done | Failed | None = None
            with self._scope:
                try:
                    await produce(self._send)
                    outcome = Done()
                except GuestError as exc:
                    outcome = Failed(exc)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return  # the consumer went away
                except Exception as exc:  # the edge: a bug must not take the server down
                    log.exception("stream producer failed")
                    outcome = Failed(Internal(f"internal error: {type(exc).__name__}"))
            if outcome is None:
                if self._closed:
                    return
                outcome = Failed(DeadlineExceeded("the deadline of the call was exceeded"))
            try:
                await self._send.send(outcome)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def next(self, keepalive: float = math.inf) -> T | Done | Failed | Keepalive:
        """The next item; ``KEEPALIVE`` if none came within ``keepalive`` seconds."""
        with trio.move_on_after(keepalive):
            try:
                return await self._recv.receive()  # type: ignore[no-any-return]
            except trio.EndOfChannel:
                return Failed(Internal("the stream ended without a result"))
        return KEEPALIVE

    async def items(self, keepalive: float = math.inf) -> AsyncIterator[T | Done | Failed | Keepalive]:
        """Every item up to and including the final ``Done`` or ``Failed``."""
        while True:
            item = await self.next(keepalive)
            yield item
            if isinstance(item, Done | Failed):
                return

    def close(self) -> None:
        """Stop the producer (idempotent; never blocks)."""
        self._closed = True
        self._scope.cancel()
        self._recv.close()
