"""Lower a plan's flows into a straight-line program and generate its Python source.

Every flow the learner needs becomes one node (shared subexpressions and named flows once);
each fast memory becomes one call that takes its keys, values, queries and gates and returns its
read-outs; each recurrent cluster becomes one call with a small window program of its own. The
program is emitted as Python source (``learner.code``), compiled once, and run by ``forward``:
no spec objects are touched while running, so ``torch.compile`` traces plain tensor code.
"""

from __future__ import annotations

import dataclasses
import heapq
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from nlgraph._errors import CompileError
from nlgraph.compiler import ir
from nlgraph.compiler.plan import Plan, memory_reads
from nlgraph.flows import KV, FlowBase, Read, Unary
from nlgraph.level import Level
from nlgraph.optimizers import Learned, Signal
from nlgraph.topology import first_order_levels

__all__ = [
    "Node", "ClusterCfg", "Program", "Split", "build_program", "key", "layer_of", "partition",
]  # fmt: skip


def key(name: str) -> str:
    """A level name as a module/parameter key (dots are not allowed there)."""
    return name.replace(".", "__")


@dataclass(frozen=True)
class Node:
    """``op`` applied to earlier nodes ``args`` with constant ``attrs``."""

    id: int
    op: str  # input slow conv block param unary normalize binary const detach memory memout ...
    args: tuple[int, ...] = ()
    attrs: tuple[Any, ...] = ()


@dataclass(frozen=True)
class ClusterCfg:
    """The ``cluster`` lowering's configuration: memories run jointly. ``inputs`` are
    full-sequence nodes sliced per window; ``nodes`` is the window program; ``members`` maps
    each memory to its config, ``member_args`` to its argument nodes, ``reads`` to the window
    nodes of its read-outs (in the order of ``read_flows``, its reads in the graph)."""

    id: int
    names: list[str]
    inputs: tuple[int, ...]
    nodes: tuple[Node, ...]
    members: dict[str, ir.MemoryConfig]
    member_args: dict[str, tuple[int, ...]]  # window node ids
    reads: dict[str, list[int]]  # window nodes of member reads
    read_flows: dict[str, list[Read]]
    # Members read at="new" ("running" window nodes: the state after each token's update); with
    # any, the cluster runs one token per window, its members updated in ``stages``: a member
    # whose keys, values or rates read another at="new" updates in a later stage (Def. 2).
    read_new: tuple[str, ...] = ()
    stages: list[list[str]] = field(default_factory=list)
    # Nothing the cluster computes can reach the outer gradient (its members' writes are
    # first-order and its read-outs feed only first-order writes): it runs without a graph.
    grad_free: bool = False


@dataclass(frozen=True)
class Program:
    """The lowered learner: the straight-line program over ``nodes`` (its Python ``source``),
    each stand-alone memory's config and argument nodes, the clusters, and each CMS block's rule
    chain (its per-token positions index the tuple the program hands to
    ``self._block_signals``)."""

    nodes: tuple[Node, ...]
    outputs: dict[str, int]
    memories: dict[str, ir.MemoryConfig]
    memory_args: dict[str, tuple[int, ...]]
    clusters: tuple[ClusterCfg, ...]
    source: str
    block_rules: dict[str, tuple[ir.Rule, ...]]
    # The layer (``""``: top level) whose module holds each level's parameters and lowering,
    # and each layer's program (:func:`partition`).
    owner: dict[str, str] = field(default_factory=dict)
    layer_sources: dict[str, list[str]] = field(default_factory=dict)


def _scalar(lv: Level, name: str, value: Any, add_arg) -> ir.Scalar:
    if value is None:
        return ir.NoScalar()
    if isinstance(value, int | float):
        return ir.Const(float(value))
    if isinstance(value, Learned):
        return ir.Learned(name, value.lo, value.hi)
    if isinstance(value, Signal):
        return ir.PerToken(add_arg(value.flow), value.act, value.scale)
    raise CompileError(f"level {lv.name!r}: unsupported scalar {value!r}")  # pragma: no cover


