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
runs token by token inside the chunk.

The sequence is processed in windows of ``gcd`` of the members' chunk sizes (one token with the
reference backend); a memory's visible state advances when its own chunk ends.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.nn import functional as F

from nlgraph._errors import CompileError
from nlgraph.compiler.boundary import cut_points
from nlgraph.compiler.modules import ACT
from nlgraph.compiler.plan import memory_reads
from nlgraph.flows import FlowBase, Read, Unary, references
from nlgraph.level import Level
from nlgraph.optimizers import DGD, Learned, Signal

__all__ = ["run_cluster", "mlp_forward"]

_SIGNAL = {"identity": lambda x: x, "sigmoid": torch.sigmoid, "softplus": F.softplus,
           "exp": torch.exp}  # fmt: skip


def _act_grad(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "tanh":
        return 1 - torch.tanh(z) ** 2
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if name == "gelu":
        return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(
            2 * math.pi
        )
    return torch.ones_like(z)


def mlp_forward(ws: list[torch.Tensor], x: torch.Tensor, act: str, residual: bool):
    """Per-(batch, head) MLP: ``ws`` in application order, each ``[B, H, out, in]``; ``x``
    ``[B, C, H, in]``. Returns the output and the per-layer inputs and pre-activations."""
    h, inputs, pre = x, [], []
    for i, w in enumerate(ws):
        inputs.append(h)
        z = torch.einsum("bhoi,bchi->bcho", w, h)
        pre.append(z)
        h = ACT[act](z) if i < len(ws) - 1 else z
    return (x + h if residual else h), inputs, pre


class _Member:
    def __init__(self, lv: Level, learner: Any, run: Any) -> None:
        self.lv = lv
        st = lv.state
        self.depth = 1 if st.kind == "linear" else st.depth
        self.act = getattr(st, "activation", "identity")
        self.residual = getattr(st, "residual", False)
        self.rule = lv.optimizer[0]
        self.chunk = learner.plan.levels[lv.name].chunk
        self.heads = lv.heads
        prev = run.state.get(lv.name)
        if prev is None:
            ws = [learner._initial(lv, f"W{self.depth - i}") for i in range(self.depth)]
            ws = [w.unsqueeze(0).expand(run.B, *w.shape) if w.dim() == 3 else w for w in ws]
            mom = None
            if self.rule.momentum is not None:
                mom = [torch.zeros_like(w) for w in ws]
            prev = {"visible": ws, "running": list(ws), "momentum": mom, "phase": 0}
        self.state = dict(prev)


def run_cluster(run: Any, names: list[str]) -> None:
    """Run the memories ``names`` jointly over the whole sequence of ``run`` (a forward pass)."""
    learner, spec = run.m, run.m.spec
    members = {n: _Member(spec.level(n), learner, run) for n in names}
    for n, mem in members.items():
        for r in memory_reads(spec, n):
            if r.at != "prev":
                raise CompileError(
                    f"level {n!r} is read after its update (at='new') but runs in a recurrent "
                    "cluster, whose reads see the chunk-start state; read it at='prev'"
                )
        if not isinstance(mem.lv.context, type(None)) and mem.lv.objective.kind not in (
            "l2",
            "dot",
        ):
            raise CompileError(f"level {n!r}: objective {mem.lv.objective.kind!r} in a cluster")
    reads = {n: memory_reads(spec, n) for n in names}
    # Windows end at every member's chunk boundary (phases carry over from earlier segments),
    # or at every token with the reference backend.
    every_token = run.backend_name() == "reference"
    cuts = cut_points(
        run.T,
        {n: m.chunk for n, m in members.items()},
        {n: m.state["phase"] for n, m in members.items()},
        every_token,
    )
    pieces: dict[str, dict[Read, list[torch.Tensor]]] = {
        n: {r: [] for r in reads[n]} for n in names
    }
    depends = _Depends(spec, set(names))
    for s, e in zip([0, *cuts[:-1]], cuts, strict=True):
        win = _Window(run, members, depends, s, e)
        for n in names:
            for r in reads[n]:
                pieces[n][r].append(win.eval(r))
        for mem in members.values():
            _update(win, mem, run.backend_name())
        for mem in members.values():
            if mem.state["phase"] % mem.chunk == 0:
                mem.state["visible"] = list(mem.state["running"])
    for n, mem in members.items():
        run.reads[n] = {r: torch.cat(p, dim=1) for r, p in pieces[n].items()}
        run.new_state[n] = mem.state


class _Depends:
    """Which flows read a cluster member (those are evaluated window by window)."""

    def __init__(self, spec: Any, names: set[str]) -> None:
        self.spec, self.names, self.memo = spec, names, {}

    def __call__(self, flow: FlowBase) -> bool:
        hit = self.memo.get(flow)
        if hit is None:
            hit = self.memo[flow] = any(
                k in ("read", "state") and r in self.names
                for k, r, _ in references(flow, self.spec.flows)
            )
        return hit


class _Window:
    """Evaluates flows on tokens ``s..e-1`` with every member read at its visible state."""

    def __init__(self, run: Any, members: dict, depends: _Depends, s: int, e: int) -> None:
        self.run, self.members, self.depends, self.s, self.e = run, members, depends, s, e
        self.cache: dict[FlowBase, torch.Tensor] = {}

    def eval(self, flow: FlowBase) -> torch.Tensor:
        if not self.depends(flow):
            return self.run.eval(flow)[:, self.s : self.e]
        hit = self.cache.get(flow)
        if hit is None:
            hit = self.cache[flow] = self._eval(flow)
        return hit

    def _eval(self, flow: FlowBase) -> torch.Tensor:
        op = flow.op
        if op == "read" and flow.level in self.members:
            mem = self.members[flow.level]
            x = self.heads(flow.arg, mem.heads)
            y, _, _ = mlp_forward(mem.state["visible"], x, mem.act, mem.residual)
            return y.reshape(*y.shape[:2], -1)
        if op == "read":
            lp = self.run.m.plan.levels[flow.level]
            if lp.role != "slow" or lp.lowering != "parameter":
                raise CompileError(
                    f"{flow.level!r} ({lp.lowering}) reads a recurrent cluster's output inside "
                    "the cluster; only slow modules can sit between cluster memories"
                )
            from nlgraph.compiler.runtime import _key

            mod = self.run.m.slow[_key(flow.level)]
            from nlgraph.compiler.modules import CausalConv

            if isinstance(mod, CausalConv):
                raise CompileError(f"the convolution {flow.level!r} cannot read a cluster output")
            return mod(self.eval(flow.arg))
        if op == "ref":
            return self.eval(self.run.m.spec.flows[flow.name])
        if op == "unary":
            x = self.eval(flow.x)
            return F.normalize(x, dim=-1) if flow.fn == "normalize" else _unary(flow.fn, x)
        if op == "binary":
            from nlgraph.compiler.runtime import _BINARY

            return _BINARY[flow.fn](self.eval(flow.a), self.eval(flow.b))
        raise CompileError(f"flow {flow} cannot be evaluated inside a recurrent cluster")

    def heads(self, flow: FlowBase, H: int) -> torch.Tensor:
        """``[B, C, H * D] -> [B, C, H, D]``; a normalised key/query is normalised per head."""
        if isinstance(flow, Unary) and flow.fn == "normalize":
            x = self.eval(flow.x)
            return F.normalize(x.reshape(*x.shape[:2], H, -1), dim=-1)
        x = self.eval(flow)
        return x.reshape(*x.shape[:2], H, -1)

    def gate(self, lv: Level, name: str, value: Any, H: int) -> torch.Tensor | None:
        if value is None:
            return None
        B, C = self.run.B, self.e - self.s
        if isinstance(value, int | float):
            return torch.full((B, C, H), float(value), dtype=self.run._dtype())
        if isinstance(value, Learned):
            return self.run._scalar(lv, name, value, H)[:, self.s : self.e]
        if isinstance(value, Signal):
            x = _SIGNAL[value.act](self.eval(value.flow)) * value.scale
            if x.shape[-1] not in (1, H):
                raise CompileError(f"level {lv.name!r}: the {name} signal has width {x.shape[-1]}")
            return x.expand(B, C, H)
        raise CompileError(f"level {lv.name!r}: unsupported scalar {value!r}")


def _unary(fn: str, x: torch.Tensor) -> torch.Tensor:
    from nlgraph.compiler.runtime import _UNARY

    return _UNARY[fn](x)


def _update(win: _Window, mem: _Member, backend: str) -> None:
    """One window of the member's inner optimizer, from its running state."""
    lv, rule, H = mem.lv, mem.rule, mem.heads
    ctx = lv.context
    k, v = win.heads(ctx.key, H), win.heads(ctx.value, H)
    lr = win.gate(lv, "lr", rule.lr, H)
    retain = win.gate(lv, "retain", rule.retain, H)
    mu = win.gate(lv, "momentum", rule.momentum, H)
    visible = mem.state["visible"]
    out, inputs, pre = mlp_forward(visible, k, mem.act, mem.residual)
    delta = out - v if lv.objective.kind == "l2" else -v  # d objective / d output
    deltas = [delta]
    for i in range(len(visible) - 1, 0, -1):  # backprop to every layer's output
        up = torch.einsum("bhoi,bcho->bchi", visible[i], deltas[0])
        deltas.insert(0, up * _act_grad(mem.act, pre[i - 1]))
    is_dgd = isinstance(rule, DGD)
    running = list(mem.state["running"])
    momentum = mem.state["momentum"]
    for i, (x, d) in enumerate(zip(inputs, deltas, strict=True)):
        step = lr / (1.0 + lr * (x * x).sum(-1)) if is_dgd and rule.exact else lr
        decay = step if is_dgd else None
        if momentum is None:
            from nlgraph.kernels.linear_memory import linear_memory

            _, running[i] = linear_memory(
                x, x, -d, retain, decay, step, initial_state=running[i], read="after",
                chunk_size=max(1, x.shape[1]), backend=backend,
            )  # fmt: skip
        else:
            s_buf = momentum[i]
            for t in range(x.shape[1]):  # token by token: the momentum makes it non-rank-1
                xt, w_prev = x[:, t], running[i]
                g = torch.einsum("bho,bhi->bhoi", d[:, t], xt)
                s_buf = mu[:, t, :, None, None] * s_buf - step[:, t, :, None, None] * g
                a = 1.0 if retain is None else retain[:, t, :, None, None]
                w = a * w_prev + s_buf
                if decay is not None:
                    wx = torch.einsum("bhoi,bhi->bho", w_prev, xt)
                    w = w - decay[:, t, :, None, None] * torch.einsum("bho,bhi->bhoi", wx, xt)
                running[i] = w
            momentum = list(momentum)
            momentum[i] = s_buf
    mem.state = {**mem.state, "running": running, "momentum": momentum,
                 "phase": mem.state["phase"] + (win.e - win.s)}  # fmt: skip
