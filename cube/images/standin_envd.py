"""A stand-in guest agent that answers a few NDJSON requests on a virtio-console port.

It is baked into images built with ``agent="standin"`` to test the channel, the boot and
snapshot/restore without the real ``guest.envd``. It imports only the standard library (it runs
inside the guest as ``python3 -m cube_standin_envd --device PATH``) and speaks the framing of
guest/protocol.py: ``hello`` and ``ping`` as envd does, plus ``echo`` (returns its args),
``count`` (increments and returns a counter kept in memory, which shows that a restored VM kept
its memory) and ``sh`` (runs a shell command, returns its exit code and output).

A virtio-console port has no connections: while no host is attached, ``read`` returns nothing
and writes block, so an empty read means "wait for a host", not "end of input".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import uuid
from typing import Any

# How long to wait before reading again while no host is attached to the port.
IDLE_POLL = 0.02


def answer(request: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The reply frame for one request frame."""
    rid = request.get("id", 0)
    op = request.get("op", "")
    args = request.get("args") or {}
    if op == "hello":
        info = {
            "version": 1,
            "session": args.get("session", ""),
            "boot": state["boot"],
            "agent": "cube-standin",
            "pid": os.getpid(),
        }
        return {"id": rid, "ok": info}
    if op == "ping":
        return {"id": rid, "ok": {}}
    if op == "echo":
        return {"id": rid, "ok": args}
    if op == "count":
        state["count"] += 1
        return {"id": rid, "ok": {"count": state["count"]}}
    if op == "sh":
        done = subprocess.run(
            ["/bin/sh", "-c", args.get("cmd", "")], capture_output=True, text=True, check=False
        )
        return {
            "id": rid,
            "ok": {"code": done.returncode, "stdout": done.stdout, "stderr": done.stderr},
        }
    return {
        "id": rid,
        "err": {"code": "unimplemented", "message": f"the stand-in agent has no op {op!r}"},
    }


def serve(device: str) -> None:
    """Answer requests on ``device`` forever."""
    fd = os.open(device, os.O_RDWR)
    state: dict[str, Any] = {"boot": uuid.uuid4().hex, "count": 0}
    pending = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            pending = b""  # the host went away: a partial line belonged to it
            time.sleep(IDLE_POLL)
            continue
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
            except ValueError:
                reply = {"id": 0, "err": {"code": "invalid_argument", "message": "not JSON"}}
            else:
                if request.get("op") in ("keepalive", "cancel", "credit"):
                    continue
                reply = answer(request, state)
            os.write(fd, json.dumps(reply).encode() + b"\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", required=True)
    serve(parser.parse_args().device)


if __name__ == "__main__":
    main()
