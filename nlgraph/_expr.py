"""Arithmetic over named hyperparameters: what a traced graph keeps of how its numbers were made.

A builder called with :class:`Sym` numbers (floats that remember their expression) records
``-lr``, ``lr * wd`` or ``1 - b1`` wherever such a number lands, and every comparison it made on
one (``if momentum:``) as a condition. Expressions print as Python arithmetic and parse back
with a small parser that knows numbers, names, ``+ - * / **``, unary ``-`` and parentheses, and
nothing else: a file never runs code. Evaluation repeats the builder's float operations in the
same order, so a substituted number is bit-identical to the builder's.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

__all__ = ["Name", "Num", "Op", "Fn", "Expr", "Sym", "text", "parse", "evaluate", "names"]


class Fn(Enum):
    NEG = "neg"
    ADD = "+"
    SUB = "-"
    MUL = "*"
    DIV = "/"
    POW = "**"


_APPLY: dict[Fn, Callable[..., Any]] = {
    Fn.NEG: operator.neg,
    Fn.ADD: operator.add,
    Fn.SUB: operator.sub,
    Fn.MUL: operator.mul,
    Fn.DIV: operator.truediv,
    Fn.POW: operator.pow,
}
_PREC = {Fn.ADD: 1, Fn.SUB: 1, Fn.MUL: 2, Fn.DIV: 2, Fn.NEG: 3, Fn.POW: 4}
COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt,
    ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}  # fmt: skip
NEGATE = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}


@dataclass(frozen=True)
class Name:
    name: str


@dataclass(frozen=True)
class Num:
    value: int | float


@dataclass(frozen=True)
class Op:
    fn: Fn
    args: tuple[Expr, ...]


Expr = Name | Num | Op


def _prec(e: Expr) -> int:
    if isinstance(e, Op):
        return _PREC[e.fn]
    return 3 if isinstance(e, Num) and e.value < 0 else 5


def text(e: Expr) -> str:
    """Python arithmetic that parses back to an expression of the same value, bit for bit
    (parentheses keep the builder's order of operations)."""
    if isinstance(e, Name):
        return e.name
    if isinstance(e, Num):
        return repr(e.value)
    if e.fn is Fn.NEG:
        (x,) = e.args
        return "-" + (f"({text(x)})" if _prec(x) < 3 else text(x))
    a, b = e.args
    p = _PREC[e.fn]
    if e.fn is Fn.POW:  # right-associative, tighter than unary minus on its left
        left, right = _prec(a) <= p, _prec(b) < 5
    else:
        left, right = _prec(a) < p, _prec(b) <= p
    sa = f"({text(a)})" if left else text(a)
    sb = f"({text(b)})" if right else text(b)
    return f"{sa} {e.fn.value} {sb}"


def evaluate(e: Expr, values: Mapping[str, Any]) -> Any:
    if isinstance(e, Name):
        return values[e.name]
    if isinstance(e, Num):
        return e.value
    return _APPLY[e.fn](*(evaluate(x, values) for x in e.args))


def names(e: Expr) -> set[str]:
    if isinstance(e, Name):
        return {e.name}
    if isinstance(e, Num):
        return set()
    return set().union(*(names(x) for x in e.args))


_TOKEN = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_]\w*)"
    r"|(?P<op>\*\*|<=|>=|==|!=|[-+*/()<>]))"
)


def _tokens(s: str) -> list[str]:
    out, i = [], 0
    while i < len(s):
        if s[i:].strip() == "":
            break
        m = _TOKEN.match(s, i)
        if m is None:
            raise ValueError(f"cannot read {s[i:].strip()[:20]!r} in {s!r}")
        out.append(m.group(m.lastgroup or "op"))
        i = m.end()
    return out


class _Parser:
    def __init__(self, s: str) -> None:
        self.s, self.toks, self.i = s, _tokens(s), 0

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise ValueError(f"{self.s!r} ends too early")
        self.i += 1
        return tok

    def sum(self) -> Expr:
        e = self.prod()
        while self.peek() in ("+", "-"):
            e = Op(Fn(self.take()), (e, self.prod()))
        return e

    def prod(self) -> Expr:
        e = self.unary()
        while self.peek() in ("*", "/"):
            e = Op(Fn(self.take()), (e, self.unary()))
        return e

    def unary(self) -> Expr:
        if self.peek() == "-":
            self.take()
            return Op(Fn.NEG, (self.unary(),))
        e = self.atom()
        if self.peek() == "**":
            self.take()
            e = Op(Fn.POW, (e, self.unary()))
        return e

    def atom(self) -> Expr:
        tok = self.take()
        if tok == "(":
            e = self.sum()
            if self.take() != ")":
                raise ValueError(f"unbalanced parentheses in {self.s!r}")
            return e
        if tok[0].isdigit() or tok[0] == ".":
            return Num(int(tok) if tok.isdigit() else float(tok))
        if tok[0].isalpha() or tok[0] == "_":
            return Name(tok)
        raise ValueError(f"unexpected {tok!r} in {self.s!r}")

    def end(self) -> None:
        if self.peek() is not None:
            raise ValueError(f"unexpected {self.peek()!r} in {self.s!r}")


