"""Chunk-updated blocks (CMS, PAPER.md 5 and 9.7-9.8) through the compiler."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nlgraph as nl
from nlgraph.compiler import compile

D = 3


def cms_graph(chunks=(2,), lrs=(0.1,), variant="sequential", init=None) -> nl.Graph:
    g = nl.Graph("cms_test")
    x = g.input("x", dim=D)
    y = x
    names = [f"b{i}" for i in range(len(chunks))]
    for i, (c, lr) in enumerate(zip(chunks, lrs, strict=True)):
        parent = names[i + 1] if variant == "nested" and i + 1 < len(names) else None
        y = g.level(
            names[i], state=nl.mlp(D, D, width=4), frequency=nl.every(c, "token"),
            objective=nl.outer(), optimizer=nl.gd(lr=lr),
            init=init or nl.meta(parent), reset=nl.reset_with(parent) if parent else None,
        )(y)  # fmt: skip
    g.output("y", y)
    return g


def mse(target):
    def loss_fn(outputs, start, end):
        return ((outputs["y"] - target[:, start:end]) ** 2).sum()

    return loss_fn


def data(B=2, T=8, seed=0):
    torch.manual_seed(seed)
    return torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)


def test_block_changes_only_at_its_boundaries_by_the_accumulated_gradient():
    """9.7: theta changes only at t = 0 mod C, by lr * sum of the chunk's gradients at the
    chunk-start theta."""
    learner = compile(cms_graph(chunks=(3,), lrs=(0.1,)), dtype=torch.float64)
    x, target = data(B=1, T=7)
    block = learner.blocks["b0"].net
    theta0 = [p.detach().clone() for p in block.parameters()]
    state, seen = None, []
    for t in range(7):
        _, state = learner(x[:, t : t + 1], state, loss_fn=mse(target[:, t : t + 1]))
        seen.append([th.detach().clone() for th in state["b0"]["theta"]])
    changed = [t + 1 for t in range(1, 7) if not torch.equal(seen[t][0], seen[t - 1][0])]
    assert changed == [3, 6] and torch.equal(seen[0][0], theta0[0].unsqueeze(0)) is not False
    # the update at t = 3 equals lr * sum_{t=1..3} grad L_t(theta0)
    params = [p.detach().clone().requires_grad_() for p in theta0]
    total = 0
    for t in range(3):
        y = torch.func.functional_call(
            block,
            dict(zip(dict(block.named_parameters()), params, strict=True)),
            (x[:, t : t + 1],),
        )
        total = total + ((y - target[:, t : t + 1]) ** 2).sum()
    grads = torch.autograd.grad(total, params)
    for th, p, g in zip(seen[2], params, grads, strict=True):
        assert torch.allclose(th[0], p - 0.1 * g, atol=1e-12, rtol=0)


def test_chunk_one_is_per_token_sgd():
    learner = compile(cms_graph(chunks=(1,), lrs=(0.05,)), dtype=torch.float64)
    x, target = data(B=1, T=4)
    block = learner.blocks["b0"].net
    params = [p.detach().clone() for p in block.parameters()]
    names = list(dict(block.named_parameters()))
    for t in range(4):
        ps = [p.requires_grad_() for p in params]
        y = torch.func.functional_call(block, dict(zip(names, ps, strict=True)), (x[:, t : t + 1],))
        grads = torch.autograd.grad(((y - target[:, t : t + 1]) ** 2).sum(), ps)
        params = [(p - 0.05 * g).detach() for p, g in zip(ps, grads, strict=True)]
    _, state = learner(x, None, loss_fn=mse(target))
    for th, p in zip(state["b0"]["theta"], params, strict=True):
        assert torch.allclose(th[0], p, atol=1e-12, rtol=0)


@pytest.mark.parametrize("variant", ["sequential", "nested"])
def test_chunked_equals_token_loop_with_meta_gradients(variant, monkeypatch, cms_token_loop):
    """Parallel within chunks equals cutting at every token: outputs, loss, final parameters
    and the meta-gradients of the initial parameters (f64)."""
    learner = compile(cms_graph(chunks=(2, 4), lrs=(0.1, 0.05), variant=variant),
                      dtype=torch.float64)  # fmt: skip
    x, target = data(B=2, T=9)

    def run(backend):
        learner.backend = backend
        learner.zero_grad(set_to_none=True)
        out, state = learner(x, None, loss_fn=mse(target))
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in learner.named_parameters()}
        return out, state, grads

    with cms_token_loop():
        ref = run("reference")
    fast = run("chunk")
    assert torch.allclose(fast[0]["y"], ref[0]["y"], atol=1e-10, rtol=0)
    assert torch.allclose(fast[0]["loss"], ref[0]["loss"], atol=1e-10, rtol=0)
    for name in ("b0", "b1"):
        for a, b in zip(fast[1][name]["theta"], ref[1][name]["theta"], strict=True):
            assert torch.allclose(a, b, atol=1e-10, rtol=0)
    assert ref[2] and all(g.abs().sum() > 0 for g in ref[2].values())
    for n in ref[2]:
        assert torch.allclose(fast[2][n], ref[2][n], atol=1e-10, rtol=0), n


def test_levels_update_at_their_own_boundaries_and_nested_resets():
    learner = compile(cms_graph(chunks=(2, 6), lrs=(0.1, 0.1), variant="nested"),
                      dtype=torch.float64)  # fmt: skip
    x, target = data(B=1, T=12)
    state, updates = None, []
    for t in range(12):
        _, state = learner(x[:, t : t + 1], state, loss_fn=mse(target[:, t : t + 1]))
        updates.append((state["b0"]["updates"], state["b1"]["updates"]))
    # b1 updates at 6 and 12; b0 at 2, 4, 6 (then resets with b1: counter restarts), 8, 10, 12
    assert [u[1] for u in updates] == [0] * 5 + [1] * 6 + [2]
    assert [u[0] for u in updates] == [0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2, 0]
    b0 = learner.blocks["b0"].net
    fresh = [p.unsqueeze(0) for p in b0.parameters()]
    for th, p in zip(state["b0"]["theta"], fresh, strict=True):
        assert torch.equal(th, p)  # reset to its initial state at t = 12


def test_segments_equal_one_pass():
    learner = compile(cms_graph(chunks=(2, 4), lrs=(0.1, 0.05)), dtype=torch.float64)
    x, target = data(B=2, T=10)
    full, _ = learner(x, None, loss_fn=mse(target))
    state, ys = None, []
    for a, b in ((0, 3), (3, 4), (4, 10)):
        out, state = learner(x[:, a:b], state, loss_fn=mse(target[:, a:b]))
        ys.append(out["y"])
    assert torch.allclose(torch.cat(ys, 1), full["y"], atol=1e-12, rtol=0)


def test_without_a_loss_blocks_hold_their_parameters():
    learner = compile(cms_graph(), dtype=torch.float64)
    x, _ = data()
    _, state = learner(x)
    assert state["b0"]["updates"] == 0


def pretrained() -> nn.Module:
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(D, 4), nn.SiLU(), nn.Linear(4, D)).double()


def test_ad_hoc_level_stacking_with_zero_lr_reproduces_the_pretrained_mlp():
    """9.8: a CMS initialised from a pre-trained MLP with eta = 0 is the pre-trained model."""
    g = cms_graph(chunks=(2,), lrs=(0.0,), init=nl.from_path("test_cms:pretrained"))
    learner = compile(g, dtype=torch.float64)
    x, target = data(T=6)
    out, _ = learner(x, None, loss_fn=mse(target))
    assert torch.allclose(out["y"], pretrained()(x), atol=1e-14, rtol=0)
    with pytest.raises(nl.CompileError, match="do not match"):
        bad = cms_graph(chunks=(2,), lrs=(0.0,), init=nl.from_path("test_cms:pretrained"))
        compile(bad.spec.model_copy(update={"levels": tuple(
            lv.model_copy(update={"state": nl.mlp(D, D, width=5)}) for lv in bad.spec.levels
        )}))  # fmt: skip


def test_blocks_learn_at_test_time_under_no_grad():
    learner = compile(cms_graph(chunks=(2,)), dtype=torch.float64)
    x, target = data(T=6)
    with torch.no_grad():
        out, state = learner(x, None, loss_fn=mse(target))
    assert state["b0"]["updates"] == 3 and not out["y"].requires_grad


def test_gradcheck_through_memories_and_a_chunk_updated_block():
    """Meta-gradients through a deep memory, a delta-rule memory and a CMS block's in-sequence
    updates (float64 gradcheck)."""
    g = nl.Graph("mixed", chunk=2)
    x = g.input("x", dim=D)
    deep = g.level("deep", state=nl.mlp(D, D, width=4, residual=True), frequency=nl.per_token(),
                   context=nl.kv(key=x, value=x), objective=nl.l2(),
                   optimizer=nl.gd(lr=0.5, momentum=0.5), init=nl.meta())  # fmt: skip
    delta = g.level("delta", state=nl.linear(D, D), frequency=nl.per_token(),
                    context=nl.kv(key=x, value=deep(x, at="new")), objective=nl.l2(),
                    optimizer=nl.gd(lr=0.7), init=nl.meta())  # fmt: skip
    block = g.level("block", state=nl.mlp(D, D, width=4), frequency=nl.every(2, "token"),
                    objective=nl.outer(), optimizer=nl.gd(lr=0.2), init=nl.meta())  # fmt: skip
    g.output("y", block(delta(x, at="new")))
    learner = compile(g, dtype=torch.float64)
    xs, target = data(B=1, T=5)
    names = [n for n, _ in learner.named_parameters()]
    assert any(n.startswith("top.blocks.block") for n in names)
    params = tuple(p.detach().clone().requires_grad_() for _, p in learner.named_parameters())

    def fn(*ps):
        out, _ = torch.func.functional_call(
            learner, dict(zip(names, ps, strict=True)), (xs,), {"loss_fn": mse(target)}
        )
        return out["loss"]

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("variant", ["sequential", "nested"])
def test_causality_of_learning_blocks(variant):
    """9.10 for CMS levels: a token (input or target) after t never changes outputs up to t,
    although the blocks learn inside the sequence."""
    learner = compile(cms_graph(chunks=(2, 4), lrs=(0.1, 0.05), variant=variant),
                      dtype=torch.float64)  # fmt: skip
    x, target = data(B=2, T=10)
    y0 = learner(x, None, loss_fn=mse(target))[0]["y"]
    for t in (1, 4, 7):
        x2, t2 = x.clone(), target.clone()
        x2[:, t + 1 :] += 1.0
        t2[:, t + 1 :] -= 1.0
        y1 = learner(x2, None, loss_fn=mse(t2))[0]["y"]
        assert torch.equal(y1[:, : t + 1], y0[:, : t + 1]), t


def test_block_with_momentum_and_retention_matches_a_hand_loop():
    """A block whose gd rule has momentum: at each boundary S <- mu S - lr * (the chunk's summed
    gradients at the chunk-start theta), theta <- retain * theta + S (the GD rule's semantics)."""
    g = nl.Graph("cms_momentum")
    x_in = g.input("x", dim=D)
    y = g.level(
        "b0", state=nl.mlp(D, D, width=4), frequency=nl.every(2, "token"),
        objective=nl.outer(), optimizer=nl.gd(lr=0.1, momentum=0.6, retain=0.95),
        init=nl.meta(None),
    )(x_in)  # fmt: skip
    g.output("y", y)
    learner = compile(g, dtype=torch.float64)
    assert "S <- mu S" in str(learner.plan)
    x, target = data(B=2, T=7, seed=3)
    out, state = learner(x, None, loss_fn=mse(target))
    block = learner.blocks["b0"].net
    names = list(dict(block.named_parameters()))
    theta = [p.detach().unsqueeze(0).expand(2, *p.shape).clone() for p in block.parameters()]
    mom = [torch.zeros_like(t) for t in theta]
    ys = []
    for s in range(0, 7, 2):
        e = min(s + 2, 7)
        params = [t.clone().requires_grad_() for t in theta]
        outs, total = [], 0
        for b in range(2):  # per sample: each sequence has its own fast parameters
            yb = torch.func.functional_call(
                block, dict(zip(names, [p[b] for p in params], strict=True)), (x[b : b + 1, s:e],)
            )
            outs.append(yb)
            total = total + ((yb - target[b : b + 1, s:e]) ** 2).sum()
        ys.append(torch.cat(outs).detach())
        grads = torch.autograd.grad(total, params)
        if e - s == 2:  # the chunk ended: apply the update
            mom = [0.6 * m - 0.1 * gr for m, gr in zip(mom, grads, strict=True)]
            theta = [0.95 * t + m for t, m in zip(theta, mom, strict=True)]
    torch.testing.assert_close(out["y"], torch.cat(ys, dim=1), rtol=1e-12, atol=1e-12)
    for got, want in zip(state["b0"]["momentum"], mom, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
