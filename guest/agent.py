"""The agent: envd's supervision tree, its services wired to the protocol's ops, and serving.

envd is a small actor system (docs/actors.md)::

    envd                      Supervisor, one_for_one
    ├─ reaper                 supervisors.Reaper: adopts and reaps orphans (--subreaper, PID 1)
    ├─ processes              DynamicSupervisor of ProcessActor (temporary: never restarted)
    ├─ contexts               DynamicSupervisor of ContextActor (transient: a dead kernel is
    │                         restarted under the same context id)
    ├─ watchers               DynamicSupervisor of polled WatcherActor (transient)
    └─ watch-streams          DynamicSupervisor of streaming WatcherActor (temporary)

Channels (one per host connection) are not actors: they are the protocol's edge, and they
talk to the actors through the services, which keep the lookup tables (pid, tag, context id).
Everything a host started lives in the tree, not in the channel it came through.
"""

import functools
import os
import signal
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio

from actors import ActorSystem, open_actor_system
from guest import protocol
from guest.channel import Channel, Handler, Reply
from guest.contexts import ContextActor, ContextService
from guest.files import FileService
from guest.processes import MAX_PROCESSES, ProcessActor, ProcessService
from guest.transports import (
    DeviceStream,
    open_stdio,
    open_unix_listener,
    open_vsock_listener,
)
from guest.users import Accounts
from guest.watchers import WatcherActor, WatchService
from supervisors import (
    TEMPORARY,
    TRANSIENT,
    Backoff,
    ChildSpec,
    DynamicSupervisor,
    Reaper,
    Supervisor,
)

AGENT_NAME = "cube-envd/0.1"


@dataclass(frozen=True, slots=True)
class Config:
    """Everything envd's command line decides."""

    unix: str | None = None
    device: str | None = None
    vsock: int | None = None
    stdio: bool = False
    default_user: str = "user"
    default_workdir: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    watcher: str = "auto"
    poll_interval: float = 0.2
    python: str = sys.executable
    subreaper: bool = False
    keepalive: float = 15.0
    verbose: bool = False


