"""The compiled drop-ins against torch.optim, step for step, and the torch.optim contract:
param groups, state_dict (torch's own layout, both ways), closures, LR schedulers."""

from __future__ import annotations

import copy

import pytest
import torch

import nlgraph as nl
import nlgraph.optim as O
from nlgraph.library import builder
from nlgraph.optim import compile_optimizer

SHAPES = [(6, 4), (7,), (3, 4, 5), (1,), (4, 6), (2, 1, 3)]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def problem(dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]
    targets = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    return params, targets


def clone(params):
    return [p.detach().clone().requires_grad_() for p in params]


def loss_fn(params, targets):
    return sum(
        ((p - t) ** 2 * (1 + i)).sum() + 0.01 * (p**4).sum()
        for i, (p, t) in enumerate(zip(params, targets, strict=True))
    )


@torch.no_grad()
def set_grads(params, targets):
    """The gradient of ``loss_fn``, written out (autograd would dominate the test's time)."""
    for i, (p, t) in enumerate(zip(params, targets, strict=True)):
        p.grad = (2.0 * (1 + i)) * (p - t) + 0.04 * p**3


def groups(params, per_group):
    """Three param groups; the later ones override hyperparameters (``per_group``)."""
    return [{"params": params[:2]}, {"params": params[2:4], **per_group[0]},
            {"params": params[4:], **per_group[1]}]  # fmt: skip


def train(opt, params, targets, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad(set_to_none=True)
        set_grads(params, targets)
        if i % 5 == 3:  # a parameter without a gradient this step: no update, no step count
            params[1].grad = None
        opt.step()


def assert_close(a, b, tol):
    for x, y in zip(a, b, strict=True):
        err = ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
        assert err <= tol, err


# (id, ours, torch's, hyperparameters, overrides for groups 2 and 3)
CASES = [
    ("sgd", O.SGD, torch.optim.SGD, {"lr": 0.01}, ({"lr": 0.02}, {"weight_decay": 0.1})),
    ("sgd-momentum", O.SGD, torch.optim.SGD, {"lr": 0.01, "momentum": 0.9},
     ({"lr": 0.005}, {"momentum": 0.5, "weight_decay": 0.1})),
    ("sgd-nesterov", O.SGD, torch.optim.SGD,
     {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
     ({"nesterov": False}, {"weight_decay": 0.0})),
    ("adam", O.Adam, torch.optim.Adam, {"lr": 1e-2, "betas": (0.9, 0.99)},
     ({"lr": 3e-3}, {"weight_decay": 0.1, "eps": 1e-6})),
    ("adam-amsgrad", O.Adam, torch.optim.Adam, {"lr": 1e-2, "amsgrad": True},
     ({"amsgrad": False}, {"weight_decay": 0.1, "betas": (0.8, 0.9)})),
    ("adamw", O.AdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1},
     ({"lr": 3e-3}, {"weight_decay": 0.0})),
    ("adamw-amsgrad", O.AdamW, torch.optim.AdamW, {"lr": 1e-2, "amsgrad": True},
     ({"amsgrad": False}, {"weight_decay": 0.3})),
    # torch reads initial_accumulator_value from the constructor only, not from a group
    ("adagrad", O.Adagrad, torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.1},
     ({"lr_decay": 0.01}, {"weight_decay": 0.1})),
    ("rmsprop", O.RMSprop, torch.optim.RMSprop, {"lr": 1e-2},
     ({"centered": True}, {"momentum": 0.9, "weight_decay": 0.1})),
    ("rmsprop-centered-momentum", O.RMSprop, torch.optim.RMSprop,
     {"lr": 1e-2, "alpha": 0.9, "centered": True, "momentum": 0.5}, ({"lr": 3e-3}, {"eps": 1e-4})),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_parity_with_torch_over_200_steps(case, dtype):
    _, ours, theirs, kw, per_group = case
    p1, t = problem(dtype)
    p2 = clone(p1)
    train(ours(groups(p1, per_group), **kw), p1, t, 200)
    train(theirs(groups(p2, per_group), foreach=True, **kw), p2, t, 200)
    assert_close(p1, p2, TOL[dtype])


@pytest.mark.parametrize("case", [c for c in CASES if "adam" in c[0]], ids=lambda c: c[0])
def test_adam_foreach_lowering_matches_torch_too(case):
    """Adam-shaped graphs run as torch's fused kernel by default; the foreach program they
    fall back to (any other graph) keeps the same parity."""
    _, ours, theirs, kw, per_group = case
    p1, t = problem(torch.float32)
    p2 = clone(p1)
    opt = ours(groups(p1, per_group), **kw)
    assert opt.program(opt.param_groups[0])[0].fused is not None
    opt.backend = "foreach"
    train(opt, p1, t, 200)
    train(theirs(groups(p2, per_group), foreach=True, **kw), p2, t, 200)
    assert_close(p1, p2, TOL[torch.float32])


def test_paper_momentum_is_torch_sgd():
    """PAPER.md 9.1: m <- a m - lr g, W <- W + m reproduces torch's SGD(lr, momentum=a)."""
    p1, t = problem()
    p2 = clone(p1)
    train(O.Momentum(p1, lr=0.01, momentum=0.9), p1, t, 100)
    train(torch.optim.SGD(p2, lr=0.01, momentum=0.9), p2, t, 100)
    assert_close(p1, p2, 1e-12)


def test_mixed_dtypes_in_one_group_and_maximize():
    p1, t = problem()
    p1[2] = p1[2].detach().float().requires_grad_()
    t[2] = t[2].float()
    p2 = clone(p1)
    neg = lambda ps, ts: -loss_fn(ps, ts)  # noqa: E731
    for opt, ps in ((O.Adam(p1, lr=1e-2, maximize=True), p1),
                    (torch.optim.Adam(p2, lr=1e-2, maximize=True), p2)):  # fmt: skip
        for _ in range(20):
            opt.zero_grad()
            neg(ps, t).backward()
            opt.step()
    assert_close(p1, p2, 1e-5)


# --------------------------------------------------------------------------- the contract

RESUMABLE = [
    (O.SGD, {"lr": 0.01, "momentum": 0.9}),
    (O.Adam, {"lr": 1e-2, "amsgrad": True}),
    (O.AdamW, {"lr": 1e-2}),
    (O.Adagrad, {"lr": 0.1, "lr_decay": 0.01}),
    (O.RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.5}),
    (O.Momentum, {"lr": 0.01}),
    (O.AdagradMomentum, {"lr": 0.05}),
    (O.PreconditionedMomentum, {"lr": 1e-2}),
    (O.DeltaMomentum, {"lr": 1e-3, "decay": 1e-4}),
    (O.DMGD, {"lr": 1e-2, "width": 4}),
    (O.Muon, {"lr": 0.02}),
    (O.M3, {"lr": 1e-2, "slow_every": 3}),
]


