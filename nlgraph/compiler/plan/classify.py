"""Pass 1's rules: the role, lowering and printed detail of one level, from its state kind,
objective, optimizer and frequency (docs/compiler.md, "Lowerings"); and the levels a level
reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nlgraph._errors import CompileError
from nlgraph.compiler.ir import Lowering, Role
from nlgraph.flows import Read, references, walk
from nlgraph.level import GraphSpec, Level
from nlgraph.optimizers import DGD, EMA, GD, Exact, Follow, Signal, describe
from nlgraph.validation import level_flows

__all__ = [
    "cluster_detail", "Classification", "classify_level", "level_reads", "loop_detail",
    "memory_reads",
]  # fmt: skip

SLOW, FAST = Role.SLOW, Role.FAST
L = Lowering


@dataclass(frozen=True)
class Classification:
    """What pass 1 decides for one level; ``why`` says why a reference loop (or a token loop
    of a block) has no fast lowering."""

    role: Role
    lowering: Lowering
    detail: str
    why: str = ""


def classify_level(spec: GraphSpec, lv: Level) -> Classification:
    """The role, lowering and detail of a level, or CompileError naming what is unsupported."""
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
            return Classification(SLOW, L.PARAMETER, f"frozen: never updated ({lv.state})")
        return Classification(SLOW, L.PARAMETER, f"trained by the outer optimizer ({lv.state})")
    st, obj, rules = lv.state, lv.objective, lv.optimizer
    kinds = [r.rule for r in rules]
    if st.kind == "nonparametric":
        if obj is None or obj.kind != "nadaraya_watson" or kinds != ["exact"]:
            raise CompileError(f"{where}: a non-parametric memory needs nadaraya_watson + exact()")
        return Classification(FAST, L.ATTENTION, "softmax attention (Nadaraya-Watson, Eq. 62)")
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
        return Classification(FAST, L.REFERENCE_LOOP, loop_detail(lv), "; ".join(reasons))
    rule = rules[0]
    if obj.kind in ("lp", "custom") and st.kind in ("linear", "mlp"):
        # Any objective of the read-out runs in the cluster form: only its error at the output
        # differs, the per-layer updates are the same.
        return Classification(FAST, L.CLUSTER, cluster_detail(lv))
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
        return Classification(FAST, L.LINEAR_MEMORY, detail)
    if st.kind in ("linear", "mlp") and isinstance(rule, GD):
        detail = "u = grad l(M_chunk_start); S <- mu S - lr u; M <- a M + S (Titans, Sec. 4.1)"
        return Classification(FAST, L.DEEP_MEMORY, detail)
    return Classification(FAST, L.CLUSTER, cluster_detail(lv))


def _block(spec: GraphSpec, lv: Level) -> Classification:
    """The classification of a chunk-updated block (CMS, Eq. 71): any chain of
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
        return Classification(FAST, L.BOUNDARY, detail)
    chain = _chain_text(rules)
    if not per_token:
        detail = (
            f"frozen within each {period}-token chunk; at its end d = {grads}; {chain} "
            "(Eq. 71 with the rule chain as the optimizer)"
        )
        return Classification(FAST, L.BOUNDARY, detail)
    detail = (
        f"token loop: frozen within each {period}-token chunk; d = sum of its tokens' outer-loss "
        f"gradients at the chunk-start theta, each weighted by its own rate (Eq. 71); at the "
        f"chunk's end {chain} with that rate replaced by 1"
    )
    why = f"its rate {per_token[0]} is per token, inside Eq. 71's sum over the chunk"
    return Classification(FAST, L.BOUNDARY, detail, why)


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


def loop_detail(lv: Level, where: str = "", grad: str = "") -> str:
    grad = grad or f"autograd of {lv.objective}"
    return f"token loop{where}: g = {grad} at the chunk-start state; {_chain_text(lv.optimizer)}"


def cluster_detail(lv: Level) -> str:
    """The per-layer step a cluster member runs, as the plan prints it: DGD (Eq. 88) or plain
    GD, with or without momentum, as its rule says."""
    rule = lv.optimizer[0]
    where = "x and delta at the chunk-start state"
    mom = rule.momentum is not None
    if isinstance(rule, DGD):
        lr = "lr' = lr/(1+lr|x|^2)" if rule.exact else "lr' = lr"
        step = "S <- mu S - lr' delta x^T; W <- W (a I - lr' x x^T) + S" if mom else (
            "W <- W (a I - lr' x x^T) - lr' delta x^T")  # fmt: skip
        return f"per layer: {step}, {lr}, {where} (DGD, Eq. 88; Sec. 3.1)"
    step = "S <- mu S - lr delta x^T; W <- a W + S" if mom else "W <- a W - lr delta x^T"
    return f"per layer: {step}, {where} (GD)"


def level_reads(lv: Level, named: dict) -> tuple[str, ...]:
    """The levels whose state or output ``lv``'s update reads (not itself)."""
    names = {
        r
        for _, flow in level_flows(lv)
        for kind, r, _ in references(flow, named)
        if kind != "input"
    }
    return tuple(sorted(names - {lv.name}))


def memory_reads(spec: GraphSpec, name: str) -> list[Read]:
    """Every distinct read-out of memory ``name`` in the graph's outputs and flows, in the
    order a walk of the outputs, then of every level's flows, first meets them."""
    return list(_all_reads(spec).get(name, ()))


_READS: list[tuple[GraphSpec, dict[str, tuple[Read, ...]]]] = []  # the last few specs walked


def _all_reads(spec: GraphSpec) -> dict[str, tuple[Read, ...]]:
    """The read-outs of every level at once: one walk in which each named flow (a residual
    stream read by every later block) is followed once, not once per flow and per memory
    (which made planning grow with the cube of the layer count)."""
    for cached, reads in _READS:
        if cached is spec:
            return reads
    found: dict[str, dict[Any, Read]] = {}
    seen: set[str] = set()
    flows = list(spec.outputs.values()) + [f for lv in spec.levels for _, f in level_flows(lv)]
    for flow in flows:
        for node in walk(flow, spec.flows, seen):
            if isinstance(node, Read):
                found.setdefault(node.level, {}).setdefault(node, node)
    reads = {n: tuple(r.values()) for n, r in found.items()}
    _READS[:] = [(spec, reads), *_READS[:3]]
    return reads
