"""The memory network of the deep memory op: an MLP with fast weights, its inner loss and gradients.

Layers follow the paper's numbering (PAPER 4.4, Eq. 89): for depth L the key enters ``W{L}`` and
``W1`` produces the read-out,

    M(z) = [z +] W1 s(W2 s(... s(WL z)))          (L = 2:  M(z) = z + W1 s(W2 z),  Eq. 89)

with ``W{i}: [Dout_i, Din_i]`` (column-vector convention, PAPER 0.4), ``s`` the activation and the
residual ``z +`` only when Dk == Dv. Depth 1 is the linear memory ``M(z) = [z +] W1 z``. No biases:
the paper's memories have none and they would only add a rank-1 term to every update.

Inner objectives (PAPER 4.1, 4.4):  ``"l2"``: l = ||M(k) - v||^2 (no 1/2, as in Titans), and
``"dot"``: l = -<M(k), v>.

Two ways to get every token's gradient at one shared state are provided: ``factored_grads`` (the
fast path, analytic backprop giving each layer's gradient as a rank-1 outer product
``grad W{i} = g_i x_i^T`` that is never materialised) and ``vmap_grads`` (the generic path,
``torch.func.vmap(torch.func.grad(...))``, materialising ``[..., n, Dout, Din]``). The two are
checked against each other in the tests.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "OBJECTIVES",
    "layer_names",
    "mlp_layers",
    "mlp_apply",
    "inner_loss",
    "factored_grads",
    "vmap_grads",
]

Params = dict[str, Tensor]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,  # the exact (erf) form, which ACT_BACKWARD's gelu_backward differentiates
    "relu": F.relu,
    "identity": lambda z: z,
}
OBJECTIVES = ("l2", "dot")


def layer_names(depth: int) -> list[str]:
    """``["W1", ..., "W{depth}"]``: output layer first, as in Eq. 89."""
    return [f"W{i}" for i in range(1, depth + 1)]


def _silu_backward(grad: Tensor, z: Tensor) -> Tensor:
    # silu'(z) = s (1 + z (1 - s)), s = sigmoid(z). Written out: ATen's fused silu_backward has
    # no derivative formula, and meta-gradients must differentiate this.
    s = torch.sigmoid(z)
    return grad * (s * (1 + z * (1 - s)))


def _relu_backward(grad: Tensor, z: Tensor) -> Tensor:
    return grad * (z > 0).to(grad.dtype)  # autograd's convention: relu'(0) = 0


# grad * s'(z) for each activation. gelu uses ATen's fused (exact, erf) gelu_backward, which has a
# double-backward formula, so outer autograd differentiates through it.
ACT_BACKWARD: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "silu": _silu_backward,
    "gelu": torch.ops.aten.gelu_backward,
    "relu": _relu_backward,
    "identity": lambda grad, z: grad,
}


def _linear(w: Tensor, x: Tensor, per_token: bool) -> Tensor:
    if per_token:  # w: [..., n, Dout, Din] one matrix per token, x: [..., n, Din]
        return (x.unsqueeze(-2) @ w.mT).squeeze(-2)
    return x @ w.mT  # w: [..., Dout, Din] shared by every row of x: [..., n, Din]


def mlp_layers(
    ws: list[Tensor],
    x: Tensor,
    act: Callable[[Tensor], Tensor],
    residual: bool,
    per_token: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The MLP memory's forward (Eq. 89) with what a hand-written backward needs: the output
    ``[..., n, Dv]``, each layer's input and each layer's pre-activation, in application order.

    ``ws``: the layers in application order (``W{L}`` first, ``W1`` last), each
    ``[..., Dout, Din]`` (with ``per_token=True`` one matrix per token, ``[..., n, Dout, Din]``);
    ``x``: ``[..., n, Dk]``; ``act``: the activation between layers. The one MLP memory forward
    of nlgraph: the kernels' :func:`mlp_apply` and :func:`factored_grads` and the compiler's
    lowerings call it; ``naive.py`` is checked against it.
    """
    h, inputs, pre = x, [], []
    for i, w in enumerate(ws):
        inputs.append(h)
        z = _linear(w, h, per_token)
        pre.append(z)
        h = act(z) if i < len(ws) - 1 else z
    return (h + x if residual else h), inputs, pre


