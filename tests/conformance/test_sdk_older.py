"""An older SDK (e2b 2.45.x, which still uses the v1 create and connect routes) against the
same live server, from its own venv so that it cannot mix with the pinned 2.63 SDK."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conformance_kit import LiveServer

OLD_SDK = "e2b==2.45.*"
VENV = Path(os.environ.get("CUBE_TEST_OLD_SDK_VENV", "/var/tmp/cube-e2b-2.45"))

SCRIPT = """
import sys
from e2b import Sandbox
import e2b
sbx = Sandbox.create(timeout=60, metadata={"suite": "old-sdk"})
result = sbx.commands.run("echo hello from $((6 * 7))")
sbx.files.write("/tmp/old-sdk.txt", "kept")
assert sbx.files.read("/tmp/old-sdk.txt") == "kept"
again = Sandbox.connect(sbx.sandbox_id)
print(e2b.__version__ if hasattr(e2b, "__version__") else "?", result.stdout.strip(), again.is_running())
sbx.kill()
print("killed", sbx.is_running())
"""


@pytest.fixture(scope="module")
def old_python() -> Path:
    python = VENV / "bin" / "python"
    ready = VENV / ".ready-2.45"
    if not ready.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", OLD_SDK],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if install.returncode != 0:
            pytest.fail(f"could not install {OLD_SDK}: {install.stderr[-2000:]}")
        ready.touch()
    return python


def test_an_older_sdk_with_v1_routes_creates_runs_connects_and_kills(
    server: LiveServer, old_python: Path
) -> None:
    done = subprocess.run(
        [str(old_python), "-c", SCRIPT],
        env={**os.environ, **server.env()},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = done.stdout.strip().splitlines()
    assert first.endswith("hello from 42 True")
    assert second == "killed False"
