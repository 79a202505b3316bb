"""Optimizers compiled from graphs of memories: real ``torch.optim.Optimizer`` subclasses.

``compile_optimizer(builder)`` turns a graph builder (hyperparameters -> optimizer graph) into an
optimizer class (:mod:`nlgraph.optim._optimizer`); the drop-ins ``SGD``, ``Adam``, ``AdamW``,
``Adagrad``, ``RMSprop`` (torch's signatures and state layout) and ``Muon``, ``M3``, ``DMGD``,
``DeltaMomentum``, ... (the paper's) are it applied to the library's graphs
(:mod:`nlgraph.optim._dropins`)::

    opt = nlgraph.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), amsgrad=True)

``compile_system(graph)`` compiles a graph that holds a learner and its optimizer levels into a
:class:`System` (the learner, this optimizer bound to its parameters, one ``step``).

The compiler underneath is :mod:`nlgraph.compiler.optimizer`.
"""

from __future__ import annotations

from nlgraph.optim._dropins import (
    DGD,
    DMGD,
    M3,
    SGD,
    Adagrad,
    AdagradMomentum,
    Adam,
    AdamW,
    DeltaMomentum,
    Momentum,
    Muon,
    PreconditionedMomentum,
    RMSprop,
)
from nlgraph.optim._optimizer import GraphOptimizer, compile_optimizer
from nlgraph.optim._system import StepOutput, System, compile_system

__all__ = [
    "GraphOptimizer",
    "compile_optimizer",
    "compile_system",
    "System",
    "StepOutput",
    "SGD",
    "Adam",
    "AdamW",
    "Adagrad",
    "RMSprop",
    "Momentum",
    "AdagradMomentum",
    "PreconditionedMomentum",
    "DeltaMomentum",
    "DMGD",
    "Muon",
    "M3",
    "DGD",
]
