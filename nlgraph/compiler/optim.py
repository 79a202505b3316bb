"""Compile an optimizer graph (memories over the gradient stream) into a fused update.

The graph has one ``params`` level (the weights) and any number of per-parameter memory levels
(``like`` the weights: momentum, Adam's moments, ...). One step evaluates the levels tier by
tier, fastest first (PAPER.md 1.2), each level's rule chain applied to all parameters of a group
at once with ``torch._foreach_*`` ops: no per-parameter Python work beyond what torch's own
foreach path does (Newton–Schulz is the exception: it is a matrix iteration per tensor).

A level's update is a pipeline over a *direction* ``d``, initialised to the gradient of its
objective at the state the step starts from (``l2_to(t)``: ``S - t``; ``dot`` on value ``c``:
``-c``; ``outer``: the gradient of the loss). ``precondition`` and ``orthogonalize`` transform
``d``; ``gd``/``ema`` apply it (``S <- retain S - lr d``, with momentum ``B <- mu B - lr d;
S <- retain S + B``); ``weight_decay`` scales ``S``; ``follow`` adds a flow.
"""

from __future__ import annotations

from typing import Any

import torch

from nlgraph._errors import CompileError
from nlgraph.flows import FlowBase, references
from nlgraph.level import GraphSpec, Level
from nlgraph.optimizers import Learned, Signal, scalar_fields
from nlgraph.topology import tiers
from nlgraph.validation import _flows as _level_flows
from nlgraph.validation import validate

__all__ = ["OptimizerProgram"]

Tensors = list[torch.Tensor]
Value = float | Tensors


def _newton_schulz(x: torch.Tensor, steps: int, variant: str, prenorm: bool) -> torch.Tensor:
    """Orthogonalise a matrix (PAPER.md 2.5). ``cubic``: ``1.5 O - 0.5 O O^T O`` (one inner GD
    step of size 1/4, Eq. 44); ``quintic``: the tuned polynomial of production Muon."""
    if x.ndim < 2:
        return x / x.norm().clamp_min(1e-7) if prenorm else x
    shape = x.shape
    o = x.reshape(shape[0], -1)
    wide = o.shape[0] > o.shape[1]
    if wide:  # iterate on the smaller Gram matrix
        o = o.T
    if prenorm:
        o = o / o.norm().clamp_min(1e-7)
    for _ in range(steps):
        gram = o @ o.T
        if variant == "cubic":
            o = 1.5 * o - 0.5 * gram @ o
        else:
            a, b, c = 3.4445, -4.7750, 2.0315
            o = a * o + (b * gram + c * gram @ gram) @ o
    if wide:
        o = o.T
    return o.reshape(shape)


