"""Optimizers compiled from graphs of memories: :class:`GraphOptimizer` and
:func:`compile_optimizer`.

``compile_optimizer(builder)`` turns a graph builder (a function of hyperparameters returning an
optimizer :class:`~nlgraph.Graph`, e.g. ``nlgraph.library.builder("adam")``) into an optimizer
class whose param groups carry those hyperparameters. Each group's step is the compiled program
of its graph (:mod:`nlgraph.compiler.optimizer`), fused over the group's tensors with foreach
ops, or one fused kernel when the graph has Adam's structure.

Hyperparameters are runtime numbers: a scheduler that changes ``lr`` every step reuses the
compiled program (the graph is rebuilt, not re-validated or re-compiled; see
:func:`nlgraph.compiler.optimizer.scan`).
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any

import torch

from nlgraph._errors import SpecError, SpecFieldError
from nlgraph.compiler.optimizer import OptimizerProgram, match, reference_step, scan
from nlgraph.graph import Graph
from nlgraph.hyper import substitute
from nlgraph.kernels import _dispatch
from nlgraph.kernels.optimizer import FlatParams
from nlgraph.level import GraphSpec

__all__ = ["GraphOptimizer", "compile_optimizer"]

_log = logging.getLogger("nlgraph.optim")
_CACHE = 64  # hyperparameter settings kept bound per optimizer (an LR schedule visits many)
_TOLD: set[tuple[str, torch.dtype]] = set()  # graphs logged as running foreach under "triton"


def _freeze(v: Any) -> Hashable:
    if isinstance(v, float | int | str | bool | None):
        return v
    if isinstance(v, torch.Tensor):
        return float(v)
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    return v


class GraphOptimizer(torch.optim.Optimizer):
    """Base of compiled optimizers. A subclass sets ``builder`` (hyperparameters -> Graph) and
    may override :meth:`graph_kwargs` (a group's hyperparameters -> the builder's arguments) and
    ``state_names`` (level name -> key in the per-parameter state).

    ``compilations`` counts the programs compiled (one per graph structure, not per number).
    ``backend``: ``"auto"`` (when the graph is one of torch's fused kernels,
    :mod:`nlgraph.compiler.optimizer.fused`: on CUDA nlgraph's Triton kernel over the group packed
    flat, elsewhere torch's fused kernel; else the foreach program), ``"triton"`` (the Triton
    kernel on any device, the interpreter on CPU; graphs it does not match keep the foreach
    program), ``"foreach"`` (always the foreach program) or ``"reference"`` (the naive
    per-parameter interpreter, :mod:`nlgraph.compiler.optimizer.reference`); the environment
    variable ``NLGRAPH_BACKEND`` (``reference``/``chunk``/``triton``; ``chunk`` selects the
    foreach program) sets it for every optimizer.

    On the Triton path a param group's parameters (per device and dtype) are packed into one
    flat buffer the first time they step: their ``.data`` become views into it, and their state
    entries views into flat moments (:class:`nlgraph.kernels.optimizer.FlatParams`).
    """

    builder: Callable[..., Graph]
    state_names: Mapping[str, str] = {}

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._programs: dict[Hashable, OptimizerProgram] = {}
        self._bound: OrderedDict[Hashable, tuple[OptimizerProgram, list[float]]] = OrderedDict()
        self._hparams = tuple(defaults)  # torch adds its own keys to self.defaults later
        self._inputs: dict[torch.Tensor, list[torch.Tensor]] = {}
        self._last: dict[int, OptimizerProgram] = {}
        self.compilations = 0
        self._flat: dict[tuple, tuple[Any, FlatParams]] = {}  # (group, device, dtype) ->
        # (part, its parameters packed); one per bucket, replaced when the structure changes
        # NLGRAPH_BACKEND, read by the kernels' dispatcher: "chunk" selects the foreach program
        forced = _dispatch.forced_backend()
        self.backend = {"chunk": "foreach"}.get(forced, forced) or "auto"
        super().__init__(params, defaults)

    def graph_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        """The builder's keyword arguments for ``group`` (override to map torch-style names)."""
        return {k: group[k] for k in self._hparams}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.program(self.param_groups[-1])  # bad hyperparameters fail here, not at step 1

    def program(self, group: dict[str, Any]) -> tuple[OptimizerProgram, list[float]]:
        """The compiled program for ``group`` and the numbers its hyperparameters give."""
        key = tuple(_freeze(group.get(k)) for k in (*self._hparams, "initial_lr"))
        hit = self._bound.get(key)
        if hit is not None:
            self._bound.move_to_end(key)
            return hit
        kwargs = {k: float(v) if isinstance(v, torch.Tensor) else v
                  for k, v in self.graph_kwargs(group).items()}  # fmt: skip
        try:
            spec = type(self).builder(**kwargs).spec
        except SpecFieldError as err:
            raise SpecError(
                f"{type(self).__name__}: hyperparameters {kwargs} give an invalid graph: "
                f"{err.detail}"
            ) from None
        skeleton, numbers, _ = scan(spec)
        prog = self._programs.get(skeleton)
        if prog is None:
            prog = self._programs[skeleton] = OptimizerProgram(spec, self.state_names)
            prog.fused = match(spec, prog.key)
            self.compilations += 1
            _log.info(
                "%s: graph %r lowers to %s", type(self).__name__, spec.name,
                f"torch._fused_{prog.fused.kernel}_" if prog.fused else "a foreach program",
            )  # fmt: skip
        hit = self._bound[key] = (prog, numbers)
        if len(self._bound) > _CACHE:
            self._bound.popitem(last=False)
        return hit

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._last.clear()  # check every state for the buffers its program needs

    def watch(self, module: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        """Record the inputs of every ``nn.Linear`` of ``module`` during training forwards: the
        keys a ``dgd`` rule regresses on (PAPER.md 3.1). Returns the hook handles."""

        def record(weight: torch.Tensor) -> Callable[..., None]:
            def hook(_: torch.nn.Module, args: tuple) -> None:
                if torch.is_grad_enabled():
                    x = args[0].detach().reshape(-1, weight.shape[1])
                    self._inputs.setdefault(weight, []).append(x)

            return hook

        return [
            m.register_forward_pre_hook(record(m.weight))
            for m in module.modules()
            if isinstance(m, torch.nn.Linear)
        ]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for i, group in enumerate(self.param_groups):
            prog, numbers = self.program(group)
            fresh = self._last.get(i) is not prog  # a new structure: states may lack buffers
            self._last[i] = prog
            buckets: dict[tuple, tuple[list, list, list, Any]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or p.is_complex():
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients or complex "
                        f"parameters (got a {'sparse gradient' if p.grad.is_sparse else p.dtype})"
                    )
                part = prog.part_of(p, group.get("level"))
                state = self.state[p]
                if fresh or "step" not in state:
                    prog.init_state(part, p, state)
                bucket = buckets.setdefault((id(part), p.device, p.dtype), ([], [], [], part))
                bucket[0].append(p)
                bucket[1].append(p.grad)
                bucket[2].append(state)
            for params, grads, states, part in buckets.values():
                if group.get("maximize", False):
                    grads = torch._foreach_neg(grads)
                if self.backend == "reference":
                    self._step_reference(group, part, params, grads, states)
                elif self._flat_wanted(prog, params, numbers):
                    self._step_flat((i, group), prog, part, params, grads, states, numbers)
                else:
                    self._step_bucket(prog, part, params, grads, states, numbers)
        self._inputs.clear()
        return loss

    def _step_bucket(
        self,
        prog: OptimizerProgram,
        part: Any,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
        numbers: list[float],
    ) -> None:
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        fused = prog.fused if self.backend == "auto" else None
        if fused is not None and fused.applies(numbers) and fused.eligible(params, steps):
            fused(params, grads, states, steps, numbers)
            return
        counts = torch.stack(steps).tolist() if len(steps) > 1 else [steps[0].item()]
        by_count: dict[int, list[int]] = {}
        for i, c in enumerate(counts):  # parameters whose grads were None have fewer steps
            by_count.setdefault(int(c), []).append(i)
        for count, idx in by_count.items():
            ps, gs, sts = (
                (params, grads, states)
                if len(idx) == len(params)
                else ([params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx])
            )
            keys = None
            if part.needs_inputs:
                keys = [torch.cat(self._inputs[p]) if p in self._inputs else None for p in ps]
            prog.step(part, ps, gs, sts, count, numbers, keys)

    def _flat_wanted(
        self, prog: OptimizerProgram, params: list[torch.Tensor], numbers: list[float]
    ) -> bool:
        """Whether this bucket runs nlgraph's Triton kernel over a flat buffer."""
        if self.backend == "triton":
            _dispatch.resolve_backend("optimizer_update", "triton")  # a clear error if absent
        elif self.backend != "auto" or params[0].device.type != "cuda":
            return False
        fused = prog.fused
        if fused is None or not fused.applies(numbers) or not fused.flat_eligible(params):
            if self.backend == "triton" and (prog.spec.name, params[0].dtype) not in _TOLD:
                _TOLD.add((prog.spec.name, params[0].dtype))
                _log.info("graph %r (%s) has no Triton lowering; it runs the foreach program",
                          prog.spec.name, params[0].dtype)  # fmt: skip
            return False
        return (
            self.backend == "triton"
            or _dispatch.resolve_backend("optimizer_update", "auto", params[0].device) == "triton"
        )

    def _step_flat(
        self,
        where: tuple[int, dict[str, Any]],
        prog: OptimizerProgram,
        part: Any,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
        numbers: list[float],
    ) -> None:
        """The bucket's step as one launch per distinct step count over the group packed flat
        (the parameters of this part, device and dtype, with or without a gradient now)."""
        i, group = where
        p0 = params[0]
        key = (i, p0.device, p0.dtype)
        members = [
            p for p in group["params"]
            if p.device == p0.device and p.dtype == p0.dtype
            and prog.part_of(p, group.get("level")) is part
        ]  # fmt: skip
        owner, flat = self._flat.get(key, (None, None))
        if owner is not part or flat is None or not flat.holds(members):
            flat = FlatParams(members, prog.fused.keys)  # states move over in adopt()
            self._flat[key] = (part, flat)
        idx = flat.indices(params)
        flat.gather(idx, grads)
        flat.adopt(idx, states)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        by_count: dict[int, list[int]] = {}
        for j, s in zip(idx, steps, strict=True):  # a parameter that lacked grads lags behind
            by_count.setdefault(int(s.item()), []).append(j)
        for count, sub in by_count.items():
            prog.fused.flat_step(flat, sub, count, numbers)

    def _step_reference(
        self,
        group: dict[str, Any],
        part: Any,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        states: list[dict[str, Any]],
    ) -> None:
        """The naive reference: one parameter at a time, autograd on each declared objective."""
        spec = type(self).builder(**self.graph_kwargs(group)).spec
        for p, g, state in zip(params, grads, states, strict=True):
            state["step"] += 1
            key = torch.cat(self._inputs[p]) if p in self._inputs else None
            reference_step(spec, part.weights.name, p, g, state, int(state["step"]),
                           self.state_names, key)  # fmt: skip


def _from_graph(graph: Graph | GraphSpec) -> tuple[Callable[..., Graph], dict[str, Any]]:
    """A saved or traced graph as a builder: its symbolic hyperparameters are the optimizer's
    (names and defaults), set by substitution (:func:`nlgraph.hyper.substitute`)."""
    spec = graph.spec if isinstance(graph, Graph) else graph
    hp = spec.hyperparameters
    defaults = {} if hp is None else hp.values()

    def build(**values: Any) -> Graph:
        return substitute(spec, **values)

    build.__name__ = spec.name
    build.__doc__ = spec.doc
    return build, defaults


def compile_optimizer(
    builder: Callable[..., Graph] | Graph | GraphSpec,
    name: str | None = None,
    defaults: dict[str, Any] | None = None,
    graph_kwargs: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    state_names: Mapping[str, str] | None = None,
    doc: str | None = None,
) -> type[GraphOptimizer]:
    """An optimizer class from a graph builder.

    Args:
        builder: hyperparameters -> optimizer graph; or a graph (``nl.load("adam.yaml")``,
            ``nl.trace(adam)``), whose symbolic hyperparameters become the optimizer's.
        name: the class name (default: the builder's, in CamelCase).
        defaults: the optimizer's hyperparameters and their defaults, in positional order
            (default: the builder's keyword arguments).
        graph_kwargs: a param group -> the builder's arguments (default: the group's values of
            ``defaults``); how torch-style names (``betas``) map onto a builder (``b1, b2``).
        state_names: level name -> key in the per-parameter state (``{"m": "exp_avg"}``).
    """
    if isinstance(builder, Graph | GraphSpec):
        builder, traced = _from_graph(builder)
        defaults = traced if defaults is None else defaults
    if defaults is None:
        sig = inspect.signature(builder)
        defaults = {
            k: p.default for k, p in sig.parameters.items() if p.default is not inspect._empty
        }
    cls_name = name or "".join(w.capitalize() for w in builder.__name__.split("_"))
    base = dict(defaults)
    order = list(base)

    def __init__(self: GraphOptimizer, params: Iterable[Any], *args: Any, **hparams: Any) -> None:
        if len(args) > len(order):
            raise TypeError(f"{cls_name}: expected at most {len(order)} positional arguments")
        for k, v in zip(order, args, strict=False):
            if k in hparams:
                raise TypeError(f"{cls_name}: got multiple values for {k!r}")
            hparams[k] = v
        unknown = set(hparams) - set(base)
        if unknown:
            raise TypeError(
                f"{cls_name}: unknown hyperparameters {sorted(unknown)}; expected {order}"
            )
        GraphOptimizer.__init__(self, params, {**base, **hparams})

    params_ = [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params_ += [
        inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v)
        for k, v in base.items()
    ]
    __init__.__signature__ = inspect.Signature(params_)  # type: ignore[attr-defined]
    attrs: dict[str, Any] = {
        "builder": staticmethod(builder),
        "__init__": __init__,
        "__doc__": doc or builder.__doc__,
        "state_names": dict(state_names or {}),
        "__module__": "nlgraph.optim",  # where the drop-ins are found (and pickled) by name
    }
    if graph_kwargs is not None:
        attrs["graph_kwargs"] = lambda self, group: graph_kwargs(group)
    return type(cls_name, (GraphOptimizer,), attrs)
