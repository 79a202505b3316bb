"""Every DSL call given a bad value answers with one line, a SpecError, never pydantic's error or
a Python traceback from inside nlgraph (STYLE.md 11)."""

from __future__ import annotations

import pydantic
import pytest

import nlgraph as nl

X = nl.const(1.0)
BAD = [None, "x", -1, 0, 1.5, float("nan"), float("inf"), [1], {"a": 1}, True, object()]


def level(**fields):
    return nl.Graph("g").level("a", **{"state": nl.tensor(2), "frequency": nl.per_step(), **fields})


CALLS = {
    "signal(flow)": lambda b: nl.signal(b),
    "signal(act)": lambda b: nl.signal(X, act=b),
    "signal(scale)": lambda b: nl.signal(X, scale=b),
    "custom(path)": lambda b: nl.custom(b),
    "gd(lr)": lambda b: nl.gd(b),
    "gd(momentum)": lambda b: nl.gd(0.1, momentum=b),
    "gd(nesterov)": lambda b: nl.gd(0.1, nesterov=b),
    "dgd(lr)": lambda b: nl.dgd(b),
    "ema(beta)": lambda b: nl.ema(b),
    "precondition(by)": lambda b: nl.precondition(b),
    "precondition(power)": lambda b: nl.precondition(X, power=b),
    "orthogonalize(steps)": lambda b: nl.orthogonalize(b),
    "orthogonalize(variant)": lambda b: nl.orthogonalize(5, b),
    "weight_decay(rate)": lambda b: nl.weight_decay(b),
    "follow(update)": lambda b: nl.follow(b),
    "learned(init)": lambda b: nl.learned(b),
    "every(n)": lambda b: nl.every(b),
    "every(unit)": lambda b: nl.every(1, b),
    "every(offset)": lambda b: nl.every(1, "token", b),
    "per_chunk(n)": lambda b: nl.per_chunk(b),
    "reset_every(n)": lambda b: nl.reset_every(b),
    "reset_with(level)": lambda b: nl.reset_with(b),
    "normal(std)": lambda b: nl.normal(b),
    "from_path(path)": lambda b: nl.from_path(b),
    "truncated(k)": lambda b: nl.truncated(b),
    "state(level)": lambda b: nl.state(b, at="new"),
    "state(at)": lambda b: nl.state("m", at=b),
    "read(arg)": lambda b: nl.read("m", b),
    "grad_of(wrt)": lambda b: nl.grad_of(b),
    "debias(x)": lambda b: nl.debias(b, 0.9),
    "debias(beta)": lambda b: nl.debias(X, b),
    "newton_schulz(steps)": lambda b: nl.newton_schulz(X, steps=b),
    "kv(key)": lambda b: nl.kv(key=b),
    "const(value)": lambda b: nl.const(b),
    "flow.apply(fn)": lambda b: X.apply(b),
    "flow + x": lambda b: X + b,
    "flow ** x": lambda b: X**b,
    "lp(p)": lambda b: nl.lp(b),
    "l2_to(target)": lambda b: nl.l2_to(b),
    "tensor(shape)": lambda b: nl.tensor(b),
    "mlp(activation)": lambda b: nl.mlp(2, 2, activation=b),
    "conv(window)": lambda b: nl.conv(2, b),
    "module(path)": lambda b: nl.module(b),
    "Graph(chunk)": lambda b: nl.Graph("g", chunk=b).spec,
    "input(name)": lambda b: nl.Graph("g").input(b),
    "input(dim)": lambda b: nl.Graph("g").input("x", dim=b),
    "level(name)": lambda b: nl.Graph("g").level(b, state=nl.tensor(2), frequency=nl.per_step()),
    "level(state)": lambda b: level(state=b),
    "level(optimizer)": lambda b: level(optimizer=b),
    "level(heads)": lambda b: level(heads=b),
    "let(flow)": lambda b: nl.Graph("g").let("a", b),
    "output(flow)": lambda b: nl.Graph("g").output("a", b),
    "include(graph)": lambda b: nl.Graph("g").include(b, "p"),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_a_bad_value_is_one_line(call):
    refused = 0
    for bad in BAD:
        try:
            CALLS[call](bad)
        except nl.SpecError as err:
            refused += 1
            assert not isinstance(err, pydantic.ValidationError)
            text = str(err)
            assert "\n" not in text and "pydantic.dev" not in text, text
    assert refused >= 3, f"{call} accepted almost every bad value"


def test_a_flow_argument_names_the_call():
    with pytest.raises(nl.SpecTypeError, match=r"^nl.signal\(flow\): expected a flow"):
        nl.signal(None)
    with pytest.raises(TypeError, match=r"^nl.kv: value: expected a flow"):  # a TypeError too
        nl.kv(value="v")
    with pytest.raises(nl.SpecError, match="level name must be a string, got list"):
        nl.Graph("g").level(["a"], state=nl.tensor(2), frequency=nl.per_step())
