"""What ``nlgraph train`` reports while it trains: a status line, validations, one final line.

Every loss is in bits per byte (tokens are bytes: ``nats / ln 2``) and says so. One
:class:`Progress` covers the whole run, so its ETA counts every model still to train and their
validation passes::

    hope (model 1/3): building ... 0.4 s
    hope: first step (warm-up) ... train 7.994 bits/byte (1.9 s)
    hope: step 160/1600 (10%)  train 3.291 bits/byte  945 tok/s  ETA 0:04:51  run ETA ~0:14:33
    hope: step 160/1600  validation (16 held-out windows) ... val 3.4028 bits/byte (0.9 s)
    ...
    hope: done 1600/1600 steps, 409,600 tokens  train 2.301 bits/byte (mean of the last 20
        steps)  val 2.4312 bits/byte (step 1600)  in 0:05:21 (926 tok/s)

The status line is redrawn in place on a terminal and printed every ``every_s`` seconds
elsewhere (:class:`~nlgraph.train.console.Console`); it shows the latest validation of this
model only, with the step it was taken at. A ``~`` before the run's ETA: some later model has
not been timed yet and is assumed to cost what the models timed so far cost per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from nlgraph.train.console import Console, format_duration, format_seconds

__all__ = ["Planned", "Progress", "format_duration", "format_seconds", "validations_left"]

LN2 = math.log(2)
TRAIN_MEAN = 20  # the final line's train figure: the mean of this many last steps
BAR = 24  # widest progress bar drawn on a terminal, in characters
PLAIN_EVERY_S = 10.0  # seconds between status lines when the output is not a terminal


def validations_left(step: int, steps: int, every: int) -> int:
    """Validation passes the trainer runs after ``step`` on its way to ``steps``: each multiple
    of ``every``, and ``steps`` itself."""
    if step >= steps:
        return 0
    return steps // every - step // every + (1 if steps % every else 0)


def _rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


@dataclass
class Planned:
    """One model of the run as the ETA sees it.

    ``step_s``/``val_s`` are priors (calibration); measured times replace them. ``val_cost`` is
    a validation pass in training steps, the guess used before any pass is timed."""

    label: str
    steps: int
    every: int
    step: int = 0
    done: bool = False
    step_s: float | None = None
    val_s: float | None = None
    val_cost: float = 1.0
    # measured in this run
    first_s: float | None = None
    timed: int = 0
    timed_s: float = 0.0
    vals: int = 0
    vals_s: float = 0.0

    def measured_step(self) -> float | None:
        if self.timed:
            return self.timed_s / self.timed
        return self.first_s if self.first_s is not None else self.step_s

    def measured_val(self) -> float | None:
        return self.vals_s / self.vals if self.vals else self.val_s


class Progress:
    """The run's reporter: call :meth:`start`, :meth:`step` after each step, :meth:`validating`
    and :meth:`validated` around a validation pass, and :meth:`finish` once per model.

    Args:
        console: where the lines go.
        plan: every model of the run, in training order.
        record: also gets each permanent line (the run's ``train.log``).
        every_s: seconds between plain status lines when ``console`` is not a terminal
            (default :data:`PLAIN_EVERY_S`); on a terminal the line is redrawn every 0.2 s.

    Times come from ``console.clock``.
    """

    def __init__(
        self,
        console: Console,
        plan: list[Planned],
        record: Callable[[str], None] | None = None,
        every_s: float | None = None,
    ) -> None:
        self.console, self.plan, self.record = console, plan, record
        self.every_s = 0.2 if console.tty else PLAIN_EVERY_S if every_s is None else every_s
        self.clock = console.clock
        self.model: Planned | None = None
        self.val: tuple[int, float] | None = None  # (step, bits/byte) of this model's latest
        self.losses: list[float] = []
        self.t0 = self.mark = self.last_print = 0.0
        self.first = True

    # ------------------------------------------------------------------ the ETA
    def _estimate(self, p: Planned) -> tuple[float | None, bool]:
        """Seconds ``p`` still needs, and whether every figure in it was measured (or
        calibrated) for ``p`` itself rather than borrowed from the models timed so far."""
        step_s, val_s, own = p.measured_step(), p.measured_val(), True
        timed = [q for q in self.plan if q.measured_step() is not None]
        if step_s is None:
            if not timed:
                return None, False
            step_s, own = sum(q.measured_step() for q in timed) / len(timed), False
        if val_s is None:
            vals = [q.measured_val() for q in self.plan if q.measured_val() is not None]
            val_s = sum(vals) / len(vals) if vals else p.val_cost * step_s
            own = False
        left = (p.steps - p.step) * step_s + validations_left(p.step, p.steps, p.every) * val_s
        return left, own

    def eta(self) -> tuple[float | None, float | None, bool]:
        """``(this model, the whole run, exact)``: seconds left; ``exact`` is ``False`` when a
        model's figure is borrowed from others."""
        here, run, exact = None, 0.0, True
        for p in self.plan:
            if p.done:
                continue
            left, own = self._estimate(p)
            if left is None:
                return here, None, False
            if p is self.model:
                here = left
            run, exact = run + left, exact and own
        return here, run, exact

    # ------------------------------------------------------------------ one model
    def _planned(self, label: str) -> Planned:
        for p in self.plan:
            if p.label == label and not p.done:
                return p
        raise KeyError(f"{label!r} is not a model still to train in this run")

    def start(self, label: str, step: int, last_val: tuple[int, float] | None = None) -> None:
        """``label`` starts (or resumes) at ``step``; ``last_val``: its latest validation."""
        self.model = p = self._planned(label)
        p.step = step
        self.val, self.losses, self.first = last_val, [], True
        self.t0 = self.mark = self.clock()
        self.last_print = self.t0
        if step < p.steps:
            self.console.begin(f"{label}: first step (warm-up)")

    def step(self, step: int, loss: float | None, tokens_per_s: float) -> None:
        """After optimizer step ``step``; ``loss`` in nats (``None``: a skipped step)."""
        p = self.model
        now = self.clock()
        took, self.mark, p.step = now - self.mark, now, step
        if loss is not None:
            self.losses.append(loss / LN2)
            del self.losses[:-TRAIN_MEAN]
        if self.first:  # the warm-up step is not a fair sample of the rest
            self.first, p.first_s = False, took
            shown = f"train {loss / LN2:.3f} bits/byte" if loss is not None else "step skipped"
            self._keep(self.console.end(shown))
            self.last_print = now
            return
        p.timed, p.timed_s = p.timed + 1, p.timed_s + took
        if step < p.steps and now - self.last_print >= self.every_s:
            self.last_print = now
            self.console.status(self.text(step, loss, tokens_per_s))

    def text(self, step: int, loss: float | None, tokens_per_s: float) -> str:
        """The status line. On a terminal it must fit one row: the bar graphic goes first, then
        the units shrink to ``bpb`` (``(step N)`` to ``@N``), then tokens/s and the validation
        figure (it has its own line above) are left out, and only then is it cut."""
        p = self.model
        frac = min(step / max(p.steps, 1), 1.0)
        rest = self._figures(loss, tokens_per_s)
        if not self.console.tty:
            return f"{p.label}: step {step}/{p.steps} ({100 * frac:.0f}%)  {rest}"
        room = self.console.width() - 1
        head = f"{p.label} {step}/{p.steps}"
        width = min(BAR, room - len(head) - len(rest) - 5)
        if width >= 6:
            fill = int(frac * width)
            return f"{head} [{'#' * fill}{'.' * (width - fill)}]  {rest}"
        for short, rate, val in ((False, True, True), (True, True, True), (True, False, True),
                                 (True, False, False)):  # fmt: skip
            line = f"{head}  {self._figures(loss, tokens_per_s, short, rate, val)}"
            if len(line) <= room:
                return line
        return line

    def _figures(
        self, loss: float | None, tokens_per_s: float, short: bool = False, rate: bool = True,
        val: bool = True,
    ) -> str:  # fmt: skip
        unit = "bpb" if short else "bits/byte"
        here, run, exact = self.eta()
        parts = [f"train {loss / LN2:.3f} {unit}" if loss is not None else "train - (skipped)"]
        if val and self.val is not None:
            at = f"@{self.val[0]}" if short else f"(step {self.val[0]})"
            parts.append(f"val {self.val[1]:.4f} {unit} {at}")
        if rate:
            parts.append(f"{_rate(tokens_per_s)} tok/s")
        parts.append(f"ETA {format_duration(here) if here is not None else '?'}")
        if sum(not q.done for q in self.plan) > 1:  # else the run's ETA is this model's
            left = f"{'' if exact else '~'}{format_duration(run) if run is not None else '?'}"
            parts.append(f"run {left}" if short else f"run ETA {left}")
        return "  ".join(parts)

    def validating(self, step: int, windows: int) -> None:
        p = self.model
        self.console.begin(f"{p.label}: step {step}/{p.steps}  validation ({windows} "
                           "held-out windows)")  # fmt: skip

    def validated(self, step: int, bpb: float) -> None:
        p = self.model
        took = self.console.elapsed()
        self.val = (step, bpb)
        p.vals, p.vals_s = p.vals + 1, p.vals_s + took
        self._keep(self.console.end(f"val {bpb:.4f} bits/byte"))
        self.mark = self.clock()  # the next step's time excludes the validation

    def finish(
        self,
        status: str,
        step: int,
        tokens: int,
        tokens_per_s: float,
        note: str = "",
    ) -> str:
        """The model's one final line (returned too)."""
        p = self.model
        p.step, p.done = step, True
        if self.first and self.console.phase is not None:  # stopped before its first step
            self.console.end("no step taken", timed=False)
        what = {"done": "done", "budget": "stopped by its time budget at",
                "interrupted": "interrupted at"}.get(status, status)  # fmt: skip
        parts = [f"{p.label}: {what} {step}/{p.steps} steps, {tokens:,} tokens"]
        if self.losses:
            n = len(self.losses)
            last = "the last step" if n == 1 else f"the last {n} steps"
            parts.append(f"train {sum(self.losses) / n:.3f} bits/byte (mean of {last})")
        if self.val is not None:
            parts.append(f"val {self.val[1]:.4f} bits/byte (step {self.val[0]})")
        took = self.clock() - self.t0
        parts.append(f"in {format_seconds(took)} ({_rate(tokens_per_s)} tok/s)")
        line = "  ".join(parts) + (f"; {note}" if note else "")
        self.console.line(line)
        self._keep(line)
        self.model = None
        return line

    def abort(self) -> None:
        """Training stopped by an error: end an open phase's line and clear the status line,
        so that the error reads as a line of its own."""
        if self.console.phase is not None:
            self._keep(self.console.end("stopped"))
        self.console.clear()
        self.model = None

    def _keep(self, line: str) -> None:
        if self.record is not None:
            self.record(line)
