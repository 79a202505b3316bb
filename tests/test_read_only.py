"""The read-only pass (``writes=False``) reads every memory at the state the segment's first token
reads in a write pass: from a state carried into the middle of a chunk, both passes give the
same first output. For memories read at="prev" that is the chunk-start (visible) state, which
differs from the running one there."""

from __future__ import annotations

import warnings

import pytest
import torch

import nlgraph as nl
from nlgraph.compiler import compile

DT = torch.float64
D = 4


def memory(lowering):
    g = nl.Graph(f"ro_{lowering}")
    x = g.input("x", dim=D)
    Wk = g.level("W_k", state=nl.linear(D, D), frequency=nl.per_step(), objective=nl.outer())
    rule = {
        "deep_memory": nl.gd(lr=0.5, momentum=0.5),
        "reference_loop": nl.chain(nl.weight_decay(0.1), nl.gd(lr=0.5, momentum=0.5)),
        "cluster": nl.gd(lr=0.3, momentum=0.5, retain=0.9),
    }[lowering]
    objective = nl.lp(3.0) if lowering == "cluster" else nl.l2()
    mem = g.level("M", state=nl.mlp(D, D, width=5), frequency=nl.per_token(), chunk=3,
                  context=nl.kv(key=Wk(x).normalize(), value=x), objective=objective,
                  optimizer=rule, init=nl.meta())  # fmt: skip
    g.output("y", mem(x))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nl.ReferenceLoopWarning)
        learner = compile(g, dtype=DT)
    with torch.no_grad():  # initial states large enough for the updates to matter
        for p in learner.meta.values():
            p.normal_(0, 0.5)
    assert learner.plan.levels["M"].lowering == lowering
    return learner


def _visible_and_running(state):
    if "chunk_start" in state:  # deep memory
        return list(state["chunk_start"].values()), list(state["params"].values())
    return state["visible"], state["running"]


@pytest.mark.parametrize("lowering", ["deep_memory", "reference_loop", "cluster"])
def test_read_only_first_token_equals_the_write_pass(lowering):
    learner = memory(lowering)
    x = torch.randn(2, 9, D, dtype=DT)
    _, state = learner(x[:, :4])  # one token into the second chunk of 3
    visible, running = _visible_and_running(state["M"])
    assert max((a - b).abs().max() for a, b in zip(visible, running, strict=True)) > 1e-3
    y_write, _ = learner(x[:, 4:], state)
    y_read, same = learner(x[:, 4:], state, writes=False)
    torch.testing.assert_close(y_read["y"][:, 0], y_write["y"][:, 0], rtol=1e-12, atol=1e-12)
    for a, b in zip(_visible_and_running(same["M"]), (visible, running), strict=True):
        assert all(u is w for u, w in zip(a, b, strict=True))  # nothing updated
    # and every token of the read-only pass reads that same state
    y_one, _ = learner(x[:, 6:7], state, writes=False)
    torch.testing.assert_close(y_read["y"][:, 2], y_one["y"][:, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("writes", [False, True])
def test_blocks_not_learning_apply_one_shared_weight(writes, monkeypatch):
    """Without an inner gradient (read-only, or no loss_fn) a CMS block still at its initial
    parameters runs plain GEMMs with one shared weight: the same outputs and gradients as
    the per-sample form."""
    from nlgraph.compiler.lowerings.boundary import Block
    from nlgraph.library import get

    torch.manual_seed(0)
    learner = compile(get("cms", d=3, chunks=(2, 4), hidden=5, lrs=0.3), dtype=DT)
    x = torch.randn(2, 7, 3, dtype=DT)
    results = []
    for shared in (True, False):
        if not shared:
            off = property(lambda s: False, lambda s, v: None)
            monkeypatch.setattr(Block, "shared", off, raising=False)
        learner.zero_grad(set_to_none=True)
        y = learner(x, writes=writes)[0]["y"]
        y.square().sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in learner.parameters()]))
    (y0, g0), (y1, g1) = results
    assert torch.allclose(y0, y1, atol=1e-13, rtol=0)
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=1e-12)