def mlp_apply(
    params: Params, x: Tensor, activation: str, residual: bool, per_token: bool = False
) -> Tensor:
    """M(x) for params ``W{i}: [..., Dout, Din]`` and ``x: [..., n, Dk]``; returns ``[..., n, Dv]``.

    With ``per_token=True`` the params carry the token axis, ``W{i}: [..., n, Dout, Din]``.
    """
    ws = [params[f"W{i}"] for i in range(len(params), 0, -1)]
    return mlp_layers(ws, x, ACTIVATIONS[activation], residual, per_token)[0]


def inner_loss(out: Tensor, v: Tensor, objective: str) -> Tensor:
    """Per-row inner loss over the last axis: ``||out - v||^2`` or ``-<out, v>``."""
    if objective == "l2":
        return (out - v).square().sum(-1)
    return -(out * v).sum(-1)


def factored_grads(
    params: Params, k: Tensor, v: Tensor, *, objective: str, activation: str, residual: bool
) -> dict[str, tuple[Tensor, Tensor]]:
    """Every token's gradient of the inner loss at one shared state, in factored form.

    Args:
        params: ``W{i}: [..., Dout, Din]`` (the chunk-start state; ``...`` is e.g. B * H).
        k: ``[..., n, Dk]``; v: ``[..., n, Dv]``.

    Returns:
        ``{"W{i}": (g, x)}`` with ``g: [..., n, Dout]``, ``x: [..., n, Din]`` such that token
        ``t``'s gradient is ``grad_{W{i}} l(M; k_t, v_t) = g[..., t, :] outer x[..., t, :]``.
        Memory O(n * sum (Dout + Din)), against O(n * sum Dout * Din) when materialised.
    """
    depth = len(params)
    ws = [params[f"W{i}"] for i in range(depth, 0, -1)]
    out, ins, pres = mlp_layers(ws, k, ACTIVATIONS[activation], residual)
    # layer W{i} is applied (depth - i)-th
    inputs = {i: ins[depth - i] for i in range(1, depth + 1)}
    pre = {i: pres[depth - i] for i in range(1, depth + 1)}
    # dl/dout; the residual path carries no parameters so it only enters through ``out``.
    g = 2 * (out - v) if objective == "l2" else -v.expand_as(out)
    grads: dict[str, tuple[Tensor, Tensor]] = {}
    for i in range(1, depth + 1):
        grads[f"W{i}"] = (g, inputs[i])
        if i < depth:  # back through W{i} and the activation that produced its input
            g = ACT_BACKWARD[activation](g @ params[f"W{i}"], pre[i + 1])
    return grads


def vmap_grads(
    params: Params, k: Tensor, v: Tensor, *, objective: str, activation: str, residual: bool
) -> Params:
    """Every token's gradient, materialised: ``W{i}: [..., n, Dout, Din]``.

    The generic path: ``torch.func.vmap`` over the leading axes and the tokens of
    ``torch.func.grad`` of the single-sample loss (params ``[..., Dout, Din]``, k ``[..., n, Dk]``).
    It composes with outer autograd, so meta-gradients flow through it.
    """

    def loss_one(p: Params, k1: Tensor, v1: Tensor) -> Tensor:
        out = mlp_apply(p, k1.unsqueeze(0), activation, residual)[0]
        return inner_loss(out, v1, objective)

    fn = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))  # over tokens
    for _ in range(next(iter(params.values())).ndim - 2):  # over each leading axis
        fn = torch.func.vmap(fn, in_dims=(0, 0, 0))
    return fn(params, k, v)
