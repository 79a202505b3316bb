"""Sharding a compiled learner with FSDP2, one ``fully_shard`` per layer.

Every layer (:mod:`.layers`) is a plain module call, so ``fully_shard(layer)`` works on it as on
any transformer block, except for one kind of parameter: a CMS block's initial parameters and
learned rates seed the per-sample fast weights the learner updates between its layers' calls
(``CompiledLearner.seed_parameters``). They must stay whole on every rank; :func:`shard` keeps
them replicated (``ignored_params``) and averages their gradients over the ranks after each
backward, as data parallelism does.

A learner with exact CMS rules differentiates through its own forward: each chunk's inner
gradient is taken inside the call with its graph kept, so the outer backward reaches a layer's
weights again after it has passed the layer's inputs (through the inner gradients of later
chunks; on a teach signal, through the first pass's calls that the second pass reuses,
:class:`.lowerings.teach.Replay`). FSDP's default schedule reduces and reshards a layer when
the backward passes its inputs, which would lose those late gradients and free weights still to
be read (measured: a teach-signal Hope's backward read a freed weight). For such a learner
:func:`shard` keeps each layer's weights gathered from its first use in the forward to the end
of the backward (``reshard_after_forward=False``) and has FSDP reduce each layer's gradients
once, after the whole backward (``Layer.hide_inputs``): optimizer state and gradients at rest
stay sharded, the weights during a step do not.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from nlgraph._errors import CompileError

__all__ = ["shard"]

# A compiled piece step takes its inner gradient with torch.func, out of sight of FSDP's hooks
# (measured: the backward reads a freed unsharded weight).
SHARDED_PIECES = (
    "{name!r} has CMS blocks and a compiled program (compile_program): its pieces take their "
    "inner gradient inside one compiled function, which FSDP's per-layer hooks do not see; "
    "shard the eager learner (or compile a learner without CMS blocks)"
)


def shard(learner: Any, mesh: Any = None, **options: Any) -> Any:
    """Shard ``learner`` with FSDP2: ``fully_shard`` on each layer and on the top level
    (``learner.top``: an LM's embedding and head), then on the learner (the root, which then
    holds no parameters), with the seed parameters replicated. ``mesh`` and ``options``
    (``reshard_after_forward``, ``mp_policy``, ...) go to every ``fully_shard`` call. Call it
    once every rank has built the learner from the same seed; returns the learner."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise RuntimeError("shard: initialise the process group first (init_process_group)")
    if learner.functional_pieces and learner.blocks_in_order():
        raise CompileError(SHARDED_PIECES.format(name=learner.spec.name))
    seeds = set(learner.seed_parameters())
    # A layer's new fast state comes in views of the tensors its lowerings stack; nlgraph
    # never writes a state in place, which is what FSDP's warning about views is about.
    warnings.filterwarnings(
        "ignore", r"FSDP2-wrapped module \(FSDP(Layer|CompiledLearner)\) returned a view"
    )
    # Gradients that reach a layer after its inputs: through the exact rules' inner gradients,
    # or, on a teach signal, through the teach pass's calls the second pass replays (one
    # layer's graph from the first pass inside its second call).
    teach = learner.teaches()
    late = bool(learner.meta_blocks()) or teach
    if late:
        if options.get("reshard_after_forward", False) is not False:
            why = ("takes its CMS blocks' teach signal from a first pass whose calls the second "
                   "pass reuses" if teach else
                   "differentiates through its CMS blocks' updates inside its forward")  # fmt: skip
            raise ValueError(
                f"shard: {learner.spec.name!r} {why} and reads every layer's weights again in "
                "the backward; leave reshard_after_forward unset (it is False for this learner)"
            )
        options["reshard_after_forward"] = False
    for layer in (*learner.layers.values(), learner.top):
        fully_shard(layer, mesh=mesh, ignored_params=seeds & set(layer.parameters()), **options)
        layer.hide_inputs = late
    fully_shard(learner, mesh=mesh, ignored_params=seeds, **options)
    group = mesh.get_group() if mesh is not None else None
    world = dist.get_world_size(group)
    for p in seeds:
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(_averaged(group, world))
    return learner


def _averaged(group: Any, world: int) -> Any:
    def hook(p: nn.Parameter) -> None:
        import torch.distributed as dist

        dist.all_reduce(p.grad, group=group)
        p.grad.div_(world)

    return hook


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a sharded (DTensor) parameter."""
    return type(p).__name__ == "DTensor"
