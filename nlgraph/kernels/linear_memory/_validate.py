"""Boundary checks shared by every backend of ``linear_memory``.

Each backend calls :func:`check_inputs` before any work, so a wrong shape fails with a message
naming the argument, the shape received, the shape expected and how to fix it, instead of a
broadcasting error deep inside an einsum.
"""

from __future__ import annotations

import torch

__all__ = ["check_inputs", "work_dtype", "READ_MODES"]

READ_MODES = ("after", "before")


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in x.shape) + "]"


def _fail(name: str, x: torch.Tensor, expected: str, fix: str) -> None:
    raise ValueError(f"linear_memory: {name} has shape {_shape(x)}; expected {expected}. {fix}")


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None,
    b: torch.Tensor | None,
    c: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    read: str,
    chunk_size: int | None = None,
) -> None:
    """Raise ``ValueError`` unless the arguments describe one ``linear_memory`` call.

    Expected: q, k ``[B, T, H, Dk]``; v ``[B, T, H, Dv]``; alpha, b, c ``[B, T, H]`` or None;
    initial_state ``[B, H, Dv, Dk]`` or None; read in ``READ_MODES``; chunk_size >= 1.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"linear_memory: {name} must be a torch.Tensor, got {type(x).__name__}"
            )
        if x.dim() != 4:
            _fail(
                name,
                x,
                "rank 4 [B, T, H, D]",
                "Add a heads axis of size 1 (x.unsqueeze(2)) if you have a single head.",
            )
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    if q.shape != k.shape:
        _fail(
            "q",
            q,
            f"the shape of k, {_shape(k)} = [B, T, H, Dk]",
            "Queries and keys must share batch, time, heads and key dimension.",
        )
    if v.shape[:3] != k.shape[:3]:
        _fail(
            "v",
            v,
            f"[{B}, {T}, {H}, Dv] (B, T, H taken from k {_shape(k)})",
            "Values need the same batch, time and heads as the keys; only Dv may differ.",
        )
    if T < 1:
        _fail("k", k, "at least one time step (T >= 1)", "Skip the call for an empty sequence.")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(
            f"linear_memory: q, k, v must share one floating dtype; got {q.dtype}, {k.dtype}, "
            f"{v.dtype}. Cast them with .to(dtype) first."
        )
    for name, g in (("alpha", alpha), ("b", b), ("c", c)):
        if g is not None and tuple(g.shape) != (B, T, H):
            _fail(
                name,
                g,
                f"[B, T, H] = [{B}, {T}, {H}] (one scalar per batch, token and head)",
                "Squeeze a trailing axis of size 1, or pass None for the default "
                "(alpha=1, b=0, c=1).",
            )
    if initial_state is not None and tuple(initial_state.shape) != (B, H, Dv, Dk):
        _fail(
            "initial_state",
            initial_state,
            f"[B, H, Dv, Dk] = [{B}, {H}, {Dv}, {Dk}]",
            "The state is column-vector oriented (read-out M @ k): transpose a [B, H, Dk, Dv] "
            "state with .transpose(-1, -2).",
        )
    if read not in READ_MODES:
        raise ValueError(
            f"linear_memory: read={read!r}; expected one of {READ_MODES}. Use 'after' for "
            "o_t = M_t q_t (linear attention / DeltaNet) or 'before' for o_t = M_{t-1} q_t (Hope)."
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(
            f"linear_memory: chunk_size={chunk_size!r}; expected an int >= 1 (64 is a good "
            "default on CPU; 1 reproduces the token loop)."
        )


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in: float32/float64 as given, half types upcast to float32
    (the triangular solve and long sums lose too much in 16 bits)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32
