"""Kernels: one folder per op, each with ``naive.py`` (the sequential truth), ``chunk.py``
(parallel PyTorch) and, where it pays, ``triton.py``. :mod:`nlgraph.kernels._dispatch` picks one."""
