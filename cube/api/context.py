"""What every surface of the API shares: the node, the keys, the limits, the server's nursery."""

from __future__ import annotations

from typing import Final

import msgspec
import trio

from ..node import Node
from .auth import ApiKeys
from .bodies import Decoders
from .metrics import ApiMetrics
from .sandboxes import SandboxDirectory

__all__ = ["ENVD_PORT", "INTERPRETER_PORT", "ApiContext", "Limits"]

ENVD_PORT: Final = 49983
INTERPRETER_PORT: Final = 49999


class Limits(msgspec.Struct, frozen=True):
    """Request size limits, in bytes."""

    rest_body: int = 1 << 20
    rpc_message: int = 4 << 20
    upload: int = 1 << 30
    execute_body: int = 16 << 20


class ApiContext:
    """The state the apps share; one per server, passed to each app's factory."""

    def __init__(
        self,
        node: Node,
        keys: ApiKeys,
        nursery: trio.Nursery,
        *,
        metrics: ApiMetrics | None = None,
        limits: Limits | None = None,
        domain: str | None = None,
    ) -> None:
        self.node = node
        self.keys = keys
        self.nursery = nursery
        self.metrics = metrics or ApiMetrics()
        self.limits = limits or Limits()
        self.domain = domain
        self.directory = SandboxDirectory(node)
        self.decoders = Decoders()
