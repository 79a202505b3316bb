"""Boundary checks of ``momentum_memory``: every backend's public entry calls
:func:`check_inputs` before any work, so a wrong argument fails with a message naming it, the
shape received, the shape expected and how to fix it, not deep inside an einsum or a kernel."""

from __future__ import annotations

import torch

__all__ = ["check_inputs", "MAX_TRITON_WINDOW"]

# The triton kernel keeps C x C matrices of one window in registers; 64 tokens is its limit.
MAX_TRITON_WINDOW = 64


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _fail(name: str, x: torch.Tensor, expected: str, fix: str) -> None:
    raise ValueError(f"momentum_memory: {name} has shape {_shape(x)}; expected {expected}. {fix}")


def check_inputs(
    x: torch.Tensor,
    delta: torch.Tensor,
    b: torch.Tensor | None,
    a: torch.Tensor | None,
    mu: torch.Tensor,
    w0: torch.Tensor,
    s0: torch.Tensor,
) -> None:
    """Raise ``ValueError`` unless the arguments describe one window.

    Expected: x ``[B, C, H, I]``, delta ``[B, C, H, O]``, b, a ``[B, C, H]`` or None, mu
    ``[B, C, H]``, w0, s0 ``[B, H, O, I]``; C >= 1; one floating dtype and one device for all.
    """
    named = (("x", x), ("delta", delta), ("b", b), ("a", a), ("mu", mu), ("w0", w0), ("s0", s0))
    for name, t in named:
        if t is None and name in ("b", "a"):
            continue
        if not isinstance(t, torch.Tensor):
            raise ValueError(
                f"momentum_memory: {name} must be a torch.Tensor, got {type(t).__name__}"
                + (" (only the gates b and a may be None)" if t is None else "")
            )
    for name, t in (("x", x), ("delta", delta)):
        if t.dim() != 4:
            _fail(name, t, "rank 4 [B, C, H, D]", "Add a heads axis of size 1 (t.unsqueeze(2)).")
    B, C, H, I = x.shape
    O = delta.shape[-1]
    if delta.shape[:3] != x.shape[:3]:
        _fail(
            "delta",
            delta,
            f"[{B}, {C}, {H}, O] (B, C, H taken from x {_shape(x)})",
            "The error terms need the batch, tokens and heads of the keys; only O may differ.",
        )
    if C < 1:
        _fail("x", x, "at least one token (C >= 1)", "Skip the call for an empty window.")
    for name, g in (("b", b), ("a", a), ("mu", mu)):
        if g is not None and tuple(g.shape) != (B, C, H):
            _fail(
                name,
                g,
                f"[B, C, H] = [{B}, {C}, {H}] (one scalar per batch, token and head)",
                "Squeeze a trailing axis of size 1"
                + ("." if name == "mu" else ", or pass None (b: plain GD, a: no retention)."),
            )
    for name, t in (("w0", w0), ("s0", s0)):
        if tuple(t.shape) != (B, H, O, I):
            _fail(
                name,
                t,
                f"[B, H, O, I] = [{B}, {H}, {O}, {I}]",
                "The weights map inputs to outputs (W @ x): transpose an [I, O] layout with "
                ".transpose(-1, -2).",
            )
    live = [(n, t) for n, t in named if t is not None]
    dtypes = {t.dtype for _, t in live}
    if len(dtypes) != 1 or not x.is_floating_point():
        got = ", ".join(f"{n}={t.dtype}" for n, t in live)
        raise ValueError(
            f"momentum_memory: all tensors must share one floating dtype; got {got}. "
            "Cast them with .to(dtype) first."
        )
    devices = {t.device for _, t in live}
    if len(devices) != 1:
        got = ", ".join(f"{n}={t.device}" for n, t in live)
        raise ValueError(
            f"momentum_memory: all tensors must live on one device; got {got}. Move them with "
            ".to(device) first."
        )
