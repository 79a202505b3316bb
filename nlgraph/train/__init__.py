"""Training: byte-level data, the Trainer, atomic checkpoints, fault naming, DDP, the CLI verb.

``nlgraph.train.run.train_run(RunOptions(...))`` is ``nlgraph train``; its modules:
``data`` (corpora and step-indexed batches), ``trainer`` (the loop), ``checkpoint``,
``faults`` (NaN/inf -> level names), ``distributed`` (torchrun/DDP), ``models`` (building and
parameter matching), ``metrics`` (table, JSON, CSV, PNG, peak memory), ``progress`` (what a
run reports, and its ETA), ``console`` (terminal or plain lines) and ``cli``.
Importing this package imports no torch; its modules do.
"""

__all__ = [
    "checkpoint", "cli", "console", "data", "distributed", "errors", "faults", "metrics", "models",
    "progress", "run", "trainer",
]  # fmt: skip
