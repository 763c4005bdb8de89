"""The sandbox node and its Python API, for the HTTP server and for research harnesses.

    async with open_node(config) as node:
        sbx = await node.create("base")
        result = await sbx.run("echo hello")
        await sbx.files.write("notes.txt", b"hi")
        execution = await sbx.execute("1 + 1")
        await sbx.kill()

The node is one supervision tree (docs/node.md)::

    /node                     Supervisor, REST_FOR_ONE
        store                 the SQLite journal
        reaper                the host reaper: owns every sandbox process
        sandboxes             DynamicSupervisor: one group per sandbox (cube/sandbox.py)
        registry              lifecycle truth of bound sandboxes (cube/registry.py)
        pools                 Supervisor: one Pool per template (cube/pool.py)
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

import msgspec
import trio

from actors import ActorRef, ActorSystem, ReplyError, TreeSnapshot, open_actor_system
from guest import protocol
from supervisors import (
    INFINITY,
    REST_FOR_ONE,
    TEMPORARY,
    ChildSpec,
    DynamicSupervisor,
    Reaper,
    Supervisor,
    terminate_child,
)

from .config import NodeConfig, load_config
from .drivers.base import Driver
from .guestlink import GetClient, GuestClient
from .netpolicy import (
    EgressPolicy,
    NetPolicyDriver,
    NftConfig,
    NftPolicy,
    NoNetPolicy,
    resolv_conf_nameservers,
)
from .pool import Bound, Pool, Take
from .registry import (
    Get,
    Kill,
    Lookup,
    PauseSandbox,
    Register,
    Registry,
    ResumeSandbox,
    SetTimeout,
)
from .sandbox import Unpark, UpdatePolicy, sandbox_group
from .store import Insert, Page, Phase, SandboxRecord, Store
from .store import List as ListRecords

__all__ = ["CommandResult", "Node", "NodeServices", "SandboxHandle", "open_node"]

log = logging.getLogger("cube.node")


def make_driver(config: NodeConfig) -> Driver:
    """The isolation driver the configuration names (``auto`` resolved)."""
    name = config.resolved_driver()
    if name == "process":
        from .drivers.process import ProcessDriver

        return ProcessDriver(config.state_dir)  # type: ignore[no-any-return]
    if name == "ns":
        from .drivers.ns import NsDriver

        gateway = config.subnet.replace(".0.0/16", ".0.1")
        return NsDriver(config.state_dir, bridge=config.bridge, gateway=gateway, prefix_len=16)
    if name == "qemu":
        from .drivers.qemu import QemuConfig, QemuDriver

        gateway = config.subnet.replace(".0.0/16", ".0.1")
        qemu = QemuConfig(bridge=config.bridge, gateway=gateway, prefix_len=16)
        return QemuDriver(config.state_dir, config=qemu)  # type: ignore[no-any-return]
    raise ValueError(f"the {name} driver cannot run on this host")


class NodeServices:
    """What the node's actors share: configuration, drivers, and refs to the node's actors.

    Refs are looked up by path, so they stay right across restarts of those actors.
    """

    def __init__(
        self,
        system: ActorSystem,
        config: NodeConfig,
        driver: Driver,
        policy: NetPolicyDriver,
        root: str = "/node",
    ) -> None:
        self.system = system
        self.config = config
        self.driver = driver
        self.policy = policy
        self.root = root

    def ref(self, name: str) -> ActorRef[Any]:
        return self.system.lookup(f"{self.root}/{name}")

    @property
    def store(self) -> ActorRef[Any]:
        return self.ref("store")

    @property
    def reaper(self) -> ActorRef[Any]:
        return self.ref("reaper")

    @property
    def sandboxes(self) -> ActorRef[Any]:
        return self.ref("sandboxes")

    @property
    def registry(self) -> ActorRef[Any]:
        return self.ref("registry")

    def pool(self, template: str) -> ActorRef[Any]:
        return self.ref(f"pools/{template}")


class CommandResult(msgspec.Struct, frozen=True):
    """The outcome of ``SandboxHandle.run``."""

    stdout: str
    stderr: str
    exit_code: int
    error: str | None = None


class Files:
    """A sandbox's filesystem (``sbx.files``)."""

    def __init__(self, sandbox: SandboxHandle) -> None:
        self._sandbox = sandbox

    async def write(self, path: str, data: bytes | str, *, user: str | None = None) -> protocol.EntryInfo:
        content = data.encode() if isinstance(data, str) else data
        client = await self._sandbox.client()
        args = protocol.FsWrite(path=path, user=user)
        async with client.open_stream("fs.write", args) as stream:
            await stream.send_input(content, eof=True)
            result: protocol.EntryResult = await stream.wait()
        return result.entry

    async def read(self, path: str, *, user: str | None = None) -> bytes:
        client = await self._sandbox.client()
        chunks: list[bytes] = []
        async with client.open_stream("fs.read", protocol.FsRead(path=path, user=user)) as stream:
            async for ev, body in stream:
                if ev == "data":
                    chunks.append(body.data)
        return b"".join(chunks)

    async def list(self, path: str, *, depth: int = 1, user: str | None = None) -> list[protocol.EntryInfo]:
        client = await self._sandbox.client()
        result = await client.call("fs.list", protocol.FsList(path=path, depth=depth, user=user))
        return list(result.entries)

    async def remove(self, path: str, *, user: str | None = None) -> None:
        client = await self._sandbox.client()
        await client.call("fs.remove", protocol.FsRemove(path=path, user=user))


