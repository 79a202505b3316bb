"""Outer levels at their own rate, and frozen levels never move."""

from __future__ import annotations

import torch

import nlgraph as nl
from nlgraph.compiler import compile
from nlgraph.compiler.multirate import MultiRate


def graph() -> nl.Graph:
    g = nl.Graph("rates")
    x = g.input("x", dim=3)
    fast = g.level("fast", state=nl.linear(3, 3), frequency=nl.per_step(), objective=nl.outer())
    slow = g.level("slow", state=nl.linear(3, 3), frequency=nl.per_step(3),
                   objective=nl.outer())  # fmt: skip
    fixed = g.level("fixed", state=nl.linear(3, 3), frequency=nl.frozen(), objective=nl.outer(),
                    init=nl.normal())  # fmt: skip
    g.output("y", fixed(slow(fast(x))))
    return g


def test_slow_level_steps_every_third_tick_with_summed_gradients():
    torch.manual_seed(0)
    learner = compile(graph(), dtype=torch.float64)
    opt = MultiRate(torch.optim.SGD(learner.parameters(), lr=0.1), learner)
    slow = learner.slow["slow"].weight
    fixed = learner.slow["fixed"].weight.clone()
    history, grads = [slow.detach().clone()], []
    for step in range(6):
        x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        opt.zero_grad()
        learner(x)[0]["y"].square().sum().backward()
        grads.append(slow.grad.clone())
        opt.step()
        history.append(slow.detach().clone())
    moved = [t for t in range(1, 7) if not torch.equal(history[t], history[t - 1])]
    assert moved == [3, 6]
    assert torch.allclose(history[3], history[0] - 0.1 * sum(grads[:3]), atol=1e-12)
    assert torch.equal(learner.slow["fixed"].weight, fixed)
    assert not learner.slow["fixed"].weight.requires_grad
    assert int(learner.clock) == 6 and "clock" in learner.state_dict()
