"""The public deep-memory op: a Titans-style MLP associative memory trained in context,
chunk-parallel (Titans Eqs. 16-18, PAPER 4.1; the memory of Eq. 89, PAPER 4.4)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from nlgraph.kernels import _dispatch

__all__ = ["deep_memory"]

_OP = "deep_memory"


def deep_memory(
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
    backend: str = "auto",
    output_final_state: bool = True,
) -> tuple[Tensor, dict[str, Any] | None]:
    """A per-(batch, head) MLP memory trained in context by Titans' inner optimizer.

    Memory (PAPER 4.4, Eq. 89), depth L = len(params0), ``W1`` the output layer:
    ``M(z) = [z +] W1 s(W2 ... s(WL z))``; L = 2 is ``z + W1 s(W2 z)``, L = 1 the linear memory.

    For every token t, with t' the state at the start of t's chunk (PAPER 4.1, Titans Eqs. 16-18;
    chunk size C, C = 1 being the exact token recurrence)::

        u_t = grad_theta l(M_{t'}; k_t, v_t)     l = ||M(k) - v||^2 ("l2") or -<M(k), v> ("dot")
        S_t = eta_t S_{t-1} - theta_t u_t        (momentum=None: S_t = -theta_t u_t)
        M_t = (1 - alpha_t) M_{t-1} + S_t        (forget=None: alpha_t = 0)
        y_t = M_t(q_t)                           read="after": Titans; in-chunk updates visible
        y_t = M_{t'}(q_t)                        read="chunk_start": Hope, state C*floor((t-1)/C)
                                                 (PAPER 4.5); with C = 1, y_t = M_{t-1}(q_t)

    Args:
        q, k: ``[B, T, H, Dk]``.
        v: ``[B, T, H, Dv]``.
        lr (theta), momentum (eta), forget (alpha): ``[B, T, H]`` data-dependent gates; momentum
            and forget may be None (off). The caller picks their range (e.g. sigmoid/softplus).
        params0: initial fast weights ``{"W1": [H, Dv, Dh], "W2": [H, Dh, Dk]}`` (or with a leading
            B); ``[H, ...]`` is the shared meta-learned initial state broadcast over the batch.
            Ignored, apart from shape checks, when ``state`` is given.
        state: the ``final_state`` of a previous segment: ``{"params", "momentum",
            "chunk_start"}`` (dicts of ``[B, H, Dout, Din]``), ``"phase"`` (tokens already in the
            unfinished chunk) and ``"chunk_size"``. Segments may split anywhere, also inside a
            chunk, and then equal one pass.
        chunk_size: C, tokens whose gradients share one state.
        read: ``"after"`` or ``"chunk_start"`` (see above).
        objective: ``"l2"`` or ``"dot"``. activation: ``"silu"``, ``"gelu"``, ``"relu"``,
            ``"identity"``. residual: add ``z`` (needs Dk == Dv).
        backend: ``"auto"``, ``"reference"``, ``"chunk"`` or ``"triton"`` (float32, bfloat16 or
            float16; depth 1 or 2 within its register budget, else the chunk form with a
            one-time log message); ``NLGRAPH_BACKEND`` overrides it. ``auto`` takes triton for
            CUDA tensors other than float64 (the dispatcher asks
            :func:`.triton.triton_eligible`), and chunk otherwise.
        output_final_state: return the state dict (else None).

    Returns:
        ``y: [B, T, H, Dv]`` and the final state or None. Everything is differentiable: the outer
        loss reaches params0, q, k, v and all gates through the unrolled inner updates.

    Example:
        >>> import torch
        >>> B, T, H, D = 1, 8, 2, 4
        >>> q, k, v = (torch.randn(B, T, H, D) for _ in range(3))
        >>> p0 = {"W1": torch.zeros(H, D, 16), "W2": torch.randn(H, 16, D) / 2}
        >>> y, st = deep_memory(q, k, v, torch.full((B, T, H), 0.1), params0=p0, chunk_size=4)
        >>> y.shape, st["params"]["W1"].shape
        (torch.Size([1, 8, 2, 4]), torch.Size([1, 2, 4, 16]))
    """
    return _dispatch.call(
        _OP, backend, q.device, q, k, v, lr, momentum, forget, params0=params0, state=state,
        chunk_size=chunk_size, read=read, objective=objective, activation=activation,
        residual=residual, output_final_state=output_final_state,
    )  # fmt: skip
