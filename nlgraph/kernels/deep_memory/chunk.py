"""Chunk-parallel deep memory: per chunk, all token gradients at once and a closed-form scan.

Within a chunk of n tokens every gradient is taken at the chunk-start state (Titans Eqs. 16-18,
PAPER 4.1 and 4.5), so u_1..u_n come from one batched pass, and the momentum/forgetting
recurrences are applied in closed form (:mod:`._scan`):

    M_j = f_j M_0 + c_j S_0 - sum_l mem[j, l] u_l,       S_n = e_n S_0 - sum_l mom[l] u_l.

Only the Python loop over chunks is serial.

Fast path (``grads="analytic"``): token l's gradient of layer i is an outer product g_l x_l^T
(:func:`factored_grads`), so the new state is one ``baddbmm`` ``(w * g)^T x``, and the read-out
``M_j(q_j)`` with the in-chunk state (read="after") is evaluated layer by layer without forming
per-token weights, as in TTT's dual form:

    W_j h_j = f_j W_0 h_j + c_j S_0 h_j - sum_l mem[j, l] (x_l . h_j) g_l

Generic path (``grads="vmap"``): ``vmap(grad)`` materialises u_l as ``[N, n, Dout, Din]`` and the
read-out materialises the per-token weights M_j (the brief's construction); slower, but it uses
nothing of the MLP's structure, so it checks the fast path.

Layout: batch and heads are flattened to N = B * H so every matmul is a plain 3-D ``bmm``
(4-D ``matmul`` adds reshape/expand nodes to every op, forward and backward).
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
from nlgraph.kernels.deep_memory._scan import Coeffs, all_coeffs, chunk_lengths
from nlgraph.kernels.deep_memory._validate import check_inputs, final_state, initial_state

__all__ = ["deep_memory_chunk", "GRADS"]

GRADS = ("analytic", "vmap")


def _col(x: Tensor) -> Tensor:
    return x[..., None, None] if x.ndim == 1 else x[..., None]


def _carry(p0: Tensor, s0: Tensor, co: Coeffs) -> tuple[Tensor, Tensor | None]:
    """The start-state part of (M_n, S_n): ``f_n M_0 + c_n S_0`` and ``e_n S_0`` (or None)."""
    p = p0 if co.f is None else _col(co.f[:, -1]) * p0
    if co.c is None:
        return p, None
    assert co.e_last is not None
    return torch.addcmul(p, _col(co.c[:, -1]), s0), _col(co.e_last) * s0


def _read_dual(
    p0: Params, s0: Params, q: Tensor, co: Coeffs, fac: dict[str, tuple[Tensor, Tensor]],
    activation: str, residual: bool,
) -> Tensor:  # fmt: skip
    """y_j = M_j(q_j) with the in-chunk state, never forming per-token weights (dual form).

    Per layer an [n, n] score matrix (x_l . h_j) instead of [n, Dout, Din] weights.
    """
    act = ACTIVATIONS[activation]
    h = q
    for i in range(len(fac), 0, -1):
        name = f"W{i}"
        g, x = fac[name]
        base = h @ p0[name].mT
        if co.f is not None:
            base = base * _col(co.f)
        if co.c is not None:
            base = torch.addcmul(base, _col(co.c), h @ s0[name].mT)
        z = torch.baddbmm(base, (h @ x.mT) * co.mem, g, alpha=-1)
        h = act(z) if i > 1 else z
    return h + q if residual else h


def _chunk_analytic(
    at: Params, p0: Params, s0: Params, q: Tensor, k: Tensor, v: Tensor, co: Coeffs,
    read: str, opts: dict[str, Any],
) -> tuple[Tensor, Params, Params]:  # fmt: skip
    """One chunk on the fast path: (y [N, n, Dv], M_n, S_n)."""
    fac = factored_grads(at, k, v, **opts)
    p1, s1 = {}, {}
    for name, (g, x) in fac.items():
        p_carry, s_carry = _carry(p0[name], s0[name], co)
        # sum_l w_l u_l = (w * g)^T x: the whole chunk's update in one (b)addbmm.
        p1[name] = torch.baddbmm(p_carry, (g * _col(co.mem[:, -1])).mT, x, alpha=-1)
        g_mom = (g * _col(co.mom)).mT
        s1[name] = -(g_mom @ x) if s_carry is None else torch.baddbmm(s_carry, g_mom, x, alpha=-1)
    if read == "chunk_start":
        y = mlp_apply(at, q, opts["activation"], opts["residual"])
    else:
        y = _read_dual(p0, s0, q, co, fac, opts["activation"], opts["residual"])
    return y, p1, s1


def _chunk_vmap(
    at: Params, p0: Params, s0: Params, q: Tensor, k: Tensor, v: Tensor, co: Coeffs,
    read: str, opts: dict[str, Any],
) -> tuple[Tensor, Params, Params]:  # fmt: skip
    """One chunk on the generic path: materialised gradients and per-token weights."""
    u = vmap_grads(at, k, v, **opts)  # W{i}: [N, n, Dout, Din]
    p1, s1 = {}, {}
    for name, un in u.items():
        p_carry, s_carry = _carry(p0[name], s0[name], co)
        p1[name] = p_carry - torch.einsum("nl,nloi->noi", co.mem[:, -1], un)
        s_new = torch.einsum("nl,nloi->noi", co.mom, un)
        s1[name] = -s_new if s_carry is None else s_carry - s_new
    if read == "chunk_start":
        return mlp_apply(at, q, opts["activation"], opts["residual"]), p1, s1
    per_token = {}
    for name, un in u.items():
        w = p0[name].unsqueeze(1) - torch.einsum("njl,nloi->njoi", co.mem, un)
        if co.f is not None:
            w = w + (_col(co.f)[..., None] - 1) * p0[name].unsqueeze(1)
        if co.c is not None:
            w = w + _col(co.c)[..., None] * s0[name].unsqueeze(1)
        per_token[name] = w  # M_j for every token j: [N, n, Dout, Din]
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
    """Chunk-parallel deep memory; the reference's maths and signature.

    See :func:`nlgraph.kernels.deep_memory.deep_memory` for the arguments. ``grads`` picks the
    per-token gradient path: ``"analytic"`` (factored, fast) or ``"vmap"`` (generic, checks it).
    A carried ``state`` may stop inside a chunk: the first partial chunk keeps taking gradients at
    the carried chunk-start state, so segmenting anywhere equals one pass.
    """
    if grads not in GRADS:
        raise ValueError(f"deep_memory: grads={grads!r}, expected one of {GRADS}")
    dims = check_inputs(
        q, k, v, lr, momentum, forget, params0=params0, state=state, chunk_size=chunk_size,
        read=read, objective=objective, activation=activation, residual=residual,
    )  # fmt: skip
    B, T, H = dims.B, dims.T, dims.H
    params, mom, start, phase = (
        {n: w.reshape(B * H, *w.shape[2:]) for n, w in part.items()} if isinstance(part, dict)
        else part
        for part in initial_state(params0, state, dims)
    )  # fmt: skip
    opts = {"objective": objective, "activation": activation, "residual": residual}
    step = _chunk_analytic if grads == "analytic" else _chunk_vmap

    def flat(x: Tensor) -> Tensor:  # [B, T, H, *] -> [B * H, T, *]
        return x.transpose(1, 2).reshape(B * H, T, *x.shape[3:])

    theta = flat(lr)
    eta = None if momentum is None else flat(momentum)
    keep = None if forget is None else flat(1 - forget)
    lengths = chunk_lengths(T, chunk_size, phase)
    coeffs = all_coeffs(theta, eta, keep, lengths)
    # One split per input (backward: one cat), not a slice per chunk (see all_coeffs).
    qs, ks, vs = (torch.split(flat(x), lengths, dim=1) for x in (q, k, v))
    ys = []
    for n, co, qc, kc, vc in zip(lengths, coeffs, qs, ks, vs, strict=True):
        at = params if phase == 0 else start  # gradients at the state of the chunk's start
        y, params, mom = step(at, params, mom, qc, kc, vc, co, read, opts)
        ys.append(y)
        start = at
        phase = (phase + n) % chunk_size
    y = torch.cat(ys, dim=1).reshape(B, H, T, dims.Dv).transpose(1, 2).contiguous()
    if not output_final_state:
        return y, None
    if phase == 0:
        start = params

    def unflat(p: Params) -> Params:
        return {n: w.reshape(B, H, *w.shape[1:]) for n, w in p.items()}

    return y, final_state(unflat(params), unflat(mom), unflat(start), phase, chunk_size)
