"""CMS blocks on a teach signal (``nl.outer(signal="teach")``, ``cms(signal="teach")``).

Where the teach signal is exact (a loss linear in the block's output: ``dL/dy`` does not depend on
the updates) it equals the exact rule in values and meta-gradients; elsewhere it equals a
hand-written two-pass loop, and its distance from the exact rule is measured, not assumed.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import nlgraph as nl
from nlgraph.compiler import compile
from nlgraph.library import get

torch.set_num_threads(1)


def same_weights(dst, src):
    weights = {k: v for k, v in src.state_dict().items() if "extra_state" not in k}
    dst.load_state_dict({**weights, "_extra_state": dst.get_extra_state()})


def pair(name, **kw):
    torch.manual_seed(0)
    exact = compile(get(name, **kw), dtype=torch.float64)
    teach = compile(get(name, **kw, signal="teach") if name == "cms"
                    else get(name, **kw, cms_signal="teach"), dtype=torch.float64)  # fmt: skip
    same_weights(teach, exact)
    return exact, teach


def grads(learner, loss):
    learner.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("meta", ["exact", "first_order"])
def test_equals_the_exact_rule_where_the_signal_is_exact(meta):
    """A loss linear in the output, with blocks side by side (the independent variant), makes
    every block's dL/dy independent of the updates: both rules agree, blocks of different
    periods included, in outputs, states and gradients. (In a chain, a block's signal passes
    through the next block's updated parameters, and the two differ.)"""
    exact, teach = pair("cms", d=3, chunks=(2, 3), lrs=0.2, hidden=5, meta=meta,
                        variant="independent")  # fmt: skip
    x = torch.randn(2, 11, 3, dtype=torch.float64)
    R = torch.randn(2, 11, 3, dtype=torch.float64)

    def loss_fn(out, s, e):
        return (out["y"] * R[:, s:e]).sum()

    a, sa = exact(x, loss_fn=loss_fn)
    b, sb = teach(x, loss_fn=loss_fn)
    assert torch.allclose(a["y"], b["y"], atol=1e-12, rtol=0)
    for n in ("mlp0", "mlp1"):
        assert sa[n]["updates"] == sb[n]["updates"] > 0 and sa[n]["phase"] == sb[n]["phase"]
        for p, q in zip(sa[n]["theta"], sb[n]["theta"], strict=True):
            assert torch.allclose(p, q, atol=1e-12, rtol=0)
    ga, gb = grads(exact, a["loss"]), grads(teach, b["loss"])
    assert ga.keys() == gb.keys() and ga
    # The teach signal is a constant of the teach pass: with meta-gradients on, the exact rule
    # also differentiates each update through dL/dy into what shapes it (here the aggregation
    # weights a_l, since dL/dy_l = a_l R); the teach rule does not. Every other gradient agrees.
    shaping = {"top.slow.a0.value", "top.slow.a1.value"} if meta == "exact" else set()
    for n in ga.keys() - shaping:
        assert torch.allclose(ga[n], gb[n], atol=1e-10, rtol=1e-10), n
    for n in shaping:
        assert not torch.allclose(ga[n], gb[n], atol=1e-6, rtol=1e-6), n


def test_equals_a_two_pass_loop():
    """A squared loss: the signal comes from the pass with the block fixed (by hand here)."""
    exact, teach = pair("cms", d=3, chunks=(2,), lrs=0.3, hidden=4)
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    R = torch.randn(2, 7, 3, dtype=torch.float64)

    def loss_fn(out, s, e):
        return ((out["y"] - R[:, s:e]) ** 2).sum()

    out, _ = teach(x, loss_fn=loss_fn)
    theta0 = list(teach.blocks["mlp0"].net.parameters())

    def mlp(th, z):
        w1, b1, w2, b2 = th
        return F.silu(z @ w1.transpose(1, 2) + b1[:, None]) @ w2.transpose(1, 2) + b2[:, None]

    th = [t.unsqueeze(0).expand(2, *t.shape) for t in theta0]
    delta = 2 * (mlp(th, x) - R)  # dL/dy with the block fixed
    ys = []
    for s in range(0, 7, 2):
        ys.append(mlp(th, x[:, s : s + 2]))
        if s + 2 <= 7:
            local = (delta[:, s : s + 2].detach() * mlp(th, x[:, s : s + 2])).sum()
            g = torch.autograd.grad(local, th, create_graph=True)
            th = [t - 0.3 * gi for t, gi in zip(th, g, strict=True)]
    want = torch.cat(ys, 1)
    assert torch.allclose(out["y"], want, atol=1e-12, rtol=0)
    got = grads(teach, out["loss"])
    ref = torch.autograd.grad(((want - R) ** 2).sum(), theta0)
    for p, r in zip(theta0, ref, strict=True):
        name = next(n for n, q in teach.named_parameters() if q is p)
        assert torch.allclose(got[name], r, atol=1e-10, rtol=1e-10), name
    # The approximation is real: the exact rule's signal sees the updates.
    a, _ = exact(x, loss_fn=loss_fn)
    assert (a["y"] - out["y"]).abs().max() > 1e-6


def test_hope_teach_signal_stays_close_to_exact_on_a_short_sequence():
    """Tiny Hope's first 64 tokens with CMS periods 1 / 4: the teach signal's loss is within
    0.1 % of the exact rule's, and the next-token loss is the one the model reports."""
    kw = dict(d=16, n_layers=1, heads=2, vocab=17, chunk=4, chunk_mem=8, cms_chunks=(1, 4),
              cms_lrs=0.01)  # fmt: skip
    exact, teach = pair("hope", **kw)
    tokens = torch.randint(0, 17, (2, 64), generator=torch.Generator().manual_seed(1))

    def loss_fn(out, s, e):
        last = e == 64
        logits = out["logits"][:, : e - s - last]
        targets = tokens[:, s + 1 : e + (not last)]
        return F.cross_entropy(logits.reshape(-1, 17), targets.reshape(-1), reduction="sum")

    a, _ = exact(tokens, loss_fn=loss_fn)
    b, _ = teach(tokens, loss_fn=loss_fn)
    rel = ((a["loss"] - b["loss"]).abs() / a["loss"]).item()
    assert 0 < rel < 1e-3
    assert torch.allclose(b["loss"], loss_fn({"logits": b["logits"]}, 0, 64))


def test_what_the_teach_lowering_refuses():
    with pytest.raises(nl.SpecError, match="signal='teach' is the inner gradient of a block"):
        g = nl.Graph("g")
        x = g.input("x", dim=2)
        w = g.level("w", state=nl.linear(2, 2), frequency=nl.per_step(),
                    objective=nl.outer(signal="teach"))  # fmt: skip
        g.output("y", w(x))
        g.validate()
    g = get("cms", d=3, chunks=(2, 4), variant="nested", signal="teach")
    with pytest.raises(nl.CompileError, match="nested CMS block"):
        compile(g)
    with pytest.raises(nl.SpecError, match="signal='sometimes'"):
        get("cms", signal="sometimes")
    with pytest.raises(nl.SpecError):
        nl.outer(signal="backprop")


def test_the_second_pass_reuses_what_precedes_the_first_block(monkeypatch):
    """Hope's first self-modifying Titans layer sees the same inputs in both passes: it runs
    once per call, and reusing it changes neither values nor gradients."""
    from nlgraph.compiler.lowerings import teach
    from nlgraph.compiler.lowerings.cluster import Cluster

    _, learner = pair("hope", d=8, n_layers=2, heads=2, vocab=11, chunk=2, chunk_mem=4,
                      cms_chunks=(2, 4), cms_lrs=0.1)  # fmt: skip
    tokens = torch.randint(0, 11, (2, 9), generator=torch.Generator().manual_seed(2))

    def loss_fn(out, s, e):
        return out["logits"].square().sum()

    runs = []
    real = Cluster._forward
    monkeypatch.setattr(Cluster, "_forward", lambda self, *a: runs.append(self) or real(self, *a))
    out, state = learner(tokens, loss_fn=loss_fn)
    first = grads(learner, out["loss"])
    n_clusters = len(learner.clusters)
    # Each layer has two clusters (M_mem apart); layer 0's run once, layer 1's twice.
    assert len(runs) == n_clusters + n_clusters // 2
    monkeypatch.setattr(teach.Replay, "__call__", lambda self, m, n, a, s, ns, compute: compute())
    again, state2 = learner(tokens, loss_fn=loss_fn)
    assert torch.equal(out["logits"], again["logits"])
    second = grads(learner, again["loss"])
    assert first.keys() == second.keys()
    for n in first:
        assert torch.allclose(first[n], second[n], atol=1e-12, rtol=1e-12), n


def test_a_call_shorter_than_every_period_trains():
    """No block updates inside the call, so the second pass's later layers see the teach
    pass's inputs again; only what ran before the first block may be reused (the teach pass's
    backward consumed the graph after it)."""
    _, learner = pair("hope", d=8, n_layers=2, heads=2, vocab=11, chunk=2, chunk_mem=4,
                      cms_chunks=(4, 8), cms_lrs=0.1)  # fmt: skip
    tokens = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(2))
    out, _ = learner(tokens, loss_fn=lambda out, s, e: out["logits"].square().sum())
    assert grads(learner, out["loss"])
