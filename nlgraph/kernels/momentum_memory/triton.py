"""Triton backend of the momentum memory, registered as a torch custom op.

Same recurrence and results as :mod:`.naive` and :mod:`.chunk` (NL paper Eq. 88 with momentum,
PAPER.md 3.1 and 4.5):

    S_t = mu_t S_{t-1} + delta_t x_t^T,     W_t = W_{t-1} (a_t I - b_t x_t x_t^T) + S_t

Forward, ``nlgraph::momentum_memory`` (:mod:`._triton_kernels`): one program per
(batch, head, O block) computes the whole window in registers: the gate products by cumulative
products, the Gram matrix, the C x C unit lower-triangular solve by forward substitution and the
rank-C updates of W and S. Nothing is stored for backward but the inputs.

Backward, ``nlgraph::momentum_memory_bwd`` (``register_autograd``), for windows of at most 16
tokens and keys of at most 64 features (``_triton_kernels.backward_fits``): one program per
(batch, head, block of 16 output rows) recomputes the window's products, solve and terms and
forms every gradient in registers: ddelta, dW0 and dS0 of its rows whole, and its block's part
of dx and of the gates' gradients, which the launcher sums over the blocks. Gradients of the
gate products leave the factor out instead of dividing by it, so gates of exactly 0 stay exact.
Larger windows (their C x C matrices fill the registers) take the VJP of the closed form of
:func:`~nlgraph.kernels.momentum_memory.chunk.momentum_memory_chunk` (batched PyTorch, float32),
recomputed from the saved inputs with ``torch.func.vjp``. Under ``torch.compile`` both trace
into the backward graph without breaks.

Precision: everything is computed in float32 (products in IEEE fp32, not tf32); float32,
bfloat16 and float16 inputs are accepted and results and gradients come back in the input
dtype. float64 is refused (the kernel has no fp64 path): use ``backend="chunk"`` for it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nlgraph.kernels._triton import check_device, contig, recomputed_vjp, triton_available

from ._validate import MAX_TRITON_WINDOW, check_inputs
from .chunk import momentum_memory_chunk

__all__ = ["momentum_memory_triton", "triton_available", "triton_eligible"]


def _kernels():
    # Imported on first launch, not with this module: Triton is optional, and triton.jit reads
    # TRITON_INTERPRET when the kernel is defined.
    from . import _triton_kernels

    return _triton_kernels


def triton_eligible(x: Tensor, *args: Any) -> bool:
    """Whether ``auto`` may send this call to the kernel (the dispatcher's ``eligible``): what
    the kernel takes, not float64 and windows of at most ``MAX_TRITON_WINDOW`` tokens."""
    return x.dtype != torch.float64 and x.shape[1] <= MAX_TRITON_WINDOW


@torch.library.custom_op("nlgraph::momentum_memory", mutates_args=())
def momentum_memory_op(
    x: Tensor,
    delta: Tensor,
    b: Tensor | None,
    a: Tensor | None,
    mu: Tensor,
    w0: Tensor,
    s0: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(W_C, S_C)`` of one window by the Triton kernel (shapes as
    :func:`momentum_memory_triton`; one dtype for all inputs, the results' dtype)."""
    return _kernels().window_forward(
        x.contiguous(),
        delta.contiguous(),
        contig(b),
        contig(a),
        mu.contiguous(),
        w0.contiguous(),
        s0.contiguous(),
    )


@momentum_memory_op.register_fake
def _(x, delta, b, a, mu, w0, s0):
    return torch.empty_like(w0), torch.empty_like(s0)


def _window_vjp(x, delta, b, a, mu, w0, s0, dw, ds):
    """Gradients ``(dx, ddelta, db, da, dmu, dw0, ds0)`` of the window from the cotangents dw,
    ds of (W_C, S_C): the chunk form recomputed in float32 and its VJP, in the inputs' dtypes
    (db / da None when b / a are None)."""
    args = [x, delta, b, a, mu, w0, s0]
    return tuple(recomputed_vjp(momentum_memory_chunk, args, [dw, ds], dtype=torch.float32))


@torch.library.custom_op("nlgraph::momentum_memory_bwd", mutates_args=())
def momentum_memory_bwd(
    x: Tensor,
    delta: Tensor,
    b: Tensor | None,
    a: Tensor | None,
    mu: Tensor,
    w0: Tensor,
    s0: Tensor,
    dw: Tensor,
    ds: Tensor,
) -> list[Tensor]:
    """``[dx, ddelta, db, da, dmu, dw0, ds0]`` of one window by the backward kernel, in the
    inputs' dtypes; db / da are ``[0]`` when b / a are None."""
    grads = _kernels().window_backward(*(contig(t) for t in (x, delta, b, a, mu, w0, s0, dw, ds)))
    like = (x, delta, b, a, mu, w0, s0)
    return [
        x.new_empty(0) if g is None else g.to(t.dtype) for g, t in zip(grads, like, strict=True)
    ]


@momentum_memory_bwd.register_fake
def _(x, delta, b, a, mu, w0, s0, dw, ds):
    return [x.new_empty(0) if t is None else torch.empty_like(t) for t in
            (x, delta, b, a, mu, w0, s0)]  # fmt: skip


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dw, ds):
    x, delta, b, a, mu, w0, s0 = ctx.saved_tensors
    # An unused result has no cotangent: it contributes nothing.
    dw = torch.zeros_like(w0) if dw is None else dw
    ds = torch.zeros_like(s0) if ds is None else ds
    if not _kernels().backward_fits(x.shape[1], x.shape[-1]):
        return _window_vjp(x, delta, b, a, mu, w0, s0, dw, ds)
    dx, dd, db, da, dmu, dw0, ds0 = momentum_memory_bwd(x, delta, b, a, mu, w0, s0, dw, ds)
    return dx, dd, db if b is not None else None, da if a is not None else None, dmu, dw0, ds0


