"""The spec of one level, of the graph's inputs, and of how an edge is differentiated."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from nlgraph._base import Spec
from nlgraph.clock import Default, Frequency, Init, Reset
from nlgraph.flows import Flow, FlowBase
from nlgraph.hyper import Hyperparameters, check
from nlgraph.objectives import Objective
from nlgraph.optimizers import Rule, Signal, scalar_fields
from nlgraph.states import Dim, StateKind

__all__ = [
    "SCHEMA_VERSION",
    "Level",
    "InputSpec",
    "DiffMode",
    "StopGrad",
    "Truncated",
    "Unrolled",
    "stop_grad",
    "truncated",
    "unrolled",
    "EdgeDiff",
    "GraphSpec",
    "level_flows",
]

# 2: a spec may carry its symbolic hyperparameters (nlgraph.hyper). Version 1 files load as is.
SCHEMA_VERSION = 2


class StopGrad(Spec):
    """No gradient flows along the edge."""

    mode: Literal["stop_grad"] = "stop_grad"

    def __str__(self) -> str:
        return "stop_grad"


class Truncated(Spec):
    """Gradients flow through at most the last ``k`` inner updates (truncated BPTT)."""

    mode: Literal["truncated"] = "truncated"
    k: Annotated[int, Field(ge=1)]

    def __str__(self) -> str:
        return f"truncated({self.k})"


class Unrolled(Spec):
    """Gradients flow through every inner update (full meta-gradients)."""

    mode: Literal["unrolled"] = "unrolled"

    def __str__(self) -> str:
        return "unrolled"


DiffMode = Annotated[StopGrad | Truncated | Unrolled, Field(discriminator="mode")]


def stop_grad() -> StopGrad:
    return StopGrad()


def truncated(k: int) -> Truncated:
    return Truncated(k=k)


def unrolled() -> Unrolled:
    return Unrolled()


class Level(Spec):
    """One level: an associative memory with its context, objective, optimizer and clock.

    Attributes:
        name: unique, identifier-like (dots allowed for nesting: ``block0.cms.fast``).
        state: what the memory is made of (:mod:`nlgraph.states`).
        frequency: when it updates, on the global clock (:mod:`nlgraph.clock`).
        context: the flow it compresses (keys/values, gradients, ...).
        objective: its inner objective (:mod:`nlgraph.objectives`).
        optimizer: its inner optimizer, a chain of rules (:mod:`nlgraph.optimizers`).
        chunk: chunk size in tokens for chunk-parallel training (``1`` = exact token recurrence);
            ``None`` takes the graph's default.
        init: initial state (``default``: zeros for memories, the framework's initialisation
            for modules; ``zeros``, ``normal``, ``meta`` = learned by a slower level, ...).
        reset: when fast state returns to its initial value; ``None`` = per sequence for
            token/chunk levels, never for slower ones.
        heads: independent memories side by side (multi-head).
        group: a label that draws related levels together (``"adam"``, ``"block0.titans"``).
    """

    name: str
    state: StateKind
    frequency: Frequency
    context: Flow | None = None
    objective: Objective | None = None
    optimizer: tuple[Rule, ...] = ()
    chunk: Annotated[int, Field(ge=1)] | None = None
    init: Init = Field(default_factory=Default)
    reset: Reset | None = None
    heads: Annotated[int, Field(ge=1)] = 1
    group: str | None = None
    doc: str = ""

    def effective_reset(self) -> Reset:
        if self.reset is not None:
            return self.reset
        fast = self.frequency.unit in ("token", "chunk")
        return Reset(kind="sequence" if fast else "never")


class InputSpec(Spec):
    """An input stream: ``tokens`` (integer ids) or a ``vector`` stream of width ``dim``."""

    name: str
    dim: Dim | None = None
    kind: Literal["tokens", "vector"] = "vector"


class EdgeDiff(Spec):
    """How the edge ``src -> dst`` is differentiated (default: unrolled)."""

    src: str
    dst: str
    mode: DiffMode


class GraphSpec(Spec):
    """A whole learner as data: serializable, versioned, torch-free."""

    schema_version: int = SCHEMA_VERSION
    name: str
    doc: str = ""
    chunk: Annotated[int, Field(ge=1)] = 1
    inputs: tuple[InputSpec, ...] = ()
    levels: tuple[Level, ...] = ()
    flows: dict[str, Flow] = Field(default_factory=dict)  # named intermediate flows (g.let)
    outputs: dict[str, Flow] = Field(default_factory=dict)
    diff: tuple[EdgeDiff, ...] = ()
    meta: dict[str, Any] = Field(default_factory=dict)
    # the hyperparameters it was built from, by name, and where they land (nlgraph.hyper.trace)
    hyperparameters: Hyperparameters | None = None

    @model_validator(mode="after")
    def _hyperparameters_match(self) -> GraphSpec:
        check(self)
        return self

    def level(self, name: str) -> Level:
        for lv in self.levels:
            if lv.name == name:
                return lv
        raise KeyError(name)

    def chunk_of(self, level: Level) -> int:
        return level.chunk if level.chunk is not None else self.chunk


def level_flows(level: Level) -> Iterator[tuple[str, FlowBase]]:
    """Every flow a level reads, as ``(where, flow)``: its context, its objective's target, its
    rules' signals and ``by``/``update`` flows (``where`` names the field, for messages)."""
    if level.context is not None:
        yield "context", level.context
    target = getattr(level.objective, "target", None)
    if isinstance(target, FlowBase):
        yield "objective target", target
    for i, rule in enumerate(level.optimizer):
        for name, value in scalar_fields(rule).items():
            if isinstance(value, Signal):
                yield f"optimizer[{i}].{name}", value.flow
        for attr in ("by", "update"):
            v = getattr(rule, attr, None)
            if isinstance(v, FlowBase):
                yield f"optimizer[{i}].{attr}", v
