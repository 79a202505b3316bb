"""Momentum memory: one window of the self-modifying Titans inner step (DGD with retention and
a momentum buffer), per batch and head:

    S_t = mu_t S_{t-1} + delta_t x_t^T,     W_t = W_{t-1} (a_t I - b_t x_t x_t^T) + S_t

Backends: ``reference`` (:mod:`.naive`, the token loop), ``chunk`` (:mod:`.chunk`, the closed
form with one C x C triangular solve, batched PyTorch) and ``triton`` (:mod:`.triton`, the same
closed form in one kernel per window, as torch custom ops), registered with
:mod:`nlgraph.kernels._dispatch`. See :mod:`.api` for the public op.
"""

from nlgraph.kernels import _dispatch

from .api import momentum_memory
from .chunk import momentum_memory_chunk
from .naive import momentum_memory_naive
from .triton import momentum_memory_triton, triton_available, triton_eligible

__all__ = [
    "momentum_memory",
    "momentum_memory_naive",
    "momentum_memory_chunk",
    "momentum_memory_triton",
]

_dispatch.register("momentum_memory", "reference", momentum_memory_naive)
_dispatch.register("momentum_memory", "chunk", momentum_memory_chunk)
# auto picks it only for CUDA tensors it can take (see _dispatch); the interpreter serves tests
# by name.
_dispatch.register(
    "momentum_memory", "triton", momentum_memory_triton,
    available=triton_available, eligible=triton_eligible,
)  # fmt: skip
