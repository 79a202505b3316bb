"""The invariant checks run after each pass of the plan: each returns what is wrong with the
state (empty: nothing) and includes the checks of the passes before it, so a later pass that
undoes an earlier pass's work is caught too."""

from __future__ import annotations

from nlgraph.compiler.ir import Lowering, Role
from nlgraph.compiler.plan.types import PlanState, level_problems, order_problems

__all__ = ["check_classify", "check_clusters", "check_token_loops", "check_order", "check_warn"]

TOKEN_LOOP_NOTE = "token loop (one token per window: "


def check_classify(state: PlanState) -> list[str]:
    """Every level planned once under its name, with a Lowering and a Role that agree
    (``parameter`` exactly for slow levels), a positive chunk if fast, a reason if it runs as
    the reference loop."""
    return level_problems(state.spec, state.levels)


def check_clusters(state: PlanState) -> list[str]:
    """Every cluster member is a fast level lowered ``cluster`` or ``reference_loop``, in
    exactly one cluster; every level lowered ``cluster`` is in a cluster; the dependency graph
    holds exactly the fast levels."""
    out = check_classify(state)
    if out:
        return out
    levels, seen = state.levels, {}
    for members in state.clusters:
        if not members or list(members) != sorted(set(members)):
            out.append(f"cluster {members} is not a sorted list of distinct levels")
        for n in members:
            if n in seen:
                out.append(f"level {n!r} is in two clusters")
            seen[n] = members
            lp = levels.get(n)
            if lp is None or lp.role != Role.FAST:
                out.append(f"cluster member {n!r} is not a fast level")
            elif lp.lowering not in (Lowering.CLUSTER, Lowering.REFERENCE_LOOP):
                out.append(f"cluster member {n!r} is lowered as {lp.lowering}")
    out += [
        f"level {n!r} is lowered as cluster but in no cluster"
        for n, lp in levels.items()
        if lp.lowering == Lowering.CLUSTER and n not in seen
    ]
    fast = {n for n, lp in levels.items() if lp.role == Role.FAST}
    if state.deps is None or set(state.deps.nodes) != fast:
        out.append("the dependency graph of the fast levels is missing or incomplete")
    return out


def check_token_loops(state: PlanState) -> list[str]:
    """Every token loop is one of the clusters, once, with at least one member read at="new"
    among its members, and every member's detail says it runs as a token loop."""
    out = check_clusters(state)
    if out:
        return out
    clusters = [list(c) for c in state.clusters]
    seen: list[list[str]] = []
    for loop in state.token_loops:
        members = list(loop.members)
        if members not in clusters or members in seen:
            out.append(f"token loop {members} is not one of the clusters, once")
        seen.append(members)
        if not loop.late or not set(loop.late) <= set(members):
            out.append(f"token loop {members}: its members read at 'new' are {list(loop.late)}")
        out += [
            f"token-loop member {n!r} does not say it runs as a token loop"
            for n in members
            if n in state.levels and not state.levels[n].detail.startswith(TOKEN_LOOP_NOTE)
        ]
    return out


def check_order(state: PlanState) -> list[str]:
    """The forward order lists every level once, each after the slow levels it reads and the
    fast levels it reads outside its cluster."""
    return check_token_loops(state) or order_problems(
        state.spec, state.levels, state.order, state.clusters
    )


def check_warn(state: PlanState) -> list[str]:
    """Every level without a fast lowering (or with a reason for a token loop) and every
    member read at "new" of a token-loop cluster is named in a ReferenceLoopWarning."""
    out = check_order(state)
    if out:
        return out
    warned = set(state.warned)
    out += [
        f"level {n!r} runs as a {lp.lowering} token loop without a ReferenceLoopWarning"
        for n, lp in state.levels.items()
        if (lp.lowering == Lowering.REFERENCE_LOOP or lp.why) and n not in warned
    ]
    out += [
        f"token loop {list(t.members)} has no ReferenceLoopWarning"
        for t in state.token_loops
        if not set(t.late) <= warned
    ]
    return out
