"""The actor benchmark runs end to end and reports what docs/actors.md §5.8 asks for.

Only the shape of the report is checked, never a timing: the machine is noisy, and the
``--quick`` sizes are too small for the figures to mean much.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "actors.py"

RATIOS = [
    "cast_vs_raw",
    "burst_vs_raw",
    "call_vs_raw",
    "call_p99_vs_raw_p99",
    "restart_vs_raw_rtt",
    "tree10k_kb_per_actor_vs_raw",
    "tree10k_build_s",
    "tree10k_stop_s",
    "tree10k_snapshot_s",
]
RAW = [
    "T_raw_msg_per_s",
    "RTT_raw_us",
    "RTT_raw_p99_us",
    "SPAWN_raw_us",
    "STOP_raw_us",
    "MEM_raw_kb",
    "RESTART_raw_us",
]
GOALS = [
    "cast_vs_raw",
    "burst_vs_raw",
    "call_vs_raw",
    "call_p99_vs_raw_p99",
    "restart_vs_raw_rtt",
    "tree10k_kb_per_actor_vs_raw",
    "tree10k_build_s",
    "tree10k_stop_s",
]


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout.strip()
    assert out.count("\n") == 0, f"expected one line of JSON, got:\n{out[:2000]}"
    parsed = json.loads(out)
    assert isinstance(parsed, dict)
    return parsed


def _positive_finite(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def test_the_report_has_every_ratio_as_a_finite_positive_number(report: dict[str, Any]) -> None:
    bad = {name: report.get(name) for name in RATIOS if not _positive_finite(report.get(name))}
    assert not bad


def test_the_report_has_every_raw_baseline_as_a_finite_positive_number(
    report: dict[str, Any],
) -> None:
    raw = report["raw"]
    bad = {name: raw.get(name) for name in RAW if not _positive_finite(raw.get(name))}
    assert not bad


def test_every_kernel_figure_is_a_finite_positive_number(report: dict[str, Any]) -> None:
    kernel = report["kernel"]
    assert kernel
    zero_allowed = {"burst_awaits_per_msg"}  # zero if the mailbox never filled
    bad = {
        name: value
        for name, value in kernel.items()
        if not (_positive_finite(value) or (name in zero_allowed and value == 0))
    }
    assert not bad


def test_every_goal_says_its_value_target_and_verdict(report: dict[str, Any]) -> None:
    goals = report["goals"]
    missing = [name for name in GOALS if name not in goals]
    assert not missing
    for name, goal in goals.items():
        assert _positive_finite(goal["value"]), name
        assert _positive_finite(goal["goal"]), name
        assert goal["op"] in (">=", "<="), name
        assert isinstance(goal["met"], bool), name
        assert goal["value"] == report[name], name


def test_the_report_names_the_interpreter_and_trio_versions(report: dict[str, Any]) -> None:
    assert report["python"].count(".") == 2
    assert report["trio"]
    assert report["quick"] is True
    assert report["runs"] >= 1


def test_the_tree_cases_build_a_tree_of_ten_thousand_actors(report: dict[str, Any]) -> None:
    assert report["kernel"]["tree_actors"] >= 10_000