@pytest.mark.parametrize("cls,kw", RESUMABLE, ids=[c.__name__ for c, _ in RESUMABLE])
def test_state_dict_round_trip_mid_training_is_exact(cls, kw):
    p1, t = problem()
    p2 = clone(p1)
    torch.manual_seed(1)  # DMGD's memories start random
    train(cls(p1, **kw), p1, t, 14)  # uninterrupted
    torch.manual_seed(1)
    first = cls(p2, **kw)
    train(first, p2, t, 7)
    sd = copy.deepcopy(first.state_dict())
    assert sorted(sd["state"]) == list(range(len(SHAPES)))  # torch's layout: by index
    assert sd["param_groups"][0]["params"] == list(range(len(SHAPES)))
    second = cls(clone(p2), **kw)
    second.load_state_dict(sd)
    p3 = second.param_groups[0]["params"]
    train(second, p3, t, 7, start=7)
    for x, y in zip(p1, p3, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "ours,theirs,kw",
    [(O.Adam, torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
     (O.SGD, torch.optim.SGD, {"lr": 1e-2, "momentum": 0.9}),
     (O.RMSprop, torch.optim.RMSprop, {"lr": 1e-2, "centered": True, "momentum": 0.5}),
     (O.Adagrad, torch.optim.Adagrad, {"lr": 0.1})],
    ids=["adam", "sgd", "rmsprop", "adagrad"],
)  # fmt: skip
def test_state_dicts_load_across_torch_and_nlgraph(ours, theirs, kw):
    """The drop-ins keep torch's state names, so a checkpoint moves either way mid-training."""
    p0, t = problem()
    ref = clone(p0)
    train(theirs(ref, **kw), ref, t, 20)
    for first, second in ((theirs, ours), (ours, theirs)):
        ps = clone(p0)
        a = first(ps, **kw)
        train(a, ps, t, 10)
        b = second(ps, **kw)
        b.load_state_dict(copy.deepcopy(a.state_dict()))
        assert set(b.state_dict()["state"][0]) >= set(a.state_dict()["state"][0]) - {"step"}
        train(b, ps, t, 10, start=10)
        assert_close(ps, ref, 1e-12)


def test_lr_schedulers_drive_it_without_recompiling():
    p1, t = problem()
    p2 = clone(p1)
    o1, o2 = (
        O.Adam(groups(p1, ({}, {"lr": 1e-3})), lr=1e-2),
        torch.optim.Adam(groups(p2, ({}, {"lr": 1e-3})), lr=1e-2),
    )
    s1 = torch.optim.lr_scheduler.OneCycleLR(o1, max_lr=[0.05, 0.02, 0.01], total_steps=60)
    s2 = torch.optim.lr_scheduler.OneCycleLR(o2, max_lr=[0.05, 0.02, 0.01], total_steps=60)
    for _ in range(60):
        for opt, ps, sched in ((o1, p1, s1), (o2, p2, s2)):
            set_grads(ps, t)
            opt.step()
            sched.step()
    assert_close(p1, p2, 1e-10)
    assert o1.compilations == 1  # one program; every lr is a runtime number


def test_closure_zero_grad_and_steps_without_gradients():
    p, t = problem()
    opt = O.Adam(p, lr=1e-2)

    def closure():
        opt.zero_grad()
        loss = loss_fn(p, t)
        loss.backward()
        return loss

    assert torch.is_tensor(opt.step(closure))
    opt.zero_grad()
    assert all(q.grad is None for q in p)
    before = [q.detach().clone() for q in p]
    opt.step()  # no gradients: nothing moves, no step is counted
    assert all(torch.equal(a, b) for a, b in zip(before, p, strict=True))
    assert all(opt.state[q]["step"].item() == 1 for q in p)


def test_hyperparameters_are_checked_at_construction():
    p, _ = problem()
    with pytest.raises(TypeError, match="unknown hyperparameters"):
        O.Adam(p, momentum=0.9)
    with pytest.raises(ValueError, match="dampening"):
        O.SGD(p, lr=0.1, momentum=0.9, dampening=0.1)
    with pytest.raises(nl.SpecError, match="nesterov"):
        O.SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(nl.SpecError, match="beta.*less than 1"):
        O.Adam(p, betas=(0.9, 1.5))
    with pytest.raises(nl.SpecError, match="outside"):
        O.SGD(p, lr=0.1, momentum=1.5)
    opt = O.SGD(p, 0.1, 0.9)  # torch's positional order
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.9


def test_shape_selectors_route_every_parameter():
    p, t = problem()
    muon_only = compile_optimizer(builder("muon"))(p)
    muon_only.zero_grad()
    loss_fn(p, t).backward()
    with pytest.raises(nl.CompileError, match=r"shape \(7,\) matches no params level"):
        muon_only.step()
    opt = O.Muon(p)
    opt.zero_grad()
    loss_fn(p, t).backward()
    opt.step()
    assert set(opt.state[p[0]]) == {"step", "m"}  # matrices: Muon's momentum
    assert set(opt.state[p[1]]) == {"step", "adamw.m", "adamw.v"}  # the rest: AdamW


def test_compile_optimizer_takes_any_builder():
    def sign_sgd(lr: float = 0.1) -> nl.Graph:
        """signSGD: W <- W - lr sign(g)."""
        g = nl.Graph("sign_sgd")
        g.level("w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
                optimizer=nl.follow(-lr * nl.grad_of("w").sign()))  # fmt: skip
        return g

    cls = compile_optimizer(sign_sgd)
    assert cls.__name__ == "SignSgd" and "lr" in str(cls.__init__.__signature__)
    w = torch.zeros(3, requires_grad=True)
    opt = cls([w], lr=0.5)
    w.grad = torch.tensor([2.0, -3.0, 0.0])
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([-0.5, 0.5, 0.0]))
