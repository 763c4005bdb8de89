"""guest.envd: the in-sandbox agent's command line.

    python -m guest.envd --listen unix:PATH | --device PATH | --vsock PORT | --stdio [options]

Argument parsing comes first and imports nothing heavy, so ``--help`` (and a bad command line)
costs almost nothing; trio and the services load only when envd really starts.
"""

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse envd's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m guest.envd",
        description="The cube in-sandbox agent: processes, files and code contexts over NDJSON.",
    )
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", metavar="unix:PATH", help="listen on a unix socket")
    where.add_argument("--device", metavar="PATH", help="serve a character device (virtio-console)")
    where.add_argument("--vsock", metavar="PORT", type=int, help="listen on an AF_VSOCK port")
    where.add_argument("--stdio", action="store_true", help="serve stdin/stdout")
    parser.add_argument(
        "--default-user",
        default="user",
        help="user requests act as by default (falls back to envd's own user if it is missing "
        "or envd is not root; default: %(default)s)",
    )
    parser.add_argument("--default-workdir", help="directory for requests that name none")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a sandbox-wide env var for every process (repeatable; envd.configure replaces them)",
    )
    parser.add_argument(
        "--watcher",
        choices=["auto", "inotify", "kqueue", "poll"],
        default="auto",
        help="filesystem watch backend (default: the best available)",
    )
    parser.add_argument(
        "--poll-interval", type=float, default=0.2, help="seconds between polls (poll watcher)"
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter for code contexts")
    parser.add_argument(
        "--subreaper",
        action="store_true",
        help="adopt orphaned daemons (Linux PR_SET_CHILD_SUBREAPER) so process trees stay whole",
    )
    parser.add_argument(
        "--keepalive",
        type=float,
        default=15.0,
        help="send a keepalive frame after this many idle seconds (0: never)",
    )
    parser.add_argument("--verbose", action="store_true", help="log at debug level")
    args = parser.parse_args(argv)
    if args.listen is not None and not args.listen.startswith("unix:"):
        parser.error("--listen takes unix:PATH (use --vsock PORT for vsock)")
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env takes KEY=VALUE, not {item!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run envd until the host closes stdio or a signal stops it."""
    args = parse_args(argv)
    import logging

    import trio

    from guest.agent import Config, serve

    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="envd %(levelname)s %(name)s: %(message)s",
    )
    config = Config(
        unix=args.listen.removeprefix("unix:") if args.listen else None,
        device=args.device,
        vsock=args.vsock,
        stdio=args.stdio,
        default_user=args.default_user,
        default_workdir=args.default_workdir,
        env=tuple((key, value) for key, _, value in (item.partition("=") for item in args.env)),
        watcher=args.watcher,
        poll_interval=args.poll_interval,
        python=args.python,
        subreaper=args.subreaper,
        keepalive=args.keepalive,
        verbose=args.verbose,
    )
    trio.run(serve, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
