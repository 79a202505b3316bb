"""Split a whole system — a learner and its optimizer levels in one graph — into the two specs
the compilers take (docs/compiler.md, "The whole system").

The *optimizer part* is every ``params`` level (the slow weights it selects) and the levels
nested under one: ``like`` a params level (momentum, Adam's moments), or updated per step on an
inner objective of flows that read the optimizer part (an MLP momentum fed by ``grad_of('w')``).
The rest is the *learner*. Both parts keep the names, flows and edge declarations they use; no
edge may cross from one to the other (a learner level cannot read the optimizer's state, and an
optimizer level sees only the gradient stream), and every refusal names the level.

Pure spec work: :func:`split_system` builds nothing with torch. :mod:`nlgraph.optim` compiles
the two parts into one :class:`~nlgraph.optim.System`.
"""

from __future__ import annotations

from dataclasses import dataclass

from nlgraph._errors import CompileError
from nlgraph._expr import names, parse, parse_condition
from nlgraph.flows import Ref, references, walk
from nlgraph.hyper import Hyperparameters
from nlgraph.level import GraphSpec, Level
from nlgraph.states import Params
from nlgraph.topology import edges
from nlgraph.validation import level_flows

__all__ = ["SystemSplit", "optimizer_levels", "split_system"]


@dataclass(frozen=True)
class SystemSplit:
    """A system graph and its two parts.

    Attributes:
        spec: the whole graph.
        learner: the learner part (inputs, outputs, memories, blocks, slow levels); what
            :func:`nlgraph.compiler.compile` takes.
        optimizer: the optimizer part, named ``<graph>.optimizer``: an optimizer graph that
            :func:`nlgraph.optim.compile_optimizer` takes (``params(select=...)`` is resolved by
            the system and dropped here; the ndim bounds stay).
        weights: the params levels, in declaration order.
    """

    spec: GraphSpec
    learner: GraphSpec
    optimizer: GraphSpec
    weights: tuple[str, ...]

    def selection(self, level: str) -> Params:
        """The parameter selection of params level ``level``, as the system graph declares it."""
        st = self.spec.level(level).state
        assert isinstance(st, Params)
        return st


def _like_root(spec: GraphSpec, lv: Level) -> Level:
    hops = 0
    while lv.state.kind == "like" and hops <= len(spec.levels):
        lv, hops = spec.level(lv.state.level), hops + 1
    return lv


def optimizer_levels(spec: GraphSpec) -> list[str]:
    """The levels of ``spec``'s optimizer part, in declaration order (empty: a plain learner)."""
    part = {lv.name for lv in spec.levels if _like_root(spec, lv).state.kind == "params"}
    grown = bool(part)
    while grown:  # levels per step on an inner objective of the optimizer part's flows
        grown = False
        for lv in spec.levels:
            if lv.name in part or lv.frequency.unit != "step" or lv.objective is None:
                continue
            if lv.objective.kind == "outer":
                continue
            refs = {ref for _, f in level_flows(lv) for _, ref, _ in references(f, spec.flows)}
            if refs & part:
                part.add(lv.name)
                grown = True
    return [lv.name for lv in spec.levels if lv.name in part]


def _flows_used(spec: GraphSpec, sources: list) -> dict:
    """The named flows that ``sources`` reach, in the graph's order."""
    used: set[str] = set()
    for flow in sources:
        used.update(n.name for n in walk(flow, spec.flows) if isinstance(n, Ref))
    return {n: f for n, f in spec.flows.items() if n in used}


def _hyperparameters(spec: GraphSpec, levels: set[str], flows: set[str]) -> Hyperparameters | None:
    """The traced hyperparameters whose numbers land in ``levels`` or ``flows``."""
    hp = spec.hyperparameters
    if hp is None:
        return None

    def mine(at: str) -> bool:
        head = at.split(".", 1)[0]
        return any(head in (f"levels[{n}]", f"flows[{n}]") for n in (*levels, *flows))

    uses = tuple(u for u in hp.uses if mine(u.at))
    if not uses:
        return None
    named = set().union(*(names(parse(u.value)) for u in uses))
    params = tuple(p for p in hp.params if p.name in named or p.fixed)
    kept = {p.name for p in params}

    def applies(condition: str) -> bool:
        a, _, b = parse_condition(condition)
        return names(a) | names(b) <= kept

    requires = tuple(c for c in hp.requires if applies(c))
    return Hyperparameters(params=params, uses=uses, requires=requires)


