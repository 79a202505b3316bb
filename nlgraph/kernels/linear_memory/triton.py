"""Triton backend of the linear memory: chunk summaries and the sequential scan across chunks
(forward and reverse) in Triton, registered as torch custom ops.

Same recurrence and results as :mod:`.naive` / :mod:`.chunk` (api.py; NL paper Eqs. 14-18, 56-57,
64-65, 83, 88):

    M_t = alpha_t M_{t-1} - b_t (M_{t-1} k_t) k_t^T + c_t v_t k_t^T
    o_t = scale * M_t q_t  (read="after")   or   scale * M_{t-1} q_t  (read="before")

Kernel split, for chunks of C tokens, N = ceil(T / C):

1. Chunk summaries, ``nlgraph::linear_memory_summaries`` (Triton, :mod:`._triton_summaries`: one
   program per (b*h, chunk), reading q, k, v and the gates in place): segment decay products P
   (cumulative products in registers, never ratios), the UT transform (I + L) [U | Wk] =
   [diag(c) V | diag(b Gamma) K] (the inverse of the unit lower-triangular I + L by forward
   substitution, then two products; skipped when b is None), the masked intra-chunk attention A =
   tril(Q K^T * P_read), the decayed queries Qg = scale Gamma_read Q, the keys decayed to the chunk
   end Kc = P[C, :] K and the chunk decay gC = Gamma_C. The maths and numerics are those of
   :mod:`.chunk`; :func:`_summaries` is the same computation in batched PyTorch. Its backward,
   ``nlgraph::linear_memory_summaries_bwd``, is two such kernels (the reads' part, A, Qg, Kc, gC;
   then the writes' part, U, Wk) that recompute the chunk's decays and solve and form dq, dk, dv and
   the gates' gradients, where [C, d] tiles hold at most 1024 values
   (``_triton_summaries.backward_fits``); larger ones spill kilobytes of registers, so their
   backward is the VJP of :func:`_summaries`, recomputed from q, k, v and the gates
   (``_triton.recomputed_vjp``).
2. The scan, ``nlgraph::linear_memory_scan`` (Triton, :mod:`._triton_kernels`): one program per
   (b, h, Dv block) carries the state across chunks, W_n = U_n - Wk_n S_n^T,
   S_{n+1} = gC_n S_n + W_n^T Kc_n; a second kernel, parallel over chunks, forms
   O_n = Qg_n S_n^T + A_n W_n.
3. Backward of the scan, ``nlgraph::linear_memory_scan_bwd`` (Triton): the reverse recurrence
   dS_n = gC_n dS_{n+1} + dO_n^T Qg_n - dW_n^T Wk_n, then the per-chunk gradients of Qg, A, U, Wk,
   Kc, gC in parallel. They reach q, k, v, alpha, b, c through step 1's backward; dS_0 is the
   gradient of initial_state.

Stored vs recomputed: the summaries (fp32, C x C per chunk for A) are kept for the scan's
backward; the scan saves its chunk-start states S_n ``[B*H, N, Dv, Dk]`` and writes W_n
``[B*H, N, C, Dv]`` (both fp32) that its forward produces anyway; step 1's intermediates (P, the
Gram matrix, L, the inverse) exist only inside its backward's recomputation.

Precision: everything is computed in float32; float32, bfloat16 and float16 inputs are accepted
and results are cast back to the input dtype. The scan's products are IEEE fp32 (not tf32). The
summaries kernel multiplies 16-bit q and k as they are (exact products, fp32 sums) and its fp32
products at C = 64 as 3xTF32 (``_triton_summaries._summary_config``). float64 is refused (the
kernels have no fp64 path): use ``backend="chunk"`` for it.
"""

import torch
from torch import Tensor

from nlgraph.kernels._triton import check_device, contig, recomputed_vjp, triton_available

from ._validate import check_inputs
from .chunk import _segment_products, _to_chunks

__all__ = ["linear_memory_triton", "triton_available"]


def _kernels():
    # Imported on first launch, not with this module: Triton is optional, and triton.jit reads
    # TRITON_INTERPRET when the kernels are defined.
    from . import _triton_kernels

    return _triton_kernels


def _summary_kernels():
    # As _kernels: the chunk summaries' kernels, imported on first launch.
    from . import _triton_summaries

    return _triton_summaries


# --- custom ops -------------------------------------------------------------------------------


