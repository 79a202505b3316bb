"""Lowering ``attention``: the exact non-parametric memory, causal softmax attention over the
key/value cache (the Nadaraya–Watson solution, Eq. 62; a sliding window, Eq. 63), as calls of
:func:`nlgraph.kernels.attention.attention`. The cache is the memory's state."""

from __future__ import annotations

from typing import Any

from nlgraph.compiler import ir
from nlgraph.compiler.lowerings._backend import backend_for
from nlgraph.compiler.lowerings._owner import MemoryOwner
from nlgraph.compiler.lowerings._state import heads
from nlgraph.kernels.attention import attention

__all__ = ["Attention", "run_attention"]


def run_attention(owner: Any, cfg: ir.AttentionConfig, args: tuple, prev: Any) -> tuple[tuple, Any]:
    """``(read-outs [B, T, H * dv] in read order, final cache)``; with ``writes=False`` too (the
    cache of a read-only pass holds this segment's keys, as attention needs)."""
    H = cfg.heads
    k, v = heads(args[0], H, cfg.key_norm), heads(args[1], H, cfg.value_norm)
    queries = [heads(args[2 + i], H, n) for i, n in enumerate(cfg.query_norms)]
    B, T = k.shape[0], k.shape[1]
    backend = backend_for(owner.backend, "attention")
    outs, final = [], prev
    for q in queries or [k]:
        o, final = attention(q, k, v, cache=prev, window=cfg.window, scale=cfg.temperature,
                             backend=backend)  # fmt: skip
        outs.append(o.reshape(B, T, -1))
    return tuple(outs[: len(queries)]), final


class Attention(MemoryOwner):
    """The ``attention`` lowering of one memory (no initial state: the cache starts empty)."""

    def run(self, args: tuple, prev: Any, writes: bool) -> tuple[tuple, Any]:
        return run_attention(self, self.cfg, args, prev)
