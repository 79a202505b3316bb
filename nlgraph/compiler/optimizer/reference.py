"""The naive reference of an optimizer graph: one parameter at a time, autograd on each level's
declared objective. The compiled program (:mod:`nlgraph.compiler.optimizer.program`) must equal it.

Each memory takes one GD step on the objective it declares, evaluated at its state before the
step (PAPER.md 2.2–2.3: momentum is GD on ``-<m, v>``, an EMA is GD on ``1/2 ||S - t||^2``, delta
momentum is GD on ``1/2 (<m, u> - c)^2``); the gradient comes from ``torch.autograd``, not from
a formula. No foreach ops, no deferred scales, no shortcuts: plain tensor code per parameter.
"""

from __future__ import annotations

from typing import Any

import torch

from nlgraph._errors import CompileError
from nlgraph.clock import Frequency
from nlgraph.compiler.newton_schulz import newton_schulz_reference
from nlgraph.flows import FlowBase, Grad, State, walk
from nlgraph.level import GraphSpec, Level
from nlgraph.optimizers import Signal
from nlgraph.topology import tiers

__all__ = ["reference_step"]

_ACT = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "relu": torch.relu,
        "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda z: z}  # fmt: skip


def _ticks(freq: Frequency, step: int) -> int:
    return sum(freq.updates_at(t) for t in range(1, step + 1))


