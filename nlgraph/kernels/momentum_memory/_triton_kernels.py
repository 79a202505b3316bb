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

from nlgraph.kernels._triton_lib import product_grad, products, shift_back, unit_lower_inverse

__all__ = ["window_forward", "window_backward"]


@triton.jit
def _retention(a_ptr, g_off, rc, C, H, HAS_A: tl.constexpr, BC: tl.constexpr):
    """The retention gates a_t, a_{t-1} and a_{t+1} (1 outside the window, and all 1 without a
    gate): the shifted ones give the products Ea, ea and pa."""
    if HAS_A:
        a = tl.load(a_ptr + g_off, mask=rc < C, other=1.0).to(tl.float32)
        a_prev = tl.load(a_ptr + g_off - H, mask=(rc >= 1) & (rc <= C), other=1.0).to(tl.float32)
        a_next = tl.load(a_ptr + g_off + H, mask=rc + 1 < C, other=1.0).to(tl.float32)
    else:
        a = tl.full([BC], 1.0, tl.float32)
        a_prev = a
        a_next = a
    return a, a_prev, a_next


@triton.jit
def _gate_products(mu, a, a_prev, a_next, rc, rows, cols, mc, BC: tl.constexpr):
    """The window's gate products (module docstring): momentum products Pm (lower, unit
    diagonal) and gm, whose last rows give S_C; retention products shifted to the state before
    each token (Ea, ea) and to the window end (pa), ga; and the Q terms qa, ra (how S_0 and each
    delta_j reach W through later momentum steps)."""
    pm = tl.where(rows >= cols, products(mu, rows, cols, 1), 0.0)
    gm = tl.cumprod(mu, axis=0)
    gm_end = tl.sum(tl.where(rc == BC - 1, gm, 0.0), axis=0)
    pm_end = tl.sum(tl.where(rows == BC - 1, pm, 0.0), axis=0)
    ea_m = tl.where(rows > cols, products(a_prev, rows, cols, 2), 0.0)
    ea = tl.cumprod(a_prev, axis=0)
    pa = tl.where(mc, tl.cumprod(a_next, axis=0, reverse=True), 0.0)
    ga = tl.sum(tl.where(rc == BC - 1, tl.cumprod(a, axis=0), 0.0), axis=0)
    qa = tl.sum(pa[:, None] * pm, axis=0) - pa
    ra = tl.sum(pa * gm, axis=0)
    return pm, gm, gm_end, pm_end, ea_m, ea, pa, ga, qa, ra


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
    a, a_prev, a_next = _retention(a_ptr, g_off, rc, C, H, HAS_A, BC)

    pm, gm, gm_end, pm_end, ea_m, ea, pa, ga, qa, ra = _gate_products(
        mu, a, a_prev, a_next, rc, rows, cols, mc, BC
    )

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


