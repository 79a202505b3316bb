"""Blocks updated every C tokens by their accumulated outer-loss gradient (CMS, PAPER.md 5.1).

Within a chunk a block's parameters are constant, so every token of the chunk runs in parallel;
at the chunk's end (Eq. 71, with exactly the C tokens of the chunk) the direction

    d = sum_{t in chunk} grad_theta L_t(theta_chunk_start)

goes through the block's rule chain, in order, with the reference loop's meaning
(:func:`nlgraph.compiler.lowerings.rules.apply_rules`): ``weight_decay`` theta <- (1 - rate) theta;
``precondition`` d <- d / (by ** power + eps); ``newton_schulz`` d <- NS(d) per weight matrix
(bias vectors pass through unchanged); ``gd`` S <- mu S - lr d, theta <- a theta + S (without
momentum theta <- a theta - lr d; Nesterov theta <- a theta + mu S - lr d); ``ema`` is gd with
lr = 1 - beta. One gd rule is ``theta <- retain * theta - lr * d``, Eq. 71 as printed.

Per-token scalars (signals) are read at the update's token, the chunk's last, except a gd/ema
rule's per-token rate: Eq. 71 has eta_t inside the sum, so each token's gradient is weighted by
its own rate, ``d = sum_t eta_t g_t``, and that rule then steps by d (rate 1). Such a learner is
cut at every token (a token loop). The generated program hands the block's signal flows
(``[B, T, 1]``) over in the block's new state (``"signals"``, see ``CompiledLearner.
_block_signals``); they are consumed here and never carried.

Parameters are fast state, per sample (``[B, ...]``): each sequence of a batch adapts its own copy,
starting from the block's initial parameters (meta-learned by the outer loop when
``init=meta()``, so gradients of the outer loss flow through every update to them). Momentum
buffers (one per gd rule with momentum: ``"momentum"``, then ``"momentum2"``, ... in chain
order) are per sample too and carried across segments.

The learner cuts a sequence at every boundary of every such block (the ticks of its CMS clock;
:func:`cut_points`) and runs the pieces one after another with carried state. The cuts belong to
the semantics, not to a backend: a piece's signal is the gradient of its loss through every path
inside the piece (across tokens: attention, convolutions, the in-piece writes of fast memories)
with everything it receives held fixed, so cutting finer would change the signal. The reference
backend therefore cuts at the same ticks and runs its token loops inside each piece
(docs/compiler.md, "What a CMS signal differentiates").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from nlgraph._errors import CompileError
from nlgraph.compiler import ir
from nlgraph.compiler.lowerings._scalars import bounded, scalar_value, scalars_of, shaped
from nlgraph.compiler.lowerings.rules import apply_rules
from nlgraph.compiler.modules import MLPBlock
from nlgraph.level import Level

__all__ = [
    "Block", "initial", "truncate", "apply", "apply_segments", "cut_points",
    "accumulate_and_update", "buffer_keys", "token_weighted", "live", "empty_acc", "Outer",
    "dense_acc", "layer_slots", "recording", "factored_grads",
]  # fmt: skip


def initial(
    module: nn.Module, batch: int, detach: bool = False, buffers: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Fresh per-sample state: parameters broadcast over the batch, empty accumulator, and an
    empty momentum buffer under each key of ``buffers`` (:func:`buffer_keys`).
    ``detach``: the initial parameters take no gradient (a stop_grad edge from the level that
    meta-learns them)."""
    # With grad mode on even under torch.no_grad(): a view of a parameter made in no-grad mode
    # claims requires_grad but is cut from the graph, and the first chunk would learn nothing.
    with torch.enable_grad():
        theta = [p.detach() if detach else p for p in module.parameters()]
        theta = [live(t.unsqueeze(0).expand(batch, *t.shape)) for t in theta]
    state = {"theta": theta, "acc": empty_acc(theta), "phase": 0, "updates": 0}
    for k in buffers:
        state[k] = [torch.zeros_like(t) for t in theta]
    return state


