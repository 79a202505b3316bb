"""The in-chunk linear recurrences of the deep memory in closed form.

Titans' surprise momentum and forgetting (PAPER 4.1) over a chunk of n tokens, every u_l taken at
the chunk-start state,

    S_j = eta_j S_{j-1} - theta_j u_j,        M_j = a_j M_{j-1} + S_j,      a_j = 1 - alpha_j,

are linear in (M_0, S_0, u). With segment products D[j, l] = prod_{m=l+1..j} eta_m,
F[j, l] = prod_{m=l+1..j} a_m and prefix products e_j = prod_{m<=j} eta_m, f_j = prod_{m<=j} a_m:

    S_j = e_j S_0 - sum_l D[j, l] theta_l u_l
    M_j = f_j M_0 + (F e)_j S_0 - sum_l (F D)[j, l] theta_l u_l

(substitute the first line into M_j = f_j M_0 + sum_i F[j, i] S_i). Titans solves the momentum
part with an associative scan; for chunk-sized n an [n, n] matrix per chunk is simpler and exact.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Coeffs", "segprod", "coeffs", "chunk_lengths", "all_coeffs"]


class Coeffs(NamedTuple):
    """The scalars of one chunk's closed form (N = B * H, n tokens).

    The fast weights and their momentum travel stacked, ``[M; S]``, so one chunk is

        [M_n; S_n] = carry @ [M_0; S_0] - sum_l upd[l] (x) u_l,       M_j = ... (read-out)

    Fields:
        carry: ``[N, 2, 2]`` = [[f_n, c_n], [0, e_n]].
        upd: ``[N, n, 2]``, token l's weights in (M_n, S_n): ((F D)[n, l], D[n, l]) theta_l.
        mem: ``[N, n, n]``, mem[j, l] = (F D)[j, l] theta_l, token l's weight in M_j.
        f: ``[N, n]`` = f_j, or None without forgetting (all ones).
        mix: ``[N, n, 2]`` = (f_j, c_j), or None without momentum (S_0 then never reaches M_j).
    """

    carry: Tensor
    upd: Tensor
    mem: Tensor
    f: Tensor | None
    mix: Tensor | None


def segprod(x: Tensor) -> Tensor:
    """``[..., n] -> [..., n, n]``: out[j, l] = prod_{m=l+1..j} x_m for j >= l, else 0.

    A cumulative product down each column of a matrix holding x_j below the diagonal and 1 on and
    above it. Exact for gates equal to 0 (no division e_j / e_l) and with no need for log-space:
    every entry is a product of gates, so nothing overflows for gates in [0, 1].
    """
    n = x.shape[-1]
    below = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)
    cols = torch.where(below, x.unsqueeze(-1), torch.ones((), dtype=x.dtype, device=x.device))
    return torch.cumprod(cols, dim=-2).tril()


def coeffs(theta: Tensor, eta: Tensor | None, keep: Tensor | None) -> Coeffs:
    """Closed-form coefficients for gates ``[..., n]`` (any leading axes, e.g. many chunks).

    ``keep`` is a = 1 - alpha; None means no forgetting, ``eta`` None no momentum (eta = 0).
    """
    n = theta.shape[-1]
    one = torch.ones_like(theta[..., -1])
    zero = torch.zeros_like(one)
    if keep is None:
        seg_f, f, f_n = torch.ones(n, n, dtype=theta.dtype, device=theta.device).tril(), None, one
    else:
        seg_f, f = segprod(keep), torch.cumprod(keep, dim=-1)
        f_n = f[..., -1]
    if eta is None:  # D = I, e = 0: S_n = -theta_n u_n and S_0 is dropped
        mem = seg_f * theta.unsqueeze(-2)
        last = torch.zeros(n, dtype=theta.dtype, device=theta.device)
        last[-1] = 1
        upd = torch.stack([mem[..., -1, :], last * theta], dim=-1)
        carry = torch.stack([torch.stack([f_n, zero], -1), torch.stack([zero, zero], -1)], -2)
        return Coeffs(carry, upd, mem, f, None)
    seg_d = segprod(eta)
    e = torch.cumprod(eta, dim=-1)
    c = (seg_f @ e.unsqueeze(-1)).squeeze(-1)
    mem = (seg_f @ seg_d) * theta.unsqueeze(-2)
    upd = torch.stack([mem[..., -1, :], seg_d[..., -1, :] * theta], dim=-1)
    carry = torch.stack(
        [torch.stack([f_n, c[..., -1]], -1), torch.stack([zero, e[..., -1]], -1)], -2
    )
    mix = torch.stack([torch.ones_like(c) if f is None else f, c], dim=-1)
    return Coeffs(carry, upd, mem, f, mix)


def chunk_lengths(T: int, C: int, phase: int) -> list[int]:
    """Lengths of the chunks that T tokens fall into when ``phase`` tokens of a chunk are done."""
    lengths = []
    while T > 0:
        n = min(C - phase, T)
        lengths.append(n)
        T -= n
        phase = 0
    return lengths


def all_coeffs(
    theta: Tensor, eta: Tensor | None, keep: Tensor | None, lengths: list[int]
) -> list[Coeffs]:
    """Coefficients of every chunk for gates ``[N, T]``, one batched call per run of equal lengths.

    Runs are cut with one slice and ``unbind`` (whose backward is one stack), never with a slice
    per chunk: each slice's backward writes a zero-filled full-length gradient, which made the
    backward pass quadratic in T.
    """
    out: list[Coeffs] = []
    pos = i = 0
    while i < len(lengths):
        n, r = lengths[i], 1
        while i + r < len(lengths) and lengths[i + r] == n:
            r += 1
        gates = (
            None if x is None else x[:, pos : pos + r * n].unflatten(-1, (r, n))
            for x in (theta, eta, keep)
        )
        run = coeffs(*gates)  # every field [N, r, ...]
        fields = [None if x is None else x.unbind(1) for x in run]
        out.extend(Coeffs(*(None if x is None else x[j] for x in fields)) for j in range(r))
        pos, i = pos + r * n, i + r
    return out
