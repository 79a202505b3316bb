"""Training and scoring a compiled language model on a :class:`~nlgraph.evals.tasks.Batch`.

The loss is the cross-entropy of the scored positions only (mean over them). It is also the
learning signal passed to the learner as ``loss_fn``: blocks updated every C tokens (CMS) learn
from it inside the forward pass, during training and, where asked, at evaluation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.nn import functional as F

from nlgraph.evals.tasks import IGNORE, Batch

__all__ = ["loss_fn_for", "train", "predict", "carried", "detached"]


def loss_fn_for(targets: torch.Tensor) -> Callable[[dict, int, int], torch.Tensor]:
    """``loss_fn(outputs, start, end)``: summed cross-entropy of the scored positions of
    ``start..end-1`` (``outputs["logits"]`` is that piece, ``[B, end - start, V]``)."""

    def loss_fn(outputs: dict[str, torch.Tensor], start: int, end: int) -> torch.Tensor:
        logits = outputs["logits"]
        tgt = targets[:, start:end]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            tgt.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )

    return loss_fn


def train(
    learner: torch.nn.Module,
    sample: Callable[[torch.Generator], Batch],
    steps: int,
    *,
    lr: float = 3e-3,
    seed: int = 0,
    clip: float = 1.0,
) -> dict[str, Any]:
    """``steps`` AdamW steps on batches ``sample(generator)``; the generator is seeded with
    ``seed``. A step whose loss or gradient is NaN or inf is skipped (counted in ``skipped``); past
    ``steps // 10`` such steps training stops as ``"diverged"``. Returns the loss of every
    step taken, the seconds, the number skipped and the status."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(learner.parameters(), lr=lr, weight_decay=0.0)
    losses: list[float] = []
    skipped = 0
    start = time.perf_counter()
    status = "ok"
    for _ in range(steps):
        batch = sample(gen)
        n = int(batch.scored.sum().clamp(min=1))
        opt.zero_grad(set_to_none=True)
        out, _ = learner({"tokens": batch.tokens}, loss_fn=loss_fn_for(batch.targets))
        loss = out["loss"] / n
        finite = math.isfinite(loss.item())
        if finite:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(learner.parameters(), clip)
            finite = math.isfinite(float(norm))  # a finite loss can still have inf gradients
        if not finite:
            skipped += 1
            if skipped > steps // 10:
                status = "diverged"
                break
            continue
        opt.step()
        losses.append(round(loss.item(), 5))
    seconds = time.perf_counter() - start
    return {"losses": losses, "seconds": seconds, "skipped": skipped, "status": status}


@torch.no_grad()
def predict(
    learner: torch.nn.Module,
    batch: Batch,
    *,
    feedback: bool,
    state: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[B, T]`` bool: the argmax is the target, at scored positions (False elsewhere).

    ``feedback=True`` passes the scoring loss as ``loss_fn``: CMS blocks keep learning from
    the targets of positions already passed (causal); ``False`` holds them fixed.
    """
    loss_fn = loss_fn_for(batch.targets) if feedback else None
    out, state = learner({"tokens": batch.tokens}, state, loss_fn=loss_fn)
    correct = (out["logits"].argmax(-1) == batch.targets) & batch.scored
    return correct, state


def carried(learner: Any, state: dict[str, Any]) -> dict[str, Any]:
    """The part of ``state`` that outlives a segment: the blocks updated every C tokens (CMS).
    Attention caches and fast memories restart with the next segment."""
    keep = {n for n, lp in learner.plan.levels.items() if lp.lowering == "boundary"}
    return detached({k: v for k, v in state.items() if k in keep})


def detached(value: Any) -> Any:
    """``value`` cut from the autograd graph of past segments (tensors that required grad
    become leaves that still do), so a long stream does not keep every segment's graph."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.requires_grad)
    if isinstance(value, dict):
        return {k: detached(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(detached(v) for v in value)
    return value
