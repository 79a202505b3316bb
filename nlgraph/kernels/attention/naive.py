"""Softmax attention as the Nadaraya–Watson memory, one query at a time (the truth)."""

from __future__ import annotations

import torch


def attention_naive(q, k, v, *, cache=None, window=None, scale=1.0):
    """For every query t, the softmax-weighted mean of the values of keys ``<= t`` (the last
    ``window`` of them): ``argmin_m sum_i exp(scale q.k_i) ||v_i - m||^2`` (PAPER.md Eq. 62-63).

    Args:
        q: ``[B, T, H, D]``; k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``.
        cache: ``{"k", "v"}`` of earlier tokens (``[B, S0, H, *]``) or None.
    Returns ``(o [B, T, H, Dv], {"k", "v"})`` with the cache extended by this segment.
    """
    if cache is not None:
        k = torch.cat([cache["k"], k], dim=1)
        v = torch.cat([cache["v"], v], dim=1)
    T, S = q.shape[1], k.shape[1]
    outs = []
    for t in range(T):
        pos = S - T + t  # this query's position in the full sequence
        lo = 0 if window is None else max(0, pos - window + 1)
        kk, vv = k[:, lo : pos + 1], v[:, lo : pos + 1]
        w = torch.softmax(torch.einsum("bhd,bshd->bhs", q[:, t], kk) * scale, dim=-1)
        outs.append(torch.einsum("bhs,bshd->bhd", w, vv))
    return torch.stack(outs, dim=1), {"k": k, "v": v}
