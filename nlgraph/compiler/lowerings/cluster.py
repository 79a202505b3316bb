"""Memories that read themselves or each other inside their updates, run jointly (PAPER.md 4.5).

Self-modifying Titans makes every memory generate its own values (``hat v = M(v)``), its keys
(``k = M_k(x)``) and its rates (``eta = M_eta(x)``). All those reads use each memory's state at
the end of its previous chunk (the causal reading of Eq. 90), so within a chunk every key,
value, rate and gradient is computed in parallel; only the state recurrence is sequential.

Per memory and per layer ``W`` with input ``x`` and output error ``delta`` (both at the
chunk-start state), the inner step is DGD with retention (Eq. 88; per layer as PAPER.md 3.1):

    W_t = W_{t-1} (alpha_t I - b_t x_t x_t^T) - lr'_t delta_t x_t^T        (+ momentum)

with ``lr' = lr / (1 + lr ||x||^2)`` for exact DGD (``lr`` otherwise) and ``b = lr'`` (DGD) or
``0`` (plain GD). Without momentum that is exactly the gated delta recurrence of
:mod:`nlgraph.kernels.linear_memory` (keys ``x``, values ``-delta``), which runs it chunk-parallel;
with momentum ``S_t = mu_t S_{t-1} - lr'_t delta_t x_t^T, W_t = W_{t-1}(alpha I - b x x^T) + S_t``
is the same form extended by the momentum buffer (:mod:`nlgraph.kernels.momentum_memory`): one
small triangular solve per window, no per-token weight matrices.

The sequence is processed in windows cut at every member's chunk boundary (one token with the
reference backend); a memory's visible state advances when its own chunk ends.

A member whose rule or schedule has no such form (a rule chain, Nesterov momentum, an update
every n tokens or chunks; lowering ``reference_loop``) runs inside the same windows as the
reference loop's token recurrence (:mod:`nlgraph.compiler.lowerings.reference_loop`): token ``t``'s
gradient of each layer, ``delta_t x_t^T`` at the visible state, is added to the pending sum,
and the rule chain is applied to the sum at the member's update ticks. Its gradients are all at
the visible state, so its update ticks need no window cut of their own; its state carries the
pending sum and the rules' buffers across windows and segments.

A source on a stop_grad edge into a member is detached where that member reads it, in the
window program too (``detach`` nodes).

A member read ``at="new"`` (Titans-style read-after: token ``t``'s read sees the state right
after token ``t``'s update, a ``running`` node of the window program) makes the cluster run one
token per window, a token loop: each window evaluates what its members' updates need, runs the
updates, then the reads at="new" on the running states. The members' gradients and reads
at="prev" keep the visible (chunk-start) state. A member whose keys, values or rates read
another at="new" updates after it within the token (``ClusterCfg.stages``, Def. 2).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from nlgraph._errors import CompileError
from nlgraph._resolve import resolve
from nlgraph.compiler import ir
from nlgraph.compiler.lowerings._backend import backend_for
from nlgraph.compiler.lowerings._owner import MemoryOwner
from nlgraph.compiler.lowerings._scalars import gate
from nlgraph.compiler.lowerings._state import (
    at_cut,
    call_fast,
    detach_state,
    heads,
    truncation_segments,
)
from nlgraph.compiler.lowerings.boundary import cut_points
from nlgraph.compiler.lowerings.mlp import act_grad, mlp_forward
from nlgraph.compiler.lowerings.reference_loop import accumulate, rule_scalars
from nlgraph.compiler.ops import BINARY, UNARY
from nlgraph.compiler.program import key
from nlgraph.kernels import _dispatch
from nlgraph.kernels.linear_memory import linear_memory
from nlgraph.kernels.momentum_memory import momentum_memory

__all__ = ["Cluster", "run_cluster"]


class _Member:
    def __init__(self, owner: MemoryOwner, prev: Any, B: int) -> None:
        self.owner = owner
        self.cfg = cfg = owner.cfg
        self.chunk = cfg.chunk
        if prev is None:
            ws = [owner.initial_weight(f"W{cfg.depth - i}") for i in range(cfg.depth)]
            ws = [w.unsqueeze(0).expand(B, *w.shape) if w.dim() == 3 else w for w in ws]
            plain = self.loop or isinstance(cfg.rule.momentum, ir.NoScalar)
            mom = None if plain else [torch.zeros_like(w) for w in ws]
            prev = {"visible": ws, "running": list(ws), "momentum": mom, "phase": 0}
            if self.loop:  # the reference loop's pending gradient sum and rule buffers
                prev.update(acc=None, buffers={})
        self.state = dict(prev)
        # First-order updates (stop_grad on the member's own recurrence) run without a graph;
        # every state they reach is read as the call's starting state plus a constant.
        # (Without grad mode, as in a grad-free cluster, there is no gradient to route.)
        self.origin = None
        if cfg.first_order and torch.is_grad_enabled():  # o - sg(o): zero, the gradient of o
            self.origin = [o - o.detach() for o in prev["visible"]]
        # The visible weights are the running ones without the origin term (first-order, after
        # the member's first chunk end in the call): it is added where they are read, once per
        # group of reads, and to the state the call leaves (finish).
        self.raw = False
        self.group_zeros: dict[tuple, list[torch.Tensor]] = {}  # origins of this member's group

    def visible(self) -> list[torch.Tensor]:
        """The visible weights as the outer gradient sees them."""
        return self.seen(self.state["visible"]) if self.raw else self.state["visible"]

    def finish(self) -> dict:
        """The member's state after the call."""
        if self.raw:
            self.state, self.raw = {**self.state, "visible": self.visible()}, False
        return self.state

    def seen(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """``weights`` as the outer gradient sees them: as they are, or, for a first-order
        member, ``origin + sg(weights - origin)`` (the value of ``weights``, the gradient of
        ``origin``)."""
        if self.origin is None:
            return weights
        return [w + z for w, z in zip(weights, self.origin, strict=True)]

    @property
    def loop(self) -> bool:
        """Whether the member runs as a token loop of its rule chain (no cluster lowering)."""
        return isinstance(self.cfg, ir.ReferenceLoopConfig)


def run_cluster(
    owners: dict[str, MemoryOwner], c: Any, window_inputs: tuple, state: dict, new_state: dict,
    writes: bool, slow: Any, backend: str,
) -> dict:  # fmt: skip
    """Run the cluster ``c`` (a :class:`~nlgraph.compiler.program.ClusterCfg`) over the
    sequence; returns each member's read-outs (in read order) and writes its final state.
    ``owners``: each member's parameters by level name; ``slow``: the learner's slow modules
    (by key) that sit between members; ``writes=False``: every read at the state it starts
    from, in one window, no update."""
    B, T = window_inputs[0].shape[0], window_inputs[0].shape[1]
    members = {n: _Member(owners[n], state.get(n), B) for n in c.members}
    # Windows end at every member's chunk boundary (phases carry over from earlier segments),
    # or at every token with the reference backend or reads at="new".
    backend = backend_for(backend)
    groups = _read_groups(c, members)
    if not writes:  # read-only: every read at the state it starts from, one window
        vals = [_LATER] * len(c.nodes)
        _window(slow, c, members, groups, window_inputs, vals, {}, set(c.names))
        for n, mem in members.items():
            new_state[n] = mem.state
        return {n: tuple(vals[node] for node in c.reads[n]) for n in c.names}
    cuts = cut_points(
        T,
        {n: m.chunk for n, m in members.items()},
        {n: m.state["phase"] for n, m in members.items()},
        backend == "reference" or bool(c.read_new),
    )
    pieces: dict[str, list[list[torch.Tensor]]] = {n: [[] for _ in c.reads[n]] for n in c.names}
    # split once, not a slice per window: the backward of each slice would be a zero-filled
    # tensor of the whole sequence
    bounds = list(zip([0, *cuts[:-1]], cuts, strict=True))
    splits = [a.split([e - s for s, e in bounds], 1) for a in window_inputs]
    for w, (s, e) in enumerate(bounds):
        window = tuple(parts[w] for parts in splits)
        # Stage by stage (Def. 2): the window program's nodes that are ready, then the updates
        # of the stage's members; the reads at="new" last, on the running states.
        vals, done, ready = [_LATER] * len(c.nodes), {}, set()
        for stage in c.stages or [c.names]:
            _window(slow, c, members, groups, window, vals, done, ready)
            _update_all({n: members[n] for n in stage}, c, vals, backend, e - s)
            ready.update(stage)
        if c.read_new:  # the reads at="new", now that every member has updated
            _window(slow, c, members, groups, window, vals, done, ready)
        for n in c.names:
            for slot, node in enumerate(c.reads[n]):
                pieces[n][slot].append(vals[node])
        for mem in members.values():
            if mem.state["phase"] % mem.chunk == 0:
                mem.state["visible"], mem.raw = mem.state["running"], mem.origin is not None
    for n, mem in members.items():
        new_state[n] = mem.finish()
    return {n: tuple(torch.cat(p, dim=1) for p in pieces[n]) for n in c.names}


def _joined(ts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(ts, dim)``, or, where ``ts`` are the consecutive parts along ``dim`` of one
    tensor's view (a group's weights split per member after its update), that view: no copy
    of the state each window. Views of a parameter (a call's initial weights) are copied as
    before: a sharded learner frees its parameters' storage between the forward and the
    backward."""
    base = ts[0]._base
    if base is None or (base.is_leaf and base.requires_grad):
        return ts[0] if len(ts) == 1 and base is None else torch.cat(ts, dim)
    shape = list(ts[0].shape)
    shape[dim] = sum(t.shape[dim] for t in ts)
    if not base.is_contiguous() or base.numel() != math.prod(shape):
        return torch.cat(ts, dim)
    whole, offset = base.view(shape), base.storage_offset()
    for t in ts:
        part = whole.narrow(dim, 0, t.shape[dim])  # the shape and strides t must have
        same = t._base is base and t.shape == part.shape and t.stride() == part.stride()
        if not same or t.storage_offset() != offset:
            return torch.cat(ts, dim)
        offset += t.shape[dim] * whole.stride(dim)
    return whole


def _read_groups(c: Any, members: dict) -> dict[int, list[int]]:
    """Reads of the window program that can run as one MLP call: members of the same shape
    (heads, layer widths, activation, residual) reading the same input node. Maps the first
    read's node index to all of them (self-modifying Titans reads M_k, M_v, M_eta, M_alpha all
    from the same input)."""
    by_key: dict[tuple, list[int]] = {}
    for i, n in enumerate(c.nodes):
        if n.op != "visible":
            continue
        cfg = members[n.attrs[0]].cfg
        shapes = tuple(tuple(w.shape[1:]) for w in members[n.attrs[0]].state["visible"])
        sig = (n.args[0], n.attrs[1], cfg.heads, cfg.activation, cfg.residual, shapes)
        by_key.setdefault(sig, []).append(i)
    return {idx[0]: idx for idx in by_key.values()}


_LATER = object()  # a window node not evaluated yet


def _window(
    slow: Any, c: Any, members: dict, groups: dict, window: tuple, vals: list, done: dict,
    ready: set,
) -> None:  # fmt: skip
    """The window program on one window's inputs ``window``, into ``vals`` (``_LATER`` where
    not evaluated yet): a read at="prev" at the member's visible state, a read at="new"
    (``running``) at its running state once its update of this window has run (``ready``); a
    node that needs a member not ready stays ``_LATER`` for the next call. ``groups``:
    :func:`_read_groups`, the same for every window of a call; ``done``: the group reads
    computed ahead."""
    for i, n in enumerate(c.nodes):
        if vals[i] is not _LATER:
            continue
        a = [vals[j] for j in n.args]
        if any(v is _LATER for v in a) or (n.op == "running" and n.attrs[0] not in ready):
            continue
        op = n.op
        if op == "window_input":
            v = window[n.attrs[0]]
        elif op == "const":
            v = n.attrs[0]
        elif op == "visible" and i in done:
            v = done.pop(i)
        elif op == "visible":
            # every read of this group at once: the members' heads stacked along the head axis
            group = [members[c.nodes[j].attrs[0]] for j in groups[i]]
            cfg = group[0].cfg
            x = heads(a[0], cfg.heads, n.attrs[1])
            ws = _group_weights(group)
            xs = x if len(group) == 1 else torch.cat([x] * len(group), dim=2)
            y, _, _ = mlp_forward(ws, xs, cfg.activation, cfg.residual)
            for j, yj in zip(groups[i], y.split(cfg.heads, dim=2), strict=True):
                done[j] = yj.reshape(*yj.shape[:2], -1)
            v = done.pop(i)
        elif op == "running":  # the state after the token's update (one-token windows)
            mem = members[n.attrs[0]]
            z = heads(a[0], mem.cfg.heads, n.attrs[1])
            y, _, _ = mlp_forward(mem.seen(mem.state["running"]), z, mem.cfg.activation,
                                  mem.cfg.residual)  # fmt: skip
            v = y.reshape(*y.shape[:2], -1)
        elif op == "slow":
            v = slow[key(n.attrs[0])](a[0])
        elif op == "normalize":
            v = F.normalize(a[0], dim=-1)
        elif op == "detach":  # a source on a stop_grad edge into the member that reads it
            v = a[0].detach()
        elif op == "unary":
            v = -a[0] if n.attrs[0] == "neg" else UNARY[n.attrs[0]](a[0])
        elif op == "binary":
            v = BINARY[n.attrs[0]](a[0], a[1])
        else:  # pragma: no cover - the window builder emits only the ops above
            raise CompileError(f"window op {op!r}")
        vals[i] = v


def _group_weights(group: list[_Member]) -> list[torch.Tensor]:
    """The visible weights of a group of members, per layer, their heads stacked: one tensor
    per layer, with the members' origin terms added once (first-order members)."""

    def stacked(per_member: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        return [_joined(list(layer), 1) for layer in zip(*per_member, strict=True)]

    if not any(m.raw for m in group):
        return stacked([m.state["visible"] for m in group])
    if not all(m.raw for m in group):
        return stacked([m.visible() for m in group])
    key = tuple(id(m) for m in group)
    zeros = group[0].group_zeros.get(key)
    if zeros is None:  # the same for every window of the call
        zeros = stacked([m.origin for m in group])
        group[0].group_zeros[key] = zeros
    ws = stacked([m.state["visible"] for m in group])
    return [w + z for w, z in zip(ws, zeros, strict=True)]


def output_error(cfg: Any, out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``d objective / d output`` per token: ``out - v`` (l2), ``-v`` (dot),
    ``sign(out - v) |out - v|^(p-1)`` (lp), or autograd of a custom objective."""
    obj = cfg.objective
    if obj.kind == "l2":
        return out - v
    if obj.kind == "dot":
        return -v
    if obj.kind == "lp":
        r = out - v
        return torch.sign(r) * r.abs() ** (obj.p - 1)
    fn = resolve(obj.path)
    with torch.enable_grad():
        o = out if out.requires_grad else out.detach().requires_grad_()
        (g,) = torch.autograd.grad(fn(o, v).sum(), o, create_graph=torch.is_grad_enabled())
    return g


def _layer_errors(mem: _Member, args: tuple) -> tuple[torch.Tensor, list, list]:
    """The member's keys ``[B, C, H, dk]`` and, per layer, its inputs ``x`` and output errors
    ``delta`` (``d objective / d layer output``) at the visible (chunk-start) state: token
    ``t``'s gradient of layer ``i`` is ``delta_i[t] x_i[t]^T``."""
    cfg = mem.cfg
    H = cfg.heads
    k, v = heads(args[0], H, cfg.key_norm), heads(args[1], H, cfg.value_norm)
    visible = mem.state["visible"]
    out, inputs, pre = mlp_forward(visible, k, cfg.activation, cfg.residual)
    deltas = [output_error(cfg, out, v)]
    for i in range(len(visible) - 1, 0, -1):  # backprop to every layer's output
        up = torch.einsum("bhoi,bcho->bchi", visible[i], deltas[0])
        deltas.insert(0, up * act_grad(cfg.activation, pre[i - 1]))
    return k, inputs, deltas


def _token_loop(mem: _Member, args: tuple, n: int) -> None:
    """One window of a member without a cluster lowering (a rule chain, Nesterov momentum, an
    update every n tokens or chunks): the reference loop's token recurrence, with each token's
    gradient ``delta x^T`` at the visible state summed into the pending sum, and the rule chain
    applied to it at each update tick of the member's frequency (``reference_loop.accumulate``)."""
    cfg, st = mem.cfg, mem.state
    k, inputs, deltas = _layer_errors(mem, args)
    scalars = [rule_scalars(mem.owner, cfg, r, args, k) for r in cfg.rules]
    running, acc, bufs, t0 = list(st["running"]), st["acc"], st["buffers"], st["phase"]
    for t in range(n):
        g = [torch.einsum("bho,bhi->bhoi", d[:, t], x[:, t]) for x, d in
             zip(inputs, deltas, strict=True)]  # fmt: skip
        xs = [x[:, t : t + 1] for x in inputs]
        running, acc, bufs = accumulate(cfg, running, acc, bufs, scalars, g, xs, t, t0 + t + 1)
    mem.state = {**st, "running": running, "acc": acc, "buffers": bufs, "phase": t0 + n}


def _jobs(mem: _Member, args: tuple) -> list[dict]:
    """One window of the member's inner optimizer as one job per layer: its inputs ``x`` and
    errors ``delta`` at the chunk-start state, its gates, and its running weights."""
    cfg, rule = mem.cfg, mem.cfg.rule
    k, inputs, deltas = _layer_errors(mem, args)
    scalars = mem.owner.scalars
    lr = gate(scalars, cfg, rule.lr, "lr", args, k)
    retain = gate(scalars, cfg, rule.retain, "retain", args, k)
    mu = gate(scalars, cfg, rule.momentum, "momentum", args, k)
    is_dgd = isinstance(rule, ir.DGDStep)
    jobs = []
    for i, (x, d) in enumerate(zip(inputs, deltas, strict=True)):
        step = lr / (1.0 + lr * (x * x).sum(-1)) if is_dgd and rule.exact else lr
        momentum = mem.state["momentum"]
        # a dampened momentum writes (1 - mu) of each gradient term into its buffer
        grad_step = step * (1.0 - mu) if is_dgd and rule.dampen and mu is not None else step
        jobs.append({
            "mem": mem, "layer": i, "x": x, "d": d, "step": step, "grad_step": grad_step,
            "decay": step if is_dgd else None,
            "retain": retain, "mu": mu, "w": mem.state["running"][i],
            "s": None if momentum is None else momentum[i],
        })  # fmt: skip
    return jobs


def _run_jobs(jobs: list[dict], backend: str) -> None:
    """Run the layer recurrences of a window, batched: jobs of the same shape and gates are
    stacked along the head axis, so one kernel call serves them all."""
    groups: dict[tuple, list[dict]] = {}
    for j in jobs:
        sig = (j["x"].shape[-1], j["d"].shape[-1], j["mu"] is None, j["decay"] is None,
               j["retain"] is None)  # fmt: skip
        groups.setdefault(sig, []).append(j)
    for group in groups.values():

        def cat(name: str, dim: int, group: list[dict] = group) -> torch.Tensor:
            return torch.cat([j[name] for j in group], dim=dim)

        sizes = [j["x"].shape[2] for j in group]
        x, d, step = cat("x", 2), cat("d", 2), cat("step", 2)
        w = _joined([j["w"] for j in group], 1)
        decay = None if group[0]["decay"] is None else cat("decay", 2)
        retain = None if group[0]["retain"] is None else cat("retain", 2)
        if group[0]["mu"] is None:
            _, w = linear_memory(
                x, x, -d, retain, decay, step, initial_state=w, read="after",
                chunk_size=max(1, x.shape[1]), backend=_dispatch.for_op("linear_memory", backend),
            )  # fmt: skip
            s_buf = None
        else:
            w, s_buf = momentum_memory(
                x, -cat("grad_step", 2)[..., None] * d, decay, retain, cat("mu", 2), w,
                _joined([j["s"] for j in group], 1),
                backend=_dispatch.for_op("momentum_memory", backend),
            )  # fmt: skip
        for j, w_j, s_j in zip(group, w.split(sizes, dim=1),
                               [None] * len(group) if s_buf is None else s_buf.split(sizes, dim=1),
                               strict=True):  # fmt: skip
            j["w_new"], j["s_new"] = w_j, s_j


def _update_all(members: dict, c: Any, vals: list, backend: str, n: int) -> None:
    """One window's updates of every member (``n`` tokens): the kernel members' layer
    recurrences batched, the token loops of members without a cluster lowering one by one.
    First-order members update without an autograd graph, batched among themselves."""
    for first_order in (False, True):
        group = {k: m for k, m in members.items() if m.cfg.first_order == first_order}
        if group:
            with torch.no_grad() if first_order else contextlib.nullcontext():
                _update_group(group, c, vals, backend, n)


def _update_group(members: dict, c: Any, vals: list, backend: str, n: int) -> None:
    jobs = []
    for name, mem in members.items():
        args = tuple(vals[i] for i in c.member_args[name])
        if mem.loop:
            _token_loop(mem, args, n)
        else:
            jobs.extend(_jobs(mem, args))
    _run_jobs(jobs, backend)
    for mem in (m for m in members.values() if not m.loop):
        mine = sorted((j for j in jobs if j["mem"] is mem), key=lambda j: j["layer"])
        momentum = None if mem.state["momentum"] is None else [j["s_new"] for j in mine]
        mem.state = {**mem.state, "running": [j["w_new"] for j in mine], "momentum": momentum,
                     "phase": mem.state["phase"] + n}  # fmt: skip


class Cluster(nn.Module):
    """The ``cluster`` lowering of memories that read each other inside their updates: owns
    every member's parameters (``members``, by level key) and runs the window program ``c``
    (a :class:`~nlgraph.compiler.program.ClusterCfg`)."""

    def __init__(self, c: Any, members: dict[str, MemoryOwner]) -> None:
        super().__init__()
        self.c = c
        self.backend = "auto"
        self.members = nn.ModuleDict({key(n): m for n, m in members.items()})
        self.replay: Any = None  # set during a teach-signal call (lowerings.teach.Replay)

    def forward(self, inputs: tuple, state: dict, new_state: dict, writes: bool, slow: Any) -> dict:
        """Each member's read-outs over the sequence (``inputs``: the window program's inputs
        over the whole sequence); the members' final states go to ``new_state``.

        A member with truncated(k) edges has its carried state detached every ``k`` of its
        chunks counted from the start of the sequence (its state carries the token count,
        ``"tokens"``): the sequence runs as segments cut there, which equal one pass, and a
        sequence run in segments detaches at the same tokens."""
        dtype = next((m.state_dtype() for m in self.members.values()), None)

        # nothing a grad-free cluster computes reaches the outer gradient (ClusterCfg.grad_free)
        def run(a: tuple) -> dict:
            return self._forward(a, state, new_state, writes, slow)

        with torch.no_grad() if self.c.grad_free else contextlib.nullcontext():
            return call_fast(self, self.c.names, inputs, state, new_state, dtype, run)

    def _forward(
        self, inputs: tuple, state: dict, new_state: dict, writes: bool, slow: Any
    ) -> dict:
        c = self.c
        owners = {n: self.members[key(n)] for n in c.names}
        every = {n: m.truncate for n, m in c.members.items() if m.truncate is not None}
        if not every or not writes:
            return run_cluster(owners, c, inputs, state, new_state, writes, slow, self.backend)
        T = inputs[0].shape[1]
        seen = {n: (state.get(n) or {}).get("tokens", 0) for n in every}
        pieces: list[dict] = []
        carried = {n: state.get(n) for n in c.names}
        for s, e in truncation_segments(T, [(seen[n], k) for n, k in every.items()]):
            for n, k in every.items():
                if carried[n] is not None and at_cut(seen[n] + s, k):
                    carried[n] = detach_state(carried[n])
            out_state: dict[str, Any] = {}
            window = tuple(a[:, s:e] for a in inputs)
            pieces.append(run_cluster(owners, c, window, carried, out_state, writes, slow,
                                      self.backend))  # fmt: skip
            carried = {n: out_state[n] for n in c.names}
        for n in every:
            carried[n] = {**carried[n], "tokens": seen[n] + T}
        new_state.update(carried)
        return {
            n: tuple(torch.cat([p[n][i] for p in pieces], dim=1) for i in range(len(pieces[0][n])))
            for n in c.names
        }
