"""Rule chains: one application of a level's inner optimizer, shared by the reference loop of
memories and the boundary updates of CMS blocks (docs/compiler.md, "The reference loop", step 2).

``weight_decay`` M <- (1 - rate) M; ``precondition`` d <- d / (by ** power + eps);
``newton_schulz`` d <- NS(d) per matrix; ``gd`` S <- mu S - lr d, M <- a M + S (without momentum
M <- a M - lr d; Nesterov M <- a M + mu S - lr d); ``ema`` is gd with lr = 1 - beta; ``dgd``
M <- M (a I - lr' x x^T) - lr' d per layer with that layer's input x.
"""

from __future__ import annotations

from typing import Any

import torch

from nlgraph.compiler import ir
from nlgraph.compiler.lowerings._scalars import shaped
from nlgraph.compiler.newton_schulz import newton_schulz

__all__ = ["apply_rules", "orthogonalize"]


def apply_rules(rules, weights, d, bufs, scalars, inputs=None, lead=2, unit_lr=None):
    """Apply a rule chain once: returns the new weights and momentum buffers.

    ``rules``: the chain (:data:`nlgraph.compiler.ir.Rule` values); ``weights`` and the
    direction ``d``: lists of tensors whose first ``lead`` axes are per sample (memories:
    ``[B, H, out, in]``, ``lead=2``; CMS blocks: ``[B, *param_shape]``, ``lead=1``);
    ``scalars``: one dict per rule of its scalars at the update's token (floats, learned 0-d
    tensors, or tensors over the ``lead`` axes); ``bufs``: momentum buffers by rule index
    (``str(i)``); ``inputs``: each layer's input (``dgd`` only). ``unit_lr``: index of a gd/ema
    rule whose rate already weights ``d`` (a per-token rate inside the sum, CMS Eq. 71): it
    steps with rate 1.
    """
    s, bufs = list(weights), dict(bufs)
    for i, (rule, sc) in enumerate(zip(rules, scalars, strict=True)):
        if isinstance(rule, ir.DecayStep):
            s = [(1 - shaped(sc["rate"], w)) * w for w in s]
        elif isinstance(rule, ir.PreconditionStep):
            d = [g / (shaped(sc["by"], g) ** rule.power + rule.eps) for g in d]
        elif isinstance(rule, ir.OrthogonalizeStep):
            d = [orthogonalize(g, rule.steps, rule.variant, lead) for g in d]
        elif isinstance(rule, ir.GDStep | ir.EMAStep):
            ema = isinstance(rule, ir.EMAStep)
            rate = 1 - sc["beta"] if ema else sc["lr"]
            lr = 1.0 if i == unit_lr else rate
            mu = None if ema else sc["momentum"]
            a = 1.0 if ema or sc["retain"] is None else sc["retain"]
            if mu is None:
                s = [_step(w, a, g, lr) for w, g in zip(s, d, strict=True)]
            else:
                old = bufs.get(str(i)) or [torch.zeros_like(g) for g in d]
                buf = [shaped(mu, b) * b - shaped(lr, g) * g for b, g in zip(old, d, strict=True)]
                bufs[str(i)] = buf
                look = (
                    [shaped(mu, b) * b - shaped(lr, g) * g for b, g in zip(buf, d, strict=True)]
                    if rule.nesterov
                    else buf
                )
                s = [shaped(a, w) * w + u for w, u in zip(s, look, strict=True)]
        else:  # dgd, per layer with that layer's input x (PAPER.md 3.1, Eq. 88)
            new_s, buf = [], []
            old = bufs.get(str(i)) or [torch.zeros_like(g) for g in d]
            for w, g, x, b in zip(s, d, inputs, old, strict=True):
                lr, mu = shaped(sc["lr"], w), shaped(sc["momentum"], w)
                a = 1.0 if sc["retain"] is None else shaped(sc["retain"], w)
                x = x[:, 0]  # [B, H, in]
                step = lr / (1 + lr * (x * x).sum(-1)[..., None, None]) if rule.exact else lr
                decayed = a * w - step * torch.einsum("bho,bhi->bhoi", torch.einsum(
                    "bhoi,bhi->bho", w, x), x)  # fmt: skip
                if mu is None:
                    new_s.append(decayed - step * g)
                else:
                    b = mu * b - ((1 - mu) if rule.dampen else 1.0) * step * g
                    buf.append(b)
                    new_s.append(decayed + b)
            s = new_s
            if sc["momentum"] is not None:
                bufs[str(i)] = buf
    return s, bufs


def _step(w: torch.Tensor, a: Any, g: torch.Tensor, lr: Any) -> torch.Tensor:
    """``a * w - lr * g``: one pass over the state where ``a`` is 1 and ``lr`` a number (the
    common case; the state is the big operand, so each skipped pass counts)."""
    scaled = w if isinstance(a, float | int) and a == 1 else shaped(a, w) * w
    if isinstance(lr, float | int):
        return torch.add(scaled, g, alpha=-lr)
    return scaled - shaped(lr, g) * g


def orthogonalize(g: torch.Tensor, steps: int, variant: str, lead: int) -> torch.Tensor:
    """Newton–Schulz on each per-sample tensor of ``g`` (its axes after the first ``lead``): a
    matrix is orthogonalised; a vector (a bias) passes through unchanged, as in Muon-with-AdamW
    splits; a tensor of more axes is orthogonalised as the matrix ``[shape[0], prod(rest)]``
    (Muon's convention for convolution filters)."""
    core = g.shape[lead:]
    if len(core) < 2:
        return g
    if len(core) == 2:
        return newton_schulz(g, steps, variant)
    flat = g.reshape(*g.shape[:lead], core[0], -1)
    return newton_schulz(flat, steps, variant).reshape(g.shape)
