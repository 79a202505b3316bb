"""The training loop: one language model, one corpus, checkpoints, faults, validation.

Each step draws the step-indexed batch (:func:`~nlgraph.train.data.batch_at`), runs the learner
with the next-byte loss as ``loss_fn`` (blocks updated every C tokens learn inside the forward
from it, PAPER.md 5.1), takes one outer optimizer step, and checks loss, gradients and parameters
for NaN/inf. Every sequence starts from the initial fast state (the per-sequence reset), so no fast
state outlives a step and a checkpoint's ``fast_state`` is empty for the library's models; with
``carry_state`` (``--carry-state``) each row of a batch continues the text and the fast state of
the same row of the step before (:func:`~nlgraph.train.data.stream_batch_at`), detached between
steps (truncated backprop through time), and the checkpoint holds that state.

Before training, a probe (:func:`~nlgraph.train.streams.inert_report`) finds the parameters a
step gives no gradient; they are reported, and DDP is told to expect them.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from nlgraph._errors import NumericalFaultError
from nlgraph.compiler.streaming import detach_state, state_to
from nlgraph.train import checkpoint as ckpt
from nlgraph.train import distributed as D
from nlgraph.train.console import Console
from nlgraph.train.data import Corpus, batch_at, stream_batch_at, val_windows
from nlgraph.train.faults import bad_state_levels, describe, first_nonfinite, nonfinite_in_state
from nlgraph.train.metrics import PeakMemory
from nlgraph.train.progress import Planned, Progress
from nlgraph.train.streams import check_fast_state, inert_report

__all__ = ["TrainConfig", "Trainer", "check_checkpoint", "lm_loss", "next_token_loss"]

MAX_SKIPS = 10  # consecutive non-finite steps --on-nan skip tolerates before stopping
COMPARED = ("model", "preset", "sizes", "steps", "batch", "seq", "optimizer", "lr", "seed")
# Compared too, with the value a checkpoint or run.json written before the setting existed has.
COMPARED_LATER = {"carry_state": False}


def recompute_layers(learner: torch.nn.Module) -> list[str]:
    """Recompute ``learner`` in the backward (``--recompute``): each layer from its inputs
    (``layer.checkpoint``) and, for a learner that differentiates through its CMS blocks'
    updates (exact rules), each piece between two CMS ticks (``learner.recompute_pieces``,
    :mod:`nlgraph.compiler.sweep`). Returns the warning lines: where there is nothing to
    recompute, or where the pieces cannot be."""
    if not hasattr(learner, "meta_blocks") or not learner.layers:
        return [f"warning: --recompute: {type(learner).__name__} has no layers to recompute"]
    for layer in learner.layers.values():
        layer.checkpoint = True
    meta = learner.meta_blocks()
    if not meta:
        return []
    # blocks beside exact ones are first-order (a teach signal takes every block: teach.check)
    first_order = [n for n in learner.blocks_in_order() if n not in meta]
    if first_order:
        return [
            f"warning: --recompute: {learner.spec.name!r} mixes first-order CMS blocks "
            f"({len(first_order)}) with exact ones ({len(meta)}): its pieces are not "
            "recomputed, and the exact blocks' inner gradients keep every recomputed layer"
        ]
    learner.recompute_pieces = True
    return []


@dataclass
class TrainConfig:
    model: str = "hope"
    preset: str | None = "tiny"
    sizes: dict[str, Any] = field(default_factory=dict)
    steps: int = 100
    batch: int = 8
    seq: int = 32
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.01
    clip: float = 1.0
    warmup: int | None = None  # default: 10% of the steps
    device: str = "cpu"
    seed: int = 0
    eval_every: int = 0  # 0: ten times per run
    val_windows: int = 16
    checkpoint_every: int = 0  # 0: at each validation
    on_nan: str = "stop"
    budget_seconds: float | None = None
    deterministic: bool = True
    carry_state: bool = False  # rows continue their text and fast state across steps
    recompute: bool = False  # each layer recomputed in the backward (layer.checkpoint)

    def eval_period(self) -> int:
        """Steps between validations (``eval_every``, else a tenth of the steps)."""
        return self.eval_every or max(1, self.steps // 10)

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of ``lr``."""
        warm = self.warmup if self.warmup is not None else max(1, self.steps // 10)
        if step < warm:
            return self.lr * (step + 1) / warm
        frac = (step - warm) / max(1, self.steps - warm)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(frac, 1.0))))


