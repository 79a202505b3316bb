"""The optimizer compiler: graphs of memories over the gradient stream -> one update step.

- :mod:`.skeleton`: :func:`scan` splits a spec into its structure and its numbers (runtime
  hyperparameters: one program serves every spec with the same skeleton).
- :mod:`.program`: :class:`OptimizerProgram`, the foreach lowering (every graph it accepts).
- :mod:`.ops`: the values of a program, tensor lists evaluated by ``torch._foreach_*`` ops.
- :mod:`.pattern` and :mod:`.fused`: a graph with Adam's structure also lowers onto a fused
  kernel (torch's, or nlgraph's Triton kernel over a flat buffer).
- :mod:`.reference`: the naive per-parameter interpreter, the truth the others are tested on.

:mod:`nlgraph.optim` builds ``torch.optim`` optimizers on top of these.
"""

from __future__ import annotations

from nlgraph.compiler.optimizer.fused import FusedLowering, match
from nlgraph.compiler.optimizer.pattern import AdamShape, adam_shape
from nlgraph.compiler.optimizer.program import OptimizerProgram, Part
from nlgraph.compiler.optimizer.reference import reference_step
from nlgraph.compiler.optimizer.skeleton import scan

__all__ = [
    "AdamShape",
    "FusedLowering",
    "OptimizerProgram",
    "Part",
    "adam_shape",
    "match",
    "reference_step",
    "scan",
]
