"""Blocks updated every C tokens by their accumulated outer-loss gradient (CMS, PAPER.md 5.1).

Within a chunk a block's parameters are constant, so every token of the chunk runs in parallel;
at the chunk's end (Eq. 71, with exactly the C tokens of the chunk)

    theta <- retain * theta - lr * sum_{t in chunk} grad_theta L_t(theta_chunk_start).

Parameters are fast state, per sample (``[B, ...]``): each sequence of a batch adapts its own copy,
starting from the block's initial parameters (meta-learned by the outer loop when
``init=meta()``, so gradients of the outer loss flow through every update to them).

The learner cuts a sequence at every boundary of every such block and runs the pieces one after
another with carried state; the reference backend cuts at every token instead (the token loop),
which must give the same result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nlgraph.compiler.modules import MLPBlock
from nlgraph.level import Level

__all__ = ["initial", "truncate", "apply", "cut_points", "accumulate_and_update"]


def initial(
    module: nn.Module, batch: int, detach: bool = False, momentum: bool = False
) -> dict[str, Any]:
    """Fresh per-sample state: parameters broadcast over the batch, empty accumulator (and an
    empty momentum buffer when the block's rule has momentum).
    ``detach``: the initial parameters take no gradient (a stop_grad edge from the level that
    meta-learns them)."""
    # With grad mode on even under torch.no_grad(): a view of a parameter made in no-grad mode
    # claims requires_grad but is cut from the graph, and the first chunk would learn nothing.
    with torch.enable_grad():
        theta = [p.detach() if detach else p for p in module.parameters()]
        theta = [_live(t.unsqueeze(0).expand(batch, *t.shape)) for t in theta]
    state = {"theta": theta, "acc": [torch.zeros_like(t) for t in theta], "phase": 0, "updates": 0}
    if momentum:
        state["momentum"] = [torch.zeros_like(t) for t in theta]
    return state


def truncate(state: dict[str, Any]) -> dict[str, Any]:
    """The state with its parameters cut from the graph of the updates before (truncated(k)):
    later gradients reach back no further than this point."""
    out = {**state, "theta": [_live(t.detach()) for t in state["theta"]],
           "acc": [a.detach() for a in state["acc"]]}  # fmt: skip
    if "momentum" in state:
        out["momentum"] = [m.detach() for m in state["momentum"]]
    return out


def _live(t: torch.Tensor) -> torch.Tensor:
    # Gradients are taken with respect to theta: a frozen or detached theta becomes a leaf that
    # requires grad (its own gradient never reaches the outer optimizer).
    return t if t.requires_grad else t.detach().clone().requires_grad_()


def apply(module: nn.Module, theta: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The block's forward with per-sample parameters ``theta`` on ``x: [B, T, D]``."""
    if isinstance(module, MLPBlock):
        h = x
        n = len(module.layers)
        for i in range(n):
            w, b = theta[2 * i], theta[2 * i + 1]
            h = torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))
            if i < n - 1:
                h = module.act(h)
        return x + h if module.residual else h
    if isinstance(module, nn.Linear):
        y = torch.bmm(x, theta[0].transpose(1, 2))
        return y + theta[1].unsqueeze(1) if module.bias is not None else y
    raise TypeError(f"no per-sample forward for {type(module).__name__}")  # pragma: no cover


def cut_points(
    T: int, periods: dict[str, int], phases: dict[str, int], every_token: bool
) -> list[int]:
    """Ends of the pieces a length-``T`` segment is cut into (sorted, last one ``T``)."""
    if every_token:
        return list(range(1, T + 1))
    cuts = {T}
    for name, period in periods.items():
        first = period - phases[name] % period
        cuts.update(range(first, T + 1, period))
    return sorted(c for c in cuts if c >= 1)


def accumulate_and_update(
    loss: torch.Tensor,
    levels: list[Level],
    states: dict[str, dict[str, Any]],
    periods: dict[str, int],
    rates: dict[str, tuple[Any, Any, Any]],
    n_tokens: int,
    create_graph: bool,
    grads: list[torch.Tensor | None] | None = None,
) -> list[str]:
    """Add this piece's gradients to each block's accumulator; apply the update of every block
    whose chunk ends here. Returns the names of the blocks that updated.

    ``grads``: the gradients of ``loss`` with respect to every block's parameters (in level
    order), when the caller took them already (the functional piece step); else they are taken
    here with ``torch.autograd.grad``."""
    flat = [t for lv in levels for t in states[lv.name]["theta"]]
    if grads is None:
        grads = torch.autograd.grad(
            loss, flat, create_graph=create_graph, retain_graph=True, allow_unused=True
        )
    updated, i = [], 0
    for lv in levels:
        st = states[lv.name]
        n = len(st["theta"])
        g = [
            torch.zeros_like(t) if gr is None else gr
            for t, gr in zip(st["theta"], grads[i : i + n], strict=True)
        ]
        i += n
        acc = [a + b for a, b in zip(st["acc"], g, strict=True)]
        phase = st["phase"] + n_tokens
        if phase % periods[lv.name] == 0:
            lr, retain, mu = rates[lv.name]
            new = {"acc": [torch.zeros_like(a) for a in acc], "phase": 0,
                   "updates": st["updates"] + 1}  # fmt: skip
            if mu is None:
                theta = [retain * t - lr * a for t, a in zip(st["theta"], acc, strict=True)]
            else:  # S <- mu S - lr acc; theta <- retain theta + S (the GD rule's momentum)
                new["momentum"] = [
                    mu * m - lr * a for m, a in zip(st["momentum"], acc, strict=True)
                ]
                theta = [retain * t + m for t, m in zip(st["theta"], new["momentum"], strict=True)]
            states[lv.name] = {"theta": [_live(t) for t in theta], **new}
            updated.append(lv.name)
        else:
            states[lv.name] = {**st, "acc": acc, "phase": phase}
    return updated
