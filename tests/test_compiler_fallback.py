"""The reference-loop lowering (patterns no kernel covers) and per-edge differentiation
(stop_grad, truncated(k)) into CMS blocks, attention and recurrent clusters."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.nn import functional as F

import nlgraph as nl
from nlgraph.compiler import compile
from nlgraph.library import get

DT = torch.float64


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def quiet_compile(g, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nl.ReferenceLoopWarning)
        return compile(g, dtype=DT, **kw)


def weights(learner):
    return {k: v for k, v in learner.state_dict().items() if k != "_extra_state"}


# ------------------------------------------------------------------------------ reference loop
# Each pattern: a graph with one memory "M" that no kernel covers, and a hand-written token loop
# of its equations, per sample, on plain tensors.


def memory_graph(name, state, optimizer, objective, at="new", frequency=None, key=None,
                 value=None, heads=1, chunk=1, extra=None):  # fmt: skip
    g = nl.Graph(name)
    x = g.input("x", dim=4 if heads == 1 else 6)
    ctx = nl.kv(key=key(x) if key else x, value=value(x) if value else x)
    opt = optimizer(g, x) if callable(optimizer) else optimizer
    mem = g.level("M", state=state, frequency=frequency or nl.per_token(), context=ctx,
                  objective=objective, optimizer=opt, init=nl.meta(), heads=heads,
                  chunk=chunk)  # fmt: skip
    g.output("y", mem(x, at=at))
    return g


def _ns(o, steps):  # quintic Newton-Schulz of one square matrix, unit Frobenius norm first
    o = o / o.norm()
    for _ in range(steps):
        a = o @ o.T
        o = 3.4445 * o + (-4.7750 * a + 2.0315 * a @ a) @ o
    return o


def hand_newton_schulz(learner, x):
    """Per head (3x3 matrices): S <- 0.5 S - 0.2 NS_3((M k - v) k^T); M <- M + S; y = M x."""
    W0 = learner.meta["M__W1"]
    B, T, _ = x.shape
    ys = []
    for b in range(B):
        yb = []
        for h in range(2):
            M, S = W0[h], torch.zeros_like(W0[h])
            out = []
            for t in range(T):
                xt = x[b, t].view(2, 3)[h]
                k = F.normalize(xt, dim=0)
                S = 0.5 * S - 0.2 * _ns(torch.outer(M @ k - xt, k), 3)
                M = M + S
                out.append(M @ xt)
            yb.append(torch.stack(out))
        ys.append(torch.cat(yb, dim=-1))
    return torch.stack(ys)


def mlp2(ws, z, residual=False):  # ws = [W2 (first layer), W1 (output layer)]
    h = ws[1] @ F.silu(ws[0] @ z)
    return z + h if residual else h


def first(learner):
    return [learner.meta["M__W2"][0], learner.meta["M__W1"][0]]


def grads_of(loss, ws):
    return torch.autograd.grad(loss, ws, create_graph=True)


def hand_precondition(learner, x):
    """Dot objective, read before the update; d = g / (|P x_t| + 1e-3); W <- 0.9 W - 0.1 d."""
    P = learner.slow["P"].weight
    ys = []
    for b in range(x.shape[0]):
        ws, out = first(learner), []
        for t in range(x.shape[1]):
            xt = x[b, t]
            out.append(mlp2(ws, xt))
            g = grads_of(-(mlp2(ws, xt) * torch.tanh(xt)).sum(), ws)
            by = (P @ xt).square()
            ws = [0.9 * w - 0.1 * gi / (by**0.5 + 1e-3) for w, gi in zip(ws, g, strict=True)]
        ys.append(torch.stack(out))
    return torch.stack(ys)


def hand_every_three(learner, x):
    """Linear memory, updates at tokens 1, 4, 7, ... with the gradients summed since the last."""
    ys = []
    for b in range(x.shape[0]):
        M, acc, out = learner.meta["M__W1"][0], 0.0, []
        for t in range(x.shape[1]):
            xt = x[b, t]
            acc = acc + torch.outer(M @ xt - 2 * xt, xt)
            if t % 3 == 0:
                M, acc = M - 0.3 * acc, 0.0
            out.append(M @ xt)
        ys.append(torch.stack(out))
    return torch.stack(ys)


def hand_nesterov(learner, x):
    """Residual MLP, L2: S <- 0.6 S - 0.2 g; M <- M + 0.6 S - 0.2 g."""
    ys = []
    for b in range(x.shape[0]):
        ws, out = first(learner), []
        S = [torch.zeros_like(w) for w in ws]
        for t in range(x.shape[1]):
            xt = x[b, t]
            g = grads_of(0.5 * ((mlp2(ws, xt, True) - xt.square()) ** 2).sum(), ws)
            S = [0.6 * s - 0.2 * gi for s, gi in zip(S, g, strict=True)]
            ws = [w + 0.6 * s - 0.2 * gi for w, s, gi in zip(ws, S, g, strict=True)]
            out.append(mlp2(ws, xt, True))
        ys.append(torch.stack(out))
    return torch.stack(ys)


def hand_decay_dgd(learner, x):
    """W <- 0.9 W, then per layer W <- W - e (W x) x^T - e g, e = 0.5 / (1 + 0.5 |x|^2)."""
    ys = []
    for b in range(x.shape[0]):
        ws, out = first(learner), []
        for t in range(x.shape[1]):
            xt = x[b, t]
            g = grads_of(0.5 * ((mlp2(ws, xt) - xt) ** 2).sum(), ws)
            ins = [xt, F.silu(ws[0] @ xt)]
            new = []
            for w, gi, xi in zip(ws, g, ins, strict=True):
                w = 0.9 * w
                e = 0.5 / (1 + 0.5 * xi @ xi)
                new.append(w - e * torch.outer(w @ xi, xi) - e * gi)
            ws = new
            out.append(mlp2(ws, xt))
        ys.append(torch.stack(out))
    return torch.stack(ys)


def _precondition_opt(g, x):
    P = g.level("P", state=nl.linear(4, 1), frequency=nl.per_step(), objective=nl.outer())
    return nl.chain(nl.precondition(P(x).square(), power=0.5, eps=1e-3), nl.gd(lr=0.1, retain=0.9))


PATTERNS = {
    "newton_schulz": (
        lambda: memory_graph(
            "ns",
            nl.linear(6, 6),
            nl.chain(nl.orthogonalize(3), nl.gd(lr=0.2, momentum=0.5)),
            nl.l2(),
            key=lambda x: x.normalize(),
            heads=2,
        ),
        hand_newton_schulz,
        "inner optimizer NewtonSchulz",
    ),
    "precondition": (
        lambda: memory_graph(
            "pre",
            nl.mlp(4, 4, width=3),
            _precondition_opt,
            nl.dot(),
            at="prev",
            value=lambda x: x.apply("tanh"),
        ),
        hand_precondition,
        "inner optimizer precondition",
    ),
    "every_three_tokens": (
        lambda: memory_graph(
            "every3",
            nl.linear(4, 4),
            nl.gd(lr=0.3),
            nl.l2(),
            frequency=nl.every(3, "token", offset=1),
            value=lambda x: 2 * x,
        ),
        hand_every_three,
        "updates every 3 tokens (+1)",
    ),
    "nesterov": (
        lambda: memory_graph(
            "nesterov",
            nl.mlp(4, 4, width=3, residual=True),
            nl.gd(lr=0.2, momentum=0.6, nesterov=True),
            nl.l2(),
            value=lambda x: x.square(),
        ),
        hand_nesterov,
        "Nesterov",
    ),
    "decay_then_dgd": (
        lambda: memory_graph(
            "decay_dgd",
            nl.mlp(4, 4, width=3),
            nl.chain(nl.weight_decay(0.1), nl.dgd(lr=0.5)),
            nl.l2(),
        ),
        hand_decay_dgd,
        "inner optimizer weight_decay(0.1)",
    ),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    learner = quiet_compile(PATTERNS[name][0]())
    with torch.no_grad():  # initial states large enough for the updates to matter
        for p in learner.meta.values():
            p.normal_(0, 0.5)
    return learner


def inputs(name, B=2, T=7, seed=1):
    torch.manual_seed(seed)
    return torch.randn(B, T, 6 if name == "newton_schulz" else 4, dtype=DT)


@pytest.mark.parametrize("name", PATTERNS)
def test_formerly_refused_pattern_compiles_with_one_warning(name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner = compile(PATTERNS[name][0](), dtype=DT)
        learner(inputs(name))
        learner(inputs(name))
    mine = [w for w in caught if issubclass(w.category, nl.ReferenceLoopWarning)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    text = str(mine[0].message)
    assert "level 'M'" in text and PATTERNS[name][2] in text and "reference loop" in text
    assert issubclass(nl.ReferenceLoopWarning, UserWarning)
    assert learner.plan.levels["M"].lowering == "reference_loop"
    assert "reference_loop" in str(learner.plan)


@pytest.mark.parametrize("name", PATTERNS)
def test_reference_loop_matches_the_hand_written_token_loop(name):
    """Outputs and the meta-gradients (through every inner update, create_graph) equal a token
    loop of the same equations, float64."""
    learner = build(name)
    x = inputs(name).requires_grad_()
    y = learner(x)[0]["y"]
    hand = PATTERNS[name][1](learner, x)
    assert rel(y, hand) <= 1e-10
    cot = torch.randn_like(y)
    params = [x, *learner.meta.values()]
    got = torch.autograd.grad((y * cot).sum(), params)
    want = torch.autograd.grad((hand * cot).sum(), params)
    for a, b in zip(got, want, strict=True):
        assert b.abs().max() > 0 and rel(a, b) <= 1e-10


@pytest.mark.parametrize("name", PATTERNS)
def test_reference_loop_segments_equal_one_pass(name):
    learner = build(name)
    x = inputs(name, T=8)
    y, state = learner(x)
    parts, st = [], None
    for s, e in ((0, 3), (3, 4), (4, 8)):  # uneven: phases of every-3 updates carry over
        out, st = learner(x[:, s:e], st)
        parts.append(out["y"])
    assert rel(torch.cat(parts, dim=1), y["y"]) <= 1e-12
    for a, b in zip(st["M"]["running"], state["M"]["running"], strict=True):
        assert rel(a, b) <= 1e-12
    assert st["M"]["tokens"] == 8


@pytest.mark.parametrize("name", ["precondition", "every_three_tokens"])
def test_reference_loop_read_only_pass_reads_the_state_it_starts_from(name):
    learner = build(name)
    x = inputs(name)
    _, state = learner(x)
    y, same = learner(x, state, writes=False)
    assert same["M"] is state["M"]
    ws = [w[0, 0] for w in state["M"]["running"]]  # sample 0, head 0
    for t in range(x.shape[1]):
        z = x[0, t]
        want = mlp2(ws, z) if len(ws) == 2 else ws[0] @ z
        assert rel(y["y"][0, t], want) <= 1e-12


@pytest.mark.parametrize("name", PATTERNS)
def test_reference_loop_trains_and_round_trips_state_dict(name):
    """A few outer steps on a regression of the read-outs (y_t ~ x_t / 2, which the meta-learned
    initial state can carry) lower the loss; state_dict loads exactly."""
    learner = build(name)
    x = inputs(name, B=4, T=6, seed=3) * 0.5
    opt = torch.optim.Adam(learner.parameters(), lr=0.05)

    def loss():
        y = learner(x)[0]["y"]
        return ((y - 0.5 * x) ** 2).mean()

    before = loss().item()
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.9 * before
    twin = build(name, seed=5)
    twin.load_state_dict(learner.state_dict())
    assert torch.equal(twin(x)[0]["y"], learner(x)[0]["y"])


@pytest.mark.parametrize("read", ["new", "prev"])
def test_reference_loop_equals_the_deep_memory_kernel_on_a_trivial_chain(read):
    """chain(weight_decay(0), gd(...)) is plain GD with momentum and forgetting: the reference
    loop (gradients at the chunk-start state, chunk 2) equals the deep-memory lowering, data-
    dependent rates included."""

    def graph(chain):
        g = nl.Graph("t", chunk=2)
        x = g.input("x", dim=4)
        rates = [g.level(n, state=nl.linear(4, 1), frequency=nl.per_step(),
                         objective=nl.outer())(x) for n in ("A", "B", "C")]  # fmt: skip
        gd = nl.gd(lr=nl.signal(rates[0]), momentum=nl.signal(rates[1]),
                   retain=nl.signal(rates[2]))  # fmt: skip
        mem = g.level("M", state=nl.mlp(4, 4, width=3), frequency=nl.per_token(),
                      context=nl.kv(key=x.normalize(), value=x), objective=nl.l2(),
                      optimizer=nl.chain(nl.weight_decay(0.0), gd) if chain else gd,
                      init=nl.meta())  # fmt: skip
        g.output("y", mem(x, at=read))
        return g

    torch.manual_seed(0)
    fast = compile(graph(False), dtype=DT)
    loop = quiet_compile(graph(True))
    assert (fast.plan.levels["M"].lowering, loop.plan.levels["M"].lowering) == (
        "deep_memory", "reference_loop")  # fmt: skip
    loop.load_state_dict(weights(fast), strict=False)
    x = torch.randn(2, 7, 4, dtype=DT, requires_grad=True)
    ya, yb = fast(x)[0]["y"], loop(x)[0]["y"]
    assert rel(yb, ya) <= 1e-10
    cot = torch.randn_like(ya)
    ga = torch.autograd.grad((ya * cot).sum(), [x, *fast.parameters()])
    gb = torch.autograd.grad((yb * cot).sum(), [x, *loop.parameters()])
    for a, b in zip(ga, gb, strict=True):
        assert rel(b, a) <= 1e-10


def test_still_refused_patterns_say_why():
    def memory(optimizer, frequency=None):
        return memory_graph("r", nl.linear(4, 4), optimizer, nl.l2(), frequency=frequency)

    cases = [
        (memory(nl.chain(nl.follow(nl.const(1.0)), nl.gd(lr=0.1))), "level 'M'.*follow"),
        (memory(nl.dgd(lr=0.1), nl.every(2, "token")), "level 'M'.*dgd .*ambiguous"),
        (memory(nl.gd(lr=0.1), nl.per_step()), "level 'M'.*sequence learner"),
    ]
    for graph, match in cases:
        with pytest.raises(nl.CompileError, match=match):
            compile(graph)


# ------------------------------------------------------------------------------ edges: blocks


def block_graph(mode=None, edge="W"):
    """x -> W (projection) -> B (MLP block updated every 2 tokens, Eq. 71) -> y."""
    g = nl.Graph("blk")
    x = g.input("x", dim=4)
    W = g.level("W", state=nl.linear(4, 4), frequency=nl.per_step(), objective=nl.outer())
    blk = g.level("B", state=nl.mlp(4, 4, width=5), frequency=nl.every(2, "token"),
                  objective=nl.outer(), optimizer=nl.gd(lr=0.5), chunk=2, context=W(x),
                  init=nl.meta())  # fmt: skip
    g.output("y", blk(W(x)))
    if mode is not None:
        g.differentiate(edge, "B", mode)
    return g


def block_loss(target, start_at=0):
    def loss_fn(out, s, e):
        lo = max(s, start_at)
        if lo >= e:
            return out["y"].sum() * 0.0
        return ((out["y"][:, lo - s :] - target[:, lo:e]) ** 2).sum()

    return loss_fn


def block_learner(mode=None, seed=0):
    torch.manual_seed(seed)
    return compile(block_graph(mode), dtype=DT)


def no_grad_reached(p):
    return p.grad is None or not p.grad.abs().sum()


def test_stop_grad_into_a_block_detaches_its_input():
    plain, cut = block_learner(), block_learner(nl.stop_grad())
    cut.load_state_dict(weights(plain), strict=False)
    x, tgt = torch.randn(2, 6, 4, dtype=DT), torch.randn(2, 6, 4, dtype=DT)
    for learner in (plain, cut):
        out, _ = learner(x, loss_fn=block_loss(tgt))
        out["loss"].backward()
    assert torch.equal(
        plain(x, loss_fn=block_loss(tgt))[0]["y"], cut(x, loss_fn=block_loss(tgt))[0]["y"]
    )
    assert plain.slow["W"].weight.grad.abs().sum() > 0
    assert no_grad_reached(cut.slow["W"].weight)
    for p in cut.blocks.parameters():  # the block itself still meta-learns
        assert p.grad.abs().sum() > 0
    # the reference backend (its token loops, cut at the same ticks) agrees, edge included
    cut.zero_grad()
    cut.backend = "reference"
    out, _ = cut(x, loss_fn=block_loss(tgt))
    out["loss"].backward()
    assert no_grad_reached(cut.slow["W"].weight)


def _block_grads(learner, x, tgt, start_at=0, T=None):
    learner.zero_grad(set_to_none=True)
    xs = x if T is None else x[:, :T]
    out, _ = learner(xs, loss_fn=block_loss(tgt, start_at))
    out["loss"].backward()
    return [p.grad.clone() for p in learner.blocks.parameters()]


def test_truncated_into_a_block_cuts_the_meta_gradient_after_k_updates():
    """B updates at tokens 2, 4, 6, 8. truncated(2) detaches its parameters after its 2nd and
    4th update: the meta-gradient of the whole loss equals that of the first 4 tokens alone,
    and the last 4 tokens' loss gives exactly zero."""
    plain, trunc = block_learner(), block_learner(nl.truncated(2))
    trunc.load_state_dict(weights(plain), strict=False)
    x, tgt = torch.randn(2, 8, 4, dtype=DT), torch.randn(2, 8, 4, dtype=DT)
    whole = _block_grads(trunc, x, tgt)
    head = _block_grads(plain, x, tgt, T=4)
    for a, b in zip(whole, head, strict=True):
        assert rel(a, b) <= 1e-12
    for gr in _block_grads(trunc, x, tgt, start_at=4):
        assert torch.equal(gr, torch.zeros_like(gr))
    assert any(gr.abs().sum() > 0 for gr in _block_grads(plain, x, tgt, start_at=4))
    # values are unchanged, and the reference backend agrees
    y = trunc(x, loss_fn=block_loss(tgt))[0]["y"]
    assert torch.equal(y, plain(x, loss_fn=block_loss(tgt))[0]["y"])
    trunc.backend = "reference"
    for a, b in zip(_block_grads(trunc, x, tgt), whole, strict=True):
        assert rel(a, b) <= 1e-10


