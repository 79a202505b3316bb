"""Parameters the outer loss never reaches: found by one probe forward and backward.

A parameter is *inert* at sequence length ``T`` when no path of the autograd graph leads from
the outer loss of a ``T``-token call to it, so training never gives it a gradient. It happens
when a level's writes are never read within the call: in Hope, the self-modifying memories
(``M_k``, ``M_v``, ``M_eta``, ``M_alpha``) and the projections that feed only their updates
(``W_eta``, ``W_alpha``) first matter at the second chunk of ``chunk_mem`` tokens, so for
``T <= chunk_mem`` none of them is reached; with first-order writes (``hope(meta="first_order")``)
the updates are constants to the outer loss at every ``T``. DDP needs to know (its reducer waits
for a gradient of every parameter), and a run should say so (those parameters stay at their
initial values).

The probe runs the learner itself (its dtype, device and kernel backend: a custom kernel's
backward decides what it reaches) on ``batch`` random sequences of ``seq_len`` tokens, with an
outer loss that weights every element of the chosen outputs by a fixed random number (every
token scored, as the next-token loss does; CMS blocks learn inside the call from it), then takes
``torch.autograd.grad(loss, parameters, allow_unused=True)``: ``None`` marks exactly the
parameters the backward does not reach. Which ones that are depends on the graph's structure at
``T`` (chunk boundaries, CMS ticks), not on the numbers, so one probe at ``batch=1`` is exact;
its cost is one training step on one sequence. ``.grad`` fields and the learner's state are left
untouched, and the global RNG is not drawn from.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from nlgraph._errors import CompileError
from nlgraph.compiler.layers import level_of
from nlgraph.compiler.verify import random_inputs

__all__ = ["inert_parameters", "parameter_levels"]


def parameter_levels(learner: Any) -> dict[str, str]:
    """The level that owns each parameter, ``{parameter name: level name}``."""
    levels = list(learner.plan.levels)
    return {name: level_of(name, levels)[0] for name, _ in learner.named_parameters()}


def inert_parameters(
    learner: Any,
    seq_len: int,
    batch: int = 1,
    outputs: Iterable[str] | None = None,
    state: Any = None,
) -> dict[str, list[str]]:
    """The trainable parameters a ``seq_len``-token call gives no gradient, by level:
    ``{level name: [parameter name, ...]}`` (names as in ``named_parameters()``; levels in the
    spec's declaration order; empty when every parameter is reached).

    Args:
        learner: a :class:`~nlgraph.compiler.runtime.CompiledLearner`.
        seq_len: ``T``, the length of the calls training makes (each from the initial state).
        batch: ``B`` of the probe; the answer does not depend on it.
        outputs: the outputs the outer loss reads (default: every output).
        state: the fast state the call starts from (default ``None``: the initial state; a
            carried state, detached, probes a later call of a stream), with ``batch`` rows.
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise CompileError(f"inert_parameters: seq_len must be a positive int, got {seq_len!r}")
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise CompileError(f"inert_parameters: batch must be a positive int, got {batch!r}")
    names = list(learner.spec.outputs) if outputs is None else list(outputs)
    unknown = [n for n in names if n not in learner.spec.outputs]
    if unknown or not names:
        raise CompileError(
            f"inert_parameters: graph {learner.spec.name!r} has outputs "
            f"{sorted(learner.spec.outputs)}, not {unknown or names}"
        )
    params = [(n, p) for n, p in learner.named_parameters() if p.requires_grad]
    if not params:
        return {}
    like = params[0][1]
    inputs = random_inputs(learner, (batch, seq_len), dict(learner.plan.dims), like.dtype, 0)
    inputs = {k: v.to(like.device) for k, v in inputs.items()}
    gen = torch.Generator().manual_seed(1)
    weights: dict[str, torch.Tensor] = {}

    def loss_fn(outs: dict[str, torch.Tensor], start: int, end: int) -> torch.Tensor:
        total = torch.zeros((), dtype=like.dtype, device=like.device)
        for name in names:
            y = outs[name]
            if name not in weights:  # drawn once, at the call's full length
                shape = (y.shape[0], seq_len, *y.shape[2:])
                weights[name] = torch.randn(shape, generator=gen, dtype=y.dtype).to(y.device)
            total = total + (y * weights[name][:, start:end]).sum()
        return total

    with torch.enable_grad():
        outs, _ = learner(inputs, state, loss_fn=loss_fn)
        loss = outs["loss"]
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        else:
            grads = (None,) * len(params)
    owner = parameter_levels(learner)
    found: dict[str, list[str]] = {}
    for (name, _), g in zip(params, grads, strict=True):
        if g is None:
            found.setdefault(owner.get(name, name), []).append(name)
    order = {lv.name: i for i, lv in enumerate(learner.spec.levels)}
    return {lv: found[lv] for lv in sorted(found, key=lambda n: order.get(n, len(order)))}
