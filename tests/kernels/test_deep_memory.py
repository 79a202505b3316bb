"""Deep (MLP) memory kernel: chunk-parallel == token loop, exact recurrences, invariances.

PAPER 9.9 (chunked == sequential, C = 1 == token recurrence), 9.10 (causality), 9.11 (meta-learned
initial state gets gradients), 9.15 (a deep memory stores more than d pairs better than a d x d
linear memory).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nlgraph._errors import BackendUnavailableError
from nlgraph.kernels import _dispatch
from nlgraph.kernels.deep_memory import deep_memory, deep_memory_chunk, deep_memory_naive
from nlgraph.kernels.deep_memory._mlp import factored_grads, mlp_apply, vmap_grads
from nlgraph.kernels.deep_memory._scan import coeffs

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-10, F32: 1e-4}

# (B, T, H, Dk, Dv, Dh, C, dtype); residual only where Dk == Dv.
SHAPES = [
    pytest.param((1, 1, 1, 4, 4, 6, 4, F64), id="T1"),
    pytest.param((2, 13, 2, 5, 5, 7, 4, F64), id="T13-C4-odd"),
    pytest.param((1, 11, 3, 3, 5, 7, 4, F64), id="Dk3-Dv5-noresidual"),
    pytest.param((3, 7, 2, 4, 4, 5, 1, F64), id="B3-C1"),
    pytest.param((2, 6, 1, 4, 4, 8, 16, F64), id="C-gt-T"),
    pytest.param((2, 21, 2, 8, 8, 16, 8, F32), id="f32-T21-C8"),
]
GATES = [
    pytest.param((m, f), id=f"mom{'+' if m else '-'}-forget{'+' if f else '-'}")
    for m in (True, False)
    for f in (True, False)
]


def make_inputs(B, T, H, Dk, Dv, Dh, dtype, *, momentum=True, forget=True, depth=2, seed=0):
    """Tame random inputs: unit-norm q/k (as Titans), small lr, so float32 stays comparable."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)

    def uni(lo, hi):
        return (lo + (hi - lo) * torch.rand(B, T, H, generator=g, dtype=F64)).to(dtype)

    widths = [Dv] + [Dh] * (depth - 1) + [Dk]  # W1 (output) ... W{depth} (reads the key)
    params0 = {
        f"W{i}": rnd(H, widths[i - 1], widths[i], scale=widths[i] ** -0.5)
        for i in range(1, depth + 1)
    }
    return {
        "q": F.normalize(rnd(B, T, H, Dk), dim=-1),
        "k": F.normalize(rnd(B, T, H, Dk), dim=-1),
        "v": rnd(B, T, H, Dv),
        "lr": uni(0.05, 0.4),
        "momentum": uni(0.3, 0.9) if momentum else None,
        "forget": uni(0.0, 0.2) if forget else None,
        "params0": params0,
    }


def leaves(inp):
    """Every differentiable input, named: q, k, v, the gates and params0."""
    out = {n: inp[n] for n in ("q", "k", "v", "lr", "momentum", "forget") if inp[n] is not None}
    out.update({f"params0.{n}": w for n, w in inp["params0"].items()})
    return out


def with_grad(inp):
    inp = {n: (x.clone().requires_grad_() if torch.is_tensor(x) else x) for n, x in inp.items()}
    inp["params0"] = {n: w.clone().requires_grad_() for n, w in inp["params0"].items()}
    return inp


def state_tensors(state):
    return {
        f"{p}.{n}": w for p in ("params", "momentum", "chunk_start") for n, w in state[p].items()
    }


def call(fn, inp, **kw):
    args = {n: inp[n] for n in ("q", "k", "v", "lr", "momentum", "forget")}
    return fn(**args, params0=inp["params0"], **kw)


