"""Run the comparison: every optimizer on every problem, at every learning rate of its grid, with
every seed; pick each optimizer's learning rate on the validation split; report the test split.

Matched tuning effort: every optimizer gets the same grid of factors times its own default
``lr`` (:data:`LR_FACTORS`), the same seeds, steps and batches; nothing else is tuned. The
learning rate is constant (no warm-up, no decay), so the numbers read the optimizer, not a
schedule. Every run is on one CPU thread: the models are small enough that a second thread
costs more than it brings, and the numbers do not depend on the machine's thread count.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nlgraph._argtypes import MAX_SEED
from nlgraph._errors import NLGraphError
from nlgraph.bench_optim import problems as P
from nlgraph.bench_optim import report
from nlgraph.bench_optim.errors import BenchConfigError
from nlgraph.bench_optim.specs import DEFAULT_BASELINES, Candidate, candidate

__all__ = ["bench", "BenchResult", "Cell", "Run", "LR_FACTORS", "QUICK_LR_FACTORS"]

LR_FACTORS = (0.1, 0.3, 1.0, 3.0, 10.0)  # times each optimizer's default lr
QUICK_LR_FACTORS = (0.3, 1.0, 3.0)
CURVE_POINTS = 20  # the training-loss curve kept per run: means over this many equal spans


@dataclass
class Run:
    """One training run: the metric on both held-out splits (``inf`` once it diverged) and its
    training loss, averaged over :data:`CURVE_POINTS` spans of steps."""

    lr: float | None
    seed: int
    val: float
    test: float
    curve: list[float]
    seconds: float

    @property
    def diverged(self) -> bool:
        return not (math.isfinite(self.val) and math.isfinite(self.test))


@dataclass
class Cell:
    """One optimizer on one problem: every run, the learning rate picked and its test numbers."""

    problem: str
    label: str
    runs: list[Run] = field(default_factory=list)
    best_lr: float | None = None
    picked: bool = False  # False: every learning rate diverged

    def at(self, lr: float | None) -> list[Run]:
        return [r for r in self.runs if r.lr == lr]

    def val_mean(self, lr: float | None) -> float:
        """The mean validation metric over the seeds at ``lr``; ``inf`` if any seed diverged."""
        runs = self.at(lr)
        return math.inf if any(r.diverged for r in runs) else statistics.fmean(r.val for r in runs)

    @property
    def tests(self) -> list[float]:
        return [r.test for r in self.at(self.best_lr)] if self.picked else []

    @property
    def test_mean(self) -> float:
        return statistics.fmean(self.tests) if self.picked else math.inf

    @property
    def test_std(self) -> float:
        """Sample standard deviation over the seeds (ddof=1; 0 with one seed)."""
        t = self.tests
        return statistics.stdev(t) if len(t) > 1 else 0.0


@dataclass
class BenchResult:
    """What :func:`bench` measured. ``cells[(problem, label)]``; ``files``: what it wrote."""

    problems: list[str]
    steps: dict[str, int]
    labels: list[str]
    baselines: list[str]
    lrs: dict[str, list[float | None]]
    seeds: list[int]
    factors: list[float]
    quick: bool
    cells: dict[tuple[str, str], Cell]
    seconds: float
    notes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def ranks(self, problem: str) -> dict[str, int]:
        """1 for the lowest test mean on ``problem``; an optimizer that always diverged last."""
        order = sorted(self.labels, key=lambda lab: self.cells[problem, lab].test_mean)
        return {lab: i + 1 for i, lab in enumerate(order)}


def _grid(c: Candidate, factors: Sequence[float]) -> list[float | None]:
    if c.base_lr is None:
        return [None]
    return [float(f"{c.base_lr * f:.6g}") for f in factors]


def _optimizer(c: Candidate, model: torch.nn.Module, lr: float | None) -> torch.optim.Optimizer:
    return c.cls(model.parameters()) if lr is None else c.cls(model.parameters(), lr=lr)


def _probe(c: Candidate, task: P.Task, lrs: list[float | None]) -> None:
    """Build ``c`` at every learning rate of its grid and take one step: a SPEC that cannot
    optimize the problem fails here, in one line, before any run starts."""
    for i, lr in enumerate(lrs):
        try:
            torch.manual_seed(0)
            model = task.model()
            opt = _optimizer(c, model, lr)
            if i == 0:
                task.loss(model, task.batch(torch.Generator().manual_seed(0))).backward()
                opt.step()
        except Exception as err:
            if c.baseline and not isinstance(err, NLGraphError):
                raise  # the library's optimizers on the library's problems: a bug, kept loud
            what = " ".join(str(err).split()) or type(err).__name__
            at = "" if lr is None else f" at lr={lr:g}"
            raise BenchConfigError(
                f"{c.label!r} cannot optimize the {task.problem.name} problem{at}: "
                f"{type(err).__name__}: {what}"
            ) from err


def _train(c: Candidate, task: P.Task, lr: float | None, seed: int) -> Run:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = task.model()
    opt = _optimizer(c, model, lr)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for _ in range(task.sizes.steps):
        loss = task.loss(model, task.batch(gen))
        value = loss.item()
        if not math.isfinite(value):  # diverged: the rest of the run would be NaN too
            return Run(lr, seed, math.inf, math.inf, [], time.perf_counter() - t0)
        losses.append(value)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    val, test = task.evaluate(model, "val"), task.evaluate(model, "test")
    span = max(1, len(losses) // CURVE_POINTS)
    curve = [statistics.fmean(losses[i : i + span]) for i in range(0, len(losses), span)]
    if not (math.isfinite(val) and math.isfinite(test)):
        val = test = math.inf
    return Run(lr, seed, val, test, curve, time.perf_counter() - t0)


def _check_out(out: Path) -> None:
    """Refuse an output folder that cannot be written, before minutes of training: the folder
    (and its missing parents) is made and removed again, or a file is made in it and removed."""
    if out.exists() and not out.is_dir():
        raise BenchConfigError(f"output {str(out)!r} is a file; pass a folder (-o DIR)")
    missing = [p for p in (out, *out.parents) if not p.exists()]
    try:
        if missing:
            out.mkdir(parents=True)
            for p in missing:  # deepest first: leave the disk as it was
                p.rmdir()
        else:
            tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise BenchConfigError(
            f"cannot write the output folder {str(out)!r}: {err.strerror or err}; "
            "pass another -o DIR"
        ) from None


def _check(problems: Sequence[str], seeds: int, seed: int, factors: Sequence[float]) -> None:
    bad = [p for p in problems if p not in P.PROBLEMS]
    if bad or not problems:
        got = repr(bad[0]) if bad else "none"
        raise BenchConfigError(f"unknown problem {got}; expected some of {', '.join(P.PROBLEMS)}")
    if len(set(problems)) != len(problems):
        raise BenchConfigError(f"problem listed twice in {list(problems)}; name each once")
    if not isinstance(seeds, int) or seeds < 1:
        raise BenchConfigError(f"seeds must be a positive integer, got {seeds!r}")
    if seed < 0 or seed + seeds - 1 > MAX_SEED:
        raise BenchConfigError(
            f"seeds {seed}..{seed + seeds - 1} pass {MAX_SEED:,} (a 32-bit seed); "
            "use a smaller --seed"
        )
    if not factors or not all(0 < f < math.inf for f in factors):
        raise BenchConfigError(
            f"learning-rate factors must be positive and finite, got {list(factors)}"
        )


def bench(
    specs: Sequence[Any],
    *,
    baselines: Sequence[str] = DEFAULT_BASELINES,
    problems: Sequence[str] | None = None,
    seeds: int | None = None,
    seed: int = 0,
    quick: bool = False,
    factors: Sequence[float] | None = None,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    stdin_text: str | None = None,
) -> BenchResult:
    """Compare optimizers with the library's AdamW, Muon and M3 on small standard problems.

    Every optimizer trains every problem (:mod:`nlgraph.bench_optim.problems`) at each
    learning rate ``factor * its default lr`` and each seed ``seed .. seed + seeds - 1``; the
    learning rate with the lowest mean validation metric is picked, and the test metric at it
    is reported as mean ± std over the seeds.

    Args:
        specs: the optimizers to compare: SPEC strings (a library name, a ``.json``/``.yaml``
            file, ``package.module:function``, ``-``), builder functions (hyperparameters ->
            optimizer Graph), Graphs, or ``torch.optim.Optimizer`` classes.
        baselines: library optimizer names to compare against (default AdamW, Muon with AdamW
            for vectors, M3 with AdamW for vectors); one already in ``specs`` runs once.
        problems: some of ``least_squares``, ``mlp``, ``char_lm`` (default all).
        seeds: how many seeds (default 3; 2 with ``quick``).
        quick: small problems and a 3-point grid: seconds instead of minutes.
        factors: the learning-rate grid as factors of each optimizer's default ``lr``
            (default :data:`LR_FACTORS`; :data:`QUICK_LR_FACTORS` with ``quick``).
        out: a folder for ``table.md``, ``results.json`` and ``plot.png``; ``None`` writes
            nothing.
        log: called with one line per finished (problem, optimizer).

    Raises :class:`BenchConfigError` or :class:`~nlgraph.SpecError` before any training when
    an argument is bad or a SPEC cannot optimize a problem's parameters; nothing is written.

    Example::

        result = bench(["my_optimizers:delta_adam"], problems=["least_squares"], quick=True)
        result.cells["least_squares", "adamw"].test_mean
    """
    t_start = time.perf_counter()
    problems = list(P.PROBLEMS) if problems is None else list(problems)
    n_seeds = (2 if quick else 3) if seeds is None else seeds
    factors = list((QUICK_LR_FACTORS if quick else LR_FACTORS) if factors is None else factors)
    _check(problems, n_seeds, seed, factors)
    if out is not None:
        _check_out(Path(out))
    if isinstance(specs, str | bytes) or not specs:
        raise BenchConfigError("expected a list of optimizers to compare, e.g. ['delta_adam']")
    cands = [candidate(s, stdin_text=stdin_text) for s in specs]
    labels = [c.label for c in cands]
    if len(set(labels)) != len(labels):
        raise BenchConfigError(f"an optimizer is named twice in {labels}; name each once")
    cands += [candidate(b, baseline=True) for b in baselines if b not in labels]
    lrs = {c.label: _grid(c, factors) for c in cands}
    notes = [f"{c.label}: no `lr` hyperparameter, so no learning-rate grid: one run per seed "
             "at its own numbers" for c in cands if c.base_lr is None]  # fmt: skip

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tasks = {name: P.make(name, quick) for name in problems}
        for task in tasks.values():
            for c in cands:
                _probe(c, task, lrs[c.label])
        seed_list = list(range(seed, seed + n_seeds))
        cells: dict[tuple[str, str], Cell] = {}
        for name, task in tasks.items():
            for c in cands:
                t0 = time.perf_counter()
                cell = cells[name, c.label] = Cell(name, c.label)
                for lr in lrs[c.label]:
                    cell.runs += [_train(c, task, lr, s) for s in seed_list]
                scores = {lr: cell.val_mean(lr) for lr in lrs[c.label]}
                best = min(scores, key=lambda lr: scores[lr])  # the first (smallest) on ties
                cell.best_lr, cell.picked = best, math.isfinite(scores[best])
                if log is not None:
                    log(report.progress_line(task, c, cell, time.perf_counter() - t0))
    finally:
        torch.set_num_threads(threads)
    for (name, label), cell in cells.items():
        grid = lrs[label]
        if cell.picked and len(grid) > 1 and cell.best_lr in (grid[0], grid[-1]):
            side = "smallest" if cell.best_lr == grid[0] else "largest"
            notes.append(f"{label} on {name}: the picked lr {cell.best_lr:g} is the grid's "
                         f"{side}; widen the grid (--lr-factors) to see past it")  # fmt: skip
    if "char_lm" in tasks:
        notes.append(f"char_lm corpus: {tasks['char_lm'].source}")
    result = BenchResult(
        problems=problems, steps={p: t.sizes.steps for p, t in tasks.items()},
        labels=[c.label for c in cands], baselines=[c.label for c in cands if c.baseline],
        lrs=lrs, seeds=seed_list, factors=factors, quick=quick, cells=cells,
        seconds=time.perf_counter() - t_start, notes=notes,
    )  # fmt: skip
    if out is not None:
        result.files = report.write(result, Path(out), log)
    return result
