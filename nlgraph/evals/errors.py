"""The evaluation suites' one error: a bad argument, reported in one line before work starts."""

from __future__ import annotations

from nlgraph._errors import NLGraphError

__all__ = ["EvalConfigError"]


class EvalConfigError(NLGraphError, ValueError):
    """Suite settings that cannot be run: an unknown suite, model or language, a length or
    vocabulary too small for the task, a non-positive budget."""
