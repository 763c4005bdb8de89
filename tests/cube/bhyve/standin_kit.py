"""Stand-ins for FreeBSD's ``bhyve``, ``bhyvectl`` and ``ifconfig``, for contract tests.

``install_standins(directory)`` writes one Python script under the three names. Every call
appends ``{"tool", "argv", "pid"}`` to ``calls.jsonl`` in that directory, so a test reads
back exactly what the driver ran. They behave as much of the contract as the driver can see:

* ``bhyve ... NAME`` serves the virtio-console ports of its ``-s N,virtio-console,...``
  argument as unix sockets (one connection at a time, as bhyve does): the agent port answers
  ``hello`` and ``ping`` (anything else: ``unimplemented``), the control port answers every
  command ``ok`` and records it as tool ``ctl``. It exits with the status a test writes to
  ``exit-NAME`` (``StandinHost.exit_vm``). ``-r STATE`` with a missing STATE exits 1, as a
  failed restore does.
* ``bhyvectl --vm=NAME --suspend=FILE`` writes FILE, FILE.kern and FILE.meta, then makes
  that bhyve exit 0; ``--force-poweroff`` makes it exit 1; ``--destroy`` only records.
* ``ifconfig tap create`` / ``bridge create`` print a new ``tapN`` / ``bridgeN``; ``ifconfig
  NAME`` succeeds when the interface exists; ``name``, ``destroy`` keep that list.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

STANDIN = r"""#!@PYTHON@
import json, os, socket, sys, threading, time, uuid

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.basename(sys.argv[0])
LINKS = os.path.join(HERE, "links")


def record(tool, argv):
    with open(os.path.join(HERE, "calls.jsonl"), "a") as f:
        f.write(json.dumps({"tool": tool, "argv": argv, "pid": os.getpid()}) + "\n")


def set_exit(vm, code):
    with open(os.path.join(HERE, f"exit-{vm}.tmp"), "w") as f:
        f.write(str(code))
    os.replace(os.path.join(HERE, f"exit-{vm}.tmp"), os.path.join(HERE, f"exit-{vm}"))


def ifconfig(args):
    os.makedirs(LINKS, exist_ok=True)
    if len(args) == 2 and args[1] == "create":
        n = 0
        while os.path.exists(os.path.join(LINKS, f"{args[0]}{n}")):
            n += 1
        open(os.path.join(LINKS, f"{args[0]}{n}"), "w").close()
        print(f"{args[0]}{n}")
        return 0
    link = os.path.join(LINKS, args[0])
    if not os.path.exists(link):
        return 1
    if len(args) >= 3 and args[1] == "name":
        os.rename(link, os.path.join(LINKS, args[2]))
    elif args[1:] == ["destroy"]:
        os.unlink(link)
    return 0


def bhyvectl(args):
    vm = next(a.split("=", 1)[1] for a in args if a.startswith("--vm="))
    for a in args:
        if a.startswith("--suspend="):
            state = a.split("=", 1)[1]
            for suffix, data in (("", "memory"), (".kern", "kernel"), (".meta", json.dumps({"vmname": vm}))):
                with open(state + suffix, "w") as f:
                    f.write(data)
            set_exit(vm, 0)
        elif a == "--force-poweroff":
            set_exit(vm, 1)
    return 0


def serve(path, handle):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    while True:
        conn, _ = listener.accept()
        with conn:
            buffer = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    reply = handle(line)
                    if reply:
                        conn.sendall(reply)


def agent(boot):
    def handle(line):
        try:
            frame = json.loads(line)
        except ValueError:
            return b""
        rid, op = frame.get("id", 0), frame.get("op", "")
        if op == "hello":
            args = frame.get("args") or {}
            info = {"version": 1, "session": args.get("session", ""), "boot": boot, "agent": "bhyve-standin", "pid": os.getpid()}
            return json.dumps({"id": rid, "ok": info}).encode() + b"\n"
        if op == "ping":
            return json.dumps({"id": rid, "ok": {}}).encode() + b"\n"
        if op in ("keepalive", "cancel", "credit", "input") or not rid:
            return b""
        err = {"code": "unimplemented", "message": f"the bhyve stand-in has no {op}"}
        return json.dumps({"id": rid, "err": err}).encode() + b"\n"
    return handle


def control(line):
    parts = line.decode().split()
    if not parts:
        return b""
    record("ctl", parts[1:])
    return f"{parts[0]} ok\n".encode()


def bhyve(args):
    name = args[-1]
    exit_file = os.path.join(HERE, f"exit-{name}")
    if os.path.exists(exit_file):
        os.unlink(exit_file)
    if "-r" in args:
        state = args[args.index("-r") + 1]
        if not os.path.exists(state):
            print(f"Failed to read checkpoint info {state}", file=sys.stderr)
            return 1
    boot = uuid.uuid4().hex
    for i, a in enumerate(args):
        if a == "-s" and ",virtio-console," in args[i + 1]:
            ports = args[i + 1].split(",", 2)[2].split(",")
            for port in ports:
                port_name, path = port.split("=", 1)
                handler = agent(boot) if port_name == "agent" else control
                threading.Thread(target=serve, args=(path, handler), daemon=True).start()
    while not os.path.exists(exit_file):
        time.sleep(0.01)
    with open(exit_file) as f:
        code = int(f.read())
    os.unlink(exit_file)
    return code


record(TOOL, sys.argv[1:])
main = {"ifconfig": ifconfig, "bhyvectl": bhyvectl, "bhyve": bhyve}[TOOL]
sys.stdout.flush()
os._exit(main(sys.argv[1:]))
"""


class StandinHost:
    """The stand-in tools in ``directory`` and what they recorded."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.bhyve = str(directory / "bhyve")
        self.bhyvectl = str(directory / "bhyvectl")
        self.ifconfig = str(directory / "ifconfig")

    def calls(self, tool: str | None = None) -> list[list[str]]:
        """The argv (without the program) of every recorded call, of one tool or all."""
        path = self.directory / "calls.jsonl"
        if not path.exists():
            return []
        found = []
        for line in path.read_text().splitlines():
            call: dict[str, Any] = json.loads(line)
            if tool is None or call["tool"] == tool:
                found.append(call["argv"])
        return found

    def exit_vm(self, vm: str, code: int) -> None:
        """Make the stand-in bhyve running VM ``vm`` exit with ``code``."""
        tmp = self.directory / f"exit-{vm}.tmp"
        tmp.write_text(str(code))
        tmp.replace(self.directory / f"exit-{vm}")

    def links(self) -> list[str]:
        """The interfaces the stand-in ifconfig knows (taps and bridges)."""
        links = self.directory / "links"
        return sorted(os.listdir(links)) if links.is_dir() else []


def install_standins(directory: Path) -> StandinHost:
    """Write the stand-in tools into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    script = STANDIN.replace("@PYTHON@", sys.executable)
    for tool in ("bhyve", "bhyvectl", "ifconfig"):
        path = directory / tool
        path.write_text(script)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return StandinHost(directory)
