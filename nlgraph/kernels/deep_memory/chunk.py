"""Chunk-parallel deep memory: per chunk, all token gradients at once and a closed-form scan.

Within a chunk of n tokens every gradient is taken at the chunk-start state (Titans Eqs. 16-18,
PAPER 4.1 and 4.5), so u_1..u_n are computed in one batched pass. The momentum and forgetting
recurrences (PAPER 4.1)

    S_j = eta_j S_{j-1} - theta_j u_j,        M_j = a_j M_{j-1} + S_j,      a_j = 1 - alpha_j

are linear, with the closed form (segment products D[j,l] = prod_{m=l+1..j} eta_m,
F[j,l] = prod_{m=l+1..j} a_m, e_j = prod_{m<=j} eta_m, f_j = prod_{m<=j} a_m):

    S_j = e_j S_0 - sum_l D[j,l] theta_l u_l
    M_j = f_j M_0 + (F e)_j S_0 - sum_l (F D)[j,l] theta_l u_l

so a chunk costs a few [n, n] matrices and matmuls; only the Python loop over chunks is serial.

Fast path (``grads="analytic"``): each token gradient of layer i is the outer product g_l x_l^T
(:func:`factored_grads`). The new state is then ``(w * g)^T x``, and the read-out
``M_j(q_j)`` with the in-chunk state (read="after") is evaluated layer by layer without forming the
per-token weights, as in TTT's dual form:

    W_j h_j = f_j W_0 h_j + (F e)_j S_0 h_j - sum_l (F D)[j,l] theta_l (x_l . h_j) g_l

Generic path (``grads="vmap"``): ``vmap(grad)`` materialises u_l as [B, H, n, Dout, Din] and the
read-out materialises the per-token weights M_j; slower, but it makes no use of the MLP's structure
and checks the fast path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nlgraph.kernels.deep_memory._mlp import (
    ACTIVATIONS,
    Params,
    factored_grads,
    mlp_apply,
    vmap_grads,
)
from nlgraph.kernels.deep_memory._validate import check_inputs, final_state, initial_state

__all__ = ["deep_memory_chunk", "GRADS"]

GRADS = ("analytic", "vmap")


def _segprod(x: Tensor) -> Tensor:
    """``[..., n] -> [..., n, n]``: out[j, l] = prod_{m=l+1..j} x_m for j >= l, else 0.

    A cumulative product down each column of a matrix holding x_j below the diagonal and 1 on
    and above it. Exact for gates that are 0 (no division E_j / E_l), and needs no log-space:
    every entry is a product of gates in [0, 1], so nothing overflows.
    """
    n = x.shape[-1]
    below = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    cols = torch.where(below, x.unsqueeze(-1), torch.ones((), dtype=x.dtype, device=x.device))
    return torch.cumprod(cols, dim=-2).tril()


class _Coeffs:
    """The scalars of one chunk's closed form, each ``[B, H, n]`` or ``[B, H, n, n]``.

    mem[j, l] = (F D)[j, l] theta_l   (weight of u_l in M_j)     f = f_j   c = (F e)_j
    mom[l]    = D[n, l] theta_l       (weight of u_l in S_n)     e_last = e_n
    ``c`` and ``e_last`` are None without momentum: then S_0 never reaches the chunk.
    """

    def __init__(self, theta: Tensor, eta: Tensor | None, keep: Tensor | None) -> None:
        n = theta.shape[-1]
        if keep is None:
            seg_f = torch.ones(n, n, dtype=theta.dtype, device=theta.device).tril()
            self.f = torch.ones_like(theta)
        else:
            seg_f = _segprod(keep)
            self.f = torch.cumprod(keep, dim=-1)
        if eta is None:
            self.c = self.e_last = None
            self.mem = seg_f * theta.unsqueeze(-2)
            self.mom = torch.zeros_like(theta)
            self.mom[..., -1] = 1  # S_n = -theta_n u_n
            self.mom = self.mom * theta
        else:
            seg_d = _segprod(eta)
            e = torch.cumprod(eta, dim=-1)
            self.c = (seg_f @ e.unsqueeze(-1)).squeeze(-1)
            self.e_last = e[..., -1]
            self.mem = (seg_f @ seg_d) * theta.unsqueeze(-2)
            self.mom = seg_d[..., -1, :] * theta


def _bc(x: Tensor, extra: int) -> Tensor:
    """Append ``extra`` singleton axes so a per-(b, h[, token]) scalar scales a matrix."""
    return x.reshape(*x.shape, *([1] * extra))


def _state_update(
    p0: Tensor, s0: Tensor, co: _Coeffs, wsum_mem: Tensor, wsum_mom: Tensor
) -> tuple[Tensor, Tensor]:
    """(M_n, S_n) from the start state and the weighted gradient sums of one layer."""
    p = _bc(co.f[..., -1], 2) * p0 - wsum_mem
    if co.c is None:
        return p, -wsum_mom
    assert co.e_last is not None
    return p + _bc(co.c[..., -1], 2) * s0, _bc(co.e_last, 2) * s0 - wsum_mom


def _read_dual(
    p0: Params, s0: Params, q: Tensor, co: _Coeffs, fac: dict[str, tuple[Tensor, Tensor]],
    activation: str, residual: bool,
) -> Tensor:  # fmt: skip
    """y_j = M_j(q_j) with the in-chunk state, without forming per-token weights (dual form).

    Layer by layer, W_j h_j = f_j W_0 h_j + c_j S_0 h_j - sum_l mem[j, l] (x_l . h_j) g_l: an
    [n, n] score matrix per layer instead of [n, Dout, Din] weights.
    """
    act = ACTIVATIONS[activation]
    h = q
    for i in range(len(fac), 0, -1):
        name = f"W{i}"
        g, x = fac[name]
        z = _bc(co.f, 1) * (h @ p0[name].mT) - ((h @ x.mT) * co.mem) @ g
        if co.c is not None:
            z = z + _bc(co.c, 1) * (h @ s0[name].mT)
        h = act(z) if i > 1 else z
    return h + q if residual else h


def _chunk_analytic(
    at: Params, p0: Params, s0: Params, q: Tensor, k: Tensor, v: Tensor, co: _Coeffs,
    read: str, opts: dict[str, Any],
) -> tuple[Tensor, Params, Params]:  # fmt: skip
    """One chunk on the fast path: (y [B, H, n, Dv], M_n, S_n)."""
    fac = factored_grads(at, k, v, **opts)
    p1, s1 = {}, {}
    for name, (g, x) in fac.items():
        wsum_mem = (g * co.mem[..., -1, :].unsqueeze(-1)).mT @ x  # sum_l w_l g_l x_l^T
        wsum_mom = (g * co.mom.unsqueeze(-1)).mT @ x
        p1[name], s1[name] = _state_update(p0[name], s0[name], co, wsum_mem, wsum_mom)
    if read == "chunk_start":
        y = mlp_apply(at, q, opts["activation"], opts["residual"])
    else:
        y = _read_dual(p0, s0, q, co, fac, opts["activation"], opts["residual"])
    return y, p1, s1


def _chunk_vmap(
    at: Params, p0: Params, s0: Params, q: Tensor, k: Tensor, v: Tensor, co: _Coeffs,
    read: str, opts: dict[str, Any],
) -> tuple[Tensor, Params, Params]:  # fmt: skip
    """One chunk on the generic path: materialised gradients and per-token weights."""
    u = vmap_grads(at, k, v, **opts)
    p1, s1 = {}, {}
    for name, un in u.items():
        wsum_mem = torch.einsum("bhl,bhloi->bhoi", co.mem[..., -1, :], un)
        wsum_mom = torch.einsum("bhl,bhloi->bhoi", co.mom, un)
        p1[name], s1[name] = _state_update(p0[name], s0[name], co, wsum_mem, wsum_mom)
    if read == "chunk_start":
        return mlp_apply(at, q, opts["activation"], opts["residual"]), p1, s1
    per_token = {}
    for name, un in u.items():
        w = _bc(co.f, 2) * p0[name].unsqueeze(2) - torch.einsum("bhjl,bhloi->bhjoi", co.mem, un)
        if co.c is not None:
            w = w + _bc(co.c, 2) * s0[name].unsqueeze(2)
        per_token[name] = w  # M_j for every token j: [B, H, n, Dout, Din]
    y = mlp_apply(per_token, q, opts["activation"], opts["residual"], per_token=True)
    return y, p1, s1


def deep_memory_chunk(
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
    grads: str = "analytic",
) -> tuple[Tensor, dict[str, Any] | None]:
    """Chunk-parallel deep memory; same maths and signature as the reference.

    See :func:`nlgraph.kernels.deep_memory.deep_memory` for the arguments. ``grads`` picks the
    per-token gradient path: ``"analytic"`` (factored, fast) or ``"vmap"`` (generic, checks it).
    A carried ``state`` may stop inside a chunk: its first partial chunk keeps taking gradients at
    the carried chunk-start state, so segmenting anywhere equals one pass.
    """
    if grads not in GRADS:
        raise ValueError(f"deep_memory: grads={grads!r}, expected one of {GRADS}")
    dims = check_inputs(
        q, k, v, lr, momentum, forget, params0=params0, state=state, chunk_size=chunk_size,
        read=read, objective=objective, activation=activation, residual=residual,
    )  # fmt: skip
    params, mom, start, phase = initial_state(params0, state, dims)
    opts = {"objective": objective, "activation": activation, "residual": residual}
    step = _chunk_analytic if grads == "analytic" else _chunk_vmap
    # [B, T, H, *] -> [B, H, T, *]: heads become batch axes of every matmul.
    qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    theta = lr.transpose(1, 2)
    eta = None if momentum is None else momentum.transpose(1, 2)
    keep = None if forget is None else (1 - forget).transpose(1, 2)
    ys = []
    pos = 0
    while pos < dims.T:
        n = min(chunk_size - phase, dims.T - pos)
        sl = slice(pos, pos + n)
        at = params if phase == 0 else start  # gradients at the state of the chunk's start
        co = _Coeffs(
            theta[..., sl],
            None if eta is None else eta[..., sl],
            None if keep is None else keep[..., sl],
        )
        y, params, mom = step(at, params, mom, qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], co, read, opts)
        ys.append(y)
        start = at
        phase = (phase + n) % chunk_size
        pos += n
    y = torch.cat(ys, dim=2).transpose(1, 2)
    if not output_final_state:
        return y, None
    if phase == 0:
        start = params
    return y, final_state(params, mom, start, phase, chunk_size)
