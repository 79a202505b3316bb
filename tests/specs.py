"""Small graphs the spec-layer tests share."""

from __future__ import annotations

import nlgraph as nl


def small_memory(d: int = 4) -> nl.Graph:
    """Projections per step, a delta-rule memory per token, an optimizer memory per step."""
    g = nl.Graph("small", doc="a test graph", chunk=8)
    x = g.input("x", dim=d)
    wk = g.level("W_k", state=nl.linear(d, d), frequency=nl.per_step(), objective=nl.outer())
    wv = g.level("W_v", state=nl.linear(d, d), frequency=nl.per_step(), objective=nl.outer())
    wb = g.level("W_b", state=nl.linear(d, 1), frequency=nl.per_step(), objective=nl.outer())
    mem = g.level(
        "M",
        state=nl.linear(d, d),
        frequency=nl.per_token(),
        context=nl.kv(key=wk(x).normalize(), value=wv(x)),
        objective=nl.l2(),
        optimizer=nl.gd(lr=nl.signal(wb(x), "sigmoid"), retain=0.9),
        init=nl.meta(),
    )
    g.output("y", mem(wk(x), at="new"))
    w = g.level(
        "w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
        optimizer=nl.follow(nl.state("m", at="new")),
    )  # fmt: skip
    g.level(
        "m", state=nl.like("w"), frequency=nl.per_step(), context=-w.grad(),
        objective=nl.dot(), optimizer=nl.gd(lr=0.1, retain=0.9),
    )  # fmt: skip
    return g


def levels_at(data: dict, name: str) -> dict:
    for lv in data["levels"]:
        if lv["name"] == name:
            return lv
    raise KeyError(name)
