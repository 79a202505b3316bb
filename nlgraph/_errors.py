"""The one exception tree of nlgraph.

Every error nlgraph raises on purpose derives from :class:`NLGraphError`, so callers can catch the
library's own failures without swallowing bugs. Warnings are ``UserWarning`` subclasses, so the
usual ``warnings`` filters select them by class.
"""

from __future__ import annotations

__all__ = [
    "NLGraphError",
    "SpecError",
    "SpecFieldError",
    "SpecTypeError",
    "SchemaVersionError",
    "CompileError",
    "BackendUnavailableError",
    "NumericalFaultError",
    "ReferenceLoopWarning",
]


class NLGraphError(Exception):
    """Root of every error raised by nlgraph."""


class SpecError(NLGraphError, ValueError):
    """An invalid graph specification: the message names the level or edge, what was received,
    what was expected and how to fix it."""


class SpecFieldError(SpecError):
    """A spec object built with a bad field: ``model`` names its class (``Signal``, ``GD``,
    ``Level``), ``detail`` the field, what was received and what is allowed."""

    def __init__(self, model: str, detail: str) -> None:
        super().__init__(f"{model}: {detail}")
        self.model, self.detail = model, detail


class SpecTypeError(SpecError, TypeError):
    """A DSL call given a value of the wrong kind where a flow or a name belongs (``None``, a
    string, a list): a :class:`SpecError`, and a ``TypeError`` as Python would raise."""


class SchemaVersionError(SpecError):
    """A serialized spec written by a newer (or unknown) schema version."""


class CompileError(NLGraphError):
    """A valid spec that cannot be lowered with the given bindings (shapes, modules, backend)."""


class BackendUnavailableError(NLGraphError):
    """A kernel backend was requested that is not available here (e.g. Triton without a GPU)."""


class NumericalFaultError(NLGraphError, FloatingPointError):
    """A NaN or inf appeared in a loss or a level's state."""


class ReferenceLoopWarning(UserWarning):
    """A level has no fast lowering and runs as the reference loop (token by token, autograd for
    its inner gradient): correct, but slow. The message names the level and says why; emitted
    once per level when a graph is compiled."""