def empty_acc(like: list[torch.Tensor]) -> list[torch.Tensor]:
    """An accumulator with nothing in it (phase 0): zeros of each shape as one broadcast
    element, not a dense tensor per parameter (it is never read at phase 0, and a state kept
    for a recompute (:mod:`nlgraph.compiler.sweep`) would otherwise hold a copy of every
    block's parameters in zeros)."""
    return [t.new_zeros(()).expand(t.shape) for t in like]


def buffer_keys(rules: tuple[ir.Rule, ...]) -> dict[str, str]:
    """The state key of each gd rule's momentum buffer, by rule index: ``"momentum"`` for the
    first gd rule with momentum, ``"momentum2"``, ``"momentum3"``, ... for the next ones."""
    idx = [
        str(i)
        for i, r in enumerate(rules)
        if isinstance(r, ir.GDStep) and not isinstance(r.momentum, ir.NoScalar)
    ]
    return {i: "momentum" if n == 0 else f"momentum{n + 1}" for n, i in enumerate(idx)}


def token_weighted(rules: tuple[ir.Rule, ...]) -> int | None:
    """Index of the gd/ema rule whose rate is per token (a signal), which then weights each
    token's gradient inside the chunk's sum (Eq. 71); None when the rates are not per token."""
    for i, r in enumerate(rules):
        rate = r.lr if isinstance(r, ir.GDStep) else r.beta if isinstance(r, ir.EMAStep) else None
        if isinstance(rate, ir.PerToken):
            return i
    return None


def truncate(state: dict[str, Any]) -> dict[str, Any]:
    """The state with its parameters cut from the graph of the updates before (truncated(k)):
    later gradients reach back no further than this point."""
    out = {**state, "theta": [live(t.detach()) for t in state["theta"]],
           "acc": [a.detach() for a in state["acc"]]}  # fmt: skip
    for k in state:
        if k.startswith("momentum"):
            out[k] = [m.detach() for m in state[k]]
    return out


def live(t: torch.Tensor) -> torch.Tensor:
    # Gradients are taken with respect to theta: a frozen or detached theta becomes a leaf that
    # requires grad (its own gradient never reaches the outer optimizer).
    return t if t.requires_grad else t.detach().clone().requires_grad_()


def layer_slots(module: nn.Module) -> list[tuple[int, int | None]]:
    """Each layer's ``(weight index, bias index or None)`` in a block's parameters, in order."""
    if isinstance(module, MLPBlock):
        return [(2 * i, 2 * i + 1) for i in range(len(module.layers))]
    if isinstance(module, nn.Linear):
        return [(0, 1 if module.bias is not None else None)]
    raise TypeError(f"no per-sample forward for {type(module).__name__}")  # pragma: no cover


def _layers(module: nn.Module, theta: list[torch.Tensor]) -> list[tuple]:
    """A block's parameters as ``(weight, bias or None)`` per layer, in order."""
    return [(theta[w], None if b is None else theta[b]) for w, b in layer_slots(module)]


