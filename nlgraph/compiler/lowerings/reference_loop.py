"""The reference loop: an in-context memory that no kernel covers, run as the plain interpreter of
its spec (DESIGN.md 5, "anything else").

A matrix or MLP memory whose inner optimizer is a chain of rules (Newton–Schulz, preconditioning,
weight decay, EMA, several GD steps), uses Nesterov momentum, or updates less often than every
token runs here, token by token. Per token ``t`` (counted from the start of the sequence):

    g_t = autograd of the objective l(M; k_t, v_t) at the visible state M_vis
    acc += g_t                                      (the gradients since the last update)
    at an update tick of the level's frequency:     d = acc; acc = 0
        for each rule, in order:  weight_decay:  M <- (1 - rate) M
                                  precondition:  d <- d / (by_t ** power + eps)
                                  newton_schulz: d <- NS(d) (per head and layer, Muon's)
                                  gd / ema:      S <- mu S - lr d;  M <- a M + S   (or a M - lr d;
                                                 Nesterov: M <- a M + mu S - lr d; ema: lr = 1-beta)
                                  dgd:           M <- M (a I - lr' x x^T) - lr' d  (+ momentum)
    at the end of each chunk of ``chunk`` tokens:  M_vis <- M

With ``chunk = 1`` that is the exact token recurrence; a larger chunk takes every gradient of a
chunk at its start state, as the chunked lowerings do (PAPER.md 4.5). Reads ``at="new"`` see the
state after the token's update, reads ``at="prev"`` the visible state. Per-token scalars (rates,
the preconditioner) are read at the update's token. The objective is summed over the batch, so
one autograd call gives every sample's gradient (samples never mix); the gradient is taken with
``create_graph`` whenever gradients are enabled, so meta-gradients flow through every update.

The state ``{"running", "visible", "acc", "buffers", "tokens"}`` is explicit and per sample, so
segments with carried state equal one pass. The rule step (:mod:`.rules`) is shared with the
boundary updates of CMS blocks (:mod:`.boundary`).
"""

from __future__ import annotations

from typing import Any

import torch

from nlgraph._errors import CompileError
from nlgraph._resolve import resolve
from nlgraph.compiler import ir
from nlgraph.compiler.lowerings._owner import MemoryOwner
from nlgraph.compiler.lowerings._scalars import learned_value, scalar_value, scalars_of
from nlgraph.compiler.lowerings._state import heads
from nlgraph.compiler.lowerings.mlp import mlp_forward
from nlgraph.compiler.lowerings.rules import apply_rules

__all__ = [
    "ReferenceLoop", "run_reference_loop", "accumulate", "token_step", "rule_scalars", "updates_at",
]  # fmt: skip


def run_reference_loop(
    owner: Any, cfg: ir.ReferenceLoopConfig, args: tuple, prev: Any, writes: bool = True
) -> tuple[tuple, Any]:
    """``(read-outs [B, T, H * dv] in read order, final state)`` of one memory over ``args``
    (key, value, queries, then its per-token signals, all ``[B, T, ...]``)."""
    H = cfg.heads
    k, v = heads(args[0], H, cfg.key_norm), heads(args[1], H, cfg.value_norm)
    queries = [heads(args[2 + i], H, n) for i, n in enumerate(cfg.query_norms)]
    B, T = k.shape[0], k.shape[1]
    st = prev if prev is not None else _initial(owner, cfg, B)
    if not writes:
        # read-only: every read at the state the segment's first token reads in a write pass
        # (the visible state; after its update, the running one, for reads at="new")
        ws = st["running"] if cfg.read_after else st["visible"]
        outs = tuple(_mlp(cfg, ws, q)[0].reshape(B, T, -1) for q in queries)
        return outs, prev
    running, visible = list(st["running"]), list(st["visible"])
    acc, bufs, t0 = st["acc"], dict(st["buffers"]), st["tokens"]
    scalars = [rule_scalars(owner, cfg, r, args, k) for r in cfg.rules]
    reads: list[list[torch.Tensor]] = [[] for _ in queries]
    for t in range(T):
        tick = t0 + t + 1
        if not cfg.read_after:
            for i, q in enumerate(queries):
                reads[i].append(_mlp(cfg, visible, q[:, t : t + 1])[0])
        g, inputs = _inner_grad(cfg, visible, k[:, t : t + 1], v[:, t : t + 1])
        running, acc, bufs = accumulate(cfg, running, acc, bufs, scalars, g, inputs, t, tick)
        if tick % cfg.chunk == 0:
            visible = list(running)
        if cfg.read_after:
            for i, q in enumerate(queries):
                reads[i].append(_mlp(cfg, running, q[:, t : t + 1])[0])
    outs = tuple(torch.cat(r, dim=1).reshape(B, T, -1) for r in reads)
    state = {"running": running, "visible": visible, "acc": acc, "buffers": bufs,
             "tokens": t0 + T}  # fmt: skip
    return outs, state


