"""Triton kernels of the linear memory's scan across chunks, and their launchers (imported only
when Triton is). The chunk summaries they scan come from :mod:`._triton_summaries`.

Each chunk n of C tokens is summarised (``_triton_summaries._summaries_fwd``) by Qg ``[C, Dk]``
(decayed, scaled queries), A ``[C, C]`` (masked intra-chunk attention), U ``[C, Dv]`` and Wk
``[C, Dk]`` (the solved writes), Kc ``[C, Dk]`` (keys decayed to the chunk end) and gC (the
chunk's total decay). Given the state S_n at its start:

    W_n     = U_n - Wk_n S_n^T                           (the chunk's effective writes)
    O_n     = Qg_n S_n^T + A_n W_n                       (outputs)
    S_{n+1} = gC_n S_n + W_n^T Kc_n                      (state carried to the next chunk)

Backward, with dO_n and dS_{n+1} (the cotangent of S_{n+1}, dS_N from the final state):

    dW_n = A_n^T dO_n + Kc_n dS_{n+1}^T
    dS_n = gC_n dS_{n+1} + dO_n^T Qg_n - dW_n^T Wk_n     (the reverse recurrence)
    dQg_n = dO_n S_n,  dA_n = dO_n W_n^T,  dU_n = dW_n,  dWk_n = -dW_n S_n,
    dKc_n = W_n dS_{n+1},  dgC_n = <dS_{n+1}, S_n>

Kernels of the scan, all on contiguous fp32 tensors laid out ``[B*H, N, C, D]`` /
``[B*H, N, Dv, Dk]``:

- ``_state_fwd``: grid (B*H, Dv blocks); walks the chunks in order holding a ``[BV, Dk]`` slab
  of S in registers, stores S_n and W_n. The only sequential forward work.
- ``_output_fwd``: grid (B*H*N, Dv blocks); O_n from S_n and W_n, parallel over chunks.
- ``_state_bwd``: grid (B*H, Dv blocks); walks the chunks backwards holding a slab of dS, stores
  dS_{n+1} and dW_n. The only sequential backward work.
- ``_chunk_grads``: grid (B*H*N, Dk blocks); dQg, dWk, dKc, dA and partial dgC, parallel over
  chunks.

A row v of S (or dS) depends only on column v of W, dW, U and dO, so the Dv axis splits across
programs with no communication; the Dk axis must be whole in the two recurrences (W sums over it).
Every block size is a power of two >= 16 (tl.dot's minimum), padded with masked loads (other=0),
so padded rows and columns stay exactly zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _state_fwd(
    u_ptr,
    wk_ptr,
    kc_ptr,
    gc_ptr,
    s0_ptr,
    s_all_ptr,
    w_ptr,
    s_end_ptr,
    N,
    C,
    DK,
    DV,
    HAS_WK: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_S0: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = tl.program_id(1) * BV + tl.arange(0, BV)
    mc, mk, mv = rc < C, rk < DK, rv < DV
    s_off = rv[:, None] * DK + rk[None, :]
    s_msk = mv[:, None] & mk[None, :]
    cv_off = rc[:, None] * DV + rv[None, :]
    cv_msk = mc[:, None] & mv[None, :]
    ck_off = rc[:, None] * DK + rk[None, :]
    ck_msk = mc[:, None] & mk[None, :]

    if HAS_S0:
        s = tl.load(s0_ptr + bh * DV * DK + s_off, mask=s_msk, other=0.0)
    else:
        s = tl.zeros([BV, BK], dtype=tl.float32)
    for n in range(N):
        chunk = bh * N + n
        tl.store(s_all_ptr + chunk * DV * DK + s_off, s, mask=s_msk)
        w = tl.load(u_ptr + chunk * C * DV + cv_off, mask=cv_msk, other=0.0)
        if HAS_WK:
            wk = tl.load(wk_ptr + chunk * C * DK + ck_off, mask=ck_msk, other=0.0)
            w -= tl.dot(wk, tl.trans(s), input_precision=PREC)
        tl.store(w_ptr + chunk * C * DV + cv_off, w, mask=cv_msk)
        kc = tl.load(kc_ptr + chunk * C * DK + ck_off, mask=ck_msk, other=0.0)
        if HAS_G:
            s *= tl.load(gc_ptr + chunk)
        s += tl.dot(tl.trans(w), kc, input_precision=PREC)
    tl.store(s_end_ptr + bh * DV * DK + s_off, s, mask=s_msk)


@triton.jit
def _output_fwd(
    qg_ptr,
    a_ptr,
    w_ptr,
    s_all_ptr,
    o_ptr,
    C,
    DK,
    DV,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = tl.program_id(1) * BV + tl.arange(0, BV)
    mc, mk, mv = rc < C, rk < DK, rv < DV
    cv_off = chunk * C * DV + rc[:, None] * DV + rv[None, :]
    cv_msk = mc[:, None] & mv[None, :]

    qg = tl.load(
        qg_ptr + chunk * C * DK + rc[:, None] * DK + rk[None, :],
        mask=mc[:, None] & mk[None, :],
        other=0.0,
    )
    s = tl.load(
        s_all_ptr + chunk * DV * DK + rv[:, None] * DK + rk[None, :],
        mask=mv[:, None] & mk[None, :],
        other=0.0,
    )
    a = tl.load(
        a_ptr + chunk * C * C + rc[:, None] * C + rc[None, :],
        mask=mc[:, None] & mc[None, :],
        other=0.0,
    )
    w = tl.load(w_ptr + cv_off, mask=cv_msk, other=0.0)
    o = tl.dot(qg, tl.trans(s), input_precision=PREC)
    o += tl.dot(a, w, input_precision=PREC)
    tl.store(o_ptr + cv_off, o, mask=cv_msk)


@triton.jit
def _state_bwd(
    do_ptr,
    a_ptr,
    qg_ptr,
    wk_ptr,
    kc_ptr,
    gc_ptr,
    ds_last_ptr,
    ds_end_ptr,
    dw_ptr,
    ds0_ptr,
    N,
    C,
    DK,
    DV,
    HAS_WK: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_DS_LAST: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = tl.program_id(1) * BV + tl.arange(0, BV)
    mc, mk, mv = rc < C, rk < DK, rv < DV
    s_off = rv[:, None] * DK + rk[None, :]
    s_msk = mv[:, None] & mk[None, :]
    cv_off = rc[:, None] * DV + rv[None, :]
    cv_msk = mc[:, None] & mv[None, :]
    ck_off = rc[:, None] * DK + rk[None, :]
    ck_msk = mc[:, None] & mk[None, :]
    cc_off = rc[:, None] * C + rc[None, :]
    cc_msk = mc[:, None] & mc[None, :]

    if HAS_DS_LAST:
        ds = tl.load(ds_last_ptr + bh * DV * DK + s_off, mask=s_msk, other=0.0)
    else:
        ds = tl.zeros([BV, BK], dtype=tl.float32)
    for i in range(N):
        chunk = bh * N + (N - 1 - i)
        # ds is the cotangent of the state at the end of this chunk, dS_{n+1}.
        tl.store(ds_end_ptr + chunk * DV * DK + s_off, ds, mask=s_msk)
        do = tl.load(do_ptr + chunk * C * DV + cv_off, mask=cv_msk, other=0.0)
        a = tl.load(a_ptr + chunk * C * C + cc_off, mask=cc_msk, other=0.0)
        kc = tl.load(kc_ptr + chunk * C * DK + ck_off, mask=ck_msk, other=0.0)
        dw = tl.dot(tl.trans(a), do, input_precision=PREC)
        dw += tl.dot(kc, tl.trans(ds), input_precision=PREC)
        tl.store(dw_ptr + chunk * C * DV + cv_off, dw, mask=cv_msk)
        qg = tl.load(qg_ptr + chunk * C * DK + ck_off, mask=ck_msk, other=0.0)
        step = tl.dot(tl.trans(do), qg, input_precision=PREC)
        if HAS_WK:
            wk = tl.load(wk_ptr + chunk * C * DK + ck_off, mask=ck_msk, other=0.0)
            step -= tl.dot(tl.trans(dw), wk, input_precision=PREC)
        if HAS_G:
            ds *= tl.load(gc_ptr + chunk)
        ds += step
    tl.store(ds0_ptr + bh * DV * DK + s_off, ds, mask=s_msk)


@triton.jit
def _chunk_grads(
    do_ptr,
    w_ptr,
    dw_ptr,
    s_all_ptr,
    ds_end_ptr,
    dqg_ptr,
    dwk_ptr,
    dkc_ptr,
    da_ptr,
    dgc_part_ptr,
    C,
    DK,
    DV,
    HAS_WK: tl.constexpr,
    HAS_G: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    rc = tl.arange(0, BC)
    rk = kb * BK + tl.arange(0, BK)
    rv = tl.arange(0, BV)  # whole Dv: every result here sums over it
    mc, mk, mv = rc < C, rk < DK, rv < DV
    s_off = chunk * DV * DK + rv[:, None] * DK + rk[None, :]
    s_msk = mv[:, None] & mk[None, :]
    cv_off = chunk * C * DV + rc[:, None] * DV + rv[None, :]
    cv_msk = mc[:, None] & mv[None, :]
    ck_off = chunk * C * DK + rc[:, None] * DK + rk[None, :]
    ck_msk = mc[:, None] & mk[None, :]

    s = tl.load(s_all_ptr + s_off, mask=s_msk, other=0.0)
    ds = tl.load(ds_end_ptr + s_off, mask=s_msk, other=0.0)
    do = tl.load(do_ptr + cv_off, mask=cv_msk, other=0.0)
    w = tl.load(w_ptr + cv_off, mask=cv_msk, other=0.0)
    tl.store(dqg_ptr + ck_off, tl.dot(do, s, input_precision=PREC), mask=ck_msk)
    tl.store(dkc_ptr + ck_off, tl.dot(w, ds, input_precision=PREC), mask=ck_msk)
    if HAS_WK:
        dw = tl.load(dw_ptr + cv_off, mask=cv_msk, other=0.0)
        tl.store(dwk_ptr + ck_off, -tl.dot(dw, s, input_precision=PREC), mask=ck_msk)
    if HAS_G:
        # one partial sum per Dk block; the caller adds them (no atomics, deterministic).
        tl.store(dgc_part_ptr + chunk * tl.num_programs(1) + kb, tl.sum(tl.sum(ds * s, 1), 0))
    if kb == 0:
        da = tl.dot(do, tl.trans(w), input_precision=PREC)
        tl.store(
            da_ptr + chunk * C * C + rc[:, None] * C + rc[None, :],
            da,
            mask=mc[:, None] & mc[None, :],
        )


# --- launchers --------------------------------------------------------------------------------

_PREC = "ieee"  # full fp32 products: tf32 (10-bit mantissa) would break the 1e-4 agreement


def _pow2(n: int, cap: int | None = None) -> int:
    """Block size for an axis of length n: a power of two, at least 16 (tl.dot), at most cap."""
    p = max(16, triton.next_power_of_2(n))
    return p if cap is None else max(16, min(p, cap))


def _recurrence_blocks(C: int, DK: int, DV: int) -> tuple[int, int, int]:
    # A [BV, BK] fp32 slab of S lives in registers for the whole walk, beside [BC, BK] and
    # [BC, BV] chunk tiles. Compiled for sm_90 (benchmarks/results/compile_sm90.md), slabs of
    # 64 x 64 at 4 warps spilled 6-18 KB a thread; slabs of at most 1024 values with 8 warps
    # for 64-token chunks spill at most a few bytes.
    BK = _pow2(DK)
    return _pow2(C), BK, _pow2(DV, cap=max(16, 1024 // BK))


def _warps(BC: int, width: int) -> int:
    """Warps for a program holding [BC, width] tiles: 8 from 64 x 32 on (fewer registers a
    thread for the same tiles), else 4."""
    return 8 if BC * width >= 2048 else 4


def scan_forward(qg, a, u, wk, kc, gc, s0):
    """Forward of the inter-chunk scan (module docstring). Inputs contiguous fp32,
    qg/kc/wk ``[BH, N, C, Dk]``, a ``[BH, N, C, C]``, u ``[BH, N, C, Dv]``, gc ``[BH, N]``,
    s0 ``[BH, Dv, Dk]``; wk, gc, s0 may be None (Wk = 0, gC = 1, S_0 = 0).

    Returns ``(o [BH, N, C, Dv], s_end [BH, Dv, Dk], s_all [BH, N, Dv, Dk], w [BH, N, C, Dv])``;
    s_all (the chunk-start states) and w are what backward needs.
    """
    BH, N, C, DK = kc.shape
    DV = u.shape[-1]
    s_all = u.new_empty(BH, N, DV, DK)
    w = torch.empty_like(u)
    o = torch.empty_like(u)
    s_end = u.new_empty(BH, DV, DK)
    BC, BK, BV = _recurrence_blocks(C, DK, DV)
    nv = triton.cdiv(DV, BV)
    # Absent optional tensors are never read (their flag is a constexpr False); any pointer
    # stands in for them.
    _state_fwd[(BH, nv)](
        u,
        u if wk is None else wk,
        kc,
        kc if gc is None else gc,
        u if s0 is None else s0,
        s_all,
        w,
        s_end,
        N,
        C,
        DK,
        DV,
        HAS_WK=wk is not None,
        HAS_G=gc is not None,
        HAS_S0=s0 is not None,
        BC=BC,
        BK=BK,
        BV=BV,
        PREC=_PREC,
        num_warps=_warps(BC, BK),
    )
    # The output pass holds no slab across chunks: [BV, BK] tiles of 32 x 64 compile without
    # spills (compile_sm90.md), so it takes wider Dv blocks than the walk.
    BVo = _pow2(DV, cap=max(16, 2048 // BK))
    _output_fwd[(BH * N, triton.cdiv(DV, BVo))](
        qg, a, w, s_all, o, C, DK, DV, BC=BC, BK=BK, BV=BVo, PREC=_PREC,
        num_warps=_warps(BC, BK),
    )  # fmt: skip
    return o, s_end, s_all, w


def scan_backward(qg, a, wk, kc, gc, s_all, w, do, ds_last):
    """Backward of :func:`scan_forward` from the cotangents do ``[BH, N, C, Dv]`` and ds_last
    ``[BH, Dv, Dk]`` (None: zero).

    Returns ``(dqg, da, du, dwk, dkc, dgc, ds0)`` with the shapes of the forward inputs; dwk is
    ``[0]`` when wk is None and dgc is ``[0]`` when gc is None.
    """
    BH, N, C, DK = kc.shape
    DV = w.shape[-1]
    ds_end = s_all.new_empty(BH, N, DV, DK)
    dw = torch.empty_like(w)
    ds0 = s_all.new_empty(BH, DV, DK)
    BC, BK, BV = _recurrence_blocks(C, DK, DV)
    _state_bwd[(BH, triton.cdiv(DV, BV))](
        do,
        a,
        qg,
        kc if wk is None else wk,
        kc,
        kc if gc is None else gc,
        ds0 if ds_last is None else ds_last,
        ds_end,
        dw,
        ds0,
        N,
        C,
        DK,
        DV,
        HAS_WK=wk is not None,
        HAS_G=gc is not None,
        HAS_DS_LAST=ds_last is not None,
        BC=BC,
        BK=BK,
        BV=BV,
        PREC=_PREC,
        num_warps=_warps(BC, BK),
    )
    # The parallel pass needs all of Dv per program (it sums over it) and splits Dk instead,
    # in blocks small enough not to spill (compile_sm90.md: BK=16 at Dv=64).
    BVf = _pow2(DV)
    BKs = _pow2(DK, cap=max(16, 1024 // BVf))
    nk = triton.cdiv(DK, BKs)
    dqg = torch.empty_like(kc)
    dkc = torch.empty_like(kc)
    dwk = torch.empty_like(kc) if wk is not None else kc.new_empty(0)
    da = torch.empty_like(a)
    dgc_part = kc.new_empty(BH, N, nk) if gc is not None else kc.new_empty(0)
    _chunk_grads[(BH * N, nk)](
        do,
        w,
        dw,
        s_all,
        ds_end,
        dqg,
        dqg if wk is None else dwk,
        dkc,
        da,
        dqg if gc is None else dgc_part,
        C,
        DK,
        DV,
        HAS_WK=wk is not None,
        HAS_G=gc is not None,
        BC=BC,
        BK=BKs,
        BV=BVf,
        PREC=_PREC,
        num_warps=_warps(BC, 2 * BVf),  # its [BC, BV] tiles are many: 8 warps from 32 x 32
    )
    dgc = dgc_part.sum(-1) if gc is not None else dgc_part
    return dqg, da, dw, dwk, dkc, dgc, ds0
