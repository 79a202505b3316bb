"""Semantic validation of a graph spec: every problem becomes a :class:`SpecError` that names the
level or edge, says what was received and what was expected, and how to fix it.

Structural problems (unknown fields, wrong types, non-positive periods) are caught by pydantic and
reformatted by :func:`format_validation_error`; this module checks what needs the whole graph:
references, shapes, ranges, objectives, the clock and the level ordering.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import networkx as nx

from nlgraph._base import IMPORT_PATH_RE, NAME_RE, format_validation_error
from nlgraph._errors import SpecError
from nlgraph.flows import KV, FlowBase, Input, Read, references, walk
from nlgraph.level import EdgeDiff, GraphSpec, Level, level_flows
from nlgraph.objectives import NEEDS_VALUE
from nlgraph.optimizer_graph import is_optimizer_graph, lowering_errors
from nlgraph.optimizers import Follow, Learned, Signal, scalar_fields
from nlgraph.topology import edges, frequency_key, same_tick_graph

__all__ = ["validate", "errors", "format_validation_error", "level_flows"]

# Scalars that are rates in [0, 1]; learning rates only need to be >= 0.
_UNIT_INTERVAL = {"momentum", "retain", "beta", "rate"}
_NON_NEGATIVE_ACTS = {"sigmoid", "softplus", "exp"}
_KEYED = ("linear", "mlp", "module", "nonparametric")


# ----------------------------------------------------------------------------------- checks


def _dim_of(spec: GraphSpec, flow: FlowBase) -> int | str | None:
    """The feature width of a flow where it is declared, else None."""
    if isinstance(flow, Input):
        for i in spec.inputs:
            if i.name == flow.name:
                return i.dim
        return None
    if isinstance(flow, Read):
        try:
            st = spec.level(flow.level).state
        except KeyError:
            return None
        if st.kind in ("linear", "mlp"):
            return st.d_out
        if st.kind == "conv":
            return st.dim
        return None
    if flow.op == "unary":
        return _dim_of(spec, flow.x)
    return None


def _check_scalar(where: str, name: str, value: Any) -> Iterator[str]:
    ranged = name in _UNIT_INTERVAL
    if isinstance(value, int | float):
        if ranged and not 0.0 <= value <= 1.0:
            yield f"{where}: {name}={value!r} is outside [0, 1]; {name} is a rate/retention factor"
        elif not ranged and value < 0:
            yield f"{where}: learning rate {name}={value!r} is negative; expected lr >= 0"
    elif isinstance(value, Learned):
        lo = value.lo if value.lo is not None else (0.0 if ranged else None)
        hi = value.hi if value.hi is not None else (1.0 if ranged else None)
        if lo is not None and hi is not None and lo >= hi:
            yield f"{where}: learned {name} has lo={lo} >= hi={hi}; expected lo < hi"
        elif (lo is not None and value.init < lo) or (hi is not None and value.init > hi):
            yield f"{where}: learned {name} starts at {value.init} outside [{lo}, {hi}]"
        elif ranged and (lo < 0 or hi > 1):
            yield f"{where}: learned {name} may leave [0, 1] (lo={lo}, hi={hi}); bound it in [0, 1]"
    elif isinstance(value, Signal):
        if ranged and not (value.act == "sigmoid" and 0 <= value.scale <= 1):
            yield (
                f"{where}: data-dependent {name} uses act={value.act!r}, scale={value.scale:g}, "
                f"which can leave [0, 1]; use signal(..., act='sigmoid') with 0 <= scale <= 1"
            )
        elif not ranged and (value.act not in _NON_NEGATIVE_ACTS or value.scale < 0):
            yield (
                f"{where}: data-dependent {name} uses act={value.act!r}, scale={value.scale:g}, "
                "which can be negative; use act='softplus', 'sigmoid' or 'exp' with scale >= 0"
            )


def _check_level(spec: GraphSpec, lv: Level, names: set[str], inputs: set[str]) -> Iterator[str]:
    at = f"level {lv.name!r}"
    if not NAME_RE.match(lv.name):
        yield f"{at}: invalid name; use identifiers, optionally dotted (e.g. 'block0.mem')"
    # references
    for field, flow in level_flows(lv):
        for kind, ref, _ in references(flow, spec.flows):
            pool = inputs if kind == "input" else names
            if ref not in pool:
                what = "input" if kind == "input" else "level"
                close = difflib.get_close_matches(ref, sorted(pool), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known: {sorted(pool)}"
                yield f"{at}, {field}: unknown {what} {ref!r}{hint}"
        for node in walk(flow, spec.flows):
            if (
                node.op == "grad"
                and node.objective in names
                and spec.level(node.objective).objective is None
            ):
                yield f"{at}, {field}: gradient of level {node.objective!r}, which has no objective"
    st = lv.state
    if st.kind == "like":
        if st.level not in names:
            yield f"{at}: state like({st.level!r}) names an unknown level; known: {sorted(names)}"
        elif st.level == lv.name:
            yield f"{at}: state like itself; name another level"
    if st.kind in ("module",) and not IMPORT_PATH_RE.match(st.path):
        yield f"{at}: module path {st.path!r} is not 'package.module:Class'"
    if lv.init.kind == "path" and not IMPORT_PATH_RE.match(lv.init.path):
        yield f"{at}: init path {lv.init.path!r} is not 'package.module:function'"
    obj = lv.objective
    if obj is not None and obj.kind == "custom" and not IMPORT_PATH_RE.match(obj.path):
        yield f"{at}: custom objective path {lv.objective.path!r} is not 'package.module:fn'"
    # heads divide declared widths
    for dname in ("d_in", "d_out"):
        d = getattr(st, dname, None)
        if isinstance(d, int) and lv.heads > 1 and d % lv.heads:
            yield f"{at}: {dname}={d} is not divisible by heads={lv.heads}"
    # clock
    if lv.frequency.unit == "chunk" and lv.chunk is None and spec.chunk == 1:
        yield (
            f"{at}: frequency is per chunk but no chunk size is set; set chunk= on the level or "
            "the graph"
        )
    if lv.init.kind == "meta" and lv.init.level is not None:
        src = lv.init.level
        if src not in names:
            yield f"{at}: init meta({src!r}) names an unknown level; known: {sorted(names)}"
        elif frequency_key(spec, spec.level(src)) <= frequency_key(spec, lv):
            yield (
                f"{at}: init meta({src!r}) must come from a slower level, but {src!r} updates "
                f"{spec.level(src).frequency} and {lv.name!r} {lv.frequency}"
            )
    rs = lv.reset
    if rs is not None and rs.kind == "with":
        if rs.level not in names:
            yield f"{at}: reset_with({rs.level!r}) names an unknown level; known: {sorted(names)}"
        elif frequency_key(spec, spec.level(rs.level)) <= frequency_key(spec, lv):
            yield f"{at}: reset_with({rs.level!r}) needs a slower enclosing level"
    # objective / optimizer consistency
    frozen = lv.frequency.unit == "never"
    obj = lv.objective
    rules = [r.rule for r in lv.optimizer]
    # An outer-loss level without a rule of its own is trained by the outer optimizer bound at
    # compile time (projections, embeddings): that is the usual case, not an error.
    if obj is not None and obj.kind != "outer" and not lv.optimizer and not frozen:
        yield f"{at}: objective {obj.kind!r} but no optimizer; add optimizer=nl.gd(lr=...)"
    if lv.optimizer and obj is None and "follow" not in rules:
        yield (
            f"{at}: optimizer {rules} but no objective to optimize; add objective= "
            "(or use nl.follow(...) to follow another level's state)"
        )
    if obj is not None and obj.kind in NEEDS_VALUE:
        ctx = lv.context
        keyed = st.kind in _KEYED
        if ctx is None:
            yield f"{at}: objective {obj.kind!r} needs a context with values; received no context"
        elif keyed and not (isinstance(ctx, KV) and ctx.key is not None and ctx.value is not None):
            yield (
                f"{at}: a {st.kind} memory with objective {obj.kind!r} needs key/value pairs; "
                f"received context {ctx}; use context=nl.kv(key=..., value=...)"
            )
        elif isinstance(ctx, KV) and ctx.value is None:
            yield f"{at}: objective {obj.kind!r} needs a value; the context has none"
    # A block on the outer loss updated every C tokens (CMS) takes ema as GD with lr = 1 - beta.
    block = obj is not None and obj.kind == "outer" and lv.frequency.unit in ("token", "chunk")
    if "ema" in rules and not block and (obj is None or obj.kind != "l2_to"):
        yield (
            f"{at}: ema needs objective=nl.l2_to(target=...) (the stream it averages), or "
            "objective=nl.outer() on a block updated every C tokens"
        )
    if obj is not None and obj.kind == "outer" and obj.signal == "teach" and not (block and rules):
        yield (
            f"{at}: signal='teach' is the inner gradient of a block updated every C tokens "
            "on the outer loss (CMS); this level has no such updates. Use nl.outer()"
        )
    if "exact" in rules and (obj is None or obj.kind != "nadaraya_watson"):
        yield f"{at}: optimizer exact() solves only nadaraya_watson objectives"
    if obj is not None and obj.kind == "nadaraya_watson" and st.kind != "nonparametric":
        yield f"{at}: the Nadaraya-Watson objective needs state=nl.nonparametric()"
    if "dgd" in rules and st.kind not in ("linear", "mlp", "params", "module"):
        yield f"{at}: DGD needs keys (a linear or MLP memory or a linear layer), got {st.kind}"
    for i, rule in enumerate(lv.optimizer):
        for name, value in scalar_fields(rule).items():
            yield from _check_scalar(f"{at}, optimizer[{i}] {rule.rule}", name, value)
    # shapes, where declared
    ctx = lv.context
    if isinstance(ctx, KV) and st.kind in ("linear", "mlp"):
        for part, want in (("key", st.d_in), ("value", st.d_out), ("query", st.d_in)):
            flow = getattr(ctx, part)
            got = _dim_of(spec, flow) if flow is not None else None
            if isinstance(got, int) and isinstance(want, int) and got != want:
                dim = "d_in" if part != "value" else "d_out"
                yield (
                    f"{at}: {part} width {got} does not match the memory's {dim}={want}; "
                    "change the projection or the memory's width"
                )
    if st.kind in ("linear", "mlp", "conv") and lv.context is not None and not isinstance(ctx, KV):
        got = _dim_of(spec, lv.context)
        want = st.d_in if st.kind != "conv" else st.dim
        if isinstance(got, int) and isinstance(want, int) and got != want:
            yield f"{at}: context width {got} does not match the state's input width {want}"


def _check_optimizer_scalars(spec: GraphSpec) -> Iterator[str]:
    """The scalars an optimizer step can compute (docs/optimizers.md, "Learned rates"): a
    constant, or a signal of the step's flows, one value per parameter entry."""
    for lv in spec.levels:
        slow = lv.frequency.every > 1 or lv.frequency.offset > 0
        for i, rule in enumerate(lv.optimizer):
            for name, value in scalar_fields(rule).items():
                at = f"level {lv.name!r}, optimizer[{i}] {rule.rule} {name}"
                if isinstance(value, Learned):
                    yield (
                        f"{at}: {value} in an optimizer graph, where no loss is differentiated "
                        "through a step, so nothing would train it; let a slower level learn it "
                        f"by its own objective and read it: {name}=nl.signal(nl.state('slow', "
                        "at='prev'))"
                    )
                elif not isinstance(value, Signal):
                    continue
                elif rule.rule == "dgd" or lv.state.kind == "mlp":
                    what = "a dgd step" if rule.rule == "dgd" else "an MLP memory"
                    yield (
                        f"{at}: a signal is one value per parameter entry, but {what} takes one "
                        "number per tensor; use a constant"
                    )
                elif slow and name in ("lr", "beta"):
                    yield (
                        f"{at}: {lv.name!r} updates {lv.frequency}, summing its directions over "
                        "the period, and which step's rate would weight them is not defined; "
                        "use a constant (a signal may set retain or momentum)"
                    )


