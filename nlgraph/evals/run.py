"""Run suites: resolve their configs, run their units (in a process pool with ``jobs > 1``),
then report each suite: print its tables, write its JSON.

Every unit seeds itself, so the numbers do not depend on ``jobs`` or on the order units finish.
With ``seeds=N`` every unit runs N times, with seeds ``seed, seed+1, ..., seed+N-1`` (each seeds
its data and its initialisation), and the report gives the mean and spread over the seeds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nlgraph.evals import report, suites
from nlgraph.evals.errors import EvalConfigError
from nlgraph.evals.models import DEFAULT_MODELS, model_names

__all__ = ["run_suites"]

# relative cost of one training step, for ordering work in the pool (measured on CPU, d=32)
_COST = {"hope": 12.0, "titans_lm": 3.0, "hope_attention": 2.0}


def _cost(unit: dict[str, Any]) -> float:
    return _COST.get(unit["model"], 1.0) * unit["cfg"]["steps"]


def _work(args: tuple[int, dict[str, Any], int]) -> tuple[int, dict[str, Any]]:
    import torch

    torch.set_num_threads(1)  # one core per worker
    i, unit, seed = args
    return i, suites.run_unit(unit, seed)


def _summary(unit: dict[str, Any], r: dict[str, Any], seed: int | None = None) -> str:
    where = unit["suite"] + (f"/{unit['language']}" if "language" in unit else "")
    where += f" {unit['model']}" + ("" if seed is None else f" seed {seed}")
    return (
        f"{where}: {r['steps']} steps in {r['train_seconds']:.0f} s, "
        f"loss {r['final_loss']:.3f} ({r['seconds']:.0f} s with scoring)"
    )


def run_suites(
    names: Sequence[str] = suites.SUITES,
    *,
    models: Sequence[str] = DEFAULT_MODELS,
    quick: bool = False,
    overrides: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    seeds: int = 1,
    out: str | Path | None = None,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Run suites ``names`` on ``models``; returns ``{suite: report}`` (see
    :func:`nlgraph.evals.report.suite_report`). With ``out``, writes ``<out>/<suite>.json``
    and ``.txt``. ``overrides[suite]`` replaces settings of :func:`suites.config`. Every unit
    runs once per seed ``seed, ..., seed + seeds - 1``; the report has their mean and std."""
    names, models = list(dict.fromkeys(names)), list(dict.fromkeys(models))
    if not names:
        raise EvalConfigError("no suite to run; expected some of " + ", ".join(suites.SUITES))
    known = set(model_names())
    bad = [m for m in models if m not in known]
    if bad:
        from nlgraph.evals.models import build_graph

        build_graph(bad[0], 2)  # raises the helpful unknown-name error
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise EvalConfigError(f"jobs must be a positive int, got {jobs!r}")
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise EvalConfigError(f"seeds must be a positive int, got {seeds!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise EvalConfigError(f"seed must be an int >= 0, got {seed!r}")
    seed_list = list(range(seed, seed + seeds))
    overrides = overrides or {}
    cfgs = {s: suites.config(s, quick, **overrides.get(s, {})) for s in names}
    units = [u for s in names for u in suites.units(s, cfgs[s], models)]
    work = [(u, sd) for sd in seed_list for u in units]  # (unit, seed) pairs
    many = f" x {seeds} seeds" if seeds > 1 else ""
    log(
        f"nlgraph eval: {len(units)} training runs{many} over {', '.join(names)}"
        f"{' (quick)' if quick else ''}; tiny Hope is slow on CPU (its memories run chunk by "
        "chunk), so budgets are small and sequences short"
    )
    results: list[dict[str, Any] | None] = [None] * len(work)
    order = sorted(range(len(work)), key=lambda i: -_cost(work[i][0]))
    tag = (lambda sd: sd) if seeds > 1 else (lambda sd: None)
    start = time.perf_counter()
    if jobs == 1 or len(work) == 1:
        for n, i in enumerate(order, 1):
            unit, sd = work[i]
            results[i] = suites.run_unit(unit, sd)
            log(f"[{n}/{len(work)}] {_summary(unit, results[i], tag(sd))}")
    else:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no fork after torch started threads
        with ctx.Pool(min(jobs, len(work))) as pool:
            todo = [(i, *work[i]) for i in order]
            for n, (i, r) in enumerate(pool.imap_unordered(_work, todo), 1):
                results[i] = r
                unit, sd = work[i]
                log(f"[{n}/{len(work)}] {_summary(unit, r, tag(sd))}")
    log(f"nlgraph eval: trained and scored in {time.perf_counter() - start:.0f} s")
    docs = {}
    for s in names:
        done = list(zip(work, results, strict=True))
        runs = [[r for (u, sd), r in done if u["suite"] == s and sd == k and r] for k in seed_list]
        doc = report.suite_report(s, cfgs[s], runs, seeds=seed_list)
        doc["seed"], doc["jobs"] = seed, jobs  # with jobs > 1 each run has one thread
        docs[s] = doc
        log("\n" + report.render(doc))
        if out is not None:
            path, _ = report.write(doc, out)
            log(f"wrote {path}")
    return docs
