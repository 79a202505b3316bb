"""The public linear-memory op and its named instances.

One matrix associative memory with per-token, per-head scalar gates, column-vector convention
(state M is ``[Dv, Dk]`` per head and the read-out is ``M @ k``, PAPER.md Sec. 0.4):

    M_t = alpha_t M_{t-1} - b_t (M_{t-1} k_t) k_t^T + c_t v_t k_t^T
        = M_{t-1} (alpha_t I - b_t k_t k_t^T) + c_t v_t k_t^T
    o_t = scale * M_t q_t       (read="after": linear attention / DeltaNet convention)
    o_t = scale * M_{t-1} q_t   (read="before": Hope's o_t = M_{t-1}(q_t), Eq. 83)

Instances (NL paper equation numbers):

- linear attention, Hebbian rule, GD on -<M k, v> (Eqs. 14-18, 64): alpha=1, b=0, c=1;
  gated / RetNet / Mamba2-style decay: alpha_t < 1, b=0.
- DeltaNet, GD on 1/2 ||M k - v||^2 (Eq. 65, column orientation M(I - beta k k^T) + beta v k^T):
  alpha=1, b=c=beta_t.
- Gated DeltaNet, alpha_t M(I - beta k k^T) + beta v k^T: b = alpha*beta, c = beta.
- DGD, the exact minimiser of 1/2 ||M k - v||^2 + 1/(2 eta) ||M - M_{t-1}||^2 (Eqs. 56-57, 112-121;
  PAPER.md 3.1): b = c = eta' = eta / (1 + eta ||k||^2), alpha = 1 or a weight-decay retention.
- Hope's literal L2 form (Eq. 88 with the L2 objective, Eq. 93): M(alpha I - eta k k^T)
  - eta (M k - v) k^T, i.e. b = 2 eta, c = eta (the decay along k is counted twice, as written).
"""

from __future__ import annotations

import torch

from nlgraph.kernels import _dispatch

from ._validate import check_inputs

__all__ = ["linear_memory", "linear_attention", "delta_rule", "gated_delta_rule", "dgd"]

_OP = "linear_memory"


def linear_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    alpha: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    c: torch.Tensor | None = None,
    *,
    initial_state: torch.Tensor | None = None,
    scale: float = 1.0,
    read: str = "after",
    chunk_size: int = 64,
    backend: str = "auto",
    output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """General gated linear memory M_t = alpha_t M_{t-1} - b_t (M_{t-1} k_t) k_t^T + c_t v_t k_t^T.

    Args:
        q, k: ``[B, T, H, Dk]`` queries and keys.
        v: ``[B, T, H, Dv]`` values.
        alpha, b, c: ``[B, T, H]`` gates, or None for alpha=1, b=0, c=1 (None also takes the
            cheaper path: b=None skips the triangular solve).
        initial_state: ``[B, H, Dv, Dk]`` M_0, or None for zeros.
        scale: multiplies every output (e.g. ``Dk ** -0.5``).
        read: ``"after"`` (o_t = M_t q_t) or ``"before"`` (o_t = M_{t-1} q_t).
        chunk_size: chunk length of the chunked backends (ignored by ``reference``).
        backend: ``"auto"``, ``"reference"`` (token loop) or ``"chunk"``; ``NLGRAPH_BACKEND``
            overrides it.
        output_final_state: return M_T (else None).

    Returns:
        ``(o [B, T, H, Dv], final_state [B, H, Dv, Dk] or None)``.

    Example:
        >>> q = k = torch.nn.functional.normalize(torch.randn(1, 8, 2, 4), dim=-1)
        >>> beta = torch.full((1, 8, 2), 0.5)
        >>> o, M = linear_memory(q, k, torch.randn(1, 8, 2, 3), b=beta, c=beta)  # DeltaNet
        >>> o.shape, M.shape
        (torch.Size([1, 8, 2, 3]), torch.Size([1, 2, 3, 4]))
    """
    check_inputs(q, k, v, alpha, b, c, initial_state, read, chunk_size)
    name = _dispatch.resolve_backend(_OP, backend, q.device)
    fn = _dispatch.get(_OP, name)
    kwargs = dict(
        initial_state=initial_state, scale=scale, read=read, output_final_state=output_final_state
    )
    if name != "reference":  # the token loop has no chunks
        kwargs["chunk_size"] = chunk_size
    return fn(q, k, v, alpha, b, c, **kwargs)


def linear_attention(q, k, v, decay=None, **kwargs):
    """(Gated) linear attention, M_t = decay_t M_{t-1} + v_t k_t^T (Eq. 64).

    ``decay``: ``[B, T, H]`` retention in [0, 1] or None (plain linear attention). Other keyword
    arguments as :func:`linear_memory`.
    """
    return linear_memory(q, k, v, decay, None, None, **kwargs)


def delta_rule(q, k, v, beta, **kwargs):
    """DeltaNet, M_t = M_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T (Eq. 65).

    ``beta``: ``[B, T, H]`` learning rates; keys are usually L2-normalised so that beta in (0, 2)
    keeps the transition contractive.
    """
    return linear_memory(q, k, v, None, beta, beta, **kwargs)


def gated_delta_rule(q, k, v, alpha, beta, **kwargs):
    """Gated DeltaNet, M_t = alpha_t M_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T.

    ``alpha``, ``beta``: ``[B, T, H]``.
    """
    return linear_memory(q, k, v, alpha, alpha * beta, beta, **kwargs)


def dgd(q, k, v, eta, weight_decay=None, **kwargs):
    """Delta gradient descent: M_t = M_{t-1}(alpha_t I - eta'_t k_t k_t^T) + eta'_t v_t k_t^T,
    eta'_t = eta_t / (1 + eta_t ||k_t||^2) (PAPER.md 3.1; Eq. 57 for ||k|| = 1).

    With alpha = 1 each step is the exact minimiser of
    1/2 ||M k_t - v_t||^2 + 1/(2 eta_t) ||M - M_{t-1}||^2.

    Args:
        eta: ``[B, T, H]`` step sizes eta_t > 0.
        weight_decay: ``[B, T, H]`` decay rate lambda_t, or None. The retention is
            alpha_t = 1 - lambda_t, applied as in Hope's Eq. 88: M(alpha I - eta' k k^T).
    """
    eta_p = eta / (1.0 + eta * (k * k).sum(-1))
    alpha = None if weight_decay is None else 1.0 - weight_decay
    return linear_memory(q, k, v, alpha, eta_p, eta_p, **kwargs)
