"""The docs' examples are real code: they run, and the copies stay in sync."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_actors_doc_example_matches_the_runnable_file():
    doc = (ROOT / "docs" / "actors.md").read_text()
    block = re.search(r"```python\n(.*?)```", doc, re.S)
    assert block is not None
    assert block.group(1) in (ROOT / "docs" / "example_tree.py").read_text()


def test_actors_doc_example_runs_and_shows_the_restart():
    done = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "example_tree.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "refused: balance is 150" in done.stdout
    assert "alice [worker running] restarts=1" in done.stdout
    assert "ValueError: negative deposit" in done.stdout


def test_readme_starts_with_the_two_setup_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    commands = [line.split("#")[0].strip() for line in lines[:6] if line.startswith("make ")]
    assert commands == ["make serve", "make test"]


def test_cube_serve_once_prints_the_supervision_tree() -> None:
    state = tempfile.mkdtemp(prefix="cube-docs-", dir="/tmp")  # envd sockets need short paths
    argv = ["serve", "--once", "--port", "0", "--driver", "process", "--state-dir", state]
    done = subprocess.run(
        [sys.executable, "-m", "cube.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=ROOT,
    )
    shutil.rmtree(state, ignore_errors=True)
    assert "node [supervisor running]" in done.stdout
    assert "reaper [worker running]" in done.stdout
