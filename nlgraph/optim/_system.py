"""The whole system: a learner and its optimizer levels, declared in one graph, compiled into
one object that trains (docs/compiler.md, "The whole system").

:func:`compile_system` splits the graph (:func:`nlgraph.compiler.split_system`), compiles the
learner part with :func:`nlgraph.compiler.compile` and the optimizer part with
:func:`compile_optimizer`, and binds the optimizer to the learner's parameters that each
``params`` level selects: one param group per params level, tagged ``{"level": name}``.
"""

from __future__ import annotations

from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any, NamedTuple

import torch

from nlgraph._errors import CompileError
from nlgraph.compiler import CompiledLearner, compile, split_system
from nlgraph.compiler.layers import level_of
from nlgraph.compiler.system import SystemSplit
from nlgraph.graph import Graph
from nlgraph.level import GraphSpec
from nlgraph.optim._optimizer import GraphOptimizer, compile_optimizer
from nlgraph.serialize import to_dict
from nlgraph.validation import validate

__all__ = ["System", "StepOutput", "compile_system"]

VERSION = 1  # of System.state_dict's layout


class StepOutput(NamedTuple):
    """What :meth:`System.step` returns: the outer loss (detached), the outputs and the final
    fast state of the forward."""

    loss: torch.Tensor
    outputs: dict[str, torch.Tensor]
    state: dict[str, Any]


def level_parameters(learner: CompiledLearner) -> list[tuple[str, str, torch.nn.Parameter]]:
    """``(level, "<level>.<tensor>", parameter)`` for every trainable parameter of ``learner``
    (``"W_k.weight"``, ``"M.W1"`` for a meta-learned initial state, ``"M.lr"`` for a learned
    rate): the names a ``params(select=...)`` glob is matched against."""
    levels = [lv.name for lv in learner.spec.levels]
    out = []
    for name, p in learner.named_parameters():
        if not p.requires_grad:  # frozen levels: no optimizer moves them
            continue
        level, rest = level_of(name, levels)
        if not rest:  # pragma: no cover - every parameter lives in a lowering module
            raise CompileError(f"parameter {name!r} belongs to no level of the learner")
        out.append((level, f"{level}.{rest}", p))
    return out


def param_groups(split: SystemSplit, learner: CompiledLearner) -> list[dict[str, Any]]:
    """One param group per params level: the learner's parameters it selects (its ``select``
    glob against the level or ``<level>.<tensor>``, and its ndim bounds). Every trainable
    parameter must be selected exactly once."""
    groups: dict[str, list[torch.nn.Parameter]] = {w: [] for w in split.weights}
    for level, name, p in level_parameters(learner):
        hits = []
        for w in split.weights:
            sel = split.selection(w)
            glob = sel.select or "*"
            if (fnmatchcase(level, glob) or fnmatchcase(name, glob)) and sel.selects_ndim(p.ndim):
                hits.append(w)
        if len(hits) != 1:
            have = ", ".join(f"{w}: {split.selection(w)}" for w in split.weights)
            what = "no params level" if not hits else f"params levels {', '.join(hits)}"
            raise CompileError(
                f"graph {split.spec.name!r}: parameter {name!r} (shape {tuple(p.shape)}) is "
                f"selected by {what} ({have}); select every trainable parameter exactly once "
                "(params(select='W_*') matches level names or '<level>.<tensor>')"
            )
        lf = split.learner.level(level).frequency
        if lf.unit == "step" and (lf.every != 1 or lf.offset):
            raise CompileError(
                f"level {level!r}: updates {lf}, but params level {hits[0]!r} steps its "
                "parameters every step; declare it per_step()"
            )
        groups[hits[0]].append(p)
    out = [{"params": ps, "level": w} for w, ps in groups.items() if ps]
    if not out:
        raise CompileError(
            f"graph {split.spec.name!r}: its learner has no trainable parameter for params "
            f"levels {', '.join(split.weights)} to train"
        )
    return out


