"""The public attention op: causal softmax attention over a key/value cache (PAPER.md Eqs.
62-63, the non-parametric Nadaraya-Watson memory)."""

from __future__ import annotations

import math

from nlgraph.kernels import _dispatch

__all__ = ["attention"]

_OP = "attention"


def attention(q, k, v, *, cache=None, window=None, scale=None, backend="auto"):
    """Causal softmax attention over the cached and current keys; the cache is its state.

    Args:
        q, k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``; cache: ``{"k", "v"}`` or None;
        window: attend to the last ``window`` keys only (sliding-window attention);
        scale: the softmax temperature (default ``1/sqrt(D)``).
        backend: ``"auto"``, ``"reference"`` or ``"chunk"``; ``NLGRAPH_BACKEND`` overrides it.
    Returns ``(o [B, T, H, Dv], new cache)``.
    """
    if q.dim() != 4 or k.shape[:3] != q.shape[:3] or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"attention: expected q, k [B, T, H, D] and v [B, T, H, Dv] with the same B, T, H; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1, got {window}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _dispatch.call(_OP, backend, q.device, q, k, v, cache=cache, window=window, scale=scale)
