"""Triton kernel of the deep memory's forward pass (imported only when Triton is).

One program per (batch, head) runs the whole sequence: the fast weights M and momentum S of every
layer stay in registers across the loop over chunks, and each chunk of n tokens (padded to BC, a
power of two) is, in the closed form of :mod:`.chunk` (index j = 0..n-1, the state after token j):

    forward of the keys at the chunk-start weights A (= M_0 except for a partial first chunk):
        z = K A2^T, x1 = s(z), out = [K +] x1 A1^T        (depth 1: x1 = K)
    output error and backprop (Titans' u_l = g_l x_l^T per layer, never materialised):
        g1 = 2 (out - V)  ("l2")  or  -V  ("dot"),    g2 = s'(z) * (g1 A1)
    gate products by cumulative products (tl.cumprod), exact for gates of 0:
        D[j, l] = prod_{l<m<=j} eta_m,  F[j, l] = prod_{l<m<=j} (1 - alpha_m),
        e_j = prod_{m<=j} eta_m,  f_j = prod_{m<=j} (1 - alpha_m),  c_j = sum_i F[j, i] e_i,
        mem[j, l] = (F D)[j, l] theta_l
    state update (rank-n products, one tl.dot per matrix):
        M_n = f M_0 + c S_0 - (diag(mem[n-1, :]) G)^T X
        S_n = e S_0 - (diag(D[n-1, :] theta) G)^T X
    read-out, "after" (dual form, layer by layer with h = Q, then s(z), as ``_read_dual``):
        z = diag(f) h M_0^T + diag(c) h S_0^T - ((h X^T) * mem) G
    or "chunk_start": y = M_A(Q), the MLP at A.

The coefficients are computed in-kernel from the gates (nothing is precomputed on the host); the
"end of chunk" rows are taken at row n-1, so padded tokens (theta = 0, g = 0) never enter them.
Without momentum eta = 0 (D = I, e = c = 0); without forgetting F is the lower triangle of ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["ACT_CODES", "block", "state_size", "sequence_forward"]

ACT_CODES = {"silu": 0, "gelu": 1, "relu": 2, "identity": 3}
_PREC = "ieee"  # full fp32 products: tf32 would break the 1e-4 agreement with the token loop


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:
        return z * tl.sigmoid(z)
    elif ACT == 1:  # exact (erf) gelu, as torch's default
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        return tl.maximum(z, 0.0)
    else:
        return z


@triton.jit
def _act_grad(g, z, ACT: tl.constexpr):
    """g * s'(z); relu'(0) = 0 as autograd has it."""
    if ACT == 0:
        s = tl.sigmoid(z)
        return g * (s * (1.0 + z * (1.0 - s)))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * z * z)
        return g * (cdf + z * pdf)
    elif ACT == 2:
        return tl.where(z > 0.0, g, 0.0)
    else:
        return g


@triton.jit
def _mat(bh, DO, DI, BO: tl.constexpr, BI: tl.constexpr):
    """Offsets and mask of one (batch, head)'s [DO, DI] matrix in a contiguous [B, H, DO, DI]."""
    ro = tl.arange(0, BO)
    ri = tl.arange(0, BI)
    return bh * DO * DI + ro[:, None] * DI + ri[None, :], (ro < DO)[:, None] & (ri < DI)[None, :]


@triton.jit
def _base(h, m0, s0, f, c, HAS_MOM: tl.constexpr, HAS_FG: tl.constexpr, PREC: tl.constexpr):
    """f_j M_0 h_j + c_j S_0 h_j for every row j of h: the carried part of the dual read-out."""
    z = tl.dot(h, tl.trans(m0), input_precision=PREC)
    if HAS_FG:
        z = z * f[:, None]
    if HAS_MOM:
        z += c[:, None] * tl.dot(h, tl.trans(s0), input_precision=PREC)
    return z


@triton.jit
def _update(m0, s0, g, x, mem_end, dth_end, f_end, c_end, e_end, HAS_MOM: tl.constexpr,
            PREC: tl.constexpr):  # fmt: skip
    """(M_n, S_n) of one layer: carry times [M_0; S_0] minus the chunk's rank-n update."""
    m = f_end * m0 - tl.dot(tl.trans(mem_end[:, None] * g), x, input_precision=PREC)
    s = -tl.dot(tl.trans(dth_end[:, None] * g), x, input_precision=PREC)
    if HAS_MOM:
        m += c_end * s0
        s += e_end * s0
    return m, s


