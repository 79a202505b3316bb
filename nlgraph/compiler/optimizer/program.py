"""Compile an optimizer graph (memories over the gradient stream) into a fused update.

An optimizer graph has one or more ``params`` levels (the weights; ``params(min_ndim=2)`` and
``params(max_ndim=1)`` split the parameters by shape, as Muon and M3 do) and memory levels that
belong to one of them: ``like`` its parameters (momentum, Adam's moments), or a small MLP per
parameter tensor (deep momentum). One step evaluates a part's levels tier by tier, fastest first
(PAPER.md 1.2), each level's rule chain applied to all parameters of a bucket at once with
``torch._foreach_*`` ops (:mod:`nlgraph.compiler.optimizer.ops`); Newton–Schulz and the DGD
solve are the matrix work per tensor.

A level's update is a pipeline over a *direction* ``d``, the gradient of its objective at the
state the step starts from: ``l2_to(t)``: ``S - t``; ``dot`` on value ``c``: ``-c``; keyed
``l2`` on ``(k, c)``: ``(<S, k> - c) k``; ``outer``: the loss gradient. ``precondition`` and
``orthogonalize`` transform ``d``; ``gd``/``ema`` apply it (``S <- retain S - lr d``, with
momentum ``B <- mu B - lr d; S <- retain S + B``); ``weight_decay`` scales ``S``; ``follow`` adds
a flow; ``dgd`` is the exact proximal step of a linear layer given its inputs. A level that
updates every ``n > 1`` steps sums its directions over its period (at the state it holds, as a
CMS level does, Eq. 71) and applies the sum at its ticks.

Hyperparameters are runtime values: :func:`~nlgraph.compiler.optimizer.skeleton.scan` splits a
spec into a *skeleton* (its structure) and the list of its numbers, so a program compiled once
serves every spec with the same skeleton — an LR scheduler changes numbers, not the program.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from nlgraph._errors import CompileError
from nlgraph.clock import Frequency
from nlgraph.compiler.optimizer import ops
from nlgraph.compiler.optimizer.skeleton import scan
from nlgraph.flows import FlowBase, Read, State, Ticks, references, walk
from nlgraph.level import GraphSpec, Level
from nlgraph.optimizer_graph import lowering_errors
from nlgraph.optimizer_graph import owner as graph_owner
from nlgraph.optimizers import Signal
from nlgraph.topology import tiers
from nlgraph.validation import level_flows, validate

__all__ = ["OptimizerProgram", "Part"]

Tensors = list[torch.Tensor]


def _count(freq: Frequency, step: int) -> int:
    """How many times a level with ``freq`` has updated by outer step ``step`` (inclusive)."""
    n, o = freq.every, freq.offset
    if o == 0:
        return step // n
    return 0 if step < o else (step - o) // n + 1


@dataclass
class Part:
    """The levels that train the parameters one ``params`` level selects."""

    weights: Level
    levels: list[Level]  # tier order, the weights included
    keys: dict[str, list[str]]  # level -> its storage keys (state, buffers)
    needs_inputs: bool = False  # a dgd rule: the step needs each weight's layer inputs
    snapshot: set[str] = field(default_factory=set)  # copied before their update: read at prev


@dataclass
class _Env:
    """One bucket's step: the tensors, the step count and the hyperparameters in force."""

    part: Part
    params: Tensors
    grads: Tensors
    states: list[dict[str, torch.Tensor]]
    step: int
    consts: list[float]
    keys: list[torch.Tensor | None] | None
    memo: dict[str, ops.Value] = field(default_factory=dict)
    prev: dict[str, Tensors] = field(default_factory=dict)
    _lists: dict[str, Tensors] = field(default_factory=dict)

    def tensors(self, key: str) -> Tensors:
        if key == self.part.weights.name:
            return self.params
        out = self._lists.get(key)
        if out is None:
            out = self._lists[key] = [s[key] for s in self.states]
        return out

    def held(self, key: str, at: str) -> Tensors:
        """A state as read ``at="new"`` (now) or ``"prev"`` (before this step's update)."""
        if at == "prev" and key in self.prev:
            return self.prev[key]
        return self.tensors(key)


