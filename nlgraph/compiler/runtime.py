"""The compiled learner: an ``nn.Module`` that runs a planned graph over whole sequences.

Slow levels are modules read in parallel over all tokens; each fast memory runs as one kernel
call (:mod:`nlgraph.kernels`) over the sequence. Fast state is explicit: ``forward`` takes the
state a previous segment returned (or ``None``: every memory starts from its initial state, the
per-sequence reset) and returns the new one, so k segments with carried state equal one pass.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from nlgraph._errors import CompileError
from nlgraph._resolve import resolve
from nlgraph.compiler.lowerings import boundary
from nlgraph.compiler.lowerings._scalars import bounded
from nlgraph.compiler.lowerings._state import at_cut, detach_state, truncation_segments
from nlgraph.compiler.lowerings.cluster import run_cluster
from nlgraph.compiler.lowerings.memory import run_memory
from nlgraph.compiler.modules import CausalConv, build_slow, dim
from nlgraph.compiler.ops import UNARY
from nlgraph.compiler.plan import Plan
from nlgraph.compiler.program import build_program, key
from nlgraph.level import Level
from nlgraph.optimizers import Learned

__all__ = ["CompiledLearner", "STATE_VERSION"]

STATE_VERSION = 1
_key = key


class CompiledLearner(nn.Module):
    """A graph of levels compiled into a runnable, differentiable learner.

    ``forward(inputs, state=None) -> (outputs, state)``: ``inputs`` maps input names to
    ``[B, T, D]`` tensors (or is one tensor when the graph has one input); ``outputs`` maps the
    graph's output names to ``[B, T, D]`` tensors; ``state`` maps each fast level to its state.
    """

    def __init__(self, plan: Plan, backend: str = "auto") -> None:
        super().__init__()
        self.plan = plan
        self.spec = plan.spec
        self.backend = backend
        self.slow = nn.ModuleDict()
        self.blocks = nn.ModuleDict()  # initial parameters of chunk-updated blocks (CMS)
        self.meta = nn.ParameterDict()
        self.scalars = nn.ParameterDict()
        self._fixed: dict[str, torch.Tensor] = {}
        for name in plan.order:
            lv = self.spec.level(name)
            if plan.levels[name].role == "slow":
                self.slow[_key(name)] = build_slow(lv, plan.dims)
                if lv.frequency.unit == "never":  # frozen: no optimizer ever moves it
                    self.slow[_key(name)].requires_grad_(False)
            else:
                self._build_fast(lv)
        kinds = {}
        for name, lp in plan.levels.items():
            if lp.lowering == "parameter":
                mod = self.slow[_key(name)]
                tensor = self.spec.level(name).state.kind == "tensor"
                kinds[name] = (
                    "conv" if isinstance(mod, CausalConv) else "param" if tensor else "slow"
                )
        self.program = build_program(plan, kinds)
        namespace = {"F": F, "UNARY": UNARY, "torch": torch}
        exec(compile(self.program.source, f"<nlgraph {self.spec.name}>", "exec"), namespace)  # noqa: S102
        self._program = namespace["forward_program"]
        self._compiled: Any = None  # torch.compile of the program, when asked for
        self._compiled_step: Any = None  # and of the functional piece step (CMS blocks)
        # Run pieces of sequences with CMS blocks as one function (program, loss, inner gradient
        # by torch.func); on whenever the program is compiled.
        self.functional_pieces = False
        self.writes = True  # False: read every memory at its state, update none
        # Differentiation of edges into blocks and into the initial states of memories:
        # truncated(k) into a block detaches its parameters after every k-th of its updates;
        # stop_grad from the level that meta-learns an initial state (init=meta(src)) stops
        # the meta-gradient into that initial state.
        self._block_truncate: dict[str, int] = {}
        self._init_cut: set[str] = set()
        for d in self.spec.diff:
            lp = plan.levels[d.dst]
            if d.mode.mode == "truncated" and lp.lowering == "boundary":
                self._block_truncate[d.dst] = d.mode.k
            init = self.spec.level(d.dst).init
            if d.mode.mode == "stop_grad" and init.kind == "meta" and init.level == d.src:
                self._init_cut.add(d.dst)
        # The outer clock: outer steps taken so far (saved with the state_dict).
        self.register_buffer("clock", torch.zeros((), dtype=torch.long))

    def step_schedule(self) -> dict[str, tuple[int, int, list[nn.Parameter]]]:
        """Levels trained by the outer optimizer at their own rate:
        ``{level: (every, offset, parameters)}`` for step- and sequence-level levels."""
        out = {}
        for name, lp in self.plan.levels.items():
            if lp.lowering != "parameter":
                continue
            f = self.spec.level(name).frequency
            if f.unit in ("step", "sequence"):
                params = [p for p in self.slow[_key(name)].parameters() if p.requires_grad]
                out[name] = (f.every, f.offset, params)
        return out

    def compile_program(self, **options: Any) -> None:
        """Run the generated program under ``torch.compile`` (``options`` are passed on).

        With CMS blocks learning in the sequence, each piece runs as :meth:`_piece_step` (the
        program, the piece's loss and its gradient with respect to the blocks' parameters in one
        compiled function), so meta-gradients need only a first-order backward of it."""
        self._compiled = torch.compile(self._program, **options)
        self._compiled_step = torch.compile(self._piece_step, **options)
        self.functional_pieces = True

    @property
    def code(self) -> str:
        """The generated forward program, as Python source."""
        return self.program.source

    # ------------------------------------------------------------------------------ building
    def _heads(self, lv: Level) -> tuple[int, int, int]:
        where = f"level {lv.name!r}"
        st = lv.state
        if st.kind == "nonparametric":
            return lv.heads, 0, 0
        d_in, d_out = dim(st.d_in, self.plan.dims, where), dim(st.d_out, self.plan.dims, where)
        if d_in % lv.heads or d_out % lv.heads:
            raise CompileError(f"{where}: widths {d_in}, {d_out} not divisible by {lv.heads} heads")
        return lv.heads, d_in // lv.heads, d_out // lv.heads

    def _init_tensor(self, lv: Level, shape: tuple[int, ...], fan_in: int) -> torch.Tensor:
        if lv.init.kind in ("zeros", "default"):  # an empty memory
            return torch.zeros(shape)
        if lv.init.kind == "identity":
            eye = torch.eye(shape[-2], shape[-1])
            return eye.expand(shape).clone()
        std = lv.init.std if lv.init.kind == "normal" else 1.0 / math.sqrt(fan_in)
        return torch.randn(shape) * std

    def _build_fast(self, lv: Level) -> None:
        lowering = self.plan.levels[lv.name].lowering
        if lowering == "boundary":
            if lv.effective_reset().kind == "every":
                raise CompileError(f"level {lv.name!r}: reset_every is not supported for blocks")
            block = build_slow(lv, self.plan.dims)
            if lv.init.kind == "path":
                _load_pretrained(block, lv)
            block.requires_grad_(lv.init.kind == "meta")  # meta: learned by the outer loop
            self.blocks[_key(lv.name)] = block
            self._scalar_params(lv)
            return
        if lv.init.kind == "path":
            raise CompileError(f"level {lv.name!r}: init from path is not supported for memories")
        if lowering == "attention":
            return
        H, dk, dv = self._heads(lv)
        if lowering == "linear_memory":
            shapes = {"M": ((H, dv, dk), dk)}
        else:
            st = lv.state
            if st.kind == "linear":
                shapes = {"W1": ((H, dv, dk), dk)}
            else:
                width = dim(st.width, self.plan.dims, f"level {lv.name!r}") // 1
                sizes = [dk] + [width] * (st.depth - 1) + [dv]
                # W1 is the output layer (Eq. 89 order), WL the first.
                shapes = {
                    f"W{st.depth - i}": ((H, sizes[i + 1], sizes[i]), sizes[i])
                    for i in range(st.depth)
                }
        for wname, (shape, fan_in) in shapes.items():
            value = self._init_tensor(lv, shape, fan_in)
            key = f"{_key(lv.name)}__{wname}"
            if lv.init.kind == "meta":
                self.meta[key] = nn.Parameter(value)
            else:
                self.register_buffer(key, value, persistent=True)
        self._scalar_params(lv)

    def _scalar_params(self, lv: Level) -> None:
        for rule in lv.optimizer:
            for sname in ("lr", "momentum", "retain", "beta", "rate"):
                value = getattr(rule, sname, None)
                if isinstance(value, Learned):
                    k = f"{_key(lv.name)}__{sname}"
                    if k in self.scalars:
                        raise CompileError(
                            f"level {lv.name!r}: two rules learn a {sname!r}; learned scalars "
                            "are named by level and field, so give one of them a constant"
                        )
                    self.scalars[k] = nn.Parameter(torch.tensor(_inverse_bound(value)))

    def _initial(self, level: str, wname: str) -> torch.Tensor:
        k = f"{_key(level)}__{wname}"
        if k not in self.meta:
            return getattr(self, k)
        return self.meta[k].detach() if level in self._init_cut else self.meta[k]

    # ------------------------------------------------------------------------------ running
    def forward(
        self,
        inputs: dict[str, torch.Tensor] | torch.Tensor,
        state: dict[str, Any] | None = None,
        loss_fn: Any = None,
        writes: bool = True,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Run the learner over ``[B, T, ...]`` inputs from ``state`` (``None``: initial).

        ``loss_fn(outputs, start, end) -> scalar`` gives the outer loss of tokens
        ``start..end-1`` (summed over the batch); it is the learning signal of blocks updated
        every C tokens (CMS, Eq. 71), which then learn within the sequence, and it is returned
        as ``outputs["loss"]`` (summed over the pieces). Without it those blocks hold their
        parameters, as at test time without feedback.

        ``writes=False`` is the read-only pass: every memory is read at the state the
        segment's first token reads in a write pass (a memory read at the chunk start: the
        start of its unfinished chunk) and nothing updates (the same model as a fixed network;
        the baseline of the write-cost benchmark).
        """
        self.writes = writes
        if isinstance(inputs, torch.Tensor):
            if len(self.spec.inputs) != 1:
                raise CompileError(
                    f"graph {self.spec.name!r} has inputs {[i.name for i in self.spec.inputs]}; "
                    "pass a dict"
                )
            inputs = {self.spec.inputs[0].name: inputs}
        missing = [i.name for i in self.spec.inputs if i.name not in inputs]
        if missing:
            raise CompileError(f"graph {self.spec.name!r}: missing inputs {missing}")
        state = dict(state or {})
        x0 = next(iter(inputs.values()))
        B, T = x0.shape[0], x0.shape[1]
        blocks = [self.spec.level(n) for n in self.plan.order
                  if self.plan.levels[n].lowering == "boundary"]  # fmt: skip
        for lv in blocks:
            if lv.name not in state:
                state[lv.name] = self._block_initial(lv.name, B)
        if not blocks or loss_fn is None or not writes:
            outputs, state = self._piece(inputs, state)
            for lv in blocks:  # signals the program handed over for an update that is not run
                state[lv.name] = {k: v for k, v in state[lv.name].items() if k != "signals"}
            if loss_fn is not None:
                outputs["loss"] = loss_fn(outputs, 0, T)
            return outputs, state
        periods = {lv.name: self.plan.levels[lv.name].chunk for lv in blocks}
        phases = {lv.name: state[lv.name]["phase"] for lv in blocks}
        # Pieces end at the ticks of the CMS clock, on every backend (the cuts are part of what
        # a block's signal means); a block whose rate is per token makes every token a tick:
        # each token's gradient is weighted by its own rate (Eq. 71).
        every_token = any(
            boundary.token_weighted(self.program.block_rules[lv.name]) is not None for lv in blocks
        )
        rates = {lv.name: self._block_rates(lv) for lv in blocks}  # the same for every piece
        pieces, total, start = [], 0.0, 0
        differentiable = torch.is_grad_enabled()  # meta-gradients through the updates
        with torch.enable_grad():  # blocks learn at test time too
            for end in boundary.cut_points(T, periods, phases, every_token):
                piece = {k: v[:, start:end] for k, v in inputs.items()}
                grads = None
                if self.functional_pieces:
                    step = self._compiled_step or self._piece_step
                    with torch.set_grad_enabled(differentiable):
                        outs, state, loss, grads = step(piece, state, start, end, loss_fn)
                else:
                    # The inner gradient is the partial derivative at the piece's parameters
                    # (Eq. 71): fresh aliases keep autograd.grad from also following the paths
                    # through earlier updates of other blocks, which depend on these parameters.
                    for lv in blocks:
                        theta = [t.view_as(t) for t in state[lv.name]["theta"]]
                        state[lv.name] = {**state[lv.name], "theta": theta}
                    outs, state = self._piece(piece, state)
                    loss = loss_fn(outs, start, end)
                updated = boundary.accumulate_and_update(
                    loss, blocks, state, periods, rates, end - start, differentiable, grads
                )
                for name, k in self._block_truncate.items():
                    if name in updated and state[name]["updates"] % k == 0:
                        state[name] = boundary.truncate(state[name])
                for lv in blocks:  # nested CMS: a block restarts when its parent's chunk ends
                    rs = lv.effective_reset()
                    if rs.kind == "with" and rs.level in updated:
                        fresh = self._block_initial(lv.name, B)
                        state[lv.name] = {**fresh, "phase": state[lv.name]["phase"]}
                pieces.append(outs)
                total = total + loss
                start = end
        outputs = {k: torch.cat([p[k] for p in pieces], dim=1) for k in pieces[0]}
        outputs["loss"] = total
        return outputs, state

    def _piece(
        self, inputs: dict[str, torch.Tensor], state: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        new = dict(state)
        outputs = (self._compiled or self._program)(self, inputs, state, new)
        return outputs, new

    def _piece_step(
        self,
        inputs: dict[str, torch.Tensor],
        state: dict[str, Any],
        start: int,
        end: int,
        loss_fn: Any,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor, list[torch.Tensor]]:
        """One piece of a sequence with CMS blocks, as one function: its outputs, new state, loss
        and the loss's gradient with respect to every block's parameters (level order).

        The gradient is ``torch.func.grad_and_value`` of the piece, not ``torch.autograd.grad``
        after it: under ``torch.compile`` the inner gradient is then part of the traced graph,
        and the outer backward differentiates that graph once. (Taking it after a compiled
        piece needs a double backward through the compiled graph, which AOTAutograd refuses.)
        Outside the grad mode (``torch.no_grad()``) the outer level records nothing."""
        names = [n for n in self.plan.order if self.plan.levels[n].lowering == "boundary"]

        static: dict[str, Any] = {}  # what the piece returns besides tensors (ints, structure)

        def piece(thetas: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
            st = dict(state)
            for n, th in zip(names, thetas, strict=True):
                st[n] = {**state[n], "theta": th}
            new = dict(st)
            outs = self._program(self, inputs, st, new)
            loss = loss_fn(outs, start, end)
            leaves, static["spec"] = tree_flatten((outs, new))
            static["leaves"] = [None if torch.is_tensor(x) else x for x in leaves]
            return loss, [x for x in leaves if torch.is_tensor(x)]

        thetas = [list(state[n]["theta"]) for n in names]
        grads, (loss, tensors) = torch.func.grad_and_value(piece, has_aux=True)(thetas)
        it = iter(tensors)
        leaves = [next(it) if x is None else x for x in static["leaves"]]
        outs, new = tree_unflatten(leaves, static["spec"])
        return outs, new, loss, [g for per_block in grads for g in per_block]

    def _block_initial(self, name: str, batch: int) -> dict[str, Any]:
        buffers = tuple(boundary.buffer_keys(self.program.block_rules[name]).values())
        return boundary.initial(
            self.blocks[_key(name)], batch, detach=name in self._init_cut, buffers=buffers
        )

    # Called by the generated program ------------------------------------------------------
    def _conv(self, level: str, x: torch.Tensor, state: dict, new_state: dict) -> torch.Tensor:
        # a convolution's last inputs are fast state across segments
        y, new_state[level] = self.slow[_key(level)](x, state.get(level))
        return y

    def _block(self, level: str, x: torch.Tensor, state: dict) -> torch.Tensor:
        return boundary.apply(self.blocks[_key(level)], state[level]["theta"], x)

    def _block_signals(self, level: str, values: tuple, new_state: dict) -> None:
        # The per-token flows of a block's rules ([B, T, 1] each), for its update after the
        # piece (boundary.accumulate_and_update consumes them).
        new_state[level] = {**new_state[level], "signals": values}

    def _memory(self, name: str, args: tuple, state: dict, new_state: dict) -> tuple:
        outs, new_state[name] = run_memory(self, self.program.memories[name], args, state.get(name))
        return outs

    def _cluster(self, cid: int, inputs: tuple, state: dict, new_state: dict) -> dict:
        """Run a cluster; a member with truncated(k) edges has its carried state detached every
        ``k`` of its chunks counted from the start of the sequence (its state carries the token
        count, ``"tokens"``): the sequence runs as segments cut there, which equal one pass, and
        a sequence run in segments detaches at the same tokens."""
        c = self.program.clusters[cid]
        every = {n: m.truncate for n, m in c.members.items() if m.truncate is not None}
        if not every or not self.writes:
            return run_cluster(self, c, inputs, state, new_state)
        T = inputs[0].shape[1]
        seen = {n: (state.get(n) or {}).get("tokens", 0) for n in every}
        pieces: list[dict] = []
        carried = {n: state.get(n) for n in c.names}
        for s, e in truncation_segments(T, [(seen[n], k) for n, k in every.items()]):
            for n, k in every.items():
                if carried[n] is not None and at_cut(seen[n] + s, k):
                    carried[n] = detach_state(carried[n])
            out_state: dict[str, Any] = {}
            pieces.append(run_cluster(self, c, tuple(a[:, s:e] for a in inputs), carried,
                                      out_state))  # fmt: skip
            carried = {n: out_state[n] for n in c.names}
        for n in every:
            carried[n] = {**carried[n], "tokens": seen[n] + T}
        new_state.update(carried)
        return {
            n: tuple(torch.cat([p[n][i] for p in pieces], dim=1) for i in range(len(pieces[0][n])))
            for n in c.names
        }

    def _block_rates(self, lv: Level) -> tuple[tuple, dict[str, torch.Tensor]]:
        """A block's rule chain (static tuples) and the values of its learned scalars by key."""
        rules = self.program.block_rules[lv.name]
        learned = {
            sc[1]: bounded(self.scalars[sc[1]], sc[2], sc[3])
            for r in rules
            for sc in r[1:]
            if isinstance(sc, tuple) and sc[:1] == ("learned",)
        }
        return rules, learned

    def get_extra_state(self) -> dict[str, Any]:
        from nlgraph.serialize import to_dict

        return {
            "version": STATE_VERSION,
            "spec": to_dict(self.spec),
            "dims": dict(self.plan.dims),
            "reset": {lv.name: str(lv.effective_reset()) for lv in self.spec.levels},
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise CompileError(
                f"state_dict version {state.get('version')!r} != {STATE_VERSION}; it was written "
                "by another nlgraph version"
            )
        from nlgraph.serialize import to_dict

        if state.get("spec") != to_dict(self.spec):
            raise CompileError("state_dict was saved from a different graph spec")


def _load_pretrained(block: nn.Module, lv: Level) -> None:
    """Ad-hoc level stacking (PAPER.md 5.5): copy a pre-trained MLP's linear layers, in order,
    into the block. The import path names an ``nn.Module`` or a callable returning one."""
    where = f"level {lv.name!r}, init {lv.init.path}"
    src = resolve(lv.init.path)
    src = src() if callable(src) and not isinstance(src, nn.Module) else src
    if not isinstance(src, nn.Module):
        raise CompileError(f"{where}: expected an nn.Module, got {type(src).__name__}")
    mine = [m for m in block.modules() if isinstance(m, nn.Linear)]
    theirs = [m for m in src.modules() if isinstance(m, nn.Linear)]
    want = [tuple(m.weight.shape) for m in mine]
    got = [tuple(m.weight.shape) for m in theirs]
    if want != got:
        raise CompileError(f"{where}: its linear layers {got} do not match the block's {want}")
    with torch.no_grad():
        for a, b in zip(mine, theirs, strict=True):
            a.weight.copy_(b.weight)
            if a.bias is not None:
                a.bias.copy_(b.bias) if b.bias is not None else a.bias.zero_()


def _inverse_bound(value: Learned) -> float:
    lo, hi, x = value.lo, value.hi, value.init
    if lo is not None and hi is not None:
        p = min(max((x - lo) / (hi - lo), 1e-6), 1 - 1e-6)
        return math.log(p / (1 - p))
    if lo is not None:
        y = max(x - lo, 1e-6)
        return y + math.log(-math.expm1(-y))
    return x