@torch.library.custom_op("nlgraph::linear_memory_scan", mutates_args=())
def linear_memory_scan(
    qg: Tensor,
    a: Tensor,
    u: Tensor,
    wk: Tensor | None,
    kc: Tensor,
    gc: Tensor | None,
    s0: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scan the chunk summaries (fp32; qg, wk, kc ``[BH, N, C, Dk]``, a ``[BH, N, C, C]``,
    u ``[BH, N, C, Dv]``, gc ``[BH, N]``, s0 ``[BH, Dv, Dk]``; wk, gc, s0 optional).

    Returns ``(o [BH, N, C, Dv], final state [BH, Dv, Dk], chunk-start states [BH, N, Dv, Dk],
    W [BH, N, C, Dv])``; the last two exist for backward and carry no gradient.
    """
    return _kernels().scan_forward(
        qg.contiguous(),
        a.contiguous(),
        u.contiguous(),
        contig(wk),
        kc.contiguous(),
        contig(gc),
        contig(s0),
    )


@linear_memory_scan.register_fake
def _(qg, a, u, wk, kc, gc, s0):
    BH, N, C, Dk = kc.shape
    Dv = u.shape[-1]
    return (
        u.new_empty(BH, N, C, Dv),
        u.new_empty(BH, Dv, Dk),
        u.new_empty(BH, N, Dv, Dk),
        u.new_empty(BH, N, C, Dv),
    )


@torch.library.custom_op("nlgraph::linear_memory_scan_bwd", mutates_args=())
def linear_memory_scan_bwd(
    qg: Tensor,
    a: Tensor,
    wk: Tensor | None,
    kc: Tensor,
    gc: Tensor | None,
    s_all: Tensor,
    w: Tensor,
    do: Tensor,
    ds_last: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dqg, da, du, dwk, dkc, dgc, ds0)`` of :func:`linear_memory_scan` from the
    cotangents of o and the final state (ds_last None: zero). dwk / dgc are empty when wk / gc
    are None."""
    return _kernels().scan_backward(
        qg.contiguous(),
        a.contiguous(),
        contig(wk),
        kc.contiguous(),
        contig(gc),
        s_all.contiguous(),
        w.contiguous(),
        do.contiguous(),
        contig(ds_last),
    )


@linear_memory_scan_bwd.register_fake
def _(qg, a, wk, kc, gc, s_all, w, do, ds_last):
    BH, N, C, Dk = kc.shape
    Dv = w.shape[-1]
    return (
        torch.empty_like(kc),
        torch.empty_like(a),
        torch.empty_like(w),
        torch.empty_like(kc) if wk is not None else kc.new_empty(0),
        torch.empty_like(kc),
        kc.new_empty(BH, N) if gc is not None else kc.new_empty(0),
        kc.new_empty(BH, Dv, Dk),
    )


def _setup_context(ctx, inputs, output):
    qg, a, _u, wk, kc, gc, s0 = inputs
    _o, _s_end, s_all, w = output
    ctx.mark_non_differentiable(s_all, w)
    ctx.save_for_backward(qg, a, wk, kc, gc, s_all, w)
    ctx.has_s0 = s0 is not None


def _backward(ctx, do, ds_last, _ds_all, _dw):
    qg, a, wk, kc, gc, s_all, w = ctx.saved_tensors
    if do is None:  # only the final state was used
        do = torch.zeros_like(w)
    dqg, da, du, dwk, dkc, dgc, ds0 = linear_memory_scan_bwd(
        qg, a, wk, kc, gc, s_all, w, do, ds_last
    )
    return (
        dqg,
        da,
        du,
        dwk if wk is not None else None,
        dkc,
        dgc if gc is not None else None,
        ds0 if ctx.has_s0 else None,
    )


linear_memory_scan.register_autograd(_backward, setup_context=_setup_context)


# --- chunk summaries --------------------------------------------------------------------------


@torch.library.custom_op("nlgraph::linear_memory_summaries", mutates_args=())
def linear_memory_summaries(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: Tensor | None,
    b: Tensor | None,
    c: Tensor | None,
    scale: float,
    read: str,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The chunk summaries ``(Qg, A, U, Wk, Kc, gC)`` of :func:`_summaries`, fp32
    ``[B*H, N, C, *]`` (gC ``[B*H, N]``), by one Triton program per (batch * head, chunk) that
    reads q, k, v in place. Wk is ``[0]`` when b is None and gC is ``[0]`` when alpha is None."""
    return _summary_kernels().summaries_forward(
        _unit_last(q), _unit_last(k), _unit_last(v), alpha, b, c, scale, read, chunk_size
    )


def _summaries_shapes(k, v, has_alpha: bool, has_b: bool, C: int) -> list[tuple[int, ...]]:
    """Shapes of the six summaries (``(0,)`` for Wk without b and gC without alpha)."""
    B, T, H, Dk = k.shape
    N = -(-T // C)
    return [
        (B * H, N, C, Dk),
        (B * H, N, C, C),
        (B * H, N, C, v.shape[-1]),
        (B * H, N, C, Dk) if has_b else (0,),
        (B * H, N, C, Dk),
        (B * H, N) if has_alpha else (0,),
    ]


@linear_memory_summaries.register_fake
def _(q, k, v, alpha, b, c, scale, read, chunk_size):
    shapes = _summaries_shapes(k, v, alpha is not None, b is not None, chunk_size)
    return tuple(k.new_empty(s, dtype=torch.float32) for s in shapes)


def _unit_last(x: Tensor) -> Tensor:
    """The kernel takes any batch, time and head strides; the feature axis must be dense."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _summaries_setup(ctx, inputs, output):
    q, k, v, alpha, b, c, scale, read, chunk_size = inputs
    ctx.present = [x is not None for x in (alpha, b, c)]
    ctx.opts = (scale, read, chunk_size)
    ctx.save_for_backward(q, k, v, *(x for x in (alpha, b, c) if x is not None))


@torch.library.custom_op("nlgraph::linear_memory_summaries_bwd", mutates_args=())
def linear_memory_summaries_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: Tensor | None,
    b: Tensor | None,
    c: Tensor | None,
    scale: float,
    read: str,
    chunk_size: int,
    grads: list[Tensor],
) -> list[Tensor]:
    """Gradients ``[dq, dk, dv, dalpha, db, dc]`` of :func:`linear_memory_summaries` from the
    cotangents of its six results, in the dtypes of the inputs; the gradient of an absent gate
    is ``[0]``. Two launches of one program per (batch * head, chunk), each recomputing the
    chunk's decays (and the second its solve); only where ``backward_fits`` (module
    docstring)."""
    out = _summary_kernels().summaries_backward(
        _unit_last(q), _unit_last(k), _unit_last(v), alpha, b, c, scale, read, chunk_size,
        [g.contiguous() for g in grads],
    )  # fmt: skip
    like = (q, k, v, alpha, b, c)
    return [q.new_empty(0) if d is None else d.to(x.dtype) for d, x in zip(out, like, strict=True)]


@linear_memory_summaries_bwd.register_fake
def _(q, k, v, alpha, b, c, scale, read, chunk_size, grads):
    dense = torch.contiguous_format
    return [q.new_empty(0) if x is None else torch.empty_like(x, memory_format=dense)
            for x in (q, k, v, alpha, b, c)]  # fmt: skip


def _summaries_backward(ctx, *grads):
    q, k, v, *saved = ctx.saved_tensors
    it = iter(saved)
    gates = [next(it) if p else None for p in ctx.present]
    C = ctx.opts[2]
    if not _summary_kernels().backward_fits(C, k.shape[-1], v.shape[-1]):
        # the VJP of the batched PyTorch form, recomputed from the inputs
        d = recomputed_vjp(lambda *a: _summaries(*a, *ctx.opts), [q, k, v, *gates], list(grads))
    else:
        shapes = _summaries_shapes(k, v, gates[0] is not None, gates[1] is not None, C)
        # An unused result has no cotangent: it contributes nothing.
        cot = [
            g if g is not None else k.new_zeros(shape, dtype=torch.float32)
            for g, shape in zip(grads, shapes, strict=True)
        ]
        d = linear_memory_summaries_bwd(q, k, v, *gates, *ctx.opts, cot)
    return (*d[:3], *(x if p else None for x, p in zip(d[3:], ctx.present, strict=True)),
            None, None, None)  # fmt: skip


linear_memory_summaries.register_autograd(_summaries_backward, setup_context=_summaries_setup)


# --- chunk summaries in batched PyTorch: the reference the kernels equal ---------------------


def _summaries(q, k, v, alpha, b, c, scale: float, read: str, C: int):
    """Per-chunk Qg, A, U, Wk, Kc, gC in fp32, ``[B*H, N, C, *]`` (gC ``[B*H, N]``); Wk and gC
    are None when b, alpha are None. Same algebra as :func:`.chunk.linear_memory_chunk`; what
    the summaries kernels compute forward and backward (their tests compare the two)."""
    dt = torch.float32
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    N = -(-T // C)
    # Padded tokens have k = 0 and alpha = 1: they leave the state as it is.
    Q = _to_chunks(q.to(dt) if scale == 1.0 else q.to(dt) * scale, N, C)  # [B, H, N, C, Dk]
    K = _to_chunks(k.to(dt), N, C)
    V = _to_chunks(v.to(dt), N, C)
    a = None if alpha is None else _to_chunks(alpha.to(dt), N, C, pad_value=1.0)
    bb = None if b is None else _to_chunks(b.to(dt), N, C)
    cc = None if c is None else _to_chunks(c.to(dt), N, C)

    incl = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    strict = incl.tril(-1)
    if a is None:
        P_prev = P_cur = g_prev = g_cur = g_end = p_end = None
    else:
        P = _segment_products(a)  # [B, H, N, C+1, C+1]
        P_prev, P_cur = P[..., :C, 1:], P[..., 1:, 1:]
        g_prev, g_cur = P[..., :C, 0, None], P[..., 1:, 0, None]
        g_end = P[..., C, 0]  # [B, H, N]
        p_end = P[..., C, 1:, None]

    U = V if cc is None else V * cc[..., None]
    Wk = None
    if bb is not None:
        gram = K @ K.transpose(-1, -2)
        if P_prev is not None:
            gram = gram * P_prev
        L = (bb[..., None] * gram).masked_fill(~strict, 0.0)
        bg = bb[..., None] if g_prev is None else bb[..., None] * g_prev
        X = torch.linalg.solve_triangular(
            L, torch.cat([U, bg * K], dim=-1), upper=False, unitriangular=True
        )
        U, Wk = X.split([Dv, Dk], dim=-1)

    mask, P_read, g_read = (incl, P_cur, g_cur) if read == "after" else (strict, P_prev, g_prev)
    A = Q @ K.transpose(-1, -2)
    if P_read is not None:
        A = A * P_read
    A = A.masked_fill(~mask, 0.0)
    Kc = K if p_end is None else p_end * K
    Qg = Q if g_read is None else g_read * Q

    flat = lambda x: None if x is None else x.reshape(B * H, *x.shape[2:])
    return tuple(flat(x) for x in (Qg, A, U, Wk, Kc, g_end))


def linear_memory_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    alpha: Tensor | None = None,
    b: Tensor | None = None,
    c: Tensor | None = None,
    *,
    initial_state: Tensor | None = None,
    scale: float = 1.0,
    read: str = "after",
    chunk_size: int = 64,
    output_final_state: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear memory with the inter-chunk scan in Triton; same arguments and results as
    :func:`~nlgraph.kernels.linear_memory.chunk.linear_memory_chunk`.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``; float32, bfloat16 or float16 on a CUDA
            device (or any device under ``TRITON_INTERPRET=1``).
        alpha, b, c: ``[B, T, H]`` or None (alpha=1, b=0, c=1; b=None skips the solve).
        initial_state: ``[B, H, Dv, Dk]`` or None (zeros).
        chunk_size: tokens per chunk C (64 suits the GPU); T need not be a multiple of it.

    Returns:
        ``(o [B, T, H, Dv], final_state [B, H, Dv, Dk] or None)`` in the dtype of q.

    Example:
        >>> q = k = torch.nn.functional.normalize(torch.randn(1, 8, 2, 4, device="cuda"), dim=-1)
        >>> beta = torch.full((1, 8, 2), 0.5, device="cuda")
        >>> v = torch.randn(1, 8, 2, 3, device="cuda")
        >>> o, M = linear_memory_triton(q, k, v, b=beta, c=beta)  # DeltaNet
    """
    check_inputs(q, k, v, alpha, b, c, initial_state, read, chunk_size)
    if q.dtype == torch.float64:
        raise ValueError(
            "linear_memory: the triton backend computes in float32 and does not take float64 "
            "inputs; use backend='chunk' (or 'reference') for float64, or cast to float32."
        )
    check_device("linear_memory", q)
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    C = min(chunk_size, T)
    N = -(-T // C)
    Qg, A, U, Wk, Kc, gC = linear_memory_summaries(q, k, v, alpha, b, c, scale, read, C)
    Wk = Wk if b is not None else None
    gC = gC if alpha is not None else None
    s0 = None
    if initial_state is not None:
        s0 = initial_state.to(torch.float32).reshape(B * H, Dv, Dk)
    o, s_end, _, _ = linear_memory_scan(Qg, A, U, Wk, Kc, gC, s0)
    o = o.reshape(B, H, N * C, Dv)[:, :, :T].transpose(1, 2).to(q.dtype)
    final = s_end.reshape(B, H, Dv, Dk).to(q.dtype) if output_final_state else None
    return o, final
