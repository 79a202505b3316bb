"""The paper's systems written in the DSL, by name.

``names()`` lists them, ``get(name, **kwargs)`` builds one (``name`` may also be
``"package.module:function"`` returning a :class:`~nlgraph.Graph`). Definitions are torch-free:
they are specs, compiled elsewhere.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nlgraph._errors import NLGraphError, SpecError
from nlgraph._resolve import resolve
from nlgraph.graph import Graph

__all__ = ["Entry", "register", "names", "entries", "get", "resolve", "builder"]


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "optimizer", "memory", "model", "block"
    builder: Callable[..., Graph]
    summary: str


_REGISTRY: dict[str, Entry] = {}
_LOADED = False


def register(name: str, kind: str) -> Callable[[Callable[..., Graph]], Callable[..., Graph]]:
    """Decorator adding a graph builder to the library under ``name``."""

    def deco(fn: Callable[..., Graph]) -> Callable[..., Graph]:
        if name in _REGISTRY:
            raise ValueError(f"library name {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        _REGISTRY[name] = Entry(name, kind, fn, summary)
        return fn

    return deco


def _load() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for mod in ("optimizers", "memories", "models"):
            importlib.import_module(f"nlgraph.library.{mod}")


def entries(kind: str | None = None) -> list[Entry]:
    _load()
    return [e for n, e in sorted(_REGISTRY.items()) if kind is None or e.kind == kind]


def names(kind: str | None = None) -> list[str]:
    return [e.name for e in entries(kind)]


def get(name: str, **kwargs: Any) -> Graph:
    """Build the library graph ``name`` (or call ``module:function``) with ``kwargs``."""
    _load()
    if name in _REGISTRY:
        builder = _REGISTRY[name].builder
    elif ":" in name:
        builder = resolve(name)
        if not callable(builder):
            raise SpecError(f"{name!r} is not callable; expected a function returning a Graph")
    else:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise SpecError(
            f"unknown library name {name!r}{hint} (`nlgraph list` shows all; "
            "'module:function' names your own)"
        )
    try:
        graph = builder(**kwargs)
    except TypeError as err:
        raise SpecError(f"{name!r}: bad arguments {sorted(kwargs)}: {err}") from None
    except NLGraphError:
        raise
    except Exception as err:
        if name in _REGISTRY:  # a library builder failing is a bug in nlgraph: keep it loud
            raise
        raise SpecError(
            f"{name!r} raised {type(err).__name__}: {err} (--debug shows the traceback)"
        ) from err
    if not isinstance(graph, Graph):
        raise SpecError(f"{name!r} returned {type(graph).__name__}, expected an nlgraph.Graph")
    return graph


def builder(name: str) -> Callable[..., Graph]:
    """The builder function registered as ``name`` (its keyword arguments are the graph's
    hyperparameters, e.g. for :func:`nlgraph.optim.compile_optimizer`)."""
    _load()
    if name not in _REGISTRY:
        get(name)  # raises the helpful unknown-name error
    return _REGISTRY[name].builder
