"""The ``cube`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio

from actors import open_actor_system
from supervisors import ChildSpec, Reaper, Supervisor

__all__ = ["main"]


async def serve(args: argparse.Namespace) -> None:
    """Start the node's supervision tree and print it; runs until interrupted."""
    async with open_actor_system("cube") as system:
        await system.spawn(
            Supervisor([ChildSpec(id="reaper", start=Reaper)], intensity=3, period=5.0),
            "node",
        )
        print("cube: node started (the HTTP API is not built yet); supervision tree:", flush=True)
        print(system.dump(), flush=True)
        if args.once:
            return
        await trio.sleep_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cube", description="E2B-compatible sandboxes on trio actors")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the sandbox node")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=3000)
    serve_parser.add_argument("--once", action="store_true", help="start, print the tree, stop")
    args = parser.parse_args(argv)
    if args.command == "serve":
        try:
            trio.run(serve, args)
        except KeyboardInterrupt:
            print("cube: stopped", file=sys.stderr)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
