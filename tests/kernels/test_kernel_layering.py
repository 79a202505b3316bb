"""The kernels layer imports nothing above it, and reads NLGRAPH_BACKEND in one place."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import nlgraph.kernels.attention  # noqa: F401 - registers the op
from nlgraph._errors import BackendUnavailableError
from nlgraph.kernels import _dispatch, forced_backend

KERNELS = Path(__file__).resolve().parents[2] / "nlgraph" / "kernels"
ABOVE = ("compiler", "library", "train", "optim", "evals", "cli")
OPS = ("attention", "deep_memory", "linear_memory", "momentum_memory", "optimizer")


def test_importing_every_kernel_pulls_nothing_from_above():
    mods = [f"nlgraph.kernels.{op}" for op in OPS]
    mods += [f"nlgraph.kernels.{op}.{m}" for op in OPS for m in ("api", "naive")]
    mods += [f"nlgraph.kernels.{op}.triton" for op in OPS if (KERNELS / op / "triton.py").exists()]
    code = (
        f"import sys, nlgraph.kernels\nfor m in {mods!r}: __import__(m)\n"
        f"bad = [m for m in sys.modules if m.split('.')[:2] in "
        f"[['nlgraph', p] for p in {ABOVE!r}]]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NLGRAPH_BACKEND"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]


def test_no_kernel_source_names_a_package_above_it():
    pattern = re.compile(rf"\bnlgraph\.({'|'.join(ABOVE)})\b")
    hits = [
        f"{p.relative_to(KERNELS)}:{i}: {line.strip()}"
        for p in sorted(KERNELS.rglob("*.py"))
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line) and ("import" in line)
    ]
    assert not hits, hits


def test_every_op_folder_has_the_same_layout():
    for op in OPS:
        names = {p.name for p in (KERNELS / op).glob("*.py")}
        assert {"__init__.py", "api.py", "naive.py"} <= names, (op, sorted(names))
        public = {n for n in names if not n.startswith("_")}
        assert public <= {"api.py", "naive.py", "chunk.py", "triton.py", "flat.py"}, (op, public)


def test_one_reader_of_the_environment_variable():
    """Within the kernels every op asks the dispatcher (``forced_backend``)."""
    readers = [
        str(p.relative_to(KERNELS))
        for p in sorted(KERNELS.rglob("*.py"))
        if re.search(r"\benviron\b|\bgetenv\b", p.read_text())
        and "NLGRAPH_BACKEND" in p.read_text()
    ]
    assert readers == ["_dispatch.py"], readers


@pytest.mark.parametrize(("value", "want"), [("", None), ("auto", None), ("reference", "reference"),
                                            ("chunk", "chunk"), ("triton", "triton")])  # fmt: skip
def test_forced_backend_reads_the_variable(value, want, monkeypatch):
    monkeypatch.setenv("NLGRAPH_BACKEND", value)
    assert forced_backend() == want


def test_forced_backend_refuses_an_unknown_name(monkeypatch):
    monkeypatch.setenv("NLGRAPH_BACKEND", "fused")
    with pytest.raises(BackendUnavailableError, match="'fused'.*reference, chunk, triton"):
        forced_backend()
    with pytest.raises(BackendUnavailableError, match="'fused'"):
        _dispatch.resolve_backend("attention")
