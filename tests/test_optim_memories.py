"""Optimizers as memories (PAPER.md 2–3, 9): every memory's compiled update is one GD step on the
objective it declares; the library's optimizers equal their naive reference; the paper's
checkable claims about them (9.1, 9.4–9.6, 9.12–9.14)."""

from __future__ import annotations

import math

import pytest
import torch

import nlgraph.library as L
import nlgraph.optim as O
from nlgraph.compiler.newton_schulz import newton_schulz_reference
from nlgraph.compiler.optimizer.ops import newton_schulz
from nlgraph.optim import compile_optimizer

F64 = torch.float64


def problem(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=F64).requires_grad_() for s in shapes]
    targets = [torch.randn(s, generator=g, dtype=F64) for s in shapes]
    return params, targets


@torch.no_grad()
def set_grads(params, targets):  # of sum_i (1 + i) ||p_i - t_i||^2 + 0.01 ||p_i||_4^4
    for i, (p, t) in enumerate(zip(params, targets, strict=True)):
        p.grad = (2.0 * (1 + i)) * (p - t) + 0.04 * p**3


def loss(params, targets):
    return sum(((1 + i) * ((p - t) ** 2).sum() + 0.01 * (p**4).sum()).item()
               for i, (p, t) in enumerate(zip(params, targets, strict=True)))  # fmt: skip


# ------------------------------------------------------------ the library, row by row

MIXED = [(6, 4), (7,), (3, 4, 5), (1,), (4, 6)]
MATRICES = [(6, 4), (3, 4, 5), (4, 6)]
ROWS = {  # library name -> (builder kwargs, shapes, kwargs that cut the loss by 30% in 60 steps)
    "sgd": ({"lr": 0.01, "momentum": 0.9, "weight_decay": 0.01}, MIXED, {}),
    "momentum": ({"lr": 0.01}, MIXED, {}),
    "nesterov": ({"lr": 0.01}, MIXED, {}),
    "adam": ({"lr": 0.05, "amsgrad": True, "weight_decay": 0.01}, MIXED, {}),
    "adamw": ({"lr": 0.05, "amsgrad": True}, MIXED, {}),
    "adagrad": ({"lr": 0.5, "lr_decay": 0.01, "initial_accumulator_value": 0.1}, MIXED, {}),
    "rmsprop": ({"lr": 0.01, "momentum": 0.5, "centered": True}, MIXED, {}),
    "adagrad_momentum": ({"lr": 0.05}, MIXED, {}),
    "preconditioned_momentum": ({"lr": 0.01}, MIXED, {}),
    "delta_momentum": ({"lr": 0.002, "decay": 1e-4}, MIXED, {}),
    "meta_momentum": ({"lr": 0.01, "meta_lr": 0.1, "every": 3}, MIXED, {}),
    "dmgd": ({"lr": 0.005, "inner_lr": 0.1, "width": 4}, MIXED, {}),
    "muon": ({"lr": 0.05, "nesterov": True, "wd": 0.01}, MATRICES, {"lr": 0.5}),
    "muon_adamw": ({"lr": 0.05, "variant": "cubic", "adamw_lr": 0.05}, MIXED, {"lr": 0.5}),
    "m3": ({"lr": 0.05, "f": 3}, MATRICES, {"lr": 0.5}),
    "m3_adamw": ({"lr": 0.05, "f": 4, "momenta": "ema", "adamw_lr": 0.05}, MIXED, {"lr": 0.5}),
}


def test_every_library_optimizer_has_a_row():
    assert set(ROWS) | {"dgd_update"} == set(L.names("optimizer"))


