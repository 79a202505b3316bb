"""The public momentum-memory op: one window of the self-modifying Titans inner step.

Per batch and head, keys x_t, error terms delta_t (signed and scaled by the step size), gates
b_t (the x x^T decay of DGD; None for plain GD), a_t (retention; None for 1) and mu_t
(momentum), for t = 1..C:

    S_t = mu_t S_{t-1} + delta_t x_t^T
    W_t = W_{t-1} (a_t I - b_t x_t x_t^T) + S_t

(NL paper Eq. 88 per layer with a momentum buffer; PAPER.md 3.1 and 4.5). With delta = -lr' e
and b = lr' = lr / (1 + lr ||x||^2) it is exact DGD with momentum on 1/2 ||W x - v||^2.
"""

from __future__ import annotations

import torch

from nlgraph.kernels import _dispatch

from ._validate import check_inputs

__all__ = ["momentum_memory"]

_OP = "momentum_memory"


def momentum_memory(
    x: torch.Tensor,
    delta: torch.Tensor,
    b: torch.Tensor | None,
    a: torch.Tensor | None,
    mu: torch.Tensor,
    w0: torch.Tensor,
    s0: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and momentum ``(W_C, S_C)`` at the end of a window of C tokens.

    Args:
        x: ``[B, C, H, I]`` keys (the layer's inputs).
        delta: ``[B, C, H, O]`` signed, scaled error terms.
        b: ``[B, C, H]`` or None (plain GD).
        a: ``[B, C, H]`` retention or None (a = 1).
        mu: ``[B, C, H]`` momentum gates.
        w0, s0: ``[B, H, O, I]`` weights and momentum at the window start.
        backend: ``"auto"``, ``"reference"`` (token loop), ``"chunk"`` (closed form in PyTorch)
            or ``"triton"`` (one kernel per window; float32/bfloat16/float16, C <= 64);
            ``NLGRAPH_BACKEND`` overrides it. ``auto`` takes triton for CUDA tensors it can
            serve (the dispatcher asks :func:`.triton.triton_eligible`) and chunk otherwise.

    Returns:
        ``(W_C, S_C)``, both ``[B, H, O, I]``.

    Example:
        >>> x = torch.nn.functional.normalize(torch.randn(2, 8, 3, 5), dim=-1)
        >>> delta, gate = torch.randn(2, 8, 3, 4), torch.full((2, 8, 3), 0.5)
        >>> w, s = momentum_memory(x, delta, gate, None, gate, torch.zeros(2, 3, 4, 5),
        ...                        torch.zeros(2, 3, 4, 5))
        >>> w.shape, s.shape
        (torch.Size([2, 3, 4, 5]), torch.Size([2, 3, 4, 5]))
    """
    check_inputs(x, delta, b, a, mu, w0, s0)
    return _dispatch.call(_OP, backend, x.device, x, delta, b, a, mu, w0, s0)
