"""The edges of a graph of levels, and the level ordering of PAPER.md 1.2 (Def. 2).

Edges are derived from the specs, never declared twice: a level's context, objective target and
optimizer flows name the levels and inputs they read. Each edge has a kind:

- ``context``: the level compresses (or is keyed by) the source's output or state;
- ``gradient``: the level's context is a gradient of (or with respect to) the source;
- ``optimizer``: the source is this level's optimizer state (``follow``/``precondition``: nesting);
- ``generates``: the source produces a data-dependent learning rate, momentum or gate;
- ``init``: the source (a slower level) meta-learns this level's initial state;
- ``reset``: this level resets when the source's chunk ends (nested CMS);
- ``shape``: this level's state is shaped like the source's.

Ordering: ``A`` is faster than ``B`` if it updates more often, or at the same frequency when
``B``'s update at tick ``t`` needs ``A``'s state at ``t`` (an edge read ``at="new"``). Tiers are
numbered from the fastest (1) to the slowest; levels in one tier share a frequency and are
independent (Adam's two moments).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from nlgraph.flows import FlowBase, references
from nlgraph.level import GraphSpec, Level
from nlgraph.optimizers import Follow, Precondition, Signal, scalar_fields

__all__ = [
    "Edge", "EDGE_KINDS", "edges", "to_networkx", "tiers", "frequency_key", "is_faster",
    "first_order_levels",
]  # fmt: skip

EDGE_KINDS = ("context", "gradient", "optimizer", "generates", "init", "reset", "shape")
# Kinds that are data dependencies at update time (the others are about initialisation).
DATA_KINDS = ("context", "gradient", "optimizer", "generates")


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    kind: str
    same_tick: bool  # dst's update at tick t reads src's state after src's update at t
    src_is_input: bool = False


def _flow_edges(
    dst: str, flow: FlowBase, kind: str, inputs: set[str], named: dict | None = None
) -> list[Edge]:
    out = []
    for ref_kind, name, at in references(flow, named):
        k = "gradient" if ref_kind == "grad" else kind
        out.append(Edge(name, dst, k, at == "new" and ref_kind != "input", name in inputs))
    return out


def level_edges(level: Level, inputs: set[str], named: dict | None = None) -> list[Edge]:
    """Edges into ``level`` (before de-duplication)."""
    name = level.name
    out: list[Edge] = []
    if level.context is not None:
        out += _flow_edges(name, level.context, "context", inputs, named)
    target = getattr(level.objective, "target", None)
    if isinstance(target, FlowBase):
        out += _flow_edges(name, target, "context", inputs, named)
    for rule in level.optimizer:
        for value in scalar_fields(rule).values():
            if isinstance(value, Signal):
                out += _flow_edges(name, value.flow, "generates", inputs, named)
        if isinstance(rule, Follow | Precondition):
            flow = rule.update if isinstance(rule, Follow) else rule.by
            out += _flow_edges(name, flow, "optimizer", inputs, named)
    if level.init.kind == "meta" and level.init.level:
        out.append(Edge(level.init.level, name, "init", False))
    reset = level.reset
    if reset is not None and reset.kind == "with" and reset.level:
        out.append(Edge(reset.level, name, "reset", False))
    if level.state.kind == "like":
        out.append(Edge(level.state.level, name, "shape", False))
    return out


def edges(spec: GraphSpec) -> list[Edge]:
    """All edges of the graph, one per (src, dst, kind), sorted; self-references are dropped
    (a memory reading its own previous state is its recurrence, not an edge)."""
    inputs = {i.name for i in spec.inputs}
    merged: dict[tuple[str, str, str], Edge] = {}
    for level in spec.levels:
        for e in level_edges(level, inputs, spec.flows):
            if e.src == e.dst:
                continue
            key = (e.src, e.dst, e.kind)
            prev = merged.get(key)
            if prev is None or (e.same_tick and not prev.same_tick):
                merged[key] = e
    return sorted(merged.values(), key=lambda e: (e.src, e.dst, e.kind))


def first_order_levels(spec: GraphSpec) -> frozenset[str]:
    """Levels whose in-sequence updates are first-order: ``stop_grad`` declared on the level's
    own recurrence (``g.differentiate("M", "M", stop_grad())``). The outer gradient then takes
    each of their updates as a constant increment (first-order MAML): a read sees
    ``M_start + sg(M_t - M_start)``, so nothing is differentiated through the writes."""
    return frozenset(d.src for d in spec.diff if d.src == d.dst and d.mode.mode == "stop_grad")


def frequency_key(spec: GraphSpec, level: Level) -> tuple[int, int]:
    return level.frequency.period_key(spec.chunk_of(level))


def is_faster(spec: GraphSpec, a: str, b: str) -> bool:
    """Whether level ``a`` updates strictly more often than level ``b``."""
    return frequency_key(spec, spec.level(a)) < frequency_key(spec, spec.level(b))


def to_networkx(spec: GraphSpec) -> nx.MultiDiGraph:
    """Levels and inputs as nodes (``type`` attribute), edges keyed by kind."""
    g = nx.MultiDiGraph(name=spec.name)
    for inp in spec.inputs:
        g.add_node(inp.name, type="input", spec=inp)
    for lv in spec.levels:
        g.add_node(lv.name, type="level", spec=lv, frequency_key=frequency_key(spec, lv))
    for e in edges(spec):
        g.add_edge(e.src, e.dst, key=e.kind, kind=e.kind, same_tick=e.same_tick)
    return g


def same_tick_graph(spec: GraphSpec) -> nx.DiGraph:
    """Same-frequency, same-tick data dependencies: the graph that must be acyclic."""
    g = nx.DiGraph()
    g.add_nodes_from(lv.name for lv in spec.levels)
    names = set(g.nodes)
    for e in edges(spec):
        if e.kind not in DATA_KINDS or not e.same_tick or e.src not in names or e.dst not in names:
            continue
        if frequency_key(spec, spec.level(e.src)) == frequency_key(spec, spec.level(e.dst)):
            g.add_edge(e.src, e.dst)
    return g


def tiers(spec: GraphSpec) -> list[list[str]]:
    """Levels grouped by the ordering of Def. 2, fastest tier first; names sorted in a tier.

    Assumes the same-tick graph is acyclic (validation checks it first).
    """
    dag = same_tick_graph(spec)
    depth: dict[str, int] = {}
    for n in nx.topological_sort(dag):
        depth[n] = max((depth[p] + 1 for p in dag.predecessors(n)), default=0)
    keyed: dict[tuple[tuple[int, int], int], list[str]] = {}
    for lv in spec.levels:
        keyed.setdefault((frequency_key(spec, lv), depth[lv.name]), []).append(lv.name)
    return [sorted(keyed[k]) for k in sorted(keyed)]
