"""One global clock: update frequencies, offsets, and the init/reset rules of fast state.

Time is counted in four nested units (PAPER.md 1.2): ``token`` (one data point of a sequence),
``chunk`` (a level's chunk of tokens), ``sequence`` (one context), and ``step`` (one outer
optimizer step over a batch). ``never`` marks state that is frozen after construction.
A level's frequency is ``every(n, unit, offset)``: it updates at ticks ``offset, offset + n, ...``
of ``unit`` (counting from 1; offset 0 means ticks ``n, 2n, ...``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from nlgraph._base import Spec

__all__ = [
    "UNITS",
    "Frequency",
    "every",
    "per_token",
    "per_chunk",
    "per_sequence",
    "per_step",
    "frozen",
    "Reset",
    "reset_per_sequence",
    "reset_never",
    "reset_every",
    "reset_with",
    "Init",
    "Default",
    "Zeros",
    "Normal",
    "Identity",
    "Meta",
    "FromPath",
    "zeros",
    "normal",
    "identity",
    "meta",
    "from_path",
]

Unit = Literal["token", "chunk", "sequence", "step", "never"]
UNITS: tuple[str, ...] = ("token", "chunk", "sequence", "step", "never")
# Rank of each unit on the clock: smaller is faster. token and chunk share rank 0 and are compared
# by their period in tokens.
_UNIT_RANK = {"token": 0, "chunk": 0, "sequence": 1, "step": 2, "never": 3}


class Frequency(Spec):
    """How often a level updates: every ``every`` ticks of ``unit``, shifted by ``offset``."""

    every: Annotated[int, Field(ge=1)] = 1
    unit: Unit = "token"
    offset: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _offset_below_period(self) -> Frequency:
        if self.offset >= self.every and self.unit != "never":
            raise ValueError(
                f"offset {self.offset} must be smaller than the period every={self.every}; "
                f"an offset of {self.offset % self.every} gives the same ticks"
            )
        return self

    def period_key(self, chunk: int | None = None) -> tuple[int, int]:
        """A sort key on the global clock: smaller means faster (more updates per unit time).

        ``chunk`` is the chunk size in tokens used when ``unit == "chunk"``.
        """
        rank = _UNIT_RANK[self.unit]
        if self.unit == "never":
            return (rank, 0)
        period = self.every * (chunk or 1) if self.unit == "chunk" else self.every
        return (rank, period)

    def period_tokens(self, chunk: int | None = None) -> int | None:
        """The period in tokens for token/chunk units, else ``None``."""
        if self.unit == "token":
            return self.every
        if self.unit == "chunk":
            return self.every * (chunk or 1)
        return None

    def updates_at(self, tick: int) -> bool:
        """Whether the level updates at ``tick`` (1-based) of its own unit."""
        if self.unit == "never":
            return False
        return tick >= 1 and (tick - self.offset) % self.every == 0 and tick >= max(self.offset, 1)

    def __str__(self) -> str:
        if self.unit == "never":
            return "frozen"
        base = f"every {self.unit}" if self.every == 1 else f"every {self.every} {self.unit}s"
        return base + (f" (+{self.offset})" if self.offset else "")


def every(n: int, unit: Unit = "token", offset: int = 0) -> Frequency:
    """Update every ``n`` ticks of ``unit`` (``token``, ``chunk``, ``sequence``, ``step``)."""
    return Frequency(every=n, unit=unit, offset=offset)


def per_token() -> Frequency:
    return Frequency(every=1, unit="token")


def per_chunk(n: int = 1) -> Frequency:
    return Frequency(every=n, unit="chunk")


def per_sequence() -> Frequency:
    return Frequency(every=1, unit="sequence")


def per_step(n: int = 1) -> Frequency:
    return Frequency(every=n, unit="step")


def frozen() -> Frequency:
    """Never updated after initialisation (e.g. a pre-trained block held fixed)."""
    return Frequency(every=1, unit="never")


# ----------------------------------------------------------------------------------------- reset


class Reset(Spec):
    """When a level's fast state returns to its initial value.

    ``sequence``: at the start of every sequence (the default for in-context memories);
    ``never``: persistent (continual learning); ``every``: every ``n`` ticks of ``unit``;
    ``with``: when the chunk of the (slower) level ``level`` ends — the nested-CMS rule (Eq. 72).
    """

    kind: Literal["sequence", "never", "every", "with"] = "sequence"
    n: Annotated[int, Field(ge=1)] | None = None
    unit: Unit | None = None
    level: str | None = None

    @model_validator(mode="after")
    def _fields_match_kind(self) -> Reset:
        if self.kind == "every":
            if self.n is None or self.unit is None:
                raise ValueError(
                    "reset kind 'every' needs n and unit, e.g. reset_every(4, 'chunk')"
                )
            if self.unit == "never":
                raise ValueError("reset_every with unit 'never' never resets; use reset_never()")
        elif self.n is not None or self.unit is not None:
            raise ValueError(f"reset kind {self.kind!r} takes no n/unit")
        if self.kind == "with":
            if not self.level:
                raise ValueError("reset kind 'with' needs the enclosing level's name")
        elif self.level is not None:
            raise ValueError(f"reset kind {self.kind!r} takes no level")
        return self

    def __str__(self) -> str:
        if self.kind == "every":
            return f"reset every {self.n} {self.unit}s"
        if self.kind == "with":
            return f"reset with {self.level}"
        return {"sequence": "reset per sequence", "never": "never reset"}[self.kind]


def reset_per_sequence() -> Reset:
    return Reset(kind="sequence")


def reset_never() -> Reset:
    return Reset(kind="never")


def reset_every(n: int, unit: Unit = "token") -> Reset:
    return Reset(kind="every", n=n, unit=unit)


def reset_with(level: str) -> Reset:
    """Reset when the enclosing, slower ``level`` finishes a chunk (nested CMS, Eq. 72)."""
    return Reset(kind="with", level=level)


# ------------------------------------------------------------------------------------------ init


class Default(Spec):
    """The state kind's natural start: zeros for memories and tensors (an empty memory), the
    framework's own initialisation for modules (projections, MLPs, convolutions)."""

    kind: Literal["default"] = "default"

    def __str__(self) -> str:
        return "default"


