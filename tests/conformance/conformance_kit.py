"""A live ``cube serve`` in a subprocess, for tests and benchmarks that drive it over HTTP.

The driver comes from ``CUBE_TEST_DRIVER``: by default ``ns`` as root on Linux (what
``cube serve`` runs there), else ``process``; the state dir is a fresh temp dir; the port is
a free one on 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["LiveServer", "free_port"]

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def default_driver() -> str:
    """``ns`` as root on Linux, as ``cube serve`` picks; ``process`` otherwise."""
    return "ns" if sys.platform.startswith("linux") and os.geteuid() == 0 else "process"


class LiveServer:
    """One ``cube serve`` process; ``start()`` returns once its API answers."""

    def __init__(
        self,
        *,
        driver: str | None = None,
        pools: dict[str, int] | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.driver = driver or os.environ.get("CUBE_TEST_DRIVER") or default_driver()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = "e2b_" + secrets.token_hex(20)
        # Short: unix socket paths of the slots live under it.
        self.state_dir = tempfile.mkdtemp(prefix="cube-", dir="/tmp")
        self.pools = pools or {"base": 3, "code-interpreter-v1": 1}
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = Path(self.state_dir) / "serve.log"

    def env(self) -> dict[str, str]:
        """The environment an SDK client needs to reach this server."""
        return {"E2B_API_KEY": self.api_key, "E2B_API_URL": self.url, "E2B_SANDBOX_URL": self.url}

    def _write_config(self) -> Path:
        lines = ["[pools]"]
        for template, size in self.pools.items():
            lines.append(f'"{template}" = {{ size = {size}, concurrency = 2 }}')
        path = Path(self.state_dir) / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 60.0) -> LiveServer:
        config = self._write_config()
        env = {
            **os.environ,
            "CUBE_API_KEY": self.api_key,
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        for name in ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_DEBUG", "CUBE_CONFIG"):
            env.pop(name, None)
        argv = [
            sys.executable, "-m", "cube.cli", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--driver", self.driver, "--state-dir", self.state_dir,
            "--config", str(config), "--log-level", "warning", "--no-access-log",
        ]
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cube serve exited early:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"cube serve did not answer in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Interrupt the server (it stops every sandbox), then remove its state dir."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