def _check_reads(spec: GraphSpec, names: set[str]) -> Iterator[str]:
    """Reads of a memory must feed it an input of the width it takes."""
    for lv in spec.levels:
        for field, flow in level_flows(lv):
            for node in walk(flow, spec.flows):
                if isinstance(node, Read) and node.level in names:
                    st = spec.level(node.level).state
                    want = st.d_in if st.kind in ("linear", "mlp") else getattr(st, "dim", None)
                    got = _dim_of(spec, node.arg)
                    if isinstance(want, int) and isinstance(got, int) and want != got:
                        yield (
                            f"level {lv.name!r}, {field}: reads {node.level!r} with a width-{got} "
                            f"input, but {node.level!r} takes width {want}"
                        )
                    if st.kind in ("params", "tensor", "like"):
                        yield (
                            f"level {lv.name!r}, {field}: {node.level!r} is a {st.kind} state, "
                            "not a memory to read with an argument; use "
                            f"nl.state({node.level!r}, at='prev')"
                        )


def _check_named_flows(spec: GraphSpec, taken: set[str]) -> Iterator[str]:
    """Named flows (``g.let``): unique names, known references, no cycles."""
    refs = nx.DiGraph()
    refs.add_nodes_from(spec.flows)
    sources = [(f"flow {n!r}", f) for n, f in spec.flows.items()]
    sources += [(f"output {n!r}", f) for n, f in spec.outputs.items()]
    sources += [
        (f"level {lv.name!r}, {field}", f) for lv in spec.levels for field, f in level_flows(lv)
    ]
    for where, flow in sources:
        for node in walk(flow):
            if node.op == "ref":
                if node.name not in spec.flows:
                    close = difflib.get_close_matches(node.name, sorted(spec.flows), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    yield f"{where}: unknown named flow {node.name!r}{hint}"
                elif where.startswith("flow "):
                    refs.add_edge(where[6:-1], node.name)
    for n in spec.flows:
        if n in taken:
            yield f"flow {n!r}: the name is already used by a level or input"
    if not nx.is_directed_acyclic_graph(refs):
        cycle = [u for u, _ in nx.find_cycle(refs)]
        yield "named flows refer to each other in a cycle: " + " -> ".join([*cycle, cycle[0]])


def errors(spec: GraphSpec) -> list[str]:
    """Every problem found in ``spec`` (empty when valid)."""
    out: list[str] = []
    if not NAME_RE.match(spec.name):
        out.append(f"graph name {spec.name!r} is not an identifier (dots allowed)")
    if not spec.levels:
        out.append(f"graph {spec.name!r} has no levels; add one with g.level(...)")
    seen: set[str] = set()
    for item in (*spec.inputs, *spec.levels):
        if item.name in seen:
            out.append(f"duplicate name {item.name!r}: level and input names must be unique")
        seen.add(item.name)
    inputs = {i.name for i in spec.inputs}
    for i in spec.inputs:
        if not NAME_RE.match(i.name):
            out.append(f"input {i.name!r}: invalid name; use an identifier")
    names = {lv.name for lv in spec.levels}
    out.extend(_check_named_flows(spec, names | inputs))
    if out:
        return out
    for lv in spec.levels:
        out.extend(_check_level(spec, lv, names, inputs))
    if out:  # the checks below assume references resolve
        return out
    out.extend(_check_reads(spec, names))
    if is_optimizer_graph(spec):  # what the optimizer compiler runs, checked here
        out.extend(_check_optimizer_scalars(spec))
        out.extend(lowering_errors(spec))
    # like() chains must end in a real state
    for lv in spec.levels:
        hops, cur = 0, lv
        while cur.state.kind == "like" and hops <= len(names):
            cur, hops = spec.level(cur.state.level), hops + 1
        if hops > len(names):
            out.append(
                f"level {lv.name!r}: like(...) references form a cycle; one must own a shape"
            )
    for oname, flow in spec.outputs.items():
        for kind, ref, _ in references(flow, spec.flows):
            if ref not in (inputs if kind == "input" else names):
                out.append(
                    f"output {oname!r}: unknown {'input' if kind == 'input' else 'level'} {ref!r}"
                )
    edge_pairs = {(e.src, e.dst) for e in edges(spec)}
    for d in spec.diff:
        if d.src == d.dst and d.src in names:
            out.extend(_check_own_recurrence(spec, d))
        elif (d.src, d.dst) not in edge_pairs:
            out.append(
                f"edge {d.src!r} -> {d.dst!r}: declared {d.mode} but the graph has no such edge"
            )
    # nested optimizer state must be at least as fast as the level it drives
    for lv in spec.levels:
        for rule in lv.optimizer:
            if not isinstance(rule, Follow):
                continue
            for kind, ref, at in references(rule.update, spec.flows):
                if kind != "state" or at != "new" or ref == lv.name:
                    continue
                if frequency_key(spec, spec.level(ref)) > frequency_key(spec, lv):
                    out.append(
                        f"level {lv.name!r} follows the new state of {ref!r}, which updates "
                        f"{spec.level(ref).frequency} — slower than {lv.name!r} "
                        f"({lv.frequency}); a nested optimizer level must be at least as "
                        f"fast, or read its latest value with nl.state({ref!r}, at='prev')"
                    )
    dag = same_tick_graph(spec)
    if not nx.is_directed_acyclic_graph(dag):
        cycle = [u for u, _ in nx.find_cycle(dag)]
        out.append(
            "same-tick dependency cycle: "
            + " -> ".join([*cycle, cycle[0]])
            + "; each reads the other's new state at the same tick. Read one of them at='prev' "
            "(the state before this tick's update)"
        )
    return out


def validate(spec: GraphSpec) -> GraphSpec:
    """Raise :class:`SpecError` listing every problem in ``spec``; return it when valid."""
    problems = errors(spec)
    if problems:
        head = (
            problems[0]
            if len(problems) == 1
            else f"{len(problems)} problems: " + "; ".join(problems)
        )
        raise SpecError(f"invalid graph {spec.name!r}: {head}")
    return spec


def _check_own_recurrence(spec: GraphSpec, d: EdgeDiff) -> list[str]:
    """``g.differentiate("M", "M", stop_grad())``: M's in-sequence updates are first-order (the
    outer gradient takes each update as a constant increment). Only ``stop_grad`` (or the
    default, ``unrolled``) applies to a level's own recurrence, and only to a level that
    updates within a sequence."""
    lv = spec.level(d.src)
    if d.mode.mode == "truncated":
        return [
            f"edge {d.src!r} -> {d.src!r}: truncated(k) on a level's own recurrence is not "
            f"defined; declare it on the edges into {d.src!r} (its carried state is then "
            "detached every k chunks)"
        ]
    if d.mode.mode == "stop_grad" and (lv.frequency.unit not in ("token", "chunk")
                                       or not lv.optimizer):  # fmt: skip
        return [
            f"edge {d.src!r} -> {d.src!r}: stop_grad on a level's own recurrence makes its "
            f"in-sequence updates first-order, but {d.src!r} updates {lv.frequency}; only a "
            "level with an inner optimizer updated every token or chunk has such updates"
        ]
    return []
