"""The host's end of the host↔guest protocol: ``GuestClient`` and the ``GuestLink`` actor.

``GuestClient`` speaks guest/protocol.py over one byte stream: it multiplexes requests by id,
routes stream events to their consumers, returns flow-control credit as consumers drain
their streams, respects the guest's input window, and notices a dead or hung guest.

``GuestLink`` is the actor that owns one client per sandbox. It connects (retrying while
envd starts), says hello with a fresh session nonce (so a guest on a virtio-console device
drops whatever a previous host left half-sent), watches keepalives, and crashes when the
link dies — its supervisor restarts it, which reconnects without touching the guest's
running processes. Other actors ask it for the current client and use that directly, so
concurrent requests never queue behind each other in the actor's mailbox.
"""

from __future__ import annotations

import itertools
import math
import os
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import trio

from actors import Actor, Request
from guest import protocol
from guest.protocol import GuestError, Unavailable

__all__ = ["GetClient", "GuestClient", "GuestLink", "GuestStream", "LinkLost", "open_transport"]


class LinkLost(Unavailable):
    """The channel to the guest broke; requests in flight on it are lost."""


class _Pending:
    """A request that is not a stream: one final frame wakes one waiting task."""

    __slots__ = ("error", "event", "frame", "op")

    def __init__(self, op: str) -> None:
        self.op = op
        self.frame: protocol.Frame | None = None
        self.error: GuestError | None = None
        self.event = trio.Event()


