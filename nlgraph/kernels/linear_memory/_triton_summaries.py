"""Triton kernels of the linear memory's chunk summaries, forward and backward, and their
launchers (imported only when Triton is). :mod:`._triton_kernels` scans what they produce.

Each chunk n of C tokens is summarised (``_summaries_fwd``, one program per (b*h, chunk), reading
q, k, v ``[B, T, H, D]`` in place) by Qg ``[C, Dk]`` (decayed, scaled queries), A ``[C, C]``
(masked intra-chunk attention), U ``[C, Dv]`` and Wk ``[C, Dk]`` (the solved writes), Kc
``[C, Dk]`` (keys decayed to the chunk end) and gC (the chunk's total decay): the WY/UT form of
:mod:`.chunk`, equal to ``triton._summaries``. The backward is two kernels over the same grid,
``_summaries_bwd_read`` (through A, Qg, Kc, gC) and ``_summaries_bwd_write`` (through U, Wk),
run where ``backward_fits``.

Every block size is a power of two >= 16 (tl.dot's minimum), padded with masked loads (other=0),
so padded rows and columns stay exactly zero.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nlgraph.kernels._triton import interpreted
from nlgraph.kernels._triton_lib import product_grad, products, shift_back, unit_lower_inverse

from ._triton_kernels import _PREC, _pow2


@triton.jit
def _rows(ptr, bi, hi, tok, s_b, s_t, s_h, cols, mask):
    """The rows ``tok`` of batch bi, head hi of a ``[B, T, H, D]`` tensor with any batch, time and
    head strides and a dense feature axis (masked entries read 0), in its own dtype."""
    return tl.load(ptr + bi * s_b + tok[:, None] * s_t + hi * s_h + cols[None, :], mask=mask,
                   other=0.0)  # fmt: skip


@triton.jit
def _decays(al_ptr, g_off, tok, rc, shift, H, T, C):
    """The chunk's decay factors shifted by ``shift`` tokens (a_{r+shift} at row r), 1 outside
    the chunk and past T (padding leaves the state as it is)."""
    t = tok + shift
    keep = (rc + shift >= 0) & (rc + shift < C) & (t < T)
    return tl.load(al_ptr + g_off + t * H, mask=keep, other=1.0).to(tl.float32)


@triton.jit
def _summaries_fwd(
    q_ptr,
    k_ptr,
    v_ptr,
    al_ptr,
    b_ptr,
    c_ptr,
    qg_ptr,
    a_ptr,
    u_ptr,
    wk_ptr,
    kc_ptr,
    gc_ptr,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    sv_b,
    sv_t,
    sv_h,
    T,
    H,
    N,
    C,
    DK,
    DV,
    scale,
    HAS_A: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_C: tl.constexpr,
    READ_AFTER: tl.constexpr,
    LOW_DOT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    bi = bh // H
    hi = bh % H
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    tok = n * C + rc
    mc = rc < C
    mt = mc & (tok < T)  # real tokens: padding reads q = k = v = 0, alpha = 1, b = c = 0
    mk, mv = rk < DK, rv < DV
    row = rc[:, None]
    col = rc[None, :]
    chunk = bh * N + n
    ck_out = chunk * C * DK + row * DK + rk[None, :]
    ck_msk = mc[:, None] & mk[None, :]
    g_off = bi * T * H + hi  # gates are contiguous [B, T, H]

    k_raw = _rows(k_ptr, bi, hi, tok, sk_b, sk_t, sk_h, rk, mt[:, None] & mk[None, :])
    kf = k_raw.to(tl.float32)
    if HAS_A:
        al = _decays(al_ptr, g_off, tok, rc, 0, H, T, C)
        al_prev = _decays(al_ptr, g_off, tok, rc, -1, H, T, C)  # a_{r-1}
        g_cur = tl.cumprod(al, axis=0)  # Gamma_r
        g_prev = tl.cumprod(al_prev, axis=0)  # Gamma_{r-1}
        # Decay from token r to the chunk end: prod_{m > r} a_m.
        p_end = tl.cumprod(_decays(al_ptr, g_off, tok, rc, 1, H, T, C), axis=0, reverse=True)
        tl.store(gc_ptr + chunk, tl.sum(tl.where(rc == BC - 1, g_cur, 0.0), axis=0))
        tl.store(kc_ptr + ck_out, p_end[:, None] * kf, mask=ck_msk)
    else:
        tl.store(kc_ptr + ck_out, kf, mask=ck_msk)

    v = _rows(v_ptr, bi, hi, tok, sv_b, sv_t, sv_h, rv, mt[:, None] & mv[None, :]).to(tl.float32)
    if HAS_C:
        v *= tl.load(c_ptr + g_off + tok * H, mask=mt, other=0.0).to(tl.float32)[:, None]
    if HAS_B:
        bb = tl.load(b_ptr + g_off + tok * H, mask=mt, other=0.0).to(tl.float32)
        # 16-bit keys: their products are exact in fp32, so the tensor cores lose nothing.
        if LOW_DOT:
            gram = tl.dot(k_raw, tl.trans(k_raw))
        else:
            gram = tl.dot(kf, tl.trans(kf), input_precision=PREC)
        if HAS_A:
            gram *= products(al_prev, row, col, 2)  # P[r-1, j] = prod_{j < m < r} a_m
        lo = tl.where(row > col, bb[:, None] * gram, 0.0)
        inv = unit_lower_inverse(lo, row, col, BC)
        u = tl.dot(inv, v, input_precision=PREC)
        if HAS_A:
            bb *= g_prev
        wk = tl.dot(inv, bb[:, None] * kf, input_precision=PREC)
        tl.store(wk_ptr + ck_out, wk, mask=ck_msk)
    else:
        u = v
    tl.store(u_ptr + chunk * C * DV + row * DV + rv[None, :], u, mask=mc[:, None] & mv[None, :])

    q_raw = _rows(q_ptr, bi, hi, tok, sq_b, sq_t, sq_h, rk, mt[:, None] & mk[None, :])
    if LOW_DOT:
        att = tl.dot(q_raw, tl.trans(k_raw)) * scale
    else:
        att = tl.dot(q_raw.to(tl.float32) * scale, tl.trans(kf), input_precision=PREC)
    qf = q_raw.to(tl.float32) * scale
    if READ_AFTER:
        keep = row >= col
        if HAS_A:
            att *= products(al, row, col, 1)  # P[r, j] = prod_{j < m <= r} a_m
            qf *= g_cur[:, None]
    else:
        keep = row > col
        if HAS_A:
            att *= products(al_prev, row, col, 2)
            qf *= g_prev[:, None]
    tl.store(
        a_ptr + chunk * C * C + row * C + col,
        tl.where(keep, att, 0.0),
        mask=mc[:, None] & mc[None, :],
    )
    tl.store(qg_ptr + ck_out, qf, mask=ck_msk)


@triton.jit
def _gram(k_raw, kf, LOW_DOT: tl.constexpr, PREC: tl.constexpr):
    """K K^T: 16-bit keys as they are (exact products, fp32 sums), else fp32 at PREC."""
    if LOW_DOT:
        return tl.dot(k_raw, tl.trans(k_raw))
    return tl.dot(kf, tl.trans(kf), input_precision=PREC)


@triton.jit
def _summaries_bwd_read(
    q_ptr,
    k_ptr,
    al_ptr,
    dqg_ptr,
    da_ptr,
    dkc_ptr,
    dgc_ptr,
    dq_ptr,
    dk_ptr,
    dal_ptr,
    sq_b,
    sq_t,
    sq_h,
    sk_b,
    sk_t,
    sk_h,
    T,
    H,
    N,
    C,
    DK,
    scale,
    HAS_A: tl.constexpr,
    READ_AFTER: tl.constexpr,
    LOW_DOT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    PREC: tl.constexpr,
):
    """Gradients through what the reads use: A, Qg, Kc and gC. Writes dq, and the first parts
    of dk and dalpha (``_summaries_bwd_write`` adds the rest)."""
    bh = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    bi = bh // H
    hi = bh % H
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    tok = n * C + rc
    mc = rc < C
    mt = mc & (tok < T)
    mk = rk < DK
    row = rc[:, None]
    col = rc[None, :]
    chunk = bh * N + n
    ck_in = chunk * C * DK + row * DK + rk[None, :]
    ck_msk = mc[:, None] & mk[None, :]
    tk_msk = mt[:, None] & mk[None, :]
    g_off = bi * T * H + hi
    tk_out = ((bi * T + tok[:, None]) * H + hi) * DK + rk[None, :]

    k_raw = _rows(k_ptr, bi, hi, tok, sk_b, sk_t, sk_h, rk, tk_msk)
    kf = k_raw.to(tl.float32)
    # Kc = P[C, :] K and gC = Gamma_C
    dkc = tl.load(dkc_ptr + ck_in, mask=ck_msk, other=0.0)
    if HAS_A:
        al = _decays(al_ptr, g_off, tok, rc, 0, H, T, C)
        al_prev = _decays(al_ptr, g_off, tok, rc, -1, H, T, C)
        g_cur = tl.cumprod(al, axis=0)
        g_prev = tl.cumprod(al_prev, axis=0)
        p_end = tl.cumprod(_decays(al_ptr, g_off, tok, rc, 1, H, T, C), axis=0, reverse=True)
        dk = p_end[:, None] * dkc
        dp_end = tl.sum(dkc * kf, axis=1)
        # p_end[j] = prod_{j < m} a_m and gC = prod_m a_m: leaving a_m out of each product,
        # p_end[m] prod_{j < s < m} a_s and Gamma_{m-1} p_end[m]
        p_prev = products(al_prev, row, col, 2)
        dal = tl.sum(tl.where(row > col, p_prev, 0.0) * dp_end[None, :], axis=1)
        dal = p_end * (dal + tl.load(dgc_ptr + chunk) * g_prev)
    else:
        dk = dkc

    # A = scale (Q K^T) * P_read, masked; Qg = scale Gamma_read Q
    q_raw = _rows(q_ptr, bi, hi, tok, sq_b, sq_t, sq_h, rk, tk_msk)
    qf = q_raw.to(tl.float32)
    da = tl.load(da_ptr + chunk * C * C + row * C + col, mask=mc[:, None] & mc[None, :], other=0.0)
    da = tl.where(row >= col, da, 0.0) if READ_AFTER else tl.where(row > col, da, 0.0)
    dqg = tl.load(dqg_ptr + ck_in, mask=ck_msk, other=0.0)
    if HAS_A:
        if LOW_DOT:
            dp_read = tl.dot(q_raw, tl.trans(k_raw))
        else:
            dp_read = tl.dot(qf, tl.trans(kf), input_precision=PREC)
        dp_read *= da * scale
        dg_read = scale * tl.sum(dqg * qf, axis=1)
        if READ_AFTER:
            ds = da * products(al, row, col, 1)
            dq = g_cur[:, None] * dqg
        else:
            ds = da * p_prev
            dq = g_prev[:, None] * dqg
    else:
        ds = da
        dq = dqg
    tl.store(dq_ptr + tk_out, scale * (dq + tl.dot(ds, kf, input_precision=PREC)), mask=tk_msk)
    dk += scale * tl.dot(tl.trans(ds), qf, input_precision=PREC)
    tl.store(dk_ptr + tk_out, dk, mask=tk_msk)

    if HAS_A:
        # P_cur and Gamma_r are products of a; P_prev and Gamma_{r-1} of a read one token late
        # (al_prev), whose gradient moves back one row.
        if READ_AFTER:
            dal += product_grad(dp_read, al, al_prev, row, col, 0, PREC)
            f_cur = tl.where(row >= col, products(al, row, col, 1), 0.0)
            dal += tl.sum(dg_read[:, None] * f_cur, axis=0) * g_prev
        else:
            al_prev2 = _decays(al_ptr, g_off, tok, rc, -2, H, T, C)
            dsh = product_grad(dp_read, al_prev, al_prev2, row, col, 1, PREC)
            f_prev = tl.where(row >= col, products(al_prev, row, col, 1), 0.0)
            dsh += tl.sum(dg_read[:, None] * f_prev, axis=0) * tl.cumprod(al_prev2, axis=0)
            dal += shift_back(dsh, row, col)
        tl.store(dal_ptr + g_off + tok * H, dal, mask=mt)


@triton.jit
def _summaries_bwd_write(
    k_ptr,
    v_ptr,
    al_ptr,
    b_ptr,
    c_ptr,
    du_ptr,
    dwk_ptr,
    dk_ptr,
    dv_ptr,
    dal_ptr,
    db_ptr,
    dc_ptr,
    sk_b,
    sk_t,
    sk_h,
    sv_b,
    sv_t,
    sv_h,
    T,
    H,
    N,
    C,
    DK,
    DV,
    HAS_A: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_C: tl.constexpr,
    LOW_DOT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PREC: tl.constexpr,
):
    """Gradients through the writes U and Wk: (I + L) [U | Wk] = [diag(c) V | diag(b Gamma_prev)
    K] with L = b (K K^T * P_prev) strictly lower. Writes dv, db, dc and adds to the dk and
    dalpha of ``_summaries_bwd_read``."""
    bh = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    bi = bh // H
    hi = bh % H
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    tok = n * C + rc
    mc = rc < C
    mt = mc & (tok < T)
    mk, mv = rk < DK, rv < DV
    row = rc[:, None]
    col = rc[None, :]
    chunk = bh * N + n
    tk_msk = mt[:, None] & mk[None, :]
    tv_msk = mt[:, None] & mv[None, :]
    g_off = bi * T * H + hi
    tk_out = ((bi * T + tok[:, None]) * H + hi) * DK + rk[None, :]
    tv_out = ((bi * T + tok[:, None]) * H + hi) * DV + rv[None, :]

    v = _rows(v_ptr, bi, hi, tok, sv_b, sv_t, sv_h, rv, tv_msk).to(tl.float32)
    if HAS_C:
        cc = tl.load(c_ptr + g_off + tok * H, mask=mt, other=0.0).to(tl.float32)
    du = tl.load(
        du_ptr + chunk * C * DV + row * DV + rv[None, :], mask=mc[:, None] & mv[None, :], other=0.0
    )
    if HAS_B:
        k_raw = _rows(k_ptr, bi, hi, tok, sk_b, sk_t, sk_h, rk, tk_msk)
        kf = k_raw.to(tl.float32)
        bb = tl.load(b_ptr + g_off + tok * H, mask=mt, other=0.0).to(tl.float32)
        if HAS_A:
            al_prev = _decays(al_ptr, g_off, tok, rc, -1, H, T, C)
            g_prev = tl.cumprod(al_prev, axis=0)
            bg = bb * g_prev
        else:
            bg = bb
        gg = _gram(k_raw, kf, LOW_DOT, PREC)
        if HAS_A:
            gg *= products(al_prev, row, col, 2)
        inv = unit_lower_inverse(tl.where(row > col, bb[:, None] * gg, 0.0), row, col, BC)
        # X = (I + L)^-1 R: dR = (I + L)^-T dX, and dL = -dR X^T on the strict lower triangle.
        # The Gram matrix and P_prev are formed again after these products rather than kept
        # live through them (registers, not FLOPs, bound this kernel).
        dwk = tl.load(
            dwk_ptr + chunk * C * DK + row * DK + rk[None, :],
            mask=mc[:, None] & mk[None, :],
            other=0.0,
        )
        drw = tl.dot(tl.trans(inv), dwk, input_precision=PREC)
        wk = tl.dot(inv, bg[:, None] * kf, input_precision=PREC)
        dl = tl.dot(drw, tl.trans(wk), input_precision=PREC)
        dru = tl.dot(tl.trans(inv), du, input_precision=PREC)
        u = v * cc[:, None] if HAS_C else v
        dl += tl.dot(dru, tl.trans(tl.dot(inv, u, input_precision=PREC)), input_precision=PREC)
        dl = tl.where(row > col, -dl, 0.0)
        dbg = tl.sum(drw * kf, axis=1)
        dk = bg[:, None] * drw
        gram = _gram(k_raw, kf, LOW_DOT, PREC)
        dgg = bb[:, None] * dl
        if HAS_A:
            p_prev = products(al_prev, row, col, 2)
            db = tl.sum(dl * gram * p_prev, axis=1) + dbg * g_prev
            dp_prev = dgg * gram
            dgg *= p_prev
        else:
            db = tl.sum(dl * gram, axis=1) + dbg
        dk += tl.dot(dgg + tl.trans(dgg), kf, input_precision=PREC)
        dk += tl.load(dk_ptr + tk_out, mask=tk_msk, other=0.0)
        tl.store(dk_ptr + tk_out, dk, mask=tk_msk)
        tl.store(db_ptr + g_off + tok * H, db, mask=mt)
        if HAS_A:
            # P_prev and Gamma_{r-1} are products of a read one token late (al_prev)
            al_prev2 = _decays(al_ptr, g_off, tok, rc, -2, H, T, C)
            dsh = product_grad(dp_prev, al_prev, al_prev2, row, col, 1, PREC)
            f_prev = tl.where(row >= col, products(al_prev, row, col, 1), 0.0)
            dsh += tl.sum((bb * dbg)[:, None] * f_prev, axis=0) * tl.cumprod(al_prev2, axis=0)
            dal = tl.load(dal_ptr + g_off + tok * H, mask=mt, other=0.0)
            tl.store(dal_ptr + g_off + tok * H, dal + shift_back(dsh, row, col), mask=mt)
    else:
        dru = du
    if HAS_C:
        tl.store(dc_ptr + g_off + tok * H, tl.sum(dru * v, axis=1), mask=mt)
        dru *= cc[:, None]
    tl.store(dv_ptr + tv_out, dru, mask=tv_msk)


# --- launchers --------------------------------------------------------------------------------


def backward_fits(C: int, DK: int, DV: int) -> bool:
    """Whether the summaries' backward runs as kernels (else as the recomputed VJP of the batched
    PyTorch form ``triton._summaries``): [C, d] tiles of at most 1024 padded values. From sm_90
    compile figures (compile_sm90.md; no timing behind them): inside the bound the two
    backward kernels spill 0-110 bytes a thread (C x d = 16 x 16, 16 x 64, 32 x 32); past it
    1.7 KB at 32 x 64 and 2.3-3.5 KB at 64 x 64 whatever the warps and product precision (about
    ten [C, C] and [C, d] fp32 tiles live at once, against five in the forward kernel), local-
    memory traffic that would outweigh the fusion."""
    return _pow2(C) * max(_pow2(DK), _pow2(DV)) <= 1024


def _summary_config(BC: int, width: int, low: bool) -> tuple[str, int]:
    """Product precision and warps of the summaries kernels, from sm_90 compile figures
    (compile_sm90.md; no timing behind them). IEEE fp32 ``tl.dot`` runs on the FMA units holding
    whole rows per thread: at C = d = 64 the forward's four C x C x d products spill 12 KB a
    thread (fp32 inputs; 0.5 KB with bf16 q, k). As 3xTF32 (each operand split into two tf32
    parts, three tensor-core products: relative error ~2^-21 a product, against 2^-24) it spills
    20-300 bytes at 4 warps. Tiles up to 32 x 32 compile without spills in IEEE (8 warps at
    32 x 32); 32-token chunks of wider heads spill least in IEEE at 8 warps with 16-bit q, k
    (164 B at d=64) and at 4 with fp32 ones (670 B). The interpreter computes IEEE either way."""
    if BC >= 64:
        return "tf32x3", 4 if width <= 64 else 8
    if BC * width <= 1024:
        return _PREC, 8 if BC * width == 1024 else 4
    return _PREC, 8 if low else 4


def _low_dot(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether 16-bit q and k go to tl.dot as they are (exact products, fp32 sums: the tensor
    cores lose nothing). Triton's interpreter multiplies bfloat16 tiles wrongly, so under it they
    are widened first: the same values, summed in another order."""
    return q.dtype == k.dtype and (
        q.dtype == torch.float16 or (q.dtype == torch.bfloat16 and not interpreted())
    )


