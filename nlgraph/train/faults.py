"""Numerical faults: find the first non-finite tensor and name the level that owns it.

A compiled learner stores level ``a.b.c``'s tensors under ``_key(name) = "a__b__c"``: slow levels
as ``slow.a__b__c.weight``, chunk-updated blocks as ``blocks.a__b__c.0.weight``, meta-learned
initial states as ``meta.a__b__c__W1`` and learned rates as ``scalars.a__b__c__lr``. Fast state
is keyed by level name already.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = ["level_of", "first_nonfinite", "nonfinite_in_state", "bad_state_levels", "describe"]

_OWNER_PREFIXES = ("slow.", "blocks.", "meta.", "scalars.")


def level_of(name: str, levels: Iterable[str] = ()) -> tuple[str, str]:
    """``(level, tensor)`` for a parameter or buffer name of a compiled learner.

    >>> level_of("slow.block0__W_k.weight")
    ('block0.W_k', 'weight')
    >>> level_of("meta.block0__titans__M_k__W1")
    ('block0.titans.M_k', 'W1')
    """
    known = set(levels)
    prefix = next((p for p in _OWNER_PREFIXES if name.startswith(p)), "")
    rest = name[len(prefix) :]
    key, _, attr = rest.partition(".")
    candidates = [(key.replace("__", "."), attr)]
    if "__" in key:  # meta/scalars: the last "__" part is the tensor's own name
        owner, _, tensor = key.rpartition("__")
        cand = (owner.replace("__", "."), tensor + (f".{attr}" if attr else ""))
        candidates.insert(0 if prefix in ("meta.", "scalars.") else 1, cand)
    for level, tensor in candidates:
        if not known or level in known:
            return level, tensor
    if "." not in name and "__" not in name:  # a buffer registered under the plain key
        return name, ""
    return candidates[0]


def _tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{path}/{k}" if path else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{path}[{i}]")


def _bad(t: torch.Tensor) -> str | None:
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return None
    return "nan" if bool(torch.isnan(t).any()) else "inf"


def first_nonfinite(
    named: Iterable[tuple[str, torch.Tensor | None]], levels: Iterable[str] = ()
) -> tuple[str, str, str] | None:
    """``(level, tensor, "nan"|"inf")`` for the first non-finite tensor, else ``None``."""
    levels = list(levels)
    for name, t in named:
        kind = None if t is None else _bad(t.detach())
        if kind:
            level, tensor = level_of(name, levels)
            return level, tensor, kind
    return None


def nonfinite_in_state(
    state: dict[str, Any] | None, order: Iterable[str] = ()
) -> tuple[str, str, str] | None:
    """The first level whose fast state (``forward``'s returned state) holds a NaN or inf,
    in ``order`` (the spec's declaration order, which follows the data: the earliest is the
    likeliest source)."""
    state = state or {}
    rank = {name: i for i, name in enumerate(order)}
    for level in sorted(state, key=lambda n: rank.get(n, len(rank))):
        for path, t in _tensors(state[level]):
            kind = _bad(t.detach())
            if kind:
                return str(level), path, kind
    return None


def bad_state_levels(state: dict[str, Any] | None, order: Iterable[str] = ()) -> list[str]:
    """Every level whose fast state holds a NaN or inf, in ``order``."""
    rank = {name: i for i, name in enumerate(order)}
    bad = [lv for lv, v in (state or {}).items() if any(_bad(t.detach()) for _, t in _tensors(v))]
    return sorted(bad, key=lambda n: rank.get(n, len(rank)))


def describe(hit: tuple[str, str, str], what: str) -> str:
    level, tensor, kind = hit
    where = f"level {level!r}" + (f" ({tensor})" if tensor else "")
    return f"{kind} in the {what} of {where}"
