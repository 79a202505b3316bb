"""Optimizers to compare, from what a user names: a SPEC string or a Python object.

A SPEC string is resolved as every ``nlgraph`` verb resolves one (docs/cli.md): a library name,
a ``.json``/``.yaml``/``.yml`` file, ``package.module:function`` or ``-`` (stdin). Here the
function is kept as the optimizer's builder, so its keyword arguments (``lr`` among them) stay
hyperparameters; a file keeps those it was traced with (``nl.trace``, docs/dsl.md).
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nlgraph import library
from nlgraph._errors import NLGraphError
from nlgraph._resolve import resolve
from nlgraph.bench_optim.errors import BenchConfigError
from nlgraph.graph import Graph
from nlgraph.level import GraphSpec
from nlgraph.optim import compile_optimizer
from nlgraph.serialize import from_json, from_yaml, load

__all__ = ["Candidate", "candidate", "DEFAULT_BASELINES"]

# The library's optimizers every SPEC is compared against (Muon and M3 with AdamW for vectors).
DEFAULT_BASELINES = ("adamw", "muon_adamw", "m3_adamw")


@dataclass(frozen=True)
class Candidate:
    """One optimizer of the comparison: a row of the table.

    ``base_lr`` is the default of its ``lr`` hyperparameter, the centre of its learning-rate
    grid; ``None`` when it has none (a file saved without ``nl.trace``): it runs once per seed
    at its own numbers.
    """

    label: str
    cls: type[torch.optim.Optimizer]
    base_lr: float | None
    baseline: bool = False


def _base_lr(cls: type[torch.optim.Optimizer]) -> float | None:
    try:
        param = inspect.signature(cls).parameters.get("lr")
    except (TypeError, ValueError):
        return None
    value = None if param is None else param.default
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if 0 < value < math.inf else None
    return None


def _from_string(ref: str, stdin_text: str | None) -> tuple[str, Any]:
    if ref == "-":
        text = sys.stdin.read() if stdin_text is None else stdin_text
        graph = (
            from_json(text, "<stdin>")
            if text.lstrip().startswith("{")
            else from_yaml(text, "<stdin>")
        )
        return graph.name, graph
    path = Path(ref)
    if path.suffix in (".json", ".yaml", ".yml") or path.exists():
        return ref, load(path)
    if ":" in ref:
        obj = resolve(ref)
        if isinstance(obj, Graph | GraphSpec | type):
            return ref, obj
        library.get(ref)  # a function: called once, refused unless it returns a Graph
        return ref, obj
    builder = library.builder(ref)  # an unknown name: SpecError with close matches
    kind = next(e.kind for e in library.entries() if e.name == ref)
    if kind != "optimizer":
        raise BenchConfigError(
            f"{ref!r} is a library {kind}, not an optimizer; `nlgraph list --kind optimizer` "
            "lists the optimizers"
        )
    return ref, builder


def _check_builder(label: str, fn: Callable[..., Any]) -> None:
    """Call a Python builder once with its defaults: it must return a Graph."""
    try:
        graph = fn()
    except NLGraphError:
        raise
    except Exception as err:
        raise BenchConfigError(
            f"{label!r} raised {type(err).__name__} when called with its defaults: {err}"
        ) from err
    if not isinstance(graph, Graph):
        raise BenchConfigError(
            f"{label!r} returned {type(graph).__name__}, expected an nlgraph.Graph"
        )


def candidate(
    spec: str | Callable[..., Any] | Graph | GraphSpec | type[torch.optim.Optimizer],
    baseline: bool = False,
    stdin_text: str | None = None,
) -> Candidate:
    """The optimizer class ``spec`` names (compiled with
    :func:`nlgraph.optim.compile_optimizer` unless it is an optimizer class already).

    Raises :class:`~nlgraph.SpecError` (an unknown name, a bad file or import path) or
    :class:`BenchConfigError` (a name or object that is not an optimizer).
    """
    if isinstance(spec, str):
        label, obj = _from_string(spec, stdin_text)
    else:
        obj = spec
        label = getattr(spec, "__name__", None) or getattr(spec, "name", type(spec).__name__)
        if callable(obj) and not isinstance(obj, type):
            _check_builder(str(label), obj)
    if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
        cls = obj
    elif isinstance(obj, Graph | GraphSpec) or (callable(obj) and not isinstance(obj, type)):
        try:
            cls = compile_optimizer(obj)
        except (TypeError, ValueError) as err:  # a callable compile_optimizer cannot inspect
            raise BenchConfigError(f"{label!r} is not an optimizer builder: {err}") from None
    else:
        raise BenchConfigError(
            f"{label!r} is a {type(obj).__name__}; expected a SPEC string, a function returning "
            "an optimizer Graph, a Graph, or a torch.optim.Optimizer class"
        )
    return Candidate(str(label), cls, _base_lr(cls), baseline)
