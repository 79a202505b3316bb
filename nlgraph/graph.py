"""The builder users write learners with: ``Graph``, its level handles, and composition.

Example — SGD with momentum as two levels (PAPER.md 2.2, Eq. 33)::

    g = nl.Graph("momentum")
    w = g.level("w", state=nl.params(), frequency=nl.per_step(),
                objective=nl.outer(), optimizer=nl.follow(nl.state("m", at="new")))
    g.level("m", state=nl.like("w"), frequency=nl.per_step(),
            context=-w.grad(), objective=nl.dot(), optimizer=nl.gd(lr=0.1, retain=0.9))

The builder is mutable; :attr:`Graph.spec` freezes it into a :class:`~nlgraph.level.GraphSpec`,
which is what is validated, serialized, drawn and compiled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import networkx as nx

from nlgraph._errors import SpecError, SpecFieldError, SpecTypeError
from nlgraph.flows import FlowBase, Grad, Input, Read, Ref, State, as_flow, require_at
from nlgraph.hyper import Hyperparameters
from nlgraph.level import EdgeDiff, GraphSpec, InputSpec, Level

__all__ = ["Graph", "LevelHandle"]


def _json_meta(graph: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Meta as JSON will hold it (tuples become lists), so round trips are identities."""
    import json

    try:
        return json.loads(json.dumps(meta))
    except (TypeError, ValueError) as err:
        raise SpecError(
            f"graph {graph!r}: meta must be JSON data (numbers, strings, lists): {err}"
        ) from None


class LevelHandle:
    """A reference to a level inside a graph under construction: call it to read the memory."""

    def __init__(self, graph: Graph, name: str) -> None:
        self.graph = graph
        self.name = name

    def __call__(self, arg: object, at: str = "prev") -> Read:
        """The read-out ``M(arg)`` (``at="prev"``: with the state before this tick's update)."""
        return Read(level=self.name, arg=as_flow(arg, f"{self.name}(arg)"), at=at)  # type: ignore[arg-type]

    def state(self, at: str | None = None) -> State:
        """The level's state, ``at="new"`` (after this tick's update) or ``"prev"`` (before it);
        ``at`` is required (:func:`nlgraph.flows.require_at`)."""
        at = require_at(f"{self.name}.state()", self.name, at)
        return State(level=self.name, at=at)  # type: ignore[arg-type]

    def grad(self, objective: str = "loss") -> Grad:
        """The gradient of ``objective`` (default: the outer loss) w.r.t. this level's state."""
        return Grad(wrt=self.name, objective=objective)

    @property
    def spec(self) -> Level:
        return self.graph.get(self.name)

    def __repr__(self) -> str:
        return f"LevelHandle({self.name!r})"