def split_system(spec: GraphSpec) -> SystemSplit:
    """Split a validated system graph into its learner and optimizer parts.

    Raises:
        CompileError: the graph has no params level or no learner level, or a flow or edge
            crosses between the parts (naming the levels and how to fix it).
    """
    opt = optimizer_levels(spec)
    where = f"graph {spec.name!r}"
    if not opt:
        raise CompileError(
            f"{where} has no params level, so no optimizer to compile with it; add "
            "g.level('w', state=nl.params(), ...) with its optimizer levels, or compile the "
            "learner alone with nlgraph.compiler.compile and choose a torch.optim optimizer"
        )
    part = set(opt)
    learner = [lv for lv in spec.levels if lv.name not in part]
    if not learner or not spec.inputs:
        raise CompileError(
            f"{where} has no learner levels or inputs: it is an optimizer graph; compile it "
            "with nlgraph.optim.compile_optimizer"
        )
    for lv in spec.levels:  # momentum of a learner level: no params level selects it
        root = _like_root(spec, lv)
        if lv.state.kind == "like" and lv.name not in part and lv.frequency.unit == "step":
            raise CompileError(
                f"level {lv.name!r}: like({lv.state.level!r}) follows learner level "
                f"{root.name!r}; an optimizer memory is like a params level: add "
                f"g.level('w', state=nl.params(select={root.name!r}), ...) and make "
                f"{lv.name!r} like('w')"
            )
    inputs = {i.name for i in spec.inputs}
    for e in edges(spec):
        if e.src_is_input:
            if e.dst in part:
                raise CompileError(
                    f"optimizer level {e.dst!r} reads input {e.src!r}; an optimizer level sees "
                    "only the gradient stream and the other optimizer levels (read the input "
                    "in a learner level)"
                )
            continue
        if (e.src in part) == (e.dst in part):
            continue
        if e.dst in part:
            raise CompileError(
                f"optimizer level {e.dst!r} reads learner level {e.src!r} ({e.kind} edge); an "
                "optimizer level sees only the gradient stream of its params level and the "
                "other optimizer levels"
            )
        raise CompileError(
            f"learner level {e.dst!r} reads optimizer level {e.src!r} ({e.kind} edge); the "
            "optimizer runs after the backward of the step, so the learner cannot read its "
            "state; read a learner level instead"
        )
    for name, flow in spec.outputs.items():
        for _, ref, _ in references(flow, spec.flows):
            if ref in part:
                raise CompileError(
                    f"output {name!r} reads optimizer level {ref!r}; outputs read the learner"
                )
    for d in spec.diff:
        if (d.src in part) != (d.dst in part) and d.src not in inputs:
            raise CompileError(
                f"edge {d.src!r} -> {d.dst!r}: declared {d.mode} across the learner and its "
                "optimizer, which share no edge"
            )
    learner_flows = _flows_used(
        spec,
        [f for lv in learner for _, f in level_flows(lv)] + list(spec.outputs.values()),
    )
    opt_levels = [spec.level(n) for n in opt]
    opt_flows = _flows_used(spec, [f for lv in opt_levels for _, f in level_flows(lv)])
    learner_spec = spec.model_copy(
        update={
            "levels": tuple(learner),
            "flows": learner_flows,
            "diff": tuple(d for d in spec.diff if d.dst not in part),
            "hyperparameters": None,
        }
    )
    stripped = tuple(
        lv.model_copy(update={"state": lv.state.model_copy(update={"select": None})})
        if lv.state.kind == "params"
        else lv
        for lv in opt_levels
    )
    try:
        opt_spec = GraphSpec(
            name=f"{spec.name}.optimizer",
            doc=f"the optimizer levels of {spec.name!r}",
            levels=stripped,
            flows=opt_flows,
            diff=tuple(d for d in spec.diff if d.dst in part),
            hyperparameters=_hyperparameters(spec, part, set(opt_flows)),
        )
    except ValueError as err:  # a traced hyperparameter that spans both parts
        raise CompileError(f"{where}: its optimizer levels do not stand alone: {err}") from None
    weights = tuple(lv.name for lv in opt_levels if lv.state.kind == "params")
    return SystemSplit(spec, learner_spec, opt_spec, weights)
