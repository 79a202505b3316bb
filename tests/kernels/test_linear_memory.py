"""Linear memory kernels: chunk form vs the token loop, invariances, and PAPER.md 9.2 / 9.5 / 9.15.

Tolerances: float64 within 1e-10 and float32 within 1e-4, both relative to the reference's
largest magnitude (per tensor), so one comparison covers outputs, states and gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nlgraph.kernels import _dispatch
from nlgraph.kernels.linear_memory import (
    delta_rule,
    dgd,
    gated_delta_rule,
    linear_attention,
    linear_memory,
    linear_memory_chunk,
    linear_memory_naive,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}

# (B, T, H, Dk, Dv, C, dtype)
SHAPES = [
    pytest.param(1, 1, 1, 4, 4, 4, torch.float64, id="T1-f64"),
    pytest.param(2, 7, 2, 5, 3, 3, torch.float64, id="B2-T7-C3-oddD-Dk5Dv3-f64"),
    pytest.param(1, 16, 2, 8, 8, 4, torch.float64, id="T16-C4-multiple-f64"),
    pytest.param(2, 20, 1, 3, 7, 1, torch.float64, id="B2-T20-C1-Dk3Dv7-f64"),
    pytest.param(2, 13, 3, 6, 9, 16, torch.float32, id="B2-T13-C16-CgtT-f32"),
    pytest.param(1, 33, 2, 16, 12, 8, torch.float32, id="T33-C8-ragged-f32"),
]

INSTANCES = ["linear_attention", "gated", "deltanet", "gated_deltanet", "dgd", "hope_l2"]


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    err = (got - want).abs().max().item()
    ref = max(want.abs().max().item(), 1e-30)
    assert err <= TOL[dtype] * ref, f"{what}: max error {err:.3e} vs max |ref| {ref:.3e}"


def _gates(instance: str, k: torch.Tensor, g: torch.Generator):
    """(alpha, b, c) of one named instance, for keys k [B, T, H, Dk]; keeps every state bounded."""
    B, T, H, _ = k.shape
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(B, T, H, generator=g, dtype=k.dtype)
    if instance == "linear_attention":
        return None, None, None
    if instance == "gated":
        return u(0.5, 1.0), None, None
    if instance == "deltanet":
        beta = u(0.0, 1.0)
        return None, beta, beta.clone()
    if instance == "gated_deltanet":
        alpha, beta = u(0.5, 1.0), u(0.0, 1.0)
        return alpha, alpha * beta, beta
    if instance == "dgd":  # unnormalised keys: eta' ||k||^2 < 1 keeps it contractive anyway
        eta = u(0.1, 2.0)
        eta_p = eta / (1 + eta * (k * k).sum(-1))
        return None, eta_p, eta_p.clone()
    if instance == "hope_l2":  # M(alpha I - eta k k^T) - eta (M k - v) k^T with ||k|| = 1
        alpha, eta = u(0.8, 1.0), u(0.0, 0.4)
        return alpha, 2 * eta, eta
    raise AssertionError(instance)


def _inputs(B, T, H, Dk, Dv, dtype, instance, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=g, dtype=dtype)
    k = torch.randn(B, T, H, Dk, generator=g, dtype=dtype)
    if instance != "dgd":
        k = F.normalize(k, dim=-1)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=dtype)
    alpha, b, c = _gates(instance, k, g)
    M0 = torch.randn(B, H, Dv, Dk, generator=g, dtype=dtype)
    return q, k, v, alpha, b, c, M0, g


@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("instance", INSTANCES)
@pytest.mark.parametrize("B,T,H,Dk,Dv,C,dtype", SHAPES)
def test_chunk_matches_naive_forward_and_gradients(B, T, H, Dk, Dv, C, dtype, instance, read):
    q, k, v, alpha, b, c, M0, g = _inputs(B, T, H, Dk, Dv, dtype, instance)
    leaves = {"q": q, "k": k, "v": v, "alpha": alpha, "b": b, "c": c, "initial_state": M0}
    leaves = {n: x for n, x in leaves.items() if x is not None}
    go = torch.randn(B, T, H, Dv, generator=g, dtype=dtype)
    gs = torch.randn(B, H, Dv, Dk, generator=g, dtype=dtype)

    results = []
    for fn, kw in ((linear_memory_naive, {}), (linear_memory_chunk, {"chunk_size": C})):
        xs = {n: x.clone().requires_grad_() for n, x in leaves.items()}
        o, s = fn(
            xs["q"],
            xs["k"],
            xs["v"],
            xs.get("alpha"),
            xs.get("b"),
            xs.get("c"),
            initial_state=xs["initial_state"],
            scale=0.5,
            read=read,
            **kw,
        )
        grads = torch.autograd.grad((o * go).sum() + (s * gs).sum(), list(xs.values()))
        results.append((o, s, dict(zip(xs, grads, strict=True))))
    (o_ref, s_ref, g_ref), (o_ch, s_ch, g_ch) = results
    assert o_ch.shape == (B, T, H, Dv) and s_ch.shape == (B, H, Dv, Dk)
    assert o_ch.dtype == dtype
    _close(o_ch, o_ref, dtype, "output")
    _close(s_ch, s_ref, dtype, "final state")
    for name in g_ref:
        _close(g_ch[name], g_ref[name], dtype, f"d/d{name}")


def test_gradcheck_chunk_tiny():
    """float64 finite differences through the chunk form, every input (T=5, C=2: ragged)."""
    q, k, v, alpha, b, c, M0, _ = _inputs(1, 5, 1, 3, 2, torch.float64, "gated_deltanet")
    args = [x.clone().requires_grad_() for x in (q, k, v, alpha, b, c, M0)]
    for read in ("after", "before"):

        def f(q, k, v, alpha, b, c, M0, read=read):
            return linear_memory_chunk(
                q, k, v, alpha, b, c, initial_state=M0, read=read, chunk_size=2
            )

        assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_causality(backend, read):
    """Perturbing every input at tokens > t never changes o[:, :t+1]."""
    B, T, H, D = 2, 12, 2, 5
    q, k, v, alpha, b, c, M0, g = _inputs(B, T, H, D, D, torch.float64, "gated_deltanet")
    kw = dict(initial_state=M0, chunk_size=4, backend=backend, read=read)
    o, _ = linear_memory(q, k, v, alpha, b, c, **kw)
    for t in (0, 3, 6, 10):
        later = torch.arange(T) > t

        def bump(x, later=later):
            noise = torch.rand(x.shape, generator=g, dtype=x.dtype)
            return x + later.view(1, T, *[1] * (x.dim() - 2)) * noise

        o2, _ = linear_memory(*(bump(x) for x in (q, k, v, alpha, b, c)), **kw)
        torch.testing.assert_close(o2[:, : t + 1], o[:, : t + 1], rtol=0, atol=1e-12)
        assert not torch.allclose(o2[:, t + 1 :], o[:, t + 1 :])


@pytest.mark.parametrize("backend", ["reference", "chunk"])
@pytest.mark.parametrize("read", ["after", "before"])
def test_segments_with_carried_state_equal_one_pass(backend, read):
    q, k, v, alpha, b, c, M0, _ = _inputs(2, 11, 2, 4, 3, torch.float64, "hope_l2")
    kw = dict(read=read, chunk_size=3, backend=backend)
    o, s = linear_memory(q, k, v, alpha, b, c, initial_state=M0, **kw)
    parts, state = [], M0
    for sl in (slice(0, 5), slice(5, 6), slice(6, 11)):
        o_i, state = linear_memory(
            q[:, sl],
            k[:, sl],
            v[:, sl],
            alpha[:, sl],
            b[:, sl],
            c[:, sl],
            initial_state=state,
            **kw,
        )
        parts.append(o_i)
    _close(torch.cat(parts, dim=1), o, torch.float64, "segmented output")
    _close(state, s, torch.float64, "segmented final state")


def test_extreme_decays_stay_exact():
    """alpha = 0 (hard reset) and alpha ~ 1e-30 inside chunks: finite, and chunk == loop for the
    outputs, state and gradients (d/dalpha at alpha = 0 included).

    A ratio of cumulative decays Gamma_t / Gamma_i would be 0/0 here (float32 underflow)."""
    B, T, H, D = 1, 64, 2, 8
    q, k, v, _, _, _, M0, g = _inputs(B, T, H, D, D, torch.float32, "deltanet")
    alpha = torch.rand(B, T, H, generator=g) * 0.2
    alpha[:, 5] = 0.0
    alpha[:, 20:24] = 1e-30
    beta = torch.rand(B, T, H, generator=g)
    go = torch.randn(B, T, H, D, generator=g)
    for read in ("after", "before"):
        results = []
        for fn, kw in ((linear_memory_naive, {}), (linear_memory_chunk, {"chunk_size": 32})):
            a = alpha.clone().requires_grad_()
            qq = q.clone().requires_grad_()
            o, s = fn(qq, k, v, a, a * beta, beta, initial_state=M0, read=read, **kw)
            grads = torch.autograd.grad((o * go).sum() + s.sum(), (qq, a))
            results.append((o, s, *grads))
        for name, got, want in zip(("o", "state", "dq", "dalpha"), *results, strict=True):
            assert torch.isfinite(got).all(), name
            _close(got, want, torch.float32, name)


def test_wrappers_map_onto_the_general_op():
    B, T, H, D = 2, 9, 2, 4
    q, k, v, alpha, _, _, M0, g = _inputs(B, T, H, D, D, torch.float64, "gated")
    beta = torch.rand(B, T, H, generator=g, dtype=torch.float64)
    eta = torch.rand(B, T, H, generator=g, dtype=torch.float64) + 0.1
    wd = 0.05 * torch.rand(B, T, H, generator=g, dtype=torch.float64)
    eta_p = eta / (1 + eta * (k * k).sum(-1))
    pairs = [
        (linear_attention(q, k, v), linear_memory_naive(q, k, v)),
        (linear_attention(q, k, v, alpha), linear_memory_naive(q, k, v, alpha)),
        (delta_rule(q, k, v, beta), linear_memory_naive(q, k, v, None, beta, beta)),
        (
            gated_delta_rule(q, k, v, alpha, beta),
            linear_memory_naive(q, k, v, alpha, alpha * beta, beta),
        ),
        (dgd(q, k, v, eta), linear_memory_naive(q, k, v, None, eta_p, eta_p)),
        (dgd(q, k, v, eta, wd), linear_memory_naive(q, k, v, 1 - wd, eta_p, eta_p)),
    ]
    for (o, s), (o_ref, s_ref) in pairs:
        _close(o, o_ref, torch.float64, "wrapper output")
        _close(s, s_ref, torch.float64, "wrapper state")


def test_dispatch_backends_and_env_override(monkeypatch):
    q, k, v, alpha, b, c, M0, _ = _inputs(1, 6, 1, 3, 3, torch.float64, "gated_deltanet")
    assert _dispatch.resolve_backend("linear_memory", "auto") == "chunk"
    o_c, _ = linear_memory(q, k, v, alpha, b, c, backend="chunk", chunk_size=4)
    o_r, _ = linear_memory(q, k, v, alpha, b, c, backend="reference")
    _close(o_c, o_r, torch.float64, "chunk vs reference")
    monkeypatch.setenv("NLGRAPH_BACKEND", "reference")
    assert _dispatch.resolve_backend("linear_memory", "chunk") == "reference"
    o_e, s_e = linear_memory(q, k, v, alpha, b, c, output_final_state=False)
    assert s_e is None
    _close(o_e, o_r, torch.float64, "env-forced reference")


def test_half_inputs_compute_in_float32():
    q, k, v, alpha, b, c, _, _ = _inputs(1, 10, 2, 8, 8, torch.float32, "gated_deltanet")
    o32, _ = linear_memory_chunk(q, k, v, alpha, b, c, chunk_size=4)
    o16, s16 = linear_memory_chunk(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), alpha, b, c, chunk_size=4
    )
    assert o16.dtype == s16.dtype == torch.bfloat16
    assert (o16.float() - o32).abs().max() < 0.05 * o32.abs().max()


# --- PAPER.md 9.2: linear attention and DeltaNet are one GD step on their inner objectives ---


def _one_token(M, k, v, alpha=None, b=None, c=None, backend="chunk"):
    """The state after one token of the op, for a single [Dv, Dk] memory."""
    shape = lambda x: None if x is None else x.reshape(1, 1, 1)
    _, s = linear_memory(
        k.view(1, 1, 1, -1),
        k.view(1, 1, 1, -1),
        v.view(1, 1, 1, -1),
        shape(alpha),
        shape(b),
        shape(c),
        initial_state=M[None, None],
        backend=backend,
    )
    return s[0, 0]


@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_paper_9_2_gd_steps_on_inner_objectives(backend):
    g = torch.Generator().manual_seed(3)
    f64 = dict(generator=g, dtype=torch.float64)
    M, k, v = torch.randn(5, 4, **f64), torch.randn(4, **f64), torch.randn(5, **f64)
    beta, alpha = torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)

    def gd_step(loss, start, lr):
        W = start.clone().requires_grad_()
        (grad,) = torch.autograd.grad(loss(W), W)
        return W.detach() - lr * grad

    dot = lambda W: -torch.dot(W @ k, v)
    l2 = lambda W: 0.5 * ((W @ k - v) ** 2).sum()
    eye = torch.eye(4, dtype=torch.float64)
    hebb = gd_step(dot, M, 1.0)
    delta = gd_step(l2, M, beta)
    # gated: decay first, then the step from alpha M
    hebb_g = gd_step(dot, alpha * M, 1.0)
    delta_g = gd_step(l2, alpha * M, beta)
    _close(hebb, M + torch.outer(v, k), torch.float64, "GD on -<Mk, v>")
    _close(
        delta,
        M @ (eye - beta * torch.outer(k, k)) + beta * torch.outer(v, k),
        torch.float64,
        "GD on 1/2||Mk - v||^2",
    )
    _close(_one_token(M, k, v, backend=backend), hebb, torch.float64, "linear attention")
    _close(_one_token(M, k, v, None, beta, beta, backend), delta, torch.float64, "DeltaNet")
    _close(_one_token(M, k, v, alpha, backend=backend), hebb_g, torch.float64, "gated LA")
    _close(
        _one_token(M, k, v, alpha, alpha * beta, beta, backend),
        delta_g,
        torch.float64,
        "gated DeltaNet",
    )


# --- PAPER.md 9.5: DGD's closed form is the exact proximal step ------------------------------


@pytest.mark.parametrize("unit_key", [False, True], ids=["general-x", "unit-x"])
def test_paper_9_5_dgd_closed_form_equals_exact_minimiser(unit_key):
    g = torch.Generator().manual_seed(4)
    f64 = dict(generator=g, dtype=torch.float64)
    W, x, u = torch.randn(6, 5, **f64), torch.randn(5, **f64), torch.randn(6, **f64)
    if unit_key:
        x = x / x.norm()
    eta = torch.tensor(0.7, dtype=torch.float64)
    # argmin_W 1/2||W x - u||^2 + 1/(2 eta)||W - W_t||^2  <=>  W (x x^T + I/eta) = u x^T + W_t/eta
    A = torch.outer(x, x) + torch.eye(5, dtype=torch.float64) / eta
    exact = torch.linalg.solve(A, (torch.outer(u, x) + W / eta).T).T
    _, s = dgd(
        x.view(1, 1, 1, 5),
        x.view(1, 1, 1, 5),
        u.view(1, 1, 1, 6),
        eta.view(1, 1, 1),
        initial_state=W[None, None],
    )
    _close(s[0, 0], exact, torch.float64, "DGD vs linalg.solve")
    if unit_key:  # Eq. 57: eta' = eta / (1 + eta) for ||x|| = 1
        eq57 = W @ (torch.eye(5, dtype=torch.float64) - eta / (1 + eta) * torch.outer(x, x))
        _close(s[0, 0], eq57 + eta / (1 + eta) * torch.outer(u, x), torch.float64, "Eq. 57")


def test_paper_9_5_dgd_large_eta_writes_u_at_x():
    g = torch.Generator().manual_seed(5)
    W, x, u = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((6, 5), (5,), (6,)))
    errors = []
    for eta in (1.0, 1e3, 1e8):
        _, s = dgd(
            x.view(1, 1, 1, 5),
            x.view(1, 1, 1, 5),
            u.view(1, 1, 1, 6),
            torch.full((1, 1, 1), eta, dtype=torch.float64),
            initial_state=W[None, None],
        )
        errors.append((s[0, 0] @ x - u).norm().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-7 * u.norm().item()


# --- PAPER.md 9.15: associative-recall capacity of a d x d matrix memory ----------------------


def _store(keys, values, passes, rule):
    """Write the d pairs `passes` times in one sequence; return the [Dv, Dk] memory."""
    d = keys.shape[0]
    K = keys.repeat(passes, 1).view(1, passes * d, 1, -1)
    V = values.repeat(passes, 1).view(1, passes * d, 1, -1)
    ones = torch.ones(1, passes * d, 1, dtype=keys.dtype)
    if rule == "hebbian":
        _, M = linear_attention(K, K, V, chunk_size=16)
    else:
        _, M = delta_rule(K, K, V, ones, chunk_size=16)
    return M[0, 0]


def _recall_error(M, keys, values):
    return ((keys @ M.T - values).norm() / values.norm()).item()


def test_paper_9_15_orthonormal_keys_both_rules_recall_exactly():
    g = torch.Generator().manual_seed(6)
    d = 8
    keys = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    values = torch.randn(d, d, generator=g, dtype=torch.float64)
    for rule in ("hebbian", "delta"):
        assert _recall_error(_store(keys, values, 1, rule), keys, values) < 1e-12, rule


def test_paper_9_15_correlated_keys_delta_converges_hebbian_does_not():
    g = torch.Generator().manual_seed(7)
    d = 8
    # unit-norm, linearly independent (condition number ~5), pairwise cosines up to ~0.7
    keys = F.normalize(torch.eye(d, dtype=torch.float64) + 0.35, dim=-1)
    keys = F.normalize(keys + 0.05 * torch.randn(d, d, generator=g, dtype=torch.float64), dim=-1)
    assert torch.linalg.matrix_rank(keys) == d
    values = torch.randn(d, d, generator=g, dtype=torch.float64)
    delta = [_recall_error(_store(keys, values, p, "delta"), keys, values) for p in (1, 10, 150)]
    hebb = [_recall_error(_store(keys, values, p, "hebbian") / p, keys, values) for p in (1, 60)]
    assert delta[0] > delta[1] > delta[2] and delta[2] < 1e-9, delta
    assert min(hebb) > 0.1, hebb


# --- errors at the boundary -------------------------------------------------------------------


def _ok():
    q = torch.randn(2, 5, 3, 4)
    return dict(q=q, k=q.clone(), v=torch.randn(2, 5, 3, 6))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(q=torch.randn(2, 5, 4)), r"q has shape \[2, 5, 4\]; expected rank 4"),
        (dict(q=torch.randn(2, 5, 3, 7)), r"q has shape \[2, 5, 3, 7\]; expected the shape of k"),
        (dict(v=torch.randn(2, 4, 3, 6)), r"v has shape \[2, 4, 3, 6\]; expected \[2, 5, 3, Dv\]"),
        (
            dict(alpha=torch.rand(2, 5, 3, 1)),
            r"alpha has shape .*expected \[B, T, H\] = \[2, 5, 3\]",
        ),
        (dict(b=torch.rand(2, 5)), r"b has shape \[2, 5\]"),
        (dict(c=torch.rand(5, 2, 3)), r"c has shape \[5, 2, 3\]"),
        (
            dict(initial_state=torch.randn(2, 3, 4, 6)),
            r"initial_state .* \[2, 3, 6, 4\].*transpose",
        ),
        (dict(read="during"), r"read='during'; expected one of"),
        (dict(chunk_size=0), r"chunk_size=0; expected an int >= 1"),
        (
            dict(q=torch.randn(2, 0, 3, 4), k=torch.randn(2, 0, 3, 4), v=torch.randn(2, 0, 3, 6)),
            r"T >= 1",
        ),
        (dict(v=torch.randn(2, 5, 3, 6, dtype=torch.float64)), r"share one floating dtype"),
    ],
    ids=["rank", "q-vs-k", "v-time", "alpha", "b", "c", "state", "read", "chunk", "T0", "dtype"],
)
@pytest.mark.parametrize("backend", ["reference", "chunk"])
def test_bad_inputs_raise_clear_errors(change, match, backend):
    kw = {**_ok(), **change}
    with pytest.raises(ValueError, match=match):
        linear_memory(**kw, backend=backend)
