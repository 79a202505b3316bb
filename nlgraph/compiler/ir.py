"""The compiler's typed intermediate form below the plan: what each lowering is told.

A :class:`~nlgraph.compiler.plan.Plan` says which lowering runs each level (:class:`Lowering`);
the program builder then gives each fast level one frozen configuration, a member of the tagged
union :data:`MemoryConfig` (:class:`LinearMemoryConfig`, :class:`DeepMemoryConfig`,
:class:`AttentionConfig`, :class:`ReferenceLoopConfig`), and each CMS block its rule chain. The
scalars of rules are :data:`Scalar` values (:class:`NoScalar`, :class:`Const`, :class:`Learned`,
:class:`PerToken`) and the rules of a chain are :data:`Rule` values. Integers named ``arg``
index the per-token inputs the generated program hands the lowering (key, value, queries, then
the flows of signals and preconditioners, in that order).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "Lowering", "Role",
    "Scalar", "NoScalar", "Const", "Learned", "PerToken",
    "Rule", "GDStep", "DGDStep", "EMAStep", "DecayStep", "PreconditionStep", "OrthogonalizeStep",
    "Objective", "Schedule",
    "MemoryConfig", "MemoryBase", "LinearMemoryConfig", "DeepMemoryConfig", "ClusterMemberConfig",
    "AttentionConfig", "ReferenceLoopConfig",
]  # fmt: skip


class Lowering(str, enum.Enum):
    """How a level runs (docs/compiler.md, "Lowerings"). A ``str`` enum: prints as its value."""

    PARAMETER = "parameter"
    LINEAR_MEMORY = "linear_memory"
    DEEP_MEMORY = "deep_memory"
    ATTENTION = "attention"
    BOUNDARY = "boundary"
    CLUSTER = "cluster"
    REFERENCE_LOOP = "reference_loop"

    def __str__(self) -> str:
        return self.value


class Role(str, enum.Enum):
    """``slow``: trained by the outer optimizer (or frozen); ``fast``: updated in the sequence."""

    SLOW = "slow"
    FAST = "fast"

    def __str__(self) -> str:
        return self.value


# ------------------------------------------------------------------------------------- scalars
@dataclass(frozen=True)
class NoScalar:
    """The rule has no such scalar (no momentum, no retention)."""


@dataclass(frozen=True)
class Const:
    """A constant."""

    value: float


@dataclass(frozen=True)
class Learned:
    """A scalar parameter of the level's lowering, kept in ``[lo, hi]`` (sigmoid) or ``>= lo``
    (softplus); ``key`` names it there (the rule's field: ``lr``, ``momentum``, ...)."""

    key: str
    lo: float | None
    hi: float | None


@dataclass(frozen=True)
class PerToken:
    """A per-token signal: ``act(input[arg]) * scale``."""

    arg: int
    act: str
    scale: float


Scalar = NoScalar | Const | Learned | PerToken


# --------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class GDStep:
    """``S <- mu S - lr d; M <- a M + S`` (without momentum ``M <- a M - lr d``; Nesterov
    ``M <- a M + mu S - lr d``)."""

    lr: Scalar
    momentum: Scalar
    retain: Scalar
    nesterov: bool = False


@dataclass(frozen=True)
class DGDStep:
    """``M <- M (a I - lr' x x^T) - lr' d`` per layer with that layer's input ``x`` (Eq. 88);
    ``exact``: ``lr' = lr / (1 + lr |x|^2)``; ``dampen``: momentum averages its terms."""

    lr: Scalar
    momentum: Scalar
    retain: Scalar
    exact: bool = False
    dampen: bool = False


@dataclass(frozen=True)
class EMAStep:
    """``gd`` with ``lr = 1 - beta``."""

    beta: Scalar


@dataclass(frozen=True)
class DecayStep:
    """Weight decay: ``M <- (1 - rate) M``."""

    rate: Scalar


@dataclass(frozen=True)
class PreconditionStep:
    """``d <- d / (input[by] ** power + eps)``."""

    by: int
    power: float
    eps: float


@dataclass(frozen=True)
class OrthogonalizeStep:
    """``d <- NS(d)``: ``steps`` Newton–Schulz iterations, ``"cubic"`` or ``"quintic"``."""

    steps: int
    variant: str


Rule = GDStep | DGDStep | EMAStep | DecayStep | PreconditionStep | OrthogonalizeStep


@dataclass(frozen=True)
class Objective:
    """A memory's inner objective: ``dot``, ``l2``, ``lp`` (exponent ``p``) or ``custom``
    (import path ``path``), with nlgraph.objectives' signs; ``nw`` for attention."""

    kind: str
    p: float | None = None
    path: str | None = None


@dataclass(frozen=True)
class Schedule:
    """When a reference-loop memory updates: every ``every`` units (``token`` or ``chunk``)
    from ``offset``."""

    unit: str = "token"
    every: int = 1
    offset: int = 0


# ------------------------------------------------------------------------------------- configs
@dataclass(frozen=True, kw_only=True)
class MemoryBase:
    """What every fast memory's lowering is told: its level, heads, how its key, value and
    queries are normalised (per head), whether its reads see the state after each token's
    update (``read_after``), its chunk, and the tokens between detached states (``truncate``,
    from ``truncated(k)`` edges), and whether its updates are first-order (``first_order``:
    stop_grad on its own recurrence; the outer gradient takes each update as a constant
    increment)."""

    name: str
    heads: int
    key_norm: bool
    value_norm: bool
    query_norms: tuple[bool, ...]
    read_after: bool
    chunk: int
    objective: Objective
    truncate: int | None = None
    first_order: bool = False


@dataclass(frozen=True, kw_only=True)
class LinearMemoryConfig(MemoryBase):
    """A matrix memory under one ``gd`` or ``dgd`` step with retention (``linear_memory``)."""

    rule: GDStep | DGDStep


@dataclass(frozen=True, kw_only=True)
class DeepMemoryConfig(MemoryBase):
    """An MLP memory (``depth`` layers) under ``gd`` with momentum and retention
    (``deep_memory``); a cluster member carries its ``gd`` or ``dgd`` rule the same way."""

    rule: GDStep | DGDStep
    depth: int = 1
    activation: str = "identity"
    residual: bool = False


@dataclass(frozen=True, kw_only=True)
class ClusterMemberConfig(DeepMemoryConfig):
    """A matrix or MLP memory inside a recurrent cluster under one ``gd`` or ``dgd`` step
    (``cluster``): its layers' recurrences run in the cluster's windows."""


@dataclass(frozen=True, kw_only=True)
class AttentionConfig(MemoryBase):
    """Causal softmax attention over the key/value cache (``attention``)."""

    window: int | None = None
    temperature: float | None = None


@dataclass(frozen=True, kw_only=True)
class ReferenceLoopConfig(MemoryBase):
    """A matrix or MLP memory run token by token with its whole rule chain
    (``reference_loop``)."""

    rules: tuple[Rule, ...]
    schedule: Schedule = Schedule()
    depth: int = 1
    activation: str = "identity"
    residual: bool = False


MemoryConfig = (
    LinearMemoryConfig | DeepMemoryConfig | ClusterMemberConfig | AttentionConfig
    | ReferenceLoopConfig
)  # fmt: skip
