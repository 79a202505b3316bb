"""The compiled learner: an ``nn.Module`` that runs a planned graph over whole sequences.

Slow levels are modules read in parallel over all tokens; each fast memory runs as one kernel
call (:mod:`nlgraph.kernels`) over the sequence. Fast state is explicit: ``forward`` takes the
state a previous segment returned (or ``None``: every memory starts from its initial state, the
per-sequence reset) and returns the new one, so k segments with carried state equal one pass.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from nlgraph._errors import CompileError
from nlgraph.compiler import boundary
from nlgraph.compiler.modules import ACT, CausalConv, build_slow, dim
from nlgraph.compiler.plan import Plan, memory_reads
from nlgraph.flows import KV, FlowBase, Read, Unary
from nlgraph.level import Level
from nlgraph.optimizers import DGD, Learned, Signal

__all__ = ["CompiledLearner", "STATE_VERSION"]

STATE_VERSION = 1
_SIGNAL_ACT = {
    "identity": lambda x: x, "sigmoid": torch.sigmoid, "softplus": F.softplus, "exp": torch.exp,
}  # fmt: skip


def _key(name: str) -> str:
    return name.replace(".", "__")


class CompiledLearner(nn.Module):
    """A graph of levels compiled into a runnable, differentiable learner.

    ``forward(inputs, state=None) -> (outputs, state)``: ``inputs`` maps input names to
    ``[B, T, D]`` tensors (or is one tensor when the graph has one input); ``outputs`` maps the
    graph's output names to ``[B, T, D]`` tensors; ``state`` maps each fast level to its state.
    """

    def __init__(self, plan: Plan, backend: str = "auto") -> None:
        super().__init__()
        self.plan = plan
        self.spec = plan.spec
        self.backend = backend
        self.slow = nn.ModuleDict()
        self.blocks = nn.ModuleDict()  # initial parameters of chunk-updated blocks (CMS)
        self.meta = nn.ParameterDict()
        self.scalars = nn.ParameterDict()
        self._fixed: dict[str, torch.Tensor] = {}
        for name in plan.order:
            lv = self.spec.level(name)
            if plan.levels[name].role == "slow":
                self.slow[_key(name)] = build_slow(lv, plan.dims)
            else:
                self._build_fast(lv)

    # ------------------------------------------------------------------------------ building
    def _heads(self, lv: Level) -> tuple[int, int, int]:
        where = f"level {lv.name!r}"
        st = lv.state
        if st.kind == "nonparametric":
            return lv.heads, 0, 0
        d_in, d_out = dim(st.d_in, self.plan.dims, where), dim(st.d_out, self.plan.dims, where)
        if d_in % lv.heads or d_out % lv.heads:
            raise CompileError(f"{where}: widths {d_in}, {d_out} not divisible by {lv.heads} heads")
        return lv.heads, d_in // lv.heads, d_out // lv.heads

    def _init_tensor(self, lv: Level, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        if lv.init.kind == "zeros":
            return torch.zeros(shape)
        if lv.init.kind == "identity":
            eye = torch.eye(shape[-2], shape[-1])
            return eye.expand(shape).clone()
        std = lv.init.std if lv.init.kind == "normal" else 1.0 / math.sqrt(fan_in)
        return torch.randn(shape) * std

    def _build_fast(self, lv: Level) -> None:
        lowering = self.plan.levels[lv.name].lowering
        if lowering == "boundary":
            if lv.effective_reset().kind == "every":
                raise CompileError(f"level {lv.name!r}: reset_every is not supported for blocks")
            block = build_slow(lv, self.plan.dims)
            if lv.init.kind == "path":
                _load_pretrained(block, lv)
            block.requires_grad_(lv.init.kind == "meta")  # meta: learned by the outer loop
            self.blocks[_key(lv.name)] = block
            self._scalar_params(lv)
            return
        if lv.init.kind == "path":
            raise CompileError(f"level {lv.name!r}: init from path is not supported for memories")
        if lowering == "attention":
            return
        H, dk, dv = self._heads(lv)
        if lowering == "linear_memory":
            shapes = {"M": ((H, dv, dk), dk)}
        else:
            st = lv.state
            if st.kind == "linear":
                shapes = {"W1": ((H, dv, dk), dk)}
            else:
                width = dim(st.width, self.plan.dims, f"level {lv.name!r}") // 1
                sizes = [dk] + [width] * (st.depth - 1) + [dv]
                # W1 is the output layer (Eq. 89 order), WL the first.
                shapes = {
                    f"W{st.depth - i}": ((H, sizes[i + 1], sizes[i]), sizes[i])
                    for i in range(st.depth)
                }
        for wname, (shape, fan_in) in shapes.items():
            value = self._init_tensor(lv, shape, fan_in)
            key = f"{_key(lv.name)}__{wname}"
            if lv.init.kind == "meta":
                self.meta[key] = nn.Parameter(value)
            else:
                self.register_buffer(key, value, persistent=True)
        self._scalar_params(lv)

    def _scalar_params(self, lv: Level) -> None:
        for rule in lv.optimizer:
            for sname in ("lr", "momentum", "retain"):
                value = getattr(rule, sname, None)
                if isinstance(value, Learned):
                    self.scalars[f"{_key(lv.name)}__{sname}"] = nn.Parameter(
                        torch.tensor(_inverse_bound(value))
                    )

    def _initial(self, lv: Level, wname: str) -> torch.Tensor:
        key = f"{_key(lv.name)}__{wname}"
        return self.meta[key] if key in self.meta else getattr(self, key)

    # ------------------------------------------------------------------------------ running
    def forward(
        self,
        inputs: dict[str, torch.Tensor] | torch.Tensor,
        state: dict[str, Any] | None = None,
        loss_fn: Any = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Run the learner over ``[B, T, ...]`` inputs from ``state`` (``None``: initial).

        ``loss_fn(outputs, start, end) -> scalar`` gives the outer loss of tokens
        ``start..end-1`` (summed over the batch); it is the learning signal of blocks updated
        every C tokens (CMS, Eq. 71), which then learn within the sequence, and it is returned
        as ``outputs["loss"]`` (summed over the pieces). Without it those blocks hold their
        parameters, as at test time without feedback.
        """
        if isinstance(inputs, torch.Tensor):
            if len(self.spec.inputs) != 1:
                raise CompileError(
                    f"graph {self.spec.name!r} has inputs {[i.name for i in self.spec.inputs]}; "
                    "pass a dict"
                )
            inputs = {self.spec.inputs[0].name: inputs}
        missing = [i.name for i in self.spec.inputs if i.name not in inputs]
        if missing:
            raise CompileError(f"graph {self.spec.name!r}: missing inputs {missing}")
        state = dict(state or {})
        x0 = next(iter(inputs.values()))
        B, T = x0.shape[0], x0.shape[1]
        blocks = [self.spec.level(n) for n in self.plan.order
                  if self.plan.levels[n].lowering == "boundary"]  # fmt: skip
        for lv in blocks:
            if lv.name not in state:
                state[lv.name] = boundary.initial(self.blocks[_key(lv.name)], B)
        if not blocks or loss_fn is None:
            outputs, state = self._piece(inputs, state)
            if loss_fn is not None:
                outputs["loss"] = loss_fn(outputs, 0, T)
            return outputs, state
        periods = {lv.name: self.plan.levels[lv.name].chunk for lv in blocks}
        phases = {lv.name: state[lv.name]["phase"] for lv in blocks}
        every_token = (os.environ.get("NLGRAPH_BACKEND") or self.backend) == "reference"
        pieces, total, start = [], 0.0, 0
        differentiable = torch.is_grad_enabled()  # meta-gradients through the updates
        with torch.enable_grad():  # blocks learn at test time too
            for end in boundary.cut_points(T, periods, phases, every_token):
                outs, state = self._piece({k: v[:, start:end] for k, v in inputs.items()}, state)
                loss = loss_fn(outs, start, end)
                rates = {lv.name: self._block_rates(lv) for lv in blocks}
                updated = boundary.accumulate_and_update(
                    loss, blocks, state, periods, rates, end - start, differentiable
                )
                for lv in blocks:  # nested CMS: a block restarts when its parent's chunk ends
                    rs = lv.effective_reset()
                    if rs.kind == "with" and rs.level in updated:
                        fresh = boundary.initial(self.blocks[_key(lv.name)], B)
                        state[lv.name] = {**fresh, "phase": state[lv.name]["phase"]}
                pieces.append(outs)
                total = total + loss
                start = end
        outputs = {k: torch.cat([p[k] for p in pieces], dim=1) for k in pieces[0]}
        outputs["loss"] = total
        return outputs, state

    def _piece(
        self, inputs: dict[str, torch.Tensor], state: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        run = _Run(self, inputs, state)
        outputs = {name: run.eval(flow) for name, flow in self.spec.outputs.items()}
        new = dict(state)
        new.update(run.new_state)
        return outputs, new

    def _block_rates(self, lv: Level) -> tuple[Any, Any]:
        rule = lv.optimizer[0]
        return self._const_or_learned(lv, "lr", rule.lr), self._const_or_learned(
            lv, "retain", 1.0 if rule.retain is None else rule.retain
        )

    def _const_or_learned(self, lv: Level, name: str, value: Any) -> Any:
        if not isinstance(value, Learned):
            return float(value)
        return _bounded(self.scalars[f"{_key(lv.name)}__{name}"], value)

    def get_extra_state(self) -> dict[str, Any]:
        from nlgraph.serialize import to_dict

        return {
            "version": STATE_VERSION,
            "spec": to_dict(self.spec),
            "dims": dict(self.plan.dims),
            "reset": {lv.name: str(lv.effective_reset()) for lv in self.spec.levels},
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise CompileError(
                f"state_dict version {state.get('version')!r} != {STATE_VERSION}; it was written "
                "by another nlgraph version"
            )
        from nlgraph.serialize import to_dict

        if state.get("spec") != to_dict(self.spec):
            raise CompileError("state_dict was saved from a different graph spec")


def _load_pretrained(block: nn.Module, lv: Level) -> None:
    """Ad-hoc level stacking (PAPER.md 5.5): copy a pre-trained MLP's linear layers, in order,
    into the block. The import path names an ``nn.Module`` or a callable returning one."""
    from nlgraph.library import resolve

    where = f"level {lv.name!r}, init {lv.init.path}"
    src = resolve(lv.init.path)
    src = src() if callable(src) and not isinstance(src, nn.Module) else src
    if not isinstance(src, nn.Module):
        raise CompileError(f"{where}: expected an nn.Module, got {type(src).__name__}")
    mine = [m for m in block.modules() if isinstance(m, nn.Linear)]
    theirs = [m for m in src.modules() if isinstance(m, nn.Linear)]
    want = [tuple(m.weight.shape) for m in mine]
    got = [tuple(m.weight.shape) for m in theirs]
    if want != got:
        raise CompileError(f"{where}: its linear layers {got} do not match the block's {want}")
    with torch.no_grad():
        for a, b in zip(mine, theirs, strict=True):
            a.weight.copy_(b.weight)
            if a.bias is not None:
                a.bias.copy_(b.bias) if b.bias is not None else a.bias.zero_()


def _bounded(raw: torch.Tensor, value: Learned) -> torch.Tensor:
    """A learned scalar kept in its declared range (sigmoid for [lo, hi], softplus for >= lo)."""
    if value.lo is not None and value.hi is not None:
        return value.lo + (value.hi - value.lo) * torch.sigmoid(raw)
    if value.lo is not None:
        return value.lo + F.softplus(raw)
    return raw


def _inverse_bound(value: Learned) -> float:
    lo, hi, x = value.lo, value.hi, value.init
    if lo is not None and hi is not None:
        p = min(max((x - lo) / (hi - lo), 1e-6), 1 - 1e-6)
        return math.log(p / (1 - p))
    if lo is not None:
        y = max(x - lo, 1e-6)
        return y + math.log(-math.expm1(-y))
    return x


class _Run:
    """One forward pass: evaluates flows with a cache, runs each fast memory once."""

    def __init__(self, learner: CompiledLearner, inputs: dict[str, torch.Tensor], state: dict):
        self.m = learner
        self.inputs = inputs
        self.state = state
        self.new_state: dict[str, Any] = {}
        self.cache: dict[FlowBase, torch.Tensor] = {}
        self.reads: dict[str, dict[Read, torch.Tensor]] = {}
        x0 = next(iter(inputs.values()))
        self.B, self.T = x0.shape[0], x0.shape[1]

    def eval(self, flow: FlowBase) -> torch.Tensor:
        hit = self.cache.get(flow)
        if hit is None:
            hit = self.cache[flow] = self._eval(flow)
        return hit

    def _eval(self, flow: FlowBase) -> torch.Tensor:
        op = flow.op
        if op == "input":
            return self.inputs[flow.name]
        if op == "ref":
            return self.eval(self.m.spec.flows[flow.name])
        if op == "read":
            lp = self.m.plan.levels[flow.level]
            if lp.lowering == "boundary":
                block = self.m.blocks[_key(flow.level)]
                return boundary.apply(block, self.state[flow.level]["theta"], self.eval(flow.arg))
            if lp.role == "slow":
                mod = self.m.slow[_key(flow.level)]
                if isinstance(mod, CausalConv):  # its last inputs are fast state across segments
                    y, self.new_state[flow.level] = mod(
                        self.eval(flow.arg), self.state.get(flow.level)
                    )
                    return y
                return mod(self.eval(flow.arg))
            if flow.level not in self.reads:
                self._run_memory(self.m.spec.level(flow.level))
            return self.reads[flow.level][flow]
        if op == "unary":
            x = self.eval(flow.x)
            if flow.fn == "normalize":
                return F.normalize(x, dim=-1)
            return _UNARY[flow.fn](x)
        if op == "binary":
            a, b = self.eval(flow.a), self.eval(flow.b)
            return _BINARY[flow.fn](a, b)
        if op == "const":
            return torch.tensor(flow.value, dtype=self._dtype())
        if op == "state":
            lp = self.m.plan.levels.get(flow.level)
            mod = self.m.slow[_key(flow.level)] if lp and lp.role == "slow" else None
            if mod is not None and hasattr(mod, "value"):
                return mod.value
        raise CompileError(f"flow {flow} cannot be evaluated in a sequence learner")

    def _dtype(self) -> torch.dtype:
        return next(iter(self.inputs.values())).dtype

    def _heads(self, flow: FlowBase, H: int) -> torch.Tensor:
        """``[B, T, H * D] -> [B, T, H, D]``; l2-normalisation of a key/query is per head."""
        if isinstance(flow, Unary) and flow.fn == "normalize":
            x = self.eval(flow.x)
            return F.normalize(x.reshape(*x.shape[:2], H, -1), dim=-1)
        x = self.eval(flow)
        return x.reshape(*x.shape[:2], H, -1)

    def _scalar(self, lv: Level, name: str, value: Any, H: int) -> torch.Tensor | None:
        if value is None:
            return None
        B, T = self.B, self.T
        if isinstance(value, int | float):
            return torch.full((B, T, H), float(value), dtype=self._dtype())
        if isinstance(value, Learned):
            s = _bounded(self.m.scalars[f"{_key(lv.name)}__{name}"], value)
            return s.to(self._dtype()).expand(B, T, H)
        if isinstance(value, Signal):
            x = _SIGNAL_ACT[value.act](self.eval(value.flow)) * value.scale
            if x.shape[-1] not in (1, H):
                raise CompileError(
                    f"level {lv.name!r}: the {name} signal has width {x.shape[-1]}; expected 1 "
                    f"or heads={H}"
                )
            return x.expand(B, T, H)
        raise CompileError(f"level {lv.name!r}: unsupported scalar {value!r}")

    def backend_name(self) -> str:
        forced = os.environ.get("NLGRAPH_BACKEND") or self.m.backend
        return "chunk" if forced == "auto" else forced

    def _run_memory(self, lv: Level) -> None:
        lowering = self.m.plan.levels[lv.name].lowering
        if lowering == "cluster":
            from nlgraph.compiler.cluster import run_cluster

            members = next(c for c in self.m.plan.clusters if lv.name in c)
            run_cluster(self, members)
            return
        reads = memory_reads(self.m.spec, lv.name)
        ctx = lv.context
        if not isinstance(ctx, KV) or ctx.key is None or ctx.value is None:
            raise CompileError(f"level {lv.name!r}: a memory needs kv(key=..., value=...)")
        H = lv.heads
        k, v = self._heads(ctx.key, H), self._heads(ctx.value, H)
        if lowering == "attention":
            out = {r: self._attention(lv, self._heads(r.arg, H), k, v) for r in reads}
            self.reads[lv.name] = {r: o.reshape(self.B, self.T, -1) for r, o in out.items()}
            return
        if len({r.at for r in reads}) > 1:
            raise CompileError(f"level {lv.name!r} is read both before and after its update")
        queries = [self._heads(r.arg, H) for r in reads] or [k]
        q = torch.cat(queries, dim=-1) if len(queries) > 1 else queries[0]
        rule = lv.optimizer[0]
        lr = self._scalar(lv, "lr", rule.lr, H)
        retain = self._scalar(lv, "retain", rule.retain, H)
        chunk = self.m.plan.levels[lv.name].chunk
        after = not reads or reads[0].at == "new"
        prev = self.state.get(lv.name)
        if lowering == "linear_memory":
            from nlgraph.kernels.linear_memory import linear_memory

            if isinstance(rule, DGD):
                # W <- W (a I - e k k^T) - e delta k^T with delta = d objective / d (M k):
                # -v for the dot objective, M k - v for L2 (whose decay along k then counts twice).
                e = lr / (1.0 + lr * (k * k).sum(-1)) if rule.exact else lr
                b, c = (e, e) if lv.objective.kind == "dot" else (2.0 * e, e)
            elif lv.objective.kind == "dot":
                b, c = None, lr
            else:
                b, c = lr, lr
            m0 = prev if prev is not None else self.m._initial(lv, "M").expand(self.B, -1, -1, -1)
            if len(queries) > 1:
                raise CompileError(f"level {lv.name!r}: a linear memory is read by one query")
            o, final = linear_memory(
                q, k, v, retain, b, c, initial_state=m0, read="after" if after else "before",
                chunk_size=chunk, backend=self.m.backend,
            )  # fmt: skip
            self.new_state[lv.name] = final
            outs = [o]
        else:
            from nlgraph.kernels.deep_memory import deep_memory

            st = lv.state
            depth = 1 if st.kind == "linear" else st.depth
            params0 = {f"W{i}": self.m._initial(lv, f"W{i}") for i in range(1, depth + 1)}
            # The kernel's L2 objective is ||M(k) - v||^2, the DSL's 1/2 ||.||^2: halve lr.
            lr_k = lr / 2.0 if lv.objective.kind == "l2" else lr
            mom = self._scalar(lv, "momentum", rule.momentum, H)
            forget = None if retain is None else 1.0 - retain
            outs = []
            for qi in queries:
                y, final = deep_memory(
                    qi, k, v, lr_k, mom, forget, params0=params0, state=prev, chunk_size=chunk,
                    read="after" if after else "chunk_start", objective=lv.objective.kind,
                    activation=getattr(st, "activation", "identity"),
                    residual=getattr(st, "residual", False), backend=self.m.backend,
                )  # fmt: skip
                outs.append(y)
            self.new_state[lv.name] = final
        self.reads[lv.name] = {
            r: o.reshape(self.B, self.T, -1) for r, o in zip(reads, outs, strict=False)
        }

    def _attention(self, lv: Level, q, k, v) -> torch.Tensor:
        """Causal softmax attention over the cached and current keys (Eq. 62; Eq. 63 with a
        window); the key/value cache is the memory's state."""
        cache = self.state.get(lv.name)
        if cache is not None:
            k = torch.cat([cache["k"], k], dim=1)
            v = torch.cat([cache["v"], v], dim=1)
        self.new_state[lv.name] = {"k": k, "v": v}
        T, S = q.shape[1], k.shape[1]
        i = torch.arange(T).unsqueeze(1) + (S - T)
        j = torch.arange(S).unsqueeze(0)
        allowed = j <= i
        window = lv.state.window
        if window is not None:
            allowed &= j > i - window
        temp = lv.objective.temperature
        scale = temp if temp is not None else 1.0 / math.sqrt(q.shape[-1])
        # Written out rather than F.scaled_dot_product_attention: blocks that learn from the
        # loss inside the forward (CMS) need second derivatives, which the fused CPU kernel lacks.
        scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        return torch.einsum("bhts,bshd->bthd", torch.softmax(scores, dim=-1), v)


_UNARY = {
    "neg": torch.neg, "square": torch.square, "sqrt": torch.sqrt, "abs": torch.abs,
    "sign": torch.sign, "exp": torch.exp, "log": torch.log, "softplus": F.softplus, **ACT,
}  # fmt: skip
_BINARY = {
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
}  # fmt: skip
