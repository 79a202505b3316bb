"""Softmax attention for all queries at once, with a causal (and window) mask."""

from __future__ import annotations

import torch


def attention_chunk(q, k, v, *, cache=None, window=None, scale=1.0):
    """Same contract as :func:`~nlgraph.kernels.attention.naive.attention_naive`.

    Written out rather than ``F.scaled_dot_product_attention``: blocks that learn from the loss
    inside the forward (CMS) take second derivatives, which the fused CPU kernel lacks.
    """
    if cache is not None:
        k = torch.cat([cache["k"], k], dim=1)
        v = torch.cat([cache["v"], v], dim=1)
    T, S = q.shape[1], k.shape[1]
    i = torch.arange(T, device=q.device).unsqueeze(1) + (S - T)
    j = torch.arange(S, device=q.device).unsqueeze(0)
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", torch.softmax(scores, dim=-1), v), {"k": k, "v": v}