class Zeros(Spec):
    kind: Literal["zeros"] = "zeros"

    def __str__(self) -> str:
        return "zeros"


class Normal(Spec):
    kind: Literal["normal"] = "normal"
    std: Annotated[float, Field(gt=0)] = 0.02

    def __str__(self) -> str:
        return f"normal({self.std:g})"


class Identity(Spec):
    kind: Literal["identity"] = "identity"

    def __str__(self) -> str:
        return "identity"


class Meta(Spec):
    """The initial state is a parameter of a slower level, learned by it (MAML-like, Eq. 28).

    ``level=None`` means the outermost level (pre-training, updated every outer step).
    """

    kind: Literal["meta"] = "meta"
    level: str | None = None

    def __str__(self) -> str:
        return f"meta({self.level})" if self.level else "meta"


class FromPath(Spec):
    """The initial state comes from a callable named by import path (resolved at compile time),
    e.g. a pre-trained MLP for ad-hoc level stacking (PAPER.md 5.5)."""

    kind: Literal["path"] = "path"
    path: str

    def __str__(self) -> str:
        return f"from {self.path}"


Init = Annotated[Default | Zeros | Normal | Identity | Meta | FromPath, Field(discriminator="kind")]


def zeros() -> Zeros:
    return Zeros()


def normal(std: float = 0.02) -> Normal:
    return Normal(std=std)


def identity() -> Identity:
    return Identity()


def meta(level: str | None = None) -> Meta:
    return Meta(level=level)


def from_path(path: str) -> FromPath:
    return FromPath(path=path)
