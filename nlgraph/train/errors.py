"""The trainer's errors: each one line, raised before work starts where the fault is known then."""

from __future__ import annotations

from nlgraph._errors import NLGraphError, NumericalFaultError

__all__ = ["DataError", "CheckpointError", "TrainConfigError", "NumericalFaultError"]


class DataError(NLGraphError, ValueError):
    """A corpus that cannot be trained on: missing, empty, binary, or shorter than a sequence."""


class CheckpointError(NLGraphError):
    """A checkpoint that cannot be read, or was written for another model or run."""


class TrainConfigError(NLGraphError, ValueError):
    """Trainer settings that contradict each other or the model (batch, seq, model name...)."""
