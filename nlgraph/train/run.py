"""One ``nlgraph train`` run: the model, its matched baselines, one token budget, one table.

Baselines get the main model's trainable-parameter count by choosing their MLP width (``hidden``;
:func:`~nlgraph.train.models.match_hidden`) and the same steps x batch x seq. Without ``--steps``
the step count is calibrated: a few timed steps of every model fix the most steps that fit the
time budget, so every model still sees exactly the same tokens.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from nlgraph.train import distributed as D
from nlgraph.train.checkpoint import check_schema, load, write_checkpoint
from nlgraph.train.cli import DEFAULT_STEPS
from nlgraph.train.console import Console
from nlgraph.train.data import Corpus, load_corpus
from nlgraph.train.errors import CheckpointError, OutputError, TrainConfigError
from nlgraph.train.metrics import MEMORY_METHOD, plot, table, write_csv, write_json
from nlgraph.train.models import (
    SPEC_OPTIMIZER,
    build_learner,
    build_trainable,
    check_optimizer,
    count_params,
    load_graph,
    match_hidden,
)
from nlgraph.train.progress import Planned, Progress, format_duration
from nlgraph.train.streams import check_carry
from nlgraph.train.trainer import COMPARED, COMPARED_LATER, TrainConfig, Trainer, check_checkpoint

__all__ = ["RunOptions", "RunLog", "train_run", "BASELINES"]

BASELINES = ("transformer", "titans_lm")
DEFAULT_BUDGET_MIN = 10.0
MIN_STEPS, MAX_STEPS = 10, 5000
OVERRUN = 2.0  # with calibrated steps, a model stops on time only past 2x its share
SHARED_SIZES = ("d", "n_layers", "heads")  # given to baselines too; ``hidden`` is matched
RUN_FILE = "run.json"  # the run's identity: the main model's settings (COMPARED)
RUN_FORMAT = "nlgraph-train-run"


@dataclass
class RunOptions:
    """Everything ``nlgraph train`` takes (``None``: the default described in its help)."""

    config: TrainConfig = field(default_factory=TrainConfig)
    data: str | None = None
    out: str = "nlgraph-train"
    baselines: bool = True
    budget_minutes: float | None = None  # default: 10 when steps are calibrated, else none
    auto_steps: bool = True
    resume: bool = False
    progress: bool = True


class RunLog:
    """Messages to stderr (first process only) and to ``OUT/train.log``; ``begin``/``end`` frame
    a phase that may be silent for a while (one line: what, then how it went and how long)."""

    def __init__(self, path: Path, world: D.World, console: Console | None = None) -> None:
        self.path, self.world = path, world
        self.console = console or Console(enabled=world.main)
        if world.main:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            except OSError as err:
                raise OutputError.from_os(err, path) from None

    def __call__(self, msg: str, echo: bool = True) -> None:
        if self.world.main:
            if echo:
                self.console.line(msg)
            self.record(msg)

    def record(self, msg: str) -> None:
        """``msg`` to ``train.log`` only (the console has shown it)."""
        if self.world.main:
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
            self.file.flush()

    def begin(self, what: str) -> None:
        self.console.begin(what)

    def end(self, outcome: str) -> None:
        self.record(self.console.end(outcome))

    def abort(self) -> None:
        """An error ends the run: close an open phase's line, clear the status line."""
        if self.console.phase is not None:
            self.end("stopped")
        self.console.clear()

    def close(self) -> None:
        if self.world.main:
            self.file.close()


