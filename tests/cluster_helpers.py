"""Helpers shared by the recurrent-cluster tests: the two-layer memory of their hand-written
token loops, its inner gradient by autograd, and comparisons."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def M(ws, z):  # z + W1 silu(W2 z)
    return z + ws[1] @ F.silu(ws[0] @ z)


def inner_grad(ws, k, target):
    """Autograd of 1/2 ||M(k) - target||^2 w.r.t. each layer at ``ws`` (target held fixed)."""
    alias = [w.view_as(w) if w.requires_grad else w.detach().requires_grad_() for w in ws]
    loss = 0.5 * ((M(alias, k) - target) ** 2).sum()
    return torch.autograd.grad(loss, alias, create_graph=True)


def params(learner):
    return [p for _, p in sorted(learner.named_parameters())]


def check_grads(got, want):
    for a, b in zip(got, want, strict=True):
        if b is None:
            assert a is None or not a.abs().sum()
        else:
            assert rel(a, b) <= 1e-10


def run_both_equal(cl, loop, x):
    """Give ``cl`` the weights of ``loop``, run both on ``x``: outputs and the memory M's
    running and visible states agree to 1e-12. Returns both outputs."""
    cl.load_state_dict(
        {k: v for k, v in loop.state_dict().items() if k != "_extra_state"}, strict=False
    )
    ya, sa = loop(x)
    yb, sb = cl(x)
    assert rel(yb["y"], ya["y"]) <= 1e-12
    for key in ("running", "visible"):
        for a, b in zip(sb["M"][key], sa["M"][key], strict=True):
            assert rel(a, b) <= 1e-12
    return ya, yb
