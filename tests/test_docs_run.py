"""Every ```python block of README.md and docs/*.md runs as written.

The convention (also stated in docs/dsl.md):

- The blocks of one file run in order in one fresh namespace, so a block may use what an earlier
  block of the same file defined; each file runs in a temporary working directory with
  ``torch.set_num_threads(1)``.
- A block that cannot run (a multi-GPU ``torchrun`` recipe, a call signature with ``...``) is a
  *sketch*: the line before its fence is ``<!-- sketch -->``. A sketch must still be valid
  Python syntax, and is the exception: prefer a small block that runs.
- Other fences (```bash, ```text, plain ```) are not Python and are not run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKETCH = "<!-- sketch -->"
_FENCE = re.compile(r"^```python\s*$")


def blocks(path: Path) -> list[tuple[int, str, bool]]:
    """``(line, code, is_sketch)`` for each ```python block of ``path``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        if _FENCE.match(lines[i]):
            sketch = i > 0 and lines[i - 1].strip() == SKETCH
            start = i + 1
            j = start
            while j < len(lines) and lines[j].strip() != "```":
                j += 1
            if j == len(lines):
                raise AssertionError(f"{path.name}:{i + 1}: a ```python block is never closed")
            out.append((start + 1, "\n".join(lines[start:j]) + "\n", sketch))
            i = j
        i += 1
    return out


def test_the_docs_have_python_blocks_to_run():
    runnable = [b for f in FILES for b in blocks(f) if not b[2]]
    assert len(runnable) >= 8


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_every_python_block_runs(path, tmp_path, monkeypatch):
    found = blocks(path)
    if not found:
        pytest.skip(f"{path.name} has no ```python blocks")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem}"}
    try:
        for line, code, sketch in found:
            where = f"{path.name}:{line}"
            compiled = compile(code, where, "exec")  # a sketch too must be Python
            if sketch:
                continue
            try:
                exec(compiled, namespace)
            except Exception as err:
                failure = f"{type(err).__name__}: {err}"
                raise AssertionError(f"{where}: the block fails: {failure}") from err
    finally:
        torch.set_num_threads(threads)
    assert os.getcwd() == str(tmp_path)


def test_a_failing_block_is_reported_with_its_line(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n```python\nx = 1\n```\n\n<!-- sketch -->\n```python\nf(...)\n```\n")
    assert blocks(doc) == [(4, "x = 1\n", False), (9, "f(...)\n", True)]
