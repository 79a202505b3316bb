"""The compiler: chunked equals reference through whole compiled graphs, causality, segments,
meta-gradients, the plan, state_dict."""

from __future__ import annotations

import copy

import pytest
import torch

import nlgraph as nl
from nlgraph.compiler import compile
from nlgraph.library import get

MEMORIES = [
    ("linear_attention", {}),
    ("gated_linear_attention", {}),
    ("deltanet", {"chunk": 4}),
    ("gated_deltanet", {"chunk": 4}),
    ("dgd_memory", {"chunk": 4}),
    ("titans", {"chunk": 4}),
    ("softmax_attention", {}),
    ("sliding_window_attention", {"window": 3}),
]
SHAPES = [(1, 1), (2, 7), (3, 12)]  # (B, T): T = 1, T not a multiple of the chunk, B > 1
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


def build(name, kw, d=6, heads=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return compile(get(name, d=d, heads=heads, **kw), dtype=dtype)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def run_all(learner, x, backend):
    learner.backend = backend
    learner.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out, state = learner(x)
    y = out["y"]
    torch.manual_seed(123)
    loss = (y * torch.randn_like(y)).sum()
    finals = [t for t in _flat(state) if t.requires_grad]
    if finals:
        loss = loss + sum((f * torch.randn_like(f)).sum() for f in finals)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None}
    return y.detach(), [t.detach() for t in _flat(state)], grads, x.grad


def _flat(state):
    out = []
    for v in state.values():
        if isinstance(v, dict):
            out += _flat(v)
        elif isinstance(v, torch.Tensor):
            out.append(v)
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,T", SHAPES, ids=[f"B{b}T{t}" for b, t in SHAPES])
@pytest.mark.parametrize("name,kw", MEMORIES, ids=[m[0] for m in MEMORIES])
def test_chunk_equals_reference(name, kw, B, T, dtype):
    learner = build(name, kw, dtype=dtype)
    x = torch.randn(B, T, 6, dtype=dtype)
    ref = run_all(learner, x, "reference")
    fast = run_all(learner, x, "chunk")
    tol = TOL[dtype]
    assert rel(fast[0], ref[0]) <= tol
    for a, b in zip(fast[1], ref[1], strict=True):
        assert rel(a, b) <= tol
    assert fast[2].keys() == ref[2].keys() and ref[2]
    for n in ref[2]:
        assert rel(fast[2][n], ref[2][n]) <= tol, n
    assert rel(fast[3], ref[3]) <= tol


@pytest.mark.parametrize("name,kw", MEMORIES, ids=[m[0] for m in MEMORIES])
def test_causality(name, kw):
    learner = build(name, kw)
    x = torch.randn(2, 10, 6, dtype=torch.float64)
    y0 = learner(x)[0]["y"]
    for t in (0, 4, 8):
        x2 = x.clone()
        x2[:, t + 1 :] += torch.randn_like(x2[:, t + 1 :])
        y1 = learner(x2)[0]["y"]
        assert torch.equal(y1[:, : t + 1], y0[:, : t + 1]), t


@pytest.mark.parametrize("name,kw", MEMORIES, ids=[m[0] for m in MEMORIES])
def test_segments_with_carried_state_equal_one_pass(name, kw):
    learner = build(name, kw)
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    y_full = learner(x)[0]["y"]
    state, ys = None, []
    for seg in (x[:, :4], x[:, 4:5], x[:, 5:]):
        out, state = learner(seg, state)
        ys.append(out["y"])
    assert rel(torch.cat(ys, 1), y_full) <= 1e-12


