"""CMS blocks on a teach signal: ``objective=nl.outer(signal="teach")`` (PAPER.md 5.1).

The exact rule (:mod:`.boundary`) cuts the sequence at every tick of the CMS clock and takes one
backward per piece, so a block updated every token or every 4 tokens costs a sequential pass of
the whole model per token or per 4 tokens. The teach signal is the approximation that the paper
mentions and community implementations use: a block's error signal is ``delta_t = dL/dy_t`` at
its output, from one pass over the call. A learner whose blocks all take it runs each call as

1. **the teach pass**: the program over the whole call with every block holding the parameters
   it starts the call with (no cut, no update); ``delta_t`` for every block and token is one
   backward of its loss to the blocks' outputs, and each block's input ``x_t`` is recorded.
   Both are constants: nothing of this pass reaches the outer gradient;
2. **the schedule**: per block, chunk by chunk (its own ticks, from its phase), the inner
   gradient ``sum_{t in chunk} grad_theta <delta_t, f(theta_j; x_t)>`` at the chunk-start
   parameters ``theta_j`` goes through the block's rule chain at the boundary
   (:func:`.boundary.accumulate_and_update`): a small function of the block alone, differentiated
   (``create_graph``) when the outer gradient follows the updates;
3. **the pass**: the program again, each token read by its block at the parameters of its
   chunk in the schedule; its outputs and loss are the call's, its backward the outer gradient.
   Each block runs its schedule (step 2) when the pass reaches it (:class:`Taught`), inside its
   layer's call: a layer recomputed in the backward recomputes its blocks' schedules too.
   A fast lowering that receives in it the very inputs and state it received in the teach pass
   (everything before the first block: a whole self-modifying Titans layer in Hope's first
   block) returns what it computed there (:class:`Replay`), graph included.

What it approximates: ``delta_t`` and ``x_t`` come from the pass with every block fixed, not
from the pass with the updates in force; for the first chunk of a call the two agree, later ones
drift with the updates (measured against the exact rule in ``tests/test_teach_signal.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nlgraph._errors import CompileError
from nlgraph.compiler import ir
from nlgraph.compiler.lowerings import boundary
from nlgraph.compiler.lowerings.mlp import act_grad
from nlgraph.level import Level

__all__ = ["check", "schedule", "local_grads", "local_step", "plain_gd", "Replay", "Taught"]


def check(levels: list[Level], rules: dict[str, tuple[ir.Rule, ...]]) -> None:
    """Refuse what the teach lowering does not run: a learner mixing teach and exact blocks,
    a nested block (reset with its parent), or a rule with a per-token scalar."""
    teach = [lv.name for lv in levels if lv.objective.signal == "teach"]
    if not teach:
        return
    exact = [lv.name for lv in levels if lv.objective.signal != "teach"]
    if exact:
        raise CompileError(
            f"blocks {teach} take a teach signal and {exact} the exact one; a learner runs one "
            "of the two (the teach signal needs a first pass with every block fixed): declare "
            "the same objective on all of them"
        )
    for lv in levels:
        if lv.effective_reset().kind == "with":
            raise CompileError(
                f"level {lv.name!r}: a nested CMS block (reset with {lv.effective_reset().level!r})"
                " on a teach signal is not lowered; use nl.outer() or the sequential variant"
            )
        for r in rules[lv.name]:
            if any(isinstance(v, ir.PerToken) for v in vars(r).values()):
                raise CompileError(
                    f"level {lv.name!r}: a per-token scalar in its rules with a teach signal is "
                    "not lowered (the scalars would come from the teach pass); use a constant "
                    "or learned scalar, or nl.outer()"
                )


def schedule(
    net: torch.nn.Module,
    lv: Level,
    st: dict[str, Any],
    x: torch.Tensor,
    delta: torch.Tensor,
    period: int,
    rates: tuple,
    differentiable: bool,
    origin: list[torch.Tensor] | None,
    truncate: int | None,
) -> tuple[list[tuple[int, int, list[torch.Tensor]]], dict[str, Any]]:
    """The block's parameters chunk by chunk over a call of ``x.shape[1]`` tokens: a list of
    ``(start, end, theta)`` and the state after the call. ``x``, ``delta``: the block's input
    and teach signal ``[B, T, .]`` from the teach pass; ``origin``: for a first-order block,
    ``o - sg(o)`` of its call-start parameters (:func:`.boundary.origin_of`; each update a
    constant increment on them), else None."""
    T = x.shape[1]
    segments, start = [], 0
    first_order, carries_origin = origin is not None, False
    # A first-order block's updates run without a graph; its state after the call is
    # o + sg(theta - o) (o: the call-start parameters), added once at the end, and its segments
    # are read detached (boundary.apply_segments), so no update needs the origin term.
    fused = plain_gd(rates[0]) if first_order else None
    while start < T:
        end = start + boundary.cut_points(T - start, {"b": period}, {"b": st["phase"]}, False)[0]
        theta = [t.view_as(t) for t in st["theta"]]  # fresh aliases: the partial derivative
        st, before = {**st, "theta": theta}, st["updates"]
        segments.append((start, end, theta))
        if fused is not None and st["phase"] == 0 and end - start == period:
            with torch.no_grad():  # nothing pending, a whole chunk: the fused step
                new = local_step(net, theta, x[:, start:end], delta[:, start:end], fused)
            st = {**st, "theta": new, "updates": st["updates"] + 1}
        else:
            graph = differentiable and not first_order
            with torch.enable_grad() if graph else torch.no_grad():
                grads = local_grads(net, theta, x[:, start:end], delta[:, start:end])
                states = {lv.name: st}
                boundary.accumulate_and_update(
                    None, [lv], states, {lv.name: period}, {lv.name: rates}, end - start, graph,
                    grads,
                )  # fmt: skip
            st = states[lv.name]
        if st["updates"] != before:
            # o's term rides on the last update's parameters, unless a truncation cuts them
            carries_origin = True
            if truncate is not None and st["updates"] % truncate == 0:
                st, carries_origin = boundary.truncate(st), False
        start = end
    if first_order and differentiable and carries_origin:
        st = {**st, "theta": [boundary.live(t.detach() + z) for t, z in
                              zip(st["theta"], origin, strict=True)]}  # fmt: skip
    return segments, st


class Taught:
    """What a block needs on the second pass to run its schedule (:func:`schedule`) where it
    is read: inside its layer's call, so that a layer recomputed in the backward
    (``layer.checkpoint``) keeps none of its chunks' parameters, only this record's ``x`` and
    ``delta`` (a token's worth each). The block leaves its state after the call in
    ``final``."""

    __slots__ = ("level", "x", "delta", "period", "differentiable", "origin", "truncate", "final")

    def __init__(
        self, level: Level, x: torch.Tensor, delta: torch.Tensor, period: int,
        differentiable: bool, origin: list[torch.Tensor] | None, truncate: int | None,
    ) -> None:  # fmt: skip
        self.level, self.x, self.delta, self.period = level, x, delta, period
        self.differentiable, self.origin, self.truncate = differentiable, origin, truncate
        self.final: dict[str, Any] | None = None

    def run(
        self, net: torch.nn.Module, st: dict[str, Any], rates: tuple
    ) -> list[tuple[int, int, list[torch.Tensor]]]:
        """The schedule from the block's state ``st`` at the call's start; sets ``final``."""
        segments, self.final = schedule(
            net, self.level, st, self.x, self.delta, self.period, rates, self.differentiable,
            self.origin, self.truncate,
        )  # fmt: skip
        return segments


def local_grads(
    net: torch.nn.Module, theta: list[torch.Tensor], x: torch.Tensor, delta: torch.Tensor
) -> list[torch.Tensor]:
    """``grad_theta sum_t <delta_t, f(theta; x_t)>`` for a block's per-sample parameters
    (``[B, ...]``), by hand (each layer's error times its input; differentiable where grad mode
    is on) for the two block modules :func:`.boundary.apply` runs."""
    return _local(net, theta, x, delta, None)


def local_step(
    net: torch.nn.Module, theta: list[torch.Tensor], x: torch.Tensor, delta: torch.Tensor,
    lr: float,
) -> list[torch.Tensor]:  # fmt: skip
    """``theta - lr * local_grads(net, theta, x, delta)`` with each weight's gradient summed
    straight into the new weight (``baddbmm``): one pass over each parameter instead of a
    gradient, a scaled copy and a difference."""
    return _local(net, theta, x, delta, lr)


def _local(
    net: torch.nn.Module, theta: list[torch.Tensor], x: torch.Tensor, delta: torch.Tensor,
    lr: float | None,
) -> list[torch.Tensor]:  # fmt: skip
    def weight(w: torch.Tensor, d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if lr is None:
            return torch.bmm(d.transpose(1, 2), h)
        return torch.baddbmm(w, d.transpose(1, 2), h, alpha=-lr)

    def bias(b: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return d.sum(1) if lr is None else torch.add(b, d.sum(1), alpha=-lr)

    layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # each layer's input and output
    boundary.apply(net, theta, x, record=layers)
    slots = boundary.layer_slots(net)
    out: list[Any] = [None] * len(theta)
    d = delta
    for i in reversed(range(len(slots))):
        wi, bi = slots[i]
        out[wi] = weight(theta[wi], d, layers[i][0])
        if bi is not None:
            out[bi] = bias(theta[bi], d)
        if i:  # back through layer i to the previous layer's output (an MLP's activation)
            d = torch.bmm(d, theta[wi]) * act_grad(net.act_name, layers[i - 1][1])
    return out


def plain_gd(rules: tuple[ir.Rule, ...]) -> float | None:
    """The rate of a rule chain that is one plain gd step with a constant rate (no momentum,
    no retention: Eq. 71 as printed), else None."""
    if len(rules) != 1 or not isinstance(rules[0], ir.GDStep):
        return None
    r = rules[0]
    plain = isinstance(r.momentum, ir.NoScalar) and isinstance(r.retain, ir.NoScalar)
    return r.lr.value if plain and isinstance(r.lr, ir.Const) else None


class Replay:
    """The teach pass's calls of the fast lowerings (memories, clusters) made before its first
    block ran, for the second pass: a call whose tensor arguments equal the teach pass's
    (``torch.equal``) and whose incoming states are the same objects returns the teach pass's
    read-outs and final states instead of running again. Their autograd graph is intact: the
    teach pass's backward ran from the loss down to the blocks' outputs only, through what came
    after the first block (a later call, even with equal inputs, had its graph consumed there).

    ``captured``: the blocks' records of the teach pass (:class:`.boundary.Block`); recording
    stops at the first."""

    def __init__(self, captured: dict) -> None:
        self.recording = True
        self._captured = captured
        self._calls: dict[int, tuple] = {}

    def __call__(
        self, module: Any, names: Sequence[str], args: Any, state: dict, new_state: dict,
        compute: Any,
    ) -> Any:  # fmt: skip
        tensors = [a for a in torch.utils._pytree.tree_leaves(args) if torch.is_tensor(a)]
        incoming = [state.get(n) for n in names]
        if self.recording:
            if self._captured:  # a block ran: what follows may lie on the teach backward
                return compute()
            out = compute()
            self._calls[id(module)] = (tensors, incoming, out, {n: new_state[n] for n in names})
            return out
        rec = self._calls.get(id(module))
        if (
            rec is not None
            and _same(rec[0], tensors)
            and all(a is b for a, b in zip(rec[1], incoming, strict=True))
        ):
            new_state.update(rec[3])
            return rec[2]
        return compute()


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
        for x, y in zip(a, b, strict=True)
    )