def test_truncated_into_a_block_with_recomputed_pieces():
    """Pieces recomputed in the backward (recompute_pieces) cut the meta-gradient at the same
    updates: the same gradients as the kept graphs."""
    trunc = block_learner(nl.truncated(2))
    x, tgt = torch.randn(2, 11, 4, dtype=DT), torch.randn(2, 11, 4, dtype=DT)
    kept = _block_grads(trunc, x, tgt)
    assert any(g.abs().sum() > 0 for g in kept)
    trunc.recompute_pieces = True
    for a, b in zip(_block_grads(trunc, x, tgt), kept, strict=True):
        assert rel(a, b) <= 1e-10


def test_truncated_into_a_block_with_k_beyond_the_sequence_is_unrolled():
    plain, trunc = block_learner(), block_learner(nl.truncated(4))
    trunc.load_state_dict(weights(plain), strict=False)
    x, tgt = torch.randn(2, 8, 4, dtype=DT), torch.randn(2, 8, 4, dtype=DT)
    for a, b in zip(_block_grads(trunc, x, tgt), _block_grads(plain, x, tgt), strict=True):
        assert torch.equal(a, b)


def test_stop_grad_on_a_nested_cms_init_edge_freezes_the_initial_state():
    """Nested CMS: mlp1 meta-learns mlp0's initial state (an init edge); stop_grad on it leaves
    mlp0's initial parameters without gradient and changes no value."""

    def learner(mode):
        torch.manual_seed(0)
        g = get("cms", d=4, chunks=(2, 4), variant="nested", hidden=5, lrs=0.3)
        if mode:
            g.differentiate("mlp1", "mlp0", mode)
        return compile(g, dtype=DT)

    plain, cut = learner(None), learner(nl.stop_grad())
    cut.load_state_dict(weights(plain), strict=False)
    x, tgt = torch.randn(2, 6, 4, dtype=DT), torch.randn(2, 6, 4, dtype=DT)
    ys = []
    for m in (plain, cut):
        out, _ = m(x, loss_fn=block_loss(tgt))
        out["loss"].backward()
        ys.append(out["y"])
    assert torch.equal(ys[0], ys[1])
    for p in cut.blocks["mlp0"].net.parameters():
        assert no_grad_reached(p)
    assert all(p.grad.abs().sum() > 0 for p in plain.blocks["mlp0"].net.parameters())
    assert all(p.grad.abs().sum() > 0 for p in cut.blocks["mlp1"].net.parameters())