def test_meta_gradients_gradcheck():
    """PAPER.md 9.11: the meta-learned initial state of a deep memory and the projections that
    feed a delta-rule memory receive exact gradients through the unrolled inner updates."""
    g = nl.Graph("tiny", chunk=2)
    x = g.input("x", dim=3)
    k = g.level("W_k", state=nl.linear(3, 3), frequency=nl.per_step(), objective=nl.outer(),
                init=nl.normal(0.5))(x).normalize()  # fmt: skip
    deep = g.level(
        "deep", state=nl.mlp(3, 3, width=4, residual=True), frequency=nl.per_token(),
        context=nl.kv(key=k, value=x), objective=nl.l2(),
        optimizer=nl.gd(lr=0.5, momentum=0.5, retain=0.9), init=nl.meta(),
    )  # fmt: skip
    lin = g.level(
        "delta", state=nl.linear(3, 3), frequency=nl.per_token(),
        context=nl.kv(key=k, value=deep(k, at="new")), objective=nl.l2(),
        optimizer=nl.gd(lr=0.7), init=nl.meta(),
    )  # fmt: skip
    g.output("y", lin(k, at="new"))
    learner = compile(g, dtype=torch.float64)
    xs = torch.randn(1, 5, 3, dtype=torch.float64)
    params = [p for _, p in sorted(learner.named_parameters())]
    names = [n for n, _ in sorted(learner.named_parameters())]
    assert any("deep.initial.W1" in n for n in names) and any("delta.initial.M" in n for n in names)

    def f(*ps):
        for p, v in zip(params, ps, strict=True):
            p.data = v
        return learner(xs)[0]["y"]

    def fn(*ps):
        sd = {n: v for n, v in zip(names, ps, strict=True)}
        return torch.func.functional_call(learner, sd, (xs,))[0]["y"]

    inputs = tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)
    grads = torch.autograd.grad(fn(*inputs).sum(), inputs)
    for n, gr in zip(names, grads, strict=True):
        assert gr.abs().sum() > 0, f"{n} gets no meta-gradient"


def test_plan_is_printable_and_checked(capsys, monkeypatch):
    monkeypatch.setenv("NLGRAPH_DEBUG", "2")
    learner = compile(get("titans", d=8, heads=2))
    out = capsys.readouterr().out
    assert "deep_memory" in out and "tier 1" in out and "forward order" in out
    assert str(learner.plan) in out
    learner.plan.check()
    assert learner.plan.schedule(4)["M"] == [1, 2, 3, 4]


def test_state_dict_round_trip_and_version():
    a = build("titans", {"chunk": 4}, seed=1)
    b = build("titans", {"chunk": 4}, seed=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 9, 6, dtype=torch.float64)
    assert torch.equal(a(x)[0]["y"], b(x)[0]["y"])
    sd = a.state_dict()
    assert sd["_extra_state"]["version"] == 3 and sd["_extra_state"]["spec"]["name"] == "titans"
    bad = copy.deepcopy(sd)
    bad["_extra_state"]["version"] = 99
    with pytest.raises(nl.CompileError, match="version"):
        b.load_state_dict(bad)
    other = build("deltanet", {"chunk": 4})
    with pytest.raises((nl.CompileError, RuntimeError)):
        other.load_state_dict(sd)


def test_unsupported_patterns_name_the_level():
    g = nl.Graph("lp")
    x = g.input("x", dim=2)
    g.level("M", state=nl.linear(2, 2), frequency=nl.per_step(), context=nl.kv(key=x, value=x),
            objective=nl.l2(), optimizer=nl.gd(lr=0.1))  # fmt: skip
    with pytest.raises(nl.CompileError, match="level 'M'.*inner objective 'l2'"):
        compile(g)
    g = get("adam")
    with pytest.raises(nl.CompileError, match="compile_optimizer"):
        compile(g)


def test_a_matrix_memory_with_a_bias_is_refused_not_ignored():
    g = nl.Graph("biased")
    x = g.input("x", dim=2)
    y = g.level("M", state=nl.linear(2, 2, bias=True), frequency=nl.per_token(),
                context=nl.kv(key=x, value=x), objective=nl.l2(),
                optimizer=nl.gd(lr=0.1))(x)  # fmt: skip
    g.output("y", y)
    with pytest.raises(nl.CompileError, match="level 'M'.*bias=True"):
        compile(g)


