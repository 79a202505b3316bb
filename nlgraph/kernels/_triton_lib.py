"""Triton device functions the kernels share (imported only when Triton is): products of gates
without division, their gradients, and the inverse of a unit lower-triangular matrix.

Tiles are indexed by ``rows = arange(BC)[:, None]`` and ``cols = arange(BC)[None, :]``. Every
product of gates is a cumulative product (``tl.cumprod``), never a ratio of cumulative products,
and every gradient of one leaves the factor out instead of dividing by it, so a gate of exactly
0 (a hard reset) and tiny gates stay exact, gradients included.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["products", "product_grad", "shift_back", "unit_lower_inverse"]


@triton.jit
def products(x, rows, cols, START: tl.constexpr):
    """P[r, j] = prod of x[m] for j + START <= m <= r (1 where the range is empty)."""
    return tl.cumprod(tl.where(rows >= cols + START, x[:, None], 1.0), axis=0)


@triton.jit
def product_grad(dm, x, x_prev, rows, cols, O: tl.constexpr, PREC: tl.constexpr):
    """d x_m of sum_{r, j} dM[r, j] M[r, j] for M[r, j] = prod_{j + O < s <= r} x_s, from
    ``x_prev`` (x one token late). M[r, j] / x_m = E[m, j] F[r, m] with E[m, j] =
    prod_{j + O < s < m} x_s and F[r, m] = prod_{m < s <= r} x_s, so the gradient is
    sum_r F[r, m] (dM E^T)[r, m]; entries of dM outside j + O < r reach nothing."""
    e = tl.where(rows >= cols + O + 1, products(x_prev, rows, cols, O + 2), 0.0)
    f = tl.where(rows >= cols, products(x, rows, cols, 1), 0.0)
    return tl.sum(f * tl.dot(dm, tl.trans(e), input_precision=PREC), axis=0)


@triton.jit
def shift_back(x, rows, cols):
    """y[r] = x[r + 1] (0 at the end): the gradient of a factor read one token late."""
    return tl.sum(tl.where(cols == rows + 1, x[None, :], 0.0), axis=1)


@triton.jit
def unit_lower_inverse(lo, rows, cols, BC: tl.constexpr):
    """(I + L)^-1 for a strictly lower-triangular ``lo`` by forward substitution, a row at a
    time: row r of the inverse is e_r - sum_{j < r} L[r, j] row_j, and the rows j < r are final
    when row r is formed."""
    inv = tl.where(rows == cols, 1.0, 0.0)
    for r in range(1, BC):
        l_r = tl.sum(tl.where(rows == r, lo, 0.0), axis=0)  # L[r, :]
        upd = tl.sum(l_r[:, None] * inv, axis=0)
        inv = tl.where(rows == r, inv - upd[None, :], inv)
    return inv