# ------------------------------------------------------------------------------ attention


def test_truncated_into_attention_detaches_the_cache_between_windows():
    def learner(mode):
        torch.manual_seed(0)
        g = get("softmax_attention", d=6, heads=2)
        if mode:
            g.differentiate("W_k", "M", mode)
        return compile(g, dtype=DT)

    plain, trunc = learner(None), learner(nl.truncated(3))  # windows of 3 tokens
    trunc.load_state_dict(weights(plain), strict=False)
    x = torch.randn(1, 8, 6, dtype=DT, requires_grad=True)
    y = trunc(x)[0]["y"]
    assert torch.equal(y, plain(x)[0]["y"])
    (gx,) = torch.autograd.grad(y[0, 7].sum(), x)  # window of tokens 6, 7
    assert torch.equal(gx[0, :6], torch.zeros_like(gx[0, :6])) and gx[0, 6:].abs().sum() > 0
    (gx,) = torch.autograd.grad(trunc(x)[0]["y"][0, 4].sum(), x)  # window 3, 4, 5
    assert not gx[0, :3].abs().sum() and gx[0, 3].abs().sum() > 0 and not gx[0, 5:].abs().sum()
    # k beyond the sequence: the full gradient
    long = learner(nl.truncated(8))
    long.load_state_dict(weights(plain), strict=False)
    (ga,) = torch.autograd.grad(long(x)[0]["y"].sum(), x)
    (gb,) = torch.autograd.grad(plain(x)[0]["y"].sum(), x)
    assert torch.equal(ga, gb)


