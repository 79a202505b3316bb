"""The deep memory's Triton backend against the token loop and the chunk form.

The kernel runs under Triton's CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on
float32 inputs. Forward outputs and the final state are compared with the token loop run in
float64 on the same values and with the float32 chunk form; gradients (the backward recomputes
the chunk form) with the float32 chunk form. Tolerances are relative to the reference's largest
magnitude per tensor: 1e-4 in float32. bfloat16 inputs are compared with the float32 chunk form
on the same bf16-rounded values: the kernel computes in fp32 too, so the difference is one
rounding of each result to bf16 (2^-9 relative) plus fp32 noise; the bound is 2^-8.

Shapes are tiny (the interpreter runs each tl op as a numpy call): the whole file takes ~30 s.
"""

from __future__ import annotations

import logging
import textwrap

import pytest
import torch
import torch.nn.functional as F
from compiled_kernels import run_compiled

from nlgraph.kernels import _dispatch
from nlgraph.kernels.deep_memory import (
    deep_memory,
    deep_memory_chunk,
    deep_memory_naive,
    deep_memory_triton,
)

pytest.importorskip("triton", reason="the triton backend needs triton installed")

from nlgraph.kernels.deep_memory import triton as tr  # noqa: E402

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
GATES = ("lr", "momentum", "forget")
PARTS = ("params", "momentum", "chunk_start")


