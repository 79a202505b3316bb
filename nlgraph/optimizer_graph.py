"""What an optimizer graph may hold to compile: one source of truth for ``validate`` and the
optimizer compiler (:mod:`nlgraph.compiler.optimizer.program`).

An optimizer graph is a graph over the gradient stream: no inputs, a ``params`` level, every
level per step. Each of its levels belongs to one ``params`` level (a ``like`` chain ends there,
or an MLP memory is fed by exactly one ``grad_of``), and a step can compute only the rules,
objectives and reads listed here. ``validate`` reports every violation of an optimizer graph;
the compiler raises the first one for any graph it is handed. Torch-free.
"""

from __future__ import annotations

from nlgraph.flows import KV, Grad, Read, references, walk
from nlgraph.level import GraphSpec, Level, level_flows

__all__ = ["ELEMENTWISE_RULES", "is_optimizer_graph", "owner", "lowering_errors"]

ELEMENTWISE_RULES = ("gd", "ema", "precondition", "newton_schulz", "weight_decay", "follow")


def is_optimizer_graph(spec: GraphSpec) -> bool:
    """A graph over the gradient stream: no inputs, a ``params`` level, every level per step."""
    return (
        not spec.inputs
        and any(lv.state.kind == "params" for lv in spec.levels)
        and all(lv.frequency.unit == "step" for lv in spec.levels)
    )


def owner(spec: GraphSpec, lv: Level) -> str | None:
    """The ``params`` level whose parameters ``lv`` belongs to; None when it belongs to none."""
    st, hops, cur = lv.state, 0, lv
    while st.kind == "like" and hops <= len(spec.levels):
        cur = spec.level(st.level)
        st, hops = cur.state, hops + 1
    if st.kind == "params":
        return cur.name
    if st.kind == "mlp" and isinstance(lv.context, KV):
        wrt = {n.wrt for n in walk(lv.context, spec.flows) if isinstance(n, Grad)}
        if len(wrt) == 1:
            return wrt.pop()
    return None


def lowering_errors(spec: GraphSpec) -> list[str]:
    """Every reason the optimizer compiler cannot run ``spec``, one line each naming the
    level (empty when it can). Assumes ``spec`` otherwise validates (references resolve)."""
    where = f"optimizer graph {spec.name!r}, level"
    owners, out = {}, []
    for lv in spec.levels:
        owners[lv.name] = owner(spec, lv)
        if owners[lv.name] is None:
            out.append(
                f"{where} {lv.name!r}: state {lv.state} belongs to no parameters; an optimizer "
                "memory is like('w') (one tensor per parameter) or an MLP fed by exactly one "
                "grad_of('w')"
            )
    if out:
        return out
    for lv in spec.levels:
        out.extend(_level_errors(spec, lv, spec.level(owners[lv.name]), owners))
    return out


def _slow(lv: Level) -> bool:
    return lv.frequency.every > 1 or lv.frequency.offset > 0


def _level_errors(spec: GraphSpec, lv: Level, weights: Level, owners: dict) -> list[str]:
    where = f"optimizer graph {spec.name!r}, level {lv.name!r}"
    st, f, out = lv.state, lv.frequency, []
    if f.unit != "step":
        return [f"{where}: optimizer levels update per step, got {f}"]
    if lv is weights and (f.every != 1 or f.offset):
        out.append(f"{where}: the weights update every step, got {f}")
    if st.kind == "mlp":
        out.extend(_mlp_errors(lv, where))
    elif st.kind == "like" and lv.init.kind not in ("default", "zeros", "normal"):
        out.append(f"{where}: init {lv.init} is not supported; use zeros or normal")
    for rule in lv.optimizer:  # learned and signal scalars: validation._check_optimizer_scalars
        if rule.rule == "dgd":
            if lv is not weights or rule.retain is not None or rule.momentum is not None:
                out.append(
                    f"{where}: dgd updates the weights of linear layers, without retain or "
                    "momentum, in an optimizer graph"
                )
        elif rule.rule not in ELEMENTWISE_RULES:
            out.append(f"{where}: rule {rule.rule!r} has no optimizer lowering")
    obj = lv.objective
    if obj is not None and obj.kind not in ("outer", "dot", "l2_to", "l2"):
        out.append(f"{where}: objective {obj.kind!r} has no optimizer lowering")
    if obj is not None and obj.kind == "l2" and st.kind == "like":
        ctx = lv.context
        if not (isinstance(ctx, KV) and ctx.key is not None and ctx.value is not None):
            out.append(f"{where}: an l2 memory of gradients needs kv(key, value)")
    for field_, flow in level_flows(lv):
        for kind, ref, _ in references(flow, spec.flows):
            if kind == "input":
                out.append(f"{where}, {field_}: an optimizer has no input {ref!r}")
            elif kind == "grad" and ref != weights.name:
                out.append(
                    f"{where}, {field_}: the gradient w.r.t. {ref!r}; a level of "
                    f"{weights.name!r}'s part reads grad_of({weights.name!r}) only"
                )
            elif kind in ("state", "read") and owners.get(ref) != weights.name:
                out.append(
                    f"{where}, {field_}: reads {ref!r}, which trains other parameters "
                    f"({owners.get(ref)!r}); parts selected by shape share no state"
                )
        for node in walk(flow, spec.flows):
            if isinstance(node, Read) and spec.level(node.level).state.kind != "mlp":
                out.append(f"{where}, {field_}: only MLP memories are read with M(x)")
    return out


def _mlp_errors(lv: Level, where: str) -> list[str]:
    st, obj, rules = lv.state, lv.objective, lv.optimizer
    out = []
    if st.d_in != 1 or st.d_out != 1:
        out.append(
            f"{where}: an MLP memory of gradients acts on each gradient entry here; "
            f"use mlp(1, 1, width=...), got {st}"
        )
    if not isinstance(st.width, int):
        out.append(f"{where}: the MLP width must be an int, got {st.width!r}")
    if (
        obj is None
        or obj.kind != "l2"
        or len(rules) != 1
        or rules[0].rule != "gd"
        or rules[0].momentum is not None
    ):
        out.append(f"{where}: an MLP memory here is trained by gd (no momentum) on l2")
    if _slow(lv):
        out.append(f"{where}: an MLP memory updates every step")
    if lv.init.kind not in ("default", "normal", "zeros"):
        out.append(f"{where}: init {lv.init} is not supported; use default or normal")
    return out