def _linear(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, shared: bool):
    if shared:
        return F.linear(h, w, b)
    if b is None:
        return torch.bmm(h, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def _finish(module: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return x + h if isinstance(module, MLPBlock) and module.residual else h


def _act(module: nn.Module, i: int, h: torch.Tensor) -> torch.Tensor:
    """The activation after layer ``i`` (none after an MLP's last layer or a linear block)."""
    if isinstance(module, MLPBlock) and i < len(module.layers) - 1:
        return module.act(h)
    return h


def apply(
    module: nn.Module, theta: list[torch.Tensor], x: torch.Tensor, shared: bool = False,
    record: list | None = None,
) -> torch.Tensor:  # fmt: skip
    """The block's forward with per-sample parameters ``theta`` (``[B, ...]``) on
    ``x: [B, T, D]``; ``shared``: one set of parameters for the whole batch (unbatched
    ``theta``, plain GEMMs); ``record``: a list that gets each layer's ``(input, output)``."""
    h = x
    for i, (w, b) in enumerate(_layers(module, theta)):
        z = _linear(h, w, b, shared)
        if record is not None:
            record.append((h, z))
        h = _act(module, i, z)
    return _finish(module, x, h)


def apply_segments(
    module: nn.Module, segments: list[tuple[int, int, list[torch.Tensor]]], x: torch.Tensor,
    shared: bool, first_order: bool,
) -> torch.Tensor:  # fmt: skip
    """The block on ``x: [B, T, D]`` with tokens ``start..end-1`` of each segment
    ``(start, end, theta)`` at that segment's per-sample parameters, layer by layer (one
    concatenation per layer). ``shared``: a segment whose parameters are still a broadcast over
    the batch runs as plain GEMMs (only where no per-sample gradient is asked for).

    ``first_order``: every segment's parameters are the first segment's ``o`` plus a constant
    (:func:`origin_of`): each layer reads them detached and adds ``h (o - sg(o))^T``, zero in
    value, over the whole call. The gradient of ``o`` is then one product over the call instead
    of one parameter-sized gradient per segment summed, and no segment's parameters carry a
    graph."""
    per_segment = [_layers(module, th) for _, _, th in segments]
    origin = per_segment[0] if first_order else None
    sizes = [e - s for s, e, _ in segments]
    h = x
    for i in range(len(per_segment[0])):
        parts = []
        # split, not a slice per segment: the backward of each slice would be a zero-filled
        # tensor of the whole call
        for h_seg, layers in zip(h.split(sizes, 1), per_segment, strict=True):
            w, b = layers[i]
            if first_order:
                w, b = w.detach(), None if b is None else b.detach()
            parts.append(_shared_or_not(h_seg, w, b, shared))
        y = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        if origin is not None:
            w, b = origin[i]
            w1, b1 = _broadcast_row(w, b, shared)
            zw, zb = w1 - w1.detach(), None if b1 is None else b1 - b1.detach()
            y = y + _linear(h, zw, zb, w1 is not w)
        h = _act(module, i, y)
    return _finish(module, x, h)


def _broadcast_row(w: torch.Tensor, b: torch.Tensor | None, shared: bool) -> tuple:
    """``(w, b)``, or their first sample where they are a broadcast over the batch and
    ``shared`` allows one set for all."""
    if shared and w.stride(0) == 0 and (b is None or b.stride(0) == 0):
        return w[0], None if b is None else b[0]
    return w, b


def _shared_or_not(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, shared: bool):
    w1, b1 = _broadcast_row(w, b, shared)
    return _linear(h, w1, b1, w1 is not w)


def origin_of(theta: list[torch.Tensor]) -> list[torch.Tensor]:
    """``theta - sg(theta)``: zero in value, the gradient of ``theta`` (a first-order block's
    updates are added to it, once per call instead of once per update)."""
    return [t - t.detach() for t in theta]


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


class Outer:
    """A weight's chunk gradient kept as its factors: ``base + sum_i d_i^T h_i`` per sample
    (``d_i: [B, n_i, out]`` the layer's output errors, ``h_i: [B, n_i, in]`` its inputs;
    ``base``: a dense sum carried in, or None). Materialised once, at the block's update
    (:meth:`dense`), as one product over the chunk's tokens instead of one parameter-sized
    gradient per piece and an addition per piece."""

    __slots__ = ("base", "ds", "hs")

    def __init__(self, base: torch.Tensor | None, ds: list, hs: list) -> None:
        self.base, self.ds, self.hs = base, ds, hs

    def plus(self, other: Any) -> Outer:
        """The sum with ``other``: more factors, or a dense term added to the base."""
        if isinstance(other, Outer):
            return Outer(_add(self.base, other.base), self.ds + other.ds, self.hs + other.hs)
        return Outer(_add(self.base, other), self.ds, self.hs)

    def scaled(self, eta: Any) -> Outer:
        """Every term times ``eta`` (a number, or ``[B]``)."""
        ds = [shaped(eta, d) * d for d in self.ds]
        return Outer(None if self.base is None else shaped(eta, self.base) * self.base, ds,
                     self.hs)  # fmt: skip

    def detach(self) -> Outer:
        return Outer(None if self.base is None else self.base.detach(),
                     [d.detach() for d in self.ds], [h.detach() for h in self.hs])  # fmt: skip

    def dense(self) -> torch.Tensor:
        d = self.ds[0] if len(self.ds) == 1 else torch.cat(self.ds, 1)
        h = self.hs[0] if len(self.hs) == 1 else torch.cat(self.hs, 1)
        if self.base is None:
            return torch.bmm(d.transpose(1, 2), h)
        return torch.baddbmm(self.base.expand(d.shape[0], -1, -1), d.transpose(1, 2), h)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _plus(a: Any, b: Any) -> Any:
    if isinstance(a, Outer):
        return a.plus(b)
    if isinstance(b, Outer):
        return b.plus(a)
    return a + b


def dense_acc(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its accumulator materialised (factors summed to a dense tensor): the
    form a state leaves a call in."""
    if not any(isinstance(a, Outer) for a in state["acc"]):
        return state
    return {**state, "acc": [a.dense() if isinstance(a, Outer) else a for a in state["acc"]]}


def _grads(
    loss: torch.Tensor, targets: dict[str, list[torch.Tensor]], first_order: Any,
    create_graph: bool,
) -> dict[str, list[torch.Tensor | None]]:  # fmt: skip
    """The gradients of ``loss`` w.r.t. each block's ``targets``: one ``autograd.grad`` for the
    exact blocks (with a graph when ``create_graph``) and one, without, for the blocks named in
    ``first_order``."""
    out: dict[str, list[torch.Tensor | None]] = {n: [] for n in targets}
    for fo in (False, True):
        names = [n for n in targets if (n in first_order) == fo]
        flat = [t for n in names for t in targets[n]]
        if not flat:
            continue
        taken = iter(torch.autograd.grad(loss, flat, create_graph=create_graph and not fo,
                                         retain_graph=True, allow_unused=True))  # fmt: skip
        out.update({n: [next(taken) for _ in targets[n]] for n in names})
    return out


@contextlib.contextmanager
def recording(blocks: list[Block]) -> Iterator[dict[str, list]]:
    """Each block's reads while the context is open, by name: per read, each layer's
    ``(input, output)`` (:class:`Block`'s ``record``), for :func:`factored_grads`."""
    reads: dict[str, list] = {b.name: [] for b in blocks}
    for b in blocks:
        b.record = reads[b.name]
    try:
        yield reads
    finally:
        for b in blocks:
            b.record = None


def factored_grads(
    loss: torch.Tensor, blocks: list[Block], reads: dict[str, list], first_order: Any,
    create_graph: bool,
) -> list[Any]:  # fmt: skip
    """The gradient of ``loss`` w.r.t. every block's parameters (block order), each weight's
    as its factors (:class:`Outer`: its layer's output errors and inputs over the block's
    ``reads``, :func:`recording`), each bias's dense. The errors are the gradients w.r.t. the
    layers' outputs (:func:`_grads`): the partial derivative w.r.t. the parameters in force, as
    fresh aliases of them would give it, since a block's parameters enter only its layers."""
    outputs = {b.name: [z for read in reads[b.name] for _, z in read] for b in blocks}
    errors = _grads(loss, outputs, first_order, create_graph)
    grads: list[Any] = []
    for b in blocks:
        slots = layer_slots(b.net)
        per_read = iter(errors[b.name])
        ds = [[next(per_read) for _ in read] for read in reads[b.name]]  # [read][layer]
        out: list[Any] = [None] * sum(1 + (bi is not None) for _, bi in slots)
        for layer, (wi, bi) in enumerate(slots):
            pairs = [(d[layer], read[layer][0]) for d, read in zip(ds, reads[b.name], strict=True)
                     if d[layer] is not None]  # fmt: skip
            if pairs:
                out[wi] = Outer(None, [d for d, _ in pairs], [h for _, h in pairs])
                if bi is not None:
                    out[bi] = sum(d.sum(1) for d, _ in pairs)
        grads.extend(out)
    return grads


def accumulate_and_update(
    loss: torch.Tensor | None,
    levels: list[Level],
    states: dict[str, dict[str, Any]],
    periods: dict[str, int],
    rates: dict[str, tuple[tuple, dict[str, Any]]],
    n_tokens: int,
    create_graph: bool,
    grads: list[torch.Tensor | None] | None = None,
    origins: dict[str, list[torch.Tensor]] | None = None,
) -> list[str]:
    """Add this piece's gradients to each block's accumulator; apply the update of every block
    whose chunk ends here. Returns the names of the blocks that updated.

    ``rates``: each block's rule chain (:data:`nlgraph.compiler.ir.Rule` values) and the values of
    its learned scalars by key. The piece's signals are in each block's state (``"signals"``,
    written by the program) and are dropped from it here.
    ``grads``: the gradients of ``loss`` with respect to every block's parameters (in level
    order), when the caller took them already (the functional piece step); else they are taken
    here with ``torch.autograd.grad``.
    ``origins``: for each first-order block (stop_grad on its own recurrence), ``o - sg(o)``
    of the parameters ``o`` it started the call from (zero, with the gradient of ``o``; see
    :func:`origin_of`); its gradients are taken without a graph and its new parameters are
    ``new + o - sg(o)``, i.e. ``o + sg(new - o)``: the outer gradient takes every update as a
    constant."""
    origins = origins or {}
    if grads is None:
        per_level = {lv.name: states[lv.name]["theta"] for lv in levels}
        taken = _grads(loss, per_level, origins, create_graph)
        grads = [g for lv in levels for g in taken[lv.name]]
    updated, i = [], 0
    for lv in levels:
        st = dict(states[lv.name])
        signals = st.pop("signals", ())
        rules, learned = rates[lv.name]
        n = len(st["theta"])
        g = [
            torch.zeros_like(t) if gr is None else gr
            for t, gr in zip(st["theta"], grads[i : i + n], strict=True)
        ]
        i += n
        if lv.name in origins:  # first-order: the signal is a constant
            g = [x.detach() for x in g]
        weighted = token_weighted(rules)
        if weighted is not None:  # eta_t inside the sum (Eq. 71): one token per piece
            if n_tokens != 1:  # pragma: no cover - forward cuts such learners at every token
                raise CompileError(f"level {lv.name!r}: per-token rates need one-token pieces")
            rule = rules[weighted]
            ema = isinstance(rule, ir.EMAStep)
            eta = _value(lv, rule.beta if ema else rule.lr, signals, learned)
            eta = 1 - eta if ema else eta
            g = [x.scaled(eta) if isinstance(x, Outer) else shaped(eta, x) * x for x in g]
        # phase 0: nothing accumulated since the last update (the sum is zero)
        acc = g if st["phase"] == 0 else [_plus(a, b) for a, b in zip(st["acc"], g, strict=True)]
        phase = st["phase"] + n_tokens
        if phase % periods[lv.name] == 0:
            acc = [a.dense() if isinstance(a, Outer) else a for a in acc]
            keys = buffer_keys(rules)
            bufs = {r: st[k] for r, k in keys.items()}
            scalars = [_rule_scalars(lv, r, signals, learned) for r in rules]
            theta, bufs = apply_rules(rules, st["theta"], acc, bufs, scalars, lead=1,
                                      unit_lr=weighted)  # fmt: skip
            new = {"acc": empty_acc(acc), "phase": 0,
                   "updates": st["updates"] + 1}  # fmt: skip
            new.update({k: bufs[r] for r, k in keys.items()})
            # Without meta-gradients the new parameters start a fresh graph: a long stream run
            # under torch.no_grad() would otherwise chain every update's graph to the next.
            if not create_graph or lv.name in origins:
                theta = [t.detach() for t in theta]
            if lv.name in origins:  # the value of the update, the gradient of the origin
                if create_graph:
                    theta = [t + z for t, z in zip(theta, origins[lv.name], strict=True)]
                new.update({k: [m.detach() for m in v] for k, v in new.items()
                            if k.startswith("momentum")})  # fmt: skip
            states[lv.name] = {**st, "theta": [live(t) for t in theta], **new}
            updated.append(lv.name)
        else:
            states[lv.name] = {**st, "acc": acc, "phase": phase}
    return updated


def _last(lv: Level, x: torch.Tensor) -> torch.Tensor:
    """A per-token signal ``[B, T, 1]`` at the piece's last token: ``[B]``."""
    if x.shape[-1] != 1:
        raise CompileError(
            f"level {lv.name!r}: a per-token scalar of its rules has width {x.shape[-1]}; a "
            "chunk-updated block takes width 1 (one value per token)"
        )
    return x[:, -1, 0]


def _value(lv: Level, spec: ir.Scalar, signals: tuple, learned: dict[str, Any]) -> Any:
    """A rule's scalar at the piece's last token: None, a float, a learned 0-d tensor, or a
    ``[B]`` tensor (a signal)."""
    return scalar_value(spec, lambda sp: learned[sp.key], lambda i: _last(lv, signals[i]))


def _rule_scalars(lv: Level, rule: ir.Rule, signals: tuple, learned: dict[str, Any]) -> dict:
    return scalars_of(rule, lambda spec: _value(lv, spec, signals, learned),
                      lambda i: _last(lv, signals[i]))  # fmt: skip


class Block(nn.Module):
    """The ``boundary`` lowering of one CMS block: owns its initial parameters (``net``, the
    block's module; learned by the outer loop when ``init=meta()``) and its rules' learned
    scalars (``scalars``, raw, by field).

    Args:
        name: the level.
        net: the block's module (an MLP block or a linear layer).
        rules: its rule chain.
        scalars: the raw initial value of each learned scalar, by field.
        cut: its initial parameters take no gradient (a stop_grad edge from the level that
            meta-learns them).
    """

    def __init__(
        self, name: str, net: nn.Module, rules: tuple[ir.Rule, ...], scalars: dict[str, float],
        cut: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        self.name, self.rules, self.cut = name, rules, cut
        self.net = net
        self.scalars = nn.ParameterDict(
            {k: nn.Parameter(torch.tensor(v)) for k, v in scalars.items()}
        )
        # The teach pass (lowerings.teach) records each block's input and output here.
        self.capture: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        # Set by the learner while no per-sample gradient of the parameters is taken (the
        # read-only pass, no loss_fn, both passes of a teach signal).
        self.shared = False
        # Set by an exact piece (runtime): each layer's input and output of every read, for
        # the chunk gradient in factors (Outer).
        self.record: list[list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def initial_state(self, batch: int) -> dict[str, Any]:
        """Fresh per-sample state (:func:`initial`) with a buffer per momentum rule."""
        buffers = tuple(buffer_keys(self.rules).values())
        return initial(self.net, batch, detach=self.cut, buffers=buffers)

    def forward(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """The block on ``x: [B, T, D]`` with its per-sample parameters in ``state``, or, on a
        teach signal's second pass (``"taught"``: a :class:`.teach.Taught`), each token's chunk
        at its parameters in the block's schedule, run here."""
        st = state[self.name]
        if "taught" in st:
            rest = {k: v for k, v in st.items() if k != "taught"}
            taught = st["taught"]
            segments = taught.run(self.net, rest, self.rates())
            first_order = taught.origin is not None and torch.is_grad_enabled()
            return apply_segments(self.net, segments, x, self.shared, first_order)
        y = self._forward_with(st["theta"], x)
        if self.capture is not None:
            self.capture[self.name] = (x, y)
        return y

    def _forward_with(self, theta: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.shared and all(t.dim() and t.stride(0) == 0 for t in theta):
            # Every sample still holds the initial parameters (a broadcast view) and no
            # per-sample gradient is asked for: one shared weight, plain GEMMs.
            return apply(self.net, [t[0] for t in theta], x, shared=True)
        if self.record is not None:
            layers: list[tuple[torch.Tensor, torch.Tensor]] = []
            self.record.append(layers)
            return apply(self.net, theta, x, record=layers)
        return apply(self.net, theta, x)

    def rates(self) -> tuple[tuple[ir.Rule, ...], dict[str, torch.Tensor]]:
        """The rule chain and the values of its learned scalars, by field."""
        learned = {
            sc.key: bounded(self.scalars[sc.key], sc.lo, sc.hi)
            for r in self.rules
            for sc in vars(r).values()
            if isinstance(sc, ir.Learned)
        }
        return self.rules, learned
