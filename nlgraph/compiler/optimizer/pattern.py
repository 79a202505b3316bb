"""Recognise Adam by the structure of an optimizer graph, whatever its names and numbers.

A graph is Adam-shaped when it is exactly these levels (PAPER.md 2.3, App. B, Eqs. 100–105):

- one ``params`` level ``w``: ``W <- (1 - rate) W + c * debias(m, b1') / (sqrt(debias(d, b2'))
  + eps)``, the decoupled ``weight_decay(rate)`` optional (AdamW), ``c = -lr``;
- ``m``: ``like`` the parameters, updated every step, ``ema(b1)`` on ``l2_to(G)``;
- ``v``: the same with ``ema(b2)`` on ``l2_to(G²)``;
- ``d`` is ``v``, or (AMSGrad) a third level ``vmax <- vmax + relu(v - vmax)``;

where the gradient stream ``G`` is ``grad_of(w)`` or, with an L2 penalty on the outer loss,
``grad_of(w) + wd * w[prev]`` (not both penalties at once: no kernel has both). Sums and
products match in either operand order and named flows (``g.let``) are followed. The moments
start at zero. Anything else — a delta-rule first moment, ``v`` an EMA of ``|G|``, a fourth
memory, a slower level — is not Adam-shaped.

The match is structural: where each hyperparameter sits is an index into the spec's numbers
(:func:`~nlgraph.compiler.optimizer.skeleton.scan`), so it holds for every spec with the same
skeleton. A beta written twice (its EMA and its debias) is two numbers; :class:`AdamShape`
lists such pairs in ``ties``, which must agree for the numbers to be Adam's. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from nlgraph.flows import Binary, Const, Debias, FlowBase, Grad, Ref, State, Unary
from nlgraph.level import GraphSpec, Level
from nlgraph.optimizers import EMA, Follow, WeightDecay

__all__ = ["AdamShape", "adam_shape"]

_ZERO_INITS = ("default", "zeros")


@dataclass(frozen=True)
class AdamShape:
    """Where an Adam-shaped graph keeps its levels and its numbers.

    Attributes:
        m, v, vmax: level names of the moments (``vmax`` ``None`` without AMSGrad).
        decay: ``"coupled"`` (L2 on the loss: the moments see ``G + wd W``), ``"decoupled"``
            (``W <- (1 - rate) W``, with ``rate = lr * wd``) or ``None``.
        at: ``lr``, ``beta1``, ``beta2``, ``eps`` (and ``decay`` when there is one) -> index
            into the numbers. ``lr``'s number is ``-lr``; decoupled ``decay``'s is ``lr * wd``.
        ties: pairs of indices whose numbers must be equal for the graph to be Adam.
    """

    m: str
    v: str
    vmax: str | None
    decay: str | None
    at: dict[str, int]
    ties: tuple[tuple[int, int], ...]


def _every_step(lv: Level) -> bool:
    f = lv.frequency
    return (f.unit, f.every, f.offset) == ("step", 1, 0)


class _NoMatch(Exception):
    """The graph departs from Adam's structure here (internal: ends the match)."""


def adam_shape(spec: GraphSpec, slot: dict[tuple[int, str], int]) -> AdamShape | None:
    """The Adam structure of ``spec``, or ``None``. ``slot``: ``(id(node), field)`` -> index of
    that number, from the spec's :func:`~nlgraph.compiler.optimizer.skeleton.scan`."""
    try:
        return _Matcher(spec, slot).adam()
    except _NoMatch:
        return None