momentum_memory_op.register_autograd(_backward, setup_context=_setup_context)


def momentum_memory_triton(
    x: Tensor,
    delta: Tensor,
    b: Tensor | None,
    a: Tensor | None,
    mu: Tensor,
    w0: Tensor,
    s0: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(W_C, S_C)`` of one window by the Triton kernel; same arguments and results as
    :func:`~nlgraph.kernels.momentum_memory.naive.momentum_memory_naive`.

    Args:
        x: ``[B, C, H, I]``, delta: ``[B, C, H, O]``, b, a: ``[B, C, H]`` or None, mu:
            ``[B, C, H]``, w0, s0: ``[B, H, O, I]``; one dtype among float32, bfloat16 and
            float16, on a CUDA device (or any device under ``TRITON_INTERPRET=1``); C <= 64.

    Returns:
        ``(W_C, S_C)``, ``[B, H, O, I]`` in the inputs' dtype.

    Example:
        >>> x = torch.nn.functional.normalize(torch.randn(2, 8, 3, 16, device="cuda"), dim=-1)
        >>> delta = torch.randn(2, 8, 3, 12, device="cuda")
        >>> gate = torch.full((2, 8, 3), 0.5, device="cuda")
        >>> w0 = s0 = torch.zeros(2, 3, 12, 16, device="cuda")
        >>> w, s = momentum_memory_triton(x, delta, gate, None, gate, w0, s0)
    """
    check_inputs(x, delta, b, a, mu, w0, s0)
    if x.dtype == torch.float64:
        raise ValueError(
            "momentum_memory: the triton backend computes in float32 and does not take float64 "
            "inputs; use backend='chunk' (or 'reference') for float64, or cast to float32."
        )
    if x.shape[1] > MAX_TRITON_WINDOW:
        raise ValueError(
            f"momentum_memory: the triton backend takes windows of at most {MAX_TRITON_WINDOW} "
            f"tokens (it holds C x C matrices in registers), got C={x.shape[1]}; use "
            "backend='chunk' for longer windows."
        )
    check_device("momentum_memory", x)
    return momentum_memory_op(x, delta, b, a, mu, w0, s0)