def _mlp(lv: Level, ws: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Eq. 89 on every entry of ``x``: ``M(z) = [z +] W1 s(W2 ... s(WL z))``."""
    h = x.reshape(-1, 1)
    for i, w in enumerate(reversed(ws)):
        h = h @ w.T
        if i < len(ws) - 1:
            h = _ACT[lv.state.activation](h)
    out = h.reshape(x.shape)
    return out + x if lv.state.residual else out


class _Ref:
    def __init__(self, spec: GraphSpec, weights: str, names: dict[str, str]) -> None:
        self.spec, self.names = spec, names
        self.weights = spec.level(weights)

    def key(self, name: str) -> str:
        return self.names.get(name, name)

    def held(self, name: str, at: str, env: dict[str, Any]) -> Any:
        if name == self.weights.name:
            return env["prev"]["__w"] if at == "prev" else env["p"]
        lv = self.spec.level(name)
        if lv.state.kind == "mlp":
            keys = [self.key(f"{name}.W{i}") for i in range(1, lv.state.depth + 1)]
            src = env["prev"] if at == "prev" else env["state"]
            return [src[k] for k in keys]
        return (env["prev"] if at == "prev" else env["state"])[self.key(name)]

    def eval(self, f: FlowBase, env: dict[str, Any], lv: Level) -> Any:
        op = f.op
        if op == "const":
            return f.value
        if op == "grad":
            return env["g"]
        if op == "state":
            return self.held(f.level, f.at, env)
        if op == "ref":
            return self.eval(self.spec.flows[f.name], env, lv)
        if op == "ticks":
            return float(_ticks(lv.frequency, env["step"]))
        if op == "debias":
            level = self.spec.level(f.x.level) if isinstance(f.x, State) else lv
            return self.eval(f.x, env, lv) / (1 - f.beta ** _ticks(level.frequency, env["step"]))
        if op == "newton_schulz":
            return newton_schulz_reference(self.eval(f.x, env, lv), f.steps, f.variant, f.prenorm)
        if op == "read":
            mem = self.spec.level(f.level)
            return _mlp(mem, self.held(f.level, f.at, env), self.eval(f.arg, env, lv))
        if op == "unary":
            x = torch.as_tensor(self.eval(f.x, env, lv), dtype=env["p"].dtype)
            fns = {"neg": torch.neg, "square": torch.square, "sqrt": torch.sqrt,
                   "abs": torch.abs, "sign": torch.sign, "exp": torch.exp, "log": torch.log,
                   "normalize": lambda t: t / t.norm().clamp_min(1e-12), **_ACT,
                   "softplus": torch.nn.functional.softplus}  # fmt: skip
            return fns[f.fn](x)
        a, b = self.eval(f.a, env, lv), self.eval(f.b, env, lv)
        return {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b,
                "div": lambda: a / b, "pow": lambda: a**b}[f.fn]()  # fmt: skip

    def objective(self, lv: Level, s: Any, env: dict[str, Any]) -> torch.Tensor:
        """The level's declared inner objective at state ``s`` (PAPER.md 1.1 conventions)."""
        obj = lv.objective
        if obj.kind == "l2_to":
            return 0.5 * ((s - self.eval(obj.target, env, lv)) ** 2).sum()
        if obj.kind == "dot":  # key-less: M(k) = S
            return -(s * self.eval(lv.context, env, lv)).sum()
        key = self.eval(lv.context.key, env, lv)
        value = self.eval(lv.context.value, env, lv)
        if lv.state.kind == "mlp":  # the mean over the tensor's entries
            return 0.5 * ((_mlp(lv, s, key) - value) ** 2).mean()
        return 0.5 * ((s * key).sum() - value) ** 2  # a vector memory read out as <S, k>

    def direction(self, lv: Level, env: dict[str, Any]) -> Any:
        if lv.objective is None:
            return None
        if lv.objective.kind == "outer":
            return env["g"]
        s = self.held(lv.name, "new", env)
        leaves = [t.detach().clone().requires_grad_() for t in (s if isinstance(s, list) else [s])]
        with torch.enable_grad():
            j = self.objective(lv, leaves if isinstance(s, list) else leaves[0], env)
            grads = torch.autograd.grad(j, leaves)
        return list(grads) if isinstance(s, list) else grads[0]

    def update(self, lv: Level, env: dict[str, Any]) -> None:
        name, st = lv.name, env["state"]
        updating = lv.frequency.updates_at(env["step"])
        d = self.direction(lv, env)
        if lv.frequency.every > 1 or lv.frequency.offset:
            acc = self.key(f"{name}.acc")
            st[acc] = st[acc] + d if d is not None else st[acc]
            if not updating:
                return
            d, st[acc] = st[acc], torch.zeros_like(st[acc])
        elif not updating:
            return
        s = self.held(name, "new", env)
        for rule in lv.optimizer:
            kind = rule.rule
            if kind == "weight_decay":
                s = (1 - self.scalar(lv, rule, "rate", env)) * s
            elif kind == "follow":
                s = s + self.eval(rule.update, env, lv)
            elif kind == "precondition":
                d = d / (self.eval(rule.by, env, lv) ** rule.power + rule.eps)
            elif kind == "newton_schulz":
                d = newton_schulz_reference(d, rule.steps, rule.variant, True)
            elif kind == "dgd":
                s = self.dgd(rule, s, d, env)
            else:
                s = self.gd(lv, rule, s, d, env)
            self.store(name, s, env)

    def scalar(self, lv: Level, rule: Any, name: str, env: dict[str, Any]) -> Any:
        """A rule's scalar now: its number, or a signal's ``scale * act(flow)`` with the flow
        evaluated as the rule applies (per parameter entry when the flow is a tensor)."""
        value = getattr(rule, name)
        if value is None or isinstance(value, float | int):
            return value
        if not isinstance(value, Signal):
            raise CompileError(
                f"level {lv.name!r}, {rule.rule} {name}: {value} has no value in an optimizer "
                "step (validate() says why)"
            )
        x = torch.as_tensor(self.eval(value.flow, env, lv), dtype=env["p"].dtype)
        act = {"identity": lambda t: t, "sigmoid": torch.sigmoid, "exp": torch.exp,
               "softplus": torch.nn.functional.softplus}[value.act]  # fmt: skip
        return value.scale * act(x)

    def gd(self, lv: Level, rule: Any, s: Any, d: Any, env: dict[str, Any]) -> Any:
        if rule.rule == "ema":
            lr, retain, mu = 1 - self.scalar(lv, rule, "beta", env), None, None
        else:
            lr, retain, mu = (self.scalar(lv, rule, n, env) for n in ("lr", "retain", "momentum"))
        retain = 1.0 if retain is None else retain
        if isinstance(s, list):
            return [retain * w - lr * dw for w, dw in zip(s, d, strict=True)]
        if mu is None:
            return retain * s - lr * d
        buf = self.key(f"{lv.name}.momentum")
        env["state"][buf] = mu * env["state"][buf] - lr * d
        look = mu * env["state"][buf] - lr * d if rule.nesterov else env["state"][buf]
        return retain * s + look

    def dgd(self, rule: Any, w: torch.Tensor, g: torch.Tensor, env: dict[str, Any]) -> Any:
        """The minimiser of ``1/(2N) sum ||W x_n||^2 + <W, g> + 1/(2 lr) ||W - W_t||^2`` (the
        L2 inner objective with ``u_n`` the per-row negative output gradients), by a solve of
        its stationarity condition; ``exact=False``: the printed ``W (I - lr X^T X / N) - lr g``."""
        x = env["key"].to(w.dtype)
        n, lr = x.shape[0], rule.lr
        if not rule.exact:
            return w - lr * w @ x.T @ x / n - lr * g
        a = x.T @ x / n + torch.eye(x.shape[1], dtype=w.dtype) / lr
        return torch.linalg.solve(a, (w / lr - g).T).T

    def store(self, name: str, s: Any, env: dict[str, Any]) -> None:
        if name == self.weights.name:
            env["p"].copy_(s)
        elif isinstance(s, list):
            lv = self.spec.level(name)
            for i, w in enumerate(s, start=1):
                env["state"][self.key(f"{lv.name}.W{i}")] = w
        else:
            env["state"][self.key(name)] = s


@torch.no_grad()
def reference_step(
    spec: GraphSpec,
    weights: str,
    p: torch.Tensor,
    grad: torch.Tensor,
    state: dict[str, Any],
    step: int,
    state_names: dict[str, str] | None = None,
    key: torch.Tensor | None = None,
) -> None:
    """One step of the levels of ``weights``' part for one parameter, in place (``state``'s
    tensors are replaced, ``p`` is written). ``step`` counts from 1."""
    order = [spec.level(n) for tier in tiers(spec) for n in tier]
    ref = _Ref(spec, weights, dict(state_names or {}))
    prev = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    prev["__w"] = p.clone()
    env = {"p": p, "g": grad, "state": state, "prev": prev, "step": step, "key": key}
    for lv in order:
        if _belongs(spec, lv, weights):
            ref.update(lv, env)


def _belongs(spec: GraphSpec, lv: Level, weights: str) -> bool:
    st = lv.state
    if lv.name == weights:
        return True
    while st.kind == "like":
        if st.level == weights:
            return True
        st = spec.level(st.level).state
    if st.kind == "mlp":  # an MLP memory belongs to the weights whose gradients it reads
        return any(isinstance(n, Grad) and n.wrt == weights for n in walk(lv.context, spec.flows))
    return False
