"""Exact CMS learners recomputed piece by piece in the backward (``learner.recompute_pieces``).

A learner whose CMS blocks follow exact rules (meta-gradients through every update) cuts each
call into pieces at the ticks of its CMS clock and takes every piece's inner gradient with
``create_graph`` inside the forward (:mod:`.lowerings.boundary`). Kept for the outer backward,
those second-order graphs are most of the memory of a step: small Hope grew by ~310 MB per
token, and recomputing each layer does not help (a layer's inner gradient keeps the recomputed
layer). The sweep keeps none of them:

- **forward**: the pieces run one after another without an outer graph: each piece's inner
  gradient is taken first order (the update's value is the same), its outputs and new state are
  detached. Kept: the state the call starts from, the pieces' bounds, the outputs, and the states
  where the backward's first descent splits (see below).
- **backward**, in reverse piece order: piece ``j``'s incoming state is recomputed from the
  nearest kept state by re-running the pieces before it, by aligned bisection (a range
  ``[lo, hi)`` splits at ``lo + 2**k``, the largest such point below ``hi``; the state there is
  kept while the right part is swept). The splits of the first descent (the last piece start
  divisible by each power of two) are the states the forward kept, so at most ``log2(n) + 1``
  states are alive and ``n log2(n) / 2 - (n - 1)`` pieces are re-run for ``n`` pieces a power
  of two. Piece ``j`` is then run again from its state with its inner gradient's graph
  (``create_graph``), and one backward of its outputs, its loss and its new state, with the
  gradients the outer loss and piece ``j + 1`` gave them, yields the parameters' gradients and
  the gradient of piece ``j``'s incoming state.

Only one piece's second-order graph exists at a time, so memory grows with the kept states (a
few per call) instead of with every piece's graph. The gradients are those of the kept-graph
path (the same operations, on values equal up to rounding: the forward's inner gradients are
first order); ``tests/test_sweep.py`` checks them against it.

The gradients go to the learner's parameters (and to tensors of the incoming state that require
grad): a tensor that only ``loss_fn`` closes over gets none here (the learner's loss functions,
cross-entropy on the outputs, close over none).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd.function import once_differentiable
from torch.utils._pytree import tree_flatten, tree_unflatten

from nlgraph.compiler.layers import release_freed_memory

__all__ = ["sweep"]

# step(state, start, end, graph) -> (outputs, loss, new state): one piece from ``state``; with
# ``graph`` the inner gradients are differentiable (create_graph), else first order.
Step = Callable[[dict, int, int, bool], tuple[dict, torch.Tensor, dict]]
# cut(state, start) -> the end of the piece that starts at ``start`` from ``state``
Cut = Callable[[dict, int], int]


def sweep(
    step: Step, cut: Cut, state: dict[str, Any], T: int, params: list[torch.Tensor],
    max_states: int | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:  # fmt: skip
    """Run the pieces of a ``T``-token call from ``state``: ``(outputs, loss, new state)``,
    differentiable with respect to ``params`` and the tensors of ``state`` that require grad,
    recomputed in the backward (see the module's docstring). ``outputs``: each output of the
    pieces concatenated along dim 1; ``loss``: the pieces' losses summed. ``max_states``: the
    most piece states the backward keeps at once, besides the one it advances (None:
    ``log2(n) + 1`` for ``n`` pieces, by bisection); with none to spare, a range of ``m``
    pieces re-runs from its first state for each piece (``m (m - 1) / 2`` pieces)."""
    leaves, spec = tree_flatten(state)
    run = _Run(step, cut, T, leaves, spec, list(params), max_states)
    grad_in = [x for x in leaves if _float(x) and x.requires_grad]
    flat = _Sweep.apply(run, *run.params, *grad_in)
    it = iter(flat)
    outputs = {k: next(it) for k in run.out_keys}
    loss = next(it)
    final = [next(it) if _float(x) else x for x in run.final_leaves]
    run.final_leaves = []  # the outputs hold them now
    return outputs, loss, tree_unflatten(final, run.final_spec)


def _float(x: Any) -> bool:
    return torch.is_tensor(x) and x.is_floating_point()


def _detached(leaves: list[Any]) -> list[Any]:
    return [x.detach() if torch.is_tensor(x) else x for x in leaves]


class _Run:
    """One call's sweep: what its forward kept and what its backward needs."""

    def __init__(
        self, step: Step, cut: Cut, T: int, leaves: list, spec: Any, params: list[torch.Tensor],
        max_states: int | None,
    ) -> None:  # fmt: skip
        self.step, self.cut, self.T, self.spec, self.params = step, cut, T, spec, params
        self.max_states = max_states
        self.start_leaves = _detached(leaves)
        self.grad_pos = [i for i, x in enumerate(leaves) if _float(x) and x.requires_grad]
        self.bounds: list[tuple[int, int]] = []
        self.spans: list[dict[str, slice]] = []  # each piece's outputs, along dim 1 of the call's
        self.out_keys: list[str] = []
        self.final_leaves: list[Any] = []
        self.final_spec: Any = None
        self.final_is_out: list[bool] = []
        self.param_grads: list[torch.Tensor | None] = []
        self.spine: dict[int, dict] = {}  # states the forward kept for the backward, by piece

    # ---------------------------------------------------------------------------- forward
    def forward(self) -> list[torch.Tensor]:
        state = tree_unflatten(self.start_leaves, self.spec)
        pieces, total, start = [], None, 0
        levels: dict[int, int] = {}  # spine level -> the last piece start divisible by 2**level
        while start < self.T:
            if self.bounds:
                self._keep(len(self.bounds), state, levels)
            end = self.cut(state, start)
            outs, loss, state = self._advance(state, start, end)
            self.bounds.append((start, end))
            ends = {k: self.spans[-1][k].stop if self.spans else 0 for k in outs}
            self.spans.append({k: slice(ends[k], ends[k] + v.shape[1]) for k, v in outs.items()})
            pieces.append(outs)
            total = loss if total is None else total + loss
            start = end
        self.out_keys = list(pieces[0])
        outputs = [torch.cat([p[k] for p in pieces], dim=1) for k in self.out_keys]
        self.final_leaves, self.final_spec = tree_flatten(state)
        self.final_is_out = [_float(x) for x in self.final_leaves]  # the outputs among them
        return [*outputs, total, *[x for x in self.final_leaves if _float(x)]]

    def _keep(self, j: int, state: dict, levels: dict[int, int]) -> None:
        """Keep the state at piece ``j`` where the backward's first descent will split: for
        each level ``k``, the last piece start divisible by ``2**k`` (the right spine of the
        aligned bisection, whatever the number of pieces turns out to be), the top levels
        only when the states are bounded."""
        k = 0
        while j % (1 << k) == 0:
            levels[k] = j
            k += 1
        if self.max_states is not None:
            while len(set(levels.values())) > self.max_states - 1:
                del levels[min(levels)]
        self.spine[j] = state
        wanted = set(levels.values())
        for p in [p for p in self.spine if p not in wanted]:
            del self.spine[p]

    def _advance(self, state: dict, start: int, end: int) -> tuple[dict, torch.Tensor, dict]:
        """One piece, first order, everything it returns detached."""
        release_freed_memory()
        with torch.enable_grad():
            outs, loss, new = self.step(state, start, end, False)
        leaves, spec = tree_flatten(new)
        new = tree_unflatten(_detached(leaves), spec)
        return {k: v.detach() for k, v in outs.items()}, loss.detach(), new

    # --------------------------------------------------------------------------- backward
    def backward(self, grads: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
        n_out = len(self.out_keys)
        g_outs = dict(zip(self.out_keys, grads[:n_out], strict=True))
        g_loss = grads[n_out]
        g_final = iter(grads[n_out + 1 :])
        g_next = [next(g_final) if out else None for out in self.final_is_out]
        self.param_grads = [None] * len(self.params)
        state = tree_unflatten(self.start_leaves, self.spec)
        spare = math.inf if self.max_states is None else self.max_states - 1
        g_start = self._back(0, len(self.bounds), state, g_next, g_outs, g_loss, spare)
        out = [*self.param_grads, *[g_start[i] for i in self.grad_pos]]
        self.param_grads = []
        return out

    def _back(
        self, lo: int, hi: int, state: dict, g_hi: list, g_outs: dict, g_loss: Any, spare: float
    ) -> list:  # fmt: skip
        """The gradient of the state at piece ``lo`` (flattened) from that of the state at
        piece ``hi`` (``g_hi``), sweeping pieces ``hi - 1`` down to ``lo``; ``spare``: how many
        more states it may keep besides ``state``."""
        if hi - lo == 1:
            return self._piece_back(lo, state, g_hi, g_outs, g_loss)
        if spare < 1:  # no state to spare: each piece's from ``state``, re-running those before
            g = g_hi
            for j in reversed(range(lo, hi)):
                s = state
                for i in range(lo, j):
                    s = self._advance(s, *self.bounds[i])[2]
                g = self._piece_back(j, s, g, g_outs, g_loss)
                del s
            return g
        mid = lo + (1 << ((hi - lo - 1).bit_length() - 1))  # aligned: lo + 2**k < hi
        s = self.spine.pop(mid, None)
        if s is None:
            s = state
            for j in range(lo, mid):
                s = self._advance(s, *self.bounds[j])[2]
        g_mid = self._back(mid, hi, s, g_hi, g_outs, g_loss, spare - 1)
        del s
        return self._back(lo, mid, state, g_mid, g_outs, g_loss, spare)

    def _piece_back(
        self, j: int, state: dict, g_next: list, g_outs: dict, g_loss: Any
    ) -> list:  # fmt: skip
        start, end = self.bounds[j]
        leaves, spec = tree_flatten(state)
        release_freed_memory()
        with torch.enable_grad():
            # Views of fresh leaves: the step's modules receive no leaf (backward hooks on
            # module inputs, as torch.utils.flop_counter's, refuse a leaf under autograd.grad).
            inp = [x.detach().requires_grad_().view_as(x) if _float(x) else x for x in leaves]
            outs, loss, new = self.step(tree_unflatten(inp, spec), start, end, True)
        new_leaves = tree_flatten(new)[0]
        if len(new_leaves) != len(g_next):  # pragma: no cover - the step is deterministic
            raise RuntimeError(f"piece {j} returned another state structure on its recompute")
        roots, cots = [], []
        for k, o in outs.items():
            g = g_outs.get(k)
            if g is not None and o.requires_grad:
                roots.append(o)
                cots.append(g[:, self.spans[j][k]])
        if g_loss is not None and loss.requires_grad:
            roots.append(loss)
            cots.append(g_loss)
        for x, g in zip(new_leaves, g_next, strict=True):
            if g is not None and torch.is_tensor(x) and x.requires_grad:
                roots.append(x)
                cots.append(g)
        pos = [i for i, x in enumerate(inp) if _float(x)]
        if not roots:
            return [None] * len(inp)
        got = torch.autograd.grad(
            roots, [*self.params, *[inp[i] for i in pos]], cots, allow_unused=True
        )
        P = len(self.params)
        for i, g in enumerate(got[:P]):
            if g is not None:
                have = self.param_grads[i]
                self.param_grads[i] = g if have is None else have + g
        g_in: list = [None] * len(inp)
        for i, g in zip(pos, got[P:], strict=True):
            g_in[i] = g
        return g_in


class _Sweep(torch.autograd.Function):
    """The sweep as one autograd node: inputs the parameters and the incoming state's tensors
    that require grad; outputs the pieces' outputs, the loss and the new state's tensors."""

    @staticmethod
    def forward(ctx: Any, run: _Run, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.run = run
        ctx.set_materialize_grads(False)
        return tuple(run.forward())

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        return (None, *ctx.run.backward(grads))