def _rule(lv: Level, rule: Any, arg) -> ir.Rule:
    """One rule of a level's chain in the typed form; ``arg(flow)`` adds a per-token input and
    returns its position. Learned scalars are keyed ``<level>__<field>``."""

    def sc(name: str) -> ir.Scalar:
        return _scalar(lv, name, getattr(rule, name), arg)

    kind = rule.rule
    if kind == "gd":
        return ir.GDStep(sc("lr"), sc("momentum"), sc("retain"), rule.nesterov)
    if kind == "dgd":
        return ir.DGDStep(sc("lr"), sc("momentum"), sc("retain"), rule.exact, rule.dampen)
    if kind == "ema":
        return ir.EMAStep(sc("beta"))
    if kind == "weight_decay":
        return ir.DecayStep(sc("rate"))
    if kind == "precondition":
        return ir.PreconditionStep(arg(rule.by), rule.power, rule.eps)
    if kind == "newton_schulz":
        return ir.OrthogonalizeStep(rule.steps, rule.variant)
    raise CompileError(f"level {lv.name!r}: rule {rule} has no lowering")  # pragma: no cover


class _Lowering:
    """Flows to nodes, each distinct computation once (shared subexpressions, named flows)."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.nodes: list[Node] = []
        self.memo: dict[tuple, int] = {}
        self.flow_memo: dict[tuple, int] = {}
        self.detach: frozenset[str] = frozenset()  # levels read without gradient here

    def add(self, op: str, args: tuple[int, ...] = (), attrs: tuple = ()) -> int:
        sig = (op, args, attrs)
        hit = self.memo.get(sig)
        if hit is None:
            hit = self.memo[sig] = len(self.nodes)
            self.nodes.append(Node(hit, op, args, attrs))
        return hit

    def flow(self, flow: FlowBase) -> int:
        memo = (flow, self.detach)
        hit = self.flow_memo.get(memo)
        if hit is None:
            hit = self.flow_memo[memo] = self._flow(flow)
            if flow.op in ("read", "state") and flow.level in self.detach:
                hit = self.flow_memo[memo] = self.add("detach", (hit,))
        return hit

    def _flow(self, f: FlowBase) -> int:
        op = f.op
        if op == "ref":
            return self.flow(self.spec.flows[f.name])
        if op == "const":
            return self.add("const", (), (f.value,))
        if op == "unary":
            normalize = f.fn == "normalize"
            return self.add("normalize" if normalize else "unary", (self.flow(f.x),),
                            () if normalize else (f.fn,))  # fmt: skip
        if op == "binary":
            return self.add("binary", (self.flow(f.a), self.flow(f.b)), (f.fn,))
        return self._level_flow(f)

    def _level_flow(self, f: FlowBase) -> int:  # pragma: no cover - overridden
        raise NotImplementedError


class _Builder(_Lowering):
    def __init__(self, plan: Plan, slow_kinds: dict[str, str]) -> None:
        super().__init__(plan.spec)
        self.plan = plan
        self.slow_kinds = slow_kinds  # level -> "slow" | "conv" | "param"
        self.memories: dict[str, ir.MemoryConfig] = {}
        self.memory_args: dict[str, tuple[int, ...]] = {}
        self.mem_nodes: dict[str, int] = {}
        self.clusters: dict[int, ClusterCfg] = {}
        self.cluster_of = {n: i for i, c in enumerate(plan.clusters) for n in c}
        self.stop_grad: dict[str, frozenset[str]] = {}
        self.truncated: dict[str, int] = {}
        # stop_grad on a level's own recurrence: its in-sequence updates are first-order
        self.first_order = first_order_levels(self.spec)
        for d in self.spec.diff:
            if d.src == d.dst:
                continue
            if d.mode.mode == "stop_grad":
                self.stop_grad[d.dst] = self.stop_grad.get(d.dst, frozenset()) | {d.src}
            elif d.mode.mode == "truncated":
                if self.truncated.get(d.dst, d.mode.k) != d.mode.k:
                    raise CompileError(f"level {d.dst!r}: edges into it truncate at different k")
                self.truncated[d.dst] = d.mode.k
        for name in sorted(self.first_order):
            lowering = plan.levels[name].lowering
            if lowering not in ("cluster", "boundary"):
                raise CompileError(
                    f"level {name!r} ({lowering}): first-order updates (stop_grad on its own "
                    "recurrence) are lowered for memories read at their chunk-start state in a "
                    "recurrent cluster (self-modifying Titans) and for CMS blocks; a "
                    f"{lowering} memory's reads see its updates inside the chunk. Drop the "
                    f"stop_grad edge {name!r} -> {name!r}, or detach its inputs with stop_grad "
                    "edges into it"
                )
        for dst in (*self.stop_grad, *self.truncated):
            lowering = plan.levels[dst].lowering
            if lowering == "parameter":
                raise CompileError(
                    f"level {dst!r} (parameter): stop_grad/truncated edges declare how a "
                    "faster level's inner updates are differentiated; a level trained by the "
                    "outer optimizer has none (detach its input with a stop_grad edge into the "
                    "memory that reads it instead)"
                )

    def flow_for(self, dst: str, flow: FlowBase) -> int:
        """``flow`` as level ``dst`` reads it: levels on its stop_grad edges are detached."""
        outer, self.detach = self.detach, self.stop_grad.get(dst, frozenset())
        try:
            return self.flow(flow)
        finally:
            self.detach = outer

    def _level_flow(self, f: FlowBase) -> int:
        op = f.op
        if op == "input":
            return self.add("input", (), (f.name,))
        if op == "state" and self.slow_kinds.get(f.level) == "param":
            return self.add("param", (), (key(f.level),))
        if op == "read":
            lp = self.plan.levels[f.level]
            if lp.lowering == "parameter":
                kind = self.slow_kinds[f.level]
                if kind == "param":
                    raise CompileError(f"{f.level!r} is a tensor, not a module to read")
                return self.add(kind, (self.flow(f.arg),), (f.level,))
            if lp.lowering == "boundary":  # its input, detached along stop_grad edges into it
                return self.add("block", (self.flow_for(f.level, f.arg),), (f.level,))
            if f.level in self.cluster_of:
                return self._cluster_read(f)
            return self._memory_read(f)
        raise CompileError(f"flow {f} cannot be evaluated in a sequence learner")

    # ---------------------------------------------------------------------------- memories
    def _memory_cfg(
        self, lv: Level, reads: list[Read], add_arg
    ) -> tuple[ir.MemoryConfig, list[int]]:
        """The memory's config and the argument ids (key, value, queries..., signals...)."""
        ctx = lv.context
        if not isinstance(ctx, KV) or ctx.key is None or ctx.value is None:
            raise CompileError(f"level {lv.name!r}: a memory needs kv(key=..., value=...)")
        args: list[int] = []

        def arg(flow: FlowBase) -> int:
            args.append(add_arg(flow))
            return len(args) - 1

        def unnorm(flow: FlowBase) -> tuple[FlowBase, bool]:
            # A normalised key or query of a multi-head memory is normalised per head.
            if isinstance(flow, Unary) and flow.fn == "normalize":
                return flow.x, True
            return flow, False

        k, kn = unnorm(ctx.key)
        v, vn = unnorm(ctx.value)
        arg(k)
        arg(v)
        qnorms = []
        for r in reads:
            q, qn = unnorm(r.arg)
            arg(q)
            qnorms.append(qn)
        if len({r.at for r in reads}) > 1:
            raise CompileError(f"level {lv.name!r} is read both before and after its update")
        lp = self.plan.levels[lv.name]
        st, obj = lv.state, lv.objective
        common = dict(
            name=lv.name,
            heads=lv.heads,
            key_norm=kn,
            value_norm=vn,
            query_norms=tuple(qnorms),
            read_after=not reads or reads[0].at == "new",
            chunk=lp.chunk,
            objective=ir.Objective(obj.kind, getattr(obj, "p", None), getattr(obj, "path", None)),
            truncate=self.truncated[lv.name] * lp.chunk if lv.name in self.truncated else None,
            first_order=lv.name in self.first_order,
        )
        mlp = dict(
            depth=1 if st.kind in ("linear", "nonparametric") else st.depth,
            activation=getattr(st, "activation", "identity"),
            residual=getattr(st, "residual", False),
        )
        lowering = lp.lowering
        if lowering == "reference_loop":
            freq = lv.frequency
            rules = tuple(_rule(lv, r, arg) for r in lv.optimizer)
            schedule = ir.Schedule(freq.unit, freq.every, freq.offset)
            return ir.ReferenceLoopConfig(**common, **mlp, rules=rules, schedule=schedule), args
        if lowering == "attention":
            cfg = ir.AttentionConfig(**common, window=getattr(st, "window", None),
                                     temperature=getattr(obj, "temperature", None))  # fmt: skip
            return cfg, args
        rule = _rule(lv, lv.optimizer[0], arg)
        if lowering == "linear_memory":
            return ir.LinearMemoryConfig(**common, rule=rule), args
        if lowering == "cluster":
            return ir.ClusterMemberConfig(**common, **mlp, rule=rule), args
        return ir.DeepMemoryConfig(**common, **mlp, rule=rule), args

    def _memory_read(self, f: Read) -> int:
        name = f.level
        if name not in self.mem_nodes:
            lv = self.spec.level(name)
            reads = memory_reads(self.spec, name)
            cfg, args = self._memory_cfg(lv, reads, lambda f: self.flow_for(name, f))
            self.memories[name] = cfg
            self.memory_args[name] = tuple(args)
            self.mem_nodes[name] = self.add("memory", tuple(args), (name,))
            self._reads = getattr(self, "_reads", {})
            self._reads[name] = reads
        slot = self._reads[name].index(f)
        return self.add("memout", (self.mem_nodes[name],), (slot,))

    # ---------------------------------------------------------------------------- clusters
    def _cluster_read(self, f: Read) -> int:
        cid = self.cluster_of[f.level]
        if cid not in self.clusters:
            self._build_cluster(cid)
        c = self.clusters[cid]
        slot = c.read_flows[f.level].index(f)
        return self.add("clusterout", (self.mem_nodes[f"cluster{cid}"],), (f.level, slot))

    def _build_cluster(self, cid: int) -> None:
        names = self.plan.clusters[cid]
        w = _WindowBuilder(self, set(names))
        members: dict[str, ir.MemoryConfig] = {}
        member_args: dict[str, tuple[int, ...]] = {}
        reads_of: dict[str, list[int]] = {}
        memos: dict[frozenset[str], dict] = {}
        for n in names:
            lv = self.spec.level(n)
            reads = memory_reads(self.spec, n)
            # stop_grad edges into a member detach their source where the member reads it: in
            # the flows computed over the whole sequence before the windows (projections of the
            # input, ...) and in the window program (another member's read-out, a module applied
            # to one), as "detach" nodes. A flow's node depends on what is cut, so each cut set
            # has its own memo (and the memo key holds the cut set too).
            cut = self.stop_grad.get(n, frozenset())
            outer, self.detach, w.detach = self.detach, cut, cut
            w.flow_memo = memos.setdefault(cut, {})
            try:
                cfg, args = self._memory_cfg(lv, [], w.flow)
                reads_of[n] = [w.flow(r) for r in reads]
            finally:
                self.detach, w.detach = outer, frozenset()
            members[n] = cfg
            member_args[n] = tuple(args)
        nodes = tuple(w.nodes)
        c = ClusterCfg(
            id=cid, names=names, inputs=tuple(w.inputs), nodes=nodes, members=members,
            member_args=member_args, reads=reads_of,
            read_flows={n: memory_reads(self.spec, n) for n in names},
            read_new=tuple(sorted({n.attrs[0] for n in nodes if n.op == "running"})),
            stages=_stages(names, nodes, member_args),
        )  # fmt: skip
        self.clusters[cid] = c
        self.mem_nodes[f"cluster{cid}"] = self.add("cluster", tuple(c.inputs), (cid,))


