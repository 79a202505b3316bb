"""Softmax attention, the non-parametric Nadaraya–Watson memory (PAPER.md Eqs. 62–63).

Backends: ``reference`` (:mod:`.naive`, one query at a time) and ``chunk`` (:mod:`.chunk`, all
queries at once), registered with :mod:`nlgraph.kernels._dispatch` as op ``"attention"``. See
:mod:`.api` for the public op.
"""

from nlgraph.kernels import _dispatch

from .api import attention
from .chunk import attention_chunk
from .naive import attention_naive

__all__ = ["attention", "attention_naive", "attention_chunk"]

_dispatch.register("attention", "reference", attention_naive)
_dispatch.register("attention", "chunk", attention_chunk)
