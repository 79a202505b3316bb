"""Newton–Schulz orthogonalisation (PAPER.md 2.5, Eqs. 42–44), once for both compilers.

``cubic``: ``O <- 1.5 O - 0.5 O O^T O``, one inner GD step of size 1/4 on
``1/2 ||O - g||^2 + 1/2 ||O^T O - I||^2`` from ``O = g`` (Eq. 44); ``quintic``: the tuned
polynomial of production Muon (3.4445, -4.7750, 2.0315). Both run on the wide orientation (the
smaller Gram matrix), after scaling each matrix to unit Frobenius norm.

:func:`newton_schulz` is batched over leading axes and serves the learner's rule chains (per
sample, head and layer) and the optimizer compiler (per parameter, :func:`orthogonalize_tensor`);
:func:`newton_schulz_reference` is the plain loop on one matrix it is tested against.
"""

from __future__ import annotations

import torch

__all__ = ["newton_schulz", "orthogonalize_tensor", "newton_schulz_reference"]

QUINTIC = (3.4445, -4.7750, 2.0315)


def newton_schulz(x: torch.Tensor, steps: int, variant: str, prenorm: bool = True) -> torch.Tensor:
    """Orthogonalise every matrix of ``x: [..., m, n]`` towards its polar factor: ``steps``
    iterations of ``variant`` (``"cubic"`` or ``"quintic"``), each matrix first scaled to unit
    Frobenius norm when ``prenorm``."""
    tall = x.shape[-2] > x.shape[-1]
    o = x.transpose(-1, -2) if tall else x
    if prenorm:
        o = o / torch.linalg.matrix_norm(o, keepdim=True).clamp_min(1e-7)
    a, b, c = QUINTIC
    for _ in range(steps):
        gram = o @ o.transpose(-1, -2)
        if variant == "cubic":
            o = 1.5 * o - 0.5 * gram @ o
        else:
            o = a * o + (b * gram + c * gram @ gram) @ o
    return o.transpose(-1, -2) if tall else o


def orthogonalize_tensor(
    x: torch.Tensor, steps: int, variant: str, prenorm: bool = True
) -> torch.Tensor:
    """One parameter's Newton–Schulz, Muon's convention: a matrix as it is, a tensor of more
    axes as the matrix ``[shape[0], prod(rest)]``, a vector (or scalar) scaled to unit norm
    when ``prenorm`` (else unchanged)."""
    if x.ndim < 2:
        return x / x.norm().clamp_min(1e-7) if prenorm else x
    return newton_schulz(x.reshape(x.shape[0], -1), steps, variant, prenorm).reshape(x.shape)


def newton_schulz_reference(
    x: torch.Tensor, steps: int, variant: str, prenorm: bool = True
) -> torch.Tensor:
    """:func:`orthogonalize_tensor` written plainly, one matrix at a time (the truth in tests
    and in the optimizer compiler's reference interpreter)."""
    if x.ndim < 2:
        return x / max(x.norm(), 1e-7) if prenorm else x
    o = x.reshape(x.shape[0], -1)
    if o.shape[0] > o.shape[1]:
        return newton_schulz_reference(o.T, steps, variant, prenorm).T.reshape(x.shape)
    if prenorm:
        o = o / max(o.norm(), 1e-7)
    for _ in range(steps):
        if variant == "cubic":
            o = 1.5 * o - 0.5 * o @ o.T @ o
        else:
            g = o @ o.T
            o = QUINTIC[0] * o + (QUINTIC[1] * g + QUINTIC[2] * g @ g) @ o
    return o.reshape(x.shape)