def _check(opts: RunOptions, world: D.World) -> None:
    cfg = opts.config
    if cfg.on_nan not in ("skip", "stop"):
        raise TrainConfigError(f"--on-nan {cfg.on_nan!r}; expected 'skip' or 'stop'")
    if cfg.batch % world.size:
        raise TrainConfigError(
            f"--batch {cfg.batch} is the global batch and must divide evenly over "
            f"{world.size} processes"
        )
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise TrainConfigError(f"--lr must be a positive number, got {cfg.lr}")
    if opts.budget_minutes is not None and opts.budget_minutes <= 0:
        raise TrainConfigError(f"--budget-minutes must be positive, got {opts.budget_minutes}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise TrainConfigError(f"--device {cfg.device!r}; expected cpu, cuda or cuda:N")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainConfigError(f"--device {cfg.device}: CUDA is not available here; use cpu")
    # names are checked before anything is printed: a typo is the one line of a refusal
    load_graph(cfg.model, cfg.preset, cfg.sizes)
    check_optimizer(cfg.optimizer)


def _plan(opts: RunOptions, log: RunLog) -> list[TrainConfig]:
    """The main model's config, then each baseline's with a matched ``hidden``."""
    cfg = opts.config
    log.begin(f"{cfg.model}: building it to count its parameters")
    main, _ = build_trainable(cfg)  # the optimizer too: a bad one fails here
    target = count_params(main)
    configs = [cfg]
    log.end(f"{target:,} trainable parameters")
    if cfg.carry_state:
        check_carry(main, cfg.model, cfg.seq)
    if opts.baselines:
        for name in BASELINES:
            if name == cfg.model:
                continue
            shared = {k: v for k, v in cfg.sizes.items() if k in SHARED_SIZES}
            log.begin(f"{name}: matching its MLP width to {cfg.model}")
            sizes, n = match_hidden(name, target, cfg.preset, shared, cfg.seed)
            log.end(f"hidden={sizes['hidden']} gives {n:,} parameters "
                    f"({100 * (n - target) / target:+.1f}% of {cfg.model})")  # fmt: skip
            if cfg.carry_state:
                baseline = build_learner(name, cfg.preset, sizes, cfg.seed, cfg.device)
                check_carry(baseline, name, cfg.seq)
            # a model's own optimizer levels are its own: baselines keep the default AdamW
            opt = "adamw" if cfg.optimizer == SPEC_OPTIMIZER else cfg.optimizer
            configs.append(replace(cfg, model=name, sizes=sizes, optimizer=opt))
    return configs


def _calibrate(
    configs: list[TrainConfig], corpus: Corpus, budget_s: float, log: RunLog
) -> tuple[int, list[float], list[float], list[float]]:
    """Steps that fit ``budget_s`` for all models, each model's share of the budget, and each
    model's seconds per step and per validation pass (the ETA's first estimates).

    Times 4 real trainer steps (after a first, slower call) and one validation pass of each
    model on a throwaway copy; nothing is written.
    """
    per_step, per_eval = [], []
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # as in training
    try:
        for cfg in configs:
            log.begin(f"{cfg.model}: calibrating (5 steps and a validation on a throwaway copy)")
            learner, opt = build_trainable(cfg)
            t = Trainer(cfg, learner, opt, corpus, Path("."), log=log, progress=False)
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                t._one_step()
                times.append(time.perf_counter() - t0)
                t.step += 1
            t0 = time.perf_counter()
            t.evaluate()
            per_eval.append(time.perf_counter() - t0)
            per_step.append(sorted(times[1:])[2])  # the upper median after the first call
            log.end(f"{per_step[-1]:.2f} s/step, {per_eval[-1]:.2f} s/validation")
    finally:
        torch.use_deterministic_algorithms(prev)
    # 0.7: CPUs shared with other work make later steps slower than the calibration's
    evals = 10 * sum(per_eval)
    steps = max(MIN_STEPS, min(MAX_STEPS, int((0.7 * budget_s - evals) / sum(per_step))))
    cost = [steps * s + 10 * e for s, e in zip(per_step, per_eval, strict=True)]
    return steps, [c / sum(cost) for c in cost], per_step, per_eval


def _train_one(
    cfg: TrainConfig, corpus: Corpus, out: Path, opts: RunOptions, log: RunLog, world: D.World,
    progress: Progress, which: str,
) -> tuple[dict[str, Any], dict[str, list]]:  # fmt: skip
    run_dir = _run_dir(out, cfg.model)
    path = run_dir / "checkpoint.pt"
    payload = load(path) if opts.resume and path.is_file() else None
    if payload is not None and payload["status"] == "done" and "summary" in payload:
        log(_reused(payload["summary"]))  # checked with every checkpoint before training
        return payload["summary"], payload["history"]
    log.begin(f"{cfg.model} ({which}): building")
    learner, opt = build_trainable(cfg)
    trainer = Trainer(cfg, learner, opt, corpus, run_dir, log=log, world=world,
                      progress=progress)  # fmt: skip
    if payload is not None:
        trainer.resume(payload)
        log.end(f"resuming at step {trainer.step}/{cfg.steps}")
    else:
        log.end("done")
    result = trainer.run()
    if trainer.status == "done":  # keep the final numbers with the weights
        payload = {**trainer.state(), "summary": result}  # every rank: gathers the fast state
        if world.main:
            write_checkpoint(payload, trainer.checkpoint_path, trainer.kept())
    return result, trainer.history


def _reused(summary: dict[str, Any]) -> str:
    """The final line of a model that had finished in an earlier run."""
    parts = [f"{summary['model']}: finished earlier, reusing its results: {summary['steps']} "
             f"steps, {summary['tokens']:,} tokens"]  # fmt: skip
    if summary.get("train_loss") is not None:
        parts.append(f"train {summary['train_loss'] / math.log(2):.3f} bits/byte (last step)")
    if summary.get("val_bpb") is not None:
        parts.append(f"val {summary['val_bpb']:.4f} bits/byte")
    parts.append(f"{format_duration(summary.get('train_seconds') or 0)} in training steps")
    return "  ".join(parts)


def _progress(
    configs: list[TrainConfig], log: RunLog, found: dict[str, tuple[int, bool]],
    timed: tuple[list[float], list[float]] | None,
) -> Progress:  # fmt: skip
    """The run's reporter, planned over every model (``found``: step and finished flag of each
    checkpoint being resumed; ``timed``: calibrated seconds per step and per validation)."""
    plan = []
    for i, cfg in enumerate(configs):
        step, done = found.get(cfg.model, (0, False))
        p = Planned(cfg.model, cfg.steps, cfg.eval_period(), step, done,
                    val_cost=math.ceil(cfg.val_windows / cfg.batch))  # fmt: skip
        if timed is not None:
            p.step_s, p.val_s = timed[0][i], timed[1][i]
        plan.append(p)
    return Progress(log.console, plan, record=log.record)


# ------------------------------------------------------------------ the output folder
def _run_dir(out: Path, model: str) -> Path:
    return out / model.replace(":", "_").replace("/", "_")


def _identity(cfg: TrainConfig) -> dict[str, Any]:
    """What defines a run (the main model's compared settings), as JSON would return it."""
    keys = (*COMPARED, *COMPARED_LATER)
    ident = {"format": RUN_FORMAT, "version": 1, **{k: getattr(cfg, k) for k in keys}}
    return json.loads(json.dumps(ident))


def _describe(ident: dict[str, Any]) -> str:
    sizes = ident.get("sizes") or {}
    size_text = ", ".join(f"{k}={v}" for k, v in sizes.items())
    return (
        f"model {ident.get('model')!r} (preset {ident.get('preset')}, "
        f"sizes {{{size_text}}}, seed {ident.get('seed')}, steps {ident.get('steps')})"
    )


def _read_identity(out: Path) -> dict[str, Any] | None:
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        ident = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise OutputError(
            f"cannot read {str(path)!r} ({type(err).__name__}); it records which run --out "
            "holds: restore it, or start a new run in another --out"
        ) from None
    if not isinstance(ident, dict) or ident.get("format") != RUN_FORMAT:
        raise OutputError(f"{str(path)!r} is not an nlgraph train run record; choose another --out")
    return ident


def _write_identity(out: Path, cfg: TrainConfig) -> None:
    path, tmp = out / RUN_FILE, out / f".{RUN_FILE}.tmp-{os.getpid()}"
    try:
        tmp.write_text(json.dumps(_identity(cfg), indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError.from_os(err, path) from None


def _check_resumable(opts: RunOptions, out: Path) -> dict[str, Any]:
    """Before anything is written: ``--out`` must hold this run (its identity, or for a folder
    without one, the main model's checkpoint) and a checkpoint to continue from. Returns the
    identity found."""
    cfg = opts.config
    names = [cfg.model] + [b for b in BASELINES if opts.baselines and b != cfg.model]
    found = [n for n in names if (_run_dir(out, n) / "checkpoint.pt").is_file()]
    ident = _read_identity(out)
    if ident is None:
        others = sorted(p.parent.name for p in out.glob("*/checkpoint.pt"))
        if cfg.model not in found:
            held = f" (it holds checkpoints of {', '.join(others)})" if others else ""
            raise CheckpointError(
                f"--resume: nothing to resume for model {cfg.model!r} in {str(out)!r}{held}; "
                "drop --resume to start a new run"
            )
        payload = load(_run_dir(out, cfg.model) / "checkpoint.pt")
        check_schema(payload, _run_dir(out, cfg.model) / "checkpoint.pt", COMPARED)
        ident = json.loads(json.dumps({"format": RUN_FORMAT, "version": 1, **payload["config"]}))
    mine = _identity(cfg)
    if opts.auto_steps:
        mine["steps"] = ident.get("steps")
    for key in (*COMPARED, *COMPARED_LATER):
        there = ident.get(key, COMPARED_LATER.get(key))
        if there != mine[key]:
            raise CheckpointError(
                f"--resume: {str(out)!r} holds a run of {_describe(ident)}, not of "
                f"{_describe(mine)} ({key} {there!r} there, {mine[key]!r} here); "
                "resume with that run's settings, or start a new run in another --out"
            )
    if not found:
        raise CheckpointError(
            f"--resume: nothing to resume in {str(out)!r} (no checkpoint of "
            f"{', '.join(names)}); drop --resume to start a new run"
        )
    steps = ident.get("steps")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps > 0):
        raise OutputError(f"{str(out / RUN_FILE)!r} records steps={steps!r}; choose another --out")
    return ident


def _check_checkpoints(configs: list[TrainConfig], out: Path) -> dict[str, tuple[int, bool]]:
    """Refuse a damaged or foreign checkpoint of any model before any model trains. Returns
    each found checkpoint's step and whether that model had finished."""
    found = {}
    for cfg in configs:
        path = _run_dir(out, cfg.model) / "checkpoint.pt"
        if not path.is_file():
            continue
        payload = load(path)
        learner, opt = build_trainable(cfg)
        check_checkpoint(cfg, payload, path, learner, opt)
        done = payload["status"] == "done" and "summary" in payload
        found[cfg.model] = (payload["step"], done)
    return found


def _make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError.from_os(err, out) from None
    if not out.is_dir():
        raise OutputError(f"--out {str(out)!r} is not a folder; choose another --out")


def _lock(out: Path) -> int | None:
    """Hold an exclusive lock on the folder ``out`` for the run (``flock`` on the folder itself,
    so no file is left behind; the OS drops it when the process ends, even on a crash).
    ``None`` where the platform or file system has no ``flock``."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    try:
        fd = os.open(out, os.O_RDONLY)
    except OSError as err:
        raise OutputError.from_os(err, out) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(
            f"{str(out)!r} is in use by another nlgraph train run; wait for it to finish, or "
            "choose another --out"
        ) from None
    except OSError:  # pragma: no cover - a file system without flock: run unlocked
        os.close(fd)
        return None
    return fd


def train_run(opts: RunOptions) -> dict[str, Any]:
    """Run the whole experiment; returns ``{"results": [...], "histories": {...}, ...}``."""
    world = D.world_from_env()
    out = Path(opts.out)
    lock = None
    if opts.resume and not out.is_dir():
        raise CheckpointError(
            f"--resume: nothing to resume, there is no folder {str(out)!r}; drop --resume to start "
            "a new run"
        )
    if world.main:  # the folder, its lock, and what it holds are checked before any write
        _make_out(out)
        lock = _lock(out)
    try:
        ident = _check_resumable(opts, out) if opts.resume else None
        console = Console(enabled=world.main, live=opts.progress)
        log = RunLog(out / "train.log", world, console)
    except BaseException:
        if lock is not None:
            os.close(lock)
        raise
    created = False
    # a warning (torch's, say) is a line of its own, never glued to a phase or status line
    show = warnings.showwarning
    warnings.showwarning = lambda msg, kind, *_: log(f"warning: {kind.__name__}: {msg}")
    try:
        _check(opts, world)
        corpus = load_corpus(opts.data, opts.config.seq)  # seconds at most: no phase line, so
        log(f"data: {corpus.describe()}")  # that bad data is refused in one line
        started = time.perf_counter()  # the budget covers planning and calibration too
        created = D.setup(world, opts.config.device)
        torch.set_num_threads(max(1, torch.get_num_threads() // max(1, world.size)))
        configs = _plan(opts, log)
        budget = opts.budget_minutes
        shares = [1.0 / len(configs)] * len(configs)
        timed = None
        if opts.auto_steps:
            budget = DEFAULT_BUDGET_MIN if budget is None else budget
            steps = ident["steps"] if ident is not None else None
            if steps is None:
                steps, shares, *timed = _calibrate(configs, corpus, budget * 60, log)
            configs = [replace(c, steps=steps) for c in configs]
            log(f"token budget: {steps} steps x {configs[0].batch} x {configs[0].seq} = "
                f"{steps * configs[0].batch * configs[0].seq:,} tokens per model "
                f"(calibrated to {budget:g} minutes on this machine)")  # fmt: skip
        else:
            c0 = configs[0]
            default = (c0.steps, c0.batch, c0.seq) == (DEFAULT_STEPS, 8, 32) and opts.baselines
            when = "; the default run takes 9-10 minutes on a 2-core CPU" if default else ""
            log(f"token budget: {c0.steps} steps x {c0.batch} x {c0.seq} = "
                f"{c0.steps * c0.batch * c0.seq:,} tokens per model (fixed: the same on any "
                f"machine{when})")  # fmt: skip
        found = {}
        if opts.resume:  # every model's checkpoint, before any model trains
            log.begin("checking the checkpoints to resume from")
            found = _check_checkpoints(configs, out)
            log.end(f"{len(found)} found")
        if world.main and not (opts.resume and (out / RUN_FILE).is_file()):
            _write_identity(out, configs[0])  # a new run (or one from before run.json)
        results, histories = [], {}
        progress = _progress(configs, log, found, timed)
        for i, cfg in enumerate(configs):
            if budget is not None:  # what is left, shared by expected time over those to train
                # Calibrated steps are the contract (the same tokens for every model): the
                # budget then only stops a model that takes twice its share.
                slack = OVERRUN if opts.auto_steps else 1.0
                left = budget * 60 * slack - (time.perf_counter() - started)
                share = shares[i] / sum(shares[i:])
                cfg = replace(cfg, budget_seconds=max(left * share, 1.0))
            which = f"model {i + 1}/{len(configs)}"
            result, hist = _train_one(cfg, corpus, out, opts, log, world, progress, which)
            results.append(result)
            histories[cfg.model] = hist
            if result["status"] == "interrupted":
                break
        report = {
            "results": results, "histories": histories, "corpus": corpus.describe(),
            "configs": [asdict(c) for c in configs], "memory": MEMORY_METHOD,
            "world_size": world.size, "machine": _machine(), "wall_seconds": round(
                time.perf_counter() - started, 1),
        }  # fmt: skip
        if world.main:
            _write(out, report, log)
        return report
    except Exception as err:
        # the command line prints the error as its one line; the log keeps it too
        log.abort()
        log(f"error: {type(err).__name__}: {err}", echo=False)
        raise
    finally:
        warnings.showwarning = show
        D.teardown(created)
        log.close()
        if lock is not None:
            os.close(lock)


def _machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }  # fmt: skip


def _write(out: Path, report: dict[str, Any], log: RunLog) -> None:
    log.begin(f"writing metrics.json, metrics.csv, loss.png and results.md to {out}")
    try:
        write_json(out / "metrics.json", report)
        write_csv(out / "metrics.csv", report["histories"])
        png = plot(out / "loss.png", report["histories"])
        text = table(report["results"])
        (out / "results.md").write_text(text + "\n")
    except OSError as err:
        raise OutputError.from_os(err, out) from None
    log.end("done" if png else "done, no loss.png (matplotlib is not installed)")
    log(f"the run took {format_duration(report['wall_seconds'])}")
    print(text)
