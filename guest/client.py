"""A small trio client for envd: the host side of `guest.protocol`, for tests and benchmarks.

It is also the reference for the host's GuestLink: one reader task routes frames by id without
ever waiting on a consumer; each stream buffers at most its flow-control window and returns
credit as its consumer takes events; input respects the guest's credit; a hello with a fresh
session nonce resynchronises a stream that has no connection semantics (a virtio-console
device), discarding everything that arrives before the answer.
"""

import collections
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import trio

from guest import protocol
from guest.protocol import GuestError, HelloInfo


class RemoteStream:
    """One request's events and its final result, as the client receives them."""

    def __init__(self, client: "GuestClient", id: int, op: str) -> None:
        self.id = id
        self.op = op
        self.result: Any = None
        self.error: GuestError | None = None
        self.done = False
        self._client = client
        self._spec = protocol.OPS.get(op)
        self._events: collections.deque[tuple[str, msgspec.Raw, int]] = collections.deque()
        self._wakeup = trio.lowlevel.ParkingLot()
        self._unreturned = 0
        self._input_credit = client.input_window
        self._input_wakeup = trio.lowlevel.ParkingLot()

    # -- called by the reader ------------------------------------------------------------------

    def _on_event(self, ev: str, body: msgspec.Raw, size: int) -> None:
        if ev == "credit":
            self._input_credit += protocol.decode_payload(protocol.Credit, body).bytes
            self._input_wakeup.unpark_all()
            return
        self._events.append((ev, body, size))
        self._wakeup.unpark_all()

    def _on_final(self, frame: protocol.Frame) -> None:
        if frame.err is not None:
            self.error = GuestError.from_wire(frame.err)
        elif self._spec is not None:
            self.result = protocol.decode_payload(self._spec.result, frame.ok)
        else:
            self.result = frame.ok
        self.done = True
        self._wakeup.unpark_all()
        self._input_wakeup.unpark_all()

    # -- called by the consumer ----------------------------------------------------------------

    async def next_event(self) -> tuple[str, Any] | None:
        """The next event as (name, typed body); None once the request finished.

        Raises the request's `GuestError` when it failed (after its events).
        """
        while not self._events:
            if self.done:
                if self.error is not None:
                    raise self.error
                return None
            await self._wakeup.park()
        ev, body, size = self._events.popleft()
        await self._return_credit(size)
        kind = self._spec.events.get(ev) if self._spec is not None else None
        return ev, (protocol.decode_payload(kind, body) if kind is not None else body)

    def __aiter__(self) -> AsyncIterator[tuple[str, Any]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[str, Any]]:
        while (event := await self.next_event()) is not None:
            yield event

    async def _return_credit(self, size: int) -> None:
        self._unreturned += size
        window = self._client.window
        if window and self._unreturned >= window // 4:
            amount, self._unreturned = self._unreturned, 0
            if not self.done:
                await self._client._send(
                    self.id, "credit", protocol.Credit(bytes=amount)
                )

    async def wait(self) -> Any:
        """Consume the remaining events and return the final result (or raise its error)."""
        async for _ in self:
            pass
        return self.result

    async def send_input(self, data: bytes = b"", eof: bool = False) -> None:
        """Send a piece of input, waiting for the guest's credit for it."""
        while self._input_credit < len(data) and not self.done:
            await self._input_wakeup.park()
        if self.done:
            return
        self._input_credit -= len(data)
        await self._client._send(self.id, "input", protocol.Input(data=data, eof=eof))

    async def cancel(self) -> None:
        """Ask the guest to stop this request."""
        if not self.done:
            await self._client._send(self.id, "cancel")