def summaries_forward(q, k, v, alpha, b, c, scale: float, read: str, C: int):
    """The chunk summaries ``(qg, a, u, wk, kc, gc)`` that :func:`scan_forward` takes, in fp32,
    from q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]`` (any strides with a unit last one) and the
    gates ``[B, T, H]`` (alpha, b, c; None for absent). wk is ``[0]`` when b is None and gc is
    ``[0]`` when alpha is None.
    """
    B, T, H, DK = k.shape
    DV = v.shape[-1]
    N = triton.cdiv(T, C)
    f32 = torch.float32
    new = lambda *shape: torch.empty(*shape, dtype=f32, device=k.device)
    qg, kc, u, a = (
        new(B * H, N, C, DK),
        new(B * H, N, C, DK),
        new(B * H, N, C, DV),
        new(B * H, N, C, C),
    )
    wk = new(B * H, N, C, DK) if b is not None else new(0)
    gc = new(B * H, N) if alpha is not None else new(0)
    gates = [None if x is None else x.contiguous() for x in (alpha, b, c)]
    BC, BK, BV = _pow2(C), _pow2(DK), _pow2(DV)
    low = _low_dot(q, k)
    prec, warps = _summary_config(BC, max(BK, BV), low)
    _summaries_fwd[(B * H, N)](
        q, k, v, *(k if x is None else x for x in gates),  # absent: never read
        qg, a, u, kc if b is None else wk, kc, kc if alpha is None else gc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), T, H, N, C, DK, DV, scale,
        HAS_A=alpha is not None, HAS_B=b is not None, HAS_C=c is not None,
        READ_AFTER=read == "after", LOW_DOT=low, BC=BC, BK=BK, BV=BV, PREC=prec,
        num_warps=warps,
    )  # fmt: skip
    return qg, a, u, wk, kc, gc


