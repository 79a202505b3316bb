"""The compiler's intermediate form: which level runs how, in which order, on the global clock.

A :class:`Plan` classifies every level of a validated, bound graph:

- ``slow``: a level updated every outer step (or frozen): an ``nn.Module``/``nn.Parameter`` of
  the learner, trained by the outer optimizer, read in parallel over all tokens.
- ``fast``: an in-context memory updated per token or chunk, lowered to a kernel op
  (``linear_memory``: matrix memories with dot/L2 objectives under GD/DGD with retention;
  ``deep_memory``: MLP (or momentum-carrying linear) memories under GD with momentum and
  forgetting; ``attention``: the exact non-parametric memory), or ``boundary``: a block on the
  outer loss updated every C tokens (CMS, Eq. 71) — frozen within a chunk, so the chunk runs in
  parallel, then the chunk's accumulated gradient is applied at its end; or ``reference_loop``:
  a matrix or MLP memory whose rule or schedule no kernel covers (a chain of rules such as
  Newton–Schulz or preconditioning, Nesterov momentum, a period longer than one token), run
  token by token as the plain interpreter of its spec, with a :class:`ReferenceLoopWarning`.

The plan is printable (``str(plan)``, ``NLGRAPH_DEBUG=2``) and checked by :meth:`Plan.check`
after it is built (``NLGRAPH_DEBUG=1`` and always in tests).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import networkx as nx

from nlgraph._errors import CompileError, ReferenceLoopWarning
from nlgraph.flows import Read, references
from nlgraph.level import GraphSpec, Level
from nlgraph.optimizers import DGD, EMA, GD, Exact, Follow, Signal, describe
from nlgraph.topology import frequency_key, tiers
from nlgraph.validation import _flows as _level_flows

__all__ = ["LevelPlan", "Plan", "make_plan", "LOWERINGS"]

LOWERINGS = (
    "parameter", "linear_memory", "deep_memory", "attention", "boundary", "cluster",
    "reference_loop",
)  # fmt: skip


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
    why: str = ""  # reference_loop: why no fast lowering covers the level


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
                    f"  tier {i}  {n:18s} {lp.role:4s} {lp.lowering:14s} {lp.frequency}"
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


def _classify(spec: GraphSpec, lv: Level) -> tuple[str, ...]:
    """(role, lowering, detail, why) for a level, or CompileError naming what is unsupported;
    ``why`` says why a reference_loop level has no fast lowering."""
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
                f"{where}: a level updated {lv.frequency} with inner objective "
                f"{lv.objective.kind!r} has no meaning in a sequence learner: its state would "
                "be shared across the sequences of a batch and change between forward calls, "
                "on a clock the learner does not run. Use objective=outer() (trained by the "
                "outer optimizer at that rate), or an in-context memory every(n, 'token') with "
                "reset=reset_never() to persist across sequences"
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
        return _block(spec, lv)
    if st.kind == "linear" and st.bias:
        raise CompileError(
            f"{where}: a matrix memory with bias=True has no lowering (the memory kernels read "
            "out M k, without a bias); use linear(..., bias=False)"
        )
    if st.kind not in ("linear", "mlp"):
        raise CompileError(
            f"{where}: a {st} state cannot be an in-context memory of a sequence learner "
            "(expected linear(...) or mlp(...) with kv context, or nonparametric() for attention)"
        )
    if obj is None or obj.kind not in ("dot", "l2", "lp", "custom"):
        raise CompileError(
            f"{where}: objective {obj} is not a key/value objective; a matrix or MLP memory "
            "takes dot(), l2(), lp(p) or custom(path)"
        )
    reasons = _loop_reasons(spec, lv)
    if reasons:
        return "fast", "reference_loop", _loop_detail(lv), "; ".join(reasons)
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
    return "fast", "cluster", _CLUSTER_DETAIL


def _block(spec: GraphSpec, lv: Level) -> tuple[str, ...]:
    """(role, lowering, detail[, why]) of a chunk-updated block (CMS, Eq. 71): any chain of
    gd/ema/weight_decay/precondition/orthogonalize rules, applied at the chunk's end to the
    chunk's summed outer-loss gradients. A per-token rate of its gd/ema rule sits inside the
    sum (each token's gradient weighted by its own rate), so the learner runs token by token."""
    where = f"level {lv.name!r}"
    rules = lv.optimizer
    if not rules:
        raise CompileError(
            f"{where}: a chunk-updated block (outer() objective, updated every C tokens) needs "
            "an inner optimizer, e.g. optimizer=gd(lr=0.1); without one it is a slow level "
            "(frequency=per_step())"
        )
    for r in rules:
        if isinstance(r, Follow | Exact):
            raise CompileError(
                f"{where}: the rule {r} has no meaning for a chunk-updated block; use gd, ema, "
                "weight_decay, precondition or orthogonalize"
            )
        if isinstance(r, DGD):
            raise CompileError(
                f"{where}: dgd in a chunk-updated block is not supported: its decay needs each "
                "layer's input, and a block's update sums a whole chunk of outer-loss gradients "
                "(whose input would decay the parameters?); use gd"
            )
    steps = [r for r in rules if isinstance(r, GD | EMA)]
    per_token = [r for r in steps if isinstance(r.lr if isinstance(r, GD) else r.beta, Signal)]
    if per_token and len(steps) > 1:
        raise CompileError(
            f"{where}: a per-token rate weights each token's gradient inside the chunk's sum "
            f"(Eq. 71), so it needs the chain's only gd/ema rule; got {describe(rules)}"
        )
    period = lv.frequency.period_tokens(spec.chunk_of(lv))
    grads = "sum of the chunk's outer-loss gradients at the chunk-start theta"
    single = rules[0] if len(rules) == 1 and isinstance(rules[0], GD) else None
    if single is not None and not single.nesterov and not per_token:
        if single.momentum is None:
            detail = (
                f"frozen within each {period}-token chunk; at its end theta <- a theta - lr * "
                f"({grads}) (Eq. 71)"
            )
        else:
            detail = (
                f"frozen within each {period}-token chunk; at its end S <- mu S - lr * ({grads}), "
                "theta <- a theta + S (Eq. 71 with momentum as the optimizer's error term)"
            )
        return "fast", "boundary", detail
    chain = _chain_text(rules)
    if not per_token:
        detail = (
            f"frozen within each {period}-token chunk; at its end d = {grads}; {chain} "
            "(Eq. 71 with the rule chain as the optimizer)"
        )
        return "fast", "boundary", detail
    detail = (
        f"token loop: frozen within each {period}-token chunk; d = sum of its tokens' outer-loss "
        f"gradients at the chunk-start theta, each weighted by its own rate (Eq. 71); at the "
        f"chunk's end {chain} with that rate replaced by 1"
    )
    why = f"its rate {per_token[0]} is per token, inside Eq. 71's sum over the chunk"
    return "fast", "boundary", detail, why


def _loop_reasons(spec: GraphSpec, lv: Level) -> list[str]:
    """Why a matrix/MLP memory has no fast lowering (empty: it has one); CompileError for a
    rule chain with no meaning inside a sequence learner."""
    where = f"level {lv.name!r}"
    rules, f = lv.optimizer, lv.frequency
    if not rules:
        raise CompileError(f"{where}: a memory needs an inner optimizer, e.g. optimizer=gd(lr=0.1)")
    for r in rules:
        if isinstance(r, Follow | Exact):
            raise CompileError(
                f"{where}: the rule {r} has no meaning for an in-context memory (follow() reads "
                "another level's state, which a sequence learner does not expose; exact() is "
                "the non-parametric solution); use gd/dgd/ema, weight_decay, precondition or "
                "orthogonalize"
            )
    reasons = []
    period_one = f.period_tokens(spec.chunk_of(lv)) == 1 and f.offset == 0
    if not period_one:
        if any(isinstance(r, DGD) for r in rules):
            raise CompileError(
                f"{where}: dgd with an update every {f.period_tokens(spec.chunk_of(lv))} tokens "
                "is ambiguous (whose input decays the state?); use gd, or update every token"
            )
        reasons.append(f"it updates {f} (the kernels update at every token)")
    if len(rules) != 1 or not isinstance(rules[0], GD | DGD):
        reasons.append(f"its inner optimizer {describe(rules)} is not one gd or dgd rule")
    elif isinstance(rules[0], GD) and rules[0].nesterov:
        reasons.append("the kernels have no Nesterov momentum")
    return reasons


def _chain_text(rules: Any) -> str:
    """A rule chain as the plan prints it (ema as the GD step it is)."""
    return " -> ".join(f"GD(lr=1-{r.beta})" if isinstance(r, EMA) else str(r) for r in rules)


def _loop_detail(lv: Level, where: str = "", grad: str = "") -> str:
    grad = grad or f"autograd of {lv.objective}"
    return f"token loop{where}: g = {grad} at the chunk-start state; {_chain_text(lv.optimizer)}"


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
        role, lowering, detail, *why = _classify(spec, lv)
        chunk = spec.chunk_of(lv)
        if lowering == "boundary":
            chunk = lv.frequency.period_tokens(chunk) or chunk
        levels[lv.name] = LevelPlan(
            lv.name,
            role,
            lowering,
            chunk,
            str(lv.frequency),
            _reads(lv, spec.flows),
            detail,
            *why,
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
            if lp.lowering == "reference_loop":
                # No cluster lowering for its rule or schedule: it runs as a token loop of its
                # rule chain inside the cluster's windows (per-layer gradients delta x^T at the
                # chunk-start states); the other members keep their kernels.
                inside = f" inside the recurrent cluster {members}"
                detail = _loop_detail(spec.level(n), inside, "delta x^T per layer")
                levels[n] = LevelPlan(n, "fast", "reference_loop", lp.chunk, lp.frequency,
                                      lp.reads, detail, f"{lp.why}; it runs as a token loop"
                                      f"{inside}")  # fmt: skip
                continue
            if lp.lowering not in ("cluster", "deep_memory", "linear_memory"):
                raise CompileError(
                    f"level {n!r} ({lp.lowering}) reads the memories {members} inside its update; "
                    "only matrix and MLP memories on a key/value objective can run as one "
                    "recurrent cluster"
                )
            levels[n] = LevelPlan(n, "fast", "cluster", lp.chunk, lp.frequency, lp.reads,
                                  _CLUSTER_DETAIL)  # fmt: skip
        clusters.append(members)
    # A member read at="new" needs each token's update before the read: the cluster runs one
    # token per window (a token loop), with one ReferenceLoopWarning naming the members.
    token_loops: list[tuple[list[str], list[str]]] = []
    for members in clusters:
        late = [n for n in members if any(r.at == "new" for r in memory_reads(spec, n))]
        if not late:
            continue
        token_loops.append((members, late))
        note = (f"token loop (one token per window: {', '.join(late)} read at='new', after "
                "each token's update); ")  # fmt: skip
        for n in members:
            levels[n] = replace(levels[n], detail=note + levels[n].detail)
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
    for n in plan.order:
        lp = plan.levels[n]
        if lp.lowering == "reference_loop" or lp.why:
            warnings.warn(
                ReferenceLoopWarning(
                    f"level {n!r} has no fast lowering ({lp.why}); it runs as the reference loop, "
                    "token by token with autograd for its inner gradient: exact, but slow"
                ),
                stacklevel=3,
            )
    for members, late in token_loops:
        which = (f"level {late[0]!r} is" if len(late) == 1 else
                 f"levels {', '.join(repr(n) for n in late)} are")  # fmt: skip
        warnings.warn(
            ReferenceLoopWarning(
                f"{which} read at='new' (after each token's update) but in the recurrent cluster "
                f"{members}, whose windows read the chunk-start state; the cluster runs one token "
                "per window, a token loop: exact, but slow"
            ),
            stacklevel=3,
        )
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
