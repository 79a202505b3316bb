"""The MLP memory's forward per (batch, head), with its layer inputs and pre-activations, and the
activations' derivatives: what the cluster lowering differentiates by hand (``delta x^T`` per
layer) and the read-only pass reads."""

from __future__ import annotations

import math

import torch

from nlgraph.compiler.modules import ACT
from nlgraph.kernels.deep_memory import mlp_layers

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
    """Per-(batch, head) MLP memory: ``ws`` in application order, each ``[B, H, out, in]``;
    ``x`` ``[B, C, H, in]``. Returns the output and the per-layer inputs and pre-activations
    (:func:`nlgraph.kernels.deep_memory.mlp_layers` on the head-major views)."""
    out, inputs, pre = mlp_layers(ws, x.transpose(1, 2), ACT[act], residual)
    return (
        out.transpose(1, 2),
        [t.transpose(1, 2) for t in inputs],
        [t.transpose(1, 2) for t in pre],
    )
