"""Inner objectives: how a memory measures the quality of its mapping (PAPER.md 1.1, 1.6).

Conventions (one sign convention throughout nlgraph): with read-out ``M(k)`` and value ``v``,

- ``dot``:  ``L = -<M(k), v>``            (Hebbian / linear attention, Eq. 64; momentum with v = -g)
- ``l2``:   ``L = 1/2 ||M(k) - v||^2``     (delta rule, Titans, Eq. 65)
- ``lp``:   ``L = 1/p ||M(k) - v||_p^p``   (Miras / Moneta)
- ``l2_to``: ``L = 1/2 ||S - target||^2`` for a key-less state S (EMA, Adam's moments)
- ``nadaraya_watson``: ``sum_i s(k_i, q) ||v_i - M||^2`` solved exactly (softmax attention, Eq. 62)
- ``outer``: the outer loss of the whole learner (weights trained by backprop)
- ``custom``: a callable ``(prediction, target) -> scalar`` named by import path

A key-less memory (a parameter-shaped state such as a momentum buffer) reads ``M(k) = S``: its
context is the value stream alone.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from nlgraph._base import Spec
from nlgraph.flows import Flow, as_flow

__all__ = [
    "Objective",
    "Dot",
    "L2",
    "Lp",
    "L2To",
    "NadarayaWatson",
    "Outer",
    "Custom",
    "dot",
    "l2",
    "lp",
    "l2_to",
    "nadaraya_watson",
    "outer",
    "custom",
    "NEEDS_VALUE",
]


class Dot(Spec):
    kind: Literal["dot"] = "dot"

    def __str__(self) -> str:
        return "-<M(k), v>"


class L2(Spec):
    kind: Literal["l2"] = "l2"

    def __str__(self) -> str:
        return "½‖M(k) − v‖²"


class Lp(Spec):
    kind: Literal["lp"] = "lp"
    p: Annotated[float, Field(ge=1.0)]

    def __str__(self) -> str:
        return f"‖M(k) − v‖_{self.p:g}^{self.p:g}/{self.p:g}"


class L2To(Spec):
    kind: Literal["l2_to"] = "l2_to"
    target: Flow

    def __str__(self) -> str:
        return f"½‖S − {self.target}‖²"


class NadarayaWatson(Spec):
    kind: Literal["nadaraya_watson"] = "nadaraya_watson"
    temperature: Annotated[float, Field(gt=0)] | None = None  # None: 1/sqrt(d_k)

    def __str__(self) -> str:
        return "Σ s(k,q)‖v − M‖² (exact)"


class Outer(Spec):
    """The outer loss. For a block updated every C tokens (CMS), ``signal`` says how its
    inner gradient is taken: ``None`` (backpropagation through the piece between two ticks,
    exact) or ``"teach"`` (the error ``dL/dy`` at the block's output from one first pass with
    every block held fixed, applied at each boundary; an approximation, docs/compiler.md)."""

    kind: Literal["outer"] = "outer"
    signal: Literal["teach"] | None = None

    def __str__(self) -> str:
        return "outer loss" if self.signal is None else "outer loss (teach signal)"


class Custom(Spec):
    kind: Literal["custom"] = "custom"
    path: str

    def __str__(self) -> str:
        return f"custom({self.path})"


Objective = Annotated[
    Dot | L2 | Lp | L2To | NadarayaWatson | Outer | Custom, Field(discriminator="kind")
]
# Objectives that compare a read-out with a value from the context.
NEEDS_VALUE = ("dot", "l2", "lp", "custom", "nadaraya_watson")


def dot() -> Dot:
    return Dot()


def l2() -> L2:
    return L2()


def lp(p: float) -> Lp:
    return Lp(p=p)


def l2_to(target: object) -> L2To:
    return L2To(target=as_flow(target, "nl.l2_to(target)"))


def nadaraya_watson(temperature: float | None = None) -> NadarayaWatson:
    return NadarayaWatson(temperature=temperature)


def outer(signal: str | None = None) -> Outer:
    """The outer loss; ``signal="teach"`` on a CMS block: its chunk gradient from the
    output error of a first pass (:class:`Outer`)."""
    return Outer(signal=signal)


def custom(path: str) -> Custom:
    return Custom(path=path)
