"""Layers import downward only (DESIGN.md 4, STYLE.md 1): between subpackages, inside the
compiler (no import circle), and at run time (what importing a layer pulls in).

Every ``import`` statement counts, at module level or inside a function: an import placed in
a function to dodge a cycle is still a dependency.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1] / "nlgraph"
SPEC = "spec"  # the top-level modules of nlgraph: the torch-free spec layer
# What each layer may import besides itself and the spec layer.
ALLOWED = {
    SPEC: set(),
    "kernels": set(),
    "library": set(),
    "visualize": set(),
    "compiler": {"kernels"},
    # The drop-in optimizers (SGD, Adam, ...) are the library's optimizer graphs, compiled.
    "optim": {"compiler", "kernels", "library"},
    "train": {"optim", "compiler", "kernels", "library", "visualize"},
    "evals": {"train", "optim", "compiler", "kernels", "library", "visualize"},
    # The optimizer benchmark trains with the optimizers on the trainer's corpus.
    "bench_optim": {"train", "optim", "compiler", "kernels", "library"},
    "cli": {
        "train",
        "evals",
        "bench_optim",
        "optim",
        "compiler",
        "kernels",
        "library",
        "visualize",
    },
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, me: str | None = None) -> set[str]:
    """Every nlgraph module ``path`` (module ``me``) imports, relative imports resolved."""
    me = me or _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            for a in node.names:  # "from pkg import submodule" depends on the submodule
                sub = f"{base}.{a.name}"
                out.add(sub if sub in MODULES else base)
    return {m for m in out if m == "nlgraph" or m.startswith("nlgraph.")}


def _layer(module: str) -> str:
    parts = module.split(".")
    if module == "nlgraph.__main__":  # ``python -m nlgraph``: the command line
        return "cli"
    if len(parts) == 1:
        return SPEC
    return parts[1] if (ROOT / parts[1]).is_dir() else SPEC


SOURCES = sorted(ROOT.rglob("*.py"))
MODULES = {_module_name(p) for p in SOURCES}


def _edges():
    for path in SOURCES:
        src = _module_name(path)
        for dst in _imports(path):
            if dst in MODULES:
                yield src, dst


# Upward imports that are kept on purpose, with the reason.
EXCEPTIONS = {
    # A Graph draws itself in a notebook (its _repr_svg_ imports visualize when called).
    ("nlgraph.graph", "nlgraph.visualize"),
}


def test_layers_import_downward_only():
    bad = sorted(
        f"{src} imports {dst}"
        for src, dst in _edges()
        if _layer(dst) not in {_layer(src), SPEC, *ALLOWED[_layer(src)]}
        and (src, dst.split(".")[0] + "." + dst.split(".")[1]) not in EXCEPTIONS
    )
    assert not bad, "\n".join(bad)


def test_no_import_circle_in_the_compiler():
    g = nx.DiGraph()
    for src, dst in _edges():
        if src.startswith("nlgraph.compiler") and dst.startswith("nlgraph.compiler"):
            g.add_edge(src, dst)
    cycles = list(nx.simple_cycles(g))
    assert not cycles, cycles[:5]


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("nlgraph", ("torch",)),
        ("nlgraph.compiler", ("nlgraph.library",)),
        # nlgraph.kernels, with every op folder: tests/kernels/test_kernel_layering.py
    ],
)  # fmt: skip
def test_importing_a_layer_pulls_in_nothing_above_it(module, forbidden):
    code = (
        f"import sys, {module}\n"
        f"bad = [m for m in sys.modules if any(m == f or m.startswith(f + '.') "
        f"for f in {forbidden!r})]\n"
        "assert not bad, bad\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "NLGRAPH_BACKEND"}
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0, res.stderr[-2000:]


READ = re.compile(
    r"(environ\.get|environ\[|getenv)\(?\s*(\"NLGRAPH_BACKEND\"|'NLGRAPH_BACKEND'|ENV_VAR)"
)


def test_one_module_reads_the_backend_variable():
    readers = sorted(str(p.relative_to(ROOT)) for p in SOURCES if READ.search(p.read_text()))
    assert readers == ["kernels/_dispatch.py"], readers
    assert READ.search('os.environ.get("NLGRAPH_BACKEND", "auto")')  # the pattern can match


def test_the_checks_can_fail(tmp_path):
    """The import parser sees imports inside functions and relative ones, and the layer rule
    refuses a kernel that imports the compiler."""
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    from ..compiler import plan\n    import nlgraph.library\n")
    found = _imports(f, "nlgraph.kernels.probe")
    assert found == {"nlgraph.compiler.plan", "nlgraph.library"}
    assert all(_layer(d) not in {"kernels", SPEC, *ALLOWED["kernels"]} for d in found)
