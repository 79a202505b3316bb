"""Optimizers compiled from graphs of memories: real ``torch.optim.Optimizer`` subclasses.

``compile_optimizer(builder)`` turns any graph builder (a function of hyperparameters returning
an optimizer :class:`~nlgraph.Graph`, such as ``nlgraph.library.get("adam")``'s builder) into an
optimizer class whose param groups carry those hyperparameters. Each group's step is the compiled
program of its graph (:mod:`nlgraph.compiler.optim`), fused over the group's tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from nlgraph.compiler.optim import OptimizerProgram
from nlgraph.graph import Graph

__all__ = ["GraphOptimizer", "compile_optimizer"]


class GraphOptimizer(torch.optim.Optimizer):
    """Base of compiled optimizers: subclasses set ``builder`` (hyperparameters -> Graph)."""

    builder: Callable[..., Graph]

    def __init__(self, params: Iterable[Any], **defaults: Any) -> None:
        self._hparams = tuple(defaults)
        super().__init__(params, defaults)
        self._programs: dict[tuple, OptimizerProgram] = {}

    def graph_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        """The builder's keyword arguments for ``group`` (override to map torch-style names)."""
        return {k: group[k] for k in self._hparams}

    def program(self, group: dict[str, Any]) -> OptimizerProgram:
        kwargs = self.graph_kwargs(group)
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        prog = self._programs.get(key)
        if prog is None:  # LR schedulers change group["lr"]: one small spec rebuild per change
            prog = self._programs[key] = OptimizerProgram(type(self).builder(**kwargs).spec)
        return prog

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            prog = self.program(group)
            buckets: dict[int, tuple[list, list, list]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state.update(prog.init_state(p))
                state["step"] += 1
                bucket = buckets.setdefault(int(state["step"].item()), ([], [], []))
                bucket[0].append(p)
                bucket[1].append(p.grad)
                bucket[2].append(state)
            for step, (params, grads, states) in sorted(buckets.items()):
                prog.step(params, grads, states, step)
        return loss


def compile_optimizer(
    builder: Callable[..., Graph], name: str | None = None, defaults: dict[str, Any] | None = None
) -> type[GraphOptimizer]:
    """An optimizer class from a graph builder; ``defaults`` are its hyperparameters' defaults
    (taken from the builder's signature when omitted)."""
    import inspect

    if defaults is None:
        sig = inspect.signature(builder)
        defaults = {
            k: p.default for k, p in sig.parameters.items() if p.default is not inspect._empty
        }
    cls_name = name or "".join(w.capitalize() for w in builder.__name__.split("_"))
    base_defaults = dict(defaults)

    def __init__(self, params: Iterable[Any], **hparams: Any) -> None:
        unknown = set(hparams) - set(base_defaults)
        if unknown:
            raise TypeError(
                f"{cls_name}: unknown hyperparameters {sorted(unknown)}; "
                f"expected {sorted(base_defaults)}"
            )
        GraphOptimizer.__init__(self, params, **{**base_defaults, **hparams})

    return type(
        cls_name,
        (GraphOptimizer,),
        {"builder": staticmethod(builder), "__init__": __init__, "__doc__": builder.__doc__},
    )