def make_inputs(B, T, H, Dk, Dv, Dh, *, depth=2, momentum=True, forget=True, zeros=False,
                seed=0, dtype=F32):  # fmt: skip
    """Unit-norm q/k, small lr (as Titans). ``zeros`` sets gates of exactly 0 (and a forget of
    exactly 1): no step, a momentum reset, no forgetting, a full reset of the weights."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=F64) * scale
    uni = lambda lo, hi: lo + (hi - lo) * torch.rand(B, T, H, generator=g, dtype=F64)
    widths = [Dv] + [Dh] * (depth - 1) + [Dk]
    params0 = {f"W{i}": rnd(H, widths[i - 1], widths[i], scale=widths[i] ** -0.5)
               for i in range(1, depth + 1)}  # fmt: skip
    inp = {
        "q": F.normalize(rnd(B, T, H, Dk), dim=-1),
        "k": F.normalize(rnd(B, T, H, Dk), dim=-1),
        "v": rnd(B, T, H, Dv),
        "lr": uni(0.05, 0.4),
        "momentum": uni(0.3, 0.9) if momentum else None,
        "forget": uni(0.0, 0.2) if forget else None,
    }
    if zeros:
        inp["lr"][:, T // 2] = 0.0
        if momentum:
            inp["momentum"][:, T // 3] = 0.0
        if forget:
            inp["forget"][:, T - 1] = 0.0
            inp["forget"][:, T // 4, 0] = 1.0
    inp = {n: None if x is None else x.to(dtype) for n, x in inp.items()}
    inp["params0"] = {n: w.to(dtype) for n, w in params0.items()}
    return inp


def cast(inp, dtype):
    out = {n: None if x is None else x.to(dtype) for n, x in inp.items() if n != "params0"}
    out["params0"] = {n: w.to(dtype) for n, w in inp["params0"].items()}
    return out


def call(fn, inp, **kw):
    return fn(**{n: inp[n] for n in ("q", "k", "v", *GATES)}, params0=inp["params0"], **kw)


def flat_state(state):
    return {f"{p}.{n}": w for p in PARTS for n, w in state[p].items()}


def leaves(inp):
    out = {n: inp[n] for n in ("q", "k", "v", *GATES) if inp[n] is not None}
    out.update({f"params0.{n}": w for n, w in inp["params0"].items()})
    return out


def with_grad(inp):
    out = {n: None if x is None else x.clone().requires_grad_() for n, x in inp.items()
           if n != "params0"}  # fmt: skip
    out["params0"] = {n: w.clone().requires_grad_() for n, w in inp["params0"].items()}
    return out


def run_with_grads(fn, inp, seed=1, **kw):
    """Outputs, final state and gradients of every input for a fixed random cotangent on y and
    on every tensor of the final state."""
    inp = with_grad(inp)
    y, state = call(fn, inp, **kw)
    outs = {"y": y, **flat_state(state)}
    g = torch.Generator().manual_seed(seed)
    # bf16-representable cotangents, so that half-precision runs see the same ones
    cot = {n: torch.randn(o.shape, generator=g).to(BF16).to(o.dtype) for n, o in outs.items()}
    loss = sum((o * cot[n]).sum() for n, o in sorted(outs.items()))
    names, xs = zip(*leaves(inp).items(), strict=True)
    grads = torch.autograd.grad(loss, xs)
    return outs, dict(zip(("grad." + n for n in names), grads, strict=True))


def close(got, want, tol, what):
    got, want = got.double(), want.double()
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def all_close(got: dict, want: dict, tol, what=""):
    assert got.keys() == want.keys()
    for n in want:
        close(got[n], want[n], tol, f"{what}{n}")


def forward(fn, inp, **kw):
    y, state = call(fn, inp, **kw)
    return {"y": y, **flat_state(state)}, state["phase"]


# -- forward: outputs and final state --------------------------------------------------------------

# (B, T, H, Dk, Dv, Dh, C, depth, activation, objective, read, momentum, forget, zeros)
CASES = [
    pytest.param((1, 1, 1, 4, 4, 6, 4, 2, "silu", "l2", "after", True, True, False), id="T1"),
    pytest.param(
        (2, 13, 2, 5, 5, 7, 4, 2, "silu", "l2", "after", True, True, True), id="T13-C4-odd-zeros"
    ),
    pytest.param(
        (2, 9, 2, 5, 5, 7, 4, 2, "gelu", "l2", "chunk_start", True, False, False),
        id="gelu-chunkstart-mom",
    ),
    pytest.param(
        (1, 7, 2, 7, 7, 5, 3, 2, "relu", "dot", "after", False, True, True),
        id="relu-dot-forget-zeros",
    ),
    pytest.param(
        (2, 6, 1, 5, 3, 7, 4, 2, "identity", "l2", "after", False, False, False),
        id="identity-Dk5-Dv3-nogates",
    ),
    pytest.param(
        (2, 10, 2, 5, 5, 5, 4, 1, "silu", "l2", "after", True, True, True), id="depth1-zeros"
    ),
    pytest.param(
        (1, 9, 2, 7, 5, 5, 3, 1, "silu", "dot", "chunk_start", True, True, False),
        id="depth1-dot-chunkstart-Dk7-Dv5",
    ),
    pytest.param(
        (2, 5, 1, 4, 4, 6, 1, 2, "silu", "dot", "chunk_start", True, True, False), id="C1-dot"
    ),
    pytest.param((1, 6, 2, 4, 4, 6, 16, 2, "gelu", "l2", "after", True, True, False), id="C-gt-T"),
]


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_token_loop_and_chunk_form(case):
    B, T, H, Dk, Dv, Dh, C, depth, act, obj, read, mom, fg, zeros = case
    inp = make_inputs(B, T, H, Dk, Dv, Dh, depth=depth, momentum=mom, forget=fg, zeros=zeros)
    kw = dict(chunk_size=C, read=read, objective=obj, activation=act, residual=Dk == Dv)
    got, phase = forward(deep_memory_triton, inp, **kw)
    loop, loop_phase = forward(deep_memory_naive, cast(inp, F64), **kw)
    chunk, _ = forward(deep_memory_chunk, inp, **kw)
    assert phase == loop_phase == T % C
    assert all(x.dtype == F32 for x in got.values())
    all_close(got, loop, 1e-4, "vs loop: ")
    all_close(got, chunk, 1e-4, "vs chunk: ")


def test_gates_of_zero_are_exact():
    """lr = 0 takes no step: the weights only decay, the momentum stays exactly 0; forget = 1
    then resets the weights to exactly 0."""
    inp = make_inputs(1, 8, 2, 5, 5, 7, momentum=True, forget=True)
    inp["lr"] = torch.zeros_like(inp["lr"])
    _, st = call(deep_memory_triton, inp, chunk_size=3)
    decay = torch.prod(1 - inp["forget"][0], dim=0).view(-1, 1, 1)  # [H, 1, 1]
    for n, w in inp["params0"].items():
        close(st["params"][n][0], decay * w, 1e-6, n)
        assert torch.equal(st["momentum"][n], torch.zeros_like(st["momentum"][n]))
    inp["forget"] = torch.ones_like(inp["forget"])
    _, st = call(deep_memory_triton, inp, chunk_size=3)
    assert all(torch.equal(w, torch.zeros_like(w)) for w in st["params"].values())


# -- gradients -------------------------------------------------------------------------------------

GRAD_CASES = [
    pytest.param((2, 7, 2, 5, 5, 7, 3, 2, "silu", "l2", "after", True, True), id="d2-after"),
    pytest.param(
        (1, 6, 2, 5, 5, 7, 4, 2, "gelu", "dot", "chunk_start", False, True),
        id="d2-gelu-dot-chunkstart",
    ),
    pytest.param((2, 5, 1, 7, 5, 5, 2, 1, "silu", "l2", "after", True, False), id="d1-Dk7-Dv5"),
]


@pytest.mark.parametrize("case", GRAD_CASES)
def test_gradients_of_every_input_match_chunk_form(case):
    B, T, H, Dk, Dv, Dh, C, depth, act, obj, read, mom, fg = case
    inp = make_inputs(B, T, H, Dk, Dv, Dh, depth=depth, momentum=mom, forget=fg, zeros=True)
    kw = dict(chunk_size=C, read=read, objective=obj, activation=act, residual=Dk == Dv)
    outs, grads = run_with_grads(deep_memory_triton, inp, **kw)
    outs_c, grads_c = run_with_grads(deep_memory_chunk, inp, **kw)
    all_close(outs, outs_c, 1e-4)
    assert len(grads) == 4 + mom + fg + depth
    all_close(grads, grads_c, 1e-4)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_an_unused_result_carries_no_gradient():
    """A loss on y alone (the state's cotangents are None inside backward)."""
    inp = make_inputs(1, 5, 2, 4, 4, 6, seed=3)
    grads = []
    for fn in (deep_memory_triton, deep_memory_chunk):
        x = with_grad(inp)
        y, _ = call(fn, x, chunk_size=2)
        grads.append(torch.autograd.grad(y.square().sum(), list(leaves(x).values())))
    for got, want in zip(*grads, strict=True):
        close(got, want, 1e-4, "grad")


# -- carried state ---------------------------------------------------------------------------------


@pytest.mark.parametrize("read", ["after", "chunk_start"])
def test_segments_with_carried_state_equal_one_pass(read):
    """Splits inside a chunk (the next segment continues the chunk at its carried start),
    forward and the gradients reaching params0 and the gates through the carried state."""
    inp = make_inputs(2, 10, 2, 5, 5, 7, seed=4)
    kw = dict(chunk_size=4, read=read)
    one, grads_one = run_with_grads(deep_memory_chunk, inp, **kw)

    def segmented(**x):
        state, ys = None, []
        for a, b in ((0, 2), (2, 3), (3, 9), (9, 10)):
            part = {n: None if x[n] is None else x[n][:, a:b] for n in ("q", "k", "v", *GATES)}
            y, state = deep_memory_triton(**part, params0=x["params0"], state=state, **kw)
            ys.append(y)
        return torch.cat(ys, dim=1), state

    segs, grads_segs = run_with_grads(segmented, inp)
    all_close(segs, one, 1e-4)
    all_close(grads_segs, grads_one, 1e-4)


# -- other dtypes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
def test_half_inputs_match_float32_on_the_rounded_values(dtype):
    inp = make_inputs(2, 6, 2, 5, 5, 7, dtype=dtype, seed=5)
    kw = dict(chunk_size=4)
    outs, grads = run_with_grads(deep_memory_triton, inp, **kw)
    outs_f, grads_f = run_with_grads(deep_memory_chunk, cast(inp, F32), **kw)
    assert all(x.dtype == dtype for x in (*outs.values(), *grads.values()))
    all_close(outs, outs_f, 2.0**-8)
    # The cotangents are the same bf16 values; each gradient is rounded once to bf16.
    all_close(grads, grads_f, 2.0**-8)


def test_float64_is_refused_and_auto_routes_it_to_chunk(monkeypatch):
    inp = make_inputs(1, 3, 1, 4, 4, 6, dtype=F64)
    with pytest.raises(ValueError, match="float64.*backend='chunk'"):
        call(deep_memory, inp, backend="triton")
    # auto on a GPU picks triton; pretend this CPU is one: float64 still goes to chunk.
    monkeypatch.delenv("NLGRAPH_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "_auto_eligible", lambda backend, device: True)
    calls = []
    monkeypatch.setattr(tr, "deep_memory_op", lambda *a: calls.append(1) or 1 / 0)
    y, _ = call(deep_memory, inp, backend="auto", chunk_size=2)
    assert torch.equal(y, call(deep_memory_chunk, inp, chunk_size=2)[0]) and not calls
    with pytest.raises(ZeroDivisionError):  # float32 takes the kernel
        call(deep_memory, cast(inp, F32), backend="auto", chunk_size=2)


# -- shapes beyond the kernel ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "depth", "C", "why"),
    [
        ((17, 17, 33), 2, 4, "pad to 4096 fp32 values"),
        ((33, 33, None), 1, 4, "pad to 4096 fp32 values"),
        ((4, 4, 6), 3, 4, "depth 3"),
        ((4, 4, 6), 2, 17, "chunk_size=17 is over 16"),
    ],
    ids=["wide-depth2", "wide-depth1", "depth3", "chunk17"],
)
def test_unsupported_shapes_run_the_chunk_form_and_say_so_once(shape, depth, C, why, caplog,
                                                               monkeypatch):  # fmt: skip
    Dk, Dv, Dh = shape
    inp = make_inputs(1, 3, 1, Dk, Dv, Dh or 4, depth=depth, seed=7)
    monkeypatch.setattr(tr, "_DELEGATED", set())
    monkeypatch.setattr(tr, "deep_memory_op", lambda *a: 1 / 0)  # the kernel must not run
    with caplog.at_level(logging.WARNING, logger="nlgraph.kernels"):
        for _ in range(2):
            y, st = call(deep_memory_triton, inp, chunk_size=C)
    msgs = [r.getMessage() for r in caplog.records if "chunk form instead" in r.getMessage()]
    assert len(msgs) == 1 and why in msgs[0], msgs
    y_c, st_c = call(deep_memory_chunk, inp, chunk_size=C)
    assert torch.equal(y, y_c)
    assert all(
        torch.equal(a, b)
        for a, b in zip(flat_state(st).values(), flat_state(st_c).values(), strict=True)
    )


def test_the_largest_supported_state_runs_the_kernel():
    """Depth 2 at widths 32 (2 x 32 x 32 = 2048) with C = 16 is exactly the bound."""
    inp = make_inputs(1, 17, 1, 32, 32, 31, seed=8)
    dims = type("Dims", (), {"names": ["W1", "W2"]})
    assert tr.fits(dims, inp["params0"], 16) is None
    got, _ = forward(deep_memory_triton, inp, chunk_size=16)
    want, _ = forward(deep_memory_chunk, inp, chunk_size=16)
    all_close(got, want, 1e-4)


# -- registration, torch.compile, opcheck ----------------------------------------------------------


def test_registered_for_the_learners_triton_backend(monkeypatch):
    monkeypatch.delenv("NLGRAPH_BACKEND", raising=False)
    assert "triton" in _dispatch.available("deep_memory")
    assert _dispatch.for_op("deep_memory", "triton") == "triton"
    assert _dispatch.resolve_backend("deep_memory", "auto", torch.device("cpu")) == "chunk"


def test_torch_compile_traces_forward_and_backward_without_graph_breaks():
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward through
    the custom op's fake implementation and the recomputed VJP, then runs the real kernel."""
    torch._dynamo.reset()
    inp = make_inputs(1, 3, 2, 4, 4, 6, seed=9)

    def f(q, k, v, lr, momentum, forget, w1, w2):
        y, st = deep_memory(q, k, v, lr, momentum, forget, params0={"W1": w1, "W2": w2},
                            chunk_size=2, backend="triton")  # fmt: skip
        return (y * torch.cos(y)).sum() + st["momentum"]["W2"].square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (f, compiled):
        x = with_grad(inp)
        xs = [x[n] for n in ("q", "k", "v", *GATES)] + list(x["params0"].values())
        loss = fn(*xs)
        results.append((loss, *torch.autograd.grad(loss, xs)))
    for got, want in zip(*results[::-1], strict=True):
        close(got, want, 1e-6, "compiled vs eager")


def _opcheck_args():
    """The op's own arguments: a carried state stopped 1 token into a chunk of 3, no forget."""
    inp = make_inputs(1, 1, 1, 3, 3, 4, forget=False, seed=10)
    p = [w.expand(1, *w.shape).clone().requires_grad_() for w in inp["params0"].values()]
    m = [torch.randn_like(w).mul(0.1).requires_grad_() for w in p]
    s = [w.detach().add(0.1).requires_grad_() for w in p]
    gates = [inp[n].requires_grad_() for n in ("q", "k", "v", "lr", "momentum")]
    return (*gates, None, p, m, s, 1, 3, "after", "l2", "silu", True)


def test_custom_op_passes_opcheck_schema_fake_and_autograd():
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(tr.deep_memory_op, _opcheck_args(), test_utils=utils)


@pytest.mark.slow
def test_custom_op_passes_full_opcheck():
    """All of opcheck, with the aot_dispatch_dynamic check that re-traces the op and its
    backward (the chunk form's VJP) with symbolic shapes (~17 s)."""
    torch.library.opcheck(tr.deep_memory_op, _opcheck_args())


# -- GPU: the compiled (non-interpreted) kernel ----------------------------------------------------

_GPU_SCRIPT = textwrap.dedent(
    """
    import math, torch, torch.nn.functional as F
    from nlgraph.kernels.deep_memory import deep_memory_chunk, deep_memory_triton
    torch.manual_seed(0)
    dev = "cuda"
    worst = 0.0
    for B, T, H, D, Dh, C, depth, read in ((2, 512, 4, 32, 32, 16, 2, "after"),
                                           (2, 300, 4, 16, 24, 8, 2, "chunk_start"),
                                           (3, 200, 2, 32, 32, 16, 1, "after")):
        q = F.normalize(torch.randn(B, T, H, D, device=dev), dim=-1)
        k = F.normalize(torch.randn(B, T, H, D, device=dev), dim=-1)
        v = torch.randn(B, T, H, D, device=dev)
        lr = 0.1 * torch.sigmoid(torch.randn(B, T, H, device=dev))
        mom = torch.sigmoid(torch.randn(B, T, H, device=dev))
        fg = 0.1 * torch.sigmoid(torch.randn(B, T, H, device=dev))
        widths = [D] + [Dh] * (depth - 1) + [D]
        p0 = {f"W{i}": torch.randn(H, widths[i - 1], widths[i], device=dev) / math.sqrt(widths[i])
              for i in range(1, depth + 1)}
        res = []
        for fn in (deep_memory_chunk, deep_memory_triton):
            xs = [t.clone().requires_grad_() for t in (q, k, v, lr, mom, fg, *p0.values())]
            y, st = fn(*xs[:6], params0=dict(zip(p0, xs[6:])), chunk_size=C, read=read)
            loss = (y * torch.cos(y)).sum() + sum(w.square().sum() for w in st["params"].values())
            res.append((y, *st["params"].values(), *torch.autograd.grad(loss, xs)))
        for got, want in zip(res[1], res[0]):
            err = (got.double() - want.double()).abs().max() / want.double().abs().max()
            worst = max(worst, err.item())
    print("WORST", worst)
    assert worst < 1e-4, worst
    """
)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_compiled_kernel_matches_the_chunk_form():
    """Runs in a fresh interpreter with TRITON_INTERPRET=0 (this process defined the kernel
    under the interpreter): B=2, T=512, H=4, d=32 depth 2 (the register bound; d=64 is past it
    and runs the chunk form), plus a chunk_start / C=8 case and depth 1, forward and every
    gradient against the chunk form."""
    run_compiled(_GPU_SCRIPT)
