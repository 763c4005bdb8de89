"""envd's end of one channel to the host: framing, dispatch, flow control, resynchronisation.

A channel is one byte stream (a unix-socket or vsock connection, a virtio-console device, or
stdio). It carries host sessions one after another: a ``hello`` with a new session nonce ends
the previous session (its requests are cancelled and its queued frames dropped) and starts a
new one, which is how a host that reconnects to a device with no connection semantics gets a
clean slate. Processes, contexts and watchers belong to the agent, not to a session, so they
survive; the host re-attaches with ``process.connect``.

Flow control, in both directions, is per request:

* guest → host: a stream may have at most ``window`` bytes of encoded frames outstanding; the
  host returns credit with ``credit`` frames as its consumer drains them. A stream without
  credit parks its producer (a process's output pump stops reading the pipe, so the process
  blocks on write) and every other stream goes on.
* host → guest: a request that takes input (``fs.write``) accepts at most ``input_window``
  bytes before the guest grants more with ``credit`` events as it consumes them.
* The outbox, shared by all streams, is bounded too; when the host stops reading the link
  itself, producers park and the reader stops taking new requests.
"""

import collections
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import trio

from guest import protocol
from guest.protocol import (
    CONTROL_ID,
    Canceled,
    GuestError,
    Internal,
    InvalidArgument,
    ResourceExhausted,
    Unimplemented,
)

log = logging.getLogger("guest.channel")

# Encoded bytes the outbox holds before producers park: a few windows' worth.
OUTBOX_LIMIT = 8 << 20
# Bytes the writer hands to one send_all; batching small frames is most of the throughput.
WRITE_BATCH = 1 << 20
# Requests one session may have running at once; more are refused with resource_exhausted.
MAX_CALLS = 1024


class Outbox:
    """The bounded queue of encoded frames between every producer and the channel's writer.

    Replies and control frames enter with `put_nowait` (they are small and answer something the
    host sent, so the host bounds them by reading); stream data enters with `put`, which parks
    while the outbox is over its limit. Frames carry the session epoch they belong to, and
    frames of an ended session are dropped instead of written.
    """

    def __init__(self, limit: int = OUTBOX_LIMIT, fd: int = -1) -> None:
        self.epoch = 0
        self.busy = False  # the writer holds frames it took and has not finished sending
        self._items: collections.deque[tuple[int, bytes]] = collections.deque()
        self._size = 0
        self._limit = limit
        self._fd = fd
        self._readers = trio.lowlevel.ParkingLot()
        self._writers = trio.lowlevel.ParkingLot()

    def put_nowait(self, epoch: int, frame: bytes) -> None:
        """Queue a frame now, whatever the fill level.

        When nothing is queued or being written, the frame goes straight to the (non-blocking)
        descriptor: an answer then leaves without waking the writer task, which is most of a
        small request's round trip. Whatever the descriptor does not take is queued.
        """
        if epoch != self.epoch:
            return
        if self._fd >= 0 and not self._items and not self.busy:
            try:
                written = os.write(self._fd, frame)
            except OSError:
                written = 0  # would block, or broken: the writer task finds out and copes
            if written == len(frame):
                return
            frame = frame[written:]
        self._items.append((epoch, frame))
        self._size += len(frame)
        if self._readers:
            self._readers.unpark()

    async def put(self, epoch: int, frame: bytes) -> None:
        """Queue a frame, parking while the outbox is full. Always a checkpoint."""
        if self._size >= self._limit:
            while self._size >= self._limit:
                await self._writers.park()
        else:
            await trio.lowlevel.checkpoint()
        self.put_nowait(epoch, frame)

    @property
    def empty(self) -> bool:
        """Whether nothing waits to be written."""
        return not self._items

    async def wait_room(self) -> None:
        """Return once the outbox is below its limit (at once when it is)."""
        while self._size >= self._limit:
            await self._writers.park()

    async def take(self, max_bytes: int = WRITE_BATCH) -> bytes:
        """Remove and return up to ``max_bytes`` of current-epoch frames, parking while empty."""
        while True:
            while not self._items:
                await self._readers.park()
            parts: list[bytes] = []
            taken = 0
            items = self._items
            while items and taken < max_bytes:
                epoch, frame = items.popleft()
                self._size -= len(frame)
                if epoch == self.epoch:
                    parts.append(frame)
                    taken += len(frame)
            if self._size < self._limit and self._writers:
                self._writers.unpark_all()
            if parts:
                self.busy = True
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def new_epoch(self) -> int:
        """Start a new session: frames already queued for the old one will not be written."""
        self.epoch += 1
        stale = self._items
        self._items = collections.deque(item for item in stale if item[0] == self.epoch)
        self._size = sum(len(frame) for _, frame in self._items)
        if self._writers:
            self._writers.unpark_all()
        return self.epoch


