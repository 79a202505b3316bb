"""The optimizer benchmark's one error: a bad argument, reported in one line before work starts."""

from __future__ import annotations

from nlgraph._errors import NLGraphError

__all__ = ["BenchConfigError"]


class BenchConfigError(NLGraphError, ValueError):
    """Benchmark settings that cannot be run: a SPEC that is not an optimizer or cannot step the
    problems' parameters, an unknown problem, a seed range past 32 bits, an unwritable output
    folder."""
