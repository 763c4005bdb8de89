"""Finding the sandbox a request is for, and its guest client.

Sandbox traffic names its sandbox by header or host name; ``SandboxDirectory.resolve`` turns
that id into a ``Target`` (the journal record and the connected ``GuestClient``) or raises
``SandboxGone``, which the edge answers with the proxy's 502 (docs/e2b-protocol.md §6).
"""

from __future__ import annotations

import re
from typing import Final

from actors import ActorError, ReplyError

from ..guestlink import GetClient, GuestClient
from ..node import Node
from ..registry import Get, ResumeSandbox, StateConflict
from ..registry import List as ListLive
from ..registry import NotFound as RegistryNotFound
from ..store import Phase, SandboxRecord
from .errors import SandboxGone

__all__ = ["SANDBOX_ID", "SandboxDirectory", "Target"]

SANDBOX_ID: Final = re.compile(r"^[a-z0-9]{20}$")


class Target:
    """The sandbox a request acts on: its record and its connected guest client."""

    __slots__ = ("client", "record")

    def __init__(self, record: SandboxRecord, client: GuestClient) -> None:
        self.record = record
        self.client = client

    @property
    def id(self) -> str:
        return self.record.id


class SandboxDirectory:
    """Resolves sandbox ids to running sandboxes for the sandbox-traffic surfaces."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def record(self, sandbox_id: str) -> SandboxRecord:
        """The record of a bound sandbox, in any live state; ``SandboxGone`` otherwise."""
        if not SANDBOX_ID.match(sandbox_id):
            raise SandboxGone(sandbox_id[:40])
        try:
            record: SandboxRecord = await self.node.services.registry.call(Get(sandbox_id))
        except RegistryNotFound:
            raise SandboxGone(sandbox_id) from None
        return record

    async def resolve(self, sandbox_id: str) -> Target:
        """The running sandbox ``sandbox_id`` with its guest client; ``SandboxGone`` otherwise."""
        record = await self.record(sandbox_id)
        if record.state == Phase.PAUSED and record.auto_resume:
            # E2B's lifecycle.auto_resume: traffic wakes a paused sandbox.
            try:
                record = await self.node.services.registry.call(
                    ResumeSandbox(sandbox_id, self.node.config.default_timeout), timeout=60
                )
            except StateConflict:
                record = await self.record(sandbox_id)  # someone else resumed it first
            except (ActorError, ReplyError):
                raise SandboxGone(sandbox_id) from None
        if record.state != Phase.RUNNING:
            raise SandboxGone(sandbox_id)
        system = self.node.services.system
        try:
            guest = system.lookup(f"{self.node.services.root}/sandboxes/{sandbox_id}/guest")
            client: GuestClient = await guest.call(GetClient(), timeout=10)
        except (ActorError, ReplyError):
            raise SandboxGone(sandbox_id) from None
        return Target(record, client)

    async def running(self) -> list[SandboxRecord]:
        """Every running sandbox (for finding the one that signed a file URL)."""
        records: list[SandboxRecord] = await self.node.services.registry.call(
            ListLive(state=[Phase.RUNNING.value])
        )
        return records
