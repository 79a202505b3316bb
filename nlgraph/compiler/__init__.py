"""The compiler: plan a multi-rate schedule, lower each level, emit a PyTorch learner.

Being built; the lowerings it dispatches to live in :mod:`nlgraph.kernels`.
"""