def accumulate(cfg, running, acc, bufs, scalars, g, inputs, t: int, tick: int):
    """Token ``t`` (``tick`` counted from the sequence start) of the recurrence: its gradients
    ``g`` join the pending sum ``acc`` (None: empty), and at an update tick of the level's
    schedule the rule chain runs on the sum (:func:`token_step`, ``inputs`` each layer's input
    at the token). Returns ``(running, acc, bufs)``."""
    acc = g if acc is None else [a + b for a, b in zip(acc, g, strict=True)]
    if updates_at(cfg.schedule, cfg.chunk, tick):
        running, bufs = token_step(cfg, running, acc, bufs, scalars, inputs, t)
        acc = None
    return running, acc, bufs


def _initial(owner: Any, cfg: ir.ReferenceLoopConfig, B: int) -> dict[str, Any]:
    # layers in application order (W_L first ... W_1, the output layer, last), [B, H, out, in]
    ws = [owner.initial_weight(f"W{cfg.depth - i}") for i in range(cfg.depth)]
    ws = [w.unsqueeze(0).expand(B, *w.shape) for w in ws]
    return {"running": ws, "visible": ws, "acc": None, "buffers": {}, "tokens": 0}


def updates_at(schedule: ir.Schedule, chunk: int, tick: int) -> bool:
    """Whether the level updates at token ``tick`` (``nlgraph.clock.Frequency.updates_at`` on
    its unit: token ticks, or chunk ticks at the chunks' last tokens)."""
    unit, every, offset = schedule.unit, schedule.every, schedule.offset
    if unit == "chunk":
        if tick % chunk:
            return False
        tick //= chunk
    return (tick - offset) % every == 0 and tick >= max(offset, 1)


def _mlp(cfg: ir.ReferenceLoopConfig, ws: list[torch.Tensor], x: torch.Tensor):
    """The memory's read-out ``[B, 1, H, dv]`` of ``x [B, 1, H, dk]`` and each layer's input."""
    out, inputs, _ = mlp_forward(ws, x, cfg.activation, cfg.residual)
    return out, inputs


def _objective(cfg: ir.ReferenceLoopConfig, out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The declared objective summed over the batch and heads (nlgraph.objectives signs)."""
    obj = cfg.objective
    if obj.kind == "dot":
        return -(out * v).sum()
    if obj.kind == "l2":
        return 0.5 * ((out - v) ** 2).sum()
    if obj.kind == "lp":
        return ((out - v).abs() ** obj.p).sum() / obj.p
    return resolve(obj.path)(out, v).sum()


def _inner_grad(cfg: ir.ReferenceLoopConfig, ws: list[torch.Tensor], k: torch.Tensor, v):
    """Autograd of the objective w.r.t. each layer at ``ws``, and each layer's input there."""
    meta = torch.is_grad_enabled()  # differentiate through the inner gradient (meta-gradients)
    with torch.enable_grad():
        # a state outside the graph (a buffer, or under no_grad) becomes a leaf of its own
        leaves = [w if w.requires_grad else w.detach().requires_grad_() for w in ws]
        out, inputs = _mlp(cfg, leaves, k)
        grads = torch.autograd.grad(
            _objective(cfg, out, v), leaves, create_graph=meta, allow_unused=True
        )
    grads = [torch.zeros_like(w) if g is None else g for w, g in zip(ws, grads, strict=True)]
    if not meta:
        inputs = [x.detach() for x in inputs]
    return grads, inputs


def _per_head(cfg: ir.ReferenceLoopConfig, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    H = cfg.heads
    if x.shape[-1] not in (1, H):
        raise CompileError(
            f"level {cfg.name!r}: a per-token scalar of its rules has width {x.shape[-1]}; "
            f"expected 1 or heads={H}"
        )
    return x.expand(like.shape[0], like.shape[1], H)


def rule_scalars(owner: Any, cfg: Any, rule: ir.Rule, args: tuple, like) -> dict:
    """A memory's rule scalars: floats, learned scalar tensors, or ``[B, T, H]`` signals."""

    def learned(spec: ir.Learned) -> torch.Tensor:
        return learned_value(owner.scalars, spec, like)

    def per_token(i: int) -> torch.Tensor:
        return _per_head(cfg, args[i], like)

    return scalars_of(rule, lambda spec: scalar_value(spec, learned, per_token), per_token)


def _at(x: Any, t: int) -> Any:
    """A scalar at token ``t``: ``[B, T, H] -> [B, H]`` (floats and learned scalars as they are)."""
    return x[:, t] if isinstance(x, torch.Tensor) and x.dim() == 3 else x


def token_step(cfg, running, d, bufs, scalars, inputs, t):
    """Apply the rule chain once, with the scalars of token ``t``."""
    at = [{n: _at(v, t) for n, v in sc.items()} for sc in scalars]
    return apply_rules(cfg.rules, running, d, bufs, at, inputs, lead=2)


class ReferenceLoop(MemoryOwner):
    """The ``reference_loop`` lowering of one memory: its initial state, learned scalars, and
    the token loop."""

    def run(self, args: tuple, prev: Any, writes: bool) -> tuple[tuple, Any]:
        return run_reference_loop(self, self.cfg, args, prev, writes)
