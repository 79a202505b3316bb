"""Declare a learner as a graph of levels, check it, look at its ordering, save it, train it.

Run: python examples/declare_a_learner.py [OUT_DIR]

The learner: a delta-rule memory per token (keyed by slow projections), whose learning rate is
produced by another level, plus SGD with momentum for the slow weights — three frequencies and a
nested optimizer level, in about twenty lines. ``compile_system`` compiles the whole graph, the
momentum included, into one object that trains (docs/compiler.md, "The whole system").
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import nlgraph as nl
from nlgraph.optim import compile_system


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


def train(steps: int = 40, d: int = 16) -> None:
    """A few steps on a toy regression: map each token x_t to A x_t for a fixed matrix A."""
    torch.manual_seed(0)
    system = compile_system(build(d))  # the learner, and the momentum optimizer bound to it
    x = torch.randn(8, 12, d)
    y = x @ (torch.randn(d, d) / d**0.5).T

    def loss_fn(outputs: dict, start: int, end: int) -> torch.Tensor:  # the piece start..end
        return (outputs["y"] - y[:, start:end]).pow(2).sum() / (8 * 12)

    for step in range(1, steps + 1):
        loss = system.step({"x": x}, loss_fn).loss
        if step == 1 or step % 10 == 0:
            print(f"step {step:3d}  loss {loss.item():.4f}")


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    g = build().validate()
    for i, tier in enumerate(g.tiers(), 1):
        print(f"tier {i}: " + ", ".join(f"{n} ({g.get(n).frequency})" for n in tier))
    path = nl.save(g, out / "delta_memory_with_momentum.yaml")
    assert nl.load(path) == g
    print(f"saved {path}; check it with: nlgraph validate {path}")
    train()


if __name__ == "__main__":
    main()