class OptimizerProgram:
    """The compiled step of one optimizer graph (any numbers with the same skeleton).

    Args:
        spec: the graph; validated here.
        state_names: storage keys for level names in the per-parameter state (e.g.
            ``{"m": "exp_avg"}`` so that a state_dict has torch's layout).
    """

    def __init__(self, spec: GraphSpec, state_names: Mapping[str, str] | None = None) -> None:
        validate(spec)
        if spec.inputs:  # a learner with its optimizer levels: split by the system compiler
            raise CompileError(
                f"graph {spec.name!r} has inputs ({', '.join(i.name for i in spec.inputs)}): "
                "it is a learner, not an optimizer graph; compile a learner with its optimizer "
                "levels with nlgraph.optim.compile_system"
            )
        self.spec = spec
        self.names = dict(state_names or {})
        self.skeleton, self.consts, sites = scan(spec)
        self._slot = {site: i for i, site in enumerate(sites)}
        order = [spec.level(n) for tier in tiers(spec) for n in tier]
        weights = [lv for lv in order if lv.state.kind == "params"]
        if not weights:
            raise CompileError(
                f"optimizer graph {spec.name!r} has no params level; add "
                "g.level('w', state=nl.params(), ...) for the parameters it trains"
            )
        # What compiles is decided in one place (validate reports it for optimizer graphs).
        errors = lowering_errors(spec)
        if errors:
            raise CompileError(errors[0])
        owner = {lv.name: graph_owner(spec, lv) for lv in order}
        self.parts = []
        for w in weights:
            levels = [lv for lv in order if owner[lv.name] == w.name]
            if w.state.select:
                raise CompileError(
                    f"optimizer graph {spec.name!r}, level {w.name!r}: params(select="
                    f"{w.state.select!r}) filters by name, but an optimizer sees tensors without "
                    "names; select by shape (min_ndim/max_ndim), pass the parameters as their "
                    "own param group, or compile the learner with it (compile_system)"
                )
            part = Part(w, levels, {lv.name: self._keys_of(lv) for lv in levels})
            part.needs_inputs = any(r.rule == "dgd" for lv in levels for r in lv.optimizer)
            part.snapshot = self._snapshots(part)
            self.parts.append(part)
        self.fused: Any = None  # a whole-graph kernel, set by the front end (fused.match)
        self._by_ndim: dict[int, Part] = {}
        self._static = {n for n in spec.flows if self._is_static(spec.flows[n])}
        self._fns: dict[tuple[int, str], Callable[[_Env], ops.Value]] = {}

    # ---------------------------------------------------------------------------- planning
    def key(self, name: str) -> str:
        return self.names.get(name, name)

    def _keys_of(self, lv: Level) -> list[str]:
        if lv.state.kind == "params":
            return []
        if lv.state.kind == "mlp":
            return [self.key(f"{lv.name}.W{i}") for i in range(1, lv.state.depth + 1)]
        keys = [self.key(lv.name)]
        if any(getattr(r, "momentum", None) is not None for r in lv.optimizer):
            keys.append(self.key(f"{lv.name}.momentum"))
        if self._slow(lv):
            keys.append(self.key(f"{lv.name}.acc"))
        return keys

    @staticmethod
    def _slow(lv: Level) -> bool:
        return lv.frequency.every > 1 or lv.frequency.offset > 0

    def _snapshots(self, part: Part) -> set[str]:
        """Levels read at ``prev`` by a level that runs after their update (or by themselves
        after their first rule): their state is copied before they update."""
        pos = {lv.name: i for i, lv in enumerate(part.levels)}
        out = set()
        for i, lv in enumerate(part.levels):
            for _, flow in level_flows(lv):
                for kind, ref, at in references(flow, self.spec.flows):
                    later = ref in pos and (
                        pos[ref] < i or (ref == lv.name and len(lv.optimizer) > 1)
                    )
                    if kind in ("state", "read") and at == "prev" and later:
                        out.add(ref)
        return out

    def _is_static(self, flow: FlowBase) -> bool:
        """Whether a named flow has one value through a step (shared by every reader)."""
        for node in walk(flow, self.spec.flows):
            if isinstance(node, Ticks) or (isinstance(node, State | Read) and node.at == "new"):
                return False
        return True

    # ----------------------------------------------------------------------------- binding
    def part_of(self, p: torch.Tensor, level: str | None = None) -> Part:
        """The part whose params level selects ``p`` (by its number of dimensions), or the part
        of params level ``level`` when a param group names it (``{"level": "w"}``)."""
        if level is not None:
            for part in self.parts:
                if part.weights.name == level:
                    return part
            have = ", ".join(pt.weights.name for pt in self.parts)
            raise CompileError(
                f"optimizer graph {self.spec.name!r}: a param group names params level "
                f"{level!r}, but its params levels are {have}"
            )
        part = self._by_ndim.get(p.ndim)
        if part is None:
            hits = [pt for pt in self.parts if pt.weights.state.selects_ndim(p.ndim)]
            if len(hits) != 1:
                have = ", ".join(f"{pt.weights.name}: {pt.weights.state}" for pt in self.parts)
                what = "no" if not hits else "more than one"
                raise CompileError(
                    f"optimizer graph {self.spec.name!r}: a parameter of shape "
                    f"{tuple(p.shape)} matches {what} params level ({have}); select every "
                    "shape exactly once (e.g. muon_adamw adds AdamW for non-matrices)"
                )
            part = self._by_ndim[p.ndim] = hits[0]
        return part

    def init_state(self, part: Part, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Fill the missing entries of ``p``'s state (all of them for a new parameter)."""
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for lv in part.levels:
            std = lv.init.std if lv.init.kind == "normal" else 0.0
            if lv.state.kind == "mlp":
                st = lv.state
                shapes = [(st.d_out, st.width)]
                shapes += [(st.width, st.width)] * (st.depth - 2) + [(st.width, st.d_in)]
                shapes = shapes if st.depth > 1 else [(st.d_out, st.d_in)]
                for key, shape in zip(part.keys[lv.name], shapes, strict=True):
                    if state.get(key) is None:
                        w = torch.empty(shape, dtype=p.dtype, device=p.device)
                        if lv.init.kind == "default":  # nn.Linear's: U(+-1/sqrt(fan_in))
                            state[key] = w.uniform_(-1, 1) / shape[1] ** 0.5
                        else:
                            state[key] = w.normal_(0.0, std) if std else w.zero_()
                continue
            for i, key in enumerate(part.keys[lv.name]):
                if state.get(key) is None:
                    t = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state[key] = t.normal_(0.0, std) if std and i == 0 else t

    # -------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def step(
        self,
        part: Part,
        params: Tensors,
        grads: Tensors,
        states: list[dict[str, torch.Tensor]],
        step: int,
        consts: list[float] | None = None,
        keys: list[torch.Tensor | None] | None = None,
    ) -> None:
        """One update of ``part``'s levels for a bucket of parameters at outer step ``step``
        (1 at the first), in place. ``keys``: each parameter's layer inputs (DGD only)."""
        env = _Env(part, params, grads, states, step, consts or self.consts, keys)
        for lv in part.levels:
            updating = lv.frequency.updates_at(step)
            if updating and lv.name in part.snapshot:  # its held state, not its buffers
                held = part.keys[lv.name] if lv.state.kind == "mlp" else [self.key(lv.name)]
                for k in held:
                    env.prev[k] = torch._foreach_mul(env.tensors(k), 1.0)
            if lv.state.kind == "mlp":
                self._mlp_update(lv, env)
            else:
                self._update(lv, env, updating)

    def _c(self, node: Any, name: str, env: _Env) -> float:
        return env.consts[self._slot[(id(node), name)]]

    def _eval(self, flow: FlowBase, env: _Env, lv: Level) -> ops.Value:
        fn = self._fns.get((id(flow), lv.name))
        if fn is None:
            fn = self._fns[(id(flow), lv.name)] = self._lower(flow, lv)
        return fn(env)

    def _lower(self, flow: FlowBase, lv: Level) -> Callable[[_Env], ops.Value]:
        """A flow as a closure over a step's environment (lowered once, called every step)."""
        op = flow.op
        if op == "const":
            i = self._slot[(id(flow), "value")]
            return lambda env: env.consts[i]
        if op == "grad":
            return lambda env: ops.lazy(env.grads)
        if op == "state":
            key, at = self.key(flow.level), flow.at
            return lambda env: ops.lazy(env.held(key, at))
        if op == "ref":
            name, inner = flow.name, self._lower(self.spec.flows[flow.name], lv)
            if name not in self._static:
                return inner

            def shared(env: _Env) -> ops.Value:  # one value per step, never overwritten
                if name not in env.memo:
                    v = inner(env)
                    env.memo[name] = v if isinstance(v, float) else replace(v, owned=False)
                return env.memo[name]

            return shared
        if op == "unary":
            fn, x = flow.fn, self._lower(flow.x, lv)
            return lambda env: ops.unary(fn, x(env))
        if op == "binary":
            a, b = self._lower(flow.a, lv), self._lower(flow.b, lv)
            if flow.fn == "sub":
                return lambda env: ops.add(a(env), ops.neg(b(env)))
            fn = {"add": ops.add, "mul": ops.mul, "div": ops.div, "pow": ops.power}[flow.fn]
            return lambda env: fn(a(env), b(env))
        if op == "debias":
            freq = self.spec.level(flow.x.level if isinstance(flow.x, State) else lv.name).frequency
            i, x = self._slot[(id(flow), "beta")], self._lower(flow.x, lv)
            return lambda env: ops.div(x(env), 1.0 - env.consts[i] ** _count(freq, env.step))
        if op == "newton_schulz":
            x, args = self._lower(flow.x, lv), (flow.steps, flow.variant, flow.prenorm)
            return lambda env: ops.lazy(
                [
                    ops.newton_schulz(t, *args)
                    for t in ops.materialize(self._as_tensors(x(env), env))
                ],
                owned=True,
            )
        if op == "ticks":
            freq = lv.frequency
            return lambda env: float(_count(freq, env.step))
        if op == "read":
            return lambda env: self._mlp_read(flow, env, lv)
        raise CompileError(f"{self.spec.name!r}: flow {flow} has no optimizer lowering")

    @staticmethod
    def _as_tensors(x: ops.Value, env: _Env) -> ops.Lazy:
        return ops.lazy([torch.full_like(p, x) for p in env.params]) if isinstance(x, float) else x

    def _direction(self, lv: Level, s: Tensors, env: _Env) -> Any:
        """``None``, ``("target", t)`` for ``S - t`` (applied without forming it), or a value."""
        obj = lv.objective
        if obj is None:
            return None
        if obj.kind == "outer":
            return ops.lazy(env.grads)
        if obj.kind == "dot":
            return ops.neg(self._eval(lv.context, env, lv))
        if obj.kind == "l2_to":
            return ("target", self._eval(obj.target, env, lv))
        # keyed l2 on a vector memory: 1/2 (<S, k> - c)^2 per tensor, d = (<S, k> - c) k
        k = ops.materialize(self._as_tensors(self._eval(lv.context.key, env, lv), env))
        c = self._eval(lv.context.value, env, lv)
        if not isinstance(c, float):
            raise CompileError(f"level {lv.name!r}: the value of a keyed memory is one number")
        coef = [dot - c for dot in ops.inner(s, k)]
        return ops.lazy(torch._foreach_mul(k, coef), owned=True)

    @staticmethod
    def _explicit(d: Any, s: Tensors) -> ops.Value:
        return ops.add(ops.lazy(s), ops.neg(d[1])) if isinstance(d, tuple) else d

    def _update(self, lv: Level, env: _Env, updating: bool) -> None:
        s = env.tensors(self.key(lv.name))
        d = self._direction(lv, s, env)
        if self._slow(lv):  # sum the period's directions at the held state (CMS, Eq. 71)
            acc = env.tensors(self.key(f"{lv.name}.acc"))
            if isinstance(d, tuple):
                ops.add_to(acc, ops.lazy(s))
                ops.add_to(acc, d[1], -1.0)
            elif d is not None:
                ops.add_to(acc, d)
            if not updating:
                return
            d = ops.lazy(torch._foreach_mul(acc, 1.0), owned=True)
            torch._foreach_zero_(acc)
        elif not updating:
            return
        if isinstance(d, tuple) and any(r.rule in ("weight_decay", "follow") for r in lv.optimizer):
            d = self._explicit(d, s)  # S - t at the state the step starts from, before S moves
        for rule in lv.optimizer:
            kind = rule.rule
            if kind == "weight_decay":
                _scale_(s, _one_minus(self._scalar(rule, "rate", env, lv)))
            elif kind == "follow":
                ops.add_to(s, self._eval(rule.update, env, lv))
            elif kind == "precondition":
                by = ops.power(self._eval(rule.by, env, lv), self._c(rule, "power", env))
                d = ops.div(self._explicit(d, s), ops.add(by, self._c(rule, "eps", env)))
            elif kind == "newton_schulz":
                x = ops.materialize(self._explicit(d, s))
                d = ops.lazy(
                    [ops.newton_schulz(t, rule.steps, rule.variant) for t in x], owned=True
                )
            elif kind == "dgd":
                self._dgd(rule, s, self._explicit(d, s), env)
            else:
                self._gd(lv, rule, s, d, env)

    def _scalar(self, rule: Any, name: str, env: _Env, lv: Level) -> float | Tensors:
        """A rule's scalar at this update: its number, or a signal's ``scale * act(flow)`` as
        one tensor per parameter (a fresh list the caller only reads). A signal is evaluated
        when its rule applies, after the rules before it in the chain."""
        value = getattr(rule, name)
        if not isinstance(value, Signal):
            return self._c(rule, name, env)
        x = self._eval(value.flow, env, lv)
        if value.act != "identity":
            x = ops.unary(value.act, x)
        x = ops.mul(x, self._c(value, "scale", env))
        if isinstance(x, float):
            return x
        t, sc, owned = ops.plain(x)  # a list of its own: never a state's tensors
        return list(torch._foreach_mul(t, sc)) if sc != 1.0 or not owned else list(t)

    def _gd(self, lv: Level, rule: Any, s: Tensors, d: Any, env: _Env) -> None:
        ema = rule.rule == "ema"
        if ema:
            lr, retain = _one_minus(self._scalar(rule, "beta", env, lv)), None
        else:
            lr = self._scalar(rule, "lr", env, lv)
            retain = None if rule.retain is None else self._scalar(rule, "retain", env, lv)
        mu = None if ema or rule.momentum is None else self._scalar(rule, "momentum", env, lv)
        if any(isinstance(x, list) for x in (lr, retain, mu)):
            self._gd_entrywise(lv, rule, s, d, env, (lr, retain, mu))
            return
        if mu is None:
            if isinstance(d, tuple):  # retain S - lr (S - t) = (retain - lr) S + lr t
                if retain is None or retain == 1.0:
                    ops.lerp_to(s, d[1], lr)
                else:
                    torch._foreach_mul_(s, retain - lr)
                    ops.add_to(s, d[1], lr)
                return
            if retain is not None and retain != 1.0:
                torch._foreach_mul_(s, retain)
            ops.add_to(s, d, -lr)
            return
        d = self._explicit(d, s)
        buf = env.tensors(self.key(f"{lv.name}.momentum"))
        torch._foreach_mul_(buf, mu)
        ops.add_to(buf, d, -lr)
        if retain is not None and retain != 1.0:
            torch._foreach_mul_(s, retain)
        if rule.nesterov:
            ops.add_to(s, ops.lazy(buf), mu)
            ops.add_to(s, d, -lr)
        else:
            ops.add_to(s, ops.lazy(buf))

    def _gd_entrywise(self, lv: Level, rule: Any, s: Tensors, d: Any, env: _Env,
                      scalars: tuple) -> None:  # fmt: skip
        """``_gd`` with a rate per parameter entry (a signal): ``B <- mu B - lr d``,
        ``S <- retain S + B`` (nesterov: ``+ mu B - lr d``), or ``S <- retain S - lr d``."""
        lr, retain, mu = scalars
        d = ops.materialize(self._explicit(d, s))  # S - t is formed before S changes
        step = _times(lr, d)
        if mu is None:
            _scale_(s, retain)
            torch._foreach_sub_(s, step)
            return
        buf = env.tensors(self.key(f"{lv.name}.momentum"))
        _scale_(buf, mu)
        torch._foreach_sub_(buf, step)
        _scale_(s, retain)
        if rule.nesterov:
            torch._foreach_add_(s, _times(mu, buf))
            torch._foreach_sub_(s, step)
        else:
            torch._foreach_add_(s, buf)

    def _dgd(self, rule: Any, s: Tensors, d: ops.Value, env: _Env) -> None:
        lr = self._c(rule, "lr", env)
        b = torch._foreach_mul(s, 1.0)
        ops.add_to(b, d, -lr)
        keys = env.keys or [None] * len(s)
        for w, bw, x in zip(s, b, keys, strict=True):
            if x is None or w.ndim != 2:
                raise RuntimeError(
                    f"DGD needs the inputs of the linear layer of each weight; a parameter of "
                    f"shape {tuple(w.shape)} has none. Call optimizer.watch(model) before the "
                    "forward pass (nn.Linear weights only; train biases with another optimizer)"
                )
            ops.dgd_step(w, bw, x, lr, rule.exact)

    # ------------------------------------------------------------------------- MLP memory
    def _mlp_layers(self, name: str, env: _Env, at: str) -> list[torch.Tensor]:
        keys = env.part.keys[name]
        return [torch.stack(env.held(k, at)) for k in keys]

    def _mlp_read(self, flow: Read, env: _Env, lv: Level) -> ops.Lazy:
        mem = self.spec.level(flow.level)
        xs = ops.materialize(self._as_tensors(self._eval(flow.arg, env, lv), env))
        st = mem.state
        out = ops.elementwise_mlp(self._mlp_layers(mem.name, env, flow.at), xs, st.activation,
                                  st.residual)  # fmt: skip
        parts = out.split([x.numel() for x in xs])
        return ops.lazy([o.view_as(x) for o, x in zip(parts, xs, strict=True)], owned=True)

    def _mlp_update(self, lv: Level, env: _Env) -> None:
        """One GD step, with retention, on ``1/2 mean ||M(k) - v||^2`` over each tensor's
        entries (a mean, so that ``lr`` does not scale with the tensor's size)."""
        rule = lv.optimizer[0]
        lr = self._c(rule, "lr", env)
        retain = 1.0 if rule.retain is None else self._c(rule, "retain", env)
        ctx = lv.context
        k = ops.materialize(self._as_tensors(self._eval(ctx.key, env, lv), env))
        v = ops.materialize(self._as_tensors(self._eval(ctx.value, env, lv), env))
        layers = self._mlp_layers(lv.name, env, "new")
        new = ops.mlp_gd_step(layers, k, v, lv.state.activation, lv.state.residual, lr, retain)
        for key, w in zip(env.part.keys[lv.name], new, strict=True):
            torch._foreach_copy_(env.tensors(key), list(w.unbind(0)))


def _one_minus(x: float | Tensors) -> float | Tensors:
    if isinstance(x, float):
        return 1.0 - x
    out = list(torch._foreach_neg(x))
    torch._foreach_add_(out, 1.0)
    return out


def _scale_(s: Tensors, x: float | Tensors | None) -> None:
    """``S <- x S`` in place (``x`` a number, one tensor per parameter, or ``None``: 1)."""
    if isinstance(x, list) or (x is not None and x != 1.0):
        torch._foreach_mul_(s, x)


def _times(x: float | Tensors, t: Tensors) -> Tensors:
    """``x * t`` as a fresh list."""
    return list(torch._foreach_mul(t, x))
