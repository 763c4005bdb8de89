"""A minimal QMP (QEMU Machine Protocol) client on trio.

QMP is JSON objects, one per line, over the unix socket QEMU opens with
``-qmp unix:PATH,server=on,wait=off``. QEMU greets, the client enters command mode with
``qmp_capabilities``, then each command gets one ``return`` or ``error`` reply; asynchronous
``event`` objects may arrive between them. QEMU serves one QMP client per socket at a time, so
the driver opens a connection per operation and closes it after (``open_qmp``); nothing stays
connected between operations, which is also what lets a restarted service re-adopt a VM.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from cube.drivers.base import DriverError

__all__ = ["Qmp", "QmpError", "open_qmp"]

# A QMP reply is small; anything longer than this is not QEMU talking.
MAX_LINE = 1 << 20
# Events kept for inspection (the newest ones), e.g. STOP, RESUME, SHUTDOWN, MIGRATION.
EVENT_HISTORY = 64


class QmpError(DriverError):
    """QEMU answered a command with an error, or the QMP connection failed."""

    def __init__(self, message: str, *, error_class: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class


class Qmp:
    """One open QMP connection in command mode. Commands run one at a time."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._lock = trio.Lock()
        self.greeting: dict[str, Any] = {}
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=EVENT_HISTORY)

    async def _read_object(self) -> dict[str, Any]:
        """The next JSON object QEMU sends; raises QmpError if the connection ends first."""
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as e:
                    raise QmpError(f"QMP sent a line that is not JSON: {line[:200]!r}") from e
                if not isinstance(obj, dict):
                    raise QmpError(f"QMP sent a non-object: {line[:200]!r}")
                return obj
            if len(self._buffer) > MAX_LINE:
                raise QmpError("QMP sent an over-long line")
            try:
                chunk = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise QmpError("QMP connection lost") from e
            if not chunk:
                raise QmpError("QMP connection closed by QEMU")
            self._buffer += chunk

    async def _handshake(self) -> None:
        greeting = await self._read_object()
        if "QMP" not in greeting:
            raise QmpError(f"not a QMP greeting: {greeting!r}")
        self.greeting = greeting["QMP"]
        await self.execute("qmp_capabilities")

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``command`` and return its ``return`` value; an ``error`` reply raises QmpError.

        Blocks until QEMU replies (callers bound it with a cancel scope); events that arrive
        meanwhile go to ``events``.
        """
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        async with self._lock:
            try:
                await self._stream.send_all(json.dumps(message).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                raise QmpError(f"QMP connection lost sending {command}") from e
            while True:
                reply = await self._read_object()
                if "event" in reply:
                    self.events.append(reply)
                elif "return" in reply:
                    return reply["return"]
                elif "error" in reply:
                    error = reply["error"]
                    raise QmpError(
                        f"QMP {command}: {error.get('desc', error)}",
                        error_class=error.get("class", ""),
                    )

    async def quit(self) -> None:
        """Ask QEMU to exit; QEMU may close the connection before it replies."""
        try:
            await self.execute("quit")
        except QmpError as e:
            if e.error_class:  # a real error reply, not the connection closing
                raise

    async def status(self) -> str:
        """The VM's run state: "running", "paused", "inmigrate", "postmigrate", ..."""
        reply = await self.execute("query-status")
        return str(reply.get("status", ""))

    async def aclose(self) -> None:
        await self._stream.aclose()


@asynccontextmanager
async def open_qmp(
    path: str,
    *,
    timeout: float = 10.0,
    alive: Callable[[], bool] | None = None,
) -> AsyncIterator[Qmp]:
    """Connect to QEMU's QMP socket at ``path`` and enter command mode.

    Retries while the socket is not there yet (QEMU is starting) for up to ``timeout``
    seconds, giving up early when ``alive`` says QEMU has exited. Raises QmpError.
    """
    qmp: Qmp | None = None
    last_error: Exception | None = None
    with trio.move_on_after(timeout):
        while qmp is None:
            if alive is not None and not alive():
                raise QmpError(f"QEMU exited before its QMP socket {path} answered")
            if os.path.exists(path):
                try:
                    stream = await trio.open_unix_socket(path)
                except OSError as e:
                    last_error = e
                else:
                    candidate = Qmp(stream)
                    try:
                        await candidate._handshake()
                        qmp = candidate
                    except QmpError as e:
                        last_error = e
                    finally:
                        if qmp is None:  # failed or cancelled: do not leak the socket
                            with trio.CancelScope(shield=True):
                                await candidate.aclose()
                    if qmp is not None:
                        break
            await trio.sleep(0.01)
    if qmp is None:
        raise QmpError(f"no QMP answer on {path} within {timeout} s ({last_error})")
    try:
        yield qmp
    finally:
        with trio.CancelScope(shield=True):
            await qmp.aclose()
