"""Context flows: the signals levels compress, read and are driven by.

A flow is a small expression tree over input streams and other levels: ``x`` (tokens),
``mem(q)`` (a memory's read-out), ``state("m")`` (a level's state itself), ``grad_of("w")`` (the
gradient of an objective with respect to a level's state), element-wise transforms (``.square()``,
``.sqrt()``, ``.normalize()``) and arithmetic. ``kv(key, value, query)`` bundles key/value/query
pairs as a memory's context. Flows are frozen data: they serialize to JSON and carry no tensors.

Timing: ``read`` and ``state`` take ``at="prev"`` (the level's state before this tick's update,
e.g. ``o_t = M_{t-1}(q_t)``) or ``at="new"`` (after it, e.g. ``W_{t+1} = W_t + m_{t+1}``). Only
``at="new"`` references are same-tick dependencies for the level ordering of PAPER.md 1.2.
``read`` defaults to ``prev`` (a memory's read-out); ``state`` has no default (:func:`require_at`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Literal, Union

from pydantic import Field

from nlgraph._base import Spec
from nlgraph._errors import SpecError, SpecTypeError

__all__ = [
    "Flow",
    "FlowBase",
    "Input",
    "Ref",
    "State",
    "Read",
    "Grad",
    "Unary",
    "Binary",
    "Const",
    "Debias",
    "NewtonSchulz",
    "KV",
    "Ticks",
    "UNARY_FNS",
    "as_flow",
    "state",
    "read",
    "grad_of",
    "const",
    "debias",
    "newton_schulz",
    "kv",
    "ticks",
    "walk",
    "references",
]

UNARY_FNS = (
    "neg", "square", "sqrt", "abs", "sign", "exp", "log", "normalize",
    "silu", "sigmoid", "softplus", "tanh", "relu",
)  # fmt: skip
UnaryFn = Literal[
    "neg", "square", "sqrt", "abs", "sign", "exp", "log", "normalize",
    "silu", "sigmoid", "softplus", "tanh", "relu",
]  # fmt: skip
BinaryFn = Literal["add", "sub", "mul", "div", "pow"]
_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/", "pow": "**"}


class FlowBase(Spec):
    """Arithmetic and element-wise transforms shared by every flow node."""

    def __add__(self, other: object) -> Binary:
        return Binary(fn="add", a=self, b=as_flow(other, "flow + x"))

    def __radd__(self, other: object) -> Binary:
        return Binary(fn="add", a=as_flow(other, "x + flow"), b=self)

    def __sub__(self, other: object) -> Binary:
        return Binary(fn="sub", a=self, b=as_flow(other, "flow - x"))

    def __rsub__(self, other: object) -> Binary:
        return Binary(fn="sub", a=as_flow(other, "x - flow"), b=self)

    def __mul__(self, other: object) -> Binary:
        return Binary(fn="mul", a=self, b=as_flow(other, "flow * x"))

    def __rmul__(self, other: object) -> Binary:
        return Binary(fn="mul", a=as_flow(other, "x * flow"), b=self)

    def __truediv__(self, other: object) -> Binary:
        return Binary(fn="div", a=self, b=as_flow(other, "flow / x"))

    def __rtruediv__(self, other: object) -> Binary:
        return Binary(fn="div", a=as_flow(other, "x / flow"), b=self)

    def __pow__(self, other: object) -> Flow:
        if isinstance(other, int | float) and other == 2:
            return Unary(fn="square", x=self)
        return Binary(fn="pow", a=self, b=as_flow(other, "flow ** x"))

    def __neg__(self) -> Unary:
        return Unary(fn="neg", x=self)

    def square(self) -> Unary:
        return Unary(fn="square", x=self)

    def sqrt(self) -> Unary:
        return Unary(fn="sqrt", x=self)

    def abs(self) -> Unary:
        return Unary(fn="abs", x=self)

    def sign(self) -> Unary:
        return Unary(fn="sign", x=self)

    def normalize(self) -> Unary:
        """l2-normalise along the feature axis (PAPER.md 4.6: q and k are normalised)."""
        return Unary(fn="normalize", x=self)

    def apply(self, fn: str) -> Unary:
        return Unary(fn=fn, x=self)  # type: ignore[arg-type]


class Input(FlowBase):
    """An input stream of the graph (e.g. the token embeddings ``x``)."""

    op: Literal["input"] = "input"
    name: str

    def __str__(self) -> str:
        return self.name


class Ref(FlowBase):
    """A named flow of the graph (``g.let(name, flow)``): one node shared by every reader, so a
    deep stack of blocks stays linear in size."""

    op: Literal["ref"] = "ref"
    name: str

    def __str__(self) -> str:
        return f"${self.name}"


class State(FlowBase):
    """A level's state itself (a momentum buffer read by the weights it drives)."""

    op: Literal["state"] = "state"
    level: str
    at: Literal["prev", "new"] = "new"

    def __str__(self) -> str:
        return f"{self.level}" + ("" if self.at == "new" else "[prev]")


