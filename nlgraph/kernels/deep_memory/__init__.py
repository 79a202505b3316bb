"""Titans-style deep (MLP) associative memory trained in context, chunk-parallel.

Backends (registered with :mod:`nlgraph.kernels._dispatch` as op ``"deep_memory"``):
``reference`` (:mod:`.naive`, the token loop), ``chunk`` (:mod:`.chunk`, batched PyTorch per
chunk) and ``triton`` (:mod:`.triton`, the whole chunk loop in one kernel per (batch, head) with
the fast weights in registers, as the custom op ``nlgraph::deep_memory``; depth 1 or 2 memories
that fit its register budget, the chunk form for the others). See :mod:`.api` for the public op.
"""

from nlgraph.kernels import _dispatch

from ._mlp import mlp_layers
from .api import deep_memory
from .chunk import deep_memory_chunk
from .naive import deep_memory_naive
from .triton import deep_memory_triton, triton_available, triton_eligible

__all__ = [
    "deep_memory", "deep_memory_naive", "deep_memory_chunk", "deep_memory_triton", "mlp_layers",
]  # fmt: skip

_dispatch.register("deep_memory", "reference", deep_memory_naive)
_dispatch.register("deep_memory", "chunk", deep_memory_chunk)
# auto picks it only for CUDA tensors it can take (see _dispatch); the interpreter serves tests
# by name.
_dispatch.register(
    "deep_memory", "triton", deep_memory_triton,
    available=triton_available, eligible=triton_eligible,
)  # fmt: skip
