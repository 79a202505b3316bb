"""Chunk-parallel linear memory in plain PyTorch (WY/UT form within a chunk, state across chunks).

Same recurrence as :mod:`.naive`, with transitions A_t = alpha_t I - b_t k_t k_t^T:

    M_t = M_{t-1} A_t + c_t v_t k_t^T

Within a chunk of C tokens starting from state S, write Gamma_t = alpha_1 ... alpha_t and
P[t, i] = alpha_{i+1} ... alpha_t (so P[t, 0] = Gamma_t). By induction

    M_t = Gamma_t S + sum_{i <= t} P[t, i] w_i k_i^T,
    w_t = c_t v_t - b_t M_{t-1} k_t
        = c_t v_t - b_t Gamma_{t-1} S k_t - b_t sum_{i < t} P[t-1, i] (k_t . k_i) w_i.

Stacking rows, (I + L) W = diag(c) V - diag(b Gamma_prev) K S^T with L strictly lower triangular,
L[t, i] = b_t P[t-1, i] k_t . k_i (the UT transform of the keys' C x C Gram matrix). One unit
lower-triangular solve per chunk, independent of S, gives U and Wk with W = U - Wk S^T. Then

    O      = (diag(Gamma_read) Q - A Wk) S^T + A U,   A = tril(Q K^T * P_read)
    S_next = S (Gamma_C I - Wk^T Kc) + U^T Kc,        Kc = diag(P[C, :]) K

so the only sequential work is one [Dv, Dk] x [Dk, Dk] product per chunk; everything else is a
batched matmul over all chunks at once. b=None (linear attention, with or without decay) needs no
solve: U = diag(c) V, Wk = 0.

Numerics: the chunk-relative decays P[t, i] are computed as products (a cumprod down a masked
(C+1) x (C+1) matrix of factors), never as Gamma_t / Gamma_i. A ratio of cumulative products
underflows to 0/0 once Gamma drops below the dtype's smallest number (after ~100 tokens at
alpha = 1/e in float32), and differences of cumulative log-decays lose digits to cancellation
when the decays are strong. Products of at most C factors are accurate to ~C eps, and
alpha_t = 0 (a hard reset) is exact, gradients included.

Backward is autograd through these ops (solve_triangular and cumprod have exact derivatives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._validate import check_inputs, work_dtype

__all__ = ["linear_memory_chunk"]


def _to_chunks(x: torch.Tensor, n: int, size: int, pad_value: float = 0.0) -> torch.Tensor:
    """[B, T, H, *rest] -> [B, H, N, C, *rest], padding the time axis at the end."""
    B, T, H = x.shape[:3]
    rest = x.shape[3:]
    pad = n * size - T
    if pad:
        # F.pad lists pairs from the last axis backwards; the time axis is axis 1.
        x = F.pad(x, (0, 0) * len(rest) + (0, 0, 0, pad), value=pad_value)
    x = x.reshape(B, n, size, H, *rest)
    # contiguous once here: every batched matmul below would otherwise copy its operand again.
    return x.movedim(3, 1).contiguous()


def _segment_products(a: torch.Tensor) -> torch.Tensor:
    """P[..., t, i] = a_{i+1} ... a_t for 0 <= i <= t <= C, from a ``[..., C]`` of factors
    a_1..a_C (index 0 is the chunk start). Entries above the diagonal are 1 and must be masked.

    Computed as a cumprod down the columns of X[s, i] = a_s if s > i else 1: no division and no
    logarithm, so tiny or zero factors stay exact (see the module docstring).
    """
    C = a.shape[-1]
    a_ext = F.pad(a, (1, 0), value=1.0)  # [..., C+1], a_ext[0] is never used
    strict = torch.ones(C + 1, C + 1, dtype=torch.bool, device=a.device).tril(-1)
    x = torch.where(strict, a_ext[..., :, None], a.new_ones(()))
    return torch.cumprod(x, dim=-2)


def linear_memory_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    scale: float = 1.0,
    read: str = "after",
    chunk_size: int = 64,
    output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunk-parallel gated linear memory; same arguments and results as
    :func:`~nlgraph.kernels.linear_memory.naive.linear_memory_naive`, plus ``chunk_size``.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
        alpha, b, c: ``[B, T, H]`` or None (alpha=1, b=0, c=1).
        initial_state: ``[B, H, Dv, Dk]`` or None (zeros).
        chunk_size: tokens per chunk C. Cost is O(T C (Dk + Dv) + T Dk^2 + T Dk Dv) per head,
            plus T / C sequential [Dv, Dk] x [Dk, Dk] products; T need not be a multiple of C.

    Returns:
        ``(o [B, T, H, Dv], final_state [B, H, Dv, Dk] or None)``.
    """
    check_inputs(q, k, v, alpha, b, c, initial_state, read, chunk_size)
    out_dtype = q.dtype
    dt = work_dtype(out_dtype)
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    # Padded tokens have k = 0, so they write nothing and leave M unchanged provided alpha = 1
    # there; b and c are irrelevant on them.
    Q = _to_chunks(q.to(dt) if scale == 1.0 else q.to(dt) * scale, N, C)  # [B, H, N, C, Dk]
    K = _to_chunks(k.to(dt), N, C)
    V = _to_chunks(v.to(dt), N, C)  # [B, H, N, C, Dv]
    a = None if alpha is None else _to_chunks(alpha.to(dt), N, C, pad_value=1.0)  # [B,H,N,C]
    bb = None if b is None else _to_chunks(b.to(dt), N, C)
    cc = None if c is None else _to_chunks(c.to(dt), N, C)

    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = incl.tril(-1)
    if a is None:
        # All decays are 1: the masks alone do the work, and None skips full-size products
        # with ones (each one a pass over [B, H, N, C, C] forward and backward).
        P_prev = P_cur = None
        g_prev = g_cur = g_end = None
        p_end = None
    else:
        P = _segment_products(a)  # [B, H, N, C+1, C+1]
        P_prev = P[..., :C, 1:]  # P[t-1, i] for tokens t, i = 1..C
        P_cur = P[..., 1:, 1:]  # P[t, i]
        g_prev = P[..., :C, 0, None]  # Gamma_{t-1}, [B, H, N, C, 1]
        g_cur = P[..., 1:, 0, None]  # Gamma_t
        g_end = P[..., C, 0, None, None]  # Gamma_C, [B, H, N, 1, 1]
        p_end = P[..., C, 1:, None]  # P[C, i], [B, H, N, C, 1]

    U = V if cc is None else V * cc[..., None]
    if bb is None:
        X = U  # no erase term: W = U, nothing to solve
    else:
        gram = K @ K.transpose(-1, -2)
        if P_prev is not None:
            gram = gram * P_prev
        L = (bb[..., None] * gram).masked_fill(~strict, 0.0)
        bg = bb[..., None] if g_prev is None else bb[..., None] * g_prev
        rhs = torch.cat([U, bg * K], dim=-1)
        # unitriangular=True reads the diagonal as ones: (I + L) X = rhs without forming I + L.
        # One solve for both right-hand sides; X = [U | Wk], [B, H, N, C, Dv + Dk].
        # In float32 at least: CPU has no 16-bit triangular solve.
        solve_dtype = torch.promote_types(rhs.dtype, torch.float32)
        X = torch.linalg.solve_triangular(
            L.to(solve_dtype), rhs.to(solve_dtype), upper=False, unitriangular=True
        ).to(rhs.dtype)

    if read == "after":
        mask, P_read, g_read = incl, P_cur, g_cur
    else:
        mask, P_read, g_read = strict, P_prev, g_prev
    A = Q @ K.transpose(-1, -2)
    if P_read is not None:
        A = A * P_read
    A = A.masked_fill(~mask, 0.0)
    Kc = K if p_end is None else p_end * K
    # U and Wk share their products with A and Kc: one matmul each instead of two.
    AX = A @ X  # [B, H, N, C, Dv (+ Dk)]
    XK = X.transpose(-1, -2) @ Kc  # [B, H, N, Dv (+ Dk), Dk]
    Q_eff = Q if g_read is None else g_read * Q  # [B, H, N, C, Dk]
    if bb is None:
        O_intra, B_n = AX, XK
        A_n = None  # the transition is the scalar Gamma_C
    else:
        # split, not slicing: the backward of a split is one cat, that of two slices is two
        # zero-filled full-size buffers.
        O_intra, AWk = AX.split([Dv, Dk], dim=-1)
        B_n, WkK = XK.split([Dv, Dk], dim=-2)
        Q_eff = Q_eff - AWk
        eye = torch.eye(Dk, dtype=dt, device=q.device)
        A_n = (eye if g_end is None else g_end * eye) - WkK  # [B, H, N, Dk, Dk]

    S = q.new_zeros(B, H, Dv, Dk, dtype=dt) if initial_state is None else initial_state.to(dt)
    # unbind once: indexing [:, :, n] inside the loop would make autograd scatter N full-size
    # zero tensors on the way back (it was half the backward time at T=2048).
    B_list = B_n.unbind(2)
    if A_n is not None:
        steps = A_n.unbind(2)
    elif a is not None:
        steps = g_end.unbind(2)
    else:
        steps = None  # no decay at all: S_next = S + B_n
    starts = []
    for n in range(N):  # the only sequential part: N = T / C small products
        starts.append(S)
        if steps is None:
            S = S + B_list[n]
        elif A_n is None:
            S = S * steps[n] + B_list[n]
        else:
            S = S @ steps[n] + B_list[n]
    S_starts = torch.stack(starts, dim=2)  # [B, H, N, Dv, Dk]

    O = Q_eff @ S_starts.transpose(-1, -2) + O_intra  # [B, H, N, C, Dv]
    o = O.movedim(1, 3).reshape(B, N * C, H, Dv)[:, :T]
    final = S.to(out_dtype) if output_final_state else None
    return o.to(out_dtype), final