def run_with_grads(fn, inp, seed=1, **kw):
    """Outputs, final state and gradients of every input for a fixed random cotangent."""
    inp = with_grad(inp)
    y, state = call(fn, inp, **kw)
    outs = {"y": y, **state_tensors(state)}
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (o * torch.randn(o.shape, generator=g, dtype=F64).to(o.dtype)).sum()
        for _, o in sorted(outs.items())
    )
    names, xs = zip(*leaves(inp).items(), strict=True)
    grads = torch.autograd.grad(loss, xs)
    return outs, state, dict(zip(("grad." + n for n in names), grads, strict=True))


def assert_close(got, want, tol, what):
    scale = want.abs().max().clamp_min(1e-6)
    err = ((got - want).abs().max() / scale).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def assert_all_close(got: dict, want: dict, tol):
    assert got.keys() == want.keys()
    for n in want:
        assert_close(got[n], want[n], tol, n)


# -- chunk == reference: outputs, final state, every gradient --------------------------------------


@pytest.mark.parametrize("read", ["after", "chunk_start"])
@pytest.mark.parametrize("gates", GATES)
@pytest.mark.parametrize("shape", SHAPES)
def test_chunk_matches_reference(shape, gates, read):
    B, T, H, Dk, Dv, Dh, C, dtype = shape
    inp = make_inputs(B, T, H, Dk, Dv, Dh, dtype, momentum=gates[0], forget=gates[1])
    kw = {"chunk_size": C, "read": read, "residual": Dk == Dv}
    ref_out, ref_state, ref_grads = run_with_grads(deep_memory_naive, inp, **kw)
    out, state, grads = run_with_grads(deep_memory_chunk, inp, **kw)
    assert_all_close(out, ref_out, TOL[dtype])
    assert_all_close(grads, ref_grads, TOL[dtype])
    assert (state["phase"], state["chunk_size"]) == (ref_state["phase"], C) == (T % C, C)
    assert out["y"].shape == (B, T, H, Dv) and out["y"].dtype == dtype


# (objective, activation, depth, residual); generic vmap path == factored fast path == reference
VARIANTS = [
    pytest.param(("l2", "silu", 2, True), id="l2-silu-d2"),
    pytest.param(("dot", "silu", 2, True), id="dot-silu-d2"),
    pytest.param(("l2", "gelu", 2, False), id="l2-gelu-d2-nores"),
    pytest.param(("l2", "relu", 3, True), id="l2-relu-d3"),
    pytest.param(("dot", "identity", 3, False), id="dot-identity-d3"),
    pytest.param(("l2", "silu", 1, False), id="l2-linear-d1"),
    pytest.param(("dot", "silu", 1, True), id="dot-linear-d1-res"),
]


