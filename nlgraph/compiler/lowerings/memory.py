"""The module of a fast memory's lowering, by the type of its configuration."""

from __future__ import annotations

import torch

from nlgraph.compiler import ir
from nlgraph.compiler.lowerings._owner import MemoryOwner
from nlgraph.compiler.lowerings.attention import Attention
from nlgraph.compiler.lowerings.deep_memory import DeepMemory
from nlgraph.compiler.lowerings.linear_memory import LinearMemory
from nlgraph.compiler.lowerings.reference_loop import ReferenceLoop

__all__ = ["memory_module"]

_MODULES: dict[type, type[MemoryOwner]] = {
    ir.LinearMemoryConfig: LinearMemory,
    ir.DeepMemoryConfig: DeepMemory,
    ir.AttentionConfig: Attention,
    ir.ReferenceLoopConfig: ReferenceLoop,
    ir.ClusterMemberConfig: MemoryOwner,  # its recurrences run in its cluster
}


def memory_module(
    cfg: ir.MemoryConfig,
    initial: dict[str, torch.Tensor],
    meta: bool,
    scalars: dict[str, float],
    cut: bool = False,
) -> MemoryOwner:
    """The lowering module of a memory (``cfg``'s type picks it), owning its initial tensors
    (parameters when ``meta``) and learned scalars (raw initial values by field)."""
    return _MODULES[type(cfg)](cfg, initial, meta, scalars, cut)
