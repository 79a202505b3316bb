"""Triton backend of the deep memory, registered as the torch custom op ``nlgraph::deep_memory``.

Same maths and results as :mod:`.naive` and :mod:`.chunk` (Titans Eqs. 16-18, PAPER 4.1; the
memory of Eq. 89, PAPER 4.4; read modes of PAPER 4.5).

Forward (:mod:`._triton_kernels`): one program per (batch, head) runs the whole sequence's chunk
loop with the fast weights and momentum of every layer (depth 1 or 2) held in registers. Per
chunk: the MLP forward of the keys at the chunk-start weights, the output error ("l2" / "dot"),
backprop to each layer as factored per-token gradients g_l x_l^T, the momentum / forgetting
coefficients of :mod:`._scan` computed in-kernel by cumulative products of the gates, the state
update as rank-n ``tl.dot`` products and the read-out (read="after" in the dual form of
``chunk._read_dual``; read="chunk_start" as the MLP at the chunk-start weights). A carried state
that stopped inside a chunk is continued exactly: the first, partial chunk takes its gradients
at the carried chunk-start weights. One launch replaces the chunk form's ~40 small PyTorch ops
per chunk, which is what makes it launch-bound on a GPU for small heads.

Backward (``register_autograd``): **not a Triton kernel**. It recomputes the chunk form
(:func:`~nlgraph.kernels.deep_memory.chunk.deep_memory_chunk`, float32) from the saved inputs
and takes its VJP with ``torch.func.vjp``, so the gradients reach q, k, v, lr, momentum, forget
and the initial (or carried) state. Under ``torch.compile`` AOT autograd traces that recomputation
into the backward graph like any PyTorch code.

Supported shapes: depth 1 or 2 with ``state_size <= MAX_STATE`` (2048 fp32 values of M over all
layers, every width padded to a power of two of at least 16: depth 2 with Dk, Dv, Dh <= 32, depth
1 up to 32 x 64) and ``chunk_size <= MAX_CHUNK`` (16). The bound is the H100 register budget,
measured by compiling the kernel for sm_90 without a GPU (Triton 3.9, IEEE fp32 ``tl.dot`` on
FMA units; ``cuobjdump --dump-resource-usage`` of the cubin). Inside it: at most 255 registers
per thread and no spill at 4 or 8 warps (depth 2 at widths 16, or 16 / 32 / 16; depth 1 at 16),
120 bytes of stack for depth 1 at 32 x 32 and 136-184 bytes of spill for depth 2 at widths 32
(8 warps; 184 when a carried state continues mid-chunk; 16 warps spilled 404-488). Just past it
ptxas spills kilobytes per thread: 2.5 KB for depth 2 at 32 / 64 / 32, 3-8 KB at widths 64 or
with C = 32 at widths 32. So the per-chunk tiles, not the fast weights (4 x 32 x 32 values at
the bound), set the limit: each fp32 ``tl.dot`` keeps whole K-rows and K-columns of its operands
per thread. The interpreter has no limit. No timing on a GPU has been made yet.

Shapes beyond the bound are **delegated to the chunk form** with a one-time log message
(``nlgraph.kernels`` logger, WARNING), not refused: ``backend="triton"`` on a learner means "the
Triton kernel where it pays, the chunk form elsewhere" (``_dispatch.for_op``), and ``auto`` on a
GPU picks this backend for every shape, so a wide memory must still run. The results are the
chunk form's, identical maths. float64 is refused instead (the kernel has no fp64 path; use
``backend="chunk"``); ``deep_memory(..., backend="auto")`` routes it to the chunk form.

Precision: everything is computed in float32 (products in IEEE fp32, not tf32); float32,
bfloat16 and float16 inputs are accepted and results, state and gradients come back in the
input dtype.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from nlgraph.kernels import _dispatch
from nlgraph.kernels._triton import check_device, contig, recomputed_vjp, triton_available
from nlgraph.kernels.deep_memory._mlp import layer_names
from nlgraph.kernels.deep_memory._validate import Dims, check_inputs, final_state, initial_state
from nlgraph.kernels.deep_memory.chunk import deep_memory_chunk

__all__ = [
    "deep_memory_triton",
    "triton_available",
    "triton_eligible",
    "fits",
    "MAX_STATE",
    "MAX_CHUNK",
]

log = logging.getLogger("nlgraph.kernels")

MAX_STATE = 2048  # padded fp32 values of M over all layers (S doubles it); see module docstring
MAX_CHUNK = 16  # tokens per chunk: the [C, C] and [C, width] tiles of each chunk
_DELEGATED: set[tuple] = set()


def _kernels():
    # Imported on first launch, not with this module: Triton is optional, and triton.jit reads
    # TRITON_INTERPRET when the kernel is defined.
    from . import _triton_kernels

    return _triton_kernels


def _pow2(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def fits(dims: Dims, params0: dict[str, Tensor], chunk_size: int) -> str | None:
    """None when the kernel takes these shapes, else why not (for the delegation message)."""
    if len(dims.names) > 2:
        return f"depth {len(dims.names)} (the kernel has depth 1 and 2)"
    widths = [params0["W1"].shape[-2]] + [params0[n].shape[-1] for n in dims.names]
    pairs = list(zip(widths[:-1], widths[1:], strict=True))
    size = sum(_pow2(o) * _pow2(i) for o, i in pairs)
    if size > MAX_STATE:
        shapes = " and ".join(f"{o}x{i}" for o, i in pairs)
        return (
            f"its fast weights ({shapes}) pad to {size} fp32 values, over the {MAX_STATE} the "
            "kernel keeps in registers"
        )
    if chunk_size > MAX_CHUNK:
        return f"chunk_size={chunk_size} is over {MAX_CHUNK}, whose tiles fill the registers"
    return None


def triton_eligible(q: Tensor, *args: Any, **kwargs: Any) -> bool:
    """Whether ``auto`` may send this call to the kernel (the dispatcher's ``eligible``): not
    float64, which the kernel refuses. Shapes beyond its bound are eligible: it delegates them
    to the chunk form itself (see the module docstring)."""
    return q.dtype != torch.float64


@torch.library.custom_op("nlgraph::deep_memory", mutates_args=())
def deep_memory_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor | None,
    forget: Tensor | None,
    params: list[Tensor],
    moms: list[Tensor],
    starts: list[Tensor],
    phase: int,
    chunk_size: int,
    read: str,
    objective: str,
    activation: str,
    residual: bool,
) -> list[Tensor]:
    """``[y, *params, *momentum, *chunk_start]`` after the sequence, by the Triton kernel.

    ``params``, ``moms``, ``starts``: the state to start from, one ``[B, H, Dout, Din]`` tensor
    per layer (W1 first); ``phase`` tokens of the current chunk are already done. Results in
    the dtype of q.
    """
    outs = _kernels().sequence_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), lr.contiguous(), contig(momentum),
        contig(forget), [p.contiguous() for p in params], [m.contiguous() for m in moms],
        [s.contiguous() for s in starts], phase, chunk_size, read, objective, activation,
        residual,
    )  # fmt: skip
    return [o.to(q.dtype) for o in outs]


@deep_memory_op.register_fake
def _(q, k, v, lr, momentum, forget, params, moms, starts, phase, chunk_size, read, objective,
      activation, residual):  # fmt: skip
    y = q.new_empty((*q.shape[:3], v.shape[-1]))
    return [y, *(torch.empty_like(p) for p in (*params, *moms, *starts))]


def _chunk_outputs(q, k, v, lr, momentum, forget, params, moms, starts, phase, chunk_size,
                   **opts):  # fmt: skip
    """The op's outputs by the chunk form: what the backward differentiates."""
    names = layer_names(len(params))
    state = {
        "params": dict(zip(names, params, strict=True)),
        "momentum": dict(zip(names, moms, strict=True)),
        "chunk_start": dict(zip(names, starts, strict=True)),
        "phase": phase,
        "chunk_size": chunk_size,
    }
    y, fin = deep_memory_chunk(
        q, k, v, lr, momentum, forget, params0=state["params"], state=state,
        chunk_size=chunk_size, **opts,
    )  # fmt: skip
    return [y, *(fin[part][n] for part in ("params", "momentum", "chunk_start") for n in names)]


def _setup_context(ctx, inputs, output):
    q, k, v, lr, momentum, forget, params, moms, starts, *rest = inputs
    ctx.depth = len(params)
    ctx.gates = (momentum is not None, forget is not None)
    ctx.rest = rest
    gates = [g for g in (momentum, forget) if g is not None]
    ctx.save_for_backward(q, k, v, lr, *gates, *params, *moms, *starts)


def _backward(ctx, grads):
    saved = list(ctx.saved_tensors)
    L = ctx.depth
    n_g = sum(ctx.gates)
    it = iter(saved[4 : 4 + n_g])
    gates = [next(it) if present else None for present in ctx.gates]
    state = saved[4 + n_g :]
    phase, chunk_size, read, objective, activation, residual = ctx.rest

    def fn(q, k, v, lr, mom, fg, *st):
        return _chunk_outputs(
            q, k, v, lr, mom, fg, list(st[:L]), list(st[L : 2 * L]), list(st[2 * L :]), phase,
            chunk_size, read=read, objective=objective, activation=activation, residual=residual,
        )  # fmt: skip

    d = recomputed_vjp(fn, [*saved[:4], *gates, *state], list(grads), dtype=torch.float32)
    dst = d[6:]
    return (*d[:6], dst[:L], dst[L : 2 * L], dst[2 * L :], None, None, None, None, None, None)


deep_memory_op.register_autograd(_backward, setup_context=_setup_context)


def deep_memory_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    momentum: Tensor | None = None,
    forget: Tensor | None = None,
    *,
    params0: dict[str, Tensor],
    state: dict[str, Any] | None = None,
    chunk_size: int = 16,
    read: str = "after",
    objective: str = "l2",
    activation: str = "silu",
    residual: bool = True,
    output_final_state: bool = True,
) -> tuple[Tensor, dict[str, Any] | None]:
    """Deep memory by the Triton kernel; the reference's signature and results.

    See :func:`nlgraph.kernels.deep_memory.deep_memory` for the arguments. Inputs: float32,
    bfloat16 or float16 on a CUDA device (or any device under ``TRITON_INTERPRET=1``). Depth 1
    or 2 with ``fits`` (module docstring) runs the kernel; other shapes run the chunk form, with
    a one-time log message.

    Example:
        >>> B, T, H, D = 1, 8, 2, 4
        >>> q, k, v = (torch.randn(B, T, H, D, device="cuda") for _ in range(3))
        >>> p0 = {"W1": torch.zeros(H, D, 16, device="cuda"),
        ...       "W2": torch.randn(H, 16, D, device="cuda") / 2}
        >>> lr = torch.full((B, T, H), 0.1, device="cuda")
        >>> y, st = deep_memory_triton(q, k, v, lr, params0=p0, chunk_size=4)
    """
    opts = {"read": read, "objective": objective, "activation": activation, "residual": residual}
    dims = check_inputs(
        q, k, v, lr, momentum, forget, params0=params0, state=state, chunk_size=chunk_size, **opts
    )
    if q.dtype == torch.float64:
        raise ValueError(
            "deep_memory: the triton backend computes in float32 and does not take float64 "
            "inputs; use backend='chunk' (or 'reference') for float64, or cast to float32."
        )
    why = fits(dims, params0, chunk_size)
    if why is not None:
        key = (why, chunk_size)
        if key not in _DELEGATED and not _dispatch._compiling():
            _DELEGATED.add(key)
            log.warning("nlgraph: deep_memory's triton kernel does not take this memory (%s); "
                        "running the chunk form instead", why)  # fmt: skip
        return deep_memory_chunk(
            q, k, v, lr, momentum, forget, params0=params0, state=state, chunk_size=chunk_size,
            output_final_state=output_final_state, **opts,
        )  # fmt: skip
    check_device("deep_memory", q)
    params, mom, start, phase = initial_state(params0, state, dims)
    names = dims.names
    outs = deep_memory_op(
        q, k, v, lr, momentum, forget, [params[n] for n in names], [mom[n] for n in names],
        [start[n] for n in names], phase, chunk_size, read, objective, activation, residual,
    )  # fmt: skip
    y = outs[0]
    if not output_final_state:
        return y, None
    L = len(names)
    part = [dict(zip(names, outs[1 + i * L : 1 + (i + 1) * L], strict=True)) for i in range(3)]
    return y, final_state(*part, (phase + dims.T) % chunk_size, chunk_size)
