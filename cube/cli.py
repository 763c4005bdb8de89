"""The ``cube`` command line.

``cube serve`` runs a node and its HTTP API on one listener until interrupted::

    cube serve --host 127.0.0.1 --port 3000 --driver process --state-dir /tmp/cube

Settings come from the config file (``--config`` / ``CUBE_CONFIG``), then ``CUBE_*``
variables, then these flags. Without a configured API key, one is generated on first start,
kept in the journal and printed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

from .config import DRIVERS, ConfigError, NodeConfig, load_config

__all__ = ["main"]


def _say(message: str) -> None:
    print(f"cube: {message}", file=sys.stderr, flush=True)


async def serve(args: argparse.Namespace, config: NodeConfig) -> None:
    """Start the node and the API; print the key, the URLs and the tree; run until interrupted."""
    from .api import ensure_api_keys
    from .api import serve as serve_api
    from .api.logs import configure_logging
    from .node import open_node

    configure_logging(args.log_level, access_log=not args.no_access_log)
    async with open_node(config) as node:
        keys, generated = await ensure_api_keys(node, list(config.api_keys))
        if generated is not None:
            _say(f"API key (generated, kept in {config.state_path / 'journal.db'}): {generated}")
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                lambda task_status: serve_api(
                    node, keys, host=config.host, port=config.port, task_status=task_status
                )
            )
            url = binds[0] if binds else f"http://{config.host}:{config.port}"
            _say(f"driver {config.resolved_driver()}, state dir {config.state_dir}")
            _say(f"serving on {url}  (E2B_API_URL={url} E2B_SANDBOX_URL={url})")
            print(node.services.system.dump(), flush=True)
            if args.once:
                nursery.cancel_scope.cancel()
            else:
                nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
    _say("stopped")


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    """End the server on SIGINT or SIGTERM; the node then stops every sandbox in order."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            _say(f"{signal.Signals(signum).name}: stopping")
            scope.cancel()
            return


def _add_client_commands(commands: Any) -> None:
    """``ls``, ``create``, ``exec``, ``kill`` and ``tree``: clients of a running ``cube serve``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("CUBE_URL"), help="server (default from config)")
    common.add_argument("--api-key", help="default: CUBE_API_KEY, E2B_API_KEY, or the local journal")
    common.add_argument("--state-dir", help="the local node's state dir (for its URL and key)")
    ls = commands.add_parser("ls", parents=[common], help="list running and paused sandboxes")
    ls.add_argument("--state", choices=("running", "paused"))
    create = commands.add_parser("create", parents=[common], help="create a sandbox; prints its id")
    create.add_argument("template", nargs="?", default="base")
    create.add_argument("--timeout", type=int, help="seconds until it is killed")
    create.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    run = commands.add_parser("exec", parents=[common], help="run a command in a sandbox")
    run.add_argument("sandbox")
    run.add_argument("argv", nargs=argparse.REMAINDER, help="-- command and arguments")
    kill = commands.add_parser("kill", parents=[common], help="kill a sandbox")
    kill.add_argument("sandbox")
    commands.add_parser("tree", parents=[common], help="print the live supervision tree")


def _client_command(args: argparse.Namespace) -> int:
    from .remote import Remote, RemoteError, find_api_key

    try:
        config = load_config(overrides={"state_dir": args.state_dir})
    except ConfigError as exc:
        _say(f"configuration error: {exc}")
        return 2
    url = args.url or f"http://{config.host}:{config.port}"
    remote = Remote(url, args.api_key or find_api_key(config.state_dir))
    try:
        if args.command == "ls":
            for item in remote.sandboxes(args.state):
                meta = ",".join(f"{k}={v}" for k, v in (item.get("metadata") or {}).items())
                print(f"{item['sandboxID']}  {item['state']:8} {item['templateID']:20} {item['endAt']}  {meta}")
        elif args.command == "create":
            metadata = dict(pair.split("=", 1) for pair in args.metadata if "=" in pair)
            print(remote.create(args.template, args.timeout, metadata)["sandboxID"])
        elif args.command == "exec":
            argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not argv:
                _say("exec needs a command: cube exec ID -- cmd args...")
                return 2
            return remote.exec(args.sandbox, argv, sys.stdout.buffer, sys.stderr.buffer)
        elif args.command == "kill":
            remote.kill(args.sandbox)
        elif args.command == "tree":
            print(remote.tree(), end="")
    except RemoteError as exc:
        _say(str(exc))
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cube", description="E2B-compatible sandboxes on trio actors")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the sandbox node and its API")
    serve_parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve_parser.add_argument("--port", type=int, help="port to listen on (default 3000)")
    serve_parser.add_argument("--driver", choices=DRIVERS, help="isolation driver (default auto)")
    serve_parser.add_argument("--state-dir", help="where the node keeps its journal and sandboxes")
    serve_parser.add_argument("--config", help="TOML config file (default $CUBE_CONFIG)")
    serve_parser.add_argument("--log-level", default=os.environ.get("CUBE_LOG_LEVEL", "info"))
    serve_parser.add_argument("--no-access-log", action="store_true", help="no log line per request")
    serve_parser.add_argument("--once", action="store_true", help="start, print the tree, stop")
    _add_client_commands(commands)
    args = parser.parse_args(argv)
    if args.command != "serve":
        return _client_command(args)
    if args.command == "serve":
        overrides = {"host": args.host, "port": args.port, "driver": args.driver, "state_dir": args.state_dir}
        try:
            config = load_config(args.config, overrides=overrides)
        except ConfigError as exc:
            _say(f"configuration error: {exc}")
            return 2
        try:
            trio.run(serve, args, config)
        except KeyboardInterrupt:
            _say("stopped")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
