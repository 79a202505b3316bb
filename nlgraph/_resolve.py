"""Import paths (``"package.module:attribute"``) to objects: user modules, custom objectives and
builders named in a spec. Torch-free, so the spec layer, the library and the compiler share it."""

from __future__ import annotations

import importlib
from typing import Any

from nlgraph._base import IMPORT_PATH_RE
from nlgraph._errors import SpecError

__all__ = ["resolve"]


def resolve(path: str) -> Any:
    """Import ``package.module:attr`` (raising :class:`SpecError` naming the path on failure)."""
    if not IMPORT_PATH_RE.match(path):
        raise SpecError(f"{path!r} is not an import path of the form 'package.module:attribute'")
    mod_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as err:
        raise SpecError(f"cannot import module {mod_name!r} of {path!r}: {err}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SpecError(f"{path!r}: module {mod_name!r} has no attribute {attr!r}") from None
    return obj
