"""Lowering ``deep_memory``: an MLP memory (or a momentum-carrying matrix memory) under ``gd``
with momentum and retention (Titans), as one call of
:func:`nlgraph.kernels.deep_memory.deep_memory` over the sequence: every gradient of a chunk at
its start state, then the momentum and weight recurrences in the chunk (PAPER.md 4.1):

    S_t = mu_t S_{t-1} - lr_t grad l(M_{t'}; k_t, v_t),    M_t = a_t M_{t-1} + S_t
"""

from __future__ import annotations

from typing import Any

from nlgraph.compiler import ir
from nlgraph.compiler.lowerings._backend import backend_for
from nlgraph.compiler.lowerings._owner import MemoryOwner
from nlgraph.compiler.lowerings._scalars import gate
from nlgraph.compiler.lowerings._state import heads
from nlgraph.compiler.lowerings.mlp import mlp_forward
from nlgraph.kernels.deep_memory import deep_memory

__all__ = ["DeepMemory", "run_deep_memory", "read_deep_memory"]


def run_deep_memory(
    owner: Any, cfg: ir.DeepMemoryConfig, args: tuple, prev: Any
) -> tuple[tuple, Any]:
    """``(read-outs [B, T, H * dv] in read order, final state)`` over the sequence."""
    H = cfg.heads
    k, v = heads(args[0], H, cfg.key_norm), heads(args[1], H, cfg.value_norm)
    queries = [heads(args[2 + i], H, n) for i, n in enumerate(cfg.query_norms)]
    B, T = k.shape[0], k.shape[1]
    rule = cfg.rule
    lr = gate(owner.scalars, cfg, rule.lr, "lr", args, k)
    retain = gate(owner.scalars, cfg, rule.retain, "retain", args, k)
    mom = gate(owner.scalars, cfg, rule.momentum, "momentum", args, k)
    params0 = {f"W{i}": owner.initial_weight(f"W{i}") for i in range(1, cfg.depth + 1)}
    # The kernel's L2 objective is ||M(k) - v||^2, the DSL's 1/2 ||.||^2: halve lr.
    lr_k = lr / 2.0 if cfg.objective.kind == "l2" else lr
    forget = None if retain is None else 1.0 - retain
    outs, final = [], None
    for q in queries or [k]:
        y, final = deep_memory(
            q, k, v, lr_k, mom, forget, params0=params0, state=prev, chunk_size=cfg.chunk,
            read="after" if cfg.read_after else "chunk_start", objective=cfg.objective.kind,
            activation=cfg.activation, residual=cfg.residual,
            backend=backend_for(owner.backend, "deep_memory"),
        )  # fmt: skip
        outs.append(y.reshape(B, T, -1))
    return tuple(outs[: len(queries)]), final


def read_deep_memory(
    owner: Any, cfg: ir.DeepMemoryConfig, args: tuple, prev: Any
) -> tuple[tuple, Any]:
    """The read-only pass: every read at the state the segment's first token reads in a write
    pass (read at the chunk start: the start of the unfinished chunk, not the running state)."""
    queries = [heads(args[2 + i], cfg.heads, n) for i, n in enumerate(cfg.query_norms)]
    B, T = args[0].shape[0], args[0].shape[1]
    if prev is not None:
        src = prev["params"] if cfg.read_after else prev["chunk_start"]
        ws = [src[f"W{cfg.depth - i}"] for i in range(cfg.depth)]
    else:
        ws = [owner.initial_weight(f"W{cfg.depth - i}") for i in range(cfg.depth)]
        ws = [w.unsqueeze(0).expand(B, *w.shape) for w in ws]
    outs = tuple(
        mlp_forward(ws, q, cfg.activation, cfg.residual)[0].reshape(B, T, -1) for q in queries
    )
    return outs, prev


class DeepMemory(MemoryOwner):
    """The ``deep_memory`` lowering of one memory: its initial state, learned scalars and run."""

    def run(self, args: tuple, prev: Any, writes: bool) -> tuple[tuple, Any]:
        return (run_deep_memory if writes else read_deep_memory)(self, self.cfg, args, prev)