def _nonfinite_optimizer_state(
    learner: torch.nn.Module, opt: torch.optim.Optimizer, levels: list[str]
) -> tuple[str, str, str] | None:
    """The first non-finite tensor of the optimizer's per-parameter state, named by the level
    of its parameter."""
    names = {id(p): n for n, p in learner.named_parameters()}
    for p, entry in opt.state.items():
        tensors = ((names.get(id(p), "?"), t) for t in entry.values() if torch.is_tensor(t))
        hit = first_nonfinite(tensors, levels)
        if hit:
            return hit
    return None


def next_token_loss(tokens: torch.Tensor) -> Any:
    """``loss_fn(outputs, start, end)`` for a learner reading ``tokens[B, T]`` (or a prefix of
    them): the summed cross-entropy of ``outputs["logits"]`` for positions ``start..end-1``
    against the tokens that follow (positions without a successor are not scored). Logits are
    scored in at least float32."""

    def loss_fn(outputs: dict[str, torch.Tensor], start: int, end: int) -> torch.Tensor:
        target = tokens[:, start + 1 : end + 1]
        logits = outputs["logits"][:, : target.shape[1]]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
        )

    return loss_fn


def lm_loss(
    module: torch.nn.Module, tokens: torch.Tensor, state: dict[str, Any] | None = None
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mean next-byte cross-entropy of ``tokens[B, T+1]`` (nats) from fast state ``state``
    (``None``: the initial one), and the final fast state."""
    inputs, B, T = tokens[:, :-1], tokens.shape[0], tokens.shape[1] - 1
    outputs, state = module({"tokens": inputs}, state, loss_fn=next_token_loss(tokens))
    return outputs["loss"] / (B * T), state


def check_checkpoint(
    cfg: TrainConfig,
    payload: dict[str, Any],
    path: Path,
    learner: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    levels: list[str] | None = None,
) -> None:
    """Refuse a checkpoint that :meth:`Trainer.resume` cannot continue from exactly: a missing
    key or a wrong type, other settings (:data:`COMPARED`), a step outside ``0..cfg.steps``,
    tensors that do not fit ``learner``/``optimizer`` (the first is named), non-finite weights.
    Loads nothing."""
    from nlgraph.train.errors import CheckpointError

    if levels is None:
        spec = getattr(learner, "spec", None)
        levels = [lv.name for lv in spec.levels] if spec is not None else []
    ckpt.check_schema(payload, path, COMPARED)
    saved = payload["config"]
    for key in (*COMPARED, *COMPARED_LATER):
        if saved.get(key, COMPARED_LATER.get(key)) != getattr(cfg, key):
            raise CheckpointError(
                f"{path} was written with {key}={saved.get(key, COMPARED_LATER.get(key))!r}, "
                f"not {getattr(cfg, key)!r}; resume with the same settings"
            )
    ckpt.check_resume(payload, path, cfg.steps, learner, optimizer, levels)
    if cfg.carry_state and payload["step"] > 0 and payload["status"] != "done":
        check_fast_state(payload.get("fast_state"), path, learner, cfg.batch, cfg.seq)


class Trainer:
    """Trains ``learner`` on ``corpus`` under ``config``; ``run()`` returns the metrics."""

    def __init__(
        self,
        config: TrainConfig,
        learner: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        corpus: Corpus,
        run_dir: Path,
        label: str | None = None,
        log: Callable[[str], None] = print,
        world: D.World | None = None,
        progress: bool | Progress = True,
        on_step: Callable[[Trainer], None] | None = None,
    ) -> None:
        self.cfg, self.learner, self.opt, self.corpus = config, learner, optimizer, corpus
        self.run_dir, self.label, self.log = Path(run_dir), label or config.model, log
        self.recompute_warnings = recompute_layers(learner) if config.recompute else []
        self.world = world or D.World()
        # Parameters a step gives no gradient (probe: one sequence, forward and backward).
        # DDP must then not wait for their gradients; every rank decides alike.
        self.inert = inert_report(learner, config.seq, config.carry_state)
        (find_unused,) = D.any_flag([self.inert.any or config.carry_state], self.world)
        self.module = D.wrap(learner, self.world, config.device, find_unused)
        self.fast: dict[str, Any] | None = None  # this process's rows' carried fast state
        spec = getattr(learner, "spec", None)  # declaration order is dataflow order
        self.levels = [lv.name for lv in spec.levels] if spec is not None else []
        self.step, self.skipped, self.streak, self.stop_requested = 0, 0, 0, False
        self.history: dict[str, list] = {"train": [], "val": []}
        self.train_seconds, self.tokens = 0.0, 0
        self.status = "running"
        self.saved_step: int | None = None  # the step of the checkpoint on disk from this run
        # True: a reporter of its own on stderr; False: silent; a Progress: the run's (run.py)
        self.progress, self.on_step = progress, on_step
        self.val = val_windows(corpus.val, config.seq, config.val_windows)

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def state(self) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT, "version": ckpt.VERSION, "label": self.label,
            "config": asdict(self.cfg), "step": self.step, "tokens": self.tokens,
            "train_seconds": self.train_seconds, "skipped": self.skipped, "status": self.status,
            "model": self.learner.state_dict(), "optimizer": self.opt.state_dict(),
            "rng": ckpt.capture_rng(), "history": self.history,
            "fast_state": self._global_fast(),
        }  # fmt: skip

    def _global_fast(self) -> dict[str, Any] | None:
        """The carried fast state of the whole global batch, on the CPU (a collective call
        under several processes); ``None`` before the first step or without carry_state."""
        if self.fast is None:
            return None
        return state_to(D.gather_rows(self.fast, self.world), "cpu")

    def kept(self) -> str:
        """What the checkpoint file holds for this run, for messages."""
        if self.saved_step is None:
            return ""
        return f"the last good checkpoint (step {self.saved_step}, {self.checkpoint_path})"

    def save(self) -> None:
        """Write the checkpoint (first process), never over a good one with a non-finite model
        or optimizer state: every checkpoint this writes holds finite tensors only."""
        hit = first_nonfinite(self.learner.named_parameters(), self.levels)
        what = "parameters"
        if not hit:
            hit = first_nonfinite(
                ((n, t) for n, t in self.learner.state_dict().items() if torch.is_tensor(t)),
                self.levels,
            )
        if not hit:
            hit = _nonfinite_optimizer_state(self.learner, self.opt, self.levels)
            what = "optimizer state"
        if not hit and self.cfg.carry_state:  # every rank decides alike
            mine = nonfinite_in_state(self.fast, self.levels)
            (bad,) = D.any_flag([mine is not None], self.world)
            hit = mine or (("a level on another process", "", "nan") if bad else None)
            what = "fast state"
        if hit:
            self.status = "nan"
            kept = self.kept()
            raise NumericalFaultError(
                f"{self.label}: step {self.step}: {describe(hit, what)}; not saved, "
                + (f"{kept} is kept" if kept else "no checkpoint was written by this run")
            )
        payload = self.state()  # every rank: the fast state is gathered from all of them
        if self.world.main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                from nlgraph.train.errors import OutputError

                raise OutputError.from_os(err, self.run_dir) from None
            ckpt.write_checkpoint(payload, self.checkpoint_path, self.kept())
        self.saved_step = self.step
        D.barrier(self.world)

    def resume(self, payload: dict[str, Any]) -> None:
        """Continue from ``payload`` (from :func:`~nlgraph.train.checkpoint.load`) once
        :func:`check_checkpoint` accepts it; a refusal changes nothing."""
        from nlgraph.train.errors import CheckpointError

        path = self.checkpoint_path
        check_checkpoint(self.cfg, payload, path, self.learner, self.opt, self.levels)
        try:
            self.learner.load_state_dict(payload["model"])
            self.opt.load_state_dict(payload["optimizer"])
            ckpt.restore_rng(payload["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(
                f"checkpoint {str(path)!r} does not fit this run ({first}); start a new run "
                "without --resume"
            ) from None
        self.step, self.tokens = payload["step"], payload["tokens"]
        fast = payload.get("fast_state") if self.cfg.carry_state else None
        if fast is not None:  # the global batch's rows; this process continues its own
            per = self.cfg.batch // self.world.size
            mine = slice(self.world.rank * per, (self.world.rank + 1) * per)
            self.fast = state_to(D.rows(fast, mine), self.cfg.device)
        self.train_seconds, self.skipped = float(payload["train_seconds"]), payload["skipped"]
        self.history = payload["history"]
        self.status = payload["status"]
        self.saved_step = self.step

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss in bits per byte over the fixed held-out windows.

        With ``carry_state`` window ``j`` starts from the carried fast state of row ``j mod
        batch`` of the global batch (what the model has become in the stream; its initial state
        is trained only by the first step), else from the initial state. Nothing carried
        changes."""
        self.learner.eval()
        start = self._global_fast() if self.cfg.carry_state else None
        if start is not None:
            start = state_to(start, self.cfg.device)
        total, count = 0.0, 0
        for i in range(0, len(self.val), self.cfg.batch):
            chunk = self.val[i : i + self.cfg.batch].to(self.cfg.device)
            args: tuple = (chunk,)
            if start is not None:
                which = torch.arange(i, i + chunk.shape[0], device=chunk.device) % self.cfg.batch
                args = (chunk, D.rows(start, which))
            loss, _ = lm_loss(self.learner, *args)
            total += float(loss) * chunk.shape[0] * (chunk.shape[1] - 1)
            count += chunk.shape[0] * (chunk.shape[1] - 1)
        self.learner.train()
        return total / count / math.log(2)

    # ------------------------------------------------------------------ faults
    def _fault(self, message: str, can_skip: bool = True) -> bool:
        """Handle a non-finite step: ``True`` to skip it, else raise (checkpoint untouched)."""
        text = f"{self.label}: step {self.step + 1}: {message}"
        if self.cfg.on_nan == "skip" and can_skip and self.streak < MAX_SKIPS:
            self.skipped += 1
            self.streak += 1
            self.log(f"warning: {text}; skipping the step (--on-nan skip)")
            return True
        self.status = "nan"
        hint = "" if self.cfg.on_nan == "skip" else "; --on-nan skip skips such steps"
        if self.cfg.on_nan == "skip" and can_skip:
            hint = f" ({MAX_SKIPS} steps skipped in a row)"
        # every checkpoint written (save) or resumed from (check_resume) holds finite tensors
        kept = f"{self.kept()} is kept" if self.kept() else "no checkpoint was written by this run"
        raise NumericalFaultError(f"{text}; stopped, {kept} (lower --lr?){hint}")

    def _loss_fault(self, loss: torch.Tensor, state: dict[str, Any]) -> str:
        kind = "nan" if bool(torch.isnan(loss)) else "inf"
        hit = nonfinite_in_state(state, self.levels)
        if hit:
            others = bad_state_levels(state, self.levels)[1:]
            also = f" (also in {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
            return f"{kind} loss; first {describe(hit, 'fast state')}" + (also if others else "")
        hit = first_nonfinite(self.learner.named_parameters(), self.levels)
        return f"{kind} loss" + (f"; first {describe(hit, 'parameters')}" if hit else "")

    # ------------------------------------------------------------------ the loop
    def _one_step(self) -> float | None:
        cfg = self.cfg
        draw = stream_batch_at if cfg.carry_state else batch_at
        tokens = draw(
            self.corpus.train, self.step, cfg.batch, cfg.seq, cfg.seed, *self._rank_world()
        ).to(cfg.device)
        for group in self.opt.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        if cfg.carry_state:
            loss, state = lm_loss(self.module, tokens, self.fast)
        else:
            loss, state = lm_loss(self.module, tokens)
        bad = not bool(torch.isfinite(loss.detach()))
        (bad_any,) = D.any_flag([bad], self.world)
        if bad_any:
            msg = self._loss_fault(loss, state) if bad else "non-finite loss on another process"
            if self._fault(msg):
                return None
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.learner.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else float("inf"))
        if not bool(torch.isfinite(norm)):
            grads = ((n, p.grad) for n, p in self.learner.named_parameters())
            hit = first_nonfinite(grads, self.levels)
            if self._fault(describe(hit, "gradients") if hit else "non-finite gradient norm"):
                self.opt.zero_grad(set_to_none=True)
                return None
        self.opt.step()
        hit = first_nonfinite(self.learner.named_parameters(), self.levels)
        if hit:
            self._fault(describe(hit, "parameters") + " after the update", can_skip=False)
        self.streak = 0
        if cfg.carry_state:  # truncated BPTT: the next step continues it, without its graph
            self.fast = detach_state(state)
        return D.mean(loss, self.world)

    def _rank_world(self) -> tuple[int, int]:
        return self.world.rank, self.world.size

    def _sigint(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C is immediate

    def _reporter(self) -> Progress:
        if isinstance(self.progress, Progress):
            return self.progress
        console = Console(enabled=bool(self.progress) and self.world.main)
        plan = Planned(self.label, self.cfg.steps, self.cfg.eval_period(), self.step)
        return Progress(console, [plan])

    def run(self) -> dict[str, Any]:
        """Train to ``config.steps`` (or the budget, or Ctrl-C); save; return the metrics."""
        cfg = self.cfg
        prev_det = torch.are_deterministic_algorithms_enabled()
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        main_thread = threading.current_thread() is threading.main_thread()
        old = signal.signal(signal.SIGINT, self._sigint) if main_thread else None
        every = cfg.eval_period()
        save_every = cfg.checkpoint_every or every
        bar = self._reporter()
        for line in [*self.recompute_warnings, *self.inert.lines(self.label, cfg.seq)]:
            self.log(line)
        vals = self.history["val"]
        bar.start(self.label, self.step, (vals[-1]["step"], vals[-1]["bpb"]) if vals else None)
        memory = PeakMemory()
        started = time.perf_counter()
        step_tokens = cfg.batch * cfg.seq
        try:
            if self.status != "done":
                self.status = "running"
            while self.step < cfg.steps and self.status == "running":
                over = cfg.budget_seconds is not None and (
                    time.perf_counter() - started >= cfg.budget_seconds
                )
                stop, over = D.any_flag([self.stop_requested, over], self.world)
                if stop or over:
                    self.status = "interrupted" if stop else "budget"
                    break
                t0 = time.perf_counter()
                loss = self._one_step()
                self.train_seconds += time.perf_counter() - t0
                self.step += 1
                self.tokens += step_tokens
                self.history["train"].append(
                    {"step": self.step, "tokens": self.tokens, "loss": loss,
                     "lr": cfg.lr_at(self.step - 1), "seconds": round(self.train_seconds, 4)}
                )  # fmt: skip
                bar.step(self.step, loss, self.tokens / max(self.train_seconds, 1e-9))
                if self.step % every == 0 or self.step == cfg.steps:
                    self._validate(bar)
                if self.step % save_every == 0 and self.step < cfg.steps:
                    self.save()
                if self.on_step is not None:
                    self.on_step(self)
            if self.status == "running":
                self.status = "done"
            last_val = self.history["val"][-1]["step"] if self.history["val"] else None
            if self.status != "interrupted" and last_val != self.step:  # Ctrl-C: exit fast
                self._validate(bar)
            self.save()
        except BaseException:
            bar.abort()
            raise
        finally:
            if main_thread and old is not None:
                signal.signal(signal.SIGINT, old)
            torch.use_deterministic_algorithms(prev_det)
        note = ""
        if self.status == "interrupted":
            note = f"saved {self.checkpoint_path} (--resume continues)"
        bar.finish(self.status, self.step, self.tokens, self._rate(), note)
        return {**self.summary(memory.peak_mb()), "rss_at_start_mb": memory.start_mb}

    def _validate(self, bar: Progress) -> None:
        bar.validating(self.step, len(self.val))
        bpb = self.evaluate()
        self.history["val"].append({"step": self.step, "tokens": self.tokens, "bpb": bpb})
        bar.validated(self.step, bpb)

    def _last_loss(self) -> float | None:
        return self.history["train"][-1]["loss"] if self.history["train"] else None

    def _rate(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds else 0.0

    def summary(self, peak_mb: float | None) -> dict[str, Any]:
        from nlgraph.train.models import count_params

        vals = [v["bpb"] for v in self.history["val"]]
        return {
            "model": self.label, "status": self.status, "steps": self.step,
            "tokens": self.tokens, "params": count_params(self.learner),
            "val_bpb": vals[-1] if vals else None,
            "best_val_bpb": min(vals) if vals else None,
            "train_loss": self._last_loss(), "train_seconds": round(self.train_seconds, 3),
            "tokens_per_s": round(self._rate(), 1), "peak_rss_mb": peak_mb,
            "skipped_steps": self.skipped,
        }  # fmt: skip