@pytest.mark.parametrize("read", ["after", "chunk_start"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_all_paths_agree(variant, read):
    objective, activation, depth, residual = variant
    inp = make_inputs(2, 10, 2, 4, 4, 6, F64, depth=depth, seed=3)
    kw = {"chunk_size": 4, "read": read, "objective": objective}
    kw |= {"activation": activation, "residual": residual}
    ref_out, _, ref_grads = run_with_grads(deep_memory_naive, inp, **kw)
    for grads_path in ("analytic", "vmap"):
        out, _, grads = run_with_grads(deep_memory_chunk, inp, grads=grads_path, **kw)
        assert_all_close(out, ref_out, TOL[F64])
        assert_all_close(grads, ref_grads, TOL[F64])


@pytest.mark.parametrize("variant", VARIANTS)
def test_factored_gradients_equal_vmap_gradients(variant):
    """The analytic per-token gradients (outer products g x^T) == vmap(grad), and so do their
    own derivatives (the meta-gradient path)."""
    objective, activation, depth, residual = variant
    inp = with_grad(make_inputs(3, 5, 2, 4, 4, 6, F64, depth=depth, seed=4))
    params = {n: w.expand(3, *w.shape).reshape(6, *w.shape[1:]) for n, w in inp["params0"].items()}
    k, v = (inp[n].transpose(1, 2).reshape(6, 5, 4) for n in ("k", "v"))
    opts = {"objective": objective, "activation": activation, "residual": residual}
    fac = factored_grads(params, k, v, **opts)
    want = vmap_grads(params, k, v, **opts)
    got = {n: g.unsqueeze(-1) * x.unsqueeze(-2) for n, (g, x) in fac.items()}
    assert_all_close(got, want, 1e-12)
    cot = {n: torch.randn_like(w) for n, w in want.items()}
    xs = [inp["k"], inp["v"], *inp["params0"].values()]

    def meta(u):
        loss = sum((u[n] * cot[n]).sum() for n in u)
        grads = torch.autograd.grad(loss, xs, allow_unused=True)  # e.g. "dot" ignores M(k)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads, strict=True)]

    for name, a, b in zip(("k", "v", *inp["params0"]), meta(got), meta(want), strict=True):
        assert_close(a, b, 1e-12, f"meta-gradient wrt {name}")


# -- exact recurrences (PAPER 9.9) -----------------------------------------------------------------


def handwritten_c1(inp, read):
    """Eqs. of PAPER 4.1 with C = 1, one (b, h) at a time, gradients written out by hand for
    M(z) = z + W1 silu(W2 z) and l = ||M(k) - v||^2."""
    q, k, v, lr, mom, fg = (inp[n] for n in ("q", "k", "v", "lr", "momentum", "forget"))
    B, T, H, _ = q.shape
    y = torch.empty_like(v)
    for b in range(B):
        for h in range(H):
            W1, W2 = (inp["params0"][n][h].clone() for n in ("W1", "W2"))
            S1, S2 = torch.zeros_like(W1), torch.zeros_like(W2)
            for t in range(T):
                M = lambda z, W1=W1, W2=W2: z + W1 @ F.silu(W2 @ z)
                y_before = M(q[b, t, h])
                z = W2 @ k[b, t, h]
                s = torch.sigmoid(z)
                r = 2 * (k[b, t, h] + W1 @ F.silu(z) - v[b, t, h])  # dl/dM(k)
                u1 = torch.outer(r, F.silu(z))
                u2 = torch.outer((W1.T @ r) * s * (1 + z * (1 - s)), k[b, t, h])
                S1 = mom[b, t, h] * S1 - lr[b, t, h] * u1
                S2 = mom[b, t, h] * S2 - lr[b, t, h] * u2
                W1 = (1 - fg[b, t, h]) * W1 + S1
                W2 = (1 - fg[b, t, h]) * W2 + S2
                y[b, t, h] = M(q[b, t, h], W1, W2) if read == "after" else y_before
    return y, W1, W2


@pytest.mark.parametrize("read", ["after", "chunk_start"])
def test_c1_equals_handwritten_token_recurrence(read):
    inp = make_inputs(2, 9, 2, 4, 4, 5, F64, seed=5)
    want_y, W1, W2 = handwritten_c1(inp, read)
    for fn in (deep_memory_naive, deep_memory_chunk):
        y, state = call(fn, inp, chunk_size=1, read=read)
        assert_close(y, want_y, 1e-12, f"{fn.__name__} y")
        assert_close(state["params"]["W1"][-1, -1], W1, 1e-12, "W1")
        assert_close(state["params"]["W2"][-1, -1], W2, 1e-12, "W2")


def test_linear_memory_c1_is_the_gated_delta_rule():
    """Depth 1, l2, no residual: W_t = (1 - a) W + S, S = eta S - theta 2 (W k - v) k^T."""
    inp = make_inputs(1, 8, 1, 3, 4, 0, F64, depth=1, seed=6)
    W = inp["params0"]["W1"][0].clone()
    S = torch.zeros_like(W)
    ys = []
    for t in range(8):
        k, v, q = inp["k"][0, t, 0], inp["v"][0, t, 0], inp["q"][0, t, 0]
        a, eta, theta = inp["forget"][0, t, 0], inp["momentum"][0, t, 0], inp["lr"][0, t, 0]
        S = eta * S - theta * 2 * torch.outer(W @ k - v, k)
        W = (1 - a) * W + S
        ys.append(W @ q)
    y, state = call(deep_memory_chunk, inp, chunk_size=1, residual=False)
    assert_close(y[0, :, 0], torch.stack(ys), 1e-12, "y")
    assert_close(state["params"]["W1"][0, 0], W, 1e-12, "W")


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("forget", [True, False])
def test_closed_form_scan_equals_sequential_loop(momentum, forget):
    """The in-chunk recurrence in closed form (_scan) == the loop, values and gradients, with
    gates that hit 0 and 1 exactly (the segment products divide by nothing)."""
    n, N, D = 7, 3, 4
    g = torch.Generator().manual_seed(11)
    theta = torch.rand(N, n, generator=g, dtype=F64).requires_grad_()
    eta = torch.rand(N, n, generator=g, dtype=F64)
    keep = torch.rand(N, n, generator=g, dtype=F64)
    eta[:, 2], keep[:, 4], keep[0, 1] = 0.0, 0.0, 1.0
    eta, keep = eta.requires_grad_(), keep.requires_grad_()
    m0, s0, u = (torch.randn(N, *shape, generator=g, dtype=F64) for shape in ((D,), (D,), (n, D)))
    e_arg, k_arg = (eta if momentum else None), (keep if forget else None)

    m, s, ms = m0, s0, []
    for j in range(n):
        s = (eta[:, j, None] * s if momentum else 0) - theta[:, j, None] * u[:, j]
        m = (keep[:, j, None] if forget else 1) * m + s
        ms.append(m)
    want = [torch.stack(ms, 1), m, s]

    co = coeffs(theta, e_arg, k_arg)
    f = torch.ones(N, n, dtype=F64) if co.f is None else co.f
    c = torch.zeros(N, n, dtype=F64) if co.mix is None else co.mix[..., 1]
    m_all = f[..., None] * m0[:, None] + c[..., None] * s0[:, None] - co.mem @ u
    stacked = co.carry @ torch.stack([m0, s0], 1) - co.upd.mT @ u
    got = [m_all, stacked[:, 0], stacked[:, 1]]
    assert_all_close(dict(enumerate(got)), dict(enumerate(want)), 1e-13)
    xs = [x for x in (theta, e_arg, k_arg) if x is not None]
    cot = [torch.randn_like(w) for w in want]

    def grads(outs):
        return torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cot, strict=True)), xs)

    for a, b in zip(grads(got), grads(want), strict=True):
        assert_close(a, b, 1e-12, "gate gradient")


