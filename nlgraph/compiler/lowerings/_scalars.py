"""Scalars of update rules, shared by every lowering: the static description of a scalar
(constant, learned, per-token signal) turned into a value, and shaped to scale a tensor."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

from nlgraph._errors import CompileError
from nlgraph.compiler import ir

__all__ = ["SIGNAL_ACT", "bounded", "scalar_value", "scalars_of", "shaped", "learned_value", "gate"]

SIGNAL_ACT = {
    "identity": lambda x: x, "sigmoid": torch.sigmoid, "softplus": F.softplus, "exp": torch.exp,
}  # fmt: skip


def bounded(raw: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    """A learned scalar kept in its declared range (sigmoid for [lo, hi], softplus for >= lo)."""
    if lo is not None and hi is not None:
        return lo + (hi - lo) * torch.sigmoid(raw)
    if lo is not None:
        return lo + F.softplus(raw)
    return raw


def scalar_value(spec: ir.Scalar, learned: Any, signal: Any) -> Any:
    """A rule's scalar: None, a float, ``learned(spec)``, or ``act(signal(arg)) * scale`` for a
    per-token signal."""
    if isinstance(spec, ir.NoScalar):
        return None
    if isinstance(spec, ir.Const):
        return spec.value
    if isinstance(spec, ir.Learned):
        return learned(spec)
    return SIGNAL_ACT[spec.act](signal(spec.arg)) * spec.scale


def scalars_of(rule: ir.Rule, value: Any, flow: Any) -> dict:
    """One rule's scalars by name: ``value(spec)`` resolves each scalar, ``flow(index)`` gives a
    raw per-token flow (the preconditioner ``by``). Memories and CMS blocks differ only in
    those two (per token and head there, at a chunk's last token in a block)."""
    if isinstance(rule, ir.GDStep | ir.DGDStep):
        return {"lr": value(rule.lr), "momentum": value(rule.momentum),
                "retain": value(rule.retain)}  # fmt: skip
    if isinstance(rule, ir.EMAStep):
        return {"beta": value(rule.beta)}
    if isinstance(rule, ir.DecayStep):
        return {"rate": value(rule.rate)}
    if isinstance(rule, ir.PreconditionStep):
        return {"by": flow(rule.by)}
    return {}


def shaped(x: Any, w: torch.Tensor) -> Any:
    """A scalar (float, 0-d tensor, or a tensor over the leading axes of ``w``) shaped to scale
    ``w``."""
    if isinstance(x, torch.Tensor) and x.dim():
        return x.reshape(*x.shape, *([1] * (w.dim() - x.dim())))
    return x


def learned_value(scalars: Any, spec: ir.Learned, like: torch.Tensor) -> torch.Tensor:
    """A learned scalar's value, in its range and ``like``'s dtype; ``scalars`` maps keys to
    the raw parameters (the learner's ``scalars``)."""
    return bounded(scalars[spec.key], spec.lo, spec.hi).to(like.dtype)


def gate(scalars: Any, cfg: Any, spec: ir.Scalar, which: str, args: tuple, like: torch.Tensor):
    """A memory's gate ``[B, T, H]`` (or None) from its scalar ``spec``: ``args`` are the
    memory's per-token inputs, ``like`` its keys ``[B, T, H, dk]``."""
    B, T, H = like.shape[0], like.shape[1], cfg.heads

    def signal(i: int) -> torch.Tensor:
        if args[i].shape[-1] not in (1, H):
            raise CompileError(
                f"level {cfg.name!r}: the {which} signal has width {args[i].shape[-1]}; "
                f"expected 1 or heads={H}"
            )
        return args[i]

    value = scalar_value(spec, lambda sp: learned_value(scalars, sp, like), signal)
    if value is None or isinstance(value, torch.Tensor):
        return None if value is None else value.expand(B, T, H)
    return torch.full((B, T, H), value, dtype=like.dtype, device=like.device)
