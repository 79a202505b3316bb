"""Softmax attention, the non-parametric Nadaraya–Watson memory (PAPER.md Eqs. 62–63).

Backends: ``reference`` (:mod:`.naive`, one query at a time) and ``chunk`` (:mod:`.chunk`, all
queries at once), registered with :mod:`nlgraph.kernels._dispatch` as op ``"attention"``.
"""

from __future__ import annotations

import math

from nlgraph.kernels import _dispatch

from .chunk import attention_chunk
from .naive import attention_naive

__all__ = ["attention", "attention_naive", "attention_chunk"]

_dispatch.register("attention", "reference", attention_naive)
_dispatch.register("attention", "chunk", attention_chunk)


def attention(q, k, v, *, cache=None, window=None, scale=None, backend="auto"):
    """Causal softmax attention over the cached and current keys; the cache is its state.

    Args:
        q, k: ``[B, T, H, D]``; v: ``[B, T, H, Dv]``; cache: ``{"k", "v"}`` or None;
        window: attend to the last ``window`` keys only (sliding-window attention);
        scale: the softmax temperature (default ``1/sqrt(D)``).
    Returns ``(o [B, T, H, Dv], new cache)``.
    """
    if q.dim() != 4 or k.shape[:3] != q.shape[:3] or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"attention: expected q, k [B, T, H, D] and v [B, T, H, Dv] with the same B, T, H; "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if window is not None and window < 1:
        raise ValueError(f"attention: window must be >= 1, got {window}")
    fn = _dispatch.get("attention", backend, q.device)
    return fn(q, k, v, cache=cache, window=window,
              scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)  # fmt: skip
