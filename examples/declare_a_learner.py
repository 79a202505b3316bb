"""Declare a learner as a graph of levels, check it, look at its ordering, save it.

Run: python examples/declare_a_learner.py [OUT_DIR]

The learner: a delta-rule memory per token (keyed by slow projections), whose learning rate is
produced by another level, plus SGD with momentum for the slow weights — three frequencies and a
nested optimizer level, in about twenty lines.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nlgraph as nl


def build(d: int = 16) -> nl.Graph:
    g = nl.Graph("delta_memory_with_momentum", doc="DeltaNet memory + momentum outer optimizer")
    x = g.input("x", dim=d)
    proj = {
        n: g.level(
            n,
            state=nl.linear(d, d if n != "W_b" else 1),
            frequency=nl.per_step(),
            objective=nl.outer(),
            group="projections",
        )  # fmt: skip
        for n in ("W_k", "W_v", "W_q", "W_b")
    }
    mem = g.level(
        "M",
        state=nl.linear(d, d),
        frequency=nl.per_token(),
        chunk=16,
        context=nl.kv(key=proj["W_k"](x).normalize(), value=proj["W_v"](x)),
        objective=nl.l2(),  # 1/2 ||M k - v||^2: the delta rule (Eq. 65)
        optimizer=nl.gd(lr=nl.signal(proj["W_b"](x), "sigmoid")),
    )
    g.output("y", mem(proj["W_q"](x).normalize(), at="new"))
    # The weights follow a momentum memory of their gradients (Eqs. 10-13).
    w = g.level("w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
                optimizer=nl.follow(nl.state("m", at="new")))  # fmt: skip
    g.level("m", state=nl.like("w"), frequency=nl.per_step(), context=-w.grad(),
            objective=nl.dot(), optimizer=nl.gd(lr=0.01, retain=0.9))  # fmt: skip
    return g


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    g = build().validate()
    for i, tier in enumerate(g.tiers(), 1):
        print(f"tier {i}: " + ", ".join(f"{n} ({g.get(n).frequency})" for n in tier))
    path = nl.save(g, out / "delta_memory_with_momentum.yaml")
    assert nl.load(path) == g
    print(f"saved {path}; check it with: nlgraph validate {path}")


if __name__ == "__main__":
    main()
