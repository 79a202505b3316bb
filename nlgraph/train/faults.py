"""Numerical faults: find the first non-finite tensor and name the level that owns it.

A compiled learner stores level ``a.b.c``'s tensors under its key ``"a__b__c"`` in the module of
its lowering: slow levels as ``slow.a__b__c.weight``; CMS blocks as ``blocks.a__b__c.net.0.weight``
and ``blocks.a__b__c.scalars.lr``; memories as ``memories.a__b__c.initial.W1`` and
``memories.a__b__c.scalars.lr``; members of a recurrent cluster as
``clusters.0.members.a__b__c.initial.W1``. Fast state is keyed by level name already.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from nlgraph.compiler.layers import level_of

__all__ = ["level_of", "first_nonfinite", "nonfinite_in_state", "bad_state_levels", "describe"]


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
