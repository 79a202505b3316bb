"""Inner optimizers: the update rules that make a level's state follow its objective.

An optimizer is a chain of small rules, applied in order (optax-style composition, STYLE.md 8):
``gd`` (with momentum and retention), ``dgd`` (delta gradient descent, PAPER.md 3.1), ``ema``,
``precondition`` (Adam-style division by a second moment), ``newton_schulz`` (orthogonalise the
update, Muon), ``weight_decay`` and ``follow`` (the update is another level's state: "this
optimizer's state is itself a level", e.g. ``W <- W + m``). ``exact`` marks a non-parametric
closed-form solution (softmax attention).

Scalars (learning rates, momenta, retention gates) are a constant, a :class:`Learned` scalar
(a parameter of the outer level) or a :class:`Signal` produced by another node per token
(data-dependent gates, as in Titans and Hope).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from nlgraph._base import Spec
from nlgraph.flows import Flow, FlowBase, as_flow

__all__ = [
    "Scalar",
    "Learned",
    "Signal",
    "learned",
    "signal",
    "Rule",
    "GD",
    "DGD",
    "EMA",
    "Precondition",
    "NewtonSchulzRule",
    "WeightDecay",
    "Follow",
    "Exact",
    "gd",
    "dgd",
    "ema",
    "precondition",
    "orthogonalize",
    "weight_decay",
    "follow",
    "exact",
    "chain",
    "describe",
    "scalar_fields",
]


class Learned(Spec):
    """A scalar learned by the outer level, initialised at ``init`` and kept in ``[lo, hi]``."""

    kind: Literal["learned"] = "learned"
    init: float
    lo: float | None = None
    hi: float | None = None

    def __str__(self) -> str:
        return f"learned({self.init:g})"


class Signal(Spec):
    """A data-dependent scalar per token: ``scale * act(flow)`` (e.g. ``sigmoid(W_a x)``)."""

    kind: Literal["signal"] = "signal"
    flow: Flow
    act: Literal["identity", "sigmoid", "softplus", "exp"] = "sigmoid"
    scale: float = 1.0

    def __str__(self) -> str:
        s = f"{self.act}({self.flow})" if self.act != "identity" else str(self.flow)
        return s if self.scale == 1.0 else f"{self.scale:g}·{s}"


Scalar = float | Annotated[Learned | Signal, Field(discriminator="kind")]


def learned(init: float, lo: float | None = None, hi: float | None = None) -> Learned:
    return Learned(init=init, lo=lo, hi=hi)


def signal(flow: object, act: str = "sigmoid", scale: float = 1.0) -> Signal:
    return Signal(flow=as_flow(flow, "nl.signal(flow)"), act=act, scale=scale)  # type: ignore[arg-type]


def _s(x: Scalar | None) -> str:
    return f"{x:g}" if isinstance(x, float | int) else str(x)


class GD(Spec):
    """Gradient descent on the level's objective, with optional momentum and retention.

    ``S <- momentum * S - lr * grad``;  ``M <- retain * M + S``  (Titans' surprise momentum and
    forgetting, PAPER.md 4.1; without momentum ``M <- retain * M - lr * grad``, Eq. 64).
    """

    rule: Literal["gd"] = "gd"
    lr: Scalar
    momentum: Scalar | None = None
    retain: Scalar | None = None
    nesterov: bool = False

    def __str__(self) -> str:
        parts = [f"lr={_s(self.lr)}"]
        if self.momentum is not None:
            parts.append(f"momentum={_s(self.momentum)}" + (", nesterov" if self.nesterov else ""))
        if self.retain is not None:
            parts.append(f"retain={_s(self.retain)}")
        return "GD(" + ", ".join(parts) + ")"


class DGD(Spec):
    """Delta gradient descent (PAPER.md 3.1, Eqs. 56–57, 88): GD whose value is regressed with
    L2 instead of matched by a dot product, so the step first erases the old association along
    the input. Per linear map (each layer of an MLP memory) with input ``x`` and output error
    ``delta = d objective / d output``:

    ``W <- W (retain I - lr' x x^T) - lr' delta x^T``, ``lr' = lr / (1 + lr ||x||^2)`` when
    ``exact`` (the exact proximal step size), else ``lr' = lr`` (Eq. 88 as printed).

    On the ``dot`` objective (``delta = -v``) this is the exact minimiser of
    ``1/2 ||W k - v||^2 + 1/(2 lr) ||W - W_prev||^2``; on ``l2`` (``delta = W k - v``) the decay
    along ``k`` counts twice, as Hope's Eq. 88 with the L2 objective is written (PAPER.md 4.4).
    """

    rule: Literal["dgd"] = "dgd"
    lr: Scalar
    retain: Scalar | None = None
    momentum: Scalar | None = None
    exact: bool = True
    # With momentum: S <- mu S - (1 - mu) lr' grad (an average of recent gradient terms, the
    # same step size as without momentum) instead of S <- mu S - lr' grad.
    dampen: bool = False

    def __str__(self) -> str:
        parts = [f"lr={_s(self.lr)}"]
        if self.retain is not None:
            parts.append(f"retain={_s(self.retain)}")
        if self.momentum is not None:
            parts.append(f"momentum={_s(self.momentum)}" + (", dampened" if self.dampen else ""))
        if not self.exact:
            parts.append("literal")
        return "DGD(" + ", ".join(parts) + ")"


class EMA(Spec):
    """``S <- beta S + (1 - beta) target``: one GD step of size ``1 - beta`` on ``l2_to``."""

    rule: Literal["ema"] = "ema"
    beta: Scalar

    def __str__(self) -> str:
        return f"EMA(β={_s(self.beta)})"


class Precondition(Spec):
    """Adam-style preconditioning of the update: ``u / (by ** power + eps)``."""

    rule: Literal["precondition"] = "precondition"
    by: Flow
    power: Annotated[float, Field(gt=0)] = 0.5
    eps: Annotated[float, Field(ge=0)] = 1e-8

    def __str__(self) -> str:
        return f"precondition(÷ {self.by}^{self.power:g})"


class NewtonSchulzRule(Spec):
    """Orthogonalise the update with ``steps`` Newton–Schulz iterations (Muon, Eqs. 42–44)."""

    rule: Literal["newton_schulz"] = "newton_schulz"
    steps: Annotated[int, Field(ge=1, le=100)] = 5
    variant: Literal["cubic", "quintic"] = "quintic"

    def __str__(self) -> str:
        return f"NewtonSchulz({self.steps}, {self.variant})"


class WeightDecay(Spec):
    """Decoupled weight decay: ``S <- (1 - rate) S`` before the update (AdamW)."""

    rule: Literal["weight_decay"] = "weight_decay"
    rate: Scalar

    def __str__(self) -> str:
        return f"weight_decay({_s(self.rate)})"


class Follow(Spec):
    """The update is a flow over other levels' states: ``S <- S + update`` (nesting)."""

    rule: Literal["follow"] = "follow"
    update: Flow

    def __str__(self) -> str:
        return f"+= {self.update}"


class Exact(Spec):
    """The objective is solved exactly, without parameters (non-parametric memories)."""

    rule: Literal["exact"] = "exact"

    def __str__(self) -> str:
        return "exact"


Rule = Annotated[
    GD | DGD | EMA | Precondition | NewtonSchulzRule | WeightDecay | Follow | Exact,
    Field(discriminator="rule"),
]


def gd(
    lr: Scalar,
    momentum: Scalar | None = None,
    retain: Scalar | None = None,
    nesterov: bool = False,
) -> GD:
    return GD(lr=lr, momentum=momentum, retain=retain, nesterov=nesterov)


def dgd(
    lr: Scalar,
    retain: Scalar | None = None,
    momentum: Scalar | None = None,
    exact: bool = True,
    dampen: bool = False,
) -> DGD:
    return DGD(lr=lr, retain=retain, momentum=momentum, exact=exact, dampen=dampen)


def ema(beta: Scalar) -> EMA:
    return EMA(beta=beta)


def precondition(by: object, power: float = 0.5, eps: float = 1e-8) -> Precondition:
    return Precondition(by=as_flow(by, "nl.precondition(by)"), power=power, eps=eps)


def orthogonalize(steps: int = 5, variant: str = "quintic") -> NewtonSchulzRule:
    return NewtonSchulzRule(steps=steps, variant=variant)  # type: ignore[arg-type]


def weight_decay(rate: Scalar) -> WeightDecay:
    return WeightDecay(rate=rate)


def follow(update: object) -> Follow:
    return Follow(update=as_flow(update, "nl.follow(update)"))


def exact() -> Exact:
    return Exact()


def chain(*rules: Spec) -> tuple[Spec, ...]:
    """Apply ``rules`` in order; the result is what a level's ``optimizer=`` takes."""
    out: list[Spec] = []
    for r in rules:
        out.extend(r if isinstance(r, tuple) else (r,))
    return tuple(out)


def describe(rules: tuple[Spec, ...] | None) -> str:
    if not rules:
        return "none"
    return " → ".join(str(r) for r in rules)


def scalar_fields(rule: Spec) -> dict[str, Scalar]:
    """The scalar hyperparameters of a rule that are set (name -> scalar)."""
    names = {
        "gd": ("lr", "momentum", "retain"),
        "dgd": ("lr", "retain", "momentum"),
        "ema": ("beta",),
        "weight_decay": ("rate",),
    }.get(getattr(rule, "rule", ""), ())
    return {n: getattr(rule, n) for n in names if getattr(rule, n) is not None}


def _flows_of(rule: Spec) -> list[FlowBase]:
    flows: list[FlowBase] = []
    for v in scalar_fields(rule).values():
        if isinstance(v, Signal):
            flows.append(v.flow)
    for n in ("by", "update"):
        v = getattr(rule, n, None)
        if isinstance(v, FlowBase):
            flows.append(v)
    return flows