def _stages(
    names: list[str], nodes: tuple[Node, ...], member_args: dict[str, tuple[int, ...]]
) -> list[list[str]]:
    """The order of the members' updates within a token (Def. 2): a member whose keys, values,
    rates or queries read another member at="new" (a "running" node) updates after it. Members
    of one stage update together; CompileError naming the levels if the reads at="new" inside
    the members' updates form a cycle (no order within the token exists)."""
    late: list[frozenset[str]] = []  # per window node: the members whose running state it reads
    for n in nodes:
        own = {n.attrs[0]} if n.op == "running" else set()
        late.append(frozenset(own.union(*(late[i] for i in n.args))))
    g = nx.DiGraph()
    g.add_nodes_from(names)
    for n in names:
        for m in sorted(frozenset().union(*(late[i] for i in member_args[n]))):
            g.add_edge(m, n)
    if not nx.is_directed_acyclic_graph(g):
        cycle = [u for u, _ in nx.find_cycle(g)]
        if len(cycle) == 1:
            raise CompileError(
                f"level {cycle[0]!r} reads its own state after its update (at='new') inside that "
                "update (its key, value or rate), which the update needs first; read it at='prev'"
            )
        path = " -> ".join(repr(m) for m in [*cycle, cycle[0]])
        raise CompileError(
            f"levels {path} of the recurrent cluster {names} read each other's state after the "
            "update (at='new') inside their updates: a level read at='new' must update first "
            "within the token, so no order exists; read one of them at='prev'"
        )
    return [sorted(s) for s in nx.topological_generations(g)]