# ------------------------------------------------------------------------------ clusters


def lp_cluster(mode=None, src="W_k"):
    """An MLP memory on an lp objective (the cluster lowering) keyed by a projection."""
    g = nl.Graph("lpc", chunk=2)
    x = g.input("x", dim=4)
    Wk = g.level("W_k", state=nl.linear(4, 4), frequency=nl.per_step(), objective=nl.outer())
    mem = g.level("M", state=nl.mlp(4, 4, width=3), frequency=nl.per_token(),
                  context=nl.kv(key=Wk(x), value=x.square()), objective=nl.lp(3.0),
                  optimizer=nl.gd(lr=0.3, momentum=0.5, retain=0.9), init=nl.meta())  # fmt: skip
    g.output("y", mem(x))
    if mode is not None:
        g.differentiate(src, "M", mode)
    torch.manual_seed(0)
    return compile(g, dtype=DT)


def test_stop_grad_into_a_cluster_detaches_a_source_computed_before_the_windows():
    plain, cut = lp_cluster(), lp_cluster(nl.stop_grad())
    assert cut.plan.levels["M"].lowering == "cluster"
    cut.load_state_dict(weights(plain), strict=False)
    x = torch.randn(2, 7, 4, dtype=DT)
    ya, yb = plain(x)[0]["y"], cut(x)[0]["y"]
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert plain.slow["W_k"].weight.grad.abs().sum() > 0
    assert no_grad_reached(cut.slow["W_k"].weight)
    assert cut.meta["M__W1"].grad.abs().sum() > 0


