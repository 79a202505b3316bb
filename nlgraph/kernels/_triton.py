"""What every Triton backend shares: whether Triton can run here, and contiguous operands."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["triton_available", "check_device", "contig", "interpreted"]


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
