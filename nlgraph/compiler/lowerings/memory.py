"""Run one fast memory over a whole sequence: its kernel call, from its static configuration.

The generated program calls :func:`run_memory` with the memory's inputs in the order of
:class:`~nlgraph.compiler.program.MemoryCfg`: key, value, the queries of its reads, then the
flows of its data-dependent gates.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from nlgraph._errors import CompileError
from nlgraph.compiler.lowerings._scalars import bounded, scalar_value
from nlgraph.compiler.lowerings._state import at_cut, detach_state, heads, truncation_segments
from nlgraph.compiler.lowerings.mlp import mlp_forward
from nlgraph.compiler.lowerings.reference_loop import run_reference_loop
from nlgraph.compiler.program import MemoryCfg
from nlgraph.kernels import _dispatch
from nlgraph.kernels.attention import attention as attention_kernel
from nlgraph.kernels.deep_memory import deep_memory
from nlgraph.kernels.linear_memory import linear_memory

__all__ = ["gate", "backend_of", "run_memory", "attention"]


def gate(learner: Any, cfg: MemoryCfg, which: str, args: tuple, like: torch.Tensor):
    """A gate ``[B, T, H]`` (or None), from its static description."""
    B, T, H = like.shape[0], like.shape[1], cfg.heads

    def signal(i: int) -> torch.Tensor:
        if args[i].shape[-1] not in (1, H):
            raise CompileError(
                f"level {cfg.name!r}: the {which} signal has width {args[i].shape[-1]}; "
                f"expected 1 or heads={H}"
            )
        return args[i]

    def learned(spec: tuple) -> torch.Tensor:
        return bounded(learner.scalars[spec[1]], spec[2], spec[3]).to(like.dtype)

    value = scalar_value(getattr(cfg, which), learned, signal)
    if value is None or isinstance(value, torch.Tensor):
        return None if value is None else value.expand(B, T, H)
    return torch.full((B, T, H), value, dtype=like.dtype, device=like.device)


def backend_of(learner: Any, op: str | None = None) -> str:
    """The learner's backend (``NLGRAPH_BACKEND`` wins), as kernel ``op`` takes it: ``auto``
    passes through (each kernel picks by device), ``triton`` falls back to ``chunk`` for ops
    without a Triton kernel."""
    forced = os.environ.get("NLGRAPH_BACKEND") or learner.backend
    return forced if op is None else _dispatch.for_op(op, forced)


def run_memory(learner: Any, cfg: MemoryCfg, args: tuple, prev: Any) -> tuple[tuple, Any]:
    """``(read-outs in read order, final state)`` of one memory over the sequence.

    With a truncation (``truncated(k)`` edges, ``cfg.truncate`` = k chunks in tokens) the carried
    state is detached every ``k`` chunks counted from the start of the sequence, so gradients
    reach back at most that far; the state then carries its token count (``{"state": ...,
    "tokens": n}``), and a sequence run in segments detaches at the same tokens as one pass.
    """
    if cfg.truncate is None:
        return _run_segment(learner, cfg, args, prev)
    seen, inner = (0, None) if prev is None else (prev["tokens"], prev["state"])
    if not learner.writes:
        return _run_segment(learner, cfg, args, inner)[0], prev
    T, k = args[0].shape[1], cfg.truncate
    outs: list[tuple] = []
    for s, e in truncation_segments(T, [(seen, k)]):
        if at_cut(seen + s, k):
            inner = detach_state(inner)
        o, inner = _run_segment(learner, cfg, tuple(a[:, s:e] for a in args), inner)
        outs.append(o)
    outs_cat = tuple(torch.cat(parts, dim=1) for parts in zip(*outs, strict=True))
    return outs_cat, {"state": inner, "tokens": seen + T}


def _run_segment(learner: Any, cfg: MemoryCfg, args: tuple, prev: Any) -> tuple[tuple, Any]:
    if cfg.lowering == "reference_loop" and not learner.writes:
        return run_reference_loop(learner, cfg, args, prev)
    if not learner.writes and cfg.lowering != "attention":
        return _read_only(learner, cfg, args, prev)
    return _run_memory(learner, cfg, args, prev)


def _read_only(learner: Any, cfg: MemoryCfg, args: tuple, prev: Any) -> tuple[tuple, Any]:
    """Every read at the state the segment's first token reads in a write pass, no update: the
    model as a fixed network. For a deep memory read at the chunk start that is the state at
    the start of the unfinished chunk, not the running one."""
    H = cfg.heads
    queries = [heads(args[2 + i], H, n) for i, n in enumerate(cfg.query_norms)]
    B, T = args[0].shape[0], args[0].shape[1]
    if cfg.lowering == "linear_memory":
        m = prev if prev is not None else learner._initial(cfg.name, "M").expand(B, -1, -1, -1)
        outs = tuple(torch.einsum("bhvk,bthk->bthv", m, q).reshape(B, T, -1) for q in queries)
        return outs, prev
    if prev is not None:
        src = prev["params"] if cfg.read_after else prev["chunk_start"]
        ws = [src[f"W{cfg.depth - i}"] for i in range(cfg.depth)]
    else:
        ws = [learner._initial(cfg.name, f"W{cfg.depth - i}") for i in range(cfg.depth)]
        ws = [w.unsqueeze(0).expand(B, *w.shape) for w in ws]
    outs = tuple(
        mlp_forward(ws, q, cfg.activation, cfg.residual)[0].reshape(B, T, -1) for q in queries
    )
    return outs, prev


def _run_memory(learner: Any, cfg: MemoryCfg, args: tuple, prev: Any) -> tuple[tuple, Any]:
    H = cfg.heads
    k, v = heads(args[0], H, cfg.key_norm), heads(args[1], H, cfg.value_norm)
    queries = [heads(args[2 + i], H, n) for i, n in enumerate(cfg.query_norms)]
    B, T = k.shape[0], k.shape[1]
    if cfg.lowering == "reference_loop":
        return run_reference_loop(learner, cfg, args, prev)
    if cfg.lowering == "attention":
        outs, final = [], prev
        for q in queries:
            o, final = attention(cfg, q, k, v, prev, backend_of(learner, "attention"))
            outs.append(o.reshape(B, T, -1))
        if not queries:
            final = attention(cfg, k, k, v, prev, backend_of(learner, "attention"))[1]
        return tuple(outs), final
    lr = gate(learner, cfg, "lr", args, k)
    retain = gate(learner, cfg, "retain", args, k)
    if cfg.lowering == "linear_memory":
        if len(queries) > 1:
            raise CompileError(f"level {cfg.name!r}: a linear memory is read by one query")
        if cfg.rule == "dgd":
            # W <- W (a I - e k k^T) - e delta k^T with delta = d objective / d (M k):
            # -v for the dot objective, M k - v for L2 (whose decay along k then counts twice).
            e = lr / (1.0 + lr * (k * k).sum(-1)) if cfg.exact else lr
            b, c = (e, e) if cfg.objective == "dot" else (2.0 * e, e)
        elif cfg.objective == "dot":
            b, c = None, lr
        else:
            b, c = lr, lr
        m0 = prev if prev is not None else learner._initial(cfg.name, "M").expand(B, -1, -1, -1)
        q = queries[0] if queries else k
        o, final = linear_memory(
            q, k, v, retain, b, c, initial_state=m0, read="after" if cfg.read_after else "before",
            chunk_size=cfg.chunk, backend=backend_of(learner, "linear_memory"),
        )  # fmt: skip
        return (o.reshape(B, T, -1),), final
    params0 = {f"W{i}": learner._initial(cfg.name, f"W{i}") for i in range(1, cfg.depth + 1)}
    # The kernel's L2 objective is ||M(k) - v||^2, the DSL's 1/2 ||.||^2: halve lr.
    lr_k = lr / 2.0 if cfg.objective == "l2" else lr
    mom = gate(learner, cfg, "momentum", args, k)
    forget = None if retain is None else 1.0 - retain
    outs, final = [], None
    for q in queries or [k]:
        y, final = deep_memory(
            q, k, v, lr_k, mom, forget, params0=params0, state=prev, chunk_size=cfg.chunk,
            read="after" if cfg.read_after else "chunk_start", objective=cfg.objective,
            activation=cfg.activation, residual=cfg.residual,
            backend=backend_of(learner, "deep_memory"),
        )  # fmt: skip
        outs.append(y.reshape(B, T, -1))
    return tuple(outs[: len(queries)]), final


def attention(cfg: MemoryCfg, q, k, v, cache, backend: str = "auto"):
    """Causal softmax attention (Eq. 62; Eq. 63 with a window); the key/value cache is the
    memory's state."""
    return attention_kernel(
        q, k, v, cache=cache, window=cfg.window, scale=cfg.temperature, backend=backend
    )