def test_truncated_into_a_cluster_member_detaches_its_state_every_k_chunks():
    plain, trunc = lp_cluster(), lp_cluster(nl.truncated(2))  # 2 chunks of 2 = 4 tokens
    trunc.load_state_dict(weights(plain), strict=False)
    x = torch.randn(1, 9, 4, dtype=DT, requires_grad=True)
    y, st = trunc(x)
    y0, st0 = plain(x)
    assert rel(y["y"], y0["y"]) <= 1e-12
    assert rel(st["M"]["running"][0], st0["M"]["running"][0]) <= 1e-12
    (gx,) = torch.autograd.grad(y["y"][0, 8].sum(), x)  # last window: token 8 alone
    assert torch.equal(gx[0, :8], torch.zeros_like(gx[0, :8])) and gx[0, 8].abs().sum() > 0
    (gx,) = torch.autograd.grad(trunc(x)[0]["y"][0, 6].sum(), x)  # window 4..7
    assert not gx[0, :4].abs().sum() and gx[0, 4:6].abs().sum() > 0
    long = lp_cluster(nl.truncated(5))
    long.load_state_dict(weights(plain), strict=False)
    (ga,) = torch.autograd.grad(long(x)[0]["y"].sum(), x)
    (gb,) = torch.autograd.grad(plain(x)[0]["y"].sum(), x)
    assert torch.equal(ga, gb)


