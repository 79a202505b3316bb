"""The backend a lowering hands a kernel: the learner's choice, unless the environment forces
one (read by the kernels' dispatcher, the only reader of ``NLGRAPH_BACKEND``)."""

from __future__ import annotations

from nlgraph.kernels import _dispatch

__all__ = ["backend_for"]


def backend_for(chosen: str, op: str | None = None) -> str:
    """``chosen`` (the learner's backend) or the forced one, as kernel ``op`` takes it:
    ``auto`` passes through (each kernel picks by device), ``triton`` falls back to ``chunk``
    for ops without a Triton kernel."""
    forced = _dispatch.forced_backend() or chosen
    return forced if op is None else _dispatch.for_op(op, forced)
