"""Kinds of level state: what a memory is made of.

Dimensions are ints or symbolic names (``"d"``, ``"d_head"``) bound at compile time.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from nlgraph._base import Spec

__all__ = [
    "StateKind",
    "Dim",
    "ACTIVATIONS",
    "Params",
    "Like",
    "Tensor",
    "Linear",
    "MLP",
    "Conv",
    "Module",
    "NonParametric",
    "params",
    "like",
    "tensor",
    "linear",
    "mlp",
    "conv",
    "module",
    "nonparametric",
]

Dim = Annotated[int, Field(ge=1)] | Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
ACTIVATIONS = ("silu", "gelu", "relu", "tanh", "sigmoid", "identity")
Activation = Literal["silu", "gelu", "relu", "tanh", "sigmoid", "identity"]


class Params(Spec):
    """A parameter set bound at compile time (a model's weights, an optimizer's param group).

    ``min_ndim``/``max_ndim`` select parameters by their number of dimensions, so one optimizer
    graph can treat matrices and the rest differently (Muon and M3 orthogonalise matrices and
    leave biases and norms to AdamW, PAPER.md 2.8).
    """

    kind: Literal["params"] = "params"
    select: str | None = None  # a name filter on the bound module's parameters (e.g. "*.weight")
    min_ndim: Annotated[int, Field(ge=0)] | None = None
    max_ndim: Annotated[int, Field(ge=0)] | None = None

    @model_validator(mode="after")
    def _ndim_range(self) -> Params:
        lo, hi = self.min_ndim, self.max_ndim
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(
                f"min_ndim={lo} > max_ndim={hi} selects no parameter; e.g. params(min_ndim=2) "
                "for matrices and params(max_ndim=1) for the rest"
            )
        return self

    def selects_ndim(self, ndim: int) -> bool:
        """Whether a parameter with ``ndim`` dimensions belongs to this set."""
        return (self.min_ndim is None or ndim >= self.min_ndim) and (
            self.max_ndim is None or ndim <= self.max_ndim
        )

    def __str__(self) -> str:
        sel = [self.select] if self.select else []
        if self.min_ndim is not None:
            sel.append(f"ndim>={self.min_ndim}")
        if self.max_ndim is not None:
            sel.append(f"ndim<={self.max_ndim}")
        return "params" + (f"[{', '.join(sel)}]" if sel else "")


class Like(Spec):
    """A tensor (per parameter, for parameter sets) shaped like ``level``'s state."""

    kind: Literal["like"] = "like"
    level: str

    def __str__(self) -> str:
        return f"like({self.level})"


class Tensor(Spec):
    """A tensor of a declared shape."""

    kind: Literal["tensor"] = "tensor"
    shape: tuple[Dim, ...]

    def __str__(self) -> str:
        return "tensor[" + ", ".join(map(str, self.shape)) + "]"


class Linear(Spec):
    """A linear map ``d_in -> d_out`` (a projection, or a matrix memory read out as ``M k``)."""

    kind: Literal["linear"] = "linear"
    d_in: Dim
    d_out: Dim
    bias: bool = False

    def __str__(self) -> str:
        return f"linear({self.d_in}→{self.d_out})"


class MLP(Spec):
    """An MLP of ``depth`` layers (hidden width ``width``); ``residual`` adds the input
    (``M(z) = z + W1 σ(W2 z)``, Eq. 89), which needs ``d_in == d_out``."""

    kind: Literal["mlp"] = "mlp"
    d_in: Dim
    d_out: Dim
    width: Dim
    depth: Annotated[int, Field(ge=1, le=64)] = 2
    activation: Activation = "silu"
    residual: bool = False

    @model_validator(mode="after")
    def _residual_needs_square(self) -> MLP:
        if self.residual and self.d_in != self.d_out:
            raise ValueError(
                f"a residual MLP needs d_in == d_out, got d_in={self.d_in!r}, "
                f"d_out={self.d_out!r}; "
                "set residual=False or make the widths equal"
            )
        return self

    def __str__(self) -> str:
        res = ", residual" if self.residual else ""
        shape = f"{self.d_in}→{self.d_out}, depth {self.depth}, width {self.width}"
        return f"mlp({shape}, {self.activation}{res})"


class Conv(Spec):
    """A causal depthwise 1-D convolution over time with ``window`` taps (PAPER.md 4.6)."""

    kind: Literal["conv"] = "conv"
    dim: Dim
    window: Annotated[int, Field(ge=1, le=1024)] = 4

    def __str__(self) -> str:
        return f"conv(window {self.window})"


class Module(Spec):
    """Any ``nn.Module`` named by import path (``"pkg.mod:Class"``), built with ``kwargs``."""

    kind: Literal["module"] = "module"
    path: str
    kwargs: dict[str, int | float | str | bool | None | list[int | float | str]] = Field(
        default_factory=dict
    )

    def __str__(self) -> str:
        return f"module({self.path})"


class NonParametric(Spec):
    """No parameters: the memory is its context (softmax attention as the Nadaraya–Watson
    solution, Eq. 62; ``window`` tokens for sliding-window attention, Eq. 63)."""

    kind: Literal["nonparametric"] = "nonparametric"
    window: Annotated[int, Field(ge=1)] | None = None

    def __str__(self) -> str:
        return "non-parametric" + (f" (window {self.window})" if self.window else "")


StateKind = Annotated[
    Params | Like | Tensor | Linear | MLP | Conv | Module | NonParametric,
    Field(discriminator="kind"),
]


def params(
    select: str | None = None, min_ndim: int | None = None, max_ndim: int | None = None
) -> Params:
    return Params(select=select, min_ndim=min_ndim, max_ndim=max_ndim)


def like(level: str) -> Like:
    return Like(level=level)


def tensor(*shape: int | str) -> Tensor:
    return Tensor(shape=shape)


def linear(d_in: int | str, d_out: int | str, bias: bool = False) -> Linear:
    return Linear(d_in=d_in, d_out=d_out, bias=bias)


def mlp(
    d_in: int | str,
    d_out: int | str | None = None,
    width: int | str | None = None,
    depth: int = 2,
    activation: str = "silu",
    residual: bool = False,
) -> MLP:
    d_out = d_in if d_out is None else d_out
    return MLP(
        d_in=d_in,
        d_out=d_out,
        width=d_in if width is None else width,
        depth=depth,
        activation=activation,  # type: ignore[arg-type]
        residual=residual,
    )


def conv(dim: int | str, window: int = 4) -> Conv:
    return Conv(dim=dim, window=window)


def module(path: str, **kwargs: object) -> Module:
    return Module(path=path, kwargs=kwargs)  # type: ignore[arg-type]


def nonparametric(window: int | None = None) -> NonParametric:
    return NonParametric(window=window)