def smt_graph(src, dst):
    g = get("self_modifying_titans", d=4, heads=1, chunk=2, chunk_mem=4, conv_window=0,
            output_gate=False)  # fmt: skip
    g.differentiate(src, dst, nl.stop_grad())
    return g


@pytest.mark.parametrize("src", ["M_v", "W_eta"])
def test_stop_grad_from_inside_a_cluster_window_detaches_it_there(src):
    """M_k's cluster reads M_v and W_eta(M_eta(x)) at the chunk-start states, inside its window
    program: a detach node there; values unchanged, the meta-gradient changes (float64 checks
    against a hand-built detach: tests/test_cluster_fallback.py)."""
    torch.manual_seed(0)
    plain = compile(get("self_modifying_titans", d=4, heads=1, chunk=2, chunk_mem=4,
                        conv_window=0, output_gate=False), dtype=DT)  # fmt: skip
    cut = compile(smt_graph(src, "M_k"), dtype=DT)
    cut.load_state_dict(weights(plain), strict=False)
    (c,) = [c for c in cut.program.clusters if "M_k" in c.names]
    assert any(n.op == "detach" for n in c.nodes)
    x = torch.randn(2, 5, 4, dtype=DT)
    ya, yb = plain(x)[0]["y"], cut(x)[0]["y"]
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    pa, pb = dict(plain.named_parameters()), dict(cut.named_parameters())
    assert any(rel(pb[n].grad, pa[n].grad) > 1e-6 for n in pa if pa[n].grad is not None)


