"""Synthetic evaluation suites (PAPER.md 7 and 9 items 15-17): MQAR, needle-in-a-haystack,
formal languages with length generalisation, and a continual-learning stream.

``run_suites(["mqar"], models=["transformer", "hope"], quick=True)`` trains each model for a
fixed small budget and returns one report per suite; ``nlgraph eval`` is the command line.
Generators (:mod:`nlgraph.evals.tasks`, :mod:`nlgraph.evals.languages`) are deterministic in
their seed and document which positions are scored. See docs/evals.md.

Names are imported on first use, so ``nlgraph.evals.cli`` (the parser) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from nlgraph.evals.errors import EvalConfigError

__all__ = [
    "Batch",
    "EvalConfigError",
    "IGNORE",
    "LANGUAGES",
    "SUITES",
    "config",
    "formal",
    "kv_mapping",
    "kv_segment",
    "member",
    "mqar",
    "niah",
    "run_suites",
    "valid_next",
]

_WHERE = {
    **dict.fromkeys(("Batch", "IGNORE", "kv_mapping", "kv_segment", "mqar", "niah"), "tasks"),
    **dict.fromkeys(("LANGUAGES", "formal", "member", "valid_next"), "languages"),
    **dict.fromkeys(("SUITES", "config"), "suites"),
    "run_suites": "run",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"nlgraph.evals.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'nlgraph.evals' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
