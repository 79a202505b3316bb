"""Synthetic evaluation suites (PAPER.md 7 and 9 items 15-17): MQAR, needle-in-a-haystack,
formal languages with length generalisation, and a continual-learning stream.

``run_suites(["mqar"], models=["transformer", "hope"], quick=True)`` trains each model for a
fixed small budget and returns one report per suite; ``nlgraph eval`` is the command line.
Generators (:mod:`nlgraph.evals.tasks`, :mod:`nlgraph.evals.languages`) are deterministic in
their seed and document which positions are scored. See docs/evals.md.
"""

from __future__ import annotations

from nlgraph.evals.errors import EvalConfigError
from nlgraph.evals.languages import LANGUAGES, formal, member, valid_next
from nlgraph.evals.run import run_suites
from nlgraph.evals.suites import SUITES, config
from nlgraph.evals.tasks import IGNORE, Batch, kv_mapping, kv_segment, mqar, niah

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
