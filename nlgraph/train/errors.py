"""The trainer's errors: each one line, raised before work starts where the fault is known then."""

from __future__ import annotations

import errno
from pathlib import Path

from nlgraph._errors import NLGraphError, NumericalFaultError

__all__ = ["DataError", "CheckpointError", "TrainConfigError", "OutputError", "NumericalFaultError"]


class DataError(NLGraphError, ValueError):
    """A corpus that cannot be trained on: missing, empty, binary, or shorter than a sequence."""


class CheckpointError(NLGraphError):
    """A checkpoint that cannot be read, or was written for another model or run."""


class TrainConfigError(NLGraphError, ValueError):
    """Trainer settings that contradict each other or the model (batch, seq, model name...)."""


class OutputError(NLGraphError):
    """The output folder (``--out``) cannot be created or written, is not a folder, holds
    another run, or is in use by another run."""

    @classmethod
    def from_os(cls, err: OSError, path: str | Path) -> OutputError:
        """One line for an OS error on ``path``: which path, what went wrong, what to do."""
        where = str(err.filename) if err.filename else str(path)
        if err.errno in (errno.EEXIST, errno.ENOTDIR):
            return cls(
                f"cannot create {where!r}: a file (not a folder) is in the way; move it or "
                "choose another --out"
            )
        if err.errno == errno.EROFS:
            return cls(f"cannot write {where!r}: read-only file system; choose another --out")
        if err.errno in (errno.EACCES, errno.EPERM):
            return cls(f"cannot write {where!r}: permission denied; choose another --out")
        if err.errno == errno.ENOSPC:
            return cls(f"cannot write {where!r}: no space left on the device; free some space")
        why = err.strerror or type(err).__name__
        return cls(f"cannot write {where!r}: {why}; check the path or choose another --out")