class Graph:
    """A learner as a graph of levels, built step by step.

    Args:
        name: the graph's name (shown in listings and drawings).
        doc: one paragraph on what it is, with equation numbers.
        chunk: default chunk size in tokens for levels that do not set their own.
    """

    def __init__(self, name: str, doc: str = "", chunk: int = 1, **meta: Any) -> None:
        self.name = name
        self.doc = doc
        self.chunk = chunk
        self.meta: dict[str, Any] = dict(meta)
        self._inputs: dict[str, InputSpec] = {}
        self._levels: dict[str, Level] = {}
        self._flows: dict[str, FlowBase] = {}
        self._outputs: dict[str, FlowBase] = {}
        self._diff: list[EdgeDiff] = []
        # set by nl.trace: the named hyperparameters the graph was built from (nlgraph.hyper)
        self.hyperparameters: Hyperparameters | None = None

    # ------------------------------------------------------------------------------- building
    def input(self, name: str, dim: int | str | None = None, kind: str = "vector") -> Input:
        """Declare an input stream; returns its flow."""
        self._check_name("input", name)
        if name in self._inputs or name in self._levels:
            raise SpecError(
                f"graph {self.name!r}: the name {name!r} is already used by an "
                f"{'input' if name in self._inputs else 'level'}; pick a unique name"
            )
        try:
            self._inputs[name] = InputSpec(name=name, dim=dim, kind=kind)  # type: ignore[arg-type]
        except SpecFieldError as err:
            raise SpecError(f"graph {self.name!r}, input {name!r}: {err.detail}") from None
        return Input(name=name)

    def level(self, name: str, **fields: Any) -> LevelHandle:
        """Declare a level (see :class:`~nlgraph.level.Level` for the fields); returns a handle."""
        self._check_name("level", name)
        if name in self._levels or name in self._inputs:
            raise SpecError(
                f"graph {self.name!r}: duplicate name {name!r} (already an "
                f"{'input' if name in self._inputs else 'level'}); level names must be unique"
            )
        opt = fields.get("optimizer")
        if opt is not None and not isinstance(opt, tuple | list):
            fields["optimizer"] = (opt,)
        try:
            self._levels[name] = Level(name=name, **fields)
        except SpecFieldError as err:
            raise SpecError(f"level {name!r}: {err.detail}") from None
        return LevelHandle(self, name)

    def let(self, name: str, flow: object) -> Ref:
        """Name a flow; the returned reference is one shared node however often it is read
        (a residual stream read by the next block's norm and its skip connection)."""
        self._check_name("let", name)
        if name in self._flows or name in self._levels or name in self._inputs:
            raise SpecError(f"graph {self.name!r}: the name {name!r} is already used")
        self._flows[name] = as_flow(flow, f"graph {self.name!r}, let({name!r})")
        return Ref(name=name)

    def output(self, name: str, flow: object) -> None:
        """Name a flow as an output of the learner (e.g. ``y = mem(q)``)."""
        self._outputs[name] = as_flow(flow, f"graph {self.name!r}, output({name!r})")

    def differentiate(self, src: str, dst: str, mode: Any) -> None:
        """Declare how the edge ``src -> dst`` is differentiated (``stop_grad``, ``truncated(k)``,
        ``unrolled``; the default is unrolled)."""
        self._diff = [d for d in self._diff if (d.src, d.dst) != (src, dst)]
        self._diff.append(EdgeDiff(src=src, dst=dst, mode=mode))

    def _check_name(self, what: str, name: object) -> None:
        """A name must be a string before it is looked up (a list would fail as unhashable)."""
        if not isinstance(name, str):
            raise SpecTypeError(
                f"graph {self.name!r}: {what} name must be a string, got {type(name).__name__} "
                f"({name!r:.40})"
            )

    def get(self, name: str) -> Level:
        try:
            return self._levels[name]
        except KeyError:
            raise SpecError(
                f"graph {self.name!r} has no level {name!r}; levels: {sorted(self._levels)}"
            ) from None

    def handle(self, name: str) -> LevelHandle:
        self.get(name)
        return LevelHandle(self, name)

    def include(
        self, sub: Graph, prefix: str, bind: Mapping[str, object] | None = None
    ) -> dict[str, FlowBase]:
        """Copy ``sub``'s levels into this graph as ``prefix.<name>``.

        ``bind`` maps ``sub``'s input names to flows of this graph; unbound inputs become inputs
        of this graph named ``prefix.<name>``. Returns ``sub``'s outputs, renamed. A traced
        ``sub``'s hyperparameters are not carried over (they name its own levels).
        """
        from nlgraph._rename import rename_spec

        if not isinstance(sub, Graph):
            raise SpecTypeError(
                f"graph {self.name!r}: include() takes an nl.Graph, got {type(sub).__name__}"
            )
        self._check_name("include", prefix)
        bound = {k: as_flow(v, f"include {prefix!r}: bind[{k!r}]") for k, v in (bind or {}).items()}
        spec, outputs = rename_spec(sub.spec, prefix, bound)
        for inp in spec.inputs:
            if inp.name in self._inputs or inp.name in self._levels:
                raise SpecError(f"include {sub.name!r} as {prefix!r}: name {inp.name!r} is taken")
            self._inputs[inp.name] = inp
        for lv in spec.levels:
            if lv.name in self._levels or lv.name in self._inputs:
                raise SpecError(f"include {sub.name!r} as {prefix!r}: level {lv.name!r} exists")
            self._levels[lv.name] = lv
        for name, flow in spec.flows.items():
            if name in self._flows:
                raise SpecError(f"include {sub.name!r} as {prefix!r}: flow {name!r} exists")
            self._flows[name] = flow
        self._diff.extend(spec.diff)
        return outputs

    # ------------------------------------------------------------------------------ freezing
    @property
    def spec(self) -> GraphSpec:
        try:
            return GraphSpec(
                name=self.name,
                doc=self.doc,
                chunk=self.chunk,
                inputs=tuple(self._inputs.values()),
                levels=tuple(self._levels.values()),
                flows=dict(self._flows),
                outputs=dict(self._outputs),
                diff=tuple(self._diff),
                meta=_json_meta(self.name, self.meta),
                hyperparameters=self.hyperparameters,
            )
        except SpecFieldError as err:
            raise SpecError(f"graph {self.name!r}: {err.detail}") from None

    @classmethod
    def from_spec(cls, spec: GraphSpec) -> Graph:
        g = cls(spec.name, doc=spec.doc, chunk=spec.chunk, **spec.meta)
        seen: set[str] = set()
        for item in (*spec.inputs, *spec.levels):
            if item.name in seen:
                raise SpecError(
                    f"graph {spec.name!r}: duplicate name {item.name!r}: level and input names "
                    "must be unique"
                )
            seen.add(item.name)
        g._inputs = {i.name: i for i in spec.inputs}
        g._levels = {lv.name: lv for lv in spec.levels}
        g._flows = dict(spec.flows)
        g._outputs = dict(spec.outputs)
        g._diff = list(spec.diff)
        g.hyperparameters = spec.hyperparameters
        return g

    def validate(self) -> Graph:
        """Raise :class:`~nlgraph.SpecError` if the graph is invalid; return ``self``."""
        from nlgraph.validation import validate

        validate(self.spec)
        return self

    # ------------------------------------------------------------------------------ queries
    @property
    def levels(self) -> list[str]:
        return list(self._levels)

    @property
    def inputs(self) -> list[str]:
        return list(self._inputs)

    def nx(self) -> nx.MultiDiGraph:
        from nlgraph.topology import to_networkx

        return to_networkx(self.spec)

    def tiers(self) -> list[list[str]]:
        """Levels ordered as in PAPER.md 1.2, fastest tier first (validates first)."""
        from nlgraph.topology import tiers
        from nlgraph.validation import validate

        spec = self.spec
        validate(spec)
        return tiers(spec)

    def is_faster(self, a: str, b: str) -> bool:
        """Whether level ``a`` precedes ``b`` in the ordering of Def. 2."""
        order = {n: i for i, tier in enumerate(self.tiers()) for n in tier}
        return order[self.get(a).name] < order[self.get(b).name]

    def to_json(self, **kw: Any) -> str:
        from nlgraph.serialize import to_json

        return to_json(self, **kw)

    def to_yaml(self) -> str:
        from nlgraph.serialize import to_yaml

        return to_yaml(self)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None, **kw: Any) -> dict:
        """Notebooks draw a graph as its nesting diagram (the drawing layer is imported only
        here, when a notebook asks)."""
        from nlgraph.visualize import Diagram

        bundle = Diagram.of(self)._repr_mimebundle_(include, exclude)
        bundle["text/plain"] = repr(self)
        return bundle

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Graph) and self.spec == other.spec

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Graph({self.name!r}, levels={len(self._levels)}, inputs={len(self._inputs)})"
