"""PAPER.md section 9 claims that are not covered with their kernels or levels."""

from __future__ import annotations

import math

import pytest
import torch

from nlgraph.compiler import compile
from nlgraph.library import get


@pytest.mark.parametrize("window", [None, 3])
def test_softmax_attention_is_the_nadaraya_watson_solution(window):
    """9.3: argmin_m sum_i s(k_i, q) ||v_i - m||^2 over the (windowed) causal context, solved by
    gradient descent to convergence, equals the attention output, s = exp(q.k / sqrt(d))."""
    torch.manual_seed(0)
    d, T = 4, 7
    name = "softmax_attention" if window is None else "sliding_window_attention"
    kw = {} if window is None else {"window": window}
    learner = compile(get(name, d=d, heads=1, **kw), dtype=torch.float64)
    with torch.no_grad():
        for w in ("W_k", "W_v", "W_q"):
            learner.slow[w].weight.copy_(torch.eye(d))
    x = torch.randn(1, T, d, dtype=torch.float64)
    y = learner(x)[0]["y"][0]
    for t in range(T):
        lo = 0 if window is None else max(0, t - window + 1)
        keys = x[0, lo : t + 1]
        s = torch.exp(keys @ x[0, t] / math.sqrt(d))
        m = torch.zeros(d, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD([m], lr=0.5 / s.sum().item())
        for _ in range(200):
            opt.zero_grad()
            (s[:, None] * (keys - m) ** 2).sum().backward()
            opt.step()
        assert torch.allclose(m.detach(), y[t], atol=1e-10), t


def test_ema_horizon_arithmetic():
    """9.13: at beta = 0.9 the most recent 7 gradients carry 52.2% of an EMA's weight, the most
    recent 44 carry 99.0% (weights beta^i (1 - beta))."""
    beta = 0.9
    mass = lambda n: sum((1 - beta) * beta**i for i in range(n))  # noqa: E731
    assert round(mass(7), 3) == 0.522 and round(mass(44), 3) == 0.990
    assert mass(6) < 0.5 < mass(7) and mass(43) < 0.99 < mass(44)
