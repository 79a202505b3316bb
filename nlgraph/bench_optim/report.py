"""The benchmark's outputs: a markdown table, ``results.json`` and a plot (matplotlib, when it
is installed; without it the table says so and nothing else changes)."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nlgraph.bench_optim.problems import PROBLEMS

if TYPE_CHECKING:  # the types only: run.py imports this module
    from nlgraph.bench_optim.run import BenchResult, Cell

__all__ = ["progress_line", "render", "write", "NO_MATPLOTLIB"]

SCHEMA_VERSION = 1
NO_MATPLOTLIB = "matplotlib is not installed: no plot (pip install 'nlgraph[plot]')"


def _num(x: float) -> str:
    return "diverged" if not math.isfinite(x) else f"{x:.4g}"


def _lr(lr: float | None) -> str:
    return "own" if lr is None else f"{lr:.3g}"


def progress_line(task: Any, c: Any, cell: Cell, seconds: float) -> str:
    """One line per finished (problem, optimizer), for the console."""
    if not cell.picked:
        return f"{task.problem.name:14s} {c.label:24s} diverged at every lr ({seconds:.1f} s)"
    return (
        f"{task.problem.name:14s} {c.label:24s} lr {_lr(cell.best_lr):>8s}  "
        f"{task.problem.metric} {_score(cell)} ({seconds:.1f} s)"
    )


def _score(cell: Cell) -> str:
    """``mean ± std`` of the test metric at the picked lr (the mean alone for one seed)."""
    spread = f" ± {cell.test_std:.2g}" if len(cell.tests) > 1 else ""
    return f"{cell.test_mean:.4g}{spread}"


def _cell_text(cell: Cell) -> str:
    if not cell.picked:
        return "diverged at every lr"
    return f"{_score(cell)} (lr {_lr(cell.best_lr)})"


def machine() -> str:
    return (
        f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, one thread"
    )


def render(result: BenchResult, plot_note: str = "") -> str:
    """``table.md``: the protocol, the results table and every learning-rate sweep."""
    seeds = result.seeds
    seed_text = f"seeds {seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else f"seed {seeds[0]}"
    factors = ", ".join(f"{f:g}" for f in result.factors)
    lines = [
        "# Optimizer comparison (`nlgraph bench-optim`)",
        "",
        f"{datetime.date.today().isoformat()}; {machine()}; "
        f"{'--quick sizes' if result.quick else 'default sizes'}; {seed_text}; "
        f"{result.seconds:.0f} s.",
        "",
        f"Protocol: every optimizer trains every problem with the learning rates "
        f"{{{factors}}} x its default `lr` (nothing else is tuned), constant, with each seed "
        "(the seed draws the initialisation and the batch order; the data are fixed). The "
        "learning rate with the lowest mean validation metric is picked (a learning rate at "
        "which any seed diverged is never picked); the table gives the test metric there, "
        "mean ± sample std over the seeds. Lower is better.",
        "",
        "## Results",
        "",
    ]
    head = ["optimizer"] + [f"{PROBLEMS[p].title}: {PROBLEMS[p].metric}" for p in result.problems]
    lines += ["| " + " | ".join([*head, "mean rank"]) + " |", "|" + "---|" * (len(head) + 1)]
    ranks = {p: result.ranks(p) for p in result.problems}
    for lab in result.labels:
        name = f"{lab} (baseline)" if lab in result.baselines else lab
        cells = [_cell_text(result.cells[p, lab]) for p in result.problems]
        mean_rank = sum(ranks[p][lab] for p in result.problems) / len(result.problems)
        lines.append("| " + " | ".join([name, *cells, f"{mean_rank:.2g}"]) + " |")
    lines += ["", "## Learning-rate sweeps", "",
              "Validation metric at each learning rate, mean over the seeds; **bold**: picked.",
              ""]  # fmt: skip
    for p in result.problems:
        metric = PROBLEMS[p].metric.replace("test ", "validation ")
        lines += [f"### {PROBLEMS[p].title} ({metric})", ""]
        lines += ["| optimizer | " + " | ".join(f"lr x {f:g}" for f in result.factors) + " |"]
        lines += ["|" + "---|" * (len(result.factors) + 1)]
        for lab in result.labels:
            cell = result.cells[p, lab]
            row = []
            for lr in result.lrs[lab]:
                text = f"{_num(cell.val_mean(lr))} ({_lr(lr)})"
                row.append(f"**{text}**" if cell.picked and lr == cell.best_lr else text)
            lines.append(f"| {lab} | " + " | ".join(row) + " |")
        lines.append("")
    notes = [*result.notes, *([plot_note] if plot_note else [])]
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def as_json(result: BenchResult) -> dict[str, Any]:
    def num(x: float) -> float | None:
        return x if math.isfinite(x) else None

    cells = {}
    for (p, lab), cell in result.cells.items():
        cells.setdefault(p, {})[lab] = {
            "lr": cell.best_lr, "picked": cell.picked, "test_mean": num(cell.test_mean),
            "test_std": num(cell.test_std) if cell.picked else None,
            "runs": [{"lr": r.lr, "seed": r.seed, "val": num(r.val), "test": num(r.test),
                      "curve": r.curve, "seconds": round(r.seconds, 3)} for r in cell.runs],
        }  # fmt: skip
    return {
        "schema_version": SCHEMA_VERSION, "date": datetime.date.today().isoformat(),
        "machine": machine(), "quick": result.quick, "seeds": result.seeds,
        "lr_factors": result.factors, "baselines": result.baselines,
        "problems": {p: {"title": PROBLEMS[p].title, "metric": PROBLEMS[p].metric}
                     for p in result.problems},
        "optimizers": result.labels, "results": cells, "notes": result.notes,
        "seconds": round(result.seconds, 1),
    }  # fmt: skip


def _plot(result: BenchResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.problems)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 6.4), squeeze=False)
    for j, p in enumerate(result.problems):
        top, bottom = axes[0][j], axes[1][j]
        for lab in result.labels:
            cell = result.cells[p, lab]
            if cell.picked:
                curves = [r.curve for r in cell.at(cell.best_lr)]
                k = min(len(c) for c in curves)
                xs = [(i + 0.5) * result.steps[p] / k for i in range(k)]
                mean = [sum(c[i] for c in curves) / len(curves) for i in range(k)]
                lo = [min(c[i] for c in curves) for i in range(k)]
                hi = [max(c[i] for c in curves) for i in range(k)]
                (line,) = top.plot(xs, mean, lw=1.2, label=f"{lab} (lr {_lr(cell.best_lr)})")
                top.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
            pts = [(lr, cell.val_mean(lr)) for lr in result.lrs[lab] if lr is not None]
            pts = [(x, y) for x, y in pts if math.isfinite(y)]
            if pts:
                bottom.plot(*zip(*pts, strict=True), marker="o", ms=3, lw=1, label=lab)
        top.set(title=PROBLEMS[p].title, xlabel="step", yscale="log",
                ylabel="training loss (mean, min-max over seeds)")  # fmt: skip
        top.legend(fontsize=7)
        bottom.set(xlabel="learning rate", xscale="log", yscale="log",
                   ylabel=PROBLEMS[p].metric.replace("test ", "validation "))  # fmt: skip
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: BenchResult, out: Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``table.md``, ``results.json`` and ``plot.png`` into ``out``; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    plot_note = ""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plot_note = NO_MATPLOTLIB
        if log is not None:
            log(NO_MATPLOTLIB)
    else:
        files.append(out / "plot.png")
        _plot(result, files[-1])
    table = out / "table.md"
    table.write_text(render(result, plot_note), encoding="utf-8")
    data = out / "results.json"
    data.write_text(json.dumps(as_json(result), indent=1) + "\n", encoding="utf-8")
    return [table, data, *files]
