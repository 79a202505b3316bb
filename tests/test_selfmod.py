"""Self-modifying Titans through the compiler's recurrent-cluster lowering (PAPER.md 4, 9.9)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn import functional as F

import nlgraph as nl
from nlgraph.compiler import compile
from nlgraph.compiler.lowerings.mlp import mlp_forward
from nlgraph.library import get

D = 4


def smt(chunk, chunk_mem, momentum=0.9, exact=True, heads=1, **kw):
    torch.manual_seed(0)
    g = get("self_modifying_titans", d=D, heads=heads, chunk=chunk, chunk_mem=chunk_mem,
            momentum=momentum, exact=exact, conv_window=0, output_gate=False, **kw)  # fmt: skip
    learner = compile(g, dtype=torch.float64)
    with torch.no_grad():  # larger initial states so that the updates matter
        for p in learner.meta.values():
            p.mul_(0.5)
    return learner


def naive(learner, x, chunk, chunk_mem, momentum, exact, first_order=False):
    """Eqs. 83-88 token by token, written independently of the compiler: per layer DGD with
    autograd gradients; every read at the state of the end of the memory's previous chunk.
    ``first_order``: the writes run without a graph and each chunk-end state is read as
    ``W0 + sg(W - W0)`` (every update a constant increment on the initial state)."""
    names = ["k", "v", "eta", "alpha", "mem"]
    W = {n: [learner.meta[f"M_{n}__W2"][0], learner.meta[f"M_{n}__W1"][0]] for n in names}
    run = {n: [w.clone() for w in W[n]] for n in names}
    vis = {n: [w.clone() for w in W[n]] for n in names}
    mom = {n: [torch.zeros_like(w) for w in W[n]] for n in names}
    Wq, Weta, Walpha = (learner.slow[n].weight for n in ("W_q", "W_eta", "W_alpha"))

    def M(ws, z):  # z + W1 silu(W2 z)
        return z + ws[1] @ F.silu(ws[0] @ z)

    ys = []
    for t in range(x.shape[1]):
        xt = x[0, t]
        k = F.normalize(M(vis["k"], xt), dim=-1)
        v = M(vis["v"], xt)
        eta = F.softplus(Weta @ M(vis["eta"], xt))[0]
        alpha = torch.sigmoid(Walpha @ M(vis["alpha"], xt) + 6.0)[0]
        q = F.normalize(Wq @ xt, dim=-1)
        ys.append(M(vis["mem"], q))
        with torch.no_grad() if first_order else contextlib.nullcontext():
            _write(vis, run, mom, names, k, v, eta, alpha, momentum, exact, M)
        for n in names:
            c = chunk_mem if n == "mem" else chunk
            if (t + 1) % c == 0:
                vis[n] = (
                    [w.detach() + (w0 - w0.detach()) for w, w0 in zip(run[n], W[n], strict=True)]
                    if first_order
                    else [w.clone() for w in run[n]]
                )
    return torch.stack(ys)[None]


def _write(vis, run, mom, names, k, v, eta, alpha, momentum, exact, M):
    """One token's DGD step of every memory (gradients at the chunk-start states ``vis``)."""
    for n in names:
        target = F.normalize(M(vis[n], v), dim=-1)  # self-generated value, chunk-start state
        loss = lambda ws, k=k, target=target: 0.5 * ((M(ws, k) - target) ** 2).sum()  # noqa: E731
        grads = torch.func.grad(loss)(vis[n])
        h = F.silu(vis[n][0] @ k)
        for i, (g, xin) in enumerate(zip(grads, (k, h), strict=True)):
            step = eta / (1 + eta * xin @ xin) if exact else eta
            w = run[n][i]
            mom[n][i] = momentum * mom[n][i] - (1 - momentum) * step * g  # dampened
            run[n][i] = alpha * w - step * torch.outer(w @ xin, xin) + mom[n][i]


@pytest.mark.parametrize(
    "chunk,chunk_mem,momentum,exact",
    [(1, 1, 0.9, True), (2, 4, 0.9, True), (3, 3, 0.0, True), (2, 2, 0.5, False)],
    ids=["token-by-token", "two-chunk-sizes", "no-momentum", "literal-step"],
)
def test_compiled_equals_naive_loop(chunk, chunk_mem, momentum, exact):
    """9.9: chunk 1 is the token recurrence; C > 1 is the naive loop with causal indexing."""
    learner = smt(chunk, chunk_mem, momentum, exact)
    x = torch.randn(1, 9, D, dtype=torch.float64)
    want = naive(learner, x, chunk, chunk_mem, momentum, exact)
    for backend in ("chunk", "reference"):
        learner.backend = backend
        got = learner(x)[0]["y"]
        assert torch.allclose(got, want, atol=1e-10, rtol=0), backend