class _WindowBuilder(_Lowering):
    """The window program of a cluster: flows that read a member are recomputed per window;
    the others are computed once over the sequence and sliced (``window_input``)."""

    def __init__(self, outer: _Builder, members: set[str]) -> None:
        super().__init__(outer.spec)
        self.outer, self.members = outer, members
        self.inputs: list[int] = []

    def depends(self, f: FlowBase) -> bool:
        from nlgraph.flows import references

        return any(
            k in ("read", "state") and r in self.members
            for k, r, _ in references(f, self.outer.spec.flows)
        )

    def _flow(self, f: FlowBase) -> int:
        if f.op == "const":  # a number, not a sequence to slice
            return self.add("const", (), (f.value,))
        if not self.depends(f):
            full = self.outer.flow(f)
            if full not in self.inputs:
                self.inputs.append(full)
            return self.add("window_input", (), (self.inputs.index(full),))
        return super()._flow(f)

    def _level_flow(self, f: FlowBase) -> int:
        op = f.op
        if op == "read" and f.level in self.members:
            arg, norm = (f.arg.x, True) if isinstance(f.arg, Unary) and f.arg.fn == "normalize" \
                else (f.arg, False)  # fmt: skip
            # at="prev": the chunk-start state; at="new": the state after this token's update
            return self.add("visible" if f.at == "prev" else "running", (self.flow(arg),),
                            (f.level, norm))  # fmt: skip
        if op == "read":
            lp = self.outer.plan.levels[f.level]
            if lp.lowering != "parameter" or self.outer.slow_kinds[f.level] != "slow":
                raise CompileError(
                    f"{f.level!r} ({lp.lowering}) reads a recurrent cluster's output inside the "
                    "cluster; only slow modules (not convolutions) can sit between its memories"
                )
            return self.add("slow", (self.flow(f.arg),), (f.level,))
        raise CompileError(f"flow {f} cannot be evaluated inside a recurrent cluster")


