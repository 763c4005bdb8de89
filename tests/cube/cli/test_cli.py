"""The cube CLI's client commands against a live `cube serve` (process driver)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import pytest

KEY = "e2b_" + "c" * 40


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    state = tempfile.mkdtemp(prefix="cube-cli-", dir="/tmp")
    port = free_port()
    env = {**os.environ, "CUBE_API_KEY": KEY}
    argv = [sys.executable, "-m", "cube.cli", "serve", "--port", str(port), "--driver", "process"]
    process = subprocess.Popen(
        [*argv, "--state-dir", state, "--no-access-log"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield url
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    shutil.rmtree(state, ignore_errors=True)


def cube(url: str, *args: str, key: str = KEY) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CUBE_API_KEY": key}
    return subprocess.run(
        [sys.executable, "-m", "cube.cli", args[0], "--url", url, *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_create_ls_exec_kill_round_trip(server: str) -> None:
    created = cube(server, "create", "--metadata", "owner=cli")
    assert created.returncode == 0, created.stderr
    sandbox = created.stdout.strip()
    assert len(sandbox) == 20
    listed = cube(server, "ls")
    assert sandbox in listed.stdout and "owner=cli" in listed.stdout
    ran = cube(server, "exec", sandbox, "--", "sh", "-c", "echo out; echo err >&2; exit 4")
    assert (ran.returncode, ran.stdout, ran.stderr) == (4, "out\n", "err\n"), ran.stderr
    assert cube(server, "kill", sandbox).returncode == 0
    assert sandbox not in cube(server, "ls").stdout


def test_tree_prints_the_live_supervision_tree(server: str) -> None:
    tree = cube(server, "tree")
    assert tree.returncode == 0
    assert "node [supervisor running]" in tree.stdout and "registry [worker" in tree.stdout


def test_errors_are_reported_with_a_nonzero_status(server: str) -> None:
    missing = cube(server, "kill", "a" * 20)
    assert missing.returncode == 1 and "404" in missing.stderr
    refused = cube(server, "ls", key="e2b_" + "0" * 40)
    assert refused.returncode == 1 and "401" in refused.stderr
