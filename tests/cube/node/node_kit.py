"""Helpers for node tests: configuration for a real node on the process driver, and probes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cube.config import NodeConfig, load_config


def node_config(state_dir: Path, pool_size: int = 1, **overrides: object) -> NodeConfig:
    settings: dict[str, object] = {
        "state_dir": str(state_dir),
        "driver": "process",
        "pools": {"base": {"size": pool_size, "concurrency": 1}},
        "templates": {"base": {}},
    }
    settings.update(overrides)
    return load_config(env={}, overrides=settings)


def envd_processes(state_dir: Path) -> list[str]:
    """Command lines of envd processes serving this state dir (none must outlive a test)."""
    found = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return [line for line in found.stdout.splitlines() if "guest.envd" in line and str(state_dir) in line]


def pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
