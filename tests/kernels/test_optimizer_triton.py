"""The fused optimizer update: Triton kernel (interpreter on CPU) == naive reference ==
torch.optim, the flat-buffer optimizer path, state_dict round trips and torch.compile tracing."""

from __future__ import annotations

import copy

import pytest
import torch

import nlgraph.optim as O
from nlgraph._errors import BackendUnavailableError
from nlgraph.kernels import _dispatch
from nlgraph.kernels.optimizer import FlatParams, optimizer_update, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton and a GPU or "
                                "TRITON_INTERPRET=1")  # fmt: skip

SHAPES = [(1,), (7,), (130,), (3, 5), (2, 1, 3)]  # awkward: 1, odd, past one 128 block
RTOL = 1e-6  # float32, relative to each tensor's largest entry


def assert_close(got, want, what):
    for i, (x, y) in enumerate(zip(got, want, strict=True)):
        err = ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
        assert err <= RTOL, f"{what}[{i}] {tuple(y.shape)}: relative error {err:.2e}"


def grads_at(step, shapes, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    return [torch.randn(s, generator=g) for s in shapes]


# (id, torch class, its kwargs, the kernel's rule and kwargs, state keys -> m, v, vmax)
CASES = [
    ("sgd-momentum-damp-wd", torch.optim.SGD,
     {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01},
     {"rule": "sgd", "lr": 0.05, "beta1": 0.9, "dampening": 0.3, "weight_decay": 0.01},
     ("momentum_buffer", None, None)),
    ("sgd-nesterov", torch.optim.SGD,
     {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1},
     {"rule": "sgd", "lr": 0.05, "beta1": 0.8, "nesterov": True, "weight_decay": 0.1},
     ("momentum_buffer", None, None)),
    ("adam-l2", torch.optim.Adam, {"lr": 1e-2, "betas": (0.8, 0.95), "weight_decay": 0.1},
     {"rule": "adam", "lr": 1e-2, "beta1": 0.8, "beta2": 0.95, "eps": 1e-8,
      "weight_decay": 0.1}, ("exp_avg", "exp_avg_sq", None)),
    ("adamw", torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-6},
     {"rule": "adam", "lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6,
      "weight_decay": 0.1, "decoupled": True}, ("exp_avg", "exp_avg_sq", None)),
    ("adamw-amsgrad", torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.05, "amsgrad": True},
     {"rule": "adam", "lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
      "weight_decay": 0.05, "decoupled": True, "amsgrad": True},
     ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    ("adam-amsgrad", torch.optim.Adam, {"lr": 1e-2, "amsgrad": True},
     {"rule": "adam", "lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "amsgrad": True},
     ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    ("rmsprop-momentum", torch.optim.RMSprop,
     {"lr": 1e-2, "alpha": 0.9, "momentum": 0.5, "weight_decay": 0.1},
     {"rule": "rmsprop", "lr": 1e-2, "beta1": 0.5, "beta2": 0.9, "eps": 1e-8,
      "weight_decay": 0.1}, ("momentum_buffer", "square_avg", None)),
]  # fmt: skip


def _run_kernel(backend, case, steps=10):
    """``steps`` updates of the packed SHAPES with ``backend``; the tensors as torch lays them."""
    _, _, _, kw, names = case
    params = [p.clone() for p in grads_at(-1, SHAPES)]
    flat = FlatParams(params, [n for n in names if n])
    idx = list(range(len(params)))
    moments = [flat.state[n] if n else None for n in names]  # m, v, vmax
    for t in range(1, steps + 1):
        flat.gather(idx, grads_at(t, SHAPES))
        optimizer_update(flat.param, flat.grad, *moments, flat.spans(idx), step=t,
                         backend=backend, **kw)  # fmt: skip
    views = {n: flat._views(buf) for n, buf in flat.state.items()}
    return params, views


def _run_torch(case, steps=10):
    _, cls, kw, _, _ = case
    params = [p.clone().requires_grad_() for p in grads_at(-1, SHAPES)]
    opt = cls(params, foreach=False, **kw)
    for t in range(1, steps + 1):
        for p, g in zip(params, grads_at(t, SHAPES), strict=True):
            p.grad = g
        opt.step()
    states = {n: [opt.state[p][n] for p in params] for n in opt.state[params[0]] if n != "step"}
    return [p.detach() for p in params], states


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_equals_reference_and_torch_over_10_steps(case):
    p_tri, s_tri = _run_kernel("triton", case)
    p_ref, s_ref = _run_kernel("reference", case)
    p_torch, s_torch = _run_torch(case)
    assert_close(p_tri, p_ref, "param vs reference")
    assert_close(p_tri, p_torch, "param vs torch")
    assert set(s_torch) == set(s_tri)
    for name in s_torch:
        assert_close(s_tri[name], s_ref[name], f"{name} vs reference")
        assert_close(s_tri[name], s_torch[name], f"{name} vs torch")
    assert not torch.equal(p_tri[2], grads_at(-1, SHAPES)[2])  # it moved


def test_only_the_spans_move_and_unaligned_spans_work():
    """Spans at odd offsets (the unaligned kernel variant); elements outside stay put."""
    n = 300
    p0, g = torch.randn(n), torch.randn(n)
    spans = torch.tensor([[0, 1], [5, 12], [20, 150], [299, 300]])
    inside = torch.zeros(n, dtype=torch.bool)
    for a, b in spans.tolist():
        inside[a:b] = True
    out = {}
    for backend in ("triton", "reference"):
        p, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
        for t in (1, 2, 3):
            optimizer_update(p, g, m, v, None, spans, rule="adam", lr=0.1, beta1=0.9,
                             beta2=0.99, eps=1e-8, step=t, backend=backend)  # fmt: skip
        out[backend] = (p, m, v)
        assert torch.equal(p[~inside], p0[~inside]) and not (m[~inside] != 0).any()
        assert (p[inside] != p0[inside]).all()
    assert_close(out["triton"], out["reference"], "triton vs reference")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_low_precision_params_compute_in_float32_and_round_once(dtype):
    """Params and moments in ``dtype`` (torch's layout): the kernel computes in float32 and
    rounds each stored value once, so it equals the float32 reference rounded to ``dtype``.
    Triton's CPU interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest, so
    there bfloat16 may differ by one unit in the last place."""
    n, spans = 130, torch.tensor([[0, 130]])
    gen = torch.Generator().manual_seed(3)
    p, m, v = torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n)
    low = [t.to(dtype) for t in (p, m, v)]
    for t in (1, 2, 3):
        g = torch.randn(n, generator=gen).to(dtype)
        kw = {"rule": "adam", "lr": 0.1, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "step": t,
              "weight_decay": 0.1}  # fmt: skip
        ref = [x.float() for x in low]  # this step in float32 from the same stored values
        optimizer_update(*ref[:1], g.float(), *ref[1:], None, spans, backend="reference", **kw)
        optimizer_update(low[0], g, *low[1:], None, spans, backend="triton", **kw)
        for name, got, want in zip("pmv", low, ref, strict=True):
            want = want.to(dtype).float()
            ulp = torch.finfo(dtype).eps * want.abs().clamp_min(torch.finfo(dtype).tiny)
            slack = 1.0 if dtype == torch.bfloat16 and not got.is_cuda else 0.0
            err = (got.float() - want).abs()
            assert (err <= slack * ulp).all(), f"step {t}, {name}: {err.max().item():.2e}"


def test_errors_say_what_is_wrong():
    p = torch.zeros(8)
    spans = torch.tensor([[0, 8]])
    with pytest.raises(ValueError, match="needs v"):
        optimizer_update(p, p.clone(), p.clone(), None, None, spans, rule="adam", lr=0.1,
                         backend="triton")  # fmt: skip
    with pytest.raises(ValueError, match="spans must satisfy"):
        optimizer_update(p, p.clone(), None, None, None, torch.tensor([[0, 9]]), rule="sgd",
                         lr=0.1, backend="triton")  # fmt: skip
    with pytest.raises(ValueError, match="float64"):
        q = torch.zeros(8, dtype=torch.float64)
        optimizer_update(q, q.clone(), None, None, None, spans, rule="sgd", lr=0.1,
                         backend="triton")  # fmt: skip


# ------------------------------------------------------------------ the optimizer's path


def _train(opt, params, steps, start=0, seed=1):
    shapes = [p.shape for p in params]
    for t in range(start, start + steps):
        opt.zero_grad(set_to_none=t % 2 == 0)  # in place on odd steps: grads stay flat views
        for p, g in zip(params, grads_at(t, shapes, seed), strict=True):
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        if t % 4 == 2:  # no gradient this step: no update, no step count
            params[1].grad = None
        if t % 5 == 3:
            params[3].grad = None
        opt.step()


OPTS = [
    ("adam-l2", O.Adam, torch.optim.Adam, {"lr": 1e-2, "betas": (0.8, 0.99),
                                           "weight_decay": 0.1}),
    ("adam-amsgrad", O.Adam, torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    ("adamw", O.AdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    ("adamw-amsgrad", O.AdamW, torch.optim.AdamW, {"lr": 1e-2, "amsgrad": True,
                                                   "weight_decay": 0.3}),
]  # fmt: skip


@pytest.mark.parametrize("case", OPTS, ids=[c[0] for c in OPTS])
def test_forced_triton_optimizer_equals_torch(case):
    _, ours, theirs, kw = case
    p1 = [p.clone().requires_grad_() for p in grads_at(-1, SHAPES)]
    p2 = [p.detach().clone().requires_grad_() for p in p1]
    opt = ours(p1, **kw)
    opt.backend = "triton"
    _train(opt, p1, 10)
    _train(theirs(p2, foreach=False, **kw), p2, 10)
    ((_, flat),) = opt._flat.values()  # the group went through the flat buffer
    assert p1[0].data_ptr() == flat.param.data_ptr()
    assert_close([p.detach() for p in p1], [p.detach() for p in p2], "param vs torch")
    assert [opt.state[p]["step"].item() for p in p1] == [10.0, 8.0, 10.0, 8.0, 10.0]


@pytest.mark.parametrize(
    "ours,theirs", [(O.Adam, torch.optim.Adam), (O.AdamW, None)], ids=["adam", "adamw"]
)
def test_state_dict_round_trip_mid_training_resumes_exactly(ours, theirs):
    kw = {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}
    p1 = [p.clone().requires_grad_() for p in grads_at(-1, SHAPES)]
    p2 = [p.detach().clone().requires_grad_() for p in p1]
    whole = ours(p1, **kw)
    whole.backend = "triton"
    _train(whole, p1, 12)
    first = ours(p2, **kw)
    first.backend = "triton"
    _train(first, p2, 6)
    sd = copy.deepcopy(first.state_dict())
    assert sorted(sd["state"]) == list(range(len(SHAPES)))  # torch's layout, by index
    assert sd["state"][2]["exp_avg"].shape == SHAPES[2]
    p3 = [p.detach().clone().requires_grad_() for p in p2]
    second = ours(p3, **kw)
    second.backend = "triton"
    second.load_state_dict(copy.deepcopy(sd))  # loading shares the tensors it is given
    _train(second, p3, 6, start=6)
    for x, y in zip(p1, p3, strict=True):
        assert torch.equal(x, y)
    if theirs is None:  # the AdamW drop-in's groups lack torch's decoupled_weight_decay key
        return
    # torch.optim resumes from the flat optimizer's checkpoint, to rounding
    p4 = [p.detach().clone().requires_grad_() for p in p2]
    other = theirs(p4, foreach=False, **kw)
    other.load_state_dict(copy.deepcopy(sd))
    _train(other, p4, 6, start=6)
    assert_close([p.detach() for p in p4], [p.detach() for p in p3], "torch resumed")


def test_repacks_when_a_parameter_is_replaced():
    p = [p.clone().requires_grad_() for p in grads_at(-1, SHAPES)]
    opt = O.Adam(p, lr=1e-2)
    opt.backend = "triton"
    _train(opt, p, 2)
    ((_, old),) = opt._flat.values()
    p[2].data = p[2].data.clone()  # breaks the view: the next step packs again
    _train(opt, p, 1, start=2)
    ((_, new),) = opt._flat.values()
    assert new is not old and p[2].data_ptr() == new.param.data_ptr() + 128 * 4
    assert opt.state[p[2]]["exp_avg"].data_ptr() == new.state["exp_avg"].data_ptr() + 128 * 4


def test_unmatched_graphs_keep_the_foreach_program_and_auto_stays_off_cpu(monkeypatch):
    monkeypatch.delenv("NLGRAPH_BACKEND", raising=False)
    p = [p.clone().requires_grad_() for p in grads_at(-1, SHAPES)]
    rms = O.RMSprop(p, lr=1e-2)
    rms.backend = "triton"  # no fused lowering: foreach, same numbers as torch
    _train(rms, p, 2)
    assert not rms._flat
    adam = O.Adam(p, lr=1e-2)  # auto on CPU: torch's fused kernel, no packing
    _train(adam, p, 2)
    assert not adam._flat
    assert _dispatch.resolve_backend("optimizer_update", "auto", torch.device("cpu")) == "reference"


def test_forcing_triton_without_it_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(
        _dispatch._REGISTRY["optimizer_update"], "triton",
        (_dispatch._REGISTRY["optimizer_update"]["triton"][0], lambda: False),
    )  # fmt: skip
    p = [torch.zeros(3, requires_grad=True)]
    opt = O.Adam(p)
    opt.backend = "triton"
    p[0].grad = torch.ones(3)
    with pytest.raises(BackendUnavailableError, match="not available here"):
        opt.step()


# ---------------------------------------------------------------------- torch.compile


def test_torch_compile_traces_the_custom_op_without_graph_breaks():
    import torch._dynamo

    def step(p, g, m, v, spans, lr):
        torch.ops.nlgraph.optimizer_update(p, g, m, v, None, spans, "adam", lr, 0.9, 0.99,
                                           1e-8, 0.0, False, 0.0, False, False, 2)  # fmt: skip
        return p * 2

    p, g = torch.randn(130), torch.randn(130)
    m, v = torch.randn(130), torch.rand(130)
    spans = torch.tensor([[0, 7], [64, 130]])
    eager = [t.clone() for t in (p, m, v)]
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # raises on a break
    out = compiled(p, g, m, v, spans, 0.01)
    want = step(*eager[:1], g, *eager[1:], spans, 0.01)
    assert torch.equal(out, want)
    for got, ref in zip((p, m, v), eager, strict=True):  # the mutations reach the inputs
        assert torch.equal(got, ref)


# ------------------------------------------------------------------------------- GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_moderate_size_equals_torch_fused_adamw():
    shapes = [(1,), (4097,), (1000, 257), (3, 64, 65), (12345,)]
    g = torch.Generator(device="cuda").manual_seed(0)
    p1 = [torch.randn(s, device="cuda", generator=g).requires_grad_() for s in shapes]
    p2 = [p.detach().clone().requires_grad_() for p in p1]
    kw = {"lr": 1e-3, "weight_decay": 0.1, "amsgrad": True}
    ours = O.AdamW(p1, **kw)  # auto on CUDA: the Triton kernel over a flat buffer
    theirs = torch.optim.AdamW(p2, foreach=True, **kw)
    for t in range(10):
        grads = [torch.randn(s, device="cuda", generator=g) for s in shapes]
        for ps, opt in ((p1, ours), (p2, theirs)):
            for p, gr in zip(ps, grads, strict=True):
                p.grad = gr.clone()
            if t % 3 == 1:
                ps[2].grad = None
            opt.step()
    assert ours._flat, "auto on CUDA should pack the group"
    assert_close([p.detach() for p in p1], [p.detach() for p in p2], "param vs torch")