class GuestStream:
    """One streaming request: its events in order, then its final result.

    Iterate to get ``(event_name, payload)`` pairs; iteration ends at the final reply, after
    which ``result`` holds the op's result (or the ``GuestError`` is raised from the loop).
    Credit goes back to the guest as events are consumed, so a slow consumer slows only its
    own stream.
    """

    def __init__(self, client: GuestClient, id: int, op: str) -> None:
        self.client = client
        self.id = id
        self.op = op
        self.result: Any = None
        self._spec = protocol.OPS[op]
        self._events: deque[protocol.Frame | tuple[protocol.Frame, int]] = deque()
        self._wakeup = trio.Event()
        self._final: protocol.Frame | None = None
        self._unreturned = 0
        self._input_credit = 0
        self._credit_changed = trio.Event()
        self._error: GuestError | None = None
        self.done = False

    def _feed(self, frame: protocol.Frame, size: int) -> None:
        if frame.ev == "credit" and self._spec.takes_input:
            self._input_credit += protocol.decode_payload(protocol.Credit, frame.body).bytes
            self._credit_changed.set()
            self._credit_changed = trio.Event()
            return
        if frame.ev is None:
            self._final = frame
            self._credit_changed.set()
        else:
            self._events.append((frame, size))
        self._wakeup.set()

    def _lost(self, error: GuestError) -> None:
        self._final = protocol.Frame(id=self.id, err=error.to_wire())
        self._error = error  # raised as itself (a LinkLost), not rebuilt from its code
        self._wakeup.set()
        self._credit_changed.set()

    def __aiter__(self) -> AsyncIterator[tuple[str, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[str, Any]]:
        while True:
            if self._events:
                item = self._events.popleft()
                assert isinstance(item, tuple)
                frame, size = item
                await self._return_credit(size)
                ev = frame.ev or ""
                kind = self._spec.events.get(ev)
                body = protocol.decode_payload(kind, frame.body) if kind else frame.body
                yield ev, body
                continue
            if self._final is not None:
                self.done = True
                if self._error is not None:
                    raise self._error
                self.result = self.client._unwrap(self.op, self._final)
                return
            self._wakeup = trio.Event()
            await self._wakeup.wait()

    async def _return_credit(self, size: int) -> None:
        self._unreturned += size
        if self._unreturned >= self.client.window // 4 and self._final is None:
            amount, self._unreturned = self._unreturned, 0
            await self.client._send(
                protocol.encode_request(self.id, "credit", protocol.Credit(bytes=amount))
            )

    async def send_input(self, data: bytes, *, eof: bool = False) -> None:
        """Send input (``fs.write`` content), waiting for credit from the guest's window."""
        view = memoryview(data)
        chunk = protocol.FILE_CHUNK
        while True:
            piece = bytes(view[:chunk])
            while self._input_credit < len(piece) and self._final is None:
                await self._credit_changed.wait()
            if self._final is not None:
                return  # the request ended; its result says why
            self._input_credit -= len(piece)
            view = view[len(piece) :]
            last = eof and not view
            await self.client._send(
                protocol.encode_request(self.id, "input", protocol.Input(data=piece, eof=last))
            )
            if not view:
                return

    async def cancel(self) -> None:
        """Ask the guest to stop this request; the stream then ends with ``canceled``."""
        if not self.done and self._final is None:
            await self.client._send(protocol.encode_request(self.id, "cancel"))

    async def wait(self) -> Any:
        """Drain the remaining events and return the final result."""
        async for _ in self:
            pass
        return self.result


class GuestClient:
    """One protocol session with envd over a byte stream (see the module docstring)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        window: int = protocol.DEFAULT_WINDOW,
        dead_after: float = 15.0,
        name: str = "guest",
    ) -> None:
        self.stream = stream
        self.window = window
        self.dead_after = dead_after
        self.name = name
        self.info: protocol.HelloInfo | None = None
        self.session = secrets.token_hex(8)
        self.closed = False
        self.error: GuestError | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Pending | GuestStream] = {}
        self._send_lock = trio.StrictFIFOLock()
        self._last_heard = trio.current_time()
        self._closed_event = trio.Event()

    # -- running -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[protocol.HelloInfo] = trio.TASK_STATUS_IGNORED) -> None:
        """Read frames until the link ends; starts by saying hello. For ``nursery.start``."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_loop)
            nursery.start_soon(self._watchdog)
            try:
                self.info = await self.call(
                    "hello", protocol.Hello(session=self.session, window=self.window), timeout=10
                )
                task_status.started(self.info)
                await self._closed_event.wait()
            finally:
                nursery.cancel_scope.cancel()
        if self.error is not None:
            raise self.error

    def _fail_all(self, error: GuestError) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = error
        waiting, self._waiting = self._waiting, {}
        for item in waiting.values():
            if isinstance(item, GuestStream):
                item._lost(error)
            else:
                item.frame = protocol.Frame(id=0, err=error.to_wire())
                item.error = error
                item.event.set()
        self._closed_event.set()

    async def aclose(self) -> None:
        """Close the link; requests in flight fail with ``LinkLost``."""
        self._fail_all(LinkLost(f"{self.name}: link closed"))
        self.error = None
        await self.stream.aclose()

    async def _read_loop(self) -> None:
        lines = protocol.LineBuffer(protocol.MAX_FRAME)
        try:
            while True:
                data = await self.stream.receive_some(1 << 18)
                if not data:
                    break
                self._last_heard = trio.current_time()
                for line in lines.feed(data):
                    self._route(line)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._fail_all(LinkLost(f"{self.name}: link broke: {exc}"))
            return
        self._fail_all(LinkLost(f"{self.name}: the guest closed the link"))

    async def _watchdog(self) -> None:
        """Ping when idle; declare the guest hung when nothing comes back in time."""
        period = max(self.dead_after / 3, 0.05)
        while True:
            await trio.sleep(period)
            idle = trio.current_time() - self._last_heard
            if idle >= self.dead_after:
                self._fail_all(LinkLost(f"{self.name}: no word from the guest for {idle:.1f} s"))
                return
            if idle >= period:
                await self._send(protocol.encode_request(0, "keepalive"))
                await self._send(protocol.encode_request(next(self._ids), "ping"))

    def _route(self, line: bytes) -> None:
        if line is protocol.LineBuffer.OVERSIZED:
            return
        try:
            frame = protocol.decode_frame(line)
        except msgspec.DecodeError:
            return  # garbage from before a resync; the guest's own hello follows
        if frame.id == protocol.CONTROL_ID:
            return  # unsolicited hello/keepalive, or an error about a frame we sent
        target = self._waiting.get(frame.id)
        if target is None:
            return  # a late frame of a request we gave up on
        if isinstance(target, GuestStream):
            if frame.ev is None:
                del self._waiting[frame.id]
            target._feed(frame, len(line) + 1)
        elif frame.ev is None:
            del self._waiting[frame.id]
            target.frame = frame
            target.event.set()

    async def _send(self, data: bytes) -> None:
        if self.closed:
            raise self.error or LinkLost(f"{self.name}: link closed")
        async with self._send_lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                self._fail_all(LinkLost(f"{self.name}: send failed: {exc}"))
                raise self.error or LinkLost(str(exc)) from exc

    def _unwrap(self, op: str, frame: protocol.Frame) -> Any:
        if frame.err is not None:
            raise GuestError.from_wire(frame.err)
        return protocol.decode_payload(protocol.OPS[op].result, frame.ok)

    # -- requests ----------------------------------------------------------------------------

    async def call(self, op: str, args: protocol.Message | None = None, *, timeout: float | None = None) -> Any:
        """Send a request and return its decoded result; raises the guest's ``GuestError``."""
        id = next(self._ids)
        pending = _Pending(op)
        self._waiting[id] = pending
        try:
            await self._send(protocol.encode_request(id, op, args))
            with trio.fail_after(timeout if timeout is not None else math.inf):
                await pending.event.wait()
        except trio.TooSlowError:
            self._waiting.pop(id, None)
            raise protocol.DeadlineExceeded(f"{op} got no answer in {timeout} s") from None
        finally:
            if self._waiting.get(id) is pending:
                del self._waiting[id]
                if not self.closed and pending.frame is None:
                    with trio.CancelScope(shield=True):
                        await self._send_quietly(protocol.encode_request(id, "cancel"))
        assert pending.frame is not None
        if pending.error is not None:
            raise pending.error
        return self._unwrap(op, pending.frame)

    async def _send_quietly(self, data: bytes) -> None:
        try:
            await self._send(data)
        except GuestError:
            pass

    @asynccontextmanager
    async def open_stream(self, op: str, args: protocol.Message | None = None) -> AsyncIterator[GuestStream]:
        """Start a streaming request; leaving the block early cancels it in the guest."""
        id = next(self._ids)
        stream = GuestStream(self, id, op)
        self._waiting[id] = stream
        if protocol.OPS[op].takes_input and self.info is not None:
            stream._input_credit = self.info.input_window
        try:
            await self._send(protocol.encode_request(id, op, args))
            yield stream
        finally:
            if not stream.done and self._waiting.get(id) is stream:
                del self._waiting[id]
                if not self.closed:
                    with trio.CancelScope(shield=True):
                        await self._send_quietly(protocol.encode_request(id, "cancel"))


async def open_transport(address: str) -> trio.abc.Stream:
    """Connect to envd at ``unix:/path`` (process, ns and QEMU console sockets)."""
    scheme, _, rest = address.partition(":")
    if scheme == "unix":
        return await trio.open_unix_socket(rest)
    raise ValueError(f"unsupported envd address {address!r}")


class GetClient(Request[GuestClient], frozen=True):
    """Ask a GuestLink for its connected client (waits while it connects)."""


class GuestLink(Actor[Any]):
    """Owns the channel to one sandbox's envd (see the module docstring).

    ``connect_timeout`` bounds how long init waits for envd to accept a connection.
    """

    background_tasks = True

    def __init__(
        self,
        address: str,
        *,
        connect_timeout: float = 10.0,
        dead_after: float = 15.0,
        name: str | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        self.address = address
        self.connect_timeout = connect_timeout
        self.dead_after = dead_after
        self.name = name or os.path.basename(address)
        self.alive = alive
        self.client: GuestClient | None = None

    async def init(self) -> None:
        deadline = trio.current_time() + self.connect_timeout
        delay = 0.002
        while True:
            try:
                stream = await open_transport(self.address)
                break
            except OSError as exc:
                # a supervisor waits for this init: give up at once if the guest is gone
                if self.alive is not None and not self.alive():
                    raise LinkLost(f"{self.name}: the sandbox is gone") from exc
                if trio.current_time() + delay > deadline:
                    raise
                await trio.sleep(delay)
                delay = min(delay * 2, 0.1)
        client = GuestClient(stream, dead_after=self.dead_after, name=self.name)
        await self.ctx.nursery.start(client.run) if self.ctx.nursery else None
        self.client = client

    async def terminate(self, reason: Any) -> None:
        if self.client is not None:
            with trio.CancelScope(shield=True):
                await self.client.aclose()

    async def on_get_client(self, msg: GetClient) -> GuestClient:
        assert self.client is not None
        return self.client