# -- causality (PAPER 9.10) ------------------------------------------------------------------------


@pytest.mark.parametrize("read", ["after", "chunk_start"])
@pytest.mark.parametrize("C", [1, 3, 4, 8])
def test_future_tokens_never_change_past_outputs(C, read):
    T = 12
    inp = make_inputs(2, T, 2, 4, 4, 6, F64, seed=7)
    y, _ = call(deep_memory_chunk, inp, chunk_size=C, read=read)
    for t in (0, 4, 6, 10):
        bumped = dict(inp)
        for n in ("q", "k", "v", "lr", "momentum", "forget"):
            x = inp[n].clone()
            x[:, t + 1 :] = x[:, t + 1 :] + 0.5 + torch.rand_like(x[:, t + 1 :])
            bumped[n] = x
        y2, _ = call(deep_memory_chunk, bumped, chunk_size=C, read=read)
        assert torch.equal(y2[:, : t + 1], y[:, : t + 1]), f"t={t}"
        assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


# -- segmenting: carried state == one pass ---------------------------------------------------------


@pytest.mark.parametrize("read", ["after", "chunk_start"])
@pytest.mark.parametrize(
    "splits", [(8,), (6,), (3, 7), (1, 2, 3)], ids=["boundary", "inside", "two-inside", "tiny"]
)
@pytest.mark.parametrize("fn", [deep_memory_chunk, deep_memory_naive], ids=["chunk", "reference"])
def test_segments_with_carried_state_equal_one_pass(fn, splits, read):
    T, C = 12, 4
    inp = with_grad(make_inputs(2, T, 2, 4, 4, 6, F64, seed=8))
    y_full, s_full = call(fn, inp, chunk_size=C, read=read)
    ys, state, edges = [], None, (0, *splits, T)
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        seg = {n: x[:, a:b] if n != "params0" else x for n, x in inp.items()}
        y, state = call(fn, seg, chunk_size=C, read=read, state=state)
        ys.append(y)
    y_seg = torch.cat(ys, dim=1)
    assert_close(y_seg, y_full, 1e-12, "y")
    assert_all_close(state_tensors(state), state_tensors(s_full), 1e-12)
    assert state["phase"] == s_full["phase"] == T % C
    # The carried state is differentiable: meta-gradients cross segment edges.
    xs = [inp["params0"]["W2"], inp["lr"]]
    g_full = torch.autograd.grad(y_full.square().sum(), xs)
    g_seg = torch.autograd.grad(y_seg.square().sum(), xs)
    for a, b in zip(g_seg, g_full, strict=True):
        assert_close(a, b, 1e-11, "segment gradient")


