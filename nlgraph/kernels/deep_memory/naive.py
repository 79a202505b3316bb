"""Reference deep memory: the plain token loop, the truth every faster backend is tested against.

Per (batch, head) a small MLP memory M with fast weights is trained in context (Titans, PAPER 4.1;
Hope's memory architecture, PAPER 4.4 Eq. 89). For every token t, with t' the chunk-start state
(chunk size C; C = 1 is the exact token recurrence, PAPER 4.5):

    u_t = grad_theta l(M_{t'}; k_t, v_t)        l = ||M(k) - v||^2  or  -<M(k), v>
    S_t = eta_t S_{t-1} - theta_t u_t           (surprise momentum; eta = 0 when momentum is None)
    M_t = (1 - alpha_t) M_{t-1} + S_t           (forgetting; alpha = 0 when forget is None)
    y_t = M_t(q_t)              read="after"        (Titans)
    y_t = M_{t'}(q_t)           read="chunk_start"  (Hope: state C*floor((t-1)/C), PAPER 4.5)

Gradients use ``torch.func.grad``, which composes with outer autograd, so the outer loss reaches
params0 (the meta-learned initial state), q/k/v and every gate through the unrolled updates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from nlgraph.kernels.deep_memory._mlp import inner_loss, mlp_apply
from nlgraph.kernels.deep_memory._validate import check_inputs, final_state, initial_state

__all__ = ["deep_memory_naive"]


def deep_memory_naive(
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
) -> tuple[Tensor, dict[str, Any] | None]:
    """Token-by-token deep memory; see :func:`nlgraph.kernels.deep_memory.deep_memory`.

    Args:
        q, k: ``[B, T, H, Dk]``; v: ``[B, T, H, Dv]``.
        lr (theta), momentum (eta), forget (alpha): ``[B, T, H]``; momentum/forget may be None.
        params0: ``W{i}: [H, Dout, Din]`` or ``[B, H, Dout, Din]``.

    Returns:
        ``y: [B, T, H, Dv]`` and the final state (or None).
    """
    dims = check_inputs(
        q, k, v, lr, momentum, forget, params0=params0, state=state, chunk_size=chunk_size,
        read=read, objective=objective, activation=activation, residual=residual,
    )  # fmt: skip
    params, mom, start, phase = initial_state(params0, state, dims)

    def total_loss(p: dict[str, Tensor], k_t: Tensor, v_t: Tensor) -> Tensor:
        # Each (b, h) has its own weights, so the gradient of the sum is every (b, h) gradient.
        out = mlp_apply(p, k_t.unsqueeze(-2), activation, residual).squeeze(-2)
        return inner_loss(out, v_t, objective).sum()

    grad_fn = torch.func.grad(total_loss)
    ys = []
    for t in range(dims.T):
        if phase == 0:
            start = dict(params)  # a new chunk: gradients are taken here until the next boundary
        u = grad_fn(start, k[:, t], v[:, t])
        theta = lr[:, t, :, None, None]
        eta = 0.0 if momentum is None else momentum[:, t, :, None, None]
        keep = 1.0 if forget is None else 1 - forget[:, t, :, None, None]
        mom = {n: eta * mom[n] - theta * u[n] for n in dims.names}
        params = {n: keep * params[n] + mom[n] for n in dims.names}
        read_from = params if read == "after" else start
        ys.append(mlp_apply(read_from, q[:, t].unsqueeze(-2), activation, residual).squeeze(-2))
        phase = (phase + 1) % chunk_size
    y = torch.stack(ys, dim=1)
    if not output_final_state:
        return y, None
    if phase == 0:
        start = dict(params)
    return y, final_state(params, mom, start, phase, chunk_size)