def parse(s: str) -> Expr:
    """An expression from its :func:`text`; ``ValueError`` for anything else."""
    p = _Parser(s)
    e = p.sum()
    p.end()
    return e


def parse_condition(s: str) -> tuple[Expr, str, Expr]:
    """``"momentum != 0"`` -> ``(Name('momentum'), '!=', Num(0))``."""
    p = _Parser(s)
    a = p.sum()
    op = p.peek()
    if op not in COMPARE:
        raise ValueError(f"expected a comparison (<, <=, >, >=, ==, !=) in {s!r}")
    p.take()
    b = p.sum()
    p.end()
    return a, op, b


def _lift(x: object) -> Expr | None:
    if isinstance(x, Sym):
        return x.expr
    if isinstance(x, int | float) and not isinstance(x, bool):
        return Num(x)
    return None


class Sym(float):
    """A float that remembers how it was computed from named hyperparameters.

    Arithmetic with numbers gives a :class:`Sym`; with anything else (a flow) it defers, so
    ``-lr * nl.state("m", at="new")`` reaches the flow's operators, which keep the number. Every
    comparison or truth test appends the condition that held to ``conditions`` (a builder's
    ``if momentum:`` makes the graph's structure depend on it).
    """

    conditions: list[list[str]] = []  # one list per trace in progress (the innermost last)
    expr: Expr

    def __new__(cls, value: float, expr: Expr) -> Sym:
        obj = super().__new__(cls, value)
        obj.expr = expr
        return obj

    def _op(self, fn: Fn, other: object, reflected: bool = False) -> Any:
        e = _lift(other)
        if e is None:
            return NotImplemented
        a, b = (other, float(self)) if reflected else (float(self), other)
        value = _APPLY[fn](a, float(b) if isinstance(b, Sym) else b)
        if not isinstance(value, float):  # a complex power: no longer a number we follow
            return value
        return Sym(value, Op(fn, (e, self.expr) if reflected else (self.expr, e)))

    def __add__(self, o: object) -> Any:
        return self._op(Fn.ADD, o)

    def __radd__(self, o: object) -> Any:
        return self._op(Fn.ADD, o, True)

    def __sub__(self, o: object) -> Any:
        return self._op(Fn.SUB, o)

    def __rsub__(self, o: object) -> Any:
        return self._op(Fn.SUB, o, True)

    def __mul__(self, o: object) -> Any:
        return self._op(Fn.MUL, o)

    def __rmul__(self, o: object) -> Any:
        return self._op(Fn.MUL, o, True)

    def __truediv__(self, o: object) -> Any:
        return self._op(Fn.DIV, o)

    def __rtruediv__(self, o: object) -> Any:
        return self._op(Fn.DIV, o, True)

    def __pow__(self, o: object, mod: None = None) -> Any:
        return self._op(Fn.POW, o)

    def __rpow__(self, o: object, mod: None = None) -> Any:
        return self._op(Fn.POW, o, True)

    def __neg__(self) -> Sym:
        return Sym(-float(self), Op(Fn.NEG, (self.expr,)))

    def __pos__(self) -> Sym:
        return self

    def _compare(self, op: str, other: object) -> Any:
        e = _lift(other)
        if e is None:
            return NotImplemented
        result = COMPARE[op](float(self), float(other) if isinstance(other, Sym) else other)
        if Sym.conditions:
            held = op if result else NEGATE[op]
            Sym.conditions[-1].append(f"{text(self.expr)} {held} {text(e)}")
        return result

    def __lt__(self, o: object) -> Any:
        return self._compare("<", o)

    def __le__(self, o: object) -> Any:
        return self._compare("<=", o)

    def __gt__(self, o: object) -> Any:
        return self._compare(">", o)

    def __ge__(self, o: object) -> Any:
        return self._compare(">=", o)

    def __eq__(self, o: object) -> Any:
        return self._compare("==", o)

    def __ne__(self, o: object) -> Any:
        return self._compare("!=", o)

    def __bool__(self) -> bool:
        return bool(self._compare("!=", 0))

    __hash__ = float.__hash__