class SandboxHandle:
    """A bound sandbox, for use from Python: commands, files, code, lifecycle."""

    def __init__(self, node: Node, info: SandboxRecord) -> None:
        self.node = node
        self.info = info
        self.id = info.id
        self.files = Files(self)
        self._client: GuestClient | None = None

    def __repr__(self) -> str:
        return f"<Sandbox {self.id} {self.info.template}>"

    async def client(self) -> GuestClient:
        """The connected guest client (re-fetched after a reconnect)."""
        client = self._client
        if client is None or client.closed:
            guest = self.node.services.system.lookup(f"/node/sandboxes/{self.id}/guest")
            client = self._client = await guest.call(GetClient())
        return client

    async def stream(
        self,
        cmd: str,
        *,
        user: str | None = None,
        cwd: str | None = None,
        envs: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[tuple[str, Any]]:
        """Run ``cmd`` with ``/bin/bash -l -c`` and yield ``(event, body)`` as they come."""
        client = await self.client()
        args = protocol.ProcessStart(
            process=protocol.ProcessConfig(
                cmd="/bin/bash", args=["-l", "-c", cmd], envs=dict(envs or {}), cwd=cwd
            ),
            user=user,
            stdin=False,
            timeout_ms=int(timeout * 1000) if timeout else 0,
        )
        async with client.open_stream("process.start", args) as stream:
            async for event in stream:
                yield event

    async def run(self, cmd: str, **kwargs: Any) -> CommandResult:
        """Run ``cmd`` to completion and collect its output."""
        out: list[bytes] = []
        err: list[bytes] = []
        ended: protocol.ProcessEnded | None = None
        async for ev, body in self.stream(cmd, **kwargs):
            if ev == "data":
                if body.stdout:
                    out.append(body.stdout)
                if body.stderr:
                    err.append(body.stderr)
            elif ev == "end":
                ended = body
        assert ended is not None
        return CommandResult(
            stdout=b"".join(out).decode(errors="replace"),
            stderr=b"".join(err).decode(errors="replace"),
            exit_code=ended.exit_code,
            error=ended.error,
        )

    async def execute(self, code: str, *, language: str | None = None, context_id: str | None = None) -> dict[str, Any]:
        """Run code in the sandbox's code interpreter; returns its events and count."""
        client = await self.client()
        events: dict[str, list[Any]] = {"stdout": [], "stderr": [], "result": [], "error": []}
        args = protocol.Execute(code=code, language=language, context_id=context_id)
        async with client.open_stream("code.execute", args) as stream:
            async for ev, body in stream:
                events.setdefault(ev, []).append(body)
            done: protocol.ExecuteDone = stream.result
        return {**events, "execution_count": done.execution_count}

    async def set_timeout(self, seconds: float) -> None:
        self.info = await self.node.services.registry.call(SetTimeout(self.id, seconds))

    async def pause(self) -> None:
        self.info = await self.node.services.registry.call(PauseSandbox(self.id), timeout=60)

    async def resume(self) -> None:
        self.info = await self.node.services.registry.call(ResumeSandbox(self.id), timeout=60)

    async def kill(self) -> None:
        self.info = await self.node.services.registry.call(Kill(self.id), timeout=None)

    async def refresh(self) -> SandboxRecord:
        self.info = await self.node.services.registry.call(Get(self.id))
        return self.info


class Node:
    """A running node: create, find and list sandboxes; see the supervision tree."""

    def __init__(self, services: NodeServices) -> None:
        self.services = services
        self.config = services.config

    async def create(
        self,
        template: str = "base",
        *,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        envs: Mapping[str, str] | None = None,
        network: EgressPolicy | None = None,
        take_timeout: float = 60.0,
        on_timeout: Literal["kill", "pause"] = "kill",
        auto_resume: bool = False,
        network_spec: Mapping[str, Any] | None = None,
    ) -> SandboxHandle:
        """Bind a warm sandbox of ``template`` and return it; the pool refills behind it.

        ``on_timeout``, ``auto_resume`` and ``network_spec`` (E2B's ``network`` object as the
        client gave it) are recorded for the API to show.
        """
        services = self.services
        if template not in self.config.templates:
            raise KeyError(f"unknown template {template!r}")
        seconds = self.config.default_timeout if timeout is None else timeout
        if not 0 <= seconds <= self.config.max_timeout:
            raise ValueError(f"timeout must be between 0 and {self.config.max_timeout:g} s")
        pool = services.pool(template)
        slot = await pool.call(Take(hold_refill=True), timeout=take_timeout)
        try:
            state = slot.state
            if slot.parked:  # the hot tier: its guest waits stopped (cube/pool.py)
                await services.system.lookup(f"{slot.group.path}/isolation").call(Unpark(), timeout=30.0)
            client = await services.system.lookup(f"{slot.group.path}/guest").call(GetClient())
            if envs:
                await client.call("envd.configure", protocol.Configure(envs=dict(envs)))
            if network is not None and network != state.policy:
                await services.system.lookup(f"{slot.group.path}/net").call(UpdatePolicy(network))
            t = self.config.templates[template]
            now = time.time()
            record = SandboxRecord(
                id=state.id,
                template=template,
                driver=services.driver.name,
                state=Phase.RUNNING,
                instance=state.instance,
                metadata=dict(metadata or {}),
                env_vars=dict(envs or {}),
                allow_internet_access=(network or state.policy).allow_internet,
                network=dict(network_spec or {}),
                on_timeout=on_timeout,
                auto_resume=auto_resume,
                cpu_count=max(1, round(t.cpus)),
                memory_mb=t.memory_mb,
                disk_mb=t.disk_mb,
                started_at=now,
                end_at=now + seconds,
                envd_access_token=secrets.token_urlsafe(24),
                traffic_access_token=secrets.token_urlsafe(24),
            )
            await services.store.call(Insert(record))
            info = await services.registry.call(Register(record, state, slot.group))
        except BaseException:
            # taken from the pool but never bound: nobody else would ever stop it
            with trio.CancelScope(shield=True):
                try:
                    await terminate_child(services.sandboxes, slot.state.id)
                except ReplyError:
                    pass  # it was already gone
            raise
        finally:
            pool.notify(Bound(slot.state.id))  # bound (or failed): the pool refills now
        handle = SandboxHandle(self, info)
        handle._client = client
        return handle

    async def get(self, id: str) -> SandboxHandle:
        return SandboxHandle(self, await self.services.registry.call(Get(id)))

    async def list(
        self,
        *,
        state: tuple[Phase, ...] = (Phase.RUNNING, Phase.PAUSED),
        metadata: Mapping[str, str] | None = None,
        limit: int = 100,
        next_token: str | None = None,
    ) -> Page:
        """A page of sandboxes from the journal, newest first."""
        query = ListRecords(
            state=state, metadata=dict(metadata) if metadata else None, limit=limit, next_token=next_token
        )
        return await self.services.store.call(query)

    async def kill(self, id: str) -> SandboxRecord:
        return await self.services.registry.call(Kill(id), timeout=None)

    async def lookup(self, id: str) -> Any:
        return await self.services.registry.call(Lookup(id))

    def tree(self) -> TreeSnapshot:
        """The live supervision tree of the whole node."""
        return self.services.system.tree()


def node_supervisor(services: NodeServices) -> Supervisor:
    """The node's supervision tree (see the module docstring)."""
    config = services.config
    pools = [
        ChildSpec(name, Pool, (name, config.templates[name], pool, services))
        for name, pool in config.pools.items()
    ]
    return Supervisor(
        [
            ChildSpec("store", Store, (str(config.state_path / "journal.db"),)),
            ChildSpec("reaper", Reaper),
            ChildSpec(
                "sandboxes",
                DynamicSupervisor,
                (ChildSpec("sandbox", sandbox_group, restart=TEMPORARY, shutdown=INFINITY),),
                shutdown=INFINITY,
            ),
            ChildSpec("registry", Registry, (services,)),
            ChildSpec("pools", Supervisor, (pools,), shutdown=INFINITY),
        ],
        strategy=REST_FOR_ONE,
        intensity=3,
        period=5.0,
    )


def make_policy(config: NodeConfig, driver: Driver) -> NetPolicyDriver:
    """The network policy driver: nftables for drivers that give sandboxes a network."""
    if driver.name in ("ns", "qemu"):
        nft = NftConfig(
            tag=config.tag,
            bridge=config.bridge,
            subnet=config.subnet,
            dns_servers=resolv_conf_nameservers(),
        )
        return NftPolicy(nft)  # type: ignore[no-any-return]
    return NoNetPolicy()


@asynccontextmanager
async def open_node(
    config: NodeConfig | None = None,
    *,
    system: ActorSystem | None = None,
    driver: Driver | None = None,
    policy: NetPolicyDriver | None = None,
) -> AsyncIterator[Node]:
    """Run a sandbox node for the duration of the block; every sandbox is stopped at exit."""
    config = config or load_config()
    driver = driver or make_driver(config)
    if system is None:
        async with open_actor_system("cube") as own, open_node(
            config, system=own, driver=driver, policy=policy
        ) as node:
            yield node
        return
    config.state_path.mkdir(parents=True, exist_ok=True)
    policy = policy or make_policy(config, driver)
    await policy.ensure()
    services = NodeServices(system, config, driver, policy)
    ref = await system.spawn(node_supervisor(services), "node")
    try:
        yield Node(services)
    finally:
        with trio.CancelScope(shield=True):
            await system.stop(ref)
            await policy.destroy()
            close = getattr(driver, "close", None)
            if close is not None:
                await close()
