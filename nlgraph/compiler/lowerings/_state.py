"""Fast-state helpers shared by the lowerings: head splitting and the truncation of carried
state (``truncated(k)`` edges, counted from the start of the sequence)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

__all__ = ["heads", "detach_state", "truncation_segments", "at_cut", "in_state_dtype"]


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


def in_state_dtype(args: Any, dtype: torch.dtype | None, run: Callable[[Any], Any]) -> Any:
    """``run(args)`` with autocast off and the floating tensors of ``args`` cast to the fast
    state's ``dtype``, when autocast is on: a memory's recurrence (its accumulations, its small
    triangular solves) then runs in the state's precision (float32 parameters under a bfloat16
    autocast) instead of mixing bfloat16 products into a float32 state; its read-outs come back
    in that dtype for the autocast region to cast again. Without autocast, or without a state
    dtype, ``run(args)``."""
    leaves = [a for a in torch.utils._pytree.tree_leaves(args) if torch.is_tensor(a)]
    device = leaves[0].device.type if leaves else "cpu"
    if dtype is None or not torch.is_autocast_enabled(device):
        return run(args)

    def cast(t: Any) -> Any:
        return t.to(dtype) if torch.is_tensor(t) and t.is_floating_point() else t

    with torch.autocast(device, enabled=False) if device in ("cpu", "cuda") else (
        contextlib.nullcontext()
    ):  # fmt: skip
        return run(torch.utils._pytree.tree_map(cast, args))
