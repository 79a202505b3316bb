"""The base of every spec object: frozen, typed, and strict about unknown fields."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

__all__ = ["Spec", "NAME_RE", "IMPORT_PATH_RE"]

# Level and input names: identifiers, optionally dotted (``block0.cms.fast``) for nesting.
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# ``package.module:attribute`` (the attribute may be dotted).
IMPORT_PATH_RE = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
)


class Spec(BaseModel):
    """Frozen pydantic model with ``extra="forbid"``: a typo in a field name is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)
