"""The base of every spec object: frozen, typed, and strict about unknown fields."""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from nlgraph._errors import SpecFieldError

__all__ = ["Spec", "NAME_RE", "IMPORT_PATH_RE", "format_validation_error", "BUILD_HOOKS"]

# Called with each spec object built by a call and the call's keyword arguments, innermost last:
# nlgraph.hyper.trace records where symbolic hyperparameters land (empty otherwise).
BUILD_HOOKS: list[Callable[[Any, dict[str, Any]], None]] = []

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 3, 4, 4, 60, 60

# Level and input names: identifiers, optionally dotted (``block0.cms.fast``) for nesting.
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# ``package.module:attribute`` (the attribute may be dotted).
IMPORT_PATH_RE = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
)


class _SpecMeta(type(BaseModel)):  # type: ignore[misc]
    """Constructing a spec object (``GD(...)``, ``nl.gd(...)``, ``Level(...)``) with a bad
    field raises :class:`~nlgraph.SpecFieldError`. Only explicit construction passes through
    here: pydantic validating nested data (``GraphSpec.model_validate``, loading a file)
    builds its objects without calling the class, so its errors keep their full path."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            obj = super().__call__(*args, **kwargs)
        except ValidationError as err:
            raise SpecFieldError(cls.__name__, format_validation_error(err)) from None
        if BUILD_HOOKS:
            BUILD_HOOKS[-1](obj, kwargs)
        return obj


class Spec(BaseModel, metaclass=_SpecMeta):
    """Frozen pydantic model with ``extra="forbid"``: a typo in a field name is an error.

    A bad field raises :class:`~nlgraph.SpecFieldError` (a :class:`~nlgraph.SpecError`) naming
    the spec object, the field, what was received and what is allowed, never pydantic's own
    error."""

    # allow_inf_nan=False: every number of a spec (a rate, a scale, a size) must be finite
    model_config = ConfigDict(
        frozen=True, extra="forbid", validate_default=True, allow_inf_nan=False
    )


def _all_fields() -> set[str]:
    out: set[str] = set()
    stack: list[type[BaseModel]] = [Spec]
    while stack:
        cls = stack.pop()
        out.update(cls.model_fields)
        stack.extend(cls.__subclasses__())
    return out


def _loc(loc: tuple[Any, ...], data: Any) -> str:
    """``levels.2.optimizer`` -> ``level 'm' > optimizer`` when the raw data is at hand."""
    parts: list[str] = []
    node = data
    i = 0
    while i < len(loc):
        key = loc[i]
        if key == "levels" and i + 1 < len(loc) and isinstance(node, dict):
            try:
                name = node["levels"][loc[i + 1]].get("name", loc[i + 1])
            except (KeyError, IndexError, TypeError, AttributeError):
                name = loc[i + 1]
            parts.append(f"level {name!r}")
            node = None
            i += 2
            continue
        parts.append(str(key))
        node = node.get(key) if isinstance(node, dict) else None
        i += 1
    return " > ".join(parts) if parts else "(top level)"


def format_validation_error(err: ValidationError, data: Any = None) -> str:
    """One line per problem: where, what was received, what is expected."""
    lines = []
    known = _all_fields()
    for e in err.errors(include_url=False):
        where = _loc(tuple(e["loc"]), data)
        received = _SHORT.repr(e.get("input"))  # bounded: never walks a whole (shared) value
        if len(received) > 80:
            received = received[:77] + "..."
        if e["type"] == "extra_forbidden":
            field = str(e["loc"][-1])
            close = difflib.get_close_matches(field, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            lines.append(f"{where}: unknown field {field!r}{hint}")
        elif e["type"] == "missing":
            lines.append(f"{where}: required field is missing")
        elif e["type"] == "union_tag_invalid":
            lines.append(f"{where}: {e['msg']}")
        else:
            lines.append(f"{where}: {e['msg']} (received {received})")
    return "; ".join(lines)
