"""Whole-graph lowerings onto torch's fused optimizer kernels, for graphs that are one of them.

A foreach step makes one pass over memory per op (about six for Adam); torch's fused kernels
make one. When an optimizer graph has Adam's structure (:mod:`.pattern`: the moments, the
debiased step, with or without AMSGrad, coupled L2 or decoupled decay; any names, any numbers),
its step can run as ``torch._fused_adam_`` / ``torch._fused_adamw_``: the same update, read off
the graph's numbers (:func:`~nlgraph.compiler.optimizer.skeleton.scan`). Any other graph — a
delta-rule first moment, a fourth memory — keeps the foreach lowering, and so does an
Adam-shaped graph whose numbers are not Adam's (a beta that differs between its EMA and its
debias: :meth:`FusedLowering.applies`). The naive reference and the foreach program stay the
definition; tests check the fused lowering against both.

On CUDA (or when an optimizer's ``backend`` is ``"triton"``) the same match runs nlgraph's own
kernel instead (:mod:`nlgraph.kernels.optimizer`): the group's parameters are packed into one
flat buffer (:class:`~nlgraph.kernels.optimizer.FlatParams`) and one Triton launch per distinct
step count updates them all (:meth:`FusedLowering.flat_step`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from nlgraph.compiler.optimizer.pattern import adam_shape
from nlgraph.compiler.optimizer.skeleton import scan
from nlgraph.kernels.optimizer import FlatParams, optimizer_update
from nlgraph.level import GraphSpec

__all__ = ["FusedLowering", "match"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # the Triton kernel's


@dataclass(frozen=True)
class FusedLowering:
    """``torch._fused_{kernel}_`` for a graph whose numbers hold its hyperparameters at ``at``."""

    kernel: str  # "adam" (L2 decay coupled to the gradient) or "adamw" (decoupled)
    amsgrad: bool
    at: Mapping[str, int]  # lr, beta1, beta2, eps[, decay] -> index into the numbers
    keys: tuple[str, ...]  # storage keys of m, v[, vmax]
    ties: tuple[tuple[int, int], ...] = ()  # indices of numbers that must be equal

    def applies(self, numbers: list[float]) -> bool:
        """Whether these numbers make the graph Adam: each beta the same in its EMA and its
        debias (the structure allows two), and AdamW's decay readable as ``lr * wd``."""
        if any(numbers[i] != numbers[j] for i, j in self.ties):
            return False
        return not (self.kernel == "adamw" and not numbers[self.at["lr"]]
                    and numbers[self.at["decay"]])  # fmt: skip

    def eligible(self, params: list[torch.Tensor], steps: list[torch.Tensor]) -> bool:
        p = params[0]
        return (
            p.dtype in _DTYPES
            and p.device.type in ("cpu", "cuda")
            and (steps[0].device == p.device)
        )

    def __call__(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, torch.Tensor]],
        steps: list[torch.Tensor],
        numbers: list[float],
    ) -> None:
        """One step (``steps`` already counts it), in place."""
        hp = self._hyper(numbers)
        lists = [[s[k] for s in states] for k in self.keys]
        fn = torch._fused_adamw_ if self.kernel == "adamw" else torch._fused_adam_
        fn(params, grads, lists[0], lists[1], lists[2] if self.amsgrad else [], steps,
           lr=hp["lr"], beta1=hp["beta1"], beta2=hp["beta2"], weight_decay=hp["weight_decay"],
           eps=hp["eps"], amsgrad=self.amsgrad, maximize=False, grad_scale=None,
           found_inf=None)  # fmt: skip

    def flat_eligible(self, params: list[torch.Tensor]) -> bool:
        """Whether the Triton kernel takes these parameters (one bucket: one device, dtype)."""
        return params[0].dtype in _FLAT_DTYPES

    def _hyper(self, numbers: list[float]) -> dict[str, Any]:
        """The update's hyperparameters, read off the graph's numbers."""
        lr = -numbers[self.at["lr"]]
        decay = numbers[self.at["decay"]] if "decay" in self.at else 0.0
        if self.kernel == "adamw":
            decay = decay / lr if lr else 0.0  # the graph holds lr * wd
        return dict(rule="adam", lr=lr, beta1=numbers[self.at["beta1"]],
                    beta2=numbers[self.at["beta2"]], eps=numbers[self.at["eps"]],
                    weight_decay=decay, decoupled=self.kernel == "adamw",
                    amsgrad=self.amsgrad)  # fmt: skip

    def flat_step(self, flat: FlatParams, idx: list[int], count: int, numbers: list[float]) -> None:
        """Step ``count`` (1 at the first) of the packed parameters ``idx``, whose gradients
        and states are in ``flat`` already: one launch of the Triton kernel."""
        m, v, *vmax = (flat.state[k] for k in self.keys)
        optimizer_update(flat.param, flat.grad, m, v, vmax[0] if vmax else None,
                         flat.spans(idx), step=count,
                         backend="triton", **self._hyper(numbers))  # fmt: skip


def match(spec: GraphSpec, key: Callable[[str], str]) -> FusedLowering | None:
    """The fused lowering of a graph with ``spec``'s structure, if there is one (``key``: a
    level's storage key in the per-parameter state). It holds for every spec with the same
    skeleton; :meth:`FusedLowering.applies` says whether a spec's numbers may use it."""
    _, _, sites = scan(spec)
    shape = adam_shape(spec, {site: i for i, site in enumerate(sites)})
    if shape is None:
        return None
    names = (shape.m, shape.v) + ((shape.vmax,) if shape.vmax else ())
    return FusedLowering(
        kernel="adamw" if shape.decay == "decoupled" else "adam",
        amsgrad=shape.vmax is not None,
        at=dict(shape.at),
        keys=tuple(key(n) for n in names),
        ties=shape.ties,
    )
