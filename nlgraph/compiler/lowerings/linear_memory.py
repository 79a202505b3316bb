"""Lowering ``linear_memory``: a matrix memory under one ``gd`` or ``dgd`` step with retention
(linear attention, RetNet, DeltaNet, gated DeltaNet, DGD), as one call of
:func:`nlgraph.kernels.linear_memory.linear_memory` over the sequence (chunked WY/UT form).

Per head, with column-vector read-out ``M k`` (PAPER.md 0.4):

    dot, gd:   M_t = a_t M_{t-1} + lr_t v_t k_t^T                         (Eq. 64)
    l2,  gd:   M_t = a_t M_{t-1} (I - lr_t k_t k_t^T) + lr_t v_t k_t^T      (Eq. 65)
    dgd:       M_t = M_{t-1} (a_t I - e_t k_t k_t^T) - e_t delta_t k_t^T    (Eq. 88)

with ``delta = -v`` (dot) or ``M k - v`` (l2), and ``e = lr / (1 + lr |k|^2)`` for exact DGD.
"""

from __future__ import annotations

from typing import Any

import torch

from nlgraph._errors import CompileError
from nlgraph.compiler import ir
from nlgraph.compiler.lowerings._backend import backend_for
from nlgraph.compiler.lowerings._owner import MemoryOwner
from nlgraph.compiler.lowerings._scalars import gate
from nlgraph.compiler.lowerings._state import heads
from nlgraph.kernels.linear_memory import linear_memory

__all__ = ["LinearMemory", "run_linear_memory", "read_linear_memory"]


def run_linear_memory(
    owner: Any, cfg: ir.LinearMemoryConfig, args: tuple, prev: Any
) -> tuple[tuple, Any]:
    """``(read-outs [B, T, H * dv], final state [B, H, dv, dk])`` over the sequence."""
    H = cfg.heads
    k, v = heads(args[0], H, cfg.key_norm), heads(args[1], H, cfg.value_norm)
    queries = [heads(args[2 + i], H, n) for i, n in enumerate(cfg.query_norms)]
    B, T = k.shape[0], k.shape[1]
    if len(queries) > 1:
        raise CompileError(f"level {cfg.name!r}: a linear memory is read by one query")
    rule = cfg.rule
    lr = gate(owner.scalars, cfg, rule.lr, "lr", args, k)
    retain = gate(owner.scalars, cfg, rule.retain, "retain", args, k)
    dot = cfg.objective.kind == "dot"
    if isinstance(rule, ir.DGDStep):
        # W <- W (a I - e k k^T) - e delta k^T with delta = d objective / d (M k):
        # -v for the dot objective, M k - v for L2 (whose decay along k then counts twice).
        e = lr / (1.0 + lr * (k * k).sum(-1)) if rule.exact else lr
        b, c = (e, e) if dot else (2.0 * e, e)
    elif dot:
        b, c = None, lr
    else:
        b, c = lr, lr
    m0 = prev if prev is not None else _initial(owner, cfg, B)
    q = queries[0] if queries else k
    o, final = linear_memory(
        q, k, v, retain, b, c, initial_state=m0, read="after" if cfg.read_after else "before",
        chunk_size=cfg.chunk, backend=backend_for(owner.backend, "linear_memory"),
    )  # fmt: skip
    return (o.reshape(B, T, -1),), final


def read_linear_memory(
    owner: Any, cfg: ir.LinearMemoryConfig, args: tuple, prev: Any
) -> tuple[tuple, Any]:
    """The read-only pass: every query reads the state the segment starts from."""
    queries = [heads(args[2 + i], cfg.heads, n) for i, n in enumerate(cfg.query_norms)]
    B, T = args[0].shape[0], args[0].shape[1]
    m = prev if prev is not None else _initial(owner, cfg, B)
    outs = tuple(torch.einsum("bhvk,bthk->bthv", m, q).reshape(B, T, -1) for q in queries)
    return outs, prev


def _initial(owner: Any, cfg: ir.LinearMemoryConfig, B: int) -> torch.Tensor:
    return owner.initial_weight("M").expand(B, -1, -1, -1)


class LinearMemory(MemoryOwner):
    """The ``linear_memory`` lowering of one memory: its initial state, learned scalars and run."""

    def run(self, args: tuple, prev: Any, writes: bool) -> tuple[tuple, Any]:
        return (run_linear_memory if writes else read_linear_memory)(self, self.cfg, args, prev)
