"""A compiled learner's layers: one ``nn.Module`` per layer of levels (``"block3.attn.W_q"`` is
in layer ``"block3"``), holding the lowering modules of its levels and running its part of the
generated program (:func:`nlgraph.compiler.program.partition`).

Each layer is a plain module call on tensors, so the tools that work per block work here:
``torch.distributed.fsdp.fully_shard`` per layer, activation checkpointing per layer
(``layer.checkpoint = True``: the backward recomputes the layer from its inputs instead of
keeping its intermediates), hooks, parameter groups by layer.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from nlgraph.compiler.ops import UNARY
from nlgraph.compiler.program import key

__all__ = ["Layer", "level_of", "release_freed_memory"]

_OWNERS = ("slow", "blocks", "memories")  # <owner>.<level key>.<tensor> in a Layer
_WRAPPERS = ("net.", "initial.", "scalars.")  # inside a lowering module
# What the learner sets on lowering modules for the length of a call (runtime._setting).
_MODES = ("shared", "capture", "replay")


class Layer(nn.Module):
    """The modules of one layer's levels, by kind: ``slow`` (modules read in parallel),
    ``memories`` (stand-alone fast memories), ``clusters`` (recurrent clusters of memories,
    by cluster id), ``blocks`` (CMS blocks), each keyed by level (dots as ``__``).

    ``forward(args, state, writes, part=0) -> (outputs, new_state)``: the layer's program on
    the values it reads from earlier layers (``args``), from the fast state of its own levels
    (``state``); returns the values later layers read and its levels' new state. The top
    level of a learner (levels without a layer: an LM's embedding and head) is a ``Layer``
    with one program per run of its levels (``part``), e.g. one before the layers and one
    after."""

    def __init__(
        self, name: str, slow: dict[str, nn.Module], memories: dict[str, nn.Module],
        clusters: dict[str, nn.Module], blocks: dict[str, nn.Module], levels: list[str],
        sources: Sequence[str] = (),
    ) -> None:  # fmt: skip
        super().__init__()
        self.name = name
        self.slow = nn.ModuleDict(slow)
        self.memories = nn.ModuleDict(memories)
        self.clusters = nn.ModuleDict(clusters)
        self.blocks = nn.ModuleDict(blocks)
        self.levels = tuple(levels)  # the levels whose state this layer reads and writes
        self.sources = list(sources)
        self._programs: list[Any] = []
        for src in self.sources:
            namespace = {"F": F, "UNARY": UNARY, "torch": torch}
            exec(compile(src, f"<nlgraph layer {name}>", "exec"), namespace)  # noqa: S102
            self._programs.append(namespace["layer_program"])
        # Recompute the layer in the backward instead of keeping its intermediates.
        self.checkpoint = False
        # Hand the call's tensors to the module in a holder that module hooks do not look
        # into (FSDP then reduces this layer's gradients once, after the whole backward):
        # set by ``distributed.shard`` for learners that differentiate through their own
        # forward (exact CMS rules), whose layers get gradient after their inputs have.
        self.hide_inputs = False

    def own(self, state: dict[str, Any]) -> dict[str, Any]:
        """The entries of ``state`` that belong to this layer's levels."""
        return {n: state[n] for n in self.levels if n in state}

    def run(
        self, args: tuple, state: dict[str, Any], writes: bool, part: int = 0
    ) -> tuple[tuple, dict[str, Any]]:
        """Call the layer (with its module hooks) on ``args`` and the learner's ``state``, of
        which it passes on its own levels' entries; what the generated program calls."""
        if self.hide_inputs:
            return self(_Hidden(args, self.own(state)), None, writes, part)
        return self(args, self.own(state), writes, part)

    def forward(
        self, args: tuple, state: dict[str, Any], writes: bool, part: int = 0
    ) -> tuple[tuple, dict[str, Any]]:
        if isinstance(args, _Hidden):
            args, state = args.args, args.state
        program = self._programs[part]
        if self.checkpoint and torch.is_grad_enabled():
            # The recompute runs in the backward, after the learner's call has reset the
            # modes its lowerings ran in (a CMS block's shared weights, a teach pass's
            # records): it runs in the modes of this call.
            modes = [(m, k, getattr(m, k)) for m in self._modal() for k in _MODES if hasattr(m, k)]

            cpu = any(t.device.type == "cpu" for t in args if torch.is_tensor(t))

            def run(args: tuple, state: dict, writes: bool) -> tuple[tuple, dict[str, Any]]:
                if cpu:  # the layer before has freed its intermediates: give their pages back
                    release_freed_memory()
                now = [(m, k, getattr(m, k)) for m, k, _ in modes]
                for m, k, v in modes:
                    setattr(m, k, v)
                try:
                    return program(self, args, state, writes)
                finally:
                    for m, k, v in now:
                        setattr(m, k, v)

            return checkpoint(run, args, state, writes, use_reentrant=False)
        return program(self, args, state, writes)

    def _modal(self) -> list[nn.Module]:
        return [*self.blocks.values(), *self.memories.values(), *self.clusters.values()]

    # Called by the generated program ------------------------------------------------------
    def _conv(self, level: str, x: torch.Tensor, state: dict, new_state: dict) -> torch.Tensor:
        # a convolution's last inputs are fast state across segments
        y, new_state[level] = self.slow[key(level)](x, state.get(level))
        return y

    def _block_signals(self, level: str, values: tuple, state: dict, new_state: dict) -> None:
        # The per-token flows of a block's rules ([B, T, 1] each), for its update after the
        # piece (boundary.accumulate_and_update consumes them).
        new_state[level] = {**new_state.get(level, state[level]), "signals": values}

    def extra_repr(self) -> str:
        return f"{self.name!r}" if self.name else "top level"


def _malloc_trim() -> Any:
    try:  # glibc: gives free pages inside its heaps back to the system
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # another C library: nothing to call
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Return the pages of freed CPU tensors to the system (glibc's ``malloc_trim``; nothing
    elsewhere). glibc serves tensors below its mmap threshold from heaps it seldom shrinks, so
    without this a layer recomputed in the backward would leave the freed intermediates of the
    layer before it resident: small Hope's step at T=256 kept 14.1 GB instead of 8.3 GB
    (``benchmarks/results/memory_cpu.md``). Called before each recomputed layer runs on the
    CPU; a few milliseconds."""
    if _TRIM is not None:
        _TRIM(0)


class _Hidden:
    """A layer call's tensors, out of sight of module hooks (``Layer.hide_inputs``)."""

    __slots__ = ("args", "state")

    def __init__(self, args: tuple, state: dict[str, Any]) -> None:
        self.args, self.state = args, state


def level_of(name: str, levels: Iterable[str] = ()) -> tuple[str, str]:
    """``(level, tensor)`` for a parameter or buffer name of a compiled learner (``levels``:
    the learner's level names, to undo the ``__`` of level keys exactly); a name outside every
    lowering module (the learner's clock) is its own level with tensor ``""``.

    >>> level_of("layers.block0.slow.block0__W_k.weight")
    ('block0.W_k', 'weight')
    >>> level_of("layers.block0.clusters.0.members.block0__titans__M_k.initial.W1")
    ('block0.titans.M_k', 'W1')
    >>> level_of("top.slow.embed.weight")
    ('embed', 'weight')
    """
    parts = name.split(".")
    inner = parts[1:] if parts[0] == "top" else parts[2:] if parts[0] == "layers" else []
    if len(inner) > 1 and inner[0] in _OWNERS:
        key_, rest = inner[1], ".".join(inner[2:])
    elif len(inner) > 3 and inner[0] == "clusters" and inner[2] == "members":
        key_, rest = inner[3], ".".join(inner[4:])
    else:  # a buffer of the learner itself (its clock)
        return name, ""
    for wrapper in _WRAPPERS:
        if rest.startswith(wrapper):
            rest = rest[len(wrapper) :]
            break
    by_key = {key(n): n for n in levels}
    return by_key.get(key_, key_.replace("__", ".")), rest
