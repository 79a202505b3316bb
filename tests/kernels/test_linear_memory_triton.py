"""The Triton backend of linear_memory against the token loop: outputs, final state and every
gradient, under Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1).

Tolerances, relative to the reference's largest magnitude per tensor: float32 1e-5 (fp32 sums of
a few dozen terms; the observed error is ~2e-7). bfloat16 inputs are compared with the loop run in
float32 on the same bf16-rounded values, so the only difference is that each result is rounded to
bf16 once (half an ulp, 2^-9 relative); the bound is 2^-8.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from compiled_kernels import run_compiled

from nlgraph.kernels.linear_memory import (
    delta_rule,
    dgd,
    gated_delta_rule,
    linear_attention,
    linear_memory,
    linear_memory_naive,
    linear_memory_triton,
)

pytest.importorskip("triton", reason="the triton backend needs triton installed")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-8}


def _close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    ref = max(want.abs().max().item(), 1e-30)
    assert err <= tol * ref, f"{what}: max error {err:.3e} vs max |ref| {ref:.3e}"


# Each instance goes through its api helper; its trainable inputs are the helper's own
# (beta, eta, decay), so gradients flow through the gate construction too.
def _instance(name, B, T, H, g):
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(B, T, H, generator=g)
    if name == "linear_attention":
        return linear_attention, {}
    if name == "gated":
        return linear_attention, {"decay": u(0.5, 1.0)}
    if name == "deltanet":
        return delta_rule, {"beta": u(0.0, 1.0)}
    if name == "gated_deltanet":
        return gated_delta_rule, {"alpha": u(0.5, 1.0), "beta": u(0.0, 1.0)}
    if name == "dgd":
        return dgd, {"eta": u(0.1, 2.0), "weight_decay": u(0.0, 0.1)}
    raise AssertionError(name)


def _compare(name, B, T, H, Dk, Dv, C, read, with_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=g)
    k = torch.randn(B, T, H, Dk, generator=g)
    if name != "dgd":  # DGD's eta' = eta / (1 + eta ||k||^2) keeps raw keys contractive
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, Dv, generator=g)
    fn, gates = _instance(name, B, T, H, g)
    leaves = {"q": q, "k": k, "v": v, **gates}
    if with_state:
        leaves["initial_state"] = torch.randn(B, H, Dv, Dk, generator=g)
    go = torch.randn(B, T, H, Dv, generator=g)
    gs = torch.randn(B, H, Dv, Dk, generator=g)

    results = []
    for backend in ("reference", "triton"):
        xs = {n: x.clone().requires_grad_() for n, x in leaves.items()}
        args = {n: x for n, x in xs.items() if n not in ("q", "k", "v")}
        o, s = fn(
            xs["q"], xs["k"], xs["v"], **args, scale=0.5, read=read, chunk_size=C, backend=backend
        )
        grads = torch.autograd.grad((o * go).sum() + (s * gs).sum(), list(xs.values()))
        results.append((o, s, dict(zip(xs, grads, strict=True))))
    (o_ref, s_ref, g_ref), (o_tr, s_tr, g_tr) = results
    assert o_tr.shape == (B, T, H, Dv) and s_tr.shape == (B, H, Dv, Dk)
    assert o_tr.dtype == s_tr.dtype == torch.float32
    _close(o_tr, o_ref, TOL[torch.float32], "output")
    _close(s_tr, s_ref, TOL[torch.float32], "final state")
    for n in g_ref:
        _close(g_tr[n], g_ref[n], TOL[torch.float32], f"d/d{n}")


INSTANCES = ["linear_attention", "gated", "deltanet", "gated_deltanet", "dgd"]


@pytest.mark.parametrize(
    "read,with_state",
    [("after", True), ("before", True), ("after", False)],
    ids=["after-M0", "before-M0", "after-M0=0"],
)
@pytest.mark.parametrize("name", INSTANCES)
def test_instances_match_the_token_loop(name, read, with_state):
    """Every instance, both read modes, with and without M_0 (the read mode does not touch the
    M_0 path): B=2, H=2, T=9 in chunks of 4 (ragged), Dk=5 != Dv=3 (odd, padded to 16)."""
    _compare(name, 2, 9, 2, 5, 3, 4, read, with_state)


# (B, T, H, Dk, Dv, C, read, instance)
SHAPES = [
    pytest.param(1, 1, 1, 4, 4, 64, "after", "gated_deltanet", id="T1"),
    pytest.param(1, 1, 2, 3, 5, 1, "before", "deltanet", id="T1-before"),
    pytest.param(2, 16, 1, 8, 12, 8, "after", "gated", id="T16-C8-multiple"),
    pytest.param(1, 7, 3, 6, 9, 16, "before", "dgd", id="C-gt-T"),
    pytest.param(1, 11, 1, 7, 2, 1, "after", "gated_deltanet", id="C1-token-steps"),
    # Dk = Dv = 70: two Dv blocks in the scans and two Dk blocks in the per-chunk gradients
    pytest.param(1, 6, 1, 70, 70, 4, "after", "gated_deltanet", id="D70-split-blocks"),
    # past backward_fits (tiles 64 x 32 once padded): the summaries' backward is the PyTorch VJP
    pytest.param(1, 70, 1, 20, 5, 40, "before", "gated_deltanet", id="C40-pytorch-backward"),
]


@pytest.mark.parametrize("B,T,H,Dk,Dv,C,read,name", SHAPES)
def test_awkward_shapes_match_the_token_loop(B, T, H, Dk, Dv, C, read, name):
    _compare(name, B, T, H, Dk, Dv, C, read, with_state=True, seed=1)


def _gdn_inputs(B=1, T=10, H=2, Dk=6, Dv=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=g)
    k = F.normalize(torch.randn(B, T, H, Dk, generator=g), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=g)
    alpha = 0.5 + 0.5 * torch.rand(B, T, H, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    M0 = torch.randn(B, H, Dv, Dk, generator=g)
    return q, k, v, alpha, alpha * beta, beta, M0


def _grads(fn, inputs, loss, **kw):
    xs = [x.clone().requires_grad_() for x in inputs]
    q, k, v, a, b, c, M0 = xs
    o, s = fn(q, k, v, a, b, c, initial_state=M0, **kw)
    # q never reaches the final state: the loop leaves its gradient None, the scan gives zeros
    grads = torch.autograd.grad(loss(o, s), xs, allow_unused=True)
    return [torch.zeros_like(x) if d is None else d for x, d in zip(xs, grads, strict=True)]


@pytest.mark.parametrize(
    "what", ["output-only", "state-only"], ids=["no-final-state", "final-state-only"]
)
def test_unused_results_carry_no_gradient(what):
    """output_final_state=False (no state cotangent), and a loss on the final state alone (no
    output cotangent): the gradients still match the loop."""
    inputs = _gdn_inputs()
    kw = dict(read="before", output_final_state=what != "output-only")
    if what == "output-only":
        loss = lambda o, s: o.square().sum()
    else:
        loss = lambda o, s: s.square().sum()
    want = _grads(linear_memory_naive, inputs, loss, **kw)
    got = _grads(linear_memory_triton, inputs, loss, chunk_size=4, **kw)
    for name, a, b in zip(("q", "k", "v", "alpha", "b", "c", "M0"), got, want, strict=True):
        _close(a, b, TOL[torch.float32], f"d/d{name}")
    if what == "output-only":
        assert linear_memory_triton(*inputs[:6], output_final_state=False)[1] is None


def test_bf16_inputs_compute_in_float32():
    q, k, v, a, b, c, M0 = _gdn_inputs(B=2, T=13, Dk=8, Dv=8)
    lo = [x.bfloat16() for x in (q, k, v, M0)]  # gates stay float32, as a model passes them
    g = torch.Generator().manual_seed(5)
    # cotangents exactly representable in bf16, so the bf16 output's gradient is not rounded
    go = torch.randn(2, 13, 2, 8, generator=g).bfloat16().float()
    gs = torch.randn(2, 2, 8, 8, generator=g).bfloat16().float()
    loss = lambda o, s: (o.float() * go).sum() + (s.float() * gs).sum()

    def run(fn, qkvm, **kw):
        xs = [x.clone().requires_grad_() for x in (*qkvm[:3], a, b, c, qkvm[3])]
        o, s = fn(*xs[:6], initial_state=xs[6], **kw)
        return (o, s, *torch.autograd.grad(loss(o, s), xs))

    got = run(linear_memory_triton, lo, chunk_size=4)
    want = run(linear_memory_naive, [x.float() for x in lo])
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.bfloat16
    names = ("o", "state", "dq", "dk", "dv", "dalpha", "db", "dc", "dM0")
    for name, x, y in zip(names, got, want, strict=True):
        _close(x.float(), y, TOL[torch.bfloat16], name)


def test_hard_resets_and_tiny_decays_stay_exact():
    """alpha = 0 and alpha = 1e-30 inside chunks (gC = 0 in the scan): finite, and equal to the
    loop in outputs, state and the gradients of q, alpha and M_0."""
    q, k, v, _, _, beta, M0 = _gdn_inputs(T=24, Dk=8, Dv=8, seed=3)
    alpha = 0.2 * torch.rand(1, 24, 2, generator=torch.Generator().manual_seed(4))
    alpha[:, 5] = 0.0
    alpha[:, 13:16] = 1e-30
    results = []
    for fn, kw in ((linear_memory_naive, {}), (linear_memory_triton, {"chunk_size": 8})):
        xs = [x.clone().requires_grad_() for x in (q, alpha, M0)]
        o, s = fn(xs[0], k, v, xs[1], xs[1] * beta, beta, initial_state=xs[2], **kw)
        results.append((o, s, *torch.autograd.grad(o.square().sum() + s.sum(), xs)))
    for name, got, want in zip(("o", "state", "dq", "dalpha", "dM0"), *results[::-1], strict=True):
        assert torch.isfinite(got).all(), name
        _close(got, want, TOL[torch.float32], name)


# --- the chunk-summaries kernel against its batched PyTorch form ----------------------------

# gates present as (alpha, b, c): every combination the instances make, plus c alone
GATES = [(1, 1, 1), (1, 0, 0), (0, 1, 1), (0, 0, 0), (1, 1, 0), (0, 0, 1)]


def _check_summaries(q, k, v, gates, read, C, scale=0.5, tol=1e-5, seed=0):
    """The summaries kernel's six results equal :func:`_summaries`, and the backward kernel's
    gradients (q, k, v and the present gates) equal its VJP for random cotangents."""
    from nlgraph.kernels.linear_memory import _triton_summaries as K
    from nlgraph.kernels.linear_memory import triton as tr

    want = tr._summaries(q, k, v, *gates, scale, read, C)
    got = K.summaries_forward(q, k, v, *gates, scale, read, C)
    for name, x, w in zip(("Qg", "A", "U", "Wk", "Kc", "gC"), got, want, strict=True):
        if w is None:  # Wk without b, gC without alpha
            assert x.numel() == 0, name
            continue
        assert x.dtype == torch.float32 and x.shape == w.shape, name
        assert torch.isfinite(x).all(), name
        _close(x, w, tol, name)

    live = [i for i, w in enumerate(want) if w is not None]
    prim = [x for x in (q, k, v, *gates) if x is not None]

    def fn(*xs):
        it = iter(xs[3:])
        opt = [None if x is None else next(it) for x in gates]
        outs = tr._summaries(*xs[:3], *opt, scale, read, C)
        return tuple(outs[i] for i in live)

    g = torch.Generator().manual_seed(seed)
    cot = [torch.randn(want[i].shape, generator=g) for i in live]
    ref = torch.func.vjp(fn, *(x.float() for x in prim))[1](tuple(cot))
    full = [torch.zeros(0)] * 6
    for i, c in zip(live, cot, strict=True):
        full[i] = c
    grads = K.summaries_backward(q, k, v, *gates, scale, read, C, full)
    names = ["dq", "dk", "dv"] + [f"d{n}" for n, x in zip(("alpha", "b", "c"), gates, strict=True)
                                  if x is not None]  # fmt: skip
    grads = [x for x in grads if x is not None]
    for name, x, w in zip(names, grads, ref, strict=True):
        assert x.dtype == torch.float32 and x.shape == w.shape, name
        assert torch.isfinite(x).all(), name
        _close(x, w, tol, name)


@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("gates", GATES, ids=lambda g: "".join("abc"[i] for i in range(3) if g[i]))
@pytest.mark.parametrize(
    "B,T,H,Dk,Dv,C",
    [(2, 7, 3, 5, 6, 4), (1, 37, 2, 16, 24, 16), (1, 19, 1, 8, 4, 5), (1, 40, 2, 32, 20, 32)],
    ids=["ragged-odd", "C16-D16x24", "C5-not-pow2", "C32"],
)
def test_summaries_kernels_equal_their_pytorch_form(B, T, H, Dk, Dv, C, gates, read):
    """Decay products, the UT solve, the masked attention and the decayed queries and keys of
    every chunk (ragged last chunk, C and widths not powers of two) equal :func:`_summaries`,
    and so do their gradients."""
    g = torch.Generator().manual_seed(T + C)
    q = torch.randn(B, T, H, Dk, generator=g)
    k = F.normalize(torch.randn(B, T, H, Dk, generator=g), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=g)
    u = lambda lo: lo + (1 - lo) * torch.rand(B, T, H, generator=g)
    present = [u(0.5), u(0.0), u(0.0)]
    chosen = [x if on else None for x, on in zip(present, gates, strict=True)]
    _check_summaries(q, k, v, chosen, read, C)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_summaries_kernels_read_strided_views(dtype):
    """q, k, v as views of one fused projection and gates as transposed views, in each input
    dtype: the kernels read them in place (no copies) and compute in fp32."""
    g = torch.Generator().manual_seed(7)
    B, T, H, Dk, Dv = 2, 21, 3, 16, 8
    qkv = torch.randn(B, T, H, 2 * Dk + Dv, generator=g).to(dtype)
    q, k, v = qkv.split([Dk, Dk, Dv], dim=-1)
    k = k / 4
    assert not q.is_contiguous()
    packed = torch.rand(B, H, T, 3, generator=g).to(dtype)
    gates = [packed[..., i].transpose(1, 2) for i in range(3)]
    _check_summaries(q, k, v, gates, "after", 8)


def test_summaries_kernels_keep_hard_resets_exact():
    """alpha = 0 and 1e-30 in the chunk: products, never ratios (the gradient of a product
    leaves the factor out instead of dividing by it), so the summaries and their gradients stay
    finite and equal the PyTorch form."""
    q, k, v, alpha, _, beta, _ = _gdn_inputs(T=24, Dk=8, Dv=8, seed=3)
    alpha = alpha.clone()
    alpha[:, 5] = 0.0
    alpha[:, 13:16] = 1e-30
    for read in ("after", "before"):
        _check_summaries(q, k, v, (alpha, alpha * beta, beta), read, 8)


def test_float64_is_refused_with_a_way_out():
    q, k, v, *_ = _gdn_inputs()
    with pytest.raises(ValueError, match="float64.*backend='chunk'"):
        linear_memory(q.double(), k.double(), v.double(), backend="triton")


def test_torch_compile_traces_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward through
    the custom ops' fake implementations, then runs the real kernels."""
    torch._dynamo.reset()
    inputs = _gdn_inputs(T=7)

    def f(q, k, v, alpha, beta, M0):
        o, s = gated_delta_rule(
            q, k, v, alpha, beta, initial_state=M0, chunk_size=4, backend="triton"
        )
        return o.square().sum() + (s * M0).sum()

    q, k, v, alpha, _, beta, M0 = inputs
    leaves = (q, k, v, alpha, beta, M0)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        xs = [x.clone().requires_grad_() for x in leaves]
        loss = fn(*xs)
        results.append((loss, *torch.autograd.grad(loss, xs)))
    names = ("loss", "q", "k", "v", "alpha", "beta", "M0")
    for name, got, want in zip(names, *results[::-1], strict=True):
        _close(got, want, 1e-6, f"compiled {name}")


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration agree with
    the real kernels (the aot_dispatch test re-traces the op through AOT autograd)."""
    from nlgraph.kernels.linear_memory import triton as tr

    q, k, v, a, b, c, M0 = _gdn_inputs(T=6)
    summaries = tr._summaries(q, k, v, a, b, c, 0.5, "after", 4)
    args = [x.detach().contiguous().requires_grad_() for x in summaries]
    s0 = M0.reshape(2, 4, 6).clone().requires_grad_()  # [B*H, Dv, Dk]
    torch.library.opcheck(tr.linear_memory_scan, (*args, s0))
    xs = [x.detach().clone().requires_grad_() for x in (q, k, v, a, b, c)]
    for gates in (xs[3:], (None, xs[4], None), (xs[3], None, xs[5])):
        torch.library.opcheck(tr.linear_memory_summaries, (*xs[:3], *gates, 0.5, "before", 4))
        shapes = tr._summaries_shapes(k, v, gates[0] is not None, gates[1] is not None, 4)
        cot = [torch.randn(shape) for shape in shapes]
        # first-order only, like the scan's backward: no gradient of a gradient
        plain = [None if x is None else x.detach() for x in (*xs[:3], *gates)]
        torch.library.opcheck(tr.linear_memory_summaries_bwd, (*plain, 0.5, "after", 4, cot))


# --- GPU: the compiled (non-interpreted) kernels -------------------------------------------

_GPU_SCRIPT = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from nlgraph.kernels.linear_memory import linear_memory_naive, linear_memory_triton
    from nlgraph.kernels.linear_memory import _triton_summaries as K
    torch.manual_seed(0)
    dev = "cuda"
    worst = 0.0
    # ragged T, Dv not a power of two; C=64 d=64 (3xTF32 summaries, PyTorch backward of them),
    # C=32 d=32 and C=16 d=64 (IEEE summaries, backward kernels)
    for T, Dk, Dv, C in ((300, 64, 40, 64), (150, 32, 24, 32), (100, 64, 40, 16)):
        assert K.backward_fits(C, Dk, Dv) == (C < 64)
        B, H = 2, 3
        q = torch.randn(B, T, H, Dk, device=dev, dtype=torch.float64)
        k = F.normalize(torch.randn(B, T, H, Dk, device=dev, dtype=torch.float64), dim=-1)
        v = torch.randn(B, T, H, Dv, device=dev, dtype=torch.float64)
        alpha = 0.9 + 0.1 * torch.rand(B, T, H, device=dev, dtype=torch.float64)
        beta = torch.rand(B, T, H, device=dev, dtype=torch.float64)
        M0 = torch.randn(B, H, Dv, Dk, device=dev, dtype=torch.float64)
        go = torch.randn(B, T, H, Dv, device=dev, dtype=torch.float64)
        for read in ("after", "before"):
            for gates in ((None, None, None), (alpha, alpha * beta, beta)):
                res = []
                pairs = ((linear_memory_naive, torch.float64, {}),
                         (linear_memory_triton, torch.float32, {"chunk_size": C}))
                for fn, dt, kw in pairs:
                    xs = [x.detach().to(dt).requires_grad_() for x in (q, k, v, M0, alpha, beta)]
                    g = (None, None, None) if gates[0] is None else (xs[4], xs[4] * xs[5], xs[5])
                    o, s = fn(*xs[:3], *g, initial_state=xs[3], scale=Dk ** -0.5, read=read, **kw)
                    loss = (o * go.to(dt)).sum() + s.square().sum()
                    grads = torch.autograd.grad(loss, xs, allow_unused=True)
                    res.append((o, s, *(d for d in grads if d is not None)))
                for got, want in zip(res[1], res[0], strict=True):
                    err = (got.double() - want).abs().max() / want.abs().max()
                    worst = max(worst, err.item())
    print("WORST", worst)
    assert worst < 1e-4, worst
    """
)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compiled_kernels_match_the_token_loop():
    """Runs in a fresh interpreter with TRITON_INTERPRET=0: this process's kernels were defined
    under the interpreter (tests/conftest.py). float32 kernels vs the float64 loop, every
    gradient (gates included), three chunk / head-width configurations."""
    run_compiled(_GPU_SCRIPT)
