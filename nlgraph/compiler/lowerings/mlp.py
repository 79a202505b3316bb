"""The MLP memory's forward per (batch, head), with its layer inputs and pre-activations, and the
activations' derivatives: what the cluster lowering differentiates by hand (``delta x^T`` per
layer) and the read-only pass reads."""

from __future__ import annotations

import math

import torch

from nlgraph.compiler.modules import ACT

__all__ = ["mlp_forward", "act_grad"]


def act_grad(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if name == "relu":
        return (z > 0).to(z.dtype)
    if name == "tanh":
        return 1 - torch.tanh(z) ** 2
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    if name == "gelu":
        return 0.5 * (1 + torch.erf(z / math.sqrt(2))) + z * torch.exp(-0.5 * z * z) / math.sqrt(
            2 * math.pi
        )
    return torch.ones_like(z)


def mlp_forward(ws: list[torch.Tensor], x: torch.Tensor, act: str, residual: bool):
    """Per-(batch, head) MLP: ``ws`` in application order, each ``[B, H, out, in]``; ``x``
    ``[B, C, H, in]``. Returns the output and the per-layer inputs and pre-activations."""
    h, inputs, pre = x, [], []
    for i, w in enumerate(ws):
        inputs.append(h)
        z = torch.einsum("bhoi,bchi->bcho", w, h)
        pre.append(z)
        h = ACT[act](z) if i < len(ws) - 1 else z
    return (x + h if residual else h), inputs, pre
