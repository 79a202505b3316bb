"""``make_plan``: the plan as a list of named passes, each followed by the check of what it
establishes (docs/compiler.md, "Passes").

Every pass maps a :class:`PlanState` to the next; its check returns what is wrong (nothing, or
a CompileError "plan invariant after pass NAME" names the pass). The checks always run; at
``NLGRAPH_DEBUG=1`` each pass prints its name and a one-line summary to stderr, at ``2`` the
finished plan is printed too.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import networkx as nx

from nlgraph._errors import CompileError, ReferenceLoopWarning
from nlgraph.compiler._debug import debug_level
from nlgraph.compiler.ir import Lowering, Role
from nlgraph.compiler.plan.checks import (
    check_classify,
    check_clusters,
    check_order,
    check_token_loops,
    check_warn,
)
from nlgraph.compiler.plan.classify import (
    classify_level,
    cluster_detail,
    level_reads,
    loop_detail,
    memory_reads,
)
from nlgraph.compiler.plan.types import LevelPlan, Plan, PlanState, TokenLoop
from nlgraph.flows import references
from nlgraph.level import GraphSpec
from nlgraph.topology import frequency_key, tiers
from nlgraph.validation import level_flows

__all__ = ["PASSES", "Pass", "make_plan"]


@dataclass(frozen=True)
class Pass:
    """One named pass: ``run`` builds the next state, ``check`` lists what is wrong with it,
    ``summary`` says in one line what it built (``NLGRAPH_DEBUG=1``)."""

    name: str
    run: Callable[[PlanState], PlanState]
    check: Callable[[PlanState], list[str]]
    summary: Callable[[PlanState], str]


def classify(state: PlanState) -> PlanState:
    """Each level's role, lowering, chunk (a block's: its period in tokens), reads and detail."""
    spec, levels = state.spec, {}
    for lv in spec.levels:
        c = classify_level(spec, lv)
        chunk = spec.chunk_of(lv)
        if c.lowering == Lowering.BOUNDARY:
            chunk = lv.frequency.period_tokens(chunk) or chunk
        reads = level_reads(lv, spec.flows)
        levels[lv.name] = LevelPlan(
            lv.name, c.role, c.lowering, chunk, str(lv.frequency), reads, c.detail, c.why
        )
    return replace(state, levels=levels)


def clusters(state: PlanState) -> PlanState:
    """Fast memories that read themselves or each other inside their updates (self-modifying
    Titans: self-generated values, keys from M_k, rates from M_eta) form a recurrent cluster,
    run jointly chunk by chunk with every read at the chunk-start states; a single memory
    lowered ``cluster`` (an lp/custom objective, DGD on an MLP) is a cluster of its own. A
    memory that merely consumes another's read-outs runs after it over the whole sequence."""
    spec, levels = state.spec, dict(state.levels)
    fast = {n for n, lp in levels.items() if lp.role == Role.FAST}
    deps = nx.DiGraph()
    deps.add_nodes_from(sorted(fast))
    for n in fast:
        own = {
            r
            for _, f in level_flows(spec.level(n))
            for k, r, _ in references(f, spec.flows)
            if k != "input"
        }
        for m in sorted(own & fast):
            deps.add_edge(m, n)
    found: list[list[str]] = []
    for comp in nx.strongly_connected_components(deps):
        members = sorted(comp)
        if len(members) == 1 and not deps.has_edge(members[0], members[0]):
            if levels[members[0]].lowering == Lowering.CLUSTER:
                found.append(members)
            continue
        for n in members:
            levels[n] = _as_member(spec, levels[n], members)
        found.append(members)
    return replace(state, levels=levels, deps=deps, clusters=sorted(found))


def _as_member(spec: GraphSpec, lp: LevelPlan, members: list[str]) -> LevelPlan:
    """``lp`` as a member of the recurrent cluster ``members``."""
    n = lp.name
    if lp.lowering == Lowering.REFERENCE_LOOP:
        # No cluster lowering for its rule or schedule: it runs as a token loop of its rule
        # chain inside the cluster's windows (per-layer gradients delta x^T at the chunk-start
        # states); the other members keep their kernels.
        inside = f" inside the recurrent cluster {members}"
        detail = loop_detail(spec.level(n), inside, "delta x^T per layer")
        why = f"{lp.why}; it runs as a token loop{inside}"
        return replace(lp, detail=detail, why=why)
    if lp.lowering not in (Lowering.CLUSTER, Lowering.DEEP_MEMORY, Lowering.LINEAR_MEMORY):
        raise CompileError(
            f"level {n!r} ({lp.lowering}) reads the memories {members} inside its update; only "
            "matrix and MLP memories on a key/value objective can run as one recurrent cluster"
        )
    return replace(lp, lowering=Lowering.CLUSTER, detail=cluster_detail(spec.level(n)), why="")