class Read(FlowBase):
    """A memory's read-out ``M(arg)`` (a projection ``W x``, a query ``M(q)``)."""

    op: Literal["read"] = "read"
    level: str
    arg: Flow
    at: Literal["prev", "new"] = "prev"

    def __str__(self) -> str:
        return f"{self.level}({self.arg})" + ("" if self.at == "prev" else "[new]")


class Grad(FlowBase):
    """The gradient of ``objective`` (the outer ``"loss"`` or a level's inner objective) with
    respect to level ``wrt``'s state: the context of every optimizer memory."""

    op: Literal["grad"] = "grad"
    wrt: str
    objective: str = "loss"

    def __str__(self) -> str:
        of = "" if self.objective == "loss" else f" of {self.objective}"
        return f"∇{self.wrt}{of}"


class Unary(FlowBase):
    op: Literal["unary"] = "unary"
    fn: UnaryFn
    x: Flow

    def __str__(self) -> str:
        if self.fn == "neg":
            return f"-{_wrap(self.x)}"
        if self.fn == "square":
            return f"{_wrap(self.x)}²"
        return f"{self.fn}({self.x})"


class Binary(FlowBase):
    op: Literal["binary"] = "binary"
    fn: BinaryFn
    a: Flow
    b: Flow

    def __str__(self) -> str:
        return f"{_wrap(self.a)} {_SYMBOL[self.fn]} {_wrap(self.b)}"


class Const(FlowBase):
    op: Literal["const"] = "const"
    value: float

    def __str__(self) -> str:
        return f"{self.value:g}"


class Debias(FlowBase):
    """Bias correction of an EMA: ``x / (1 - beta^t)``, with ``t`` the updates of ``x``'s level."""

    op: Literal["debias"] = "debias"
    x: Flow
    beta: Annotated[float, Field(ge=0.0, lt=1.0)]

    def __str__(self) -> str:
        return f"debias({self.x}, {self.beta:g})"


class NewtonSchulz(FlowBase):
    """``steps`` Newton–Schulz iterations towards the polar factor (PAPER.md 2.5, Eqs. 42–44).

    ``cubic`` is one inner GD step per iteration on ``1/2||O-g||^2 + 1/2||O^T O - I||^2`` from
    ``O_0 = g`` with step 1/4 (``1.5 O - 0.5 O O^T O``); ``quintic`` is the tuned polynomial of
    production Muon. ``prenorm`` scales by the Frobenius norm first.
    """

    op: Literal["newton_schulz"] = "newton_schulz"
    x: Flow
    steps: Annotated[int, Field(ge=1, le=100)] = 5
    variant: Literal["cubic", "quintic"] = "quintic"
    prenorm: bool = True

    def __str__(self) -> str:
        return f"NS{self.steps}[{self.variant}]({self.x})"


class KV(FlowBase):
    """Key/value(/query) pairs: the context of an associative memory."""

    op: Literal["kv"] = "kv"
    key: Flow | None = None
    value: Flow | None = None
    query: Flow | None = None

    def __str__(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in ("key", "value", "query") if getattr(self, n)]
        return "(" + ", ".join(parts) + ")"


class Ticks(FlowBase):
    """The number of updates of the level that evaluates this flow, this one included (1 at its
    first update): a step-dependent scale such as AdaGrad's ``lr / (1 + (t - 1) lr_decay)``."""

    op: Literal["ticks"] = "ticks"

    def __str__(self) -> str:
        return "t"


Flow = Annotated[
    Union[Input, Ref, State, Read, Grad, Unary, Binary, Const, Debias, NewtonSchulz, KV, Ticks],  # noqa: UP007
    Field(discriminator="op"),
]

for _cls in (Read, Unary, Binary, Debias, NewtonSchulz, KV):
    _cls.model_rebuild()


def _wrap(f: FlowBase) -> str:
    return f"({f})" if isinstance(f, Binary) else str(f)


def as_flow(x: object, where: str = "") -> FlowBase:
    """Lift a number into a :class:`Const`; pass flows through; reject anything else with a
    :class:`~nlgraph.SpecTypeError` that starts with ``where`` (the call and argument)."""
    at = f"{where}: " if where else ""
    if isinstance(x, FlowBase):
        return x
    if isinstance(x, bool):
        raise SpecTypeError(f"{at}expected a flow or a number, got a bool ({x!r})")
    if isinstance(x, float):
        return Const(value=x)  # as is: a traced hyperparameter (nlgraph.hyper) is a float subclass
    if isinstance(x, int):
        return Const(value=float(x))
    raise SpecTypeError(
        f"{at}expected a flow (input, read, state, grad_of, ...) or a number, "
        f"got {type(x).__name__}"
    )