class Reply:
    """How a handler answers its request, now or later, exactly once."""

    __slots__ = ("_done", "_epoch", "_outbox", "id")

    def __init__(self, outbox: Outbox, epoch: int, id: int) -> None:
        self._outbox = outbox
        self._epoch = epoch
        self._done = False
        self.id = id

    def ok(self, result: protocol.Message | None = None) -> None:
        """Send the final success reply."""
        if not self._done:
            self._done = True
            self._outbox.put_nowait(self._epoch, protocol.encode_ok(self.id, result))

    def err(self, error: GuestError) -> None:
        """Send the final error reply."""
        if not self._done:
            self._done = True
            self._outbox.put_nowait(self._epoch, protocol.encode_err(self.id, error))


class Sink(Protocol):
    """Where a long-lived producer (a process, a watcher) sends one subscriber's events."""

    @property
    def closed(self) -> bool: ...

    async def emit(self, ev: str, body: protocol.Message | msgspec.Raw | None = None) -> bool: ...


class Call:
    """One running request: its cancel scope, its outbound credit and its input queue.

    Handlers receive it to stream events (`emit`) and to read input (`receive_input`). Other
    actors (a process's output pump) hold it as a `Sink`; once the request ends it is closed
    and `emit` returns False at once, so a producer never waits on a departed subscriber.
    """

    def __init__(
        self, outbox: Outbox, epoch: int, id: int, op: str, window: int, input_window: int
    ) -> None:
        self.id = id
        self.op = op
        self.scope = trio.CancelScope()
        self.error: GuestError | None = None  # set when the host broke the stream's rules
        self._outbox = outbox
        self._epoch = epoch
        self._credit: int | None = window if window > 0 else None
        self._credit_waiters = trio.lowlevel.ParkingLot()
        self._closed = False
        self._input: collections.deque[bytes] = collections.deque()
        self._input_eof = False
        self._input_pending = 0
        self._input_window = input_window
        self._input_waiters = trio.lowlevel.ParkingLot()

    @property
    def closed(self) -> bool:
        """True once the request has ended (finished, cancelled, or its session reset)."""
        return self._closed or self._epoch != self._outbox.epoch

    # -- guest → host ------------------------------------------------------------------------

    async def emit(self, ev: str, body: protocol.Message | msgspec.Raw | None = None) -> bool:
        """Send one event of this stream, parking until the host has granted credit for it.

        Returns False (without sending) when the request has ended.
        """
        return await self.send_frame(protocol.encode_event(self.id, ev, body))

    async def send_frame(self, frame: bytes) -> bool:
        """Send one encoded frame under this stream's credit; False if the request ended."""
        while self._credit is not None and self._credit <= 0 and not self.closed:
            await self._credit_waiters.park()
        if self.closed:
            return False
        if self._credit is not None:
            self._credit -= len(frame)
        await self._outbox.put(self._epoch, frame)
        return True

    def add_credit(self, amount: int) -> None:
        """The host consumed ``amount`` bytes of this stream: let the producer continue."""
        if self._credit is not None:
            self._credit += amount
            if self._credit > 0:
                self._credit_waiters.unpark_all()

    def close(self) -> None:
        """End the request for every producer that still holds it."""
        self._closed = True
        self._credit_waiters.unpark_all()
        self._input_waiters.unpark_all()

    def cancel(self, error: GuestError | None = None) -> None:
        """Stop the request's handler; it replies ``error`` (default: canceled)."""
        if error is not None and self.error is None:
            self.error = error
        self.scope.cancel()

    # -- host → guest ------------------------------------------------------------------------

    def feed_input(self, piece: protocol.Input) -> None:
        """Queue input the host sent (in arrival order). Breaking the window cancels the call."""
        if self._input_eof:
            self.cancel(InvalidArgument("input after eof"))
            return
        self._input_pending += len(piece.data)
        if self._input_pending > self._input_window:
            self.cancel(ResourceExhausted("input exceeds the granted window"))
            return
        if piece.data:
            self._input.append(piece.data)
        self._input_eof = piece.eof
        self._input_waiters.unpark_all()

    async def receive_input(self) -> bytes | None:
        """The next piece of input, or None at eof. Grants the host credit for what it takes."""
        while not self._input and not self._input_eof:
            if self._closed:
                raise Canceled("request ended")
            await self._input_waiters.park()
        await trio.lowlevel.checkpoint()
        if not self._input:
            return None
        data = self._input.popleft()
        self._input_pending -= len(data)
        self._outbox.put_nowait(
            self._epoch, protocol.encode_event(self.id, "credit", protocol.Credit(bytes=len(data)))
        )
        return data