class GuestClient:
    """A connection to one envd over a trio stream. Use `GuestClient.open`."""

    def __init__(self, stream: trio.abc.Stream, window: int) -> None:
        self.window = window
        self.input_window = protocol.DEFAULT_INPUT_WINDOW
        self.hello: HelloInfo | None = None  # the latest hello seen from the guest
        self.control_errors: list[GuestError] = []  # errors the guest sent on id 0
        self.keepalives = 0
        self.frames_dropped = 0
        self._stream = stream
        self._send_lock = trio.Lock()
        self._next_id = 1
        self._streams: dict[int, RemoteStream] = {}
        self._syncing_id: int | None = None
        self._hello_seen = trio.Event()
        self._closed = False

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        stream: trio.abc.Stream,
        *,
        session: str | None = None,
        window: int = protocol.DEFAULT_WINDOW,
        resync: bool = False,
    ) -> AsyncIterator["GuestClient"]:
        """Run a client on ``stream``; say hello (and with ``resync``, drop what came before)."""
        client = cls(stream, window)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read_loop)
            try:
                await client.say_hello(session or uuid.uuid4().hex, resync=resync)
                yield client
            finally:
                client._closed = True
                nursery.cancel_scope.cancel()

    # -- requests ------------------------------------------------------------------------------

    def _new_id(self) -> int:
        id = self._next_id
        self._next_id += 1
        return id

    async def _send(self, id: int, op: str, args: protocol.Message | None = None) -> None:
        await self.send_raw(protocol.encode_request(id, op, args))

    async def send_raw(self, data: bytes) -> None:
        """Write bytes to the guest as they are (tests use it for malformed frames)."""
        async with self._send_lock:
            await self._stream.send_all(data)

    async def start(self, op: str, args: protocol.Message | None = None) -> RemoteStream:
        """Send a request and return its stream at once."""
        id = self._new_id()
        remote = RemoteStream(self, id, op)
        self._streams[id] = remote
        await self._send(id, op, args)
        return remote

    async def call(self, op: str, args: protocol.Message | None = None) -> Any:
        """Send a request and return its final result; raises its `GuestError`."""
        remote = await self.start(op, args)
        return await remote.wait()

    @contextlib.asynccontextmanager
    async def stream(
        self, op: str, args: protocol.Message | None = None
    ) -> AsyncIterator[RemoteStream]:
        """A request whose events the block consumes; leaving early cancels it."""
        remote = await self.start(op, args)
        try:
            yield remote
        finally:
            if not remote.done and not self._closed:
                with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError):
                    await remote.cancel()

    async def say_hello(self, session: str, *, resync: bool = False) -> HelloInfo:
        """(Re)start the session. With ``resync``, ignore every frame before the answer."""
        id = self._new_id()
        remote = RemoteStream(self, id, "hello")
        self._streams[id] = remote
        if resync:
            self._syncing_id = id
        # The leading newline ends any partial line the guest may be holding.
        await self.send_raw(
            b"\n" + protocol.encode_request(id, "hello", protocol.Hello(session=session, window=self.window))
        )
        info: HelloInfo = await remote.wait()
        self.input_window = info.input_window
        self.hello = info
        return info

    # -- reading -------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        lines = protocol.LineBuffer(protocol.MAX_FRAME * 2)
        while True:
            try:
                data = await self._stream.receive_some(1 << 18)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                self._fail_all(protocol.Unavailable("the guest closed the channel"))
                return
            for line in lines.feed(data):
                self._route(line)

    def _route(self, line: bytes) -> None:
        try:
            frame = protocol.decode_frame(line)
        except msgspec.DecodeError:
            self.frames_dropped += 1  # a partial line from before a resync
            return
        if self._syncing_id is not None:
            if frame.id != self._syncing_id:
                self.frames_dropped += 1
                return
            self._syncing_id = None
        if frame.id == protocol.CONTROL_ID:
            if frame.ev == "hello":
                self.hello = protocol.decode_payload(HelloInfo, frame.body)
                self._hello_seen.set()
            elif frame.ev == "keepalive":
                self.keepalives += 1
            elif frame.err is not None:
                self.control_errors.append(GuestError.from_wire(frame.err))
            return
        remote = self._streams.get(frame.id)
        if remote is None:
            self.frames_dropped += 1
            return
        if frame.ev is not None:
            remote._on_event(frame.ev, frame.body, len(line) + 1)
        else:
            del self._streams[frame.id]
            remote._on_final(frame)

    def _fail_all(self, error: GuestError) -> None:
        streams, self._streams = self._streams, {}
        for remote in streams.values():
            remote._on_final(protocol.Frame(id=remote.id, err=error.to_wire()))