def test_symbolic_widths_must_be_bound():
    g = nl.Graph("sym")
    x = g.input("x", dim="d")
    g.output("y", g.level("W", state=nl.linear("d", "d"), frequency=nl.per_step(),
                          objective=nl.outer())(x))  # fmt: skip
    with pytest.raises(nl.CompileError, match="'d' is not bound"):
        compile(g)
    learner = compile(g, d=5)
    assert learner(torch.randn(1, 3, 5))[0]["y"].shape == (1, 3, 5)


def test_named_flows_compile_as_shared_nodes():
    g = nl.Graph("stack")
    h = g.input("x", dim=6)
    for i in range(3):
        y = g.include(get("deltanet", d=6, heads=2, chunk=4), f"l{i}", bind={"x": h})["y"]
        h = g.let(f"h{i}", h + y)
    g.output("y", h)
    learner = compile(g, dtype=torch.float64)
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    out, state = learner(x)
    assert sorted(state) == ["l0.M", "l1.M", "l2.M"]
    learner.backend = "reference"
    assert rel(learner(x)[0]["y"], out["y"]) <= 1e-10


def _weights(learner):
    return {k: v for k, v in learner.state_dict().items() if k != "_extra_state"}


def _edge_graph(mode):
    g = get("deltanet", d=6, heads=2, chunk=2)
    g.differentiate("W_k", "M", mode)
    return g


def test_stop_grad_edge_detaches_the_source_in_the_update():
    torch.manual_seed(0)
    plain = compile(get("deltanet", d=6, heads=2, chunk=2), dtype=torch.float64)
    cut = compile(_edge_graph(nl.stop_grad()), dtype=torch.float64)
    cut.load_state_dict(_weights(plain), strict=False)
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    y0, y1 = plain(x)[0]["y"], cut(x)[0]["y"]
    assert torch.equal(y0, y1)  # same values
    y1.sum().backward()
    assert cut.slow["W_k"].weight.grad is None or not cut.slow["W_k"].weight.grad.abs().sum()
    assert cut.slow["W_v"].weight.grad.abs().sum() > 0
    assert ".detach()" in cut.code


def test_truncated_edge_limits_how_far_gradients_reach():
    torch.manual_seed(0)
    g = _edge_graph(nl.truncated(2))  # windows of 2 chunks = 4 tokens
    learner = compile(g, dtype=torch.float64)
    plain = compile(get("deltanet", d=6, heads=2, chunk=2), dtype=torch.float64)
    plain.load_state_dict(_weights(learner), strict=False)
    x = torch.randn(1, 9, 6, dtype=torch.float64, requires_grad=True)
    y = learner(x)[0]["y"]
    assert torch.allclose(y, plain(x)[0]["y"], atol=1e-12)  # values unchanged
    (gx,) = torch.autograd.grad(y[0, 8].sum(), x)
    assert gx[0, :8].abs().sum() == 0 and gx[0, 8].abs().sum() > 0  # last window: token 8 only
    (gx,) = torch.autograd.grad(learner(x)[0]["y"][0, 7].sum(), x)
    assert gx[0, :4].abs().sum() == 0 and gx[0, 4:8].abs().sum() > 0


PARAMETRIC = [m for m in MEMORIES if m[0] not in ("softmax_attention", "sliding_window_attention")]


@pytest.mark.parametrize("name,kw", PARAMETRIC, ids=[m[0] for m in PARAMETRIC])
def test_read_only_pass_reads_the_initial_state(name, kw):
    """writes=False: no memory updates — outputs equal a read of the initial state, and the
    returned state is the one passed in."""
    learner = build(name, kw)
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    _, state = learner(x)
    y1, st1 = learner(x, state, writes=False)
    y2, st2 = learner(x, state, writes=False)
    assert torch.equal(y1["y"], y2["y"])
    y_first = learner(x[:, :1], state, writes=False)[0]["y"]
    torch.testing.assert_close(y1["y"][:, :1], y_first, rtol=1e-12, atol=1e-12)
    for n in state:
        if n == "M":
            assert st1[n] is state[n]
