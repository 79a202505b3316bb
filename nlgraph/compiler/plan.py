"""The compiler's intermediate form: which level runs how, in which order, on the global clock.

A :class:`Plan` classifies every level of a validated, bound graph:

- ``slow``: a level updated every outer step (or frozen): an ``nn.Module``/``nn.Parameter`` of
  the learner, trained by the outer optimizer, read in parallel over all tokens.
- ``fast``: an in-context memory updated per token or chunk, lowered to a kernel op
  (``linear_memory``: matrix memories with dot/L2 objectives under GD/DGD with retention;
  ``deep_memory``: MLP (or momentum-carrying linear) memories under GD with momentum and
  forgetting; ``attention``: the exact non-parametric memory), or ``boundary``: a block on the
  outer loss updated every C tokens (CMS, Eq. 71) — frozen within a chunk, so the chunk runs in
  parallel, then the chunk's accumulated gradient is applied at its end.

The plan is printable (``str(plan)``, ``NLGRAPH_DEBUG=2``) and checked by :meth:`Plan.check`
after it is built (``NLGRAPH_DEBUG=1`` and always in tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from nlgraph._errors import CompileError
from nlgraph.flows import Read, references
from nlgraph.level import GraphSpec, Level
from nlgraph.optimizers import DGD, GD, Signal, describe
from nlgraph.topology import frequency_key, tiers
from nlgraph.validation import _flows as _level_flows

__all__ = ["LevelPlan", "Plan", "make_plan", "LOWERINGS"]

LOWERINGS = ("parameter", "linear_memory", "deep_memory", "attention", "boundary", "cluster")


@dataclass(frozen=True)
class LevelPlan:
    """How one level is executed."""

    name: str
    role: str  # "slow" | "fast"
    lowering: str  # one of LOWERINGS
    chunk: int
    frequency: str
    reads: tuple[str, ...]  # levels whose state or output this level's update reads
    detail: str = ""  # the rule as lowered (coefficients), for the printed plan


@dataclass
class Plan:
    spec: GraphSpec
    dims: dict[str, int]
    levels: dict[str, LevelPlan]
    order: list[str]  # evaluation order of the forward pass
    tiers: list[list[str]] = field(default_factory=list)
    backend: str = "auto"
    clusters: list[list[str]] = field(default_factory=list)  # memories run jointly

    def __str__(self) -> str:
        lines = [f"plan {self.spec.name!r}  backend={self.backend}  dims={self.dims}"]
        for i, tier in enumerate(self.tiers, 1):
            for n in tier:
                lp = self.levels[n]
                reads = f" reads {', '.join(lp.reads)}" if lp.reads else ""
                chunk = f" chunk={lp.chunk}" if lp.role == "fast" else ""
                lines.append(
                    f"  tier {i}  {n:18s} {lp.role:4s} {lp.lowering:13s} {lp.frequency}"
                    f"{chunk}{reads}" + (f"\n{'':30s}{lp.detail}" if lp.detail else "")
                )
        lines.append("  forward order: " + " -> ".join(self.order))
        return "\n".join(lines)

    def check(self) -> None:
        """Invariants between passes: every level planned once, in order, after what it reads."""
        names = {lv.name for lv in self.spec.levels}
        if set(self.levels) != names:
            raise CompileError(f"plan invariant: planned {sorted(self.levels)} != {sorted(names)}")
        if sorted(self.order) != sorted(names):
            raise CompileError("plan invariant: the forward order must list every level once")
        pos = {n: i for i, n in enumerate(self.order)}
        for n, lp in self.levels.items():
            if lp.lowering not in LOWERINGS:
                raise CompileError(f"plan invariant: level {n!r} has lowering {lp.lowering!r}")
            for r in lp.reads:
                if r in pos and pos[r] > pos[n] and self.levels[r].role == "slow":
                    raise CompileError(f"plan invariant: {n!r} runs before {r!r}, which it reads")
            if lp.role == "fast" and lp.chunk < 1:
                raise CompileError(f"plan invariant: level {n!r} has chunk {lp.chunk}")

    def schedule(self, ticks: int) -> dict[str, list[int]]:
        """Token ticks 1..ticks at which each token/chunk level updates."""
        out: dict[str, list[int]] = {}
        for lv in self.spec.levels:
            f = lv.frequency
            if f.unit == "token":
                out[lv.name] = [t for t in range(1, ticks + 1) if f.updates_at(t)]
            elif f.unit == "chunk":
                c = self.spec.chunk_of(lv)
                out[lv.name] = [
                    t for t in range(1, ticks + 1) if t % c == 0 and f.updates_at(t // c)
                ]
        return out


def _classify(spec: GraphSpec, lv: Level) -> tuple[str, str, str]:
    """(role, lowering, detail) for a level, or CompileError naming what is unsupported."""
    where = f"level {lv.name!r}"
    unit = lv.frequency.unit
    if unit in ("step", "sequence", "never"):
        if lv.state.kind in ("like", "params"):
            raise CompileError(
                f"{where}: {lv.state} states belong to optimizer graphs; compile those with "
                "nlgraph.optim.compile_optimizer"
            )
        if lv.objective is not None and lv.objective.kind != "outer":
            raise CompileError(
                f"{where}: a {lv.frequency} level with inner objective {lv.objective.kind!r} "
                "has no lowering yet; only outer-loss levels run at step frequency"
            )
        if unit == "never":
            return "slow", "parameter", f"frozen: never updated ({lv.state})"
        return "slow", "parameter", f"trained by the outer optimizer ({lv.state})"
    st, obj, rules = lv.state, lv.objective, lv.optimizer
    kinds = [r.rule for r in rules]
    if st.kind == "nonparametric":
        if obj is None or obj.kind != "nadaraya_watson" or kinds != ["exact"]:
            raise CompileError(f"{where}: a non-parametric memory needs nadaraya_watson + exact()")
        return "fast", "attention", "softmax attention (Nadaraya-Watson, Eq. 62)"
    if obj is not None and obj.kind == "outer":
        if st.kind not in ("mlp", "linear"):
            raise CompileError(f"{where}: a chunk-updated block needs an mlp or linear state")
        if len(rules) != 1 or not isinstance(rules[0], GD) or rules[0].momentum is not None:
            raise CompileError(
                f"{where}: a chunk-updated block lowers with one gd(lr, retain) rule, got "
                f"{describe(rules)}"
            )
        if any(isinstance(v, Signal) for v in (rules[0].lr, rules[0].retain)):
            raise CompileError(f"{where}: a chunk-updated block takes constant or learned rates")
        period = lv.frequency.period_tokens(spec.chunk_of(lv))
        return (
            "fast",
            "boundary",
            (
                f"frozen within each {period}-token chunk; at its end theta <- a theta - lr * "
                "(sum of the chunk's outer-loss gradients at the chunk-start theta) (Eq. 71)"
            ),
        )
    if len(rules) != 1 or not isinstance(rules[0], GD | DGD):
        raise CompileError(
            f"{where}: inner optimizer {describe(rules)} has no lowering yet "
            "(supported: one gd or dgd rule)"
        )
    if obj is None or obj.kind not in ("dot", "l2", "lp", "custom"):
        raise CompileError(
            f"{where}: objective {obj} has no lowering yet (supported: dot, l2, lp, custom)"
        )
    rule = rules[0]
    if obj.kind in ("lp", "custom") and st.kind in ("linear", "mlp"):
        # Any objective of the read-out runs in the cluster form: only its error at the output
        # differs, the per-layer updates are the same.
        return "fast", "cluster", _CLUSTER_DETAIL
    if st.kind == "linear" and rule.momentum is None:
        if isinstance(rule, DGD):
            e = "e = lr/(1+lr|k|^2)" if rule.exact else "e = lr"
            detail = (
                f"M <- M (a I - e k k^T) + e v k^T, {e} (DGD on the dot objective: the exact "
                "proximal L2 step, Sec. 3.1)"
                if obj.kind == "dot"
                else f"M <- M (a I - 2 e k k^T) + e v k^T, {e} (DGD on the L2 objective, Eq. 88/93)"
            )
        elif obj.kind == "dot":
            detail = "M <- a M + lr v k^T (Hebbian, Eq. 64)"
        else:
            detail = "M <- M (a I - lr k k^T) + lr v k^T (delta rule, Eq. 65)"
        return "fast", "linear_memory", detail
    if st.kind in ("linear", "mlp") and isinstance(rule, GD):
        return (
            "fast",
            "deep_memory",
            ("u = grad l(M_chunk_start); S <- mu S - lr u; M <- a M + S (Titans, Sec. 4.1)"),
        )
    if st.kind in ("linear", "mlp"):
        return "fast", "cluster", _CLUSTER_DETAIL
    raise CompileError(f"{where}: {st.kind} memory with {describe(rules)} has no lowering yet")


_CLUSTER_DETAIL = (
    "per layer: W <- W (a I - lr' x x^T) - lr' delta x^T (+ momentum), x and delta at the "
    "chunk-start state (DGD, Eq. 88; Sec. 3.1)"
)


def _reads(lv: Level, named: dict) -> tuple[str, ...]:
    names = {
        r
        for _, flow in _level_flows(lv)
        for kind, r, _ in references(flow, named)
        if kind != "input"
    }
    return tuple(sorted(names - {lv.name}))


def make_plan(spec: GraphSpec, dims: dict[str, int], backend: str = "auto") -> Plan:
    levels: dict[str, LevelPlan] = {}
    for lv in spec.levels:
        role, lowering, detail = _classify(spec, lv)
        chunk = spec.chunk_of(lv)
        if lowering == "boundary":
            chunk = lv.frequency.period_tokens(chunk) or chunk
        levels[lv.name] = LevelPlan(
            lv.name, role, lowering, chunk, str(lv.frequency), _reads(lv, spec.flows), detail
        )
    # A memory may consume another memory's read-outs: stacked memories run one after the other
    # over the whole sequence. Memories that read themselves or each other inside their updates
    # (self-modifying Titans: self-generated values, keys from M_k, rates from M_eta) form a
    # cluster, run jointly chunk by chunk with every read at the chunk-start states.
    fast = {n for n, lp in levels.items() if lp.role == "fast"}
    deps = nx.DiGraph()
    deps.add_nodes_from(sorted(fast))
    for n in fast:
        lv = spec.level(n)
        own = {
            r for _, f in _level_flows(lv) for k, r, _ in references(f, spec.flows) if k != "input"
        }
        for m in sorted(own & fast):
            deps.add_edge(m, n)
    clusters: list[list[str]] = []
    for comp in nx.strongly_connected_components(deps):
        members = sorted(comp)
        if len(members) == 1 and not deps.has_edge(members[0], members[0]):
            if levels[members[0]].lowering == "cluster":
                clusters.append(members)
            continue
        for n in members:
            lp = levels[n]
            if lp.lowering not in ("cluster", "deep_memory", "linear_memory"):
                raise CompileError(
                    f"level {n!r} ({lp.lowering}) reads the memories {members} inside its update; "
                    "only matrix and MLP memories can run as one recurrent cluster"
                )
            levels[n] = LevelPlan(n, "fast", "cluster", lp.chunk, lp.frequency, lp.reads,
                                  _CLUSTER_DETAIL)  # fmt: skip
        clusters.append(members)
    condensed = nx.condensation(deps)
    ordered = [
        n
        for c in nx.lexicographical_topological_sort(
            condensed, key=lambda c: min(condensed.nodes[c]["members"])
        )
        for n in sorted(condensed.nodes[c]["members"])
    ]
    slow = sorted((n for n in levels if levels[n].role == "slow"), key=lambda n: (
        frequency_key(spec, spec.level(n)), n))  # fmt: skip
    order = slow + ordered
    plan = Plan(spec, dims, levels, order, tiers(spec), backend, sorted(clusters))
    plan.check()
    if os.environ.get("NLGRAPH_DEBUG", "0") >= "2":
        print(plan)
    return plan


def memory_reads(spec: GraphSpec, name: str) -> list[Read]:
    """Every distinct read-out of memory ``name`` in the graph's outputs and flows."""
    from nlgraph.flows import walk
    from nlgraph.validation import _flows

    found: dict[Any, Read] = {}
    flows = list(spec.outputs.values()) + [f for lv in spec.levels for _, f in _flows(lv)]
    for flow in flows:
        for node in walk(flow, spec.flows):
            if isinstance(node, Read) and node.level == name:
                found.setdefault(node, node)
    return list(found.values())
