"""The fused element-wise optimizer update (SGD/momentum, Adam/AdamW/AMSGrad, RMSprop) over a
flat parameter buffer.

Backends (registered with :mod:`nlgraph.kernels._dispatch` as op ``"optimizer_update"``):
``reference`` (:mod:`.naive`, one segment at a time in PyTorch) and ``triton`` (:mod:`.triton`,
one kernel launch for every segment; available when Triton imports and there is a GPU or
``TRITON_INTERPRET=1``). There is no ``chunk`` form: the optimizer compiler's foreach program
plays that part. :class:`FlatParams` (:mod:`.flat`, not a backend) packs a param group into the
flat buffers the kernel reads. See :mod:`.api` for the public op.
"""

from nlgraph.kernels import _dispatch
from nlgraph.kernels._triton import triton_available

from .api import optimizer_update
from .flat import FlatParams
from .naive import optimizer_update_naive

__all__ = ["optimizer_update", "optimizer_update_naive", "FlatParams", "triton_available"]


def _triton(*args, **kwargs) -> None:
    # Imported on first use, not with this package: this module imports triton itself, and
    # Triton is optional.
    from .triton import optimizer_update_triton

    optimizer_update_triton(*args, **kwargs)


_dispatch.register("optimizer_update", "reference", optimizer_update_naive)
_dispatch.register("optimizer_update", "triton", _triton, available=triton_available)