def state(level: str, at: Literal["prev", "new"] | None = None) -> State:
    """The state of ``level``: ``at="new"`` after its update at this tick (``W <- W + m_{t+1}``),
    ``at="prev"`` as the tick starts (``m_t``). ``at`` has no default: the two readings build
    different optimizers, and either is a common intent (see :func:`require_at`)."""
    return State(level=level, at=require_at(f"nl.state({level!r})", level, at))


def require_at(call: str, level: str, at: str | None) -> str:
    """``at`` itself, or a :class:`SpecError` naming the read when it was left out.

    A state read is a timing choice, not a detail: ``nl.follow(-lr * nl.state("m").sign())``
    with the new momentum is signum, with ``at="prev"`` it is a step behind; both are valid
    graphs, so a silent default would build the other optimizer without a word.
    """
    if at is None:
        raise SpecError(
            f"{call}: say when to read {level!r}: at='new' (after its update at this tick, as "
            f"W <- W + m_(t+1) reads a momentum) or at='prev' (as the tick starts, before the "
            "update); the two build different learners, so nlgraph does not pick one"
        )
    return at


def read(level: str, arg: object, at: Literal["prev", "new"] = "prev") -> Read:
    """The read-out of memory ``level`` on ``arg`` (``at="prev"``: before this tick's update)."""
    return Read(level=level, arg=as_flow(arg, f"nl.read({level!r}, arg)"), at=at)


def grad_of(wrt: str, objective: str = "loss") -> Grad:
    """The gradient of ``objective`` w.r.t. ``wrt``'s state (``"loss"`` = the outer loss)."""
    return Grad(wrt=wrt, objective=objective)


def const(value: float) -> Const:
    return Const(value=value)


def debias(x: object, beta: float) -> Debias:
    return Debias(x=as_flow(x, "nl.debias(x, beta): x"), beta=beta)


def newton_schulz(
    x: object,
    steps: int = 5,
    variant: Literal["cubic", "quintic"] = "quintic",
    prenorm: bool = True,
) -> NewtonSchulz:
    return NewtonSchulz(
        x=as_flow(x, "nl.newton_schulz(x): x"), steps=steps, variant=variant, prenorm=prenorm
    )


def kv(key: object = None, value: object = None, query: object = None) -> KV:
    """Bundle keys, values and queries as a memory's context."""
    return KV(
        key=None if key is None else as_flow(key, "nl.kv: key"),
        value=None if value is None else as_flow(value, "nl.kv: value"),
        query=None if query is None else as_flow(query, "nl.kv: query"),
    )


def ticks() -> Ticks:
    """The evaluating level's update count ``t`` (see :class:`Ticks`)."""
    return Ticks()


def walk(
    flow: FlowBase, named: Mapping[str, FlowBase] | None = None, _seen: set[str] | None = None
) -> Iterator[FlowBase]:
    """Every node of a flow tree, parents before children; with ``named`` (the graph's named
    flows) a :class:`Ref` is followed into its flow, once per walk."""
    yield flow
    if isinstance(flow, Ref) and named is not None and flow.name in named:
        seen = set() if _seen is None else _seen
        if flow.name not in seen:
            seen.add(flow.name)
            yield from walk(named[flow.name], named, seen)
        return
    for name in _child_fields(type(flow)):
        child = getattr(flow, name)
        if isinstance(child, FlowBase):
            yield from walk(child, named, _seen if _seen is not None else set())


_CHILDREN: dict[type, tuple[str, ...]] = {}


def _child_fields(cls: type) -> tuple[str, ...]:
    """The fields of a flow class that may hold sub-flows (asking a pydantic model for a field
    it lacks is slow, and walks visit millions of nodes in a deep model)."""
    fields = _CHILDREN.get(cls)
    if fields is None:
        declared = getattr(cls, "model_fields", {})
        names = ("arg", "x", "a", "b", "key", "value", "query")
        fields = _CHILDREN[cls] = tuple(n for n in names if n in declared)
    return fields


def references(
    flow: FlowBase, named: Mapping[str, FlowBase] | None = None
) -> Iterator[tuple[str, str, str]]:
    """``(kind, name, timing)`` for every input or level a flow refers to (through the graph's
    named flows when ``named`` is given).

    kind is ``input``, ``state``, ``read`` or ``grad``; timing is ``prev``/``new``. Gradients are
    ``prev``: they are taken at the state the tick starts from, before its update.
    """
    for node in walk(flow, named):
        if isinstance(node, Input):
            yield ("input", node.name, "new")
        elif isinstance(node, State | Read):
            yield (node.op, node.level, node.at)
        elif isinstance(node, Grad):
            yield ("grad", node.wrt, "prev")
            if node.objective != "loss":
                yield ("grad", node.objective, "prev")
