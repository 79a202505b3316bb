"""Softmax attention: all queries at once equals one query at a time (values, gradients)."""

from __future__ import annotations

import pytest
import torch

from nlgraph.kernels.attention import attention

CASES = [(1, 1, 1, 3, 2, None), (2, 7, 2, 5, 3, None), (2, 9, 3, 4, 4, 3), (1, 6, 1, 2, 2, 1)]


@pytest.mark.parametrize("B,T,H,D,Dv,window", CASES, ids=lambda c: str(c))
def test_chunk_equals_naive(B, T, H, D, Dv, window):
    torch.manual_seed(0)
    q, k = (torch.randn(B, T, H, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, Dv, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(B, T, H, Dv, dtype=torch.float64)
    results = []
    for backend in ("reference", "chunk"):
        o, cache = attention(q, k, v, window=window, backend=backend)
        grads = torch.autograd.grad((o * cot).sum(), (q, k, v))
        results.append((o, grads))
    (o0, g0), (o1, g1) = results
    assert torch.allclose(o0, o1, atol=1e-12)
    for a, b in zip(g0, g1, strict=True):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("window", [None, 2])
def test_segments_with_the_cache_equal_one_pass_and_causality(window):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 8, 2, 3, dtype=torch.float64) for _ in range(3))
    full, _ = attention(q, k, v, window=window)
    cache, outs = None, []
    for a, b in ((0, 3), (3, 4), (4, 8)):
        o, cache = attention(q[:, a:b], k[:, a:b], v[:, a:b], cache=cache, window=window)
        outs.append(o)
    assert torch.allclose(torch.cat(outs, 1), full, atol=1e-12)
    k2 = k.clone()
    k2[:, 5:] += 1
    assert torch.equal(attention(q, k2, v, window=window)[0][:, :5], full[:, :5])


def test_bad_shapes_are_clear_errors():
    x = torch.randn(1, 4, 2, 3)
    with pytest.raises(ValueError, match="same B, T, H"):
        attention(x, torch.randn(1, 5, 2, 3), x)
    with pytest.raises(ValueError, match="window"):
        attention(x, x, x, window=0)