@pytest.mark.parametrize("name", sorted(ROWS))
def test_library_optimizer_equals_its_reference_and_learns(name):
    """Compiled (foreach) equals the naive reference (per tensor, autograd on each declared
    objective) over 25 steps in float64, with a gradient missing now and then; and it learns."""
    kw, shapes, learn = ROWS[name]
    cls = compile_optimizer(L.builder(name))
    runs = []
    for backend in ("foreach", "reference"):
        params, targets = problem(shapes)
        torch.manual_seed(0)  # DMGD's memories start random
        opt = cls(params, **kw)
        opt.backend = backend
        for i in range(25):
            set_grads(params, targets)
            if i % 4 == 2:
                params[1].grad = None
            opt.step()
        runs.append((params, opt))
    (p1, o1), (p2, o2) = runs
    for a, b in zip(p1, p2, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (a - b).abs().max()
        for key in o1.state[a]:
            assert torch.allclose(o1.state[a][key], o2.state[b][key], rtol=1e-10, atol=1e-12), key
    params, targets = problem(shapes)
    torch.manual_seed(0)
    opt, start = cls(params, **{**kw, **learn}), loss(params, targets)
    for _ in range(60):
        set_grads(params, targets)
        opt.step()
    assert loss(params, targets) < 0.7 * start


# ------------------------------------------------ one GD step on each declared objective


def one_step(cls, state, grad, backend=None, **kw):
    """One compiled step from a given state; returns the new state and the new weights.
    ``backend="foreach"`` runs nlgraph's own lowering of the graph (Adam would otherwise run as
    torch's fused kernel, which checks torch, not the memories)."""
    w = torch.zeros_like(grad).requires_grad_()
    opt = cls([w], **kw)
    if backend is not None:
        opt.backend = backend
    opt.state[w].update({"step": torch.tensor(0.0), **{k: v.clone() for k, v in state.items()}})
    w.grad = grad.clone()
    opt.step()
    return opt.state[w], w.detach()


def gd(objective, state, lr):
    s = state.clone().requires_grad_()
    (d,) = torch.autograd.grad(objective(s), s)
    return state - lr * d


def test_momentum_is_gd_on_its_inner_objective():
    """9.1: one GD step on J(m) = <m, g> + (1 - a)/(2 lr) ||m||^2 is m <- a m - lr g."""
    torch.manual_seed(0)
    lr, a = 0.1, 0.9
    m, g = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
    want = gd(lambda s: (s * g).sum() + (1 - a) / (2 * lr) * (s**2).sum(), m, lr)
    state, w = one_step(O.Momentum, {"m": m}, g, lr=lr, momentum=a)
    assert torch.allclose(state["m"], want, rtol=0, atol=1e-14)
    assert torch.allclose(w, want, rtol=0, atol=1e-14)  # W <- W + m


def test_adam_moments_are_gd_on_l2_to_their_streams():
    """App. B: each moment is one GD step of size 1 - beta on 1/2 ||S - stream||^2."""
    torch.manual_seed(0)
    m, v, g = torch.randn(5, dtype=F64), torch.rand(5, dtype=F64), torch.randn(5, dtype=F64)
    state, _ = one_step(O.Adam, {"exp_avg": m, "exp_avg_sq": v}, g, "foreach", betas=(0.8, 0.9))
    want_m = gd(lambda s: 0.5 * ((s - g) ** 2).sum(), m, 0.2)
    want_v = gd(lambda s: 0.5 * ((s - g * g) ** 2).sum(), v, 0.1)
    torch.testing.assert_close(state["exp_avg"], want_m, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state["exp_avg_sq"], want_v, rtol=1e-12, atol=1e-12)


def test_adagrad_accumulator_is_gd_on_a_dot_objective():
    torch.manual_seed(0)
    v, g = torch.rand(5, dtype=F64), torch.randn(5, dtype=F64)
    state, _ = one_step(O.Adagrad, {"sum": v}, g)
    want = gd(lambda s: -(s * g * g).sum(), v, 1.0)
    torch.testing.assert_close(state["sum"], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("normalize", [False, True])
def test_delta_momentum_is_gd_on_its_l2_objective(normalize):
    """Eqs. 48–49: one GD step of size ``decay`` with retention ``beta`` on
    1/2 (<m, u> - c)^2, c = -lr/decay: m <- (beta I - decay u u^T) m - lr u (flattened)."""
    torch.manual_seed(0)
    lr, beta, decay = 0.1, 0.9, 0.3
    m, g = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    u = g / g.norm() if normalize else g
    c = -lr / decay
    want = beta * m - decay * torch.autograd.functional.jacobian(
        lambda s: 0.5 * ((s * u).sum() - c) ** 2, m
    )
    closed = beta * m - decay * (m * u).sum() * u - lr * u
    state, _ = one_step(O.DeltaMomentum, {"m": m}, g, lr=lr, momentum=beta, decay=decay,
                        normalize=normalize)  # fmt: skip
    assert torch.allclose(state["m"], want, atol=1e-14)
    assert torch.allclose(want, closed, atol=1e-14)


def test_deep_momentum_is_gd_on_the_mlp_objective():
    """Eq. 50 (our choice, PAPER.md 2.7): the MLP's weights take one GD step, with retention,
    on 1/2 mean ||M(u) - u||^2 over the tensor's entries; W <- W - lr M_new(u)."""
    torch.manual_seed(0)
    lr, inner, decay = 0.1, 0.5, 0.9
    w1, w2 = torch.randn(1, 4, dtype=F64), torch.randn(4, 1, dtype=F64)
    g = torch.randn(3, 5, dtype=F64)

    def memory(a, b, x):
        return x + (torch.nn.functional.silu(x.reshape(-1, 1) @ b.T) @ a.T).reshape(x.shape)

    a, b = w1.clone().requires_grad_(), w2.clone().requires_grad_()
    ga, gb = torch.autograd.grad(0.5 * ((memory(a, b, g) - g) ** 2).mean(), (a, b))
    na, nb = decay * w1 - inner * ga, decay * w2 - inner * gb
    state, w = one_step(O.DMGD, {"m.W1": w1, "m.W2": w2}, g, lr=lr, inner_lr=inner,
                        decay=decay, width=4)  # fmt: skip
    torch.testing.assert_close(state["m.W1"], na, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state["m.W2"], nb, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, -lr * memory(na, nb, g), rtol=1e-12, atol=1e-12)


def test_adam_and_adagrad_are_optimal_elementwise_memories():
    """9.4: argmin_m sum_i (m g_i - P)^2 + lam m^2 = P sum g / (sum g^2 + lam); with
    P = sqrt(sum g^2), lam -> 0 it is sum g / sqrt(sum g^2), AdaGrad-with-momentum's step."""
    torch.manual_seed(0)
    gs = torch.randn(6, 5, dtype=F64)
    for p_t, lam in ((gs.pow(2).sum(0).sqrt(), 0.3), (gs.pow(2).sum(0), 0.0)):
        m = torch.zeros(5, dtype=F64, requires_grad=True)
        for _ in range(200):  # Newton on a quadratic converges in one step; take a few
            j = ((m * gs - p_t) ** 2).sum() + lam * (m**2).sum()
            (d,) = torch.autograd.grad(j, m)
            with torch.no_grad():
                m -= d / (2 * (gs.pow(2).sum(0) + lam))
        closed = p_t * gs.sum(0) / (gs.pow(2).sum(0) + lam)
        assert torch.allclose(m.detach(), closed, atol=1e-12)
    w = torch.zeros(5, dtype=F64, requires_grad=True)
    opt = O.AdagradMomentum([w], lr=1.0, eps=0.0)
    for g in gs:
        w.grad = g.clone()
        opt.step()
    step = -(opt.state[w]["m"] / opt.state[w]["v"].sqrt())
    assert torch.allclose(step, -gs.sum(0) / gs.pow(2).sum(0).sqrt(), atol=1e-14)


def test_newton_schulz_is_inner_gd_and_converges_to_the_polar_factor():
    """9.6: one GD step (1/4) on 1/2||O-g||^2 + 1/2||O^T O - I||^2 from O = g is
    1.5 g - 0.5 g g^T g (the cubic step); repeated on a scaled g it reaches U V^T."""
    torch.manual_seed(0)
    g = torch.randn(4, 6, dtype=F64) / 4
    o = gd(lambda o: 0.5 * ((o - g) ** 2).sum()
           + 0.5 * ((o.T @ o - torch.eye(6, dtype=F64)) ** 2).sum(), g, 0.25)  # fmt: skip
    assert torch.allclose(o, 1.5 * g - 0.5 * g @ g.T @ g, atol=1e-14)
    assert torch.allclose(newton_schulz(g, 1, "cubic", prenorm=False), o, atol=1e-14)
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    polar = newton_schulz(g, 30, "cubic")
    assert torch.allclose(polar, u @ vt, atol=1e-10)
    assert (polar @ polar.T - torch.eye(4, dtype=F64)).abs().max() < 1e-10


# -------------------------------------------------------------------------------- DGD


def proximal_minimiser(w, x, u, lr):
    """argmin_W 1/(2N) sum_n ||W x_n - u_n||^2 + 1/(2 lr) ||W - w||^2 by its normal equations."""
    n = x.shape[0]
    a = x.T @ x / n + torch.eye(x.shape[1], dtype=F64) / lr
    return torch.linalg.solve(a, (w / lr + u.T @ x / n).T).T


def _dgd_memory_step(w, x, u, lr, backend):
    """One token of an nlgraph memory trained by exact DGD on the dot objective (PAPER.md 3.1):
    initial state ``w [dv, dk]``, key ``x``, value ``u``, rate ``lr``; returns its new state."""
    import nlgraph as nl
    from nlgraph.compiler import compile

    dv, dk = w.shape
    g = nl.Graph("dgd_step")
    k, v = g.input("k", dim=dk), g.input("v", dim=dv)
    mem = g.level("M", state=nl.linear(dk, dv), frequency=nl.per_token(),
                  context=nl.kv(key=k, value=v), objective=nl.dot(),
                  optimizer=nl.dgd(lr=lr, exact=True), init=nl.meta())  # fmt: skip
    g.output("y", mem(k, at="new"))
    learner = compile(g, backend=backend, dtype=F64)
    with torch.no_grad():
        learner.memories["M"].initial["M"].copy_(w.unsqueeze(0))
    _, state = learner({"k": x.reshape(1, 1, dk), "v": u.reshape(1, 1, dv)})
    return state["M"][0, 0]


@pytest.mark.parametrize("backend", ["chunk", "reference"])
def test_dgd_closed_form_is_the_exact_minimiser(backend):
    """9.5: nlgraph's DGD step on a memory, W (I - lr' x x^T) + lr' u x^T with
    lr' = lr / (1 + lr ||x||^2), is the exact minimiser of 1/2 ||W x - u||^2 + 1/(2 lr) ||W -
    W_t||^2 (a linear solve); for ||x|| = 1, lr' = lr / (1 + lr) (Eq. 57); a large step forgets
    along x and writes u."""
    torch.manual_seed(0)
    w, x, u = (
        torch.randn(3, 5, dtype=F64),
        torch.randn(1, 5, dtype=F64),
        torch.randn(1, 3, dtype=F64),
    )
    # The solve's own error grows with its condition number, about lr ||x||^2: 1e-12 at
    # lr = 0.7, ~1e-9 at lr = 1e6.
    for key, lr, tol in ((x, 0.7, 1e-12), (x / x.norm(), 0.7, 1e-12), (x, 1e6, 1e-8)):
        got = _dgd_memory_step(w, key, u, lr, backend)
        want = proximal_minimiser(w, key, u, lr)
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        if key.norm() == 1:  # Eq. 57: the closed form with lr / (1 + lr)
            e = lr / (1 + lr)
            eq57 = w @ (torch.eye(5, dtype=F64) - e * key.T @ key) + e * u.T @ key
            torch.testing.assert_close(got, eq57, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got @ x.T, u.T, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rows", [2, 9], ids=["woodbury", "solve"])
def test_dgd_optimizer_on_a_linear_layer(rows):
    """The DGD optimizer on nn.Linear weights, with the layer inputs it watched, equals the
    exact proximal step on the per-row self-generated values u_n = -N dL/dy_n (mean loss)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 3, bias=False).double()
    x, y = torch.randn(rows, 5, dtype=F64), torch.randn(rows, 3, dtype=F64)
    opt = O.DGD(layer.parameters(), lr=0.8)
    opt.watch(layer)
    w0 = layer.weight.detach().clone()
    out = layer(x)
    out.retain_grad()
    torch.nn.functional.mse_loss(out, y).backward()
    opt.step()
    u = -rows * out.grad
    assert torch.allclose(layer.weight.detach(), proximal_minimiser(w0, x, u, 0.8), atol=1e-12)


def test_dgd_without_watched_inputs_says_how_to_fix_it():
    layer = torch.nn.Linear(5, 3, bias=False)
    opt = O.DGD(layer.parameters())
    layer(torch.randn(2, 5)).sum().backward()
    with pytest.raises(RuntimeError, match=r"watch\(model\)"):
        opt.step()


# --------------------------------------------------------------------------------- M3


def m3_problem(f):
    params, targets = problem([(4, 6), (5, 3)])
    opt = O.M3(params, lr=0.01, betas=(0.9, 0.99, 0.5), slow_every=f)
    return params, targets, opt


def test_m3_slow_memory_sums_the_previous_chunk():
    """9.12: M2 changes only every f steps, by b3 x the sum of that chunk's gradients, and the
    weights read the previous chunk's M2 (so NS(M2) is constant within a chunk)."""
    f = 4
    params, targets, opt = m3_problem(f)
    p = params[0]
    seen, grads = [], []
    for _ in range(3 * f):
        set_grads(params, targets)
        grads.append(p.grad.clone())
        opt.step()
        seen.append(opt.state[p]["M2"].clone())
    for t in range(1, 3 * f + 1):
        changed = not torch.equal(seen[t - 1], seen[t - 2] if t > 1 else torch.zeros_like(p))
        assert changed == (t % f == 0), t
    chunk = torch.stack(grads[f : 2 * f]).sum(0)
    torch.testing.assert_close(seen[2 * f - 1] - seen[f - 1], 0.5 * chunk, rtol=1e-12, atol=1e-14)


def test_m3_weights_follow_algorithm_1():
    """9.12: the weights' update with both momenta (alpha != 0), against an independent loop of
    Algorithm 1: M1 += b1 g, V += b2 g^2 every step; every f steps M2 += b3 (sum of the chunk's
    gradients); W -= lr (NS(M1) + alpha NS(M2 before this step)) / (sqrt(V) + eps)."""
    f, lr, (b1, b2, b3), alpha, eps = 3, 0.01, (0.9, 0.99, 0.5), 0.7, 1e-8
    params, targets = problem([(4, 6), (5, 3)])
    ref = [p.detach().clone() for p in params]
    opt = O.M3(params, lr=lr, betas=(b1, b2, b3), alpha=alpha, slow_every=f)
    m1, v, m2, chunk = ([torch.zeros_like(p) for p in ref] for _ in range(4))
    for t in range(1, 4 * f + 2):
        set_grads(params, targets)
        for i, p in enumerate(params):
            g = p.grad
            m1[i] += b1 * g
            v[i] += b2 * g**2
            chunk[i] += g
            ns = newton_schulz_reference(m1[i], 5, "quintic")
            ns += alpha * newton_schulz_reference(m2[i], 5, "quintic")
            ref[i] -= lr * ns / (v[i].sqrt() + eps)
            if t % f == 0:  # the slow memory takes the chunk's sum after this step's read
                m2[i] += b3 * chunk[i]
                chunk[i] = torch.zeros_like(g)
        opt.step()
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-12)
    assert all(m.abs().sum() > 0 for m in m2)  # the slow term was on


def test_m3_without_the_slow_memory_is_muon_momentum_over_sqrt_v():
    """9.12: with alpha = 0, W <- W - lr NS(M1) / (sqrt(V) + eps), M1 += b1 g, V += b2 g^2."""
    params, targets = problem([(4, 6), (6, 3)])
    ref = [p.detach().clone() for p in params]
    opt = O.M3(params, lr=0.02, betas=(0.9, 0.99, 0.5), alpha=0.0, slow_every=3)
    m1 = [torch.zeros_like(p) for p in ref]
    v = [torch.zeros_like(p) for p in ref]
    for _ in range(10):
        set_grads(params, targets)
        for i, p in enumerate(params):
            m1[i] += 0.9 * p.grad
            v[i] += 0.99 * p.grad**2
            ref[i] -= 0.02 * newton_schulz(m1[i], 5, "quintic") / (v[i].sqrt() + 1e-8)
        opt.step()
    for p, r in zip(params, ref, strict=True):
        assert torch.allclose(p.detach(), r, atol=1e-12)


# ------------------------------------------------------------------ 2.6 and 2.7 claims


def test_ema_horizon_arithmetic():
    """9.13: with beta = 0.9 the last 7 gradients carry 52.2% of an EMA, the last 44 99.0%
    (the paper's 6 and 43 count the previous ones besides the current)."""
    n = 100
    w = torch.zeros(n, dtype=F64, requires_grad=True)
    opt = O.Adam([w], betas=(0.9, 0.999))
    opt.backend = "foreach"  # nlgraph's EMA memory, not torch's fused Adam
    for t in range(n):  # gradient t is the unit vector e_t: m's entries are its weights
        w.grad = torch.nn.functional.one_hot(torch.tensor(t), n).to(F64)
        opt.step()
    weights = opt.state[w]["exp_avg"].flip(0)  # most recent first
    want = torch.tensor([0.1, 0.09, 0.081], dtype=F64)
    torch.testing.assert_close(weights[:3], want, rtol=1e-12, atol=1e-12)
    assert round(weights[:7].sum().item(), 3) == 0.522
    assert round(weights[:44].sum().item(), 3) == 0.990
    assert round(weights[:6].sum().item(), 3) == 0.469


K, ALPHA, OMEGA = 10.0, 0.5, 5.0  # psi's constants (unspecified in the paper, [U])
TOY = {"lr": 3e-3, "momentum": 0.95}
DELTA_DECAY = 3e-5
STEPS = {"momentum": 565, "delta": 368}  # pinned on CPU, float64, torch 2.13


def steps_to_optimum(cls, tol=1e-4, limit=2000, **kw):
    x = torch.tensor([-3.5, 2.0], dtype=F64, requires_grad=True)
    opt = cls([x], **kw)
    for i in range(1, limit + 1):
        opt.zero_grad()
        r, th = x[0], x[1]
        (r**2 + K * (r - th + ALPHA * torch.sin(OMEGA * r)) ** 2).backward()
        opt.step()
        r, th = x.detach()
        if r**2 + K * (r - th + ALPHA * math.sin(OMEGA * r)) ** 2 < tol:
            return i
    return limit + 1


def test_delta_momentum_reaches_the_toy_optimum_first():
    """9.14 (Fig. 4), a regression test, not a reproduction: on psi(r, t) = r^2 +
    k (r - t + a sin(w r))^2 from (-3.5, 2), delta momentum (decay 3e-5) reaches psi < 1e-4
    in fewer steps than momentum with the same lr and beta."""
    plain = steps_to_optimum(O.Momentum, **TOY)
    delta = steps_to_optimum(O.DeltaMomentum, decay=DELTA_DECAY, **TOY)
    assert delta < plain
    assert abs(plain - STEPS["momentum"]) <= 0.05 * STEPS["momentum"], plain
    assert abs(delta - STEPS["delta"]) <= 0.05 * STEPS["delta"], delta