class Agent:
    """envd's services, its supervision tree, and the op table the channels dispatch into."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.boot = uuid.uuid4().hex
        self.accounts = Accounts(config.default_user, config.default_workdir)
        # One dict shared by every service: envd.configure updates it in place.
        self.sandbox_env: dict[str, str] = dict(config.env)
        self.processes = ProcessService(self.accounts, self.sandbox_env)
        self.files = FileService(self.accounts)
        self.watchers = WatchService(self.accounts, config.watcher, config.poll_interval)
        self.contexts = ContextService(self.accounts, self.sandbox_env, config.python)
        self._handlers: dict[str, Handler] = {
            "envd.configure": Handler(self.configure, inline=True),
            **self.processes.handlers,
            **self.files.handlers,
            **self.watchers.handlers,
            **self.contexts.handlers,
        }
        self._capabilities = sorted(
            [*self._handlers, "pty", f"watch:{self.watchers.backend}", "lang:python", "lang:bash"]
        )

    @property
    def handlers(self) -> Mapping[str, Handler]:
        """Op name → handler."""
        return self._handlers

    def tree(self) -> Supervisor:
        """envd's root supervisor, with the children described in this module's docstring."""
        children = []
        if self.config.subreaper or os.getpid() == 1:
            children.append(ChildSpec("reaper", Reaper))
        processes = ChildSpec(
            "proc", ProcessActor, (self.processes,), restart=TEMPORARY, shutdown=10.0
        )
        contexts = ChildSpec(
            "ctx",
            ContextActor,
            (self.contexts,),
            restart=TRANSIENT,
            backoff=Backoff(min=0.05, max=2.0, reset_after=10.0),
        )
        polled = ChildSpec("watch", WatcherActor, (self.watchers,), restart=TRANSIENT)
        streams = ChildSpec("stream", WatcherActor, (self.watchers,), restart=TEMPORARY)

        def dynamic(template: ChildSpec, **options: Any) -> functools.partial[DynamicSupervisor]:
            return functools.partial(DynamicSupervisor, template, **options)

        children += [
            ChildSpec("processes", dynamic(processes, max_children=MAX_PROCESSES)),
            # A user may kill their kernel on purpose; give contexts room before escalating.
            ChildSpec("contexts", dynamic(contexts, intensity=20, period=10.0)),
            ChildSpec("watchers", dynamic(polled, intensity=20, period=10.0)),
            ChildSpec("watch-streams", dynamic(streams)),
        ]
        return Supervisor(children, intensity=3, period=5.0)

    async def start(self, system: ActorSystem) -> None:
        """Spawn the tree in ``system`` and hand the services their supervisors."""
        await system.spawn(self.tree(), "envd")
        self.processes.supervisor = system.lookup("/envd/processes")
        self.contexts.supervisor = system.lookup("/envd/contexts")
        self.watchers.polled = system.lookup("/envd/watchers")
        self.watchers.streams = system.lookup("/envd/watch-streams")

    def hello_info(self, session: str) -> protocol.HelloInfo:
        """What envd says about itself in a hello."""
        return protocol.HelloInfo(
            session=session,
            boot=self.boot,
            agent=AGENT_NAME,
            pid=os.getpid(),
            capabilities=self._capabilities,
            user=self.accounts.default.name,
            home=self.accounts.default.home,
        )

    def configure(self, reply: Reply, args: protocol.Configure) -> None:
        """``envd.configure``: sandbox-wide env vars, default user and workdir."""
        if args.default_user is not None:
            self.accounts.set_default(args.default_user)
        if args.default_workdir is not None:
            self.accounts.default_workdir = args.default_workdir or None
        if args.envs is not None:
            self.sandbox_env.clear()
            self.sandbox_env.update(args.envs)
        reply.ok()


async def _stop_on_signals(cancel_scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            cancel_scope.cancel()
            return


async def serve(
    config: Config, *, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run envd on the configured transport until the host or a signal stops it.

    Reports started (with the agent) once the transport accepts hosts. On the way out the actor
    system stops the tree in order: every process tree is killed, every kernel stopped, every
    watcher closed.
    """
    agent = Agent(config)
    async with open_actor_system("envd") as system:
        await agent.start(system)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_signals, nursery.cancel_scope)
                await _serve_transport(config, agent, nursery, task_status)
                nursery.cancel_scope.cancel()
        finally:
            agent.processes.kill_leftovers()


async def _serve_transport(
    config: Config,
    agent: Agent,
    nursery: trio.Nursery,
    task_status: trio.TaskStatus[Agent],
) -> None:
    def channel(stream: trio.abc.Stream, name: str) -> Channel:
        return Channel(stream, agent, name=name, keepalive=config.keepalive)

    if config.stdio:
        # The host owns our pipes: when it closes stdin, envd is done.
        stdio = open_stdio()
        task_status.started(agent)
        await channel(stdio, "stdio").serve()
        return
    if config.device is not None:
        device = DeviceStream(config.device)
        task_status.started(agent)
        await channel(device, config.device).serve()
        return
    if config.unix is not None:
        listener = await open_unix_listener(config.unix)
        name = f"unix:{config.unix}"
    else:
        assert config.vsock is not None
        listener = await open_vsock_listener(config.vsock)
        name = f"vsock:{config.vsock}"
    print(f"envd: listening on {name}", file=sys.stderr, flush=True)
    task_status.started(agent)
    try:
        async with listener:
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_connection, channel(stream, name))
    finally:
        if config.unix is not None:
            try:
                os.unlink(config.unix)
            except OSError:
                pass


async def _serve_connection(channel: Channel) -> None:
    try:
        await channel.serve()
    finally:
        with trio.CancelScope(shield=True):
            await channel.aclose()
