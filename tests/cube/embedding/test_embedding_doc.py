"""docs/embedding.md's example is real code: the doc shows the runnable file as it is, and the
file runs, prints what the doc says it prints, and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "embedding.md"
EXAMPLE = ROOT / "docs" / "example_embedding.py"


def doc_section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def test_the_docs_example_is_the_runnable_file_verbatim() -> None:
    block = re.search(r"```python\n(.*?)```", doc_section("A complete example"), re.S)
    assert block is not None, "the example section has no python block"
    assert block.group(1) == EXAMPLE.read_text()


def test_the_example_runs_prints_what_the_doc_shows_and_leaves_nothing() -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    shown = re.findall(r"It prints:\n\n```\n(.*?)```", doc_section("A complete example"), re.S)
    assert len(shown) == 1, "the doc shows the example's output once"
    expected = shown[0].splitlines()
    printed = done.stdout.splitlines()
    assert len(printed) == len(expected), done.stdout
    assert re.fullmatch(r"created [a-z0-9]{20}", printed[0])  # a fresh sandbox id each run
    assert printed[1:] == expected[1:]
    state = re.search(r"\(state dir (/tmp/cube-\w+)\)", done.stderr)
    assert state is not None, "the process driver names its state dir in its warning"
    assert not os.path.exists(state.group(1)), "the example removes its state dir"
    leftover = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert not [line for line in leftover.stdout.splitlines() if state.group(1) in line]