class OptimizerProgram:
    """The compiled step of one optimizer graph for one parameter group."""

    def __init__(self, spec: GraphSpec) -> None:
        validate(spec)
        weights = [lv for lv in spec.levels if lv.state.kind == "params"]
        if len(weights) != 1:
            raise CompileError(
                f"optimizer graph {spec.name!r} needs exactly one params level (the weights), "
                f"found {[lv.name for lv in weights]}"
            )
        self.spec = spec
        self.weights = weights[0].name
        order = [n for tier in tiers(spec) for n in tier]
        self.levels: list[Level] = [spec.level(n) for n in order]
        for lv in self.levels:
            self._check(lv)
        self.memories = [lv.name for lv in self.levels if lv.name != self.weights]
        # Levels some flow reads as they were before this step's updates (copied each step).
        self.prev = sorted(
            {
                ref
                for lv in self.levels
                for _, flow in _level_flows(lv)
                for kind, ref, at in references(flow, spec.flows)
                if kind == "state" and at == "prev"
            }
        )
        self.buffers = [
            f"{lv.name}.momentum"
            for lv in self.levels
            for r in lv.optimizer
            if getattr(r, "momentum", None) is not None
        ]

    def _check(self, lv: Level) -> None:
        where = f"optimizer graph {self.spec.name!r}, level {lv.name!r}"
        if lv.name != self.weights and not (
            lv.state.kind == "like" and lv.state.level == self.weights
        ):
            raise CompileError(f"{where}: state {lv.state} is not like({self.weights!r})")
        if lv.frequency.unit != "step" or lv.frequency.every != 1:
            raise CompileError(f"{where}: only per-step levels are supported, got {lv.frequency}")
        for rule in lv.optimizer:
            for name, value in scalar_fields(rule).items():
                if isinstance(value, Learned | Signal):
                    raise CompileError(f"{where}: {name} must be a constant in an optimizer graph")
            if rule.rule in ("dgd", "exact"):
                raise CompileError(f"{where}: rule {rule.rule!r} is not element-wise")

    # -------------------------------------------------------------------------- evaluation
    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n in self.memories}
        for b in self.buffers:
            state[b] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _eval(self, flow: FlowBase, env: dict[str, Any]) -> Value:
        op = flow.op
        if op == "const":
            return flow.value
        if op == "ref":
            return self._eval(self.spec.flows[flow.name], env)
        if op == "grad":
            if flow.wrt != self.weights or flow.objective != "loss":
                raise CompileError(f"{self.spec.name!r}: only gradients of the loss w.r.t. weights")
            return env["grad"]
        if op == "state":
            key = flow.level if flow.at == "new" else f"prev:{flow.level}"
            return env[key]
        if op == "unary":
            return _unary(flow.fn, self._eval(flow.x, env))
        if op == "binary":
            return _binary(flow.fn, self._eval(flow.a, env), self._eval(flow.b, env))
        if op == "debias":
            return _binary("div", self._eval(flow.x, env), 1.0 - flow.beta ** env["step"])
        if op == "newton_schulz":
            x = self._eval(flow.x, env)
            return [_newton_schulz(t, flow.steps, flow.variant, flow.prenorm) for t in x]
        raise CompileError(f"{self.spec.name!r}: flow {flow} is not supported in an optimizer")

    def _direction(self, lv: Level, env: dict[str, Any]) -> Tensors | None:
        obj = lv.objective
        if obj is None:
            return None
        if obj.kind == "outer":
            return env["grad"]
        if obj.kind in ("l2_to", "l2"):
            target = obj.target if obj.kind == "l2_to" else lv.context
            # The level has not been updated yet this step: its current state is S_prev.
            return _binary("sub", env[lv.name], self._eval(target, env))
        if obj.kind == "dot":
            return _unary("neg", self._eval(lv.context, env))
        raise CompileError(f"level {lv.name!r}: objective {obj.kind!r} is not element-wise")

    @torch.no_grad()
    def step(
        self, params: Tensors, grads: Tensors, states: list[dict[str, torch.Tensor]], step: int
    ) -> None:
        """One update of every level, in tier order, in place."""
        env: dict[str, Any] = {"grad": grads, "step": step, self.weights: params}
        for n in self.memories:
            env[n] = [s[n] for s in states]
        for n in self.prev:
            env[f"prev:{n}"] = [t.clone() for t in env[n]]
        for lv in self.levels:
            self._update(lv, env[lv.name], env, states)

    def _update(self, lv: Level, s: Tensors, env: dict[str, Any], states: list[dict]) -> None:
        d = self._direction(lv, env)
        for rule in lv.optimizer:
            kind = rule.rule
            if kind == "precondition":
                by = self._eval(rule.by, env)
                denom = _binary("add", _binary("pow", by, rule.power), rule.eps)
                d = _binary("div", d, denom)
            elif kind == "newton_schulz":
                d = [_newton_schulz(t, rule.steps, rule.variant, True) for t in d]
            elif kind == "weight_decay":
                torch._foreach_mul_(s, 1.0 - rule.rate)
            elif kind == "follow":
                torch._foreach_add_(s, _as_list(self._eval(rule.update, env), s))
            elif kind in ("gd", "ema"):
                lr = 1.0 - rule.beta if kind == "ema" else rule.lr
                retain = getattr(rule, "retain", None)
                if retain is not None and retain != 1.0:
                    torch._foreach_mul_(s, retain)
                mu = getattr(rule, "momentum", None)
                if mu is None:
                    torch._foreach_add_(s, d, alpha=-lr)
                else:
                    buf = [st[f"{lv.name}.momentum"] for st in states]
                    torch._foreach_mul_(buf, mu)
                    torch._foreach_add_(buf, d, alpha=-lr)
                    if rule.nesterov:
                        torch._foreach_add_(s, buf, alpha=mu)
                        torch._foreach_add_(s, d, alpha=-lr)
                    else:
                        torch._foreach_add_(s, buf)
            else:  # pragma: no cover - _check rejects the rest
                raise CompileError(f"level {lv.name!r}: rule {kind!r} unsupported")


def _as_list(v: Value, like: Tensors) -> Tensors:
    return [torch.full_like(t, v) for t in like] if isinstance(v, float) else v


def _unary(fn: str, x: Value) -> Value:
    if isinstance(x, float):
        t = _unary(fn, [torch.tensor(x, dtype=torch.float64)])
        return float(t[0])
    if fn == "neg":
        return torch._foreach_neg(x)
    if fn == "square":
        return torch._foreach_mul(x, x)
    if fn == "sqrt":
        return torch._foreach_sqrt(x)
    if fn == "abs":
        return torch._foreach_abs(x)
    if fn == "sign":
        return torch._foreach_sign(x)
    if fn == "exp":
        return torch._foreach_exp(x)
    if fn == "log":
        return torch._foreach_log(x)
    if fn == "normalize":
        return [t / t.norm().clamp_min(1e-12) for t in x]
    act = {"silu": torch.nn.functional.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
           "relu": torch.relu, "softplus": torch.nn.functional.softplus}  # fmt: skip
    return [act[fn](t) for t in x]


def _binary(fn: str, a: Value, b: Value) -> Value:
    if isinstance(a, float) and isinstance(b, float):
        return {"add": a + b, "sub": a - b, "mul": a * b, "div": a / b, "pow": a**b}[fn]
    if fn == "add":
        return torch._foreach_add(b, a) if isinstance(a, float) else torch._foreach_add(a, b)
    if fn == "mul":
        return torch._foreach_mul(b, a) if isinstance(a, float) else torch._foreach_mul(a, b)
    if fn == "sub":
        if isinstance(a, float):
            return torch._foreach_add(torch._foreach_neg(b), a)
        return torch._foreach_sub(a, b)
    if fn == "div":
        if isinstance(a, float):
            return torch._foreach_mul(torch._foreach_reciprocal(b), a)
        return torch._foreach_div(a, b)
    if fn == "pow":
        if isinstance(a, float):
            return [torch.pow(a, t) for t in b]
        if isinstance(b, float) and b == 0.5:
            return torch._foreach_sqrt(a)
        return torch._foreach_pow(a, b)
    raise CompileError(f"binary op {fn!r} unsupported")
