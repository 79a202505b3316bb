"""The one Newton–Schulz of both compilers equals its plain reference, and is Eq. 44's GD."""

from __future__ import annotations

import pytest
import torch

from nlgraph.compiler.newton_schulz import (
    newton_schulz,
    newton_schulz_reference,
    orthogonalize_tensor,
)

SHAPES = [(3, 5), (5, 3), (4, 4), (1, 6), (6, 1), (2, 3, 4), (7,), ()]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
@pytest.mark.parametrize("variant", ["cubic", "quintic"])
@pytest.mark.parametrize("prenorm", [True, False])
def test_equals_the_reference(shape, variant, prenorm):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if not prenorm:
        g = g / (g.norm() + 1.0)  # keep the iteration bounded without the prenorm
    got = orthogonalize_tensor(g, 4, variant, prenorm)
    want = newton_schulz_reference(g, 4, variant, prenorm)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_batched_equals_one_matrix_at_a_time():
    g = torch.randn(2, 3, 4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = newton_schulz(g, 5, "quintic")
    for i in range(2):
        for j in range(3):
            want = newton_schulz_reference(g[i, j], 5, "quintic")
            torch.testing.assert_close(got[i, j], want, rtol=1e-12, atol=1e-12)


def test_one_cubic_step_is_inner_gd_on_eq_44():
    """From O = g, one GD step of size 1/4 on 1/2||O - g||^2 + 1/2||O^T O - I||^2."""
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    o = g.clone().requires_grad_()
    eye = torch.eye(5, dtype=torch.float64)
    loss = 0.5 * (o - g).pow(2).sum() + 0.5 * (o.T @ o - eye).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, o)
    step = g - 0.25 * grad
    torch.testing.assert_close(newton_schulz(g, 1, "cubic", prenorm=False), step, rtol=1e-12,
                               atol=1e-12)  # fmt: skip


def test_converges_to_the_polar_factor():
    g = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    o = newton_schulz(g, 40, "cubic")
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    torch.testing.assert_close(o, u @ vh, rtol=1e-8, atol=1e-8)
