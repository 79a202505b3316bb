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
from nlgraph.graph import Graph
from nlgraph.level import GraphSpec
from nlgraph.validation import validate

__all__ = ["compile", "CompiledLearner", "Plan"]


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
    if backend not in ("auto", "reference", "chunk", "triton"):
        raise CompileError(
            f"unknown backend {backend!r}; expected auto, reference, chunk or triton"
        )
    bad = {k: v for k, v in dims.items() if not isinstance(v, int) or v < 1}
    if bad:
        raise CompileError(f"widths must be positive ints, got {bad}")
    plan = make_plan(spec, dict(dims), backend)
    learner = CompiledLearner(plan, backend).to(device=device, dtype=dtype)
    if torch_compile:
        learner.compile_program(**(torch_compile if isinstance(torch_compile, dict) else {}))
    return learner