# ---------------------------------------------------------------------------------- codegen

_BINOP = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}


def node_expr(n: Node, var, owner: str = "self") -> str:
    """One node as a Python expression over earlier nodes (``var(i)`` names node ``i``);
    ``owner`` is the expression of the :class:`~nlgraph.compiler.layers.Layer` holding the
    node's modules."""
    a = [var(i) for i in n.args]
    op = n.op
    if op == "input":
        return f"inputs[{n.attrs[0]!r}]"
    if op == "window_input":
        return f"window_inputs[{n.attrs[0]}]"
    if op == "const":
        return repr(float(n.attrs[0]))
    if op == "slow":
        return f"{owner}.slow[{key(n.attrs[0])!r}]({a[0]})"
    if op == "conv":
        return f"{owner}._conv({n.attrs[0]!r}, {a[0]}, state, new_state)"
    if op == "block":
        return f"{owner}.blocks[{key(n.attrs[0])!r}]({a[0]}, state)"
    if op == "param":
        return f"{owner}.slow[{n.attrs[0]!r}].value"
    if op == "normalize":
        return f"F.normalize({a[0]}, dim=-1)"
    if op == "detach":
        return f"{a[0]}.detach()"
    if op == "unary":
        return f"(-{a[0]})" if n.attrs[0] == "neg" else f"UNARY[{n.attrs[0]!r}]({a[0]})"
    if op == "binary":
        return f"({a[0]} {_BINOP[n.attrs[0]]} {a[1]})"
    if op == "memory":
        args = ", ".join(a)
        return f"{owner}.memories[{key(n.attrs[0])!r}](({args},), state, new_state, writes)"
    if op == "memout":
        return f"{a[0]}[{n.attrs[0]}]"
    if op == "cluster":
        args = ", ".join(a)
        cid = n.attrs[0]
        return f"{owner}.clusters['{cid}'](({args},), state, new_state, writes, {owner}.slow)"
    if op == "clusterout":
        return f"{a[0]}[{n.attrs[0]!r}][{n.attrs[1]}]"
    if op in ("visible", "running"):
        return f"{op}({n.attrs[0]!r}, {a[0]}, {n.attrs[1]})"
    if op == "blocksignals":
        return f"{owner}._block_signals({n.attrs[0]!r}, ({', '.join(a)},), state, new_state)"
    raise CompileError(f"no code for node op {op!r}")  # pragma: no cover