def test_stop_grad_into_self_modifying_titans_from_before_the_windows():
    """W_q (the query projection) and M_k's read-outs (another cluster, run before M_mem's)
    are computed over the whole sequence before M_mem's windows: detached there."""
    torch.manual_seed(0)
    plain = compile(get("self_modifying_titans", d=4, heads=1, chunk=2, chunk_mem=4,
                        conv_window=0, output_gate=False), dtype=DT)  # fmt: skip
    x = torch.randn(1, 5, 4, dtype=DT)
    y0 = plain(x)[0]["y"]
    for src in ("W_q", "M_k"):
        learner = compile(smt_graph(src, "M_mem"), dtype=DT)
        learner.load_state_dict(weights(plain), strict=False)
        y = learner(x)[0]["y"]
        assert torch.equal(y, y0)
        y.sum().backward()
        if src == "W_q":
            assert no_grad_reached(learner.slow["W_q"].weight)
        assert ".detach()" in learner.code


def test_stop_grad_on_an_init_edge_into_a_memory_stops_the_meta_gradient():
    """init=meta("S"): level S meta-learns M's initial state; stop_grad S -> M leaves that
    initial state without gradient, values unchanged."""

    def learner(cut):
        g = nl.Graph("init_edge")
        x = g.input("x", dim=4)
        g.level("S", state=nl.tensor(1), frequency=nl.per_step(), objective=nl.outer())
        mem = g.level("M", state=nl.linear(4, 4), frequency=nl.per_token(),
                      context=nl.kv(key=x, value=x), objective=nl.l2(),
                      optimizer=nl.gd(lr=0.1), init=nl.meta("S"))  # fmt: skip
        g.output("y", mem(x, at="new"))
        if cut:
            g.differentiate("S", "M", nl.stop_grad())
        torch.manual_seed(0)
        return compile(g, dtype=DT)

    plain, cut = learner(False), learner(True)
    x = torch.randn(2, 5, 4, dtype=DT, requires_grad=True)
    ya, yb = plain(x)[0]["y"], cut(x)[0]["y"]
    assert torch.equal(ya, yb)
    ya.sum().backward()
    assert plain.meta["M__M"].grad.abs().sum() > 0
    x.grad = None
    yb.sum().backward()
    assert no_grad_reached(cut.meta["M__M"]) and x.grad.abs().sum() > 0


