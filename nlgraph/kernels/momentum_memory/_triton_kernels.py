"""Triton kernel of the momentum memory's window (imported only when Triton is).

One program per (batch, head, O block) does a whole window in registers, in the closed form of
:func:`~nlgraph.kernels.momentum_memory.chunk.momentum_memory_chunk`, indexed by token
t, j = 0..C-1 (the chunk form's index t+1) so that no row or column stands for the window
start and the C x C blocks stay C wide:

    Pm[t, j] = prod_{j < r <= t} mu_r   (j <= t)     gm[t] = prod_{r <= t} mu_r
    Ea[t, j] = prod_{j < r < t} a_r     (j < t)      ea[t] = prod_{r < t} a_r
    pa[j]    = prod_{j < r < C} a_r                  (weight of token j in W_C)
    Qe = Ea Pm - Ea,   re = Ea gm,   qa = pa Pm - pa,   ra = pa . gm
    G = X X^T,   L = tril_-1(diag(b) Ea * G)
    R = Delta - diag(b) (diag(ea) X W0^T + diag(re) X S0^T + (Qe * G) Delta)
    (I + L) Wt = R                                    (forward substitution over the C rows)
    W_C = ga W0 + ra S0 + (diag(pa) Wt + diag(qa) Delta)^T X,   ga = prod_r a_r
    S_C = gm[C-1] S0 + (diag(Pm[C-1, :]) Delta)^T X

Every product is a cumulative product of gates (tl.cumprod), never a ratio, so a gate of exactly
0 is exact. A row o of W, S, Delta and Wt depends on no other row (L and the gate products are
shared), so the O axis splits across programs with no communication; C and I stay whole.
Padded tokens have x = delta = 0, b = 0 and a = mu = 1, which leaves W and S unchanged, so
padding to a power of two changes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["window_forward"]


@triton.jit
def _window_fwd(
    x_ptr,
    d_ptr,
    b_ptr,
    a_ptr,
    mu_ptr,
    w0_ptr,
    s0_ptr,
    w_ptr,
    s_ptr,
    C,
    H,
    DI,
    DO,
    HAS_B: tl.constexpr,
    HAS_A: tl.constexpr,
    BC: tl.constexpr,
    BI: tl.constexpr,
    BO: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    bb = bh // H
    hh = bh % H
    rc = tl.arange(0, BC)
    ri = tl.arange(0, BI)
    ro = tl.program_id(1) * BO + tl.arange(0, BO)
    mc, mi, mo = rc < C, ri < DI, ro < DO
    rows = rc[:, None]
    cols = rc[None, :]

    # x [B, C, H, I], delta [B, C, H, O], gates [B, C, H], w0/s0 [B, H, O, I], all contiguous
    g_off = bb * C * H + hh + rc * H
    x = tl.load(
        x_ptr + bb * C * H * DI + hh * DI + rows * (H * DI) + ri[None, :],
        mask=mc[:, None] & mi[None, :],
        other=0.0,
    ).to(tl.float32)
    d = tl.load(
        d_ptr + bb * C * H * DO + hh * DO + rows * (H * DO) + ro[None, :],
        mask=mc[:, None] & mo[None, :],
        other=0.0,
    ).to(tl.float32)
    oi_off = bh * DO * DI + ro[:, None] * DI + ri[None, :]
    oi_msk = mo[:, None] & mi[None, :]
    w0 = tl.load(w0_ptr + oi_off, mask=oi_msk, other=0.0).to(tl.float32)
    s0 = tl.load(s0_ptr + oi_off, mask=oi_msk, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + g_off, mask=mc, other=1.0).to(tl.float32)
    if HAS_A:
        a = tl.load(a_ptr + g_off, mask=mc, other=1.0).to(tl.float32)
        # a_{t-1} and a_{t+1} (1 outside the window): the shifted products Ea, ea, pa
        a_prev = tl.load(a_ptr + g_off - H, mask=(rc >= 1) & (rc <= C), other=1.0).to(tl.float32)
        a_next = tl.load(a_ptr + g_off + H, mask=rc + 1 < C, other=1.0).to(tl.float32)
    else:
        a = tl.full([BC], 1.0, tl.float32)
        a_prev = a
        a_next = a

    # Momentum products: Pm (lower, unit diagonal) and gm; their last rows give S_C.
    pm = tl.cumprod(tl.where(rows > cols, mu[:, None], 1.0), axis=0)
    pm = tl.where(rows >= cols, pm, 0.0)
    gm = tl.cumprod(mu, axis=0)
    gm_end = tl.sum(tl.where(rc == BC - 1, gm, 0.0), axis=0)
    pm_end = tl.sum(tl.where(rows == BC - 1, pm, 0.0), axis=0)

    # Retention products, shifted to the state before each token (Ea, ea) and to the end (pa).
    ea_m = tl.cumprod(tl.where(rows > cols + 1, a_prev[:, None], 1.0), axis=0)
    ea_m = tl.where(rows > cols, ea_m, 0.0)
    ea = tl.cumprod(a_prev, axis=0)
    pa = tl.where(mc, tl.cumprod(a_next, axis=0, reverse=True), 0.0)
    ga = tl.sum(tl.where(rc == BC - 1, tl.cumprod(a, axis=0), 0.0), axis=0)
    # Q terms: how S_0 and each delta_j reach W through later momentum steps.
    qa = tl.sum(pa[:, None] * pm, axis=0) - pa
    ra = tl.sum(pa * gm, axis=0)

    if HAS_B:
        bv = tl.load(b_ptr + g_off, mask=mc, other=0.0).to(tl.float32)
        gram = tl.dot(x, tl.trans(x), input_precision=PREC)
        qe = tl.dot(ea_m, pm, input_precision=PREC) - ea_m
        re = tl.sum(ea_m * gm[None, :], axis=1)
        low = bv[:, None] * ea_m * gram  # strictly lower: ea_m is
        acc = ea[:, None] * tl.dot(x, tl.trans(w0), input_precision=PREC)
        acc += re[:, None] * tl.dot(x, tl.trans(s0), input_precision=PREC)
        acc += tl.dot(qe * gram, d, input_precision=PREC)
        wt = d - bv[:, None] * acc
        # (I + L) Wt = R by forward substitution: rows j < t are final when row t is solved.
        for t in range(1, C):
            l_row = tl.sum(tl.where(rows == t, low, 0.0), axis=0)
            upd = tl.sum(l_row[:, None] * wt, axis=0)
            wt = tl.where(rows == t, wt - upd[None, :], wt)
        coef = pa[:, None] * wt + qa[:, None] * d
    else:
        coef = (pa + qa)[:, None] * d

    w_new = ga * w0 + ra * s0 + tl.dot(tl.trans(coef), x, input_precision=PREC)
    s_new = gm_end * s0 + tl.dot(tl.trans(pm_end[:, None] * d), x, input_precision=PREC)
    tl.store(w_ptr + oi_off, w_new, mask=oi_msk)
    tl.store(s_ptr + oi_off, s_new, mask=oi_msk)


_PREC = "ieee"  # full fp32 products: tf32 would break the 1e-5 agreement with the token loop


def _pow2(n: int, cap: int | None = None) -> int:
    """Block size for an axis of length n: a power of two, at least 16 (tl.dot), at most cap."""
    p = max(16, triton.next_power_of_2(n))
    return p if cap is None else max(16, min(p, cap))


def window_forward(x, delta, b, a, mu, w0, s0):
    """``(W_C, S_C)`` of one window (module docstring); contiguous inputs of one dtype, x
    ``[B, C, H, I]``, delta ``[B, C, H, O]``, b/a/mu ``[B, C, H]`` (b, a may be None), w0/s0
    ``[B, H, O, I]``. Computes in fp32 and returns in the inputs' dtype."""
    B, C, H, DI = x.shape
    DO = delta.shape[-1]
    # fp32 results, rounded to the input dtype by torch: Triton's interpreter truncates
    # fp32 -> bf16 where the compiled kernel rounds to nearest, and the two must agree.
    w = torch.empty_like(w0, dtype=torch.float32)
    s = torch.empty_like(s0, dtype=torch.float32)
    BI = _pow2(DI)
    # W0, S0 and the result slabs [BO, BI] live in registers with X [BC, BI]: each slab is kept
    # <= 8192 fp32 values. Compiled for sm_90 (benchmarks/results/compile_sm90.md) the tiny
    # Hope's windows (32 x 64) use 200-247 registers without spills; 64 x 64 reaches 255
    # registers and spills 136 bytes a thread.
    BO = _pow2(DO, cap=min(64, 8192 // BI))
    grid = (B * H, triton.cdiv(DO, BO))
    # An absent gate is never read (its flag is a constexpr False); mu stands in for it.
    _window_fwd[grid](
        x,
        delta,
        mu if b is None else b,
        mu if a is None else a,
        mu,
        w0,
        s0,
        w,
        s,
        C,
        H,
        DI,
        DO,
        HAS_B=b is not None,
        HAS_A=a is not None,
        BC=_pow2(C),
        BI=BI,
        BO=BO,
        PREC=_PREC,
    )
    return w.to(w0.dtype), s.to(s0.dtype)
