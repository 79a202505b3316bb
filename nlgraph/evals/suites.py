"""The suites: each trains every model for a fixed small budget, then scores it.

A suite is cut into *units* (one model, or one model on one language), each a pure function of
its JSON-able config: the same config and seed give the same numbers, run alone or in a pool.
``config(suite, quick)`` gives the defaults; ``run_unit`` runs one; ``units`` lists a suite's.

Budgets are in outer steps of a fixed batch, the same for every model of a suite. The defaults
keep the whole of ``nlgraph eval`` near 10 minutes on 2 CPU cores; tiny Hope dominates (its
self-modifying memories run chunk by chunk), so sequences are short and models are the tiny
preset narrowed to d=32. These budgets are far below the paper's: see docs/evals.md.

Chunk sizes: a chunked memory reads the state its previous chunk left (``chunk_index="causal"``),
so a token sees nothing of its own chunk through the memory, only its 4-token convolution. With
``chunk_mem`` as long as the sequence Hope sees no context at all; the suites keep Hope's
``chunk_mem`` (the memory read by ``q``) at 4 and Titans' chunk at 4, and a test checks that
every default model's last logits depend on a token 8 positions back.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from nlgraph.evals import languages, loop, tasks
from nlgraph.evals.errors import EvalConfigError
from nlgraph.evals.models import build

__all__ = ["SUITES", "SIZES", "config", "units", "run_unit"]

SUITES = ("mqar", "niah", "formal", "continual")
# every model: the tiny preset narrowed to d=32 (Hope's cost grows with the head width squared)
SIZES: dict[str, Any] = dict(d=32, width=32, hidden=128, heads=2, n_layers=2)
EVAL_SEED = 1_000_003  # evaluation batches: a stream of their own, fixed for every model

_DEFAULTS: dict[str, dict[str, Any]] = {
    "mqar": dict(
        vocab=32,
        n_pairs=4,
        steps=200,
        batch=32,
        eval_batch=256,
        lr=1e-2,
        sizes=dict(chunk=8, chunk_mem=4, cms_chunks=[8, 16], titans_lm=dict(chunk=4)),
    ),
    "niah": dict(
        vocab=32,
        train_lengths=[16, 32],
        train_needles=[1, 2, 4],
        eval_lengths=[16, 32, 64],
        tasks={"single": 1, "multikey": 4},
        steps=200,
        batch=16,
        eval_batch=128,
        lr=3e-3,
        sizes=dict(chunk=8, chunk_mem=4, cms_chunks=[8, 32], titans_lm=dict(chunk=4)),
    ),
    "formal": dict(
        languages=list(languages.LANGUAGES),
        max_len=12,
        steps=100,
        batch=16,
        eval_batch=128,
        lr=1e-2,
        sizes=dict(chunk=8, chunk_mem=4, cms_chunks=[4, 12], titans_lm=dict(chunk=4)),
    ),
    "continual": dict(
        models=["hope_attention"],
        n_keys=16,
        n_values=16,
        n_pairs=16,
        segments=6,
        streams=32,
        steps=200,
        batch=16,
        lr=1e-2,
        sizes=dict(cms_chunks=[8, 32], cms_lrs=2.0),
    ),
}
_QUICK: dict[str, dict[str, Any]] = {
    "mqar": dict(steps=3, batch=4, eval_batch=16),
    "niah": dict(steps=3, batch=4, eval_batch=8, train_lengths=[16], eval_lengths=[16, 24]),
    "formal": dict(steps=2, batch=4, eval_batch=8, max_len=8, languages=["parity", "anbn"]),
    "continual": dict(steps=3, batch=4, streams=4, segments=2, n_pairs=8),
}


def config(suite: str, quick: bool = False, **override: Any) -> dict[str, Any]:
    """The suite's settings (``quick``: seconds, for smoke tests); ``override`` replaces keys
    (``steps``, ``languages``, ``sizes`` merged into the defaults, ...)."""
    if suite not in SUITES:
        raise EvalConfigError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    cfg = {**_DEFAULTS[suite], **(_QUICK[suite] if quick else {})}
    unknown = sorted(set(override) - set(cfg))
    if unknown:
        raise EvalConfigError(f"suite {suite!r} has no setting {unknown}; it has {sorted(cfg)}")
    user = override.pop("sizes", {})
    sizes = {k: dict(v) if isinstance(v, dict) else v for k, v in {**SIZES, **cfg["sizes"]}.items()}
    for per_model in [v for v in sizes.values() if isinstance(v, dict)]:
        for k in user:  # an explicit size wins over a default for one model
            per_model.pop(k, None)
    sizes.update(user)
    cfg.update(override, sizes=sizes)
    for key in ("steps", "batch", "eval_batch", "streams", "segments"):
        if key in cfg and (not isinstance(cfg[key], int) or cfg[key] < 1):
            raise EvalConfigError(f"{suite}: {key} must be a positive int, got {cfg[key]!r}")
    if suite == "continual":
        from nlgraph.evals.models import build_graph, model_names

        for name in cfg["models"]:
            if name not in model_names():
                build_graph(name, 2)  # raises the helpful unknown-name error
    if suite == "formal":
        for name in cfg["languages"]:
            languages.lengths(name, 1, cfg["max_len"])  # unknown names, empty bins: fail now
            languages.lengths(name, cfg["max_len"] + 1, 2 * cfg["max_len"])
    return cfg


def units(suite: str, cfg: dict[str, Any], models: list[str]) -> list[dict[str, Any]]:
    """The suite's work: one unit per model (per language for ``formal``)."""
    if suite == "formal":
        return [
            dict(suite=suite, model=m, language=lang, cfg=cfg)
            for lang in cfg["languages"]
            for m in models
        ]
    if suite == "continual":
        models = cfg["models"]
    return [dict(suite=suite, model=m, cfg=cfg) for m in models]


