"""What every Triton backend shares: whether Triton can run here, and contiguous operands."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["triton_available", "check_device", "contig", "interpreted", "recomputed_vjp"]


def interpreted() -> bool:
    """True when Triton's CPU interpreter replaces compiled kernels (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_available() -> bool:
    """True when Triton imports and can run here: a CUDA device, or the CPU interpreter
    (``TRITON_INTERPRET=1``)."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreted()


def contig(x: Any) -> Any:
    """``x.contiguous()``, or None for an absent optional operand."""
    return None if x is None else x.contiguous()


def check_device(op: str, x: Any) -> None:
    """Refuse tensors the kernels cannot reach: they run on CUDA, or anywhere through the CPU
    interpreter."""
    if x.device.type != "cuda" and not interpreted():
        from nlgraph._errors import BackendUnavailableError

        raise BackendUnavailableError(
            f"{op}: the triton backend needs CUDA tensors, got device {x.device}; "
            "move the inputs to a GPU, use backend='chunk', or set TRITON_INTERPRET=1 (slow)."
        )


def recomputed_vjp(fn: Any, args: list, cotangents: list, dtype: Any = None) -> list:
    """The VJP of ``fn(*args)``, recomputed: what a Triton op's backward takes where it has no
    kernel (``fn`` the op's batched PyTorch form).

    ``args`` may hold None (an absent optional tensor: its gradient is None). Results of ``fn``
    that are None are skipped with their cotangents; a None cotangent (an unused result)
    contributes nothing. With ``dtype``, ``fn`` runs on the arguments cast to it and each
    gradient comes back in its argument's dtype.
    """
    import torch

    idx = [i for i, a in enumerate(args) if a is not None]
    present: list[bool] = []

    def f(*xs: Any) -> tuple:
        full = list(args)
        for i, x in zip(idx, xs, strict=True):
            full[i] = x
        outs = fn(*full)
        present[:] = [o is not None for o in outs]
        return tuple(o for o in outs if o is not None)

    prim = [args[i] if dtype is None else args[i].to(dtype) for i in idx]
    outs, vjp = torch.func.vjp(f, *prim)
    live = [g for g, p in zip(cotangents, present, strict=True) if p]
    cot = tuple(
        torch.zeros_like(o) if g is None else g.to(o.dtype) for g, o in zip(live, outs, strict=True)
    )
    grads: list = [None] * len(args)
    for i, g in zip(idx, vjp(cot), strict=True):
        grads[i] = g.to(args[i].dtype)
    return grads