def test_state_from_another_chunk_size_is_refused_mid_chunk():
    inp = make_inputs(1, 6, 1, 4, 4, 6, F64)
    _, state = call(deep_memory_chunk, inp, chunk_size=4)  # 2 tokens into a chunk of 4
    with pytest.raises(ValueError, match="chunk_size=4"):
        call(deep_memory_chunk, inp, chunk_size=8, state=state)
    _, state = call(deep_memory_chunk, inp, chunk_size=3)  # on a boundary: any C may follow
    call(deep_memory_chunk, inp, chunk_size=8, state=state)


# -- meta-gradients (PAPER 9.11) -------------------------------------------------------------------


@pytest.mark.parametrize("read", ["after", "chunk_start"])
@pytest.mark.parametrize("fn", [deep_memory_chunk, deep_memory_naive], ids=["chunk", "reference"])
def test_gradcheck_params0_and_lr(fn, read):
    inp = with_grad(make_inputs(1, 5, 1, 3, 3, 4, F64, seed=9))
    W1, W2, lr = inp["params0"]["W1"], inp["params0"]["W2"], inp["lr"]

    def f(W1, W2, lr):
        kw = {"momentum": inp["momentum"], "forget": inp["forget"], "chunk_size": 2, "read": read}
        return fn(inp["q"], inp["k"], inp["v"], lr, params0={"W1": W1, "W2": W2}, **kw)[0]

    assert torch.autograd.gradcheck(f, (W1, W2, lr))
    # The meta-learned initial state is reached through the unrolled inner updates.
    y = f(W1, W2, lr)
    g1, g2 = torch.autograd.grad(y[:, 1:].sum(), (W1, W2))
    assert g1.abs().max() > 0 and g2.abs().max() > 0


def test_params0_per_sample_equals_shared():
    inp = make_inputs(2, 7, 2, 4, 4, 6, F64, seed=10)
    y_shared, _ = call(deep_memory_chunk, inp, chunk_size=3)
    per_sample = dict(inp, params0={n: w.expand(2, *w.shape) for n, w in inp["params0"].items()})
    y_batched, _ = call(deep_memory_chunk, per_sample, chunk_size=3)
    assert_close(y_batched, y_shared, 1e-14, "y")


# -- PAPER 9.15: a deep memory stores more than d pairs better than any d x d linear memory -------


