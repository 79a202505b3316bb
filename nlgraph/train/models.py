"""Building the learner and its optimizer from names; matching baselines' parameter counts."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from nlgraph._errors import NLGraphError
from nlgraph.train.data import VOCAB
from nlgraph.train.errors import TrainConfigError

__all__ = [
    "load_graph", "build_learner", "build_optimizer", "build_trainable", "check_optimizer",
    "count_params", "match_hidden", "spec_optimizer_levels", "SPEC_OPTIMIZER",
]  # fmt: skip

SPEC_SUFFIXES = (".json", ".yaml", ".yml")
SPEC_OPTIMIZER = "spec"  # the optimizer levels the model's own graph declares


def load_graph(model: str, preset: str | None = None, sizes: dict[str, Any] | None = None):
    """A language-model graph from a library name, ``module:function`` or a .json/.yaml spec.

    Builders get ``vocab=256`` (bytes), ``preset`` and ``sizes`` where their signature takes
    them; a spec file is used as is (``preset``/``sizes`` then raise).
    """
    from nlgraph import library
    from nlgraph.graph import Graph

    sizes = dict(sizes or {})
    path = Path(model)
    if path.suffix in SPEC_SUFFIXES or path.is_file():
        if preset is not None or sizes:
            raise TrainConfigError(
                f"--size/sizes do not apply to the spec file {model!r}; edit the file instead"
            )
        from nlgraph.serialize import load

        graph = load(path)
    else:
        builder = library.builder(model) if ":" not in model else library.resolve(model)
        params = inspect.signature(builder).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs: dict[str, Any] = {}
        if "vocab" in params or takes_any:
            kwargs["vocab"] = VOCAB
        if preset is not None:
            if "preset" not in params and not takes_any:
                raise TrainConfigError(f"model {model!r} has no presets; drop --size")
            kwargs["preset"] = preset
        kwargs.update(sizes)
        graph = library.get(model, **kwargs)
    spec = graph.spec if isinstance(graph, Graph) else graph
    inputs = [i.name for i in spec.inputs]
    if "tokens" not in inputs or "logits" not in spec.outputs:
        raise TrainConfigError(
            f"model {model!r} maps {inputs} to {sorted(spec.outputs)}; the trainer needs a "
            "language model mapping 'tokens' to 'logits' (e.g. hope, transformer, titans_lm)"
        )
    return graph


def spec_optimizer_levels(model: str, preset: str | None = None, sizes: dict | None = None):
    """The optimizer levels ``model``'s graph declares beside its learner (empty: none; then
    ``--optimizer`` chooses one)."""
    from nlgraph.compiler import optimizer_levels
    from nlgraph.graph import Graph

    graph = load_graph(model, preset, sizes)
    return optimizer_levels(graph.spec if isinstance(graph, Graph) else graph)


def _build(model: str, preset: str | None, sizes: dict | None, seed: int, device: str):
    """The compiled learner, or the :class:`~nlgraph.optim.System` of a graph that declares
    its optimizer levels; parameters drawn from ``seed``."""
    from nlgraph.compiler import compile
    from nlgraph.optim import compile_system

    graph = load_graph(model, preset, sizes)
    torch.manual_seed(seed)
    if spec_optimizer_levels(model, preset, sizes):
        system = compile_system(graph, device=device)
        learner = system.learner
    else:
        system = learner = compile(graph, device=device)
    with torch.no_grad():  # the head must produce byte logits
        probe = torch.zeros(1, 1, dtype=torch.long, device=device)
        width = learner({"tokens": probe})[0]["logits"].shape[-1]
    if width != VOCAB:
        raise TrainConfigError(
            f"model {model!r} gives {width} logits per token; byte-level training needs {VOCAB}"
        )
    return system


def build_learner(
    model: str,
    preset: str | None = None,
    sizes: dict[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
):
    """Compile ``model`` with parameters drawn from ``seed`` (the same seed, the same init);
    of a graph with optimizer levels, its learner part."""
    built = _build(model, preset, sizes, seed, device)
    return getattr(built, "learner", built)


def build_trainable(cfg: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The learner and optimizer a :class:`~nlgraph.train.trainer.TrainConfig` names: with
    ``optimizer="spec"`` the optimizer levels of the model's graph, compiled with it
    (:func:`nlgraph.optim.compile_system`), else :func:`build_optimizer`."""
    built = _build(cfg.model, cfg.preset, cfg.sizes, cfg.seed, cfg.device)
    if cfg.optimizer == SPEC_OPTIMIZER:
        if not hasattr(built, "optimizer"):
            raise TrainConfigError(
                f"model {cfg.model!r} declares no optimizer levels; choose --optimizer"
            )
        return built.learner, built.optimizer
    if hasattr(built, "optimizer"):
        raise TrainConfigError(
            f"model {cfg.model!r} declares its own optimizer levels; drop --optimizer"
        )
    return built, build_optimizer(cfg.optimizer, built.parameters(), cfg.lr, cfg.weight_decay)


def count_params(module: torch.nn.Module) -> int:
    """Trainable parameters (slow levels, meta-learned initial states, learned rates)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def optimizer_names() -> list[str]:
    from nlgraph import library

    return ["adamw", *[n for n in library.names("optimizer") if n != "adamw"]]


def check_optimizer(name: str) -> None:
    """Refuse an optimizer name that :func:`build_optimizer` does not know (nothing is built)."""
    if name not in optimizer_names() and name != SPEC_OPTIMIZER:
        raise TrainConfigError(
            f"unknown optimizer {name!r}; expected one of {', '.join(optimizer_names())}"
        )


def build_optimizer(
    name: str, params: Any, lr: float, weight_decay: float = 0.01
) -> torch.optim.Optimizer:
    """``adamw`` is ``torch.optim.AdamW``; any other name is compiled from the library's graph."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    from nlgraph import library
    from nlgraph.optim import compile_optimizer

    check_optimizer(name)
    cls = compile_optimizer(library.builder(name))
    defaults = inspect.signature(library.builder(name)).parameters
    kwargs: dict[str, Any] = {"lr": lr} if "lr" in defaults else {}
    try:
        return cls(params, **kwargs)
    except (TypeError, NLGraphError) as err:
        raise TrainConfigError(f"optimizer {name!r}: {err}") from None


def match_hidden(
    model: str, target: int, preset: str | None, sizes: dict[str, Any], seed: int = 0
) -> tuple[dict[str, Any], int]:
    """``sizes`` with ``hidden`` chosen so ``model`` has about ``target`` trainable parameters.

    The count is affine in the MLP width ``hidden`` for the library's models: two probes give
    the line, and the rounded solution is checked by building the model.
    """

    def count(h: int) -> int:
        graph = load_graph(model, preset, {**sizes, "hidden": h})
        from nlgraph.compiler import compile

        torch.manual_seed(seed)
        return count_params(compile(graph))

    h0, h1 = 64, 128
    c0, c1 = count(h0), count(h1)
    slope = (c1 - c0) / (h1 - h0)
    if slope <= 0:
        return dict(sizes), count(h0)
    h = max(8, int(round(h0 + (target - c0) / slope)))
    return {**sizes, "hidden": h}, count(h)