def _grad_free_clusters(
    nodes: list[Node], outputs: dict[str, int], clusters: dict[int, ClusterCfg]
) -> set[int]:
    """The clusters whose work cannot reach the outer gradient: every member first-order and
    no read-out on a path to an output or a CMS block's signals that gradients follow.

    A backward liveness pass over the program from its outputs and ``blocksignals`` nodes:
    ``detach`` nodes stop it, a cluster is entered through the read-outs used (``clusterout``)
    and, inside its window program, from those read-outs and from the write inputs of its exact
    (not first-order) members; a window input leads back to the program node it slices."""
    by_id = {n.id: n for n in nodes}
    live: set[int] = set()
    exports: dict[int, set[tuple[str, int]]] = {}
    entered: dict[int, set[int]] = {}  # cluster id -> live window nodes
    stack = [*outputs.values(), *(a for n in nodes if n.op == "blocksignals" for a in n.args)]

    def window(cid: int, roots: list[int]) -> None:
        c, seen = clusters[cid], entered.setdefault(cid, set())
        while roots:
            j = roots.pop()
            if j in seen:
                continue
            seen.add(j)
            wn = c.nodes[j]
            if wn.op == "window_input":
                stack.append(c.inputs[wn.attrs[0]])
            elif wn.op != "detach":
                roots.extend(wn.args)

    for cid, c in clusters.items():  # exact members' writes carry gradient into their state
        exact = [a for m in c.names if not c.members[m].first_order for a in c.member_args[m]]
        if exact:
            window(cid, list(exact))
    while stack:
        i = stack.pop()
        if i in live:
            continue
        live.add(i)
        n = by_id[i]
        if n.op == "detach":
            continue
        if n.op == "clusterout":
            cid = by_id[n.args[0]].attrs[0]
            exports.setdefault(cid, set()).add((n.attrs[0], n.attrs[1]))
            window(cid, [clusters[cid].reads[n.attrs[0]][n.attrs[1]]])
            continue
        if n.op == "cluster":
            continue  # entered through its read-outs (above)
        stack.extend(n.args)
    return {cid for cid in clusters if cid not in entered}


def _block_rules(b: _Builder, name: str) -> tuple[ir.Rule, ...]:
    """A CMS block's rule chain; the per-token flows its rules read (signals,
    preconditioners) become one ``blocksignals`` node, which hands them to the runtime."""
    lv, flows = b.spec.level(name), []

    def arg(flow: FlowBase) -> int:
        flows.append(flow)
        return len(flows) - 1

    rules = tuple(_rule(lv, r, arg) for r in lv.optimizer)
    if flows:
        b.add("blocksignals", tuple(b.flow_for(name, f) for f in flows), (name,))
    return rules


