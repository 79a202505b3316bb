"""truncated(k) counts from the start of the sequence: a sequence run in segments with carried
state detaches at the same tokens as one pass, so outputs *and gradients* equal one pass.

Segments are cut at tokens that are not multiples of the truncation window: counting from the
start of each call would open a window at the segment's first token, let gradients reach back
past a true window start, and change the gradients."""

from __future__ import annotations

import pytest
import torch

import nlgraph as nl
from nlgraph.compiler import compile
from nlgraph.library import get

DT = torch.float64


def deltanet(trunc):
    g = get("deltanet", d=6, heads=2, chunk=2)
    if trunc:
        g.differentiate("W_k", "M", nl.truncated(2))  # windows of 2 chunks = 4 tokens
    torch.manual_seed(0)
    return compile(g, dtype=DT)


def titans(trunc):
    g = get("titans", d=6, heads=2, chunk=2)
    if trunc:
        g.differentiate("W_k", "M", nl.truncated(2))
    torch.manual_seed(0)
    return compile(g, dtype=DT)


def lp_cluster(trunc):
    """An MLP memory on an lp objective (the cluster lowering), chunk 2."""
    g = nl.Graph("lpc", chunk=2)
    x = g.input("x", dim=6)
    Wk = g.level("W_k", state=nl.linear(6, 6), frequency=nl.per_step(), objective=nl.outer())
    mem = g.level("M", state=nl.mlp(6, 6, width=3), frequency=nl.per_token(),
                  context=nl.kv(key=Wk(x), value=x.square()), objective=nl.lp(3.0),
                  optimizer=nl.gd(lr=0.05, momentum=0.5, retain=0.9), init=nl.meta())  # fmt: skip
    g.output("y", mem(x))
    if trunc:
        g.differentiate("W_k", "M", nl.truncated(2))
    torch.manual_seed(0)
    return compile(g, dtype=DT)


BUILDERS = {"linear_memory": deltanet, "deep_memory": titans, "cluster": lp_cluster}


def run(learner, x, cuts):
    state, ys = None, []
    for s, e in zip([0, *cuts], [*cuts, x.shape[1]], strict=True):
        y, state = learner(x[:, s:e], state)
        ys.append(y["y"])
    return torch.cat(ys, dim=1), state


def _tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, list | tuple):
        return [t for v in state for t in _tensors(v)]
    return []


@pytest.mark.parametrize("lowering", sorted(BUILDERS))
def test_segments_with_truncation_equal_one_pass(lowering):
    learner = BUILDERS[lowering](True)
    assert learner.plan.levels["M"].lowering == lowering
    x = torch.randn(2, 11, 6, dtype=DT, requires_grad=True)
    cot = torch.randn(2, 11, 6, dtype=DT)
    y1, st = run(learner, x, [])
    assert all(torch.isfinite(t).all() for t in _tensors(st))  # the inner loop stays stable
    ys, _ = run(learner, x, [3, 5, 10])
    torch.testing.assert_close(ys, y1, rtol=1e-12, atol=1e-12)
    params = [p for p in learner.parameters() if p.requires_grad]
    g1 = torch.autograd.grad((y1 * cot).sum(), [x, *params], allow_unused=True)
    gs = torch.autograd.grad((ys * cot).sum(), [x, *params], allow_unused=True, retain_graph=True)
    for a, b in zip(gs, g1, strict=True):
        if b is None:
            assert a is None or not a.abs().sum()
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the truncation is real: token 4 opens a window, so y[4] takes no gradient from x[:4]
    # through the memory's state (titans also reaches back through its short convolutions) ...
    (gx,) = torch.autograd.grad(ys[:, 4].sum(), x)
    if lowering != "deep_memory":
        assert not gx[:, :4].abs().sum() and gx[:, 4].abs().sum() > 0
    # ... while without truncation it does
    plain = BUILDERS[lowering](False)
    yp, _ = run(plain, x, [3, 5, 10])
    torch.testing.assert_close(yp, y1, rtol=1e-12, atol=1e-12)
    (gp,) = torch.autograd.grad(yp[:, 4].sum(), x)
    assert (gp[:, :4] - gx[:, :4]).abs().sum() > 1e-6
