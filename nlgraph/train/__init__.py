"""Training and evaluation: data, the trainer, checkpoints, metrics (arrives with the compiler)."""