def build_program(plan: Plan, slow_kinds: dict[str, str]) -> Program:
    b = _Builder(plan, slow_kinds)
    outputs = {name: b.flow(flow) for name, flow in plan.spec.outputs.items()}
    block_rules = {n: _block_rules(b, n) for n in plan.order
                   if plan.levels[n].lowering == "boundary"}  # fmt: skip
    free = _grad_free_clusters(b.nodes, outputs, b.clusters)
    clusters = tuple(
        dataclasses.replace(b.clusters[i], grad_free=i in free) for i in sorted(b.clusters)
    )
    names = {key(lv.name): lv.name for lv in plan.spec.levels}
    split = partition(b.nodes, outputs, b.clusters, names)
    owned = [*slow_kinds, *b.memories, *(n for c in clusters for n in c.names), *block_rules]
    layer_names = {g for g in split.group.values() if g}  # "" (the top level) has no layer
    owner = {}
    for n in owned:
        g = split.owner.get(n, layer_of(n))
        owner[n] = g if g in layer_names else ""
    source, layer_sources = _codegen(plan.spec.name, b.nodes, outputs, split)
    return Program(tuple(b.nodes), outputs, b.memories, b.memory_args, clusters, source,
                   block_rules, owner, layer_sources)  # fmt: skip


# ---------------------------------------------------------------------------------- layers


def layer_of(level: str) -> str:
    """The layer a level belongs to: the first part of a dotted name (``"block0.attn.W_q"`` is
    in layer ``"block0"``); ``""`` for a top-level name (no dot)."""
    return level.split(".", 1)[0] if "." in level else ""


@dataclass(frozen=True)
class Split:
    """The program cut into layers: each node's ``group`` (a layer, ``""`` for the top level,
    absent for a constant computed wherever it is used), an ``order`` of the nodes in which
    each layer's nodes are contiguous, and the group whose module holds each level used."""

    group: dict[int, str]
    order: list[int]
    owner: dict[str, str]


def _levels_used(n: Node, clusters: dict[int, ClusterCfg], names: dict[str, str]) -> list[str]:
    """The levels whose modules node ``n`` calls."""
    if n.op in ("slow", "conv", "block", "memory", "blocksignals"):
        return [n.attrs[0]]
    if n.op == "param":
        return [names[n.attrs[0]]]
    if n.op == "cluster":
        c = clusters[n.attrs[0]]
        return [*c.names, *(w.attrs[0] for w in c.nodes if w.op == "slow")]
    return []


def partition(
    nodes: list[Node], outputs: dict[str, int], clusters: dict[int, ClusterCfg],
    names: dict[str, str],
) -> Split:  # fmt: skip
    """Cut the program into layers (:func:`layer_of` of the levels each node calls).

    A node that calls modules of two layers, or a module called from two layers, runs at the
    top level; an operation without a module joins the group of its latest argument (the
    residual add after a block belongs to the block); constants belong to no group. A layer
    whose nodes cannot be made contiguous (its inputs need another layer's outputs in between)
    joins the top level. Each layer then runs as one call of its module."""
    demoted: set[str] = set()
    while True:
        split = _try_partition(nodes, outputs, clusters, names, demoted)
        if isinstance(split, Split):
            return split
        demoted |= split


def _try_partition(
    nodes: list[Node], outputs: dict[str, int], clusters: dict[int, ClusterCfg],
    names: dict[str, str], demoted: set[str],
) -> Split | set[str]:  # fmt: skip
    uses = {n.id: _levels_used(n, clusters, names) for n in nodes}

    def home(level: str) -> str:
        g = layer_of(level)
        return "" if g in demoted else g

    top: set[int] = {n.id for n in nodes if n.op == "input"}
    while True:  # a module called from two groups pulls every node calling it to the top
        users: dict[str, set[str]] = {}
        for n in nodes:
            if uses[n.id]:
                gs = {home(lv) for lv in uses[n.id]}
                g = "" if n.id in top or len(gs) > 1 else gs.pop()
                for lv in uses[n.id]:
                    users.setdefault(lv, set()).add(g)
        shared = {lv for lv, gs in users.items() if len(gs) > 1}
        pulled = {n.id for n in nodes if n.id not in top and set(uses[n.id]) & shared}
        if not pulled:
            break
        top |= pulled
    group: dict[int, str] = {}
    for n in nodes:
        if uses[n.id] or n.id in top:
            gs = {home(lv) for lv in uses[n.id]}
            group[n.id] = "" if n.id in top or len(gs) != 1 else gs.pop()
        else:  # no module: with its latest argument that has a group; a constant has none
            placed = [a for a in n.args if a in group]
            if placed:
                group[n.id] = group[max(placed)]
    # An order that keeps each layer's ready nodes together (nodes are topologically sorted:
    # arguments come first).
    pending = {i: len({a for a in nodes[i].args if a in group}) for i in group}
    users_of: dict[int, list[int]] = {}
    for i in group:
        for a in set(nodes[i].args):
            if a in group:
                users_of.setdefault(a, []).append(i)
    ready: dict[str, list[int]] = {}
    for i, k in pending.items():
        if k == 0:
            heapq.heappush(ready.setdefault(group[i], []), i)
    order: list[int] = []
    current = ""
    while any(ready.values()):
        if not ready.get(current):
            current = min((h[0], g) for g, h in ready.items() if h)[1]
        i = heapq.heappop(ready[current])
        order.append(i)
        for u in users_of.get(i, ()):
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready.setdefault(group[u], []), u)
    runs = [g for j, g in enumerate(group[i] for i in order)
            if j == 0 or g != group[order[j - 1]]]  # fmt: skip
    split_layers = {g for g in runs if g and runs.count(g) > 1}
    if split_layers:
        return split_layers
    owner = {lv: group[i] for i in group for lv in uses[i]}
    return Split(group, order, owner)


