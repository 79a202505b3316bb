"""A design loop for new optimizers: compare one (or a few) with the library's AdamW, Muon and
M3 on small standard problems, at matched tuning effort, over several seeds.

``bench(specs)`` (:mod:`nlgraph.bench_optim.run`) trains each optimizer on a least-squares
toy, a small MLP classifier and a tiny byte-level language model on the embedded Shakespeare
corpus (:mod:`nlgraph.bench_optim.problems`), at the same grid of learning-rate factors times
each optimizer's default ``lr``, picks each optimizer's learning rate on a validation split and
reports the test split as mean ± std over the seeds; ``out=`` writes ``table.md``,
``results.json`` and ``plot.png`` (:mod:`nlgraph.bench_optim.report`). The command line is
``nlgraph bench-optim`` (docs/cli.md); the protocol is in docs/optimizers.md, "Comparing an
optimizer".
"""

from __future__ import annotations

from nlgraph.bench_optim.errors import BenchConfigError
from nlgraph.bench_optim.problems import PROBLEMS
from nlgraph.bench_optim.run import LR_FACTORS, QUICK_LR_FACTORS, BenchResult, Cell, Run, bench
from nlgraph.bench_optim.specs import DEFAULT_BASELINES

__all__ = [
    "bench",
    "BenchResult",
    "Cell",
    "Run",
    "BenchConfigError",
    "PROBLEMS",
    "DEFAULT_BASELINES",
    "LR_FACTORS",
    "QUICK_LR_FACTORS",
]
