"""The element-wise optimizer update, one parameter segment at a time, in plain PyTorch.

This is the definition the Triton kernel is checked against. It follows torch.optim's
single-tensor code op for op (``lerp_`` for Adam's first moment, ``addcmul_`` for the second,
``addcdiv_`` for the step), so it equals ``torch.optim`` bit for bit where torch runs the same
ops, and the kernel within float32 rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nlgraph.kernels.optimizer._validate import Hyper, check

__all__ = ["optimizer_update_naive"]


@torch.no_grad()
def optimizer_update_naive(
    param: Tensor,
    grad: Tensor,
    m: Tensor | None,
    v: Tensor | None,
    vmax: Tensor | None,
    spans: Tensor,
    *,
    rule: str,
    lr: float,
    beta1: float = 0.0,
    beta2: float = 0.0,
    eps: float = 0.0,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    dampening: float = 0.0,
    nesterov: bool = False,
    amsgrad: bool = False,
    step: int = 1,
) -> None:
    """See :func:`nlgraph.kernels.optimizer.optimizer_update` (same signature, no backend)."""
    hp = check(param, grad, m, v, vmax, spans, rule, lr, beta1, beta2, eps, weight_decay,
               decoupled, dampening, nesterov, amsgrad, step)  # fmt: skip
    for start, stop in spans.tolist():
        sl = slice(start, stop)
        _segment(
            param[sl], grad[sl],
            None if m is None else m[sl], None if v is None else v[sl],
            None if vmax is None else vmax[sl], hp,
        )  # fmt: skip


def _segment(
    p: Tensor, g: Tensor, m: Tensor | None, v: Tensor | None, vmax: Tensor | None, hp: Hyper
) -> None:
    """One parameter's update, in place (``p``, ``m``, ``v``, ``vmax`` are views)."""
    if hp.weight_decay and not hp.decoupled:
        g = g.add(p, alpha=hp.weight_decay)  # L2: the memories see g + wd p
    if hp.weight_decay and hp.decoupled:
        p.mul_(1.0 - hp.lr * hp.weight_decay)  # AdamW: decay outside the memories
    if hp.rule == "sgd":
        d = g
        if hp.beta1:
            assert m is not None
            if hp.step == 1:  # torch starts the buffer at the first gradient, undamped
                m.copy_(g)
            else:
                m.mul_(hp.beta1).add_(g, alpha=1.0 - hp.dampening)
            d = g.add(m, alpha=hp.beta1) if hp.nesterov else m
        p.add_(d, alpha=-hp.lr)
        return
    assert v is not None
    v.mul_(hp.beta2).addcmul_(g, g, value=1.0 - hp.beta2)
    second = v
    if hp.amsgrad:
        assert vmax is not None
        torch.maximum(vmax, v, out=vmax)
        second = vmax
    if hp.rule == "adam":
        assert m is not None
        m.lerp_(g, 1.0 - hp.beta1)
        bc1 = 1.0 - hp.beta1**hp.step
        bc2 = 1.0 - hp.beta2**hp.step
        denom = (second.sqrt() / bc2**0.5).add_(hp.eps)
        p.addcdiv_(m, denom, value=-hp.lr / bc1)
        return
    # RMSprop, not centred: u = g / (sqrt(v) + eps), optionally through momentum m <- b1 m + u
    denom = second.sqrt().add_(hp.eps)
    if hp.beta1:
        assert m is not None
        m.mul_(hp.beta1).addcdiv_(g, denom)
        p.add_(m, alpha=-hp.lr)
    else:
        p.addcdiv_(g, denom, value=-hp.lr)
