"""Chunk-parallel deep memory: per chunk, all token gradients at once and a closed-form scan.

Within a chunk of n tokens every gradient is taken at the chunk-start state (Titans Eqs. 16-18,
PAPER 4.1 and 4.5), so u_1..u_n come from one batched pass, and the momentum/forgetting
recurrences are applied in closed form (:mod:`._scan`), with each layer's weights and momentum
stacked as one ``[N, 2, Dout, Din]`` tensor:

    [M_n; S_n] = carry [M_0; S_0] - sum_l upd[l] (x) u_l,
    M_j        = f_j M_0 + c_j S_0 - sum_l mem[j, l] u_l          (read-out of token j).

Only the Python loop over chunks is serial.

Fast path (``grads="analytic"``): token l's gradient of layer i is an outer product g_l x_l^T
(:func:`factored_grads`), so the new stacked state is one ``baddbmm`` ``(upd * g)^T x``, and the
read-out ``M_j(q_j)`` with the in-chunk state (read="after") is evaluated layer by layer without
forming per-token weights, as in TTT's dual form:

    W_j h_j = f_j W_0 h_j + c_j S_0 h_j - sum_l mem[j, l] (x_l . h_j) g_l

Generic path (``grads="vmap"``): ``vmap(grad)`` materialises u_l as ``[N, n, Dout, Din]`` and the
read-out materialises the per-token weights M_j; slower and O(n Dout Din) memory per layer, but
it uses nothing of the MLP's structure, so it checks the fast path.

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


def _carry(ps: Tensor, co: Coeffs) -> Tensor:
    """``carry @ [M_0; S_0]`` for one layer's stacked state ``[N, 2, Dout, Din]``.

    One tiny bmm instead of three scalar-times-matrix products (and their backward sums).
    """
    return (co.carry @ ps.flatten(2)).view(ps.shape)


def _read_dual(
    ps: Params, q: Tensor, co: Coeffs, fac: dict[str, tuple[Tensor, Tensor]],
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
        if co.mix is None:  # no momentum: M_j = f_j M_0 - sum_l mem[j, l] u_l
            base = h @ ps[name][:, 0].mT
            if co.f is not None:
                base = base * co.f.unsqueeze(-1)
        else:  # f_j M_0 h_j + c_j S_0 h_j from one bmm against the stacked [M_0; S_0]
            both = (h @ ps[name].flatten(1, 2).mT).unflatten(-1, (2, -1))  # [N, n, 2, Dout]
            base = (both * co.mix.unsqueeze(-1)).sum(-2)
        z = torch.baddbmm(base, (h @ x.mT) * co.mem, g, alpha=-1)
        h = act(z) if i > 1 else z
    return h + q if residual else h


def _chunk_analytic(
    at: Params, ps: Params, q: Tensor, k: Tensor, v: Tensor, co: Coeffs, read: str,
    opts: dict[str, Any],
) -> tuple[Tensor, Params]:  # fmt: skip
    """One chunk on the fast path: (y [N, n, Dv], stacked [M_n; S_n] per layer)."""
    fac = factored_grads(at, k, v, **opts)
    ps1 = {}
    for name, (g, x) in fac.items():
        N, _, Dout, Din = ps[name].shape
        # sum_l upd[l] (x) g_l x_l^T for M and S at once: one baddbmm over 2 * Dout rows.
        g2 = (co.upd.unsqueeze(-1) * g.unsqueeze(-2)).flatten(2)  # [N, n, 2 * Dout]
        carry = _carry(ps[name], co).view(N, 2 * Dout, Din)
        ps1[name] = torch.baddbmm(carry, g2.mT, x, alpha=-1).view(N, 2, Dout, Din)
    if read == "chunk_start":
        y = mlp_apply(at, q, opts["activation"], opts["residual"])
    else:
        y = _read_dual(ps, q, co, fac, opts["activation"], opts["residual"])
    return y, ps1


def _chunk_vmap(
    at: Params, ps: Params, q: Tensor, k: Tensor, v: Tensor, co: Coeffs, read: str,
    opts: dict[str, Any],
) -> tuple[Tensor, Params]:  # fmt: skip
    """One chunk on the generic path: materialised gradients and per-token weights."""
    u = vmap_grads(at, k, v, **opts)  # W{i}: [N, n, Dout, Din]
    ps1 = {n: _carry(ps[n], co) - torch.einsum("nlk,nloi->nkoi", co.upd, u[n]) for n in u}
    if read == "chunk_start":
        return mlp_apply(at, q, opts["activation"], opts["residual"]), ps1
    per_token = {}
    for name, un in u.items():
        m0, s0 = ps[name][:, None, 0], ps[name][:, None, 1]
        w = m0 if co.f is None else co.f[..., None, None] * m0
        if co.mix is not None:
            w = w + co.mix[..., 1, None, None] * s0
        per_token[name] = w - torch.einsum("njl,nloi->njoi", co.mem, un)  # M_j: [N, n, Do, Di]
    y = mlp_apply(per_token, q, opts["activation"], opts["residual"], per_token=True)
    return y, ps1


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
    params, mom, start, phase = initial_state(params0, state, dims)
    # Flatten (B, H) to N and stack each layer's weights with its momentum: [N, 2, Dout, Din].
    ps = {n: torch.stack([params[n], mom[n]], dim=2).flatten(0, 1) for n in dims.names}
    start = {n: w.flatten(0, 1) for n, w in start.items()}
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
        # Gradients at the state of the chunk's start: the carried one for a chunk begun in an
        # earlier segment.
        at = {name: w[:, 0] for name, w in ps.items()} if phase == 0 else start
        y, ps = step(at, ps, qc, kc, vc, co, read, opts)
        ys.append(y)
        start = at
        phase = (phase + n) % chunk_size
    y = torch.cat(ys, dim=1).reshape(B, H, T, dims.Dv).transpose(1, 2).contiguous()
    if not output_final_state:
        return y, None
    if phase == 0:
        start = {name: w[:, 0] for name, w in ps.items()}

    def unflat(p: Params, part: int | None = None) -> Params:
        return {n: (w if part is None else w[:, part]).unflatten(0, (B, H)) for n, w in p.items()}

    return y, final_state(unflat(ps, 0), unflat(ps, 1), unflat(start), phase, chunk_size)