def test_layer_errors_equal_autograd():
    torch.manual_seed(1)
    ws = [
        torch.randn(1, 2, 5, 3, dtype=torch.float64),
        torch.randn(1, 2, 3, 5, dtype=torch.float64),
    ]
    k = torch.randn(1, 1, 2, 3, dtype=torch.float64)
    v = torch.randn(1, 1, 2, 3, dtype=torch.float64)
    out, inputs, pre = mlp_forward(ws, k, "silu", True)
    grads = torch.func.grad(lambda w: 0.5 * ((mlp_forward(w, k, "silu", True)[0] - v) ** 2).sum())(
        ws
    )
    delta1 = out - v
    delta0 = torch.einsum("bhoi,bcho->bchi", ws[1], delta1) * torch.func.grad(
        lambda z: F.silu(z).sum())(pre[0])  # fmt: skip
    for g, d, x in zip(grads, (delta0, delta1), inputs, strict=True):
        assert torch.allclose(g, torch.einsum("bcho,bchi->bhoi", d, x), atol=1e-12)


@pytest.mark.parametrize("B,T,heads", [(1, 1, 1), (2, 7, 2), (3, 10, 2)], ids=str)
def test_chunk_equals_reference_with_gradients(B, T, heads):
    learner = smt(2, 4, heads=heads)
    x = torch.randn(B, T, D, dtype=torch.float64)
    results = []
    for backend in ("reference", "chunk"):
        learner.backend = backend
        learner.zero_grad(set_to_none=True)
        y = learner(x)[0]["y"]
        torch.manual_seed(5)
        (y * torch.randn_like(y)).sum().backward()
        grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
        results.append((y.detach(), grads))
    (y0, g0), (y1, g1) = results
    assert torch.allclose(y0, y1, atol=1e-10, rtol=0)
    assert g0.keys() == g1.keys() and g0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-9, rtol=1e-9), n


def test_causality_and_segments():
    learner = smt(2, 4)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    y = learner(x)[0]["y"]
    x2 = x.clone()
    x2[:, 6:] += 1.0
    assert torch.equal(learner(x2)[0]["y"][:, :6], y[:, :6])
    state, ys = None, []
    for a, b in ((0, 3), (3, 8), (8, 11)):
        out, state = learner(x[:, a:b], state)
        ys.append(out["y"])
    assert torch.allclose(torch.cat(ys, 1), y, atol=1e-12, rtol=0)


def test_meta_learned_initial_states_get_gradients():
    """9.11: every memory's initial state receives a gradient through the unrolled updates."""
    learner = smt(2, 2)
    x = torch.randn(1, 6, D, dtype=torch.float64)
    learner(x)[0]["y"].sum().backward()
    for n, p in learner.meta.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_gradcheck_tiny():
    learner = smt(2, 2, heads=1)
    x = torch.randn(1, 4, D, dtype=torch.float64)
    names = [n for n, _ in learner.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in learner.named_parameters())

    def fn(*ps):
        return torch.func.functional_call(learner, dict(zip(names, ps, strict=True)), (x,))[0]["y"]

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-5)


def test_hope_compiles_and_trains_a_step():
    learner = compile(get("hope", d=16, n_layers=1, heads=2, vocab=32, hidden=32, width=16,
                          chunk=2, chunk_mem=4, cms_chunks=(4, 8)))  # fmt: skip
    tokens = torch.randint(0, 32, (2, 12))

    def loss_fn(out, s, e):
        tgt = tokens[:, s + 1 : e + 1]
        logits = out["logits"][:, : tgt.shape[1]]
        return F.cross_entropy(logits.reshape(-1, 32), tgt.reshape(-1), reduction="sum")

    out, state = learner({"tokens": tokens}, None, loss_fn=loss_fn)
    out["loss"].backward()
    assert out["logits"].shape == (2, 12, 32)
    assert state["block0.cms.mlp0"]["updates"] == 3
    assert all(p.grad is not None for p in learner.meta.values())


