"""The token loop of the momentum memory: the truth every fast path matches.

Per batch and head, for tokens t = 1..C of one window:

    S_t = mu_t S_{t-1} + delta_t x_t^T
    W_t = W_{t-1} (a_t I - b_t x_t x_t^T) + S_t

(DGD with retention and a momentum buffer, NL paper Eq. 88 per layer, PAPER.md 3.1 and 4.5.)

Cost: C steps of O(B H O I) each, with autograd saving every W_t; use it for checking and for
one-token windows, not for training long windows.
"""

from __future__ import annotations

import torch

__all__ = ["momentum_memory_naive"]


def momentum_memory_naive(
    x: torch.Tensor,
    delta: torch.Tensor,
    b: torch.Tensor | None,
    a: torch.Tensor | None,
    mu: torch.Tensor,
    w0: torch.Tensor,
    s0: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_C, S_C)`` after the window, token by token (arguments as
    :func:`~nlgraph.kernels.momentum_memory.api.momentum_memory`).

    Args:
        x: ``[B, C, H, I]`` keys (the layer inputs).
        delta: ``[B, C, H, O]`` signed, scaled error terms.
        b: ``[B, C, H]`` or None (plain GD: no x x^T term).
        a: ``[B, C, H]`` retention or None (a = 1).
        mu: ``[B, C, H]`` momentum gates.
        w0, s0: ``[B, H, O, I]`` weights and momentum at the window start.

    Returns:
        ``(W_C, S_C)``, both ``[B, H, O, I]``.
    """
    w, s = w0, s0
    for t in range(x.shape[1]):
        xt, dt = x[:, t], delta[:, t]
        s = mu[:, t, :, None, None] * s + torch.einsum("bho,bhi->bhoi", dt, xt)
        keep = 1.0 if a is None else a[:, t, :, None, None]
        w_next = keep * w + s
        if b is not None:
            wx = torch.einsum("bhoi,bhi->bho", w, xt)
            w_next = w_next - b[:, t, :, None, None] * torch.einsum("bho,bhi->bhoi", wx, xt)
        w = w_next
    return w, s
