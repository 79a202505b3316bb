"""Outer levels at their own rate: a level declared ``every(n, "step")`` is stepped by the
outer optimizer only at its ticks, with the gradients of the steps in between accumulated
(PAPER.md 1.2: one global clock; CMS levels at the scale of many outer steps, 5.7)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["MultiRate"]


class MultiRate:
    """Wraps an optimizer over a :class:`~nlgraph.compiler.runtime.CompiledLearner`'s
    parameters. ``step()`` advances the learner's clock; parameters of levels not due at this
    tick keep their gradient for later (summed) and are skipped by the optimizer.

    Per-step levels (``every(1, "step")``, the default of projections) are stepped every time,
    so wrapping changes nothing for a learner without slower levels.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, learner: Any) -> None:
        self.optimizer = optimizer
        self.learner = learner
        self.pending: dict[torch.Tensor, torch.Tensor] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        tick = int(self.learner.clock) + 1
        held: list[torch.Tensor] = []
        for every, offset, params in self.learner.step_schedule().values():
            due = (tick - offset) % every == 0 and tick >= max(offset, 1)
            for p in params:
                if p.grad is None:
                    continue
                if p in self.pending:
                    p.grad += self.pending.pop(p)
                if not due:
                    self.pending[p] = p.grad.clone()
                    held.append(p)
        saved = {p: p.grad for p in held}
        for p in held:
            p.grad = None  # the optimizer skips parameters without a gradient
        loss = self.optimizer.step(closure)
        for p, g in saved.items():
            p.grad = g
        self.learner.clock += 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        index = {p: i for i, p in enumerate(params)}
        return {
            "optimizer": self.optimizer.state_dict(),
            "pending": {index[p]: g for p, g in self.pending.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.pending = {params[i]: g.clone() for i, g in state["pending"].items()}