class _Matcher:
    def __init__(self, spec: GraphSpec, slot: dict[tuple[int, str], int]) -> None:
        self.spec, self.slot = spec, slot

    # ------------------------------------------------------------------------------ pieces
    def num(self, node: object, field: str) -> int:
        """The index of a constant number (a learned or signalled one does not match)."""
        i = self.slot.get((id(node), field))
        if i is None:
            raise _NoMatch
        return i

    def flow(self, flow: object) -> FlowBase:
        """``flow`` with named flows followed."""
        for _ in range(len(self.spec.flows) + 1):  # a validated graph has no cycle of names
            if not isinstance(flow, Ref):
                break
            flow = self.spec.flows.get(flow.name)
        if not isinstance(flow, FlowBase) or isinstance(flow, Ref):
            raise _NoMatch
        return flow

    def binary(self, flow: object, fn: str) -> tuple[FlowBase, FlowBase]:
        node = self.flow(flow)
        if not isinstance(node, Binary) or node.fn != fn:
            raise _NoMatch
        return node.a, node.b

    @staticmethod
    def either(a: object, b: object, first: Callable[[object], Any],
               second: Callable[[object], Any]) -> tuple[Any, Any]:  # fmt: skip
        """``(first(a), second(b))`` or, for a commutative op, ``(first(b), second(a))``."""
        try:
            return first(a), second(b)
        except _NoMatch:
            return first(b), second(a)

    def unary(self, flow: object, fn: str) -> FlowBase:
        node = self.flow(flow)
        if not isinstance(node, Unary) or node.fn != fn:
            raise _NoMatch
        return node.x

    def const(self, flow: object) -> int:
        node = self.flow(flow)
        if not isinstance(node, Const):
            raise _NoMatch
        return self.num(node, "value")

    def state(self, flow: object, at: tuple[str, ...] = ("new",)) -> str:
        node = self.flow(flow)
        if not isinstance(node, State) or node.at not in at:
            raise _NoMatch
        return node.level

    def debias(self, flow: object) -> tuple[str, int]:
        """``debias(state(X), beta)`` -> ``(X, index of beta)``."""
        node = self.flow(flow)
        if not isinstance(node, Debias):
            raise _NoMatch
        return self.state(node.x), self.num(node, "beta")

    def level(self, name: str) -> Level:
        for lv in self.spec.levels:
            if lv.name == name:
                return lv
        raise _NoMatch

    # ------------------------------------------------------------------------------- Adam
    def adam(self) -> AdamShape:
        weights = [lv for lv in self.spec.levels if lv.state.kind == "params"]
        if len(weights) != 1:
            raise _NoMatch
        w = weights[0]
        if (
            not _every_step(w)
            or w.context is not None
            or (w.objective is not None and w.objective.kind != "outer")
        ):
            raise _NoMatch
        rules = w.optimizer
        if not rules or len(rules) > 2 or not isinstance(rules[-1], Follow):
            raise _NoMatch
        follow, decay_rules = rules[-1], rules[:-1]
        at: dict[str, int] = {}
        if decay_rules:
            if not isinstance(decay_rules[0], WeightDecay):
                raise _NoMatch
            at["decay"] = self.num(decay_rules[0], "rate")
        # the step: c * debias(m, b1) / (sqrt(debias(d, b2)) + eps)
        top, bottom = self.binary(follow.update, "div")
        at["lr"], (m, b1_debias) = self.either(*self.binary(top, "mul"), self.const, self.debias)
        (d, b2_debias), at["eps"] = self.either(
            *self.binary(bottom, "add"), lambda f: self.debias(self.unary(f, "sqrt")), self.const
        )
        v, vmax = d, None
        if self.level(d).objective is None:  # AMSGrad: d is the running maximum of v
            v, vmax = self._running_max(self.level(d)), d
        (m_decay, at["beta1"]), (v_decay, at["beta2"]) = (
            self._moment(self.level(m), w.name, square=False),
            self._moment(self.level(v), w.name, square=True),
        )
        names = {w.name, m, v} | ({vmax} if vmax else set())
        if len(names) != (4 if vmax else 3) or {lv.name for lv in self.spec.levels} != names:
            raise _NoMatch  # every level is one of Adam's, each once
        ties = [(at["beta1"], b1_debias), (at["beta2"], b2_debias)]
        if (m_decay is None) != (v_decay is None):
            raise _NoMatch  # both moments see the same stream
        kind = "decoupled" if decay_rules else None
        if m_decay is not None:
            if decay_rules:
                raise _NoMatch  # coupled and decoupled decay together: no fused kernel
            kind, at["decay"] = "coupled", m_decay
            ties.append((m_decay, v_decay))
        ties = tuple((i, j) for i, j in ties if i != j)
        return AdamShape(m=m, v=v, vmax=vmax, decay=kind, at=at, ties=ties)

    def _moment(self, lv: Level, w: str, *, square: bool) -> tuple[int | None, int]:
        """An EMA of the gradient stream (``square``: of its square), from zero, every step:
        ``(index of the coupled decay or None, index of beta)``."""
        obj, rules = lv.objective, lv.optimizer
        if (
            lv.state.kind != "like"
            or not _every_step(lv)
            or lv.context is not None
            or lv.init.kind not in _ZERO_INITS
            or obj is None
            or obj.kind != "l2_to"
            or len(rules) != 1
            or not isinstance(rules[0], EMA)
        ):
            raise _NoMatch
        stream = self.unary(obj.target, "square") if square else obj.target
        return self._stream(stream, w), self.num(rules[0], "beta")

    def _stream(self, flow: object, w: str) -> int | None:
        """``grad_of(w)`` -> ``None``; ``grad_of(w) + wd * w[prev]`` -> the index of ``wd``."""

        def grad(f: object) -> None:
            node = self.flow(f)
            if not isinstance(node, Grad) or node.wrt != w or node.objective != "loss":
                raise _NoMatch

        def penalty(f: object) -> int:
            wd, weights = self.either(*self.binary(f, "mul"), self.const,
                                      lambda x: self.state(x, ("prev",)))  # fmt: skip
            if weights != w:
                raise _NoMatch
            return wd

        if isinstance(self.flow(flow), Grad):
            return grad(flow)
        return self.either(*self.binary(flow, "add"), grad, penalty)[1]

    def _running_max(self, lv: Level) -> str:
        """``vmax <- vmax + relu(v - vmax)`` (from zero, every step) -> ``v``."""
        rules = lv.optimizer
        if (
            lv.state.kind != "like"
            or not _every_step(lv)
            or lv.context is not None
            or lv.init.kind not in _ZERO_INITS
            or len(rules) != 1
            or not isinstance(rules[0], Follow)
        ):
            raise _NoMatch
        v, held = self.binary(self.unary(rules[0].update, "relu"), "sub")
        if self.state(held, ("prev", "new")) != lv.name:
            raise _NoMatch
        return self.state(v)