@triton.jit
def _window_bwd(
    x_ptr,
    d_ptr,
    b_ptr,
    a_ptr,
    mu_ptr,
    w0_ptr,
    s0_ptr,
    dw_ptr,
    ds_ptr,
    dx_ptr,
    dd_ptr,
    db_ptr,
    da_ptr,
    dmu_ptr,
    dw0_ptr,
    ds0_ptr,
    B,
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
    """Gradients of one window for one O block: ddelta, dW0, dS0 of its rows whole, dx and
    the gates' gradients as this block's part ([n_O_blocks, ...] buffers, summed by the
    launcher). Recomputes the forward's products, solve and terms (module docstring)."""
    bh = tl.program_id(0).to(tl.int64)
    ob = tl.program_id(1).to(tl.int64)  # offsets into [n_o, ...] partial buffers
    bb = bh // H
    hh = bh % H
    rc = tl.arange(0, BC)
    ri = tl.arange(0, BI)
    ro = ob * BO + tl.arange(0, BO)
    mc, mi, mo = rc < C, ri < DI, ro < DO
    rows = rc[:, None]
    cols = rc[None, :]

    g_off = bb * C * H + hh + rc * H
    ci_off = bb * C * H * DI + hh * DI + rows * (H * DI) + ri[None, :]
    ci_msk = mc[:, None] & mi[None, :]
    co_off = bb * C * H * DO + hh * DO + rows * (H * DO) + ro[None, :]
    co_msk = mc[:, None] & mo[None, :]
    x = tl.load(x_ptr + ci_off, mask=ci_msk, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + co_off, mask=co_msk, other=0.0).to(tl.float32)
    oi_off = bh * DO * DI + ro[:, None] * DI + ri[None, :]
    oi_msk = mo[:, None] & mi[None, :]
    w0 = tl.load(w0_ptr + oi_off, mask=oi_msk, other=0.0).to(tl.float32)
    s0 = tl.load(s0_ptr + oi_off, mask=oi_msk, other=0.0).to(tl.float32)
    dw = tl.load(dw_ptr + oi_off, mask=oi_msk, other=0.0).to(tl.float32)
    ds = tl.load(ds_ptr + oi_off, mask=oi_msk, other=0.0).to(tl.float32)
    mu = tl.load(mu_ptr + g_off, mask=mc, other=1.0).to(tl.float32)
    mu_prev = tl.load(mu_ptr + g_off - H, mask=(rc >= 1) & (rc <= C), other=1.0).to(tl.float32)
    a, a_prev, a_next = _retention(a_ptr, g_off, rc, C, H, HAS_A, BC)

    pm, gm, gm_end, pm_end, ea_m, ea, pa, ga, qa, ra = _gate_products(
        mu, a, a_prev, a_next, rc, rows, cols, mc, BC
    )

    # W_C = ga W0 + ra S0 + Coef^T X,  S_C = gm_end S0 + (diag(pm_end) Delta)^T X
    dcoef = tl.dot(x, tl.trans(dw), input_precision=PREC)  # [C, BO]
    dz = tl.dot(x, tl.trans(ds), input_precision=PREC)
    dw0 = ga * dw
    ds0 = ra * dw + gm_end * ds
    dga = tl.sum(tl.sum(dw * w0, axis=1), axis=0)
    dra = tl.sum(tl.sum(dw * s0, axis=1), axis=0)
    dgm_end = tl.sum(tl.sum(ds * s0, axis=1), axis=0)
    dx = tl.dot(pm_end[:, None] * d, ds, input_precision=PREC)
    dd = pm_end[:, None] * dz
    dpm_end = tl.sum(dz * d, axis=1)
    dqa = tl.sum(dcoef * d, axis=1)
    dd += qa[:, None] * dcoef
    if HAS_B:
        bv = tl.load(b_ptr + g_off, mask=mc, other=0.0).to(tl.float32)
        gram = tl.dot(x, tl.trans(x), input_precision=PREC)
        qe = tl.dot(ea_m, pm, input_precision=PREC) - ea_m
        re = tl.sum(ea_m * gm[None, :], axis=1)
        m1 = tl.dot(x, tl.trans(w0), input_precision=PREC)
        m2 = tl.dot(x, tl.trans(s0), input_precision=PREC)
        qg = qe * gram
        acc = ea[:, None] * m1 + re[:, None] * m2 + tl.dot(qg, d, input_precision=PREC)
        inv = unit_lower_inverse(bv[:, None] * ea_m * gram, rows, cols, BC)
        wt = tl.dot(inv, d - bv[:, None] * acc, input_precision=PREC)
        dx += tl.dot(pa[:, None] * wt + qa[:, None] * d, dw, input_precision=PREC)
        dpa = tl.sum(dcoef * wt, axis=1)
        # (I + L) Wt = R: dR = (I + L)^-T dWt, dL = -dR Wt^T on the strict lower triangle
        dr = tl.dot(tl.trans(inv), pa[:, None] * dcoef, input_precision=PREC)
        dlow = tl.where(rows > cols, -tl.dot(dr, tl.trans(wt), input_precision=PREC), 0.0)
        dd += dr
        # R = Delta - diag(b) (diag(ea) X W0^T + diag(re) X S0^T + (Qe * G) Delta)
        db = -tl.sum(dr * acc, axis=1)
        dacc = -bv[:, None] * dr
        dea = tl.sum(dacc * m1, axis=1)
        dre = tl.sum(dacc * m2, axis=1)
        dm1 = ea[:, None] * dacc
        dm2 = re[:, None] * dacc
        dx += tl.dot(dm1, w0, input_precision=PREC) + tl.dot(dm2, s0, input_precision=PREC)
        dw0 += tl.dot(tl.trans(dm1), x, input_precision=PREC)
        ds0 += tl.dot(tl.trans(dm2), x, input_precision=PREC)
        dqg = tl.where(rows > cols, tl.dot(dacc, tl.trans(d), input_precision=PREC), 0.0)
        dd += tl.dot(tl.trans(qg), dacc, input_precision=PREC)
        # L = diag(b) Ea * G
        db += tl.sum(dlow * ea_m * gram, axis=1)
        dgram = dqg * qe + bv[:, None] * dlow * ea_m
        dx += tl.dot(dgram + tl.trans(dgram), x, input_precision=PREC)
        # Qe = Ea Pm - Ea,  re = Ea gm
        dqe = dqg * gram
        dea_m = bv[:, None] * dlow * gram + tl.dot(dqe, tl.trans(pm), input_precision=PREC)
        dea_m += dre[:, None] * gm[None, :] - dqe
        dpm = tl.dot(tl.trans(ea_m), dqe, input_precision=PREC)
        dgm = tl.sum(ea_m * dre[:, None], axis=0)
        tl.store(db_ptr + ob * B * C * H + g_off, db, mask=mc)
    else:
        dx += tl.dot((pa + qa)[:, None] * d, dw, input_precision=PREC)
        dd += pa[:, None] * dcoef
        dpa = dqa
        dpm = tl.zeros([BC, BC], dtype=tl.float32)
        dgm = tl.zeros([BC], dtype=tl.float32)
    # qa = pa Pm - pa,  ra = pa . gm,  and the last rows of Pm and gm
    dpa += tl.sum(pm * dqa[None, :], axis=1) - dqa + dra * gm
    dpm += pa[:, None] * dqa[None, :] + tl.where(rows == BC - 1, dpm_end[None, :], 0.0)
    dgm += dra * pa + tl.where(rc == BC - 1, dgm_end, 0.0)

    # Momentum gates: Pm and gm are products of mu (gm with mu_prev: prod_{r < m} mu_r).
    dmu = product_grad(dpm, mu, mu_prev, rows, cols, 0, PREC)
    dmu += tl.sum(dgm[:, None] * pm, axis=0) * tl.cumprod(mu_prev, axis=0)
    tl.store(dmu_ptr + ob * B * C * H + g_off, dmu, mask=mc)
    if HAS_A:
        # pa[j] = prod_{j < r < C} a_r and ga = prod_r a_r, leaving a_m out of each product
        da = pa * (tl.sum(ea_m * dpa[None, :], axis=1) + dga * ea)
        if HAS_B:
            # Ea and ea are products of a read one token late (a_prev): their gradient moves
            # back one row.
            a_prev2 = tl.load(a_ptr + g_off - 2 * H, mask=(rc >= 2) & (rc <= C + 1), other=1.0)
            a_prev2 = a_prev2.to(tl.float32)
            dsh = product_grad(dea_m, a_prev, a_prev2, rows, cols, 1, PREC)
            f_prev = tl.where(rows >= cols, products(a_prev, rows, cols, 1), 0.0)
            dsh += tl.sum(dea[:, None] * f_prev, axis=0) * tl.cumprod(a_prev2, axis=0)
            da += shift_back(dsh, rows, cols)
        tl.store(da_ptr + ob * B * C * H + g_off, da, mask=mc)

    tl.store(dx_ptr + ob * B * C * H * DI + ci_off, dx, mask=ci_msk)
    tl.store(dd_ptr + co_off, dd, mask=co_msk)
    tl.store(dw0_ptr + oi_off, dw0, mask=oi_msk)
    tl.store(ds0_ptr + oi_off, ds0, mask=oi_msk)


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


def backward_fits(C: int, DI: int) -> bool:
    """Whether a window's backward runs as the kernel (else as the recomputed VJP of the chunk
    form): windows of at most 16 tokens and keys of at most 64 features. From sm_90 compile
    figures (compile_sm90.md; no timing behind them): inside the bound the kernel keeps 214
    registers and no spill at 8 warps; keys of 128 spill 170-200 bytes a thread, windows of 32 or
    64 tokens 5-31 KB (about a dozen [C, C] matrices live at once, against four in the
    forward)."""
    return _pow2(C) <= 16 and _pow2(DI) <= 64


def window_backward(x, delta, b, a, mu, w0, s0, dw, ds):
    """Gradients ``(dx, ddelta, db, da, dmu, dw0, ds0)`` of :func:`window_forward` from the
    cotangents dw, ds of (W_C, S_C), in fp32 (db / da None when b / a are None); inputs as
    :func:`window_forward`, cotangents contiguous ``[B, H, O, I]``. One program per (batch,
    head, O block) as the forward; the parts of dx and the gates' gradients that each O block
    contributes are summed here."""
    B, C, H, DI = x.shape
    DO = delta.shape[-1]
    BI = _pow2(DI)
    # W0, S0, dW, dS and their gradients live at once as [BO, BI] slabs: 16 rows each at 8 warps
    # compile for sm_90 without spills inside backward_fits (32 rows spill 44-200 bytes).
    BO = 16
    n_o = triton.cdiv(DO, BO)
    f32 = torch.float32
    new = lambda *shape: torch.empty(*shape, dtype=f32, device=x.device)
    dx = new(n_o, B, C, H, DI)
    dd = new(B, C, H, DO)
    db = new(n_o, B, C, H) if b is not None else None
    da = new(n_o, B, C, H) if a is not None else None
    dmu = new(n_o, B, C, H)
    dw0, ds0 = new(B, H, DO, DI), new(B, H, DO, DI)
    _window_bwd[(B * H, n_o)](
        x, delta, mu if b is None else b, mu if a is None else a, mu, w0, s0, dw, ds,
        dx, dd, dmu if db is None else db, dmu if da is None else da, dmu, dw0, ds0,
        B, C, H, DI, DO, HAS_B=b is not None, HAS_A=a is not None, BC=_pow2(C), BI=BI, BO=BO,
        PREC=_PREC, num_warps=8,
    )  # fmt: skip
    # one block (O <= 16, tiny Hope's memories) needs no sum: its part is the whole
    total = lambda t: None if t is None else t[0] if n_o == 1 else t.sum(0)
    return total(dx), dd, total(db), total(da), total(dmu), dw0, ds0
