"""Compiled optimizer graphs against torch.optim, step for step."""

from __future__ import annotations

import copy

import pytest
import torch

import nlgraph as nl
from nlgraph.library import builder
from nlgraph.optim import compile_optimizer


def torch_sgd_graph(lr: float = 0.1, momentum: float = 0.9, nesterov: bool = False) -> nl.Graph:
    """torch's SGD form: b <- mu b + g (a gradient memory with lr 1), W <- W - lr b."""
    g = nl.Graph("torch_sgd")
    w = g.level("w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
                optimizer=nl.follow(-lr * (w_grad(nesterov, momentum))))  # fmt: skip
    g.level("b", state=nl.like("w"), frequency=nl.per_step(), context=w.grad(),
            objective=nl.dot(), optimizer=nl.gd(lr=1.0, retain=momentum))  # fmt: skip
    return g


def w_grad(nesterov: bool, momentum: float):
    b = nl.state("b")
    return nl.grad_of("w") + momentum * b if nesterov else b


def problem(dtype, seed=0):
    torch.manual_seed(seed)
    shapes = [(5, 3), (7,), (2, 3, 4), (1,)]
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    targets = [torch.randn(s, dtype=dtype) for s in shapes]
    return params, targets


def loss_fn(params, targets):
    terms = [((p - t) ** 2 * (1 + i)).sum() + 0.01 * (p**4).sum() for i, (p, t) in
             enumerate(zip(params, targets, strict=False))]  # fmt: skip
    return sum(terms)


def run(opt_cls_or_fn, params, targets, steps=200, **kw):
    opt = opt_cls_or_fn(params, **kw)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_fn(params, targets).backward()
        opt.step()
    return params, opt


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def assert_close(a, b, dtype):
    for x, y in zip(a, b, strict=False):
        err = ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
        assert err <= TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("nesterov", [False, True], ids=["plain", "nesterov"])
def test_sgd_momentum_parity(dtype, nesterov):
    cls = compile_optimizer(torch_sgd_graph, "TorchSGD")
    p1, t = problem(dtype)
    p2 = [p.detach().clone().requires_grad_() for p in p1]
    run(cls, p1, t, lr=0.01, momentum=0.9, nesterov=nesterov)
    run(torch.optim.SGD, p2, t, lr=0.01, momentum=0.9, nesterov=nesterov)
    assert_close(p1, p2, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_parity(dtype, name):
    cls = compile_optimizer(builder(name))
    p1, t = problem(dtype)
    p2 = [p.detach().clone().requires_grad_() for p in p1]
    kw = dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-8) | ({"wd": 0.1} if name == "adamw" else {})
    run(cls, p1, t, **kw)
    ref = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    rkw = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, foreach=True)
    if name == "adamw":
        rkw["weight_decay"] = 0.1
    run(ref, p2, t, **rkw)
    assert_close(p1, p2, dtype)


def test_param_groups_and_state_dict_resume():
    """Two groups with their own lr; a state_dict round trip mid-training is exact."""
    cls = compile_optimizer(builder("adam"))
    p1, t = problem(torch.float64)
    p2 = [p.detach().clone().requires_grad_() for p in p1]

    def groups(ps):
        return [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}]

    def steps(opt, ps, n):
        for _ in range(n):
            opt.zero_grad()
            loss_fn(ps, t).backward()
            opt.step()

    steps(cls(groups(p1)), p1, 20)  # uninterrupted
    opt_a = cls(groups(p2))
    steps(opt_a, p2, 10)
    sd = copy.deepcopy(opt_a.state_dict())
    assert set(sd["state"][0]) == {"step", "m", "v"}
    assert [g["lr"] for g in sd["param_groups"]] == [1e-3, 3e-3]
    opt_b = cls(groups(p2))
    opt_b.load_state_dict(sd)
    steps(opt_b, p2, 10)
    for x, y in zip(p1, p2, strict=False):
        assert torch.equal(x, y)


def test_lr_scheduler_drives_it():
    cls = compile_optimizer(builder("adam"))
    p1, t = problem(torch.float64)
    p2 = [p.detach().clone().requires_grad_() for p in p1]
    o1 = cls(p1, lr=1e-2)
    o2 = torch.optim.Adam(p2, lr=1e-2)
    s1 = torch.optim.lr_scheduler.StepLR(o1, step_size=3, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(o2, step_size=3, gamma=0.5)
    for _ in range(12):
        for o, ps, s in ((o1, p1, s1), (o2, p2, s2)):
            o.zero_grad()
            loss_fn(ps, t).backward()
            o.step()
            s.step()
    assert_close(p1, p2, torch.float64)


def test_closure_and_unknown_hparam():
    cls = compile_optimizer(builder("adam"))
    p, t = problem(torch.float64)
    opt = cls(p)

    def closure():
        opt.zero_grad()
        loss = loss_fn(p, t)
        loss.backward()
        return loss

    assert opt.step(closure) is not None
    with pytest.raises(TypeError, match="unknown hyperparameters"):
        cls(p, betas=(0.9, 0.99))


def test_inner_objective_step_equals_rule():
    """PAPER.md 9.1: one autograd GD step on J(m) = <m, g> + (1 - a)/(2 lr) ||m||^2 gives the
    momentum rule m <- a m - lr g, which the compiled momentum level applies."""
    torch.manual_seed(0)
    lr, a = 0.1, 0.9
    m = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, dtype=torch.float64)
    J = (m * g).sum() + (1 - a) / (2 * lr) * (m**2).sum()
    (dJ,) = torch.autograd.grad(J, m)
    by_autograd = m.detach() - lr * dJ
    cls = compile_optimizer(builder("momentum"))
    w = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    opt = cls([w], lr=lr, beta=a)
    opt.state[w]["step"] = torch.tensor(0.0)
    opt.state[w]["m"] = m.detach().clone()
    w.grad = g.clone()
    opt.step()
    assert torch.allclose(opt.state[w]["m"], by_autograd, rtol=0, atol=1e-14)
    assert torch.allclose(w.detach(), by_autograd, rtol=0, atol=1e-14)  # W <- W + m
