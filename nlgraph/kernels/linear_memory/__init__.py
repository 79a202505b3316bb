"""Linear (matrix) associative memory with per-token, per-head gates.

    M_t = alpha_t M_{t-1} - b_t (M_{t-1} k_t) k_t^T + c_t v_t k_t^T,   o_t = scale * M_t q_t

Backends: ``reference`` (:mod:`.naive`, the token loop), ``chunk`` (:mod:`.chunk`, WY/UT
chunk-parallel PyTorch) and ``triton`` (:mod:`.triton`: chunk summaries in PyTorch, the scan
across chunks in Triton, as torch custom ops), registered with :mod:`nlgraph.kernels._dispatch`.
See :mod:`.api` for the instances (linear attention, DeltaNet, Gated DeltaNet, DGD, Hope's L2
form) and their equation numbers.
"""

from nlgraph.kernels import _dispatch

from .api import delta_rule, dgd, gated_delta_rule, linear_attention, linear_memory
from .chunk import linear_memory_chunk
from .naive import linear_memory_naive
from .triton import linear_memory_triton, triton_available

__all__ = [
    "linear_memory",
    "linear_attention",
    "delta_rule",
    "gated_delta_rule",
    "dgd",
    "linear_memory_naive",
    "linear_memory_chunk",
    "linear_memory_triton",
]

_dispatch.register("linear_memory", "reference", linear_memory_naive)
_dispatch.register("linear_memory", "chunk", linear_memory_chunk)
# auto picks it only for CUDA tensors (see _dispatch); the interpreter serves tests by name.
_dispatch.register("linear_memory", "triton", linear_memory_triton, available=triton_available)