def run_unit(unit: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Train and score one unit; returns a JSON-able dict."""
    torch.manual_seed(seed)
    fn = {"mqar": _mqar, "niah": _niah, "formal": _formal, "continual": _continual}
    start = time.perf_counter()
    out = {"model": unit["model"], **fn[unit["suite"]](unit, seed)}
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def _fit(unit: dict[str, Any], vocab: int, sample: Any, seed: int) -> tuple[Any, dict[str, Any]]:
    cfg = unit["cfg"]
    learner = build(unit["model"], vocab, cfg["sizes"], seed=seed)
    hist = loop.train(learner, sample, cfg["steps"], lr=cfg["lr"], seed=seed)
    tail = hist["losses"][-10:] or [float("nan")]
    info = {
        "params": sum(p.numel() for p in learner.parameters() if p.requires_grad),
        "steps": len(hist["losses"]),
        "train_seconds": round(hist["seconds"], 2),
        "final_loss": round(sum(tail) / len(tail), 4),
        "skipped": hist["skipped"],
        "status": hist["status"],
    }
    return learner, info


def _accuracy(correct: torch.Tensor, mask: torch.Tensor) -> float:
    return round(float(correct[mask].float().mean()) if mask.any() else float("nan"), 4)


def _mqar(unit: dict[str, Any], seed: int) -> dict[str, Any]:
    c = unit["cfg"]
    kw = dict(n_pairs=c["n_pairs"], vocab=c["vocab"])
    learner, info = _fit(unit, c["vocab"], lambda g: tasks.mqar(c["batch"], seed=g, **kw), seed)
    batch = tasks.mqar(c["eval_batch"], seed=EVAL_SEED + seed, **kw)
    correct, _ = loop.predict(learner, batch, feedback=True)
    return {**info, "accuracy": _accuracy(correct, batch.scored)}


def _niah(unit: dict[str, Any], seed: int) -> dict[str, Any]:
    c = unit["cfg"]

    def sample(g: torch.Generator) -> tasks.Batch:
        i = int(torch.randint(0, len(c["train_lengths"]), (1,), generator=g))
        j = int(torch.randint(0, len(c["train_needles"]), (1,), generator=g))
        return tasks.niah(
            c["batch"],
            length=c["train_lengths"][i],
            n_needles=c["train_needles"][j],
            vocab=c["vocab"],
            seed=g,
        )

    learner, info = _fit(unit, c["vocab"], sample, seed)
    acc: dict[str, dict[str, float]] = {}
    for task, n in c["tasks"].items():
        acc[task] = {}
        for length in c["eval_lengths"]:
            batch = tasks.niah(
                c["eval_batch"],
                length=length,
                n_needles=n,
                vocab=c["vocab"],
                seed=EVAL_SEED + seed + length,
            )
            correct, _ = loop.predict(learner, batch, feedback=True)
            acc[task][str(length)] = _accuracy(correct, batch.scored)
    return {**info, "accuracy": acc}


def _formal(unit: dict[str, Any], seed: int) -> dict[str, Any]:
    c, lang = unit["cfg"], unit["language"]
    L = c["max_len"]
    learner, info = _fit(
        unit,
        languages.VOCAB,
        lambda g: languages.formal(lang, c["batch"], min_len=1, max_len=L, seed=g),
        seed,
    )
    out: dict[str, Any] = {**info, "language": lang}
    for name, (lo, hi) in {"bin0": (1, L), "bin1": (L + 1, 2 * L)}.items():
        batch = languages.formal(
            lang, c["eval_batch"], min_len=lo, max_len=hi, seed=EVAL_SEED + seed
        )
        # labels are not inputs here: no feedback, so CMS blocks never see a target
        correct, _ = loop.predict(learner, batch, feedback=False)
        whole = (correct | ~batch.scored).all(1)  # recognised: every prediction right
        out[name] = round(float(whole.float().mean()), 4)
        out[f"{name}_positions"] = _accuracy(correct, batch.scored)
    return out


def _continual(unit: dict[str, Any], seed: int) -> dict[str, Any]:
    from nlgraph.evals.stream import run_stream

    c = unit["cfg"]
    vocab = c["n_keys"] + c["n_values"]

    def sample(g: torch.Generator) -> tasks.Batch:  # a fresh task per sequence
        maps = torch.stack(
            [tasks.kv_mapping(c["n_keys"], c["n_values"], seed=g) for _ in range(c["batch"])]
        )
        return tasks.kv_segment(maps, n_pairs=c["n_pairs"], seed=g)

    learner, info = _fit(unit, vocab, sample, seed)
    if not any(lp.lowering == "boundary" for lp in learner.plan.levels.values()):
        raise EvalConfigError(
            f"continual: model {unit['model']!r} has no CMS levels to update at test time; "
            "use hope_attention or hope"
        )
    return {**info, **run_stream(learner, c, seed=EVAL_SEED + seed)}