InlineHandler = Callable[[Reply, Any], None]
CallHandler = Callable[[Call, Any], Awaitable[protocol.Message | None]]


@dataclass(frozen=True, slots=True)
class Handler:
    """How the channel runs one op.

    An inline handler is a plain function that must not block: the reader calls it in arrival
    order and it answers through its `Reply` (now or later). Every other handler runs as its
    own task with a `Call`, so a slow request never holds up the next one.
    """

    fn: InlineHandler | CallHandler
    inline: bool = False


class Agent(Protocol):
    """What a channel needs from the agent it serves."""

    @property
    def handlers(self) -> Mapping[str, Handler]: ...

    def hello_info(self, session: str) -> protocol.HelloInfo: ...


def _direct_fd(stream: trio.abc.Stream) -> int:
    """The non-blocking descriptor frames can be written to directly, or -1."""
    if isinstance(stream, trio.StapledStream):
        stream = stream.send_stream
    fileno = getattr(stream, "fileno", None)
    if isinstance(stream, trio.SocketStream):
        return stream.socket.fileno()
    if callable(fileno):
        try:
            fd = fileno()
        except (OSError, ValueError):
            return -1
        return fd if isinstance(fd, int) else -1
    return -1


def _single_guest_error(exc: BaseException) -> GuestError | None:
    """The GuestError inside ``exc`` when it is one, possibly wrapped in exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, GuestError) else None


class Channel:
    """Serves one byte stream: reads requests, runs handlers, writes their frames back."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        agent: Agent,
        *,
        name: str = "channel",
        keepalive: float = 0.0,
        max_frame: int = protocol.MAX_FRAME,
        input_window: int = protocol.DEFAULT_INPUT_WINDOW,
    ) -> None:
        self.name = name
        self._stream = stream
        self._agent = agent
        self._handlers = agent.handlers
        self._keepalive = keepalive
        self._max_frame = max_frame
        self._input_window = input_window
        self._outbox = Outbox(fd=_direct_fd(stream))
        self._session = ""
        self._window = protocol.DEFAULT_WINDOW
        self._calls: dict[int, Call] = {}
        self._last_write = time.monotonic()
        self._broken = False
        self._nursery: trio.Nursery | None = None

    async def aclose(self) -> None:
        """Close the underlying stream."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._stream.aclose()

    async def serve(self) -> None:
        """Serve until the stream ends; then cancel this channel's requests and return."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._write_loop)
            if self._keepalive > 0:
                nursery.start_soon(self._keepalive_loop)
            self._announce()
            try:
                await self._read_loop()
            finally:
                # Let what is already queued (the answer to a last request) go out first,
                # unless the host has gone and nothing can.
                if not self._broken:
                    with trio.move_on_after(1):
                        await self._drain()
                nursery.cancel_scope.cancel()

    # -- reading -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        lines = protocol.LineBuffer(self._max_frame)
        receive = self._receiver()
        while True:
            try:
                data = await receive()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            for line in lines.feed(data):
                self._handle_line(line)
            # A host that stops reading replies stops being read: the outbox stays bounded.
            await self._outbox.wait_room()

    def _receiver(self) -> Callable[[], Awaitable[bytes | bytearray]]:
        """How the reader takes bytes: straight from the descriptor where there is one.

        Reading the descriptor until it would block, and only then parking on it, costs one
        wakeup per burst of requests instead of one scheduler pass per read; after a run of
        reads that never blocked the reader yields once, so it cannot starve other tasks.
        """
        stream = self._stream
        fd = -1
        if isinstance(stream, trio.SocketStream):
            fd = stream.socket.fileno()
        elif isinstance(stream, trio.StapledStream) and isinstance(
            stream.receive_stream, trio.lowlevel.FdStream
        ):
            fd = stream.receive_stream.fileno()
        if fd < 0:
            return functools.partial(stream.receive_some, 1 << 18)
        unbroken = 0

        async def receive() -> bytes:
            nonlocal unbroken
            while True:
                try:
                    data = os.read(fd, 1 << 18)
                except BlockingIOError:
                    unbroken = 0
                    await trio.lowlevel.wait_readable(fd)
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError from exc
                unbroken += 1
                if unbroken >= 16:
                    unbroken = 0
                    await trio.lowlevel.checkpoint()
                return data

        return receive

    def _post(self, frame: bytes) -> None:
        self._outbox.put_nowait(self._outbox.epoch, frame)

    def _handle_line(self, line: bytes) -> None:
        """Dispatch one received frame. Never raises: a bad frame gets an error frame."""
        if line is protocol.LineBuffer.OVERSIZED:
            self._post(
                protocol.encode_err(
                    CONTROL_ID, InvalidArgument(f"frame longer than {self._max_frame} bytes")
                )
            )
            return
        try:
            request = protocol.decode_request(line)
        except GuestError as exc:
            self._post(protocol.encode_err(CONTROL_ID, exc))
            return
        op = request.op
        try:
            if op == "ping":
                self._post(protocol.encode_ok(request.id))
            elif op == "credit":
                call = self._calls.get(request.id)
                if call is not None:
                    call.add_credit(protocol.decode_args(op, request.args).bytes)
            elif op == "input":
                call = self._calls.get(request.id)
                if call is not None:
                    call.feed_input(protocol.decode_args(op, request.args))
            elif op == "cancel":
                call = self._calls.get(request.id)
                if call is not None:
                    call.cancel()
            elif op == "hello":
                self._hello(request.id, protocol.decode_args(op, request.args))
            elif op == "keepalive":
                pass
            else:
                self._start(request)
        except GuestError as exc:
            self._post(protocol.encode_err(request.id, exc))

    def _start(self, request: protocol.Request) -> None:
        handler = self._handlers.get(request.op)
        if handler is None:
            raise Unimplemented(f"unknown op {request.op!r}")
        if request.id <= CONTROL_ID:
            raise InvalidArgument("request ids must be positive")
        if request.id in self._calls:
            raise InvalidArgument(f"request id {request.id} is already in use")
        args = protocol.decode_args(request.op, request.args)
        epoch = self._outbox.epoch
        if handler.inline:
            reply = Reply(self._outbox, epoch, request.id)
            inline: InlineHandler = handler.fn  # type: ignore[assignment]
            try:
                inline(reply, args)
            except GuestError as exc:
                reply.err(exc)
            except Exception as exc:
                log.exception("%s: %s failed", self.name, request.op)
                reply.err(Internal(f"{type(exc).__name__}: {exc}"))
            return
        if len(self._calls) >= MAX_CALLS:
            raise ResourceExhausted(f"more than {MAX_CALLS} requests in flight")
        call = Call(
            self._outbox, epoch, request.id, request.op, self._window, self._input_window
        )
        self._calls[request.id] = call
        assert self._nursery is not None
        self._nursery.start_soon(self._run, call, handler.fn, args)

    async def _run(self, call: Call, fn: Any, args: Any) -> None:
        reply = Reply(self._outbox, call._epoch, call.id)
        try:
            with call.scope:
                result = await fn(call, args)
                reply.ok(result)
            if call.scope.cancelled_caught:
                reply.err(call.error or Canceled("request cancelled"))
        except Exception as exc:
            error = _single_guest_error(exc)
            if error is None:
                log.exception("%s: %s failed", self.name, call.op)
                error = Internal(f"{type(exc).__name__}: {exc}")
            reply.err(error)
        finally:
            call.close()
            if self._calls.get(call.id) is call:
                del self._calls[call.id]

    # -- sessions ----------------------------------------------------------------------------

    def _hello(self, id: int, hello: protocol.Hello) -> None:
        """Answer a hello; a new session nonce first ends everything of the old session."""
        if hello.session != self._session:
            calls, self._calls = self._calls, {}
            for call in calls.values():
                call.close()
                call.cancel()
            self._outbox.new_epoch()
            self._session = hello.session
        self._window = max(hello.window, 0)
        # The leading newline ends whatever partial line the host may hold from before.
        self._post(b"\n" + protocol.encode_ok(id, self._agent.hello_info(hello.session)))

    def _announce(self) -> None:
        info = self._agent.hello_info("")
        self._post(b"\n" + protocol.encode_event(CONTROL_ID, "hello", info))

    # -- writing -----------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        take = self._outbox.take
        send = self._stream.send_all
        outbox = self._outbox
        while True:
            data = await take()
            try:
                await send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The host went away; the reader sees the end of the stream and stops us.
                self._broken = True
                await trio.sleep_forever()
            finally:
                outbox.busy = False
            self._last_write = time.monotonic()

    async def _drain(self) -> None:
        while not self._outbox.empty:
            await trio.sleep(0.01)

    async def _keepalive_loop(self) -> None:
        frame = protocol.encode_event(CONTROL_ID, "keepalive", protocol.Keepalive())
        while True:
            await trio.sleep(self._keepalive)
            # Only an idle, empty line needs one; frames piling up behind a stuck host do not.
            if self._outbox.empty and time.monotonic() - self._last_write >= self._keepalive:
                self._post(frame)