def token_loops(state: PlanState) -> PlanState:
    """A cluster with a member read at="new" needs each token's update before the read: it runs
    one token per window (a token loop)."""
    levels, loops = dict(state.levels), []
    for members in state.clusters:
        late = [n for n in members if any(r.at == "new" for r in memory_reads(state.spec, n))]
        if not late:
            continue
        loops.append(TokenLoop(tuple(members), tuple(late)))
        note = (f"token loop (one token per window: {', '.join(late)} read at='new', after "
                "each token's update); ")  # fmt: skip
        for n in members:
            levels[n] = replace(levels[n], detail=note + levels[n].detail)
    return replace(state, levels=levels, token_loops=tuple(loops))


def order(state: PlanState) -> PlanState:
    """The forward order: slow levels by frequency, then the fast levels' clusters (and single
    memories) in dependency order, ties by name."""
    spec, levels = state.spec, state.levels
    condensed = nx.condensation(state.deps if state.deps is not None else nx.DiGraph())
    fast = [
        n
        for c in nx.lexicographical_topological_sort(
            condensed, key=lambda c: min(condensed.nodes[c]["members"])
        )
        for n in sorted(condensed.nodes[c]["members"])
    ]
    slow = sorted((n for n in levels if levels[n].role == Role.SLOW), key=lambda n: (
        frequency_key(spec, spec.level(n)), n))  # fmt: skip
    return replace(state, order=slow + fast)


def warn(state: PlanState) -> PlanState:
    """One ReferenceLoopWarning per level without a fast lowering and per token-loop cluster
    (``stacklevel`` points at the caller of ``compile``)."""
    warned: list[str] = []
    for n in state.order:
        lp = state.levels[n]
        if lp.lowering == Lowering.REFERENCE_LOOP or lp.why:
            warnings.warn(
                ReferenceLoopWarning(
                    f"level {n!r} has no fast lowering ({lp.why}); it runs as the reference "
                    "loop, token by token with autograd for its inner gradient: exact, but slow"
                ),
                stacklevel=4,
            )
            warned.append(n)
    for loop in state.token_loops:
        late = loop.late
        which = (f"level {late[0]!r} is" if len(late) == 1 else
                 f"levels {', '.join(repr(n) for n in late)} are")  # fmt: skip
        warnings.warn(
            ReferenceLoopWarning(
                f"{which} read at='new' (after each token's update) but in the recurrent cluster "
                f"{list(loop.members)}, whose windows read the chunk-start state; the cluster "
                "runs one token per window, a token loop: exact, but slow"
            ),
            stacklevel=4,
        )
        warned += late
    return replace(state, warned=tuple(warned))


def _count_lowerings(state: PlanState) -> str:
    counts = [(low, sum(lp.lowering == low for lp in state.levels.values())) for low in Lowering]
    text = ", ".join(f"{k} {low}" for low, k in counts if k)
    return f"{len(state.levels)} levels: {text}"


def _list_clusters(state: PlanState) -> str:
    if not state.clusters:
        return "no recurrent clusters"
    return f"{len(state.clusters)} recurrent cluster(s): " + ", ".join(
        f"[{', '.join(c)}]" for c in state.clusters
    )


def _list_token_loops(state: PlanState) -> str:
    if not state.token_loops:
        return "no token loops"
    return f"{len(state.token_loops)} token loop(s): " + "; ".join(
        f"[{', '.join(t.members)}] (read at='new': {', '.join(t.late)})" for t in state.token_loops
    )


def _count_warnings(state: PlanState) -> str:
    n = len(set(state.warned))
    return f"{n} level(s) warned (ReferenceLoopWarning)" if n else "no ReferenceLoopWarning"


PASSES: tuple[Pass, ...] = (
    Pass("classify", classify, check_classify, _count_lowerings),
    Pass("clusters", clusters, check_clusters, _list_clusters),
    Pass("token_loops", token_loops, check_token_loops, _list_token_loops),
    Pass("order", order, check_order, lambda state: " -> ".join(state.order)),
    Pass("warn", warn, check_warn, _count_warnings),
)


def make_plan(spec: GraphSpec, dims: dict[str, int], backend: str = "auto") -> Plan:
    """Run :data:`PASSES` over a validated, bound spec, each followed by its check."""
    level = debug_level()
    state = PlanState(spec)
    for p in PASSES:
        state = p.run(state)
        problems = p.check(state)
        if problems:
            raise CompileError(f"plan invariant after pass {p.name!r}: {'; '.join(problems)}")
        if level >= 1:
            print(f"plan pass {p.name}: {p.summary(state)}", file=sys.stderr)
    plan = Plan(
        spec, dims, dict(state.levels), list(state.order), tiers(spec), backend,
        [list(c) for c in state.clusters],
    )  # fmt: skip
    if level >= 2:
        print(plan)
    return plan
