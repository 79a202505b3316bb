"""The compiler: plan a multi-rate schedule, lower each level, emit a PyTorch learner.

``nlgraph.compiler.compile(graph, d=64, ...)`` validates the graph, binds its symbolic widths,
builds a :class:`~nlgraph.compiler.plan.Plan` (printable, invariant-checked) and returns a
:class:`~nlgraph.compiler.runtime.CompiledLearner`.
"""

from __future__ import annotations

import torch

from nlgraph._errors import CompileError
from nlgraph.compiler.plan import Plan, make_plan
from nlgraph.compiler.runtime import CompiledLearner
from nlgraph.compiler.system import SystemSplit, optimizer_levels, split_system
from nlgraph.graph import Graph
from nlgraph.level import GraphSpec
from nlgraph.validation import validate

__all__ = [
    "compile", "CompiledLearner", "Plan", "symbolic_widths", "MAX_WIDTH", "SystemSplit",
    "optimizer_levels", "split_system",
]  # fmt: skip


MAX_WIDTH = 1 << 16  # the largest value a symbolic width may take (docs/cli.md, "Limits")


def symbolic_widths(spec: GraphSpec) -> set[str]:
    """The symbolic widths (``"d"``, ``"d_head"``) the graph's inputs and states name."""
    names: set[str] = {i.dim for i in spec.inputs if isinstance(i.dim, str)}
    for lv in spec.levels:
        st = lv.state
        for field in ("d_in", "d_out", "width", "dim"):
            value = getattr(st, field, None)
            if isinstance(value, str):
                names.add(value)
        names.update(d for d in getattr(st, "shape", ()) if isinstance(d, str))
    return names


def compile(  # noqa: A001 - mirrors torch.compile
    graph: Graph | GraphSpec,
    *,
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    torch_compile: bool | dict = False,
    **dims: int,
) -> CompiledLearner:
    """Lower ``graph`` into a :class:`CompiledLearner`.

    Args:
        graph: a graph or its spec.
        backend: ``"auto"``, ``"reference"`` (token loops, the truth) or ``"chunk"``; the
            environment variable ``NLGRAPH_BACKEND`` overrides it.
        dtype, device: where parameters and initial states live.
        torch_compile: run the generated program under ``torch.compile`` (a dict passes
            options, e.g. ``{"fullgraph": True}``). Graph breaks that remain: see docs/compiler.md.
        **dims: values for the graph's symbolic widths (``d=64``).
    """
    spec = graph.spec if isinstance(graph, Graph) else graph
    validate(spec)
    held = optimizer_levels(spec)
    if held and spec.inputs:
        raise CompileError(
            f"graph {spec.name!r} holds optimizer levels ({', '.join(map(repr, held))}) beside "
            "its learner; compile the whole system with nlgraph.optim.compile_system (or drop "
            "them and choose a torch.optim optimizer)"
        )
    if backend not in ("auto", "reference", "chunk", "triton"):
        raise CompileError(
            f"unknown backend {backend!r}; expected auto, reference, chunk or triton"
        )
    bad = {k: v for k, v in dims.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise CompileError(f"widths must be positive ints, got {bad}")
    huge = {k: v for k, v in dims.items() if v > MAX_WIDTH}
    if huge:
        raise CompileError(
            f"widths {huge} exceed {MAX_WIDTH:,} (one square layer of that width would take "
            f"{MAX_WIDTH**2 * 4 / 2**30:.0f} GiB); pass a smaller width"
        )
    known = symbolic_widths(spec)
    unknown = sorted(set(dims) - known)
    if unknown:
        names = ", ".join(sorted(known)) if known else "none: every width is a number"
        raise CompileError(
            f"graph {spec.name!r} has no symbolic width {', '.join(map(repr, unknown))} (its "
            f"symbolic widths: {names}); bind only those"
        )
    plan = make_plan(spec, dict(dims), backend)
    learner = CompiledLearner(plan, backend).to(device=device, dtype=dtype)
    if torch_compile:
        learner.compile_program(**(torch_compile if isinstance(torch_compile, dict) else {}))
    return learner