def summaries_backward(q, k, v, alpha, b, c, scale: float, read: str, C: int, grads):
    """Gradients ``(dq, dk, dv, dalpha, db, dc)`` (fp32, dense ``[B, T, H, *]``; None for an
    absent gate) of :func:`summaries_forward` from the cotangents ``grads`` of its six results
    (fp32, contiguous; dwk and dgc are ignored when b and alpha are None). Two launches over
    (batch * head, chunk): the reads' part, then the writes' part, which adds its dk and dalpha
    to the first's (two kernels instead of one: each keeps half the tiles live)."""
    B, T, H, DK = k.shape
    DV = v.shape[-1]
    N = triton.cdiv(T, C)
    dqg, da, du, dwk, dkc, dgc = grads
    new = lambda *shape: torch.empty(*shape, dtype=torch.float32, device=k.device)
    dq, dk, dv = new(B, T, H, DK), new(B, T, H, DK), new(B, T, H, DV)
    gates = [None if x is None else x.contiguous() for x in (alpha, b, c)]
    dal, db, dc = (None if x is None else new(B, T, H) for x in gates)
    al, bb, cc = (k if x is None else x for x in gates)  # absent: never read
    BC, BK, BV = _pow2(C), _pow2(DK), _pow2(DV)
    low = _low_dot(q, k)
    prec, warps = _summary_config(BC, BK, low)
    _summaries_bwd_read[(B * H, N)](
        q, k, al, dqg, da, dkc, dkc if alpha is None else dgc, dq, dk, dq if dal is None else dal,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        T, H, N, C, DK, scale, HAS_A=alpha is not None, READ_AFTER=read == "after",
        LOW_DOT=low, BC=BC, BK=BK, PREC=prec, num_warps=warps,
    )  # fmt: skip
    prec, warps = _summary_config(BC, max(BK, BV), low)
    _summaries_bwd_write[(B * H, N)](
        k, v, al, bb, cc, du, dkc if b is None else dwk, dk, dv,
        *(dq if x is None else x for x in (dal, db, dc)),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        T, H, N, C, DK, DV, HAS_A=alpha is not None, HAS_B=b is not None, HAS_C=c is not None,
        LOW_DOT=low, BC=BC, BK=BK, BV=BV, PREC=prec, num_warps=warps,
    )  # fmt: skip
    return dq, dk, dv, dal, db, dc
