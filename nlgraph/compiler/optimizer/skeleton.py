"""An optimizer graph split into its structure and its numbers.

Hyperparameters are runtime values: a program compiled for one spec serves every spec with the
same skeleton, so an LR scheduler changes numbers, not the program. Torch-free.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from pydantic import BaseModel

from nlgraph.level import GraphSpec

__all__ = ["scan"]


def scan(spec: GraphSpec) -> tuple[Hashable, list[float], list[tuple[int, str]]]:
    """``(skeleton, numbers, sites)``: the spec's structure with every float replaced by a slot,
    the floats in order, and where each sits (``(id(node), field)``). Docs and meta are left
    out: they describe, they do not compute."""
    numbers: list[float] = []
    sites: list[tuple[int, str]] = []

    def walk_(obj: Any) -> Hashable:
        if isinstance(obj, BaseModel):
            items = []
            for name in type(obj).model_fields:
                if name in ("doc", "meta"):
                    continue
                v = getattr(obj, name)
                if isinstance(v, float):
                    numbers.append(v)
                    sites.append((id(obj), name))
                    items.append((name, "#"))
                else:
                    items.append((name, walk_(v)))
            return (type(obj).__name__, tuple(items))
        if isinstance(obj, list | tuple):
            return tuple(walk_(x) for x in obj)
        if isinstance(obj, dict):
            return tuple((k, walk_(v)) for k, v in obj.items())
        return obj

    return walk_(spec), numbers, sites
