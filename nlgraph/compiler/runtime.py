"""The compiled learner: an ``nn.Module`` that runs a planned graph over whole sequences.

Slow levels are modules read in parallel over all tokens; each fast memory runs as one kernel
call (:mod:`nlgraph.kernels`) over the sequence. Fast state is explicit: ``forward`` takes the
state a previous segment returned (or ``None``: every memory starts from its initial state, the
per-sequence reset) and returns the new one, so k segments with carried state equal one pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._pytree import tree_flatten, tree_unflatten

from nlgraph._errors import CompileError
from nlgraph.compiler import inert, streaming
from nlgraph.compiler.build import build_levels
from nlgraph.compiler.distributed import SHARDED_PIECES, is_sharded
from nlgraph.compiler.layers import Layer
from nlgraph.compiler.lowerings import boundary, teach
from nlgraph.compiler.lowerings._state import detach_state
from nlgraph.compiler.lowerings.boundary import Block
from nlgraph.compiler.lowerings.cluster import Cluster
from nlgraph.compiler.lowerings.memory import memory_module
from nlgraph.compiler.modules import CausalConv
from nlgraph.compiler.ops import UNARY
from nlgraph.compiler.plan import Plan
from nlgraph.compiler.program import build_program, key
from nlgraph.compiler.sweep import sweep
from nlgraph.topology import first_order_levels

__all__ = ["CompiledLearner", "STATE_VERSION"]

STATE_VERSION = 3  # 2: parameters live in their lowerings' modules; 3: in their layers
_key = key


@contextlib.contextmanager
def _setting(modules: Iterable[nn.Module], **values: Any) -> Iterator[None]:
    """Set attributes of ``modules`` for the duration of a block; each goes back to the value
    it had (``False``/``None`` when a call is not running)."""
    modules = list(modules)
    before = [{k: getattr(m, k) for k in values} for m in modules]
    for m in modules:
        for k, v in values.items():
            setattr(m, k, v)
    try:
        yield
    finally:
        for m, old in zip(modules, before, strict=True):
            for k, v in old.items():
                setattr(m, k, v)


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
        built = build_levels(plan)
        kinds = {}
        for name, mod in built.slow.items():
            tensor = self.spec.level(name).state.kind == "tensor"
            kinds[name] = "conv" if isinstance(mod, CausalConv) else "param" if tensor else "slow"
        self.program = build_program(plan, kinds)
        # Differentiation of edges into blocks and into the initial states of memories:
        # truncated(k) into a block detaches its parameters after every k-th of its updates;
        # stop_grad from the level that meta-learns an initial state (init=meta(src)) stops
        # the meta-gradient into that initial state; stop_grad on a block's own recurrence
        # makes its updates first-order.
        self._block_truncate: dict[str, int] = {}
        self._init_cut: set[str] = set()
        for d in self.spec.diff:
            if d.mode.mode == "truncated" and plan.levels[d.dst].lowering == "boundary":
                self._block_truncate[d.dst] = d.mode.k
            init = self.spec.level(d.dst).init
            if d.mode.mode == "stop_grad" and init.kind == "meta" and init.level == d.src:
                self._init_cut.add(d.dst)
        self._first_order = first_order_levels(self.spec)

        def memory(name: str, cfg: Any) -> nn.Module:
            return memory_module(cfg, built.initial.get(name, {}), name in built.meta,
                                 built.scalars[name], name in self._init_cut)  # fmt: skip

        # One module per lowering, each owning its parameters and initial state, held by the
        # layer its level belongs to (the top level for names without a layer).
        owner = self.program.owner
        parts: dict[str, dict[str, dict[str, nn.Module]]] = {
            g: {"slow": {}, "memories": {}, "clusters": {}, "blocks": {}}
            for g in {"", *self.program.layer_sources}
        }
        for n, mod in built.slow.items():
            parts[owner[n]]["slow"][_key(n)] = mod
        for n, cfg in self.program.memories.items():
            parts[owner[n]]["memories"][_key(n)] = memory(n, cfg)
        for c in self.program.clusters:
            members = {n: memory(n, c.members[n]) for n in c.names}
            parts[owner[c.names[0]]]["clusters"][str(c.id)] = Cluster(c, members)
        for n, net in built.blocks.items():
            parts[owner[n]]["blocks"][_key(n)] = Block(
                n, net, self.program.block_rules[n], built.scalars[n], n in self._init_cut
            )
        levels: dict[str, list[str]] = {g: [] for g in parts}
        for n, g in owner.items():
            levels[g].append(n)
        # each CMS block's module by level, for the runtime's loops
        self._block_mods = {m.name: m for p in parts.values() for m in p["blocks"].values()}
        sources = self.program.layer_sources
        self.top = Layer("", **parts[""], levels=levels[""], sources=sources.get("", []))
        self.layers = nn.ModuleDict({
            g: Layer(g, **parts[g], levels=levels[g], sources=src)
            for g, src in sources.items()
            if g
        })  # fmt: skip
        teach.check([self.spec.level(n) for n in self.blocks_in_order()], self.program.block_rules)
        self.backend = backend
        namespace = {"F": F, "UNARY": UNARY, "torch": torch}
        exec(compile(self.program.source, f"<nlgraph {self.spec.name}>", "exec"), namespace)  # noqa: S102
        self._program = namespace["forward_program"]
        self._compiled: Any = None  # torch.compile of the program, when asked for
        self._compiled_step: Any = None  # and of the functional piece step (CMS blocks)
        # Run pieces of sequences with CMS blocks as one function (program, loss, inner gradient
        # by torch.func); on whenever the program is compiled.
        self.functional_pieces = False
        # Exact CMS learners: recompute each piece in the backward instead of keeping its
        # inner gradient's graph (:mod:`.sweep`; ``nlgraph train --recompute``).
        self.recompute_pieces = False
        # ... keeping at most this many piece states at once in the backward (None: by bisection,
        # log2(pieces) + 1; fewer re-run more pieces)
        self.sweep_states: int | None = None
        # The outer clock: outer steps taken so far (saved with the state_dict).
        self.register_buffer("clock", torch.zeros((), dtype=torch.long))

    def compile_program(self, **options: Any) -> None:
        """Run the generated program under ``torch.compile`` (``options`` are passed on).

        With CMS blocks learning in the sequence, each piece runs as :meth:`_piece_step` (the
        program, the piece's loss and its gradient with respect to the blocks' parameters in one
        compiled function), so meta-gradients need only a first-order backward of it."""
        if self.blocks_in_order() and any(is_sharded(p) for p in self.parameters()):
            raise CompileError(SHARDED_PIECES.format(name=self.spec.name))
        self._compiled = torch.compile(self._program, **options)
        self._compiled_step = torch.compile(self._piece_step, **options)
        self.functional_pieces = True

    @property
    def code(self) -> str:
        """The generated forward program, as Python source: the top level, then each layer's."""
        parts = [src for srcs in self.program.layer_sources.values() for src in srcs]
        return "\n".join([self.program.source, *parts])

    def _parts(self, kind: str) -> nn.ModuleDict:
        # a fresh container over the layers' modules (not registered: each module keeps its
        # one place in the learner's tree)
        out = nn.ModuleDict()
        for layer in (self.top, *self.layers.values()):
            out.update(getattr(layer, kind))
        return out

    @property
    def slow(self) -> nn.ModuleDict:
        """Every slow level's module, by level key (a view over the layers)."""
        return self._parts("slow")

    @property
    def memories(self) -> nn.ModuleDict:
        """Every stand-alone fast memory's lowering module, by level key."""
        return self._parts("memories")

    @property
    def clusters(self) -> nn.ModuleDict:
        """Every recurrent cluster's lowering module, by cluster id."""
        return self._parts("clusters")

    @property
    def blocks(self) -> nn.ModuleDict:
        """Every CMS block's lowering module, by level key."""
        return self._parts("blocks")

    # ------------------------------------------------------------------------------ access
    @property
    def backend(self) -> str:
        """The kernel backend of every lowering (``NLGRAPH_BACKEND`` overrides it)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = value
        for mod in (*self.memories.values(), *self.clusters.values()):
            mod.backend = value
            for member in getattr(mod, "members", {}).values():
                member.backend = value

    def blocks_in_order(self) -> list[str]:
        """The CMS blocks (lowering ``boundary``), in the plan's order."""
        return [n for n in self.plan.order if self.plan.levels[n].lowering == "boundary"]

    def _memory_owners(self) -> dict[str, nn.Module]:
        owners = {m.cfg.name: m for m in self.memories.values()}
        for c in self.clusters.values():
            owners.update({m.cfg.name: m for m in c.members.values()})
        return owners

    @property
    def meta(self) -> dict[str, nn.Parameter]:
        """The meta-learned initial states of the memories, ``{"<level key>__W1": parameter}``
        (a view: each lives in its memory's lowering module)."""
        return {
            f"{_key(n)}__{w}": p
            for n, m in self._memory_owners().items()
            if isinstance(m.initial, nn.ParameterDict)
            for w, p in m.initial.items()
        }

    def teaches(self) -> bool:
        """Whether the CMS blocks take a teach signal (all of them or none: ``teach.check``)."""
        blocks = self.blocks_in_order()
        return bool(blocks) and self.spec.level(blocks[0]).objective.signal == "teach"

    def meta_blocks(self) -> list[str]:
        """The CMS blocks whose inner gradient a call takes inside its forward and keeps the
        graph of, for the outer gradient to differentiate through (exact rules; not the
        first-order ones, nor a teach signal), in plan order."""
        if self.teaches():
            return []
        return [n for n in self.blocks_in_order() if n not in self._first_order]

    def seed_parameters(self) -> list[nn.Parameter]:
        """The parameters the learner reads outside its layers' calls: each CMS block's initial
        parameters and learned rates, from which every call starts its per-sample fast
        weights. Sharding keeps them whole on every rank (:func:`.distributed.shard`)."""
        return [p for b in self._block_mods.values() for p in b.parameters()]

    @property
    def scalars(self) -> dict[str, nn.Parameter]:
        """Every learned scalar (raw, before its bound), ``{"<level key>__<field>": parameter}``
        (a view: each lives in its level's lowering module)."""
        owners = {**self._memory_owners(), **{b.name: b for b in self.blocks.values()}}
        return {f"{_key(n)}__{f}": p for n, m in owners.items() for f, p in m.scalars.items()}

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
        blocks = [self.spec.level(n) for n in self.blocks_in_order()]
        if blocks and any(is_sharded(p) for p in self.seed_parameters()):
            raise CompileError(
                f"the CMS blocks' parameters of {self.spec.name!r} are sharded: they seed the "
                "per-sample fast weights outside the layers' calls and must stay whole on "
                "every rank; shard with nlgraph.compiler.distributed.shard(learner) (or pass "
                "ignored_params=set(learner.seed_parameters()) to each fully_shard)"
            )
        for lv in blocks:
            if lv.name not in state:
                state[lv.name] = self._block_mods[lv.name].initial_state(B)
            else:  # a carried state may come detached (streaming): its parameters stay live
                st = state[lv.name]
                state[lv.name] = {**st, "theta": [boundary.live(t) for t in st["theta"]]}
        if not blocks or loss_fn is None or not writes:
            # No inner gradient is taken: a block still at its initial parameters may apply
            # them as one shared weight (Block.forward), not per sample.
            with _setting([self._block_mods[lv.name] for lv in blocks], shared=True):
                outputs, state = self._piece(inputs, state, writes)
            for lv in blocks:  # signals the program handed over for an update that is not run
                state[lv.name] = {k: v for k, v in state[lv.name].items() if k != "signals"}
            if loss_fn is not None:
                outputs["loss"] = loss_fn(outputs, 0, T)
            return outputs, state
        periods = {lv.name: self.plan.levels[lv.name].chunk for lv in blocks}
        if self.teaches():
            return self._teach_forward(inputs, state, loss_fn, blocks, periods)
        # Pieces end at the ticks of the CMS clock, on every backend (the cuts are part of what
        # a block's signal means); a block whose rate is per token makes every token a tick:
        # each token's gradient is weighted by its own rate (Eq. 71).
        every_token = any(
            boundary.token_weighted(self.program.block_rules[lv.name]) is not None for lv in blocks
        )
        differentiable = torch.is_grad_enabled()  # meta-gradients through the updates
        # First-order blocks: every update is a constant increment on the parameters the call
        # starts from (or restarts from, after a nested reset).
        origins = {lv.name: boundary.origin_of(state[lv.name]["theta"]) for lv in blocks
                   if lv.name in self._first_order}  # fmt: skip

        def cut(state: dict[str, Any], start: int) -> int:
            # The next tick from the blocks' phases now: a nested block that restarted with
            # its parent counts its chunks from that restart.
            phases = {lv.name: state[lv.name]["phase"] for lv in blocks}
            return start + boundary.cut_points(T - start, periods, phases, every_token)[0]

        if differentiable and self.recompute_pieces:
            self._check_sweep(origins)

            def step(state: dict, start: int, end: int, graph: bool) -> tuple:
                with _setting(self.layers.values(), checkpoint=False):
                    return self._cms_piece(inputs, state, start, end, loss_fn, blocks, periods,
                                           None, graph, {})  # fmt: skip

            params = [p for p in self.parameters() if p.requires_grad]
            outputs, total, state = sweep(step, cut, state, T, params, self.sweep_states)
            outputs["loss"] = total
            return outputs, state
        rates = {lv.name: self._block_mods[lv.name].rates() for lv in blocks}  # every piece
        pieces, total, start = [], 0.0, 0
        with torch.enable_grad():  # blocks learn at test time too
            while start < T:
                end = cut(state, start)
                outs, loss, state = self._cms_piece(
                    inputs, state, start, end, loss_fn, blocks, periods, rates, differentiable,
                    origins, factored=True,
                )  # fmt: skip
                pieces.append(outs)
                total = total + loss
                start = end
        outputs = {k: torch.cat([p[k] for p in pieces], dim=1) for k in pieces[0]}
        outputs["loss"] = total
        for lv in blocks:  # a chunk the call ends inside leaves its sum dense
            state[lv.name] = boundary.dense_acc(state[lv.name])
        if not differentiable:  # under torch.no_grad(): nothing returned carries a graph
            outputs, state = detach_state(outputs), detach_state(state)
        return outputs, state

    def _cms_piece(
        self, inputs: dict[str, torch.Tensor], state: dict[str, Any], start: int, end: int,
        loss_fn: Any, blocks: list, periods: dict[str, int], rates: dict[str, Any] | None,
        differentiable: bool, origins: dict[str, list[torch.Tensor]], factored: bool = False,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:  # fmt: skip
        """Tokens ``start..end-1`` of a call with CMS blocks on exact rules: the program on the
        piece, its loss, its inner gradient and the updates of the blocks whose chunk ends
        here; ``(outputs, loss, new state)``. ``rates``: each block's rule chain and learned
        scalars (None: read them here); ``differentiable``: the inner gradients with a graph
        (meta-gradients through the updates); ``factored``: each weight's gradient kept as
        its factors until the block's update (:class:`.lowerings.boundary.Outer`; the state
        then carries them between pieces, and the caller makes them dense at the call's
        end)."""
        if rates is None:
            rates = {lv.name: self._block_mods[lv.name].rates() for lv in blocks}
        piece = {k: v[:, start:end] for k, v in inputs.items()}
        grads = None
        if self.functional_pieces:
            step = self._compiled_step or self._piece_step
            with torch.set_grad_enabled(differentiable):
                outs, state, loss, grads = step(piece, state, start, end, loss_fn)
        else:
            # The inner gradient is the partial derivative at the piece's parameters (Eq. 71):
            # fresh aliases keep autograd.grad from also following the paths through earlier
            # updates of other blocks, which depend on these parameters. (A state the sweep
            # recomputes from arrives detached: its parameters are made live here.)
            state = dict(state)
            for lv in blocks:
                theta = [boundary.live(t).view_as(t) for t in state[lv.name]["theta"]]
                state[lv.name] = {**state[lv.name], "theta": theta}
            mods = [self._block_mods[lv.name] for lv in blocks] if factored else []
            with boundary.recording(mods) as reads:
                outs, state = self._piece(piece, state)
            loss = loss_fn(outs, start, end)
            if factored:
                grads = boundary.factored_grads(loss, mods, reads, origins, differentiable)
        updated = boundary.accumulate_and_update(
            loss, blocks, state, periods, rates, end - start, differentiable, grads, origins
        )
        for name, k in self._block_truncate.items():
            if name in updated and state[name]["updates"] % k == 0:
                state[name] = boundary.truncate(state[name])
        B = next(iter(inputs.values())).shape[0]
        for lv in blocks:  # nested CMS: a block restarts when its parent's chunk ends
            rs = lv.effective_reset()
            if rs.kind == "with" and rs.level in updated:
                # Re-initialised after ceil(C_parent / C) of its own updates (PAPER.md 5.2): its
                # chunks start again with the parent's, so a last chunk cut short by the
                # parent's boundary is dropped with the reset.
                state[lv.name] = self._block_mods[lv.name].initial_state(B)
                if lv.name in origins:
                    origins[lv.name] = boundary.origin_of(state[lv.name]["theta"])
        return outs, loss, state

    def _check_sweep(self, origins: dict[str, Any]) -> None:
        """Refuse ``recompute_pieces`` where the sweep does not run."""
        k = self.sweep_states
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
            raise CompileError(
                f"sweep_states={k!r}: expected a positive int (the most piece states the "
                "backward keeps) or None (bisection)"
            )
        if origins:
            raise CompileError(
                f"recompute_pieces: {self.spec.name!r} has first-order CMS blocks "
                f"{sorted(origins)} beside exact ones; recompute its layers instead "
                "(layer.checkpoint) or declare every block exact"
            )
        if self.functional_pieces:
            raise CompileError(
                f"recompute_pieces: the program of {self.spec.name!r} is compiled "
                "(compile_program); the sweep runs the plain program: use one or the other"
            )
        if any(is_sharded(p) for p in self.parameters()):
            raise CompileError(
                f"recompute_pieces: {self.spec.name!r} is sharded; the sweep recomputes pieces "
                "in its own backward, outside the shards' hooks: recompute its layers instead"
            )

    def _teach_forward(
        self, inputs: dict[str, torch.Tensor], state: dict[str, Any], loss_fn: Any,
        blocks: list, periods: dict[str, int],
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
        """A call of a learner whose CMS blocks take a teach signal (lowerings.teach): the
        teach pass with every block fixed, each block's schedule, the pass on the schedule."""
        mods = {lv.name: self._block_mods[lv.name] for lv in blocks}
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # A checkpointed layer recomputes its calls in the backward; a replayed call would
        # not save what the recompute saves: replay only without recompute.
        recompute = any(layer.checkpoint for layer in self.layers.values())
        replay = None if recompute else teach.Replay(captured)
        # the passes take no per-sample gradient of the blocks' parameters
        with _setting([*self.memories.values(), *self.clusters.values()], replay=replay), \
                _setting(mods.values(), shared=True):  # fmt: skip
            return self._teach_passes(inputs, state, loss_fn, blocks, periods, mods, replay,
                                      captured)  # fmt: skip

    def _teach_passes(
        self, inputs: dict[str, torch.Tensor], state: dict[str, Any], loss_fn: Any,
        blocks: list, periods: dict[str, int], mods: dict[str, Block], replay: teach.Replay | None,
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
        T = next(iter(inputs.values())).shape[1]
        differentiable = torch.is_grad_enabled()
        with torch.enable_grad():  # blocks learn at test time too
            with _setting(mods.values(), capture=captured):
                outs, _ = self._piece(inputs, dict(state))
            if replay is not None:
                replay.recording = False
            ys = [captured[lv.name][1] for lv in blocks]
            deltas = torch.autograd.grad(loss_fn(outs, 0, T), ys, allow_unused=True)
            del outs
            second, taught = dict(state), {}
            for lv, y, delta in zip(blocks, ys, deltas, strict=True):
                x = captured[lv.name][0].detach()
                delta = torch.zeros_like(y) if delta is None else delta.detach()
                st = state[lv.name]
                origin = boundary.origin_of(st["theta"]) if lv.name in self._first_order else None
                taught[lv.name] = teach.Taught(
                    lv, x, delta, periods[lv.name], differentiable, origin,
                    self._block_truncate.get(lv.name),
                )  # fmt: skip
                second[lv.name] = {**st, "taught": taught[lv.name]}
            del captured, ys, deltas
            # each block runs its schedule where the pass reads it (teach.Taught)
            outputs, new = self._piece(inputs, second)
            new.update({name: t.final for name, t in taught.items()})
            outputs["loss"] = loss_fn(outputs, 0, T)
        if not differentiable:
            outputs, new = detach_state(outputs), detach_state(new)
        return outputs, new

    def _piece(
        self, inputs: dict[str, torch.Tensor], state: dict[str, Any], writes: bool = True
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        new = dict(state)
        outputs = (self._compiled or self._program)(self, inputs, state, new, writes)
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
        names = self.blocks_in_order()

        static: dict[str, Any] = {}  # what the piece returns besides tensors (ints, structure)

        def piece(thetas: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
            st = dict(state)
            for n, th in zip(names, thetas, strict=True):
                st[n] = {**state[n], "theta": th}
            new = dict(st)
            outs = self._program(self, inputs, st, new, True)
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

    # ------------------------------------------------------------------------------ streams
    def inert_parameters(
        self, seq_len: int, batch: int = 1, outputs: Any = None, state: Any = None
    ) -> dict[str, list[str]]:
        """The parameters a ``seq_len``-token call (from ``state``, default the initial state)
        gives no gradient, ``{level: [parameter name, ...]}`` (e.g. Hope's write path for
        ``T <= chunk_mem``): one probe forward and backward on ``batch`` random sequences
        (:mod:`.inert`)."""
        return inert.inert_parameters(self, seq_len, batch, outputs, state)

    @staticmethod
    def detach_state(state: Any) -> Any:
        """``state`` with every tensor detached: carry it into the next call to continue the
        sequence without backpropagating into the calls before (truncated BPTT)."""
        return streaming.detach_state(state)

    @staticmethod
    def state_to(state: Any, device: Any = None, dtype: torch.dtype | None = None) -> Any:
        """``state`` on ``device``, floating tensors cast to ``dtype`` (ints stay ints)."""
        return streaming.state_to(state, device, dtype)

    def save_state(self, state: Any, path: Any) -> Any:
        """Write a fast state (detached, on the CPU, with this learner's spec) to ``path``."""
        return streaming.save_state(self, state, path)

    def load_state(self, path: Any, device: Any = None, dtype: torch.dtype | None = None) -> Any:
        """A fast state written by :meth:`save_state`, on this learner's device and dtype unless
        given; a state from another spec or other widths is refused (``CompileError``)."""
        return streaming.load_state(self, path, device, dtype)

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
