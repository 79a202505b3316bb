"""The public fused optimizer op: one element-wise optimizer step (SGD/momentum,
Adam/AdamW/AMSGrad, RMSprop) over the segments of flat parameter buffers, in place."""

from __future__ import annotations

from torch import Tensor

from nlgraph.kernels import _dispatch

__all__ = ["optimizer_update"]

_OP = "optimizer_update"


def optimizer_update(
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
    backend: str = "auto",
) -> None:
    """One optimizer step on the elements ``spans`` select of flat buffers, in place.

    With ``g`` the gradient (plus ``wd p`` when ``weight_decay`` is coupled), per element:

        sgd:      m <- b1 m + (1 - dampening) g   (m <- g at step 1)     [momentum, b1 > 0]
                  p <- p - lr (g + b1 m  if nesterov else  m)           (b1 = 0: p - lr g)
        adam:     m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  vmax <- max(vmax, v)
                  p <- p - lr / (1 - b1^t) * m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps)
        rmsprop:  v <- b2 v + (1 - b2) g^2;  u = g / (sqrt(v) + eps)     (not centred)
                  m <- b1 m + u  [b1 > 0];   p <- p - lr (m or u)

    and, if ``decoupled``, first ``p <- (1 - lr wd) p`` (AdamW) instead of the coupled L2 term.
    These are torch.optim's SGD, Adam/AdamW (Kingma & Ba 2015; Loshchilov & Hutter 2019) and
    RMSprop, so their ``momentum_buffer``/``exp_avg``/``exp_avg_sq``/``max_exp_avg_sq`` and
    ``square_avg`` are ``m``, ``v``, ``vmax`` here.

    Args:
        param, grad: ``[N]`` contiguous buffers (float32, bfloat16 or float16 for Triton).
        m, v, vmax: ``[N]`` moments, or None where the rule has none; updated in place.
        spans: int64 ``[S, 2]`` CPU tensor of ``(start, stop)``: the segments to update (one
            per parameter that has a gradient); other elements are not touched.
        rule: ``"sgd"``, ``"adam"`` or ``"rmsprop"``.
        beta1: the first moment's decay (SGD/RMSprop momentum, Adam's b1).
        beta2: the second moment's decay (Adam's b2, RMSprop's alpha).
        step: t, the count of updates including this one (bias correction; SGD's first step).
        backend: ``"auto"`` (Triton on a GPU, else the reference), ``"reference"``, ``"triton"``.

    Example:
        >>> import torch
        >>> p, g = torch.ones(5), torch.full((5,), 0.5)
        >>> m, v = torch.zeros(5), torch.zeros(5)
        >>> spans = torch.tensor([[0, 3]])
        >>> optimizer_update(p, g, m, v, None, spans, rule="adam", lr=0.1, beta1=0.9,
        ...                  beta2=0.999, eps=1e-8, backend="reference")
        >>> [round(x, 6) for x in p.tolist()]  # Adam's first step: lr * sign(g) where selected
        [0.9, 0.9, 0.9, 1.0, 1.0]
    """
    _dispatch.call(_OP, backend, param.device, param, grad, m, v, vmax, spans, rule=rule, lr=lr,
                   beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                   decoupled=decoupled, dampening=dampening, nesterov=nesterov, amsgrad=amsgrad,
                   step=step)  # fmt: skip
