"""Kernels: one folder per op, each with ``api.py`` (the public op), ``naive.py`` (the
sequential truth), ``chunk.py`` (parallel PyTorch) and, where it pays, ``triton.py``.
:mod:`nlgraph.kernels._dispatch` picks one, and is the only reader of ``NLGRAPH_BACKEND``
(:func:`forced_backend`). The kernels import nothing above them (only the spec layer's errors).
"""

from nlgraph.kernels._dispatch import forced_backend

__all__ = ["forced_backend"]
