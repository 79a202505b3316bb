"""Symbolic hyperparameters: a graph that remembers which of its numbers are ``lr``.

``trace(builder)`` calls a graph builder (a function of named hyperparameters, such as
``nlgraph.library.optimizers.adam``) with floats that remember their expression
(:class:`nlgraph._expr.Sym`), and stores in the graph's spec its hyperparameters (names and
defaults), where each reaches a number (``levels[w].optimizer[0].update.a.a.value = -lr``) and
the conditions its structure rests on (``momentum != 0``). The spec serializes with them, so a
loaded graph takes new values (:func:`substitute`) as its builder would: this is what lets
``compile_optimizer(nl.load("adam.yaml"))`` accept ``lr=`` and follow an LR scheduler.

Only float defaults are symbolic. A bool, int or string (``amsgrad``, ``ns_steps``) shapes the
graph and is *fixed*: a loaded graph keeps it and refuses another value. So is a float that
reaches a number through code the trace cannot follow (``math.sqrt(lr)``, ``float(lr)``): each
symbolic hyperparameter is checked by building the graph once more with it nudged, and every
number that moved must be one the trace recorded, with the value its expression gives.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, field_validator, model_validator

from nlgraph import _base
from nlgraph._base import NAME_RE, Spec
from nlgraph._errors import NLGraphError, SpecError, SpecFieldError
from nlgraph._expr import COMPARE, Expr, Name, Sym, evaluate, names, parse, parse_condition, text

if TYPE_CHECKING:
    from nlgraph.graph import Graph
    from nlgraph.level import GraphSpec

__all__ = ["HyperParam", "Use", "Hyperparameters", "trace", "substitute", "numbers"]

Value = bool | int | float | str | None


class HyperParam(Spec):
    """A named hyperparameter and its value in this spec; ``fixed`` ones shape the graph (or
    reach it through code a trace cannot follow) and cannot change once it is built."""

    name: str
    default: Value | tuple[Value, ...]
    fixed: bool = False

    @field_validator("name")
    @classmethod
    def _identifier(cls, v: str) -> str:
        if not NAME_RE.match(v) or "." in v:
            raise ValueError(f"{v!r} is not a Python identifier")
        return v


class Use(Spec):
    """The number at ``at`` (a path into the spec) is ``value``, an expression of
    hyperparameters (``-lr``, ``lr * wd``)."""

    at: str
    value: str

    @field_validator("value")
    @classmethod
    def _expression(cls, v: str) -> str:
        _parse(v)
        return v

    @field_validator("at")
    @classmethod
    def _path(cls, v: str) -> str:
        _steps(v)
        return v


class Hyperparameters(Spec):
    """A spec's symbolic hyperparameters: ``params`` with their values, the numbers they make
    (``uses``) and the conditions on them the graph's structure assumes (``requires``)."""

    params: tuple[HyperParam, ...]
    uses: tuple[Use, ...] = ()
    requires: tuple[str, ...] = ()

    @field_validator("requires")
    @classmethod
    def _conditions(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for c in v:
            _parse_condition(c)
        return v

    @model_validator(mode="after")
    def _declared(self) -> Hyperparameters:
        declared = [p.name for p in self.params]
        if len(set(declared)) != len(declared):
            raise ValueError(f"a hyperparameter is declared twice in {declared}")
        exprs = [(u.value, _parse(u.value)) for u in self.uses]
        exprs += [(c, e) for c in self.requires for e in _parse_condition(c)[::2]]
        for where, e in exprs:
            unknown = names(e) - set(declared)
            if unknown:
                raise ValueError(f"{where!r} uses {sorted(unknown)}, not among {declared}")
        return self

    def values(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


@lru_cache(maxsize=4096)
def _parse(s: str) -> Expr:
    return parse(s)


@lru_cache(maxsize=1024)
def _parse_condition(s: str) -> tuple[Expr, str, Expr]:
    return parse_condition(s)


# ------------------------------------------------------------------------------------- paths
_STEP = re.compile(r"([A-Za-z_]\w*)((?:\[[^\[\]]+\])?)")
_SKIP = ("doc", "meta", "hyperparameters")  # descriptions, not numbers the graph computes with


def _steps(path: str) -> list[tuple[str, str | None]]:
    """``levels[w].optimizer[0].lr`` -> ``[("levels", "w"), ("optimizer", "0"), ("lr", None)]``."""
    out, i = [], 0
    while True:
        m = _STEP.match(path, i)
        if m is None:
            raise ValueError(f"{path!r} is not a path such as 'levels[w].optimizer[0].lr'")
        out.append((m.group(1), m.group(2)[1:-1] or None))
        i = m.end()
        if i == len(path):
            return out
        if path[i] != ".":
            raise ValueError(f"{path!r} is not a path such as 'levels[w].optimizer[0].lr'")
        i += 1


def _key(item: Any, index: int) -> str:
    name = item.get("name") if isinstance(item, dict) else getattr(item, "name", None)
    return name if isinstance(name, str) else str(index)


def _walk(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    """``(path, value)`` for every model node and number under ``obj``."""
    if isinstance(obj, BaseModel):
        yield path, obj
        for field in type(obj).model_fields:
            if field not in _SKIP:
                yield from _child(getattr(obj, field), f"{path}.{field}" if path else field)
    elif isinstance(obj, float | int) and not isinstance(obj, bool):
        yield path, obj


def _child(v: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(v, list | tuple):
        for i, x in enumerate(v):
            yield from _walk(x, f"{path}[{_key(x, i)}]")
    elif isinstance(v, dict):
        for k, x in v.items():
            yield from _walk(x, f"{path}[{k}]")
    else:
        yield from _walk(v, path)


def numbers(spec: BaseModel) -> dict[str, float]:
    """Every float of a spec by path (docs and meta left out)."""
    return {p: v for p, v in _walk(spec, "") if isinstance(v, float)}


def _skeleton(spec: BaseModel) -> Any:
    data = spec.model_dump(mode="json", exclude={"hyperparameters", "doc", "meta"})

    def blank(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: blank(v) for k, v in x.items() if k != "doc"}
        if isinstance(x, list):
            return [blank(v) for v in x]
        return None if isinstance(x, float) else x

    return blank(data)


def _replace(node: Any, steps: list[tuple[str, str | None]], value: float) -> Any:
    """``node`` with the number at ``steps`` set to ``value``. The object holding the number is
    built again through its class (its fields are checked, as the builder's call would); the
    objects above it are copied with the new child (they hold nothing new to check)."""
    (field, key), rest = steps[0], steps[1:]
    if key is None and not rest:
        fields = {f: getattr(node, f) for f in type(node).model_fields}
        return type(node)(**{**fields, field: value})
    child = getattr(node, field)
    if key is None:
        new: Any = _replace(child, rest, value)
    elif isinstance(child, dict):
        new = {**child, key: _replace(child[key], rest, value)}
    else:
        i = next(i for i, x in enumerate(child) if _key(x, i) == key)
        new = (*child[:i], _replace(child[i], rest, value), *child[i + 1 :])
    return node.model_copy(update={field: new})


# ------------------------------------------------------------------------------- the checks
def check(spec: GraphSpec) -> None:
    """Every use names a number of ``spec`` that its expression gives at the defaults (a
    hand-edited file whose number and default disagree is refused, not half-applied)."""
    hp = spec.hyperparameters
    if hp is None:
        return
    have, values = numbers(spec), hp.values()
    for u in hp.uses:
        if u.at not in have:
            raise ValueError(f"hyperparameters: {u.at!r} is not a number of this graph")
        want = _number(u.value, values)
        if not _close(have[u.at], want):
            raise ValueError(
                f"hyperparameters: {u.at} holds {have[u.at]!r} but {u.value} gives {want!r} at "
                f"the defaults; edit the defaults, not the numbers they make"
            )


def _close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def _number(expr: str, values: Mapping[str, Any]) -> float:
    try:
        out = evaluate(_parse(expr), values)
    except (ArithmeticError, TypeError, ValueError) as err:
        raise SpecError(f"{expr} with {dict(values)}: {err}") from None
    if not isinstance(out, int | float) or isinstance(out, bool) or not math.isfinite(out):
        raise SpecError(f"{expr} with {dict(values)} gives {out!r}, not a finite number")
    return float(out)


def _holds(condition: str, values: Mapping[str, Any]) -> bool:
    a, op, b = _parse_condition(condition)
    return bool(COMPARE[op](evaluate(a, values), evaluate(b, values)))


# ---------------------------------------------------------------------------------- tracing
def _arguments(builder: Callable[..., Any], given: Mapping[str, Any]) -> dict[str, Any]:
    who = getattr(builder, "__name__", "builder")
    try:
        sig = inspect.signature(builder)
    except (TypeError, ValueError):
        raise SpecError(f"trace: {who!r} has no signature to read hyperparameters from") from None
    out: dict[str, Any] = {}
    for name, p in sig.parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in given:
            out[name] = given[name]
        elif p.default is not p.empty:
            out[name] = p.default
        else:
            raise SpecError(f"trace({who}): {name!r} has no default; pass {name}=...")
    unknown = sorted(set(given) - set(out))
    if unknown:
        raise SpecError(f"trace({who}): unknown hyperparameters {unknown}; expected {list(out)}")
    for name, v in out.items():
        ok = isinstance(v, Value) or (
            isinstance(v, tuple | list) and all(isinstance(x, Value) for x in v)
        )
        if not ok:
            raise SpecError(
                f"trace({who}): {name}={v!r} is a {type(v).__name__}; a saved hyperparameter is a "
                "number, bool, string, None or a list of them"
            )
    return out


def trace(builder: Callable[..., Graph], **values: Any) -> Graph:
    """Build ``builder(**values)`` (its defaults for the rest) with its hyperparameters kept
    symbolic in the graph's spec (see the module docstring)."""
    from nlgraph.graph import Graph

    args = _arguments(builder, values)
    symbolic = [n for n, v in args.items() if type(v) is float]
    recorded: dict[int, tuple[Spec, dict[str, Expr]]] = {}

    def record(obj: Spec, kwargs: Mapping[str, Any]) -> None:
        syms = {k: v.expr for k, v in kwargs.items() if isinstance(v, Sym)}
        if syms:
            recorded[id(obj)] = (obj, syms)  # holding obj keeps its id unique while tracing

    conditions: list[str] = []
    _base.BUILD_HOOKS.append(record)
    Sym.conditions.append(conditions)
    try:
        graph = builder(**{**args, **{n: Sym(args[n], Name(n)) for n in symbolic}})
    finally:
        _base.BUILD_HOOKS.pop()
        Sym.conditions.pop()
    if not isinstance(graph, Graph):
        raise SpecError(f"trace: the builder returned {type(graph).__name__}, not a Graph")
    spec = graph.spec
    uses: dict[str, Expr] = {}
    for path, node in _walk(spec, ""):
        hit = recorded.get(id(node))
        if hit is not None and hit[0] is node:
            for field, expr in hit[1].items():
                uses[f"{path}.{field}" if path else field] = expr
    requires = tuple(dict.fromkeys(conditions))
    follows = {n: _follows(builder, args, n, spec, uses, requires) for n in symbolic}
    graph.hyperparameters = Hyperparameters(
        params=tuple(
            HyperParam(name=n, default=v, fixed=not follows.get(n, False)) for n, v in args.items()
        ),
        uses=tuple(Use(at=p, value=text(e)) for p, e in uses.items()),
        requires=requires,
    )
    return graph


def _follows(
    builder: Callable[..., Graph],
    args: Mapping[str, Any],
    name: str,
    spec: GraphSpec,
    uses: Mapping[str, Expr],
    requires: tuple[str, ...],
) -> bool:
    """Whether the recorded uses account for every number ``name`` moves: the graph is built
    again with ``name`` nudged (within the conditions that held) and compared."""
    v = args[name]
    base, skeleton = numbers(spec), None
    for nudged in (v * (1 + 2**-10), v * (1 - 2**-10)) if v else (2**-10, -(2**-10)):
        values = {**args, name: nudged}
        if not all(_holds(c, values) for c in requires):
            continue
        try:
            other = builder(**values).spec
        except NLGraphError:
            continue
        skeleton = skeleton or _skeleton(spec)
        moved = numbers(other)
        if moved.keys() != base.keys() or _skeleton(other) != skeleton:
            return False  # a structure the conditions did not announce
        for path, x in moved.items():
            want = evaluate(uses[path], values) if path in uses else base[path]
            if not _close(x, want):
                return False
        return True
    return True  # no neighbouring value builds: the conditions pin it anyway


# ------------------------------------------------------------------------------ substitution
def substitute(graph: Graph | GraphSpec, **values: Any) -> Graph:
    """The graph with hyperparameters set to ``values`` (the others at their defaults), as its
    builder would have built it; the result keeps its hyperparameters, with these as defaults."""
    from nlgraph.graph import Graph

    spec = graph.spec if isinstance(graph, Graph) else graph
    hp = spec.hyperparameters
    if hp is None:
        if values:
            raise SpecError(
                f"graph {spec.name!r} has no symbolic hyperparameters (build it with nl.trace to "
                f"keep them); cannot set {sorted(values)}"
            )
        return Graph.from_spec(spec)
    declared = hp.values()
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise SpecError(
            f"graph {spec.name!r}: unknown hyperparameters {unknown}; it has {list(declared)}"
        )
    merged = {**declared, **values}
    for p in hp.params:
        if p.fixed and p.name in values and values[p.name] != p.default:
            raise SpecError(
                f"graph {spec.name!r}: {p.name} is fixed at {p.default!r} in this graph (it "
                f"shapes the graph's structure); {p.name}={values[p.name]!r} needs the graph "
                "rebuilt by its function"
            )
    for c in hp.requires:
        if not _holds(c, merged):
            changed = ", ".join(f"{k}={merged[k]!r}" for k in sorted(names(_parse_condition(c)[0])))
            raise SpecError(
                f"graph {spec.name!r}: {changed} breaks {c!r}, which its structure rests on; "
                "that value needs the graph rebuilt by its function"
            )
    out = spec
    for u in hp.uses:
        try:
            out = _replace(out, _steps(u.at), _number(u.value, merged))
        except SpecFieldError as err:
            raise SpecError(
                f"graph {spec.name!r}: {', '.join(f'{k}={merged[k]!r}' for k in values)} makes "
                f"{u.at} = {u.value} invalid: {err}"
            ) from None
    params = tuple(p.model_copy(update={"default": merged[p.name]}) for p in hp.params)
    return Graph.from_spec(
        out.model_copy(update={"hyperparameters": hp.model_copy(update={"params": params})})
    )
