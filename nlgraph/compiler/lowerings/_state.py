"""Fast-state helpers shared by the lowerings: head splitting and the truncation of carried
state (``truncated(k)`` edges, counted from the start of the sequence)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional as F

__all__ = ["heads", "detach_state", "truncation_segments", "at_cut", "call_fast"]


def heads(x: torch.Tensor, H: int, norm: bool) -> torch.Tensor:
    """``[B, T, H * D] -> [B, T, H, D]``; a normalised key/query is normalised per head."""
    x = x.reshape(*x.shape[:2], H, -1)
    return F.normalize(x, dim=-1) if norm else x


def detach_state(state: Any) -> Any:
    """A fast state (tensors in dicts, lists, tuples) with every tensor detached."""
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(detach_state(v) for v in state)
    return state


def truncation_segments(T: int, counts: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(start, end)`` of the segments a call of ``T`` tokens runs in so that every truncated
    state, ``(tokens seen before the call, k)``, can be detached at the multiples of ``k``
    counted from the start of the sequence (:func:`at_cut` at each segment's start)."""
    cuts = sorted({T, *(t for seen, k in counts for t in range(-seen % k or k, T, k))})
    return list(zip([0, *cuts[:-1]], cuts, strict=True))


def at_cut(token: int, k: int) -> bool:
    """Whether a truncated(k) state is detached before ``token`` (counted from the sequence
    start): at every multiple of ``k`` but the first token."""
    return token > 0 and token % k == 0


def call_fast(
    module: Any, names: Sequence[str], args: Any, state: dict, new_state: dict,
    dtype: torch.dtype | None, run: Callable[[Any], Any],
) -> Any:  # fmt: skip
    """One call of a fast lowering (a memory or a cluster of ``names``): ``run(args)``

    - in the fast state's ``dtype`` with autocast off, when autocast is on: the recurrence (its
      accumulations, its small triangular solves) then runs in the state's precision (float32
      parameters under a bfloat16 autocast) instead of mixing bfloat16 products into a float32
      state; its read-outs come back in that dtype for the autocast region to cast again;
    - replayed from a teach signal's first pass where ``module.replay`` can
      (:class:`~nlgraph.compiler.lowerings.teach.Replay`)."""
    leaves = [a for a in torch.utils._pytree.tree_leaves(args) if torch.is_tensor(a)]
    device = leaves[0].device.type if leaves else "cpu"

    def call(args: Any) -> Any:
        if module.replay is None:
            return run(args)
        return module.replay(module, names, args, state, new_state, lambda: run(args))

    if dtype is None or not torch.is_autocast_enabled(device):
        return call(args)

    def cast(t: Any) -> Any:
        return t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t

    with torch.autocast(device, enabled=False):
        return call(torch.utils._pytree.tree_map(cast, args))
