"""Import paths (``"package.module:attribute"``) to objects: user modules, custom objectives and
builders named in a spec. Torch-free, so the spec layer, the library and the compiler share it."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from nlgraph._base import IMPORT_PATH_RE
from nlgraph._errors import SpecError

__all__ = ["resolve"]


def _import(name: str) -> Any:
    """Import ``name``; a module of the current directory imports as under ``python -m`` (the
    ``nlgraph`` command does not put the current directory on ``sys.path`` by itself)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        here = os.getcwd()
        if err.name != name.partition(".")[0] or here in sys.path or "" in sys.path:
            raise
        sys.path.insert(0, here)
        return importlib.import_module(name)


def resolve(path: str) -> Any:
    """Import ``package.module:attr`` (raising :class:`SpecError` naming the path on failure)."""
    if not IMPORT_PATH_RE.match(path):
        raise SpecError(f"{path!r} is not an import path of the form 'package.module:attribute'")
    mod_name, _, attr = path.partition(":")
    try:
        obj: Any = _import(mod_name)
    except ImportError as err:
        raise SpecError(
            f"cannot import module {mod_name!r} of {path!r}: {err} (looked in the current "
            "directory and on sys.path; run from the module's folder or add it to PYTHONPATH)"
        ) from None
    except Exception as err:  # the user's module failed while importing
        raise SpecError(
            f"importing module {mod_name!r} of {path!r} raised {type(err).__name__}: {err} "
            "(--debug shows the traceback)"
        ) from err
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SpecError(f"{path!r}: module {mod_name!r} has no attribute {attr!r}") from None
    return obj