def test_edges_into_a_reference_loop_memory():
    """stop_grad P -> M (P is M's preconditioner) detaches P; truncated(2) detaches M's carried
    state every 2 tokens. Values are unchanged by either."""

    def learner(mode):
        torch.manual_seed(0)
        g = PATTERNS["precondition"][0]()
        if mode is not None:
            g.differentiate("P", "M", mode)
        return quiet_compile(g)

    plain, cut, trunc = learner(None), learner(nl.stop_grad()), learner(nl.truncated(2))
    for m in (cut, trunc):
        m.load_state_dict(weights(plain), strict=False)
    x = inputs("precondition").requires_grad_()
    y = plain(x)[0]["y"]
    assert torch.equal(cut(x)[0]["y"], y) and torch.equal(trunc(x)[0]["y"], y)
    cut(x)[0]["y"].sum().backward()
    assert no_grad_reached(cut.slow["P"].weight)
    y.sum().backward()
    assert plain.slow["P"].weight.grad.abs().sum() > 0
    (gx,) = torch.autograd.grad(trunc(x)[0]["y"][0, 5].sum(), x)  # window of tokens 4, 5
    assert not gx[0, :4].abs().sum() and gx[0, 4].abs().sum() > 0
    (gx,) = torch.autograd.grad(plain(x)[0]["y"][0, 5].sum(), x)
    assert gx[0, :4].abs().sum() > 0
