"""The compiler's intermediate form: which level runs how, in which order, on the global clock.

A :class:`Plan` classifies every level of a validated, bound graph:

- ``slow``: a level updated every outer step (or frozen): an ``nn.Module``/``nn.Parameter`` of
  the learner, trained by the outer optimizer, read in parallel over all tokens.
- ``fast``: an in-context memory updated per token or chunk, lowered to a kernel op
  (``linear_memory``: matrix memories with dot/L2 objectives under GD/DGD with retention;
  ``deep_memory``: MLP (or momentum-carrying linear) memories under GD with momentum and
  forgetting; ``attention``: the exact non-parametric memory), or ``boundary``: a block on the
  outer loss updated every C tokens (CMS, Eq. 71) — frozen within a chunk, so the chunk runs in
  parallel, then the chunk's accumulated gradient is applied at its end; or ``cluster``:
  memories that read themselves or each other, run jointly window by window; or
  ``reference_loop``: a matrix or MLP memory whose rule or schedule no kernel covers (a chain of
  rules such as Newton–Schulz or preconditioning, Nesterov momentum, a period longer than one
  token), run token by token as the plain interpreter of its spec, with a
  :class:`ReferenceLoopWarning`.

:func:`make_plan` runs the named passes of :data:`~nlgraph.compiler.plan.passes.PASSES`
(``classify``, ``clusters``, ``token_loops``, ``order``, ``warn``), each followed by the check
of its invariants. The plan is printable (``str(plan)``, ``NLGRAPH_DEBUG=2``); ``Plan.check``
verifies a finished plan.

Modules: :mod:`.types` (the plan's nodes and state), :mod:`.classify` (one level's role and
lowering), :mod:`.passes` (the passes and ``make_plan``), :mod:`.checks` (their invariants).
"""

from __future__ import annotations

from nlgraph.compiler.plan.classify import memory_reads
from nlgraph.compiler.plan.passes import PASSES, Pass, make_plan
from nlgraph.compiler.plan.types import LOWERINGS, LevelPlan, Plan, PlanState

__all__ = [
    "LevelPlan", "Plan", "make_plan", "LOWERINGS", "memory_reads", "PASSES", "Pass", "PlanState",
]  # fmt: skip
