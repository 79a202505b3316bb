"""``NLGRAPH_DEBUG``: how much the compiler tells about its passes, read in one place.

``0`` (unset or empty): nothing. ``1``: each pass of the plan prints its name and a one-line
summary to stderr once its invariants hold. ``2``: also the finished plan (``str(plan)``), to
stdout. Higher levels print what ``2`` prints. The invariants are checked at every level.
"""

from __future__ import annotations

import os

from nlgraph._errors import CompileError

__all__ = ["VARIABLE", "debug_level"]

VARIABLE = "NLGRAPH_DEBUG"


def debug_level() -> int:
    """The integer level in ``NLGRAPH_DEBUG`` (0 when unset or empty); CompileError for
    anything but a non-negative integer."""
    value = os.environ.get(VARIABLE, "")
    if not value.strip():
        return 0
    try:
        level = int(value)
    except ValueError:
        level = -1
    if level < 0:
        raise CompileError(
            f"{VARIABLE}={value!r} is not a debug level; expected 0 (quiet), 1 (each plan pass's "
            "name and summary, on stderr) or 2 (also the plan), or unset it"
        )
    return level
