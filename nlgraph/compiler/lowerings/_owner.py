"""What every fast memory's lowering module owns: its initial state and its learned scalars.

A :class:`MemoryOwner` is built from the memory's configuration (:mod:`nlgraph.compiler.ir`)
and its initial tensors; the lowerings (:mod:`.linear_memory`, :mod:`.deep_memory`,
:mod:`.attention`, :mod:`.reference_loop`) subclass it with their ``run``, and cluster members
are plain owners whose recurrences the cluster runs. Calling a memory module runs it over a
whole sequence and writes its final state (``truncated(k)`` edges cut the sequence here).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from nlgraph.compiler import ir
from nlgraph.compiler.lowerings._state import (
    at_cut,
    call_fast,
    detach_state,
    truncation_segments,
)

__all__ = ["MemoryOwner"]


class MemoryOwner(nn.Module):
    """A fast memory's parameters: the initial state (``initial``: meta-learned parameters, or
    fixed buffers) and the raw learned scalars of its rules (``scalars``, by field name).

    Args:
        cfg: the memory's configuration.
        initial: its initial tensors by name (``"M"``; ``"W1"``, ``"W2"``, ... for layers,
            ``[H, out, in]``).
        meta: the initial state is learned by the outer loop (``init=meta()``).
        scalars: the raw initial value of each learned scalar, by field name.
        cut: the meta-gradient into the initial state is stopped (a stop_grad edge from the
            level that meta-learns it).
    """

    def __init__(
        self,
        cfg: ir.MemoryConfig,
        initial: dict[str, torch.Tensor],
        meta: bool,
        scalars: dict[str, float],
        cut: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.backend = "auto"
        self.cut = cut
        if meta:
            self.initial = nn.ParameterDict({k: nn.Parameter(v) for k, v in initial.items()})
        else:
            self.initial = _Buffers(initial)
        self.scalars = nn.ParameterDict(
            {k: nn.Parameter(torch.tensor(v)) for k, v in scalars.items()}
        )
        self.replay: Any = None  # set during a teach-signal call (lowerings.teach.Replay)

    def initial_weight(self, name: str) -> torch.Tensor:
        """The initial tensor ``name`` (detached along a stop_grad edge into the init)."""
        w = self.initial[name]
        return w.detach() if self.cut else w

    def forward(self, args: tuple, state: dict, new_state: dict, writes: bool) -> tuple:
        """Run the memory over the sequence from ``state[name]`` (None: initial); write its
        final state to ``new_state[name]``; return its read-outs in read order.

        With a truncation (``truncated(k)`` edges, ``cfg.truncate`` = k chunks in tokens) the
        carried state is detached every ``k`` chunks counted from the start of the sequence, so
        gradients reach back at most that far; the state then carries its token count
        (``{"state": ..., "tokens": n}``), and a sequence run in segments detaches at the same
        tokens as one pass."""
        return call_fast(self, (self.cfg.name,), args, state, new_state, self.state_dtype(),
                         lambda a: self._forward(a, state, new_state, writes))  # fmt: skip

    def state_dtype(self) -> torch.dtype | None:
        """The dtype of the memory's initial state (None for a memory without one)."""
        tensors = self.initial.values() if isinstance(self.initial, nn.ParameterDict) else (
            self.initial.buffers()
        )  # fmt: skip
        return next((t.dtype for t in tensors if t.is_floating_point()), None)

    def _forward(self, args: tuple, state: dict, new_state: dict, writes: bool) -> tuple:
        cfg, prev = self.cfg, state.get(self.cfg.name)
        if cfg.truncate is None:
            outs, new_state[cfg.name] = self.run(args, prev, writes)
            return outs
        seen, inner = (0, None) if prev is None else (prev["tokens"], prev["state"])
        if not writes:
            new_state[cfg.name] = prev
            return self.run(args, inner, writes)[0]
        T, k = args[0].shape[1], cfg.truncate
        outs: list[tuple] = []
        for s, e in truncation_segments(T, [(seen, k)]):
            if at_cut(seen + s, k):
                inner = detach_state(inner)
            o, inner = self.run(tuple(a[:, s:e] for a in args), inner, writes)
            outs.append(o)
        new_state[cfg.name] = {"state": inner, "tokens": seen + T}
        return tuple(torch.cat(parts, dim=1) for parts in zip(*outs, strict=True))

    def run(self, args: tuple, prev: Any, writes: bool) -> tuple[tuple, Any]:
        """``(read-outs, final state)`` over ``args`` (key, value, queries, per-token scalars)
        from ``prev``; each lowering defines it."""
        raise NotImplementedError(f"level {self.cfg.name!r}: a cluster member runs in its cluster")


class _Buffers(nn.Module):
    """Fixed initial tensors, saved with the state_dict, indexed like a ParameterDict."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for k, v in tensors.items():
            self.register_buffer(k, v, persistent=True)

    def __getitem__(self, name: str) -> torch.Tensor:
        return getattr(self, name)
