"""The node benchmark runs end to end and reports what issue 4 §5 asks for, per driver.

Only the shape of the report is checked, never a timing: the machine is noisy, and the
``--quick`` sizes are too small for the figures to mean much.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "node.py"

REQUIRED = [
    "create_p50_ms",
    "create_p99_ms",
    "create_c10_p50_ms",
    "creates_per_s",
    "run_true_p50_ms",
    "idle_uss_mb",
    "baseline_spawn_ms",
]
GOALS = ["create_p50_le_5ms", "idle_uss_le_8mb", "hold_200_ok"]


def drivers() -> list[str]:
    if sys.platform.startswith("linux") and os.geteuid() == 0:
        return ["process", "ns"]
    return ["process"]


@pytest.fixture(scope="module")
def run() -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--quick", "--drivers", ",".join(drivers())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )


@pytest.fixture(scope="module")
def report(run: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(run.stdout)  # exactly one JSON object on stdout
    return parsed


def test_there_is_one_entry_per_driver_asked_for(report: dict[str, Any]) -> None:
    assert sorted(report) == sorted(drivers())


@pytest.mark.parametrize("driver", drivers())
def test_every_required_figure_is_a_finite_positive_number(
    report: dict[str, Any], driver: str
) -> None:
    figures = report[driver]
    missing = [key for key in REQUIRED if key not in figures]
    assert not missing, f"{driver} lacks {missing}"
    for key, value in figures.items():
        if key == "goals" or isinstance(value, bool):
            continue
        values = value if isinstance(value, list) else [value]
        for number in values:
            assert isinstance(number, (int, float)), f"{driver}.{key} = {value!r}"
            assert math.isfinite(number) and number > 0, f"{driver}.{key} = {value!r}"


@pytest.mark.parametrize("driver", drivers())
def test_the_goals_are_reported_as_met_or_not(report: dict[str, Any], driver: str) -> None:
    goals = report[driver]["goals"]
    assert sorted(goals) == sorted(GOALS)
    assert all(isinstance(goals[key], bool) for key in GOALS[:2])
    assert goals["hold_200_ok"] is None  # --quick holds no 200 sandboxes


def test_progress_goes_to_stderr_and_every_state_dir_is_removed(
    run: subprocess.CompletedProcess[str],
) -> None:
    state_dirs = re.findall(r"^ +state dir (/tmp/cube-nb-\w+)$", run.stderr, re.M)
    assert len(state_dirs) == len(drivers()), run.stderr
    assert not [path for path in state_dirs if os.path.exists(path)]