def test_read_only_pass_updates_nothing():
    learner = smt(2, 4)
    x = torch.randn(2, 6, D, dtype=torch.float64)
    y, state = learner(x, writes=False)
    for t in range(6):  # each token alone gives the same output: no state carries over
        alone = learner(x[:, t : t + 1], writes=False)[0]["y"][:, 0]
        torch.testing.assert_close(alone, y["y"][:, t], rtol=1e-12, atol=1e-12)
    first = learner(x)[0]["y"][:, :2]  # first chunk: same reads
    torch.testing.assert_close(first, y["y"][:, :2], rtol=1e-12, atol=1e-12)


def huber(pred, target):  # a custom inner objective, named by import path in the test below
    return torch.nn.functional.huber_loss(pred, target, reduction="none", delta=0.5).sum(-1)


@pytest.mark.parametrize("objective,mom", [("lp", None), ("custom", None), ("lp", 0.7)])
def test_other_objectives_run_as_clusters(objective, mom):
    """lp and custom objectives: the compiled step equals autograd of the objective."""
    obj = nl.lp(3.0) if objective == "lp" else nl.custom("test_selfmod:huber")
    g = nl.Graph("other")
    x = g.input("x", dim=D)
    mem = g.level("M", state=nl.mlp(D, D, width=3), frequency=nl.per_token(), chunk=1,
                  context=nl.kv(key=x, value=x.square()), objective=obj,
                  optimizer=nl.gd(lr=0.3, momentum=mom, retain=0.9), init=nl.meta())  # fmt: skip
    g.output("y", mem(x))
    learner = compile(g, dtype=torch.float64)
    assert learner.plan.levels["M"].lowering == "cluster"
    xs = torch.randn(1, 5, D, dtype=torch.float64)
    y = learner(xs)[0]["y"]
    ws = [learner.meta["M__W2"][0], learner.meta["M__W1"][0]]

    def M(w, z):
        return w[1] @ F.silu(w[0] @ z)

    def loss(w, z, t):
        r = M(w, z) - t
        return (r.abs() ** 3).sum() / 3 if objective == "lp" else huber(M(w, z), t)

    s = [torch.zeros_like(w) for w in ws]
    for t in range(5):  # chunk 1: y_t = M_{t-1}(x_t), then one step of GD with momentum
        assert torch.allclose(y[0, t], M(ws, xs[0, t]), atol=1e-12)
        grads = torch.func.grad(loss)(ws, xs[0, t], xs[0, t] ** 2)
        s = [(mom or 0.0) * si - 0.3 * gr for si, gr in zip(s, grads, strict=True)]
        ws = [0.9 * w + si for w, si in zip(ws, s, strict=True)]


@pytest.mark.parametrize("rule", ["gd", "dgd"])
def test_momentum_windows_equal_token_windows(rule):
    """Windows of 4 tokens (momentum summed in parallel) equal windows of one token."""
    opt = (nl.gd if rule == "gd" else nl.dgd)(lr=0.3, momentum=0.6, retain=0.95)
    g = nl.Graph("mom", chunk=4)
    x = g.input("x", dim=D)
    mem = g.level("M", state=nl.mlp(D, D, width=3), frequency=nl.per_token(),
                  context=nl.kv(key=x, value=x.square()), objective=nl.lp(3.0),
                  optimizer=opt, init=nl.meta())  # fmt: skip
    g.output("y", mem(x))
    learner = compile(g, dtype=torch.float64)
    xs = torch.randn(2, 11, D, dtype=torch.float64)
    out = {}
    for backend in ("reference", "chunk"):
        learner.backend = backend
        y, state = learner(xs)
        out[backend] = (y["y"], state["M"]["running"][0])
    assert torch.allclose(out["chunk"][0], out["reference"][0], atol=1e-12)
    assert torch.allclose(out["chunk"][1], out["reference"][1], atol=1e-12)


def test_default_self_modifying_titans_stays_finite_over_long_sequences():
    """Regression: undampened momentum and un-normalised self-generated values diverged to NaN
    within 200 tokens; the library defaults keep every state finite."""
    torch.manual_seed(0)
    learner = compile(get("self_modifying_titans", d=16, heads=2, chunk=8, chunk_mem=16))
    with torch.no_grad():
        y, state = learner(torch.randn(2, 384, 16) * 3)
    assert torch.isfinite(y["y"]).all()
    for name, s in state.items():
        if isinstance(s, dict) and "running" in s:
            assert all(torch.isfinite(w).all() for w in s["running"]), name