def _codegen(
    name: str, nodes: list[Node], outputs: dict[str, int], split: Split
) -> tuple[str, dict[str, list[str]]]:
    """The program that calls the layers (``forward_program``) and the programs of the layers'
    calls (``layer_program``, by layer; the top level has one per run of its nodes), as Python
    source. Every module runs inside a call of its layer's module."""
    group = split.group
    order = [i for i in split.order if nodes[i].op != "input"]  # read by the caller
    users: dict[int, set[int]] = {}
    for i in order:
        for a in nodes[i].args:
            users.setdefault(a, set()).add(i)
    returned = set(outputs.values())

    def var(i: int) -> str:
        return f"n{i}"

    def emit(lines: list[str], i: int, owner: str, done: set[int]) -> None:
        for a in nodes[i].args:  # constants: computed where they are used
            if a not in group and a not in done:
                emit(lines, a, owner, done)
        lines.append(f"    n{i} = {node_expr(nodes[i], var, owner)}")
        done.add(i)

    def names(ids: list[int]) -> str:
        return "".join(f"n{i}, " for i in ids)

    top = [f"def forward_program(self, inputs, state, new_state, writes):  # graph {name!r}"]
    top += [f"    n{n.id} = {node_expr(n, var)}" for n in nodes if n.op == "input"]
    top_done = {n.id for n in nodes if n.op == "input"}
    programs: dict[str, list[str]] = {}
    j = 0
    while j < len(order):
        g = group[order[j]]
        run = [order[j]]
        while j + len(run) < len(order) and group[order[j + len(run)]] == g:
            run.append(order[j + len(run)])
        j += len(run)
        inside = set(run)
        ins = sorted({a for i in run for a in nodes[i].args if a in group and a not in inside})
        outs = [i for i in run if i in returned or users.get(i, set()) - inside]
        part = len(programs.setdefault(g, []))
        where = f"layer {g!r}" if g else f"top level, part {part}"
        lines = [f"def layer_program(self, args, state, writes):  # {where} of graph {name!r}"]
        if ins:
            lines.append(f"    {names(ins)}= args")
        lines.append("    new_state = {}")
        done: set[int] = set()
        for i in run:
            emit(lines, i, "self", done)
        lines.append(f"    return ({names(outs)}), new_state")
        programs[g].append("\n".join(lines) + "\n")
        call = f"self.layers[{g!r}]" if g else "self.top"
        top.append(f"    _layer = {call}")
        extra = f", {part}" if not g else ""
        top.append(f"    ({names(outs)}), _new = _layer.run(({names(ins)}), state, writes{extra})")
        top.append("    new_state.update(_new)")
        top_done.update(outs)
    for i in outputs.values():
        if i not in top_done:  # an output that is a constant
            emit(top, i, "self.top", top_done)
    out = ", ".join(f"{k!r}: n{v}" for k, v in outputs.items())
    top.append(f"    return {{{out}}}")
    return "\n".join(top) + "\n", programs
