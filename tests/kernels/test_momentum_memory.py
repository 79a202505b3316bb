"""The momentum memory's backends against its token loop: W_C, S_C and every gradient.

The Triton kernel runs under Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
on float32 inputs and is compared with the loop run in float64 on the same values; tolerances are
relative to the reference's largest magnitude per tensor: float32 1e-5 (sums of a few dozen fp32
products and a C x C solve; the observed error is ~1e-7), float64 1e-10 for the chunk form.
bfloat16 inputs are compared with the loop on the same bf16-rounded values, so the only
difference is one rounding of each result to bf16 (2^-9 relative); the bound is 2^-8.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from compiled_kernels import run_compiled

from nlgraph._errors import BackendUnavailableError
from nlgraph.kernels import _dispatch
from nlgraph.kernels.momentum_memory import (
    momentum_memory,
    momentum_memory_naive,
    momentum_memory_triton,
)

pytest.importorskip("triton", reason="the triton backend needs triton installed")

NAMES = ("x", "delta", "b", "a", "mu", "w0", "s0")
TOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2.0**-8}


def _close(got, want, tol, what):
    err = (got.double() - want.double()).abs().max().item()
    ref = max(want.abs().max().item(), 1e-30)
    assert err <= tol * ref, f"{what}: max error {err:.3e} vs max |ref| {ref:.3e}"


def _inputs(B, C, H, I, O, with_b, with_a, zeros=False, seed=0):
    """float64 inputs; zeros puts a gate of exactly 0 in each gate (a hard reset of the
    momentum, of the weights, and a token with no x x^T decay)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)
    x = F.normalize(torch.randn(B, C, H, I, generator=g, dtype=torch.float64), dim=-1)
    delta = torch.randn(B, C, H, O, generator=g, dtype=torch.float64)
    b = 0.9 * r(B, C, H) if with_b else None
    a = 0.5 + 0.5 * r(B, C, H) if with_a else None
    mu = r(B, C, H)
    if zeros:
        mu[:, C // 2] = 0.0
        if a is not None:
            a[:, C // 3] = 0.0
        if b is not None:
            b[:, C - 1] = 0.0
    w0 = torch.randn(B, H, O, I, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, O, I, generator=g, dtype=torch.float64)
    return dict(zip(NAMES, (x, delta, b, a, mu, w0, s0), strict=True))


def _run(fn, ins, dtype, cot, **kw):
    """``(W, S, {name: grad})`` of fn on ins cast to dtype, for the loss <W, cW> + <S, cS>."""
    leaves = {n: t.to(dtype).requires_grad_() for n, t in ins.items() if t is not None}
    args = [leaves.get(n) for n in NAMES]
    w, s = fn(*args, **kw)
    loss = (w.double() * cot[0]).sum() + (s.double() * cot[1]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return w, s, dict(zip(leaves, grads, strict=True))


def _cotangents(ins, seed=7):
    g = torch.Generator().manual_seed(seed)
    shape = ins["w0"].shape
    # bf16-representable, so a bf16 result's gradient is passed on unrounded
    return tuple(torch.randn(shape, generator=g).bfloat16().double() for _ in range(2))


# (B, C, H, I, O, with_b, with_a, zeros)
SHAPES = [
    pytest.param(1, 1, 2, 5, 3, True, True, False, id="C1-I5-O3"),
    pytest.param(2, 3, 1, 7, 4, True, False, True, id="C3-no-a-zero-gates"),
    pytest.param(1, 8, 3, 20, 9, False, True, True, id="C8-no-b-I20-O9"),
    pytest.param(2, 16, 2, 5, 12, True, True, True, id="C16-zero-gates"),
    pytest.param(1, 16, 1, 6, 6, False, False, False, id="C16-no-gates"),
    # I = 130 (block 256) caps the O block at 32: O = 70 spans three programs per head; keys
    # over 64 features take the recomputed VJP for backward
    pytest.param(1, 5, 1, 130, 70, True, True, False, id="C5-I130-O70-split"),
    # O = 40: three blocks of 16 rows in the backward kernel, their dx and gate parts summed
    pytest.param(2, 7, 2, 10, 40, True, True, True, id="C7-O40-backward-blocks"),
    # windows over 16 tokens: the backward is the recomputed VJP of the chunk form
    pytest.param(1, 20, 1, 6, 5, True, True, True, id="C20-pytorch-backward"),
]


@pytest.mark.parametrize("B,C,H,I,O,with_b,with_a,zeros", SHAPES)
@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("chunk", torch.float64)])
def test_backends_match_the_token_loop(backend, dtype, B, C, H, I, O, with_b, with_a, zeros):
    ins = _inputs(B, C, H, I, O, with_b, with_a, zeros)
    # the loop runs in float64 on the values the backend sees
    ins = {n: None if t is None else t.to(dtype).double() for n, t in ins.items()}
    cot = _cotangents(ins)
    w_ref, s_ref, g_ref = _run(momentum_memory_naive, ins, torch.float64, cot)
    w, s, grads = _run(momentum_memory, ins, dtype, cot, backend=backend)
    assert w.dtype == s.dtype == dtype and w.shape == s.shape == (B, H, O, I)
    assert set(grads) == set(g_ref)  # a None gate gets no gradient, every tensor gets one
    _close(w, w_ref, TOL[dtype], "W_C")
    _close(s, s_ref, TOL[dtype], "S_C")
    for n in g_ref:
        assert grads[n].dtype == dtype
        _close(grads[n], g_ref[n], TOL[dtype], f"d/d{n}")


def test_bf16_inputs_compute_in_float32():
    ins = _inputs(2, 8, 2, 12, 9, True, True, zeros=True, seed=4)
    ins = {n: t.bfloat16().double() for n, t in ins.items()}  # the rounded values
    cot = _cotangents(ins)
    want = _run(momentum_memory_naive, ins, torch.float64, cot)
    got = _run(momentum_memory_triton, ins, torch.bfloat16, cot)
    assert got[0].dtype == got[1].dtype == torch.bfloat16
    _close(got[0], want[0], TOL[torch.bfloat16], "W_C")
    _close(got[1], want[1], TOL[torch.bfloat16], "S_C")
    for n in want[2]:
        assert got[2][n].dtype == torch.bfloat16
        _close(got[2][n], want[2][n], TOL[torch.bfloat16], f"d/d{n}")


def test_an_unused_result_carries_no_gradient():
    """A loss on W_C alone (S_C's cotangent is None inside backward) matches the loop."""
    ins = {n: t.float() for n, t in _inputs(1, 6, 2, 5, 4, True, True, seed=2).items()}
    grads = []
    for fn in (momentum_memory_naive, momentum_memory_triton):
        xs = [ins[n].clone().requires_grad_() for n in NAMES]
        w, _ = fn(*xs)
        grads.append(torch.autograd.grad(w.square().sum(), xs))
    for n, got, want in zip(NAMES, grads[1], grads[0], strict=True):
        _close(got, want, TOL[torch.float32], f"d/d{n}")


def test_refusals_say_what_to_do():
    ins = _inputs(1, 4, 1, 3, 2, True, True)
    args = [ins[n] for n in NAMES]
    with pytest.raises(ValueError, match="float64.*backend='chunk'"):
        momentum_memory(*args, backend="triton")
    long = [t.float() for t in _inputs(1, 65, 1, 3, 2, True, True).values()]
    with pytest.raises(ValueError, match="at most 64 tokens.*C=65.*backend='chunk'"):
        momentum_memory(*long, backend="triton")
    bad = dict(ins, mu=ins["mu"][..., None])
    with pytest.raises(ValueError, match=r"mu has shape \[1, 4, 1, 1\]; expected \[B, C, H\]"):
        momentum_memory(*[bad[n] for n in NAMES], backend="chunk")
    mixed = dict(ins, w0=ins["w0"].float())
    with pytest.raises(ValueError, match="one floating dtype.*w0=torch.float32"):
        momentum_memory(*[mixed[n] for n in NAMES], backend="chunk")
    with pytest.raises(BackendUnavailableError, match="no 'fused'|unknown backend"):
        momentum_memory(*args, backend="fused")


@pytest.mark.parametrize("with_b,with_a", [(True, True), (True, False), (False, True),
                                           (False, False)])  # fmt: skip
def test_backward_kernel_equals_the_chunk_forms_vjp(with_b, with_a):
    """The backward kernel against the VJP of the closed form it replaces, on the same float32
    inputs (gates of exactly 0 included, O over three blocks of 16 rows)."""
    from nlgraph.kernels.momentum_memory import _triton_kernels as K
    from nlgraph.kernels.momentum_memory import triton as tr

    ins = {
        n: None if t is None else t.float()
        for n, t in _inputs(2, 11, 2, 9, 35, with_b, with_a, zeros=True, seed=4).items()
    }
    g = torch.Generator().manual_seed(5)
    cot = [torch.randn(ins["w0"].shape, generator=g) for _ in range(2)]  # fmt: skip
    args = [ins[n] for n in NAMES]
    assert K.backward_fits(11, 9)
    want = tr._window_vjp(*args, *cot)
    got = K.window_backward(*args, *cot)
    for name, x, w in zip(("dx", "ddelta", "db", "da", "dmu", "dw0", "ds0"), got, want,
                          strict=True):  # fmt: skip
        if w is None:
            assert x is None, name
            continue
        assert x.dtype == torch.float32 and torch.isfinite(x).all(), name
        _close(x, w, 1e-5, name)


def test_auto_never_sends_cpu_tensors_to_the_interpreter():
    assert _dispatch.resolve_backend("momentum_memory", "auto", torch.device("cpu")) == "chunk"


def test_torch_compile_traces_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward through
    the custom ops' fake implementations, then runs the real kernels."""
    torch._dynamo.reset()
    ins = {n: t.float() for n, t in _inputs(2, 5, 2, 6, 3, True, True, seed=3).items()}

    def f(x, delta, b, a, mu, w0, s0):
        w, s = momentum_memory(x, delta, b, a, mu, w0, s0, backend="triton")
        return (w * torch.cos(w)).sum() + (s * s0).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        xs = [ins[n].clone().requires_grad_() for n in NAMES]
        loss = fn(*xs)
        results.append((loss, *torch.autograd.grad(loss, xs)))
    for name, got, want in zip(("loss", *NAMES), *results[::-1], strict=True):
        _close(got, want, 1e-6, f"compiled {name}")


def test_custom_op_passes_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration agree with
    the real kernel (the aot_dispatch test re-traces the op and its backward through AOT
    autograd)."""
    from nlgraph.kernels.momentum_memory import triton as tr

    # b given and a None: both forms of an optional tensor in one (slow, ~10 s) check
    ins = _inputs(1, 4, 2, 5, 3, True, False, seed=6)
    args = [None if t is None else t.float().requires_grad_() for t in (ins[n] for n in NAMES)]
    torch.library.opcheck(tr.momentum_memory_op, tuple(args))
    # first-order only: the backward op has no gradient of its own
    plain = [None if t is None else t.detach() for t in args]
    cot = [torch.randn(plain[5].shape) for _ in range(2)]
    torch.library.opcheck(tr.momentum_memory_bwd, (*plain, *cot))


# --- GPU: the compiled (non-interpreted) kernel --------------------------------------------

_GPU_SCRIPT = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from nlgraph.kernels.momentum_memory import momentum_memory_naive, momentum_memory_triton
    torch.manual_seed(0)
    dev, f64 = "cuda", torch.float64
    worst = 0.0
    for B, C, H, I, O in ((4, 16, 6, 64, 64), (2, 64, 3, 40, 200), (3, 9, 2, 128, 96)):
        for gated in (True, False):
            x = F.normalize(torch.randn(B, C, H, I, device=dev, dtype=f64), dim=-1)
            d = torch.randn(B, C, H, O, device=dev, dtype=f64)
            b = 0.9 * torch.rand(B, C, H, device=dev, dtype=f64) if gated else None
            a = 0.9 + 0.1 * torch.rand(B, C, H, device=dev, dtype=f64) if gated else None
            mu = torch.rand(B, C, H, device=dev, dtype=f64)
            w0 = torch.randn(B, H, O, I, device=dev, dtype=f64)
            s0 = torch.randn(B, H, O, I, device=dev, dtype=f64)
            cw, cs = torch.randn_like(w0), torch.randn_like(s0)
            res = []
            for fn, dt in ((momentum_memory_naive, f64), (momentum_memory_triton, torch.float32)):
                xs = [None if t is None else t.to(dt).requires_grad_()
                      for t in (x, d, b, a, mu, w0, s0)]
                w, s = fn(*xs)
                live = [t for t in xs if t is not None]
                loss = (w.double() * cw).sum() + (s.double() * cs).sum()
                res.append((w, s, *torch.autograd.grad(loss, live)))
            for got, want in zip(res[1], res[0]):
                err = (got.double() - want).abs().max() / want.abs().max()
                worst = max(worst, err.item())
    print("WORST", worst)
    assert worst < 1e-4, worst
    """
)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compiled_kernel_matches_the_token_loop():
    """Runs in a fresh interpreter with TRITON_INTERPRET=0: this process's kernel was defined
    under the interpreter (tests/conftest.py). float32 kernel vs the float64 loop, C up to 64,
    O split across programs; the first shape's backward is the kernel, the others' the VJP."""
    run_compiled(_GPU_SCRIPT)


def test_auto_on_a_gpu_leaves_what_the_kernel_cannot_take_to_chunk(monkeypatch):
    """The dispatcher's eligibility rule, not the op: float64 and windows over 64 tokens."""
    monkeypatch.delenv("NLGRAPH_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "_auto_eligible", lambda backend, device: True)
    if "triton" not in _dispatch.available("momentum_memory"):
        pytest.skip("triton is not available here")
    cpu = torch.device("cpu")

    def pick(T, dtype):
        x = torch.zeros(1, T, 1, 2, dtype=dtype)
        args = (x, x, None, None, x[..., 0], torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
        return _dispatch.resolve_backend("momentum_memory", "auto", cpu, args)

    assert pick(64, torch.float32) == "triton"
    assert pick(65, torch.float32) == "chunk"
    assert pick(8, torch.float64) == "chunk"
