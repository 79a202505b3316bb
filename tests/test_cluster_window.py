"""The chunk-parallel DGD + momentum window of memory clusters equals its token recurrence."""

import pytest
import torch
from torch.nn import functional as F

from nlgraph.kernels.momentum_memory import momentum_memory_chunk as momentum_window
from nlgraph.kernels.momentum_memory import momentum_memory_naive as _momentum_tokens


def _inputs(C, with_b, with_a, zero_gates=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, I, O = 2, 3, 5, 4

    def r(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    x = F.normalize(torch.randn(B, C, H, I, generator=g, dtype=torch.float64), dim=-1)
    d = torch.randn(B, C, H, O, generator=g, dtype=torch.float64)
    b = 0.9 * r(B, C, H) if with_b else None
    a = 0.5 + 0.5 * r(B, C, H) if with_a else None
    mu = r(B, C, H)
    if zero_gates:  # a hard reset of the momentum and of the weights mid-window
        mu[:, C // 2] = 0.0
        if a is not None:
            a[:, C // 3] = 0.0
    w0 = torch.randn(B, H, O, I, generator=g, dtype=torch.float64)
    s0 = torch.randn(B, H, O, I, generator=g, dtype=torch.float64)
    return [t if t is None else t.requires_grad_() for t in (x, d, b, a, mu, w0, s0)]


@pytest.mark.parametrize("C", [1, 2, 7, 16])
@pytest.mark.parametrize("with_b", [True, False])
@pytest.mark.parametrize("with_a", [True, False])
def test_window_equals_token_loop(C, with_b, with_a):
    ins = _inputs(C, with_b, with_a)
    live = [t for t in ins if t is not None]
    ref, got = _momentum_tokens(*ins), momentum_window(*ins)
    for r, c in zip(ref, got, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-12, atol=1e-12)

    def loss(out):
        return sum((t * torch.cos(t)).sum() for t in out)

    g_ref = torch.autograd.grad(loss(ref), live)
    g_got = torch.autograd.grad(loss(got), live)
    for r, c in zip(g_ref, g_got, strict=True):
        torch.testing.assert_close(c, r, rtol=1e-10, atol=1e-10)


def test_zero_gates_are_exact():
    ins = _inputs(9, True, True, zero_gates=True, seed=3)
    for r, c in zip(_momentum_tokens(*ins), momentum_window(*ins), strict=True):
        torch.testing.assert_close(c, r, rtol=1e-12, atol=1e-12)


def test_gradcheck_through_the_solve():
    ins = _inputs(4, True, True, seed=5)
    ins = [t.detach()[:1, :, :1, :3].clone().requires_grad_() if t.dim() == 4 else t for t in ins]
    x, d, b, a, mu, w0, s0 = ins
    b, a, mu = (t.detach()[:1, :, :1].clone().requires_grad_() for t in (b, a, mu))
    w0, s0 = (t.detach()[:1, :1, :, :3].clone().requires_grad_() for t in (w0, s0))
    assert torch.autograd.gradcheck(
        lambda *z: momentum_window(*z), (x, d, b, a, mu, w0, s0), eps=1e-6, atol=1e-8
    )