@triton.jit
def _chunk(
    q_ptr, k_ptr, v_ptr, lr_ptr, mom_ptr, fg_ptr, y_ptr,
    m1, s1, m2, s2, a1, a2,
    bb, hh, t0, n, T, H, DK, DV,
    DEPTH: tl.constexpr, ACT: tl.constexpr, L2: tl.constexpr, RESID: tl.constexpr,
    AFTER: tl.constexpr, HAS_MOM: tl.constexpr, HAS_FG: tl.constexpr,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """One chunk of n tokens from t0: writes y, returns the new (M1, S1, M2, S2)."""
    rc = tl.arange(0, BC)
    rk = tl.arange(0, BK)
    rv = tl.arange(0, BV)
    valid = rc < n
    row = (bb * T + t0 + rc) * H + hh  # token rows of [B, T, H, *] (int64: bb is)
    k_off = row[:, None] * DK + rk[None, :]
    k_msk = valid[:, None] & (rk < DK)[None, :]
    v_off = row[:, None] * DV + rv[None, :]
    v_msk = valid[:, None] & (rv < DV)[None, :]
    kc = tl.load(k_ptr + k_off, mask=k_msk, other=0.0).to(tl.float32)
    qc = tl.load(q_ptr + k_off, mask=k_msk, other=0.0).to(tl.float32)
    vc = tl.load(v_ptr + v_off, mask=v_msk, other=0.0).to(tl.float32)
    theta = tl.load(lr_ptr + row, mask=valid, other=0.0).to(tl.float32)

    # Gate products: segment products down the columns (cumprod, never ratios).
    rows = rc[:, None]
    cols = rc[None, :]
    is_end = rc == n - 1
    if HAS_FG:
        keep = 1.0 - tl.load(fg_ptr + row, mask=valid, other=0.0).to(tl.float32)
        segf = tl.cumprod(tl.where(rows > cols, keep[:, None], 1.0), axis=0)
        segf = tl.where(rows >= cols, segf, 0.0)
        f = tl.cumprod(keep, axis=0)
    else:
        segf = tl.where(rows >= cols, 1.0, 0.0)
        f = tl.full([BC], 1.0, tl.float32)
    f_end = tl.sum(tl.where(is_end, f, 0.0), axis=0)
    if HAS_MOM:
        eta = tl.load(mom_ptr + row, mask=valid, other=0.0).to(tl.float32)
        segd = tl.cumprod(tl.where(rows > cols, eta[:, None], 1.0), axis=0)
        segd = tl.where(rows >= cols, segd, 0.0)
        e = tl.cumprod(eta, axis=0)
        fd = tl.dot(segf, segd, input_precision=PREC)
        c = tl.sum(segf * e[None, :], axis=1)
        c_end = tl.sum(tl.where(is_end, c, 0.0), axis=0)
        e_end = tl.sum(tl.where(is_end, e, 0.0), axis=0)
        dth_end = tl.sum(tl.where(rows == n - 1, segd, 0.0), axis=0) * theta
    else:  # eta = 0: D = I, e = c = 0 (S_0 never reaches M)
        fd = segf
        c = f
        c_end = f_end
        e_end = f_end
        dth_end = tl.where(is_end, theta, 0.0)
    mem = fd * theta[None, :]
    mem_end = tl.sum(tl.where(rows == n - 1, mem, 0.0), axis=0)

    # Forward of the keys at A and the factored per-token gradients.
    if DEPTH == 2:
        z2 = tl.dot(kc, tl.trans(a2), input_precision=PREC)
        x1 = _act(z2, ACT)
    else:
        z2 = kc
        x1 = kc
    out = tl.dot(x1, tl.trans(a1), input_precision=PREC)
    if RESID:
        out += kc
    g1 = 2.0 * (out - vc) if L2 else -vc
    g1 = tl.where(valid[:, None], g1, 0.0)

    # Read-out, before the state moves on (it needs M_0, S_0 and A).
    if AFTER:
        h = qc
        if DEPTH == 2:
            g2 = _act_grad(tl.dot(g1, a1, input_precision=PREC), z2, ACT)
            sc = tl.dot(h, tl.trans(kc), input_precision=PREC) * mem
            z = _base(h, m2, s2, f, c, HAS_MOM, HAS_FG, PREC)
            h = _act(z - tl.dot(sc, g2, input_precision=PREC), ACT)
        sc = tl.dot(h, tl.trans(x1), input_precision=PREC) * mem
        y = _base(h, m1, s1, f, c, HAS_MOM, HAS_FG, PREC) - tl.dot(sc, g1, input_precision=PREC)
    else:
        h = qc
        if DEPTH == 2:
            g2 = _act_grad(tl.dot(g1, a1, input_precision=PREC), z2, ACT)
            h = _act(tl.dot(h, tl.trans(a2), input_precision=PREC), ACT)
        y = tl.dot(h, tl.trans(a1), input_precision=PREC)
    if RESID:
        y += qc
    tl.store(y_ptr + v_off, y, mask=v_msk)

    m1n, s1n = _update(m1, s1, g1, x1, mem_end, dth_end, f_end, c_end, e_end, HAS_MOM, PREC)
    if DEPTH == 2:
        m2n, s2n = _update(m2, s2, g2, kc, mem_end, dth_end, f_end, c_end, e_end, HAS_MOM, PREC)
    else:
        m2n = m2
        s2n = s2
    return m1n, s1n, m2n, s2n


@triton.jit
def _deep_memory_fwd(
    q_ptr, k_ptr, v_ptr, lr_ptr, mom_ptr, fg_ptr,
    w1_ptr, s1_ptr, a1_ptr, w2_ptr, s2_ptr, a2_ptr,
    y_ptr, w1o_ptr, s1o_ptr, a1o_ptr, w2o_ptr, s2o_ptr, a2o_ptr,
    T, H, DK, DV, DH, C, FIRST, N_REST, END_MID,
    DEPTH: tl.constexpr, ACT: tl.constexpr, L2: tl.constexpr, RESID: tl.constexpr,
    AFTER: tl.constexpr, HAS_MOM: tl.constexpr, HAS_FG: tl.constexpr, PARTIAL: tl.constexpr,
    BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0).to(tl.int64)
    bb = bh // H
    hh = bh % H
    # W1: [DV, DH] (depth 1: DH = DK), W2: [DH, DK]; M and S live in registers throughout.
    off1, msk1 = _mat(bh, DV, DH, BV, BH)
    m1 = tl.load(w1_ptr + off1, mask=msk1, other=0.0).to(tl.float32)
    s1 = tl.load(s1_ptr + off1, mask=msk1, other=0.0).to(tl.float32)
    if DEPTH == 2:
        off2, msk2 = _mat(bh, DH, DK, BH, BK)
        m2 = tl.load(w2_ptr + off2, mask=msk2, other=0.0).to(tl.float32)
        s2 = tl.load(s2_ptr + off2, mask=msk2, other=0.0).to(tl.float32)
    else:
        off2 = off1
        msk2 = msk1
        m2 = tl.zeros([1, 1], tl.float32)
        s2 = m2

    if PARTIAL:  # a chunk begun in an earlier segment: gradients at its carried start A
        a1 = tl.load(a1_ptr + off1, mask=msk1, other=0.0).to(tl.float32)
        a2 = tl.load(a2_ptr + off2, mask=msk2, other=0.0).to(tl.float32) if DEPTH == 2 else m2
        m1, s1, m2, s2 = _chunk(
            q_ptr, k_ptr, v_ptr, lr_ptr, mom_ptr, fg_ptr, y_ptr, m1, s1, m2, s2, a1, a2,
            bb, hh, 0, FIRST, T, H, DK, DV, DEPTH, ACT, L2, RESID, AFTER, HAS_MOM, HAS_FG,
            BC, BK, BV, PREC,
        )  # fmt: skip
        if (N_REST == 0) & (END_MID != 0):  # the sequence ends inside this same chunk
            tl.store(a1o_ptr + off1, a1, mask=msk1)
            if DEPTH == 2:
                tl.store(a2o_ptr + off2, a2, mask=msk2)

    for ci in range(0, N_REST):
        t0 = FIRST + ci * C
        n = tl.minimum(T - t0, C)
        if (ci == N_REST - 1) & (END_MID != 0):  # the last chunk's start is carried on
            tl.store(a1o_ptr + off1, m1, mask=msk1)
            if DEPTH == 2:
                tl.store(a2o_ptr + off2, m2, mask=msk2)
        m1, s1, m2, s2 = _chunk(
            q_ptr, k_ptr, v_ptr, lr_ptr, mom_ptr, fg_ptr, y_ptr, m1, s1, m2, s2, m1, m2,
            bb, hh, t0, n, T, H, DK, DV, DEPTH, ACT, L2, RESID, AFTER, HAS_MOM, HAS_FG,
            BC, BK, BV, PREC,
        )  # fmt: skip

    tl.store(w1o_ptr + off1, m1, mask=msk1)
    tl.store(s1o_ptr + off1, s1, mask=msk1)
    if END_MID == 0:  # ends on a chunk boundary: the next chunk starts at the final weights
        tl.store(a1o_ptr + off1, m1, mask=msk1)
    if DEPTH == 2:
        tl.store(w2o_ptr + off2, m2, mask=msk2)
        tl.store(s2o_ptr + off2, s2, mask=msk2)
        if END_MID == 0:
            tl.store(a2o_ptr + off2, m2, mask=msk2)


def block(n: int) -> int:
    """Block size for an axis of length n: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))


def state_size(dk: int, dv: int, dh: int | None) -> int:
    """Padded fp32 values of one memory M (all layers; S doubles it): the register budget's
    measure. ``dh`` None for depth 1."""
    if dh is None:
        return block(dv) * block(dk)
    return block(dv) * block(dh) + block(dh) * block(dk)


def sequence_forward(q, k, v, lr, mom, fg, ps, ss, starts, phase, chunk_size, read, objective,
                     activation, residual):  # fmt: skip
    """Outputs of the whole sequence in fp32: ``[y, *M_final, *S_final, *chunk_start_final]``.

    Contiguous inputs of one dtype: q, k ``[B, T, H, Dk]``, v ``[B, T, H, Dv]``, gates
    ``[B, T, H]`` (mom / fg may be None), ``ps, ss, starts``: lists (W1[, W2]) of
    ``[B, H, Dout, Din]``. The caller casts to the inputs' dtype (torch rounds to nearest; the
    interpreter's own fp32 -> bf16 conversion truncates).
    """
    B, T, H, DK = q.shape
    DV = v.shape[-1]
    depth = len(ps)
    DH = ps[0].shape[-1]  # W1's input width: the hidden width, or Dk at depth 1
    f32 = torch.float32
    y = torch.empty(B, T, H, DV, device=q.device, dtype=f32)
    outs = [torch.empty(p.shape, device=p.device, dtype=f32) for p in (*ps, *ss, *starts)]
    mo, so, ao = outs[:depth], outs[depth : 2 * depth], outs[2 * depth :]
    first = min(chunk_size - phase, T) if phase else 0
    n_rest = -(-(T - first) // chunk_size)
    end_mid = (phase + T) % chunk_size != 0
    second = 1 if depth == 2 else 0  # depth 1: W2 operands are never read; W1 stands in
    BC = block(min(chunk_size, T))
    # Measured for sm_90 (ptxas, see triton.py): 4 warps keep the smallest tiles spill-free,
    # 8 up to state x chunk = 16384 (255 registers). Beyond, 8 warps still spill least with
    # keys of at most 32 (depth 2 at widths 32: 136 bytes, against 404 at 16 warps; depth 1 at
    # 32 -> 64: 124 against 1236); wider keys spill least at 16 (depth 1 at 64 -> 32: 1388
    # bytes, against 3716 at 8).
    tile = state_size(DK, DV, DH if depth == 2 else None) * BC
    warps = 4 if tile <= 4096 else 8 if tile <= 16384 or block(DK) <= 32 else 16
    _deep_memory_fwd[(B * H,)](
        q, k, v, lr, lr if mom is None else mom, lr if fg is None else fg,
        ps[0], ss[0], starts[0], ps[second], ss[second], starts[second],
        y, mo[0], so[0], ao[0], mo[second], so[second], ao[second],
        T, H, DK, DV, DH, chunk_size, first, n_rest, int(end_mid),
        DEPTH=depth, ACT=ACT_CODES[activation], L2=objective == "l2", RESID=residual,
        AFTER=read == "after", HAS_MOM=mom is not None, HAS_FG=fg is not None,
        PARTIAL=phase != 0, BC=BC, BK=block(DK), BV=block(DV), BH=block(DH), PREC=_PREC,
        num_warps=warps,
    )  # fmt: skip
    return [y, *outs]
