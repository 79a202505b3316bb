"""The element-wise optimizer update as one Triton kernel: one pass over memory per step.

Per element the kernel reads ``p, g`` and the moments it needs and writes ``p`` and the moments
back; everything else (bias corrections, step sizes) is a scalar computed once on the host in
float64, as torch.optim does. A launch covers any set of *spans* (the segments of the flat
buffer owned by the parameters that have a gradient this step): the host cuts the spans into
blocks of ``BLOCK`` elements and passes the table of ``(start, stop)`` per block, so one launch
updates a whole param group whatever its shapes, and tensors without a gradient are skipped.

Traffic per element, float32: SGD+momentum 16 B read + 8 B written, Adam 16 + 12, AMSGrad
20 + 16 (torch's foreach Adam makes about six passes). Hyperparameters are runtime scalars
(Triton does not specialise on float values), so a changing lr never recompiles; only the
rule's switches (``RULE``, ``WD``, ``HAS_M``, ``NESTEROV``, ``AMSGRAD``, ``ALIGNED``) are
compile-time.

Supported dtypes: param and grad float32, bfloat16 or float16, each moment in the same set
(torch keeps them in the param's dtype); arithmetic is float32 throughout, with IEEE division
and square root (``div_rn``/``sqrt_rn``, not the approximate ones) so that float32 results
match torch to rounding.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import triton
import triton.language as tl
from torch import Tensor

from nlgraph.kernels.optimizer._validate import Hyper, check

__all__ = ["optimizer_update_triton", "BLOCK", "ALIGN"]

BLOCK = 2048  # elements per program: 8 KiB of each float32 stream in flight
ALIGN = 64  # spans starting and ending on multiples of this load as 16-byte vectors
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_RULE = {"sgd": 0, "adam": 1, "rmsprop": 2}
_TABLES: OrderedDict[tuple, tuple[Tensor, Tensor]] = OrderedDict()  # spans -> block table


@triton.jit
def _update_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, starts_ptr, stops_ptr,
    lr, wd, decay, m_keep, m_in, mu, beta2, v_in, eps, step_size, bc2_sqrt,
    RULE: tl.constexpr, WD: tl.constexpr, HAS_M: tl.constexpr, NESTEROV: tl.constexpr,
    AMSGRAD: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    start = tl.load(starts_ptr + pid)
    stop = tl.load(stops_ptr + pid)
    if ALIGNED:  # lets the compiler prove 16-byte vector accesses and a uniform mask
        start = tl.multiple_of(start, 64)  # = ALIGN
        stop = tl.multiple_of(stop, 64)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < stop
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if WD == 1:  # coupled (L2): the memories see g + wd p
        g = g + wd * p
    if WD == 2:  # decoupled (AdamW): p <- (1 - lr wd) p
        p = p * decay
    if RULE == 0:  # SGD: m <- keep m + in g (keep = 0, in = 1 at the first step)
        d = g
        if HAS_M:
            m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
            m = m_keep * m + m_in * g
            tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
            d = g + mu * m if NESTEROV else m
        p = p - lr * d
    else:  # a second moment: Adam or RMSprop
        v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
        v = v * beta2 + v_in * g * g
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
        if AMSGRAD:
            vm = tl.load(vmax_ptr + offs, mask=mask).to(tl.float32)
            vm = tl.maximum(vm, v)
            tl.store(vmax_ptr + offs, vm.to(vmax_ptr.dtype.element_ty), mask=mask)
            v = vm
        if RULE == 1:  # Adam: m <- lerp(m, g, 1 - b1); p -= lr/bc1 m / (sqrt(v/bc2) + eps)
            m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
            m = m + m_in * (g - m)
            tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
            denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
            p = p - step_size * tl.div_rn(m, denom)
        else:  # RMSprop: u = g / (sqrt(v) + eps), through momentum m <- b1 m + u if any
            u = tl.div_rn(g, tl.sqrt_rn(v) + eps)
            if HAS_M:
                m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
                m = m_keep * m + u
                tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
                u = m
            p = p - lr * u
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


def block_table(spans: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(starts, stops)`` per program for ``spans`` (int64 ``[S, 2]`` on the CPU), on
    ``device``; cached, since a training run visits few distinct sets of spans."""
    key = (spans.numpy().tobytes(), str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    lo, hi = spans[:, 0], spans[:, 1]
    counts = (hi - lo + BLOCK - 1) // BLOCK  # empty spans get no program
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    within = torch.arange(int(counts.sum())) - first
    starts = torch.repeat_interleave(lo, counts) + within * BLOCK
    stops = torch.repeat_interleave(hi, counts)
    hit = _TABLES[key] = (starts.to(device), stops.to(device))
    if len(_TABLES) > 64:
        _TABLES.popitem(last=False)
    return hit


def _scalars(hp: Hyper) -> dict[str, float]:
    """The kernel's float arguments, in float64 on the host (torch.optim's formulas)."""
    first = hp.rule == "sgd" and hp.step == 1
    out = dict(lr=hp.lr, wd=hp.weight_decay, decay=1.0 - hp.lr * hp.weight_decay,
               m_keep=0.0 if first else hp.beta1, m_in=1.0, mu=hp.beta1, beta2=hp.beta2,
               v_in=1.0 - hp.beta2, eps=hp.eps, step_size=hp.lr, bc2_sqrt=1.0)  # fmt: skip
    if hp.rule == "sgd" and not first:
        out["m_in"] = 1.0 - hp.dampening
    if hp.rule == "adam":
        out["m_in"] = 1.0 - hp.beta1
        out["step_size"] = hp.lr / (1.0 - hp.beta1**hp.step)
        out["bc2_sqrt"] = math.sqrt(1.0 - hp.beta2**hp.step)
    return out


def launch(
    param: Tensor,
    grad: Tensor,
    m: Tensor | None,
    v: Tensor | None,
    vmax: Tensor | None,
    spans: Tensor,
    hp: Hyper,
) -> None:
    """Run the kernel over ``spans`` (arguments already checked)."""
    for name, t in (("param", param), ("grad", grad), ("m", m), ("v", v), ("vmax", vmax)):
        if t is not None and t.dtype not in _DTYPES:
            raise ValueError(
                f"optimizer_update (triton): {name} has dtype {t.dtype}; the kernel takes "
                f"{[str(d) for d in _DTYPES]} (use backend='reference' for float64)"
            )
    if not spans.numel():
        return
    starts, stops = block_table(spans, param.device)
    aligned = bool((spans % ALIGN == 0).all())
    dummy = param  # never read: its pointer fills the slot of a moment the rule lacks
    wd_mode = 0 if not hp.weight_decay else (2 if hp.decoupled else 1)
    has_m = m is not None and (hp.rule == "adam" or hp.beta1 != 0.0)
    _update_kernel[(starts.numel(),)](
        param, grad, dummy if m is None else m, dummy if v is None else v,
        dummy if vmax is None else vmax, starts, stops, **_scalars(hp),
        RULE=_RULE[hp.rule], WD=wd_mode, HAS_M=has_m,
        NESTEROV=hp.nesterov, AMSGRAD=hp.amsgrad, ALIGNED=aligned, BLOCK=BLOCK,
        num_warps=8,
    )  # fmt: skip


@torch.library.custom_op(
    "nlgraph::optimizer_update", mutates_args=("param", "m", "v", "vmax"), device_types=None
)
def _optimizer_update_op(
    param: Tensor,
    grad: Tensor,
    m: Tensor | None,
    v: Tensor | None,
    vmax: Tensor | None,
    spans: Tensor,
    rule: str,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    dampening: float,
    nesterov: bool,
    amsgrad: bool,
    step: int,
) -> None:
    hp = check(param, grad, m, v, vmax, spans, rule, lr, beta1, beta2, eps, weight_decay,
               decoupled, dampening, nesterov, amsgrad, step)  # fmt: skip
    launch(param, grad, m, v, vmax, spans, hp)


@_optimizer_update_op.register_fake
def _(param, grad, m, v, vmax, spans, rule, lr, beta1, beta2, eps, weight_decay, decoupled,
      dampening, nesterov, amsgrad, step) -> None:  # fmt: skip
    return None  # in place: no outputs to describe


def optimizer_update_triton(
    param: Tensor,
    grad: Tensor,
    m: Tensor | None,
    v: Tensor | None,
    vmax: Tensor | None,
    spans: Tensor,
    *,
    rule: str,
    lr: float,
    beta1: float = 0.0,
    beta2: float = 0.0,
    eps: float = 0.0,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    dampening: float = 0.0,
    nesterov: bool = False,
    amsgrad: bool = False,
    step: int = 1,
) -> None:
    """See :func:`nlgraph.kernels.optimizer.optimizer_update`; runs the custom op
    ``torch.ops.nlgraph.optimizer_update`` (traceable by ``torch.compile``)."""
    torch.ops.nlgraph.optimizer_update(
        param, grad, m, v, vmax, spans, rule, float(lr), float(beta1), float(beta2),
        float(eps), float(weight_decay), bool(decoupled), float(dampening), bool(nesterov),
        bool(amsgrad), int(step),
    )  # fmt: skip
