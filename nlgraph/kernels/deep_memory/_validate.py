"""Boundary checks and state set-up shared by every backend of the deep memory op.

Every message names what was received, what was expected and how to fix it (STYLE 11).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nlgraph.kernels.deep_memory._mlp import ACTIVATIONS, OBJECTIVES, Params, layer_names

__all__ = ["READS", "Dims", "check_inputs", "initial_state", "final_state"]

READS = ("after", "chunk_start")
_OP = "deep_memory"


class Dims:
    """Sizes read off the inputs: batch, time, heads, key/value widths and layer names."""

    def __init__(self, B: int, T: int, H: int, Dk: int, Dv: int, names: list[str]) -> None:
        self.B, self.T, self.H, self.Dk, self.Dv, self.names = B, T, H, Dk, Dv, names


def _shape(x: Tensor | None) -> str:
    return "None" if x is None else str(list(x.shape))


def _check_gate(name: str, g: Tensor | None, B: int, T: int, H: int, ref: Tensor) -> None:
    if g is None:
        return
    if not isinstance(g, Tensor) or tuple(g.shape) != (B, T, H):
        raise ValueError(
            f"{_OP}: {name} has shape {_shape(g)}, expected [B, T, H] = {[B, T, H]} "
            f"(one gate per token and head); pass e.g. a [B, T, H] tensor"
            + ("" if name == "lr" else " or None to switch it off")
        )
    if g.dtype != ref.dtype or g.device != ref.device:
        raise ValueError(
            f"{_OP}: {name} is {g.dtype} on {g.device} but q is {ref.dtype} on {ref.device}; "
            "cast every input to one dtype and device"
        )


def _check_params(params0: Any, B: int, H: int, Dk: int, Dv: int, ref: Tensor) -> list[str]:
    if not isinstance(params0, dict) or not params0:
        raise ValueError(
            f"{_OP}: params0 must be a non-empty dict of fast weights {{'W1': ..., 'W2': ...}}, "
            f"got {type(params0).__name__}"
        )
    names = layer_names(len(params0))
    if sorted(params0) != sorted(names):
        raise ValueError(
            f"{_OP}: params0 has keys {sorted(params0)}, expected {names} for depth "
            f"{len(params0)} (W1 is the output layer, W{len(params0)} reads the key, Eq. 89)"
        )
    want_in = Dk
    for i in range(len(names), 0, -1):
        w = params0[f"W{i}"]
        lead = tuple(w.shape[:-2])
        if w.ndim not in (3, 4) or lead not in ((H,), (B, H)) or w.shape[-1] != want_in:
            raise ValueError(
                f"{_OP}: params0['W{i}'] has shape {_shape(w)}, expected [H, Dout, {want_in}] = "
                f"[{H}, Dout, {want_in}] or [B, H, Dout, {want_in}] with B = {B} "
                f"(its input width is {'Dk' if i == len(names) else f'the output of W{i + 1}'})"
            )
        if w.dtype != ref.dtype or w.device != ref.device:
            raise ValueError(
                f"{_OP}: params0['W{i}'] is {w.dtype} on {w.device} but q is {ref.dtype} on "
                f"{ref.device}; cast the fast weights to the inputs' dtype and device"
            )
        want_in = w.shape[-2]
    if want_in != Dv:
        raise ValueError(
            f"{_OP}: params0['W1'] has {want_in} output rows, expected Dv = {Dv} (the width of v)"
        )
    return names


def _check_state(state: Any, dims: Dims, params0: Params, chunk_size: int) -> None:
    keys = {"params", "momentum", "chunk_start", "phase", "chunk_size"}
    if not isinstance(state, dict) or set(state) != keys:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"{_OP}: state must be the final_state dict of a previous call with keys "
            f"{sorted(keys)}, got {got}"
        )
    for part in ("params", "momentum", "chunk_start"):
        for name in dims.names:
            want = (dims.B, dims.H, *params0[name].shape[-2:])
            got = state[part].get(name) if isinstance(state[part], dict) else None
            if got is None or tuple(got.shape) != want:
                raise ValueError(
                    f"{_OP}: state['{part}']['{name}'] has shape {_shape(got)}, expected "
                    f"{list(want)}; carry the final_state of a call with the same B, H and params0"
                )
            if got.dtype != params0[name].dtype:
                raise ValueError(
                    f"{_OP}: state['{part}']['{name}'] is {got.dtype}, params0 is "
                    f"{params0[name].dtype}; carry the state in the inputs' dtype"
                )
    phase = state["phase"]
    if not isinstance(phase, int) or not 0 <= phase < max(state["chunk_size"], 1):
        raise ValueError(f"{_OP}: state['phase'] = {phase!r} is not in [0, chunk_size)")
    if phase != 0 and state["chunk_size"] != chunk_size:
        raise ValueError(
            f"{_OP}: the carried state stopped {phase} tokens into a chunk of size "
            f"{state['chunk_size']}, but chunk_size = {chunk_size}; continue with chunk_size="
            f"{state['chunk_size']} (or split segments on chunk boundaries)"
        )


def check_inputs(
    q: Tensor, k: Tensor, v: Tensor, lr: Tensor, momentum: Tensor | None, forget: Tensor | None,
    *, params0: Any, state: Any, chunk_size: Any, read: str, objective: str, activation: str,
    residual: bool,
) -> Dims:  # fmt: skip
    """Validate everything before work starts; return the sizes."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"{_OP}: {name} must be a floating [B, T, H, D] tensor, got {_shape(x)}"
            )
    B, T, H, Dk = q.shape
    if tuple(k.shape) != (B, T, H, Dk):
        raise ValueError(
            f"{_OP}: k has shape {_shape(k)} but q has {_shape(q)}; keys and queries must share "
            "[B, T, H, Dk]"
        )
    if tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(
            f"{_OP}: v has shape {_shape(v)}, expected [B, T, H, Dv] = [{B}, {T}, {H}, Dv]"
        )
    if T == 0:
        raise ValueError(f"{_OP}: got T = 0 tokens (q {_shape(q)}); pass at least one token")
    Dv = v.shape[-1]
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"{_OP}: {name} is {x.dtype} on {x.device} but q is {q.dtype} on {q.device}; "
                "cast every input to one dtype and device"
            )
    _check_gate("lr", lr, B, T, H, q)
    _check_gate("momentum", momentum, B, T, H, q)
    _check_gate("forget", forget, B, T, H, q)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{_OP}: chunk_size must be an int >= 1, got {chunk_size!r}")
    if read not in READS:
        raise ValueError(f"{_OP}: read={read!r}, expected one of {READS}")
    if objective not in OBJECTIVES:
        raise ValueError(f"{_OP}: objective={objective!r}, expected one of {OBJECTIVES}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{_OP}: activation={activation!r}, expected one of {sorted(ACTIVATIONS)}")
    if residual and Dk != Dv:
        raise ValueError(
            f"{_OP}: residual=True needs Dk == Dv, got Dk = {Dk} and Dv = {Dv}; "
            "pass residual=False for a memory that maps keys to values of another width"
        )
    names = _check_params(params0, B, H, Dk, Dv, q)
    dims = Dims(B, T, H, Dk, Dv, names)
    if state is not None:
        _check_state(state, dims, params0, chunk_size)
    return dims


def initial_state(params0: Params, state: Any, dims: Dims) -> tuple[Params, Params, Params, int]:
    """(params, momentum, chunk_start, phase) as ``[B, H, ...]`` tensors to start the scan from.

    Without a carried state: params0 broadcast over the batch (the meta-learned initial state,
    PAPER 4.2), zero momentum, phase 0.
    """
    if state is not None:
        parts = (dict(state[p]) for p in ("params", "momentum", "chunk_start"))
        return (*parts, state["phase"])
    params = {n: w.expand(dims.B, dims.H, *w.shape[-2:]) for n, w in params0.items()}
    momentum = {n: torch.zeros_like(w) for n, w in params.items()}
    return params, momentum, dict(params), 0


def final_state(
    params: Params, momentum: Params, chunk_start: Params, phase: int, chunk_size: int
) -> dict[str, Any]:
    """The carried state: enough to continue exactly, even from inside a chunk."""
    return {
        "params": params,
        "momentum": momentum,
        # Where the rest of an unfinished chunk takes its gradients (= params at phase 0).
        "chunk_start": chunk_start,
        "phase": phase,
        "chunk_size": chunk_size,
    }
