"""Scalars of update rules, shared by every lowering: the static description of a scalar
(constant, learned, per-token signal) turned into a value, and shaped to scale a tensor."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional as F

__all__ = ["SIGNAL_ACT", "bounded", "scalar_value", "scalars_of", "shaped"]

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


def scalar_value(spec: tuple, learned: Any, signal: Any) -> Any:
    """A rule's scalar from its static description (``program._rule_cfg``): None, a float,
    ``learned(spec)``, or ``act(signal(index)) * scale`` for a per-token signal."""
    kind = spec[0]
    if kind == "none":
        return None
    if kind == "const":
        return spec[1]
    if kind == "learned":
        return learned(spec)
    return SIGNAL_ACT[spec[2]](signal(spec[1])) * spec[3]


def scalars_of(rule: tuple, value: Any, flow: Any) -> dict:
    """One rule's scalars by name: ``value(spec)`` resolves each scalar, ``flow(index)`` gives a
    raw per-token flow (the preconditioner ``by``). Memories and CMS blocks differ only in
    those two (per token and head here, at a chunk's last token in a block)."""
    kind = rule[0]
    if kind in ("gd", "dgd"):
        return {n: value(s) for n, s in zip(("lr", "momentum", "retain"), rule[1:4], strict=True)}
    if kind == "ema":
        return {"beta": value(rule[1])}
    if kind == "weight_decay":
        return {"rate": value(rule[1])}
    if kind == "precondition":
        return {"by": flow(rule[1])}
    return {}


def shaped(x: Any, w: torch.Tensor) -> Any:
    """A scalar (float, 0-d tensor, or a tensor over the leading axes of ``w``) shaped to scale
    ``w``."""
    if isinstance(x, torch.Tensor) and x.dim():
        return x.reshape(*x.shape, *([1] * (w.dim() - x.dim())))
    return x