def test_mlp_memory_stores_more_than_d_pairs_better_than_linear():
    d, N, Dh, epochs = 8, 32, 128, 200
    g = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(N, d, generator=g, dtype=F64), dim=-1)
    vals = torch.randn(N, d, generator=g, dtype=F64)
    k, v = (x.repeat(epochs, 1)[None, :, None, :] for x in (keys, vals))
    lr = torch.full((1, N * epochs, 1), 1e-3, dtype=F64)

    def recall_error(params0, lr):
        # chunk_size = N: each chunk is one full-batch inner GD step over all pairs.
        _, st = deep_memory(k, k, v, lr, params0=params0, chunk_size=N, residual=False)
        out = mlp_apply({n: w[0, 0] for n, w in st["params"].items()}, keys, "silu", False)
        return ((out - vals).square().sum() / vals.square().sum()).item()

    mlp = {
        "W1": torch.zeros(1, d, Dh, dtype=F64),
        "W2": torch.randn(1, Dh, d, generator=g, dtype=F64),
    }
    err_mlp = recall_error(mlp, lr)
    err_lin = recall_error({"W1": torch.zeros(1, d, d, dtype=F64)}, 50 * lr)
    best_linear = torch.linalg.lstsq(keys, vals).solution
    err_best = ((keys @ best_linear - vals).square().sum() / vals.square().sum()).item()
    assert err_lin == pytest.approx(err_best, abs=1e-3)  # GD reached the linear optimum ...
    assert err_mlp < 0.5 * err_best  # ... which the MLP memory beats by far (~0.13 vs ~0.76)


# -- dispatch and validation -----------------------------------------------------------------------


def test_dispatch_backends(monkeypatch):
    inp = make_inputs(1, 5, 1, 4, 4, 6, F64)
    monkeypatch.delenv("NLGRAPH_BACKEND", raising=False)
    assert _dispatch.available("deep_memory")[-2:] == ["chunk", "reference"]  # triton first
    assert _dispatch.resolve_backend("deep_memory") == "chunk"
    ys = [
        call(deep_memory, inp, chunk_size=2, backend=b)[0] for b in ("auto", "chunk", "reference")
    ]
    assert_close(ys[0], ys[2], 1e-12, "auto vs reference")
    assert torch.equal(ys[0], ys[1])
    with pytest.raises(BackendUnavailableError, match="unknown backend 'fused'"):
        _dispatch.resolve_backend("deep_memory", "fused")
    monkeypatch.setenv("NLGRAPH_BACKEND", "reference")
    assert _dispatch.resolve_backend("deep_memory", "chunk") == "reference"
    assert call(deep_memory, inp, output_final_state=False)[1] is None


def _bad(**change):
    inp = make_inputs(2, 5, 3, 4, 4, 6, F64)
    kw = {n: change.pop(n) for n in list(change) if n not in inp}
    inp.update(change)
    return inp, kw


BAD = [
    pytest.param(_bad(k=torch.zeros(2, 5, 3, 5, dtype=F64)), r"k has shape \[2, 5, 3, 5\]", id="k"),
    pytest.param(_bad(v=torch.zeros(2, 4, 3, 4, dtype=F64)), r"expected \[B, T, H, Dv\]", id="v"),
    pytest.param(_bad(lr=torch.zeros(2, 5, dtype=F64)), r"lr has shape \[2, 5\]", id="lr"),
    pytest.param(_bad(forget=torch.zeros(2, 5, 3)), r"forget is torch.float32", id="dtype"),
    pytest.param(_bad(params0={"W1": torch.zeros(3, 4, 6, dtype=F64)}), r"W1.*\[3, 4, 6\]", id="p"),
    pytest.param(_bad(params0={"W2": torch.zeros(3, 4, 4, dtype=F64)}), r"keys \['W2'\]", id="key"),
    pytest.param(_bad(v=torch.zeros(2, 5, 3, 6, dtype=F64)), r"residual=False", id="residual"),
    pytest.param(_bad(chunk_size=0), r"chunk_size must be an int >= 1", id="chunk"),
    pytest.param(_bad(read="before"), r"read='before'", id="read"),
    pytest.param(_bad(activation="tanh"), r"activation='tanh'", id="activation"),
    pytest.param(_bad(state={"params": {}}), r"final_state dict", id="state"),
]


@pytest.mark.parametrize("fn", [deep_memory_chunk, deep_memory_naive], ids=["chunk", "reference"])
@pytest.mark.parametrize(("bad", "message"), BAD)
def test_bad_inputs_raise_clear_errors(bad, message, fn):
    inp, kw = bad
    with pytest.raises(ValueError, match=message):
        call(fn, inp, **kw)