class System:
    """A learner and the optimizer its graph declares, trained as one.

    Attributes:
        spec: the whole graph; ``split`` its two parts.
        learner: the compiled learner part (an ``nn.Module``, :class:`CompiledLearner`).
        optimizer: the optimizer part compiled (a ``torch.optim.Optimizer``), one param group
            per params level (``group["level"]``).
    """

    def __init__(self, split: SystemSplit, learner: CompiledLearner, optimizer: GraphOptimizer):
        self.spec, self.split = split.spec, split
        self.learner, self.optimizer = learner, optimizer

    def step(
        self,
        inputs: dict[str, torch.Tensor] | torch.Tensor,
        loss_fn: Callable[[dict[str, torch.Tensor], int, int], torch.Tensor],
        state: dict[str, Any] | None = None,
    ) -> StepOutput:
        """One training step: the forward with the in-context writes (CMS blocks learn from
        ``loss_fn`` inside it), the outer loss ``outputs["loss"]``, its backward, and the
        optimizer levels' updates at their frequencies; the learner's ``clock`` counts it.

        Args:
            inputs: as :class:`CompiledLearner` takes them (``[B, T, D]`` per input).
            loss_fn: ``loss_fn(outputs, start, end)``, the summed outer loss of tokens
                ``start..end-1`` (docs/compiler.md, "Runtime contract").
            state: the fast state to continue from (``None``: the initial state).
        """
        self.optimizer.zero_grad(set_to_none=True)
        outputs, state = self.learner(inputs, state, loss_fn=loss_fn)
        loss = outputs["loss"]
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            self.learner.clock += 1
        return StepOutput(loss.detach(), outputs, state)

    def state_dict(self) -> dict[str, Any]:
        """The learner's and the optimizer's state (and the graph, to refuse another's)."""
        return {
            "version": VERSION,
            "spec": to_dict(self.spec),
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue exactly from a :meth:`state_dict` of a system compiled from the same graph."""
        if not isinstance(state_dict, dict) or state_dict.get("version") != VERSION:
            got = state_dict.get("version") if isinstance(state_dict, dict) else state_dict
            raise CompileError(
                f"not a System state_dict of version {VERSION} (got version {got!r})"
            )
        if state_dict.get("spec") != to_dict(self.spec):
            name = (state_dict.get("spec") or {}).get("name")
            raise CompileError(
                f"this state_dict was saved from graph {name!r}, not from this system's graph "
                f"{self.spec.name!r} as declared; load it into a system compiled from that graph"
            )
        self.learner.load_state_dict(state_dict["learner"])
        self.optimizer.load_state_dict(state_dict["optimizer"])

    def __repr__(self) -> str:
        groups = ", ".join(
            f"{g['level']}: {sum(p.numel() for p in g['params']):,} parameters"
            for g in self.optimizer.param_groups
        )
        return f"System({self.spec.name!r}; optimizer levels train {groups})"


def compile_system(
    graph: Graph | GraphSpec,
    *,
    backend: str = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    torch_compile: bool | dict = False,
    **dims: int,
) -> System:
    """Compile a graph that holds a learner and its optimizer levels into a :class:`System`.

    Args:
        graph: the system graph (``params`` levels with their optimizer levels beside the
            learner's levels).
        backend, dtype, device, torch_compile, **dims: as :func:`nlgraph.compiler.compile`
            takes them, for the learner part.

    Raises:
        SpecError: the graph is invalid. CompileError: a part cannot run (naming the level),
            or a trainable parameter is selected by no params level or by more than one.
    """
    spec = graph.spec if isinstance(graph, Graph) else graph
    split = split_system(validate(spec))
    learner = compile(
        split.learner, backend=backend, dtype=dtype, device=device,
        torch_compile=torch_compile, **dims,
    )  # fmt: skip
    cls = compile_optimizer(split.optimizer, name="SystemOptimizer")
    optimizer = cls(param_groups(split, learner))
    if any(part.needs_inputs for prog, _ in optimizer._bound.values() for part in prog.parts):
        optimizer.watch(learner)  # dgd: the layer inputs of its linear layers
    return System(split, learner, optimizer)
