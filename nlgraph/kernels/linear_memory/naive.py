"""The sequential token loop of the linear associative memory: the truth every fast path matches.

    M_t = alpha_t M_{t-1} - b_t (M_{t-1} k_t) k_t^T + c_t v_t k_t^T
        = M_{t-1} (alpha_t I - b_t k_t k_t^T) + c_t v_t k_t^T
    o_t = scale * M_t q_t        (read="after")
    o_t = scale * M_{t-1} q_t    (read="before", Hope's o_t = M_{t-1}(q_t))

Cost: T steps of O(B H Dv Dk) each, with autograd saving every state; use it for checking, not
for training.
"""

from __future__ import annotations

import torch

from ._validate import check_inputs, work_dtype

__all__ = ["linear_memory_naive"]


def linear_memory_naive(
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
    output_final_state: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the gated linear memory token by token.

    Args:
        q, k: ``[B, T, H, Dk]`` queries and keys.
        v: ``[B, T, H, Dv]`` values.
        alpha, b, c: ``[B, T, H]`` per-token, per-head scalars, or None for alpha=1, b=0, c=1.
        initial_state: ``[B, H, Dv, Dk]`` state M_0, or None for zeros.
        scale: multiplies every output.
        read: ``"after"`` (o_t = M_t q_t) or ``"before"`` (o_t = M_{t-1} q_t).
        output_final_state: return M_T as the second value (else None).

    Returns:
        ``(o, final_state)`` with o ``[B, T, H, Dv]`` and final_state ``[B, H, Dv, Dk]`` or None.
    """
    check_inputs(q, k, v, alpha, b, c, initial_state, read)
    out_dtype = q.dtype
    dt = work_dtype(out_dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    M = q.new_zeros(B, H, Dv, Dk) if initial_state is None else initial_state.to(dt)

    outs = []
    for t in range(T):
        k_t, q_t, v_t = k[:, t], q[:, t], v[:, t]  # [B, H, D]
        if read == "before":
            outs.append(torch.einsum("bhvk,bhk->bhv", M, q_t))
        new = M if alpha is None else M * alpha[:, t, :, None, None].to(dt)
        write = v_t if c is None else v_t * c[:, t, :, None].to(dt)
        if b is not None:
            # (M k) k^T is rank one: never form the Dk x Dk transition matrix.
            write = write - b[:, t, :, None].to(dt) * torch.einsum("bhvk,bhk->bhv", M, k_t)
        M = new + write[..., :, None] * k_t[..., None, :]
        if read == "after":
            outs.append(torch.einsum("bhvk,bhk->bhv", M, q_t))

    o = (torch.stack(outs, dim=1) * scale).to(out_dtype)
    final = M.to(out_dtype) if output_final_state else None
    return o, final
