"""What `nlgraph train` prints while it trains: units, fresh validation figures, one final line
per model, a run-wide ETA, a line before each slow phase, and plain lines off a terminal."""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import signal
from pathlib import Path

import pytest

from nlgraph.cli import main
from nlgraph.train import progress as progress_mod
from nlgraph.train.console import Console
from nlgraph.train.data import load_corpus
from nlgraph.train.models import build_learner, build_optimizer
from nlgraph.train.progress import Planned, Progress, validations_left
from nlgraph.train.run import RunOptions, train_run
from nlgraph.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(d=16, n_layers=1, heads=1, hidden=32)
STEPS, EVERY = 8, 4
FIGURE = re.compile(r"\b(train|val) (-?\d+\.\d+)")
STATUS = re.compile(r"^(\S+): step (\d+)/(\d+) \(\d+%\)  ")
VALIDATION = re.compile(
    r"^(\S+): step (\d+)/\d+  validation \(.*\) \.\.\. val (\d+\.\d+) bits/byte"
)


def config(**kw) -> TrainConfig:
    base = dict(model="transformer", sizes=dict(TINY), steps=STEPS, batch=2, seq=16, lr=1e-2,
                val_windows=2, eval_every=EVERY)  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def plain(docs, tmp_path_factory):
    """A tiny two-model run (transformer, matched titans_lm) with its stderr sent to a file-like
    object (not a terminal) and a status line after every step."""
    out = tmp_path_factory.mktemp("plain") / "run"
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setattr(progress_mod, "PLAIN_EVERY_S", 0.0)
        report = train_run(RunOptions(config=config(), data=str(docs), out=str(out),
                                      auto_steps=False))  # fmt: skip
    return err.getvalue(), report, out


def models(report) -> list[str]:
    return [r["model"] for r in report["results"]]


def duration(text: str) -> int:
    h, m, s = (int(x) for x in text.split(":"))
    return 3600 * h + 60 * m + s


# ------------------------------------------------------------------ a run, read as a log file
def test_every_figure_says_bits_per_byte(plain):
    err, _, _ = plain
    assert not re.search(r"\bloss \d", err)  # the unlabelled nats figure is gone
    figures = 0
    for line in err.splitlines():
        for m in FIGURE.finditer(line):
            figures += 1
            assert line[m.end() :].startswith(" bits/byte"), line
    assert figures > 20


def test_plain_output_is_one_line_per_report(plain):
    err, _, _ = plain
    assert "\r" not in err
    lines = err.splitlines()
    assert all(line.strip() for line in lines)
    assert all(a != b for a, b in itertools.pairwise(lines)), "a line printed twice"


def test_one_final_line_per_model(plain):
    err, report, out = plain
    log = (out / "train.log").read_text()
    for r in report["results"]:
        finals = [line for line in err.splitlines() if line.startswith(f"{r['model']}: done ")]
        assert len(finals) == 1, finals
        line = finals[0]
        assert f"{STEPS}/{STEPS} steps, {r['tokens']:,} tokens" in line
        assert re.search(r"train \d+\.\d{3} bits/byte \(mean of the last 8 steps\)", line)
        assert f"val {r['val_bpb']:.4f} bits/byte (step {STEPS})" in line
        assert re.search(r" in \d+\.\d s \(\S+ tok/s\)$", line)
        assert log.count(line) == 1  # train.log keeps it too
    # no status line at the last step: the final line is the model's last word
    assert not any(re.match(rf"\S+: step {STEPS}/{STEPS} \(", line) for line in err.splitlines())


def test_status_lines_show_only_this_models_latest_validation(plain):
    err, report, _ = plain
    latest: dict[str, tuple[int, str]] = {}
    with_val = without_val = 0
    for line in err.splitlines():
        if m := VALIDATION.match(line):
            latest[m[1]] = (int(m[2]), m[3])
        elif m := STATUS.match(line):
            shown = re.search(r"val (\d+\.\d+) bits/byte \(step (\d+)\)", line)
            if m[1] not in latest:  # nothing validated yet for this model: nothing shown
                assert shown is None, line
                without_val += 1
            else:
                step, value = latest[m[1]]
                assert shown is not None and int(shown[2]) == step, line
                assert shown[1] == value, line  # the same figure, to the digit
                with_val += 1
    assert with_val and without_val  # both cases were seen
    second = models(report)[1]
    first_status = next(line for line in err.splitlines() if line.startswith(f"{second}: step"))
    assert "val " not in first_status  # not the previous model's validation


def test_status_lines_carry_the_run_eta(plain):
    err, report, _ = plain
    first, last = models(report)
    lines = err.splitlines()
    firsts = [line for line in lines if STATUS.match(line) and line.startswith(f"{first}:")]
    lasts = [line for line in lines if STATUS.match(line) and line.startswith(f"{last}:")]
    assert firsts and lasts
    for line in firsts:
        m = re.search(r"  ETA (\d+:\d\d:\d\d)  run ETA (~?)(\d+:\d\d:\d\d)$", line)
        assert m, line
        assert duration(m[3]) >= duration(m[1])
    for line in lasts:  # the last model's ETA is the run's
        assert re.search(r"  ETA \d+:\d\d:\d\d$", line) and "run ETA" not in line, line


def test_slow_phases_are_announced_on_the_line_that_ends_them(plain):
    err, report, _ = plain
    lines = err.splitlines()

    def one(pattern: str) -> str:
        hits = [line for line in lines if re.search(pattern, line)]
        assert len(hits) == 1, (pattern, hits)
        return hits[0]

    one(
        r"^transformer: building it to count its parameters \.\.\. [\d,]+ trainable parameters "
        r"\(\d+\.\d s\)$"
    )
    one(r"^titans_lm: matching its MLP width to transformer \.\.\. hidden=\d+ .*\(\d+\.\d s\)$")
    one(r"^writing metrics\.json, .* \.\.\. done \(\d+\.\d s\)$")
    for i, model in enumerate(models(report)):
        one(rf"^{model} \(model {i + 1}/2\): building \.\.\. done \(\d+\.\d s\)$")
        one(rf"^{model}: first step \(warm-up\) \.\.\. train \d+\.\d+ bits/byte \(\d+\.\d s\)$")
        vals = [line for line in lines if (m := VALIDATION.match(line)) and m[1] == model]
        assert len(vals) == validations_left(0, STEPS, EVERY) == 2
        assert all(re.search(r"\(\d+\.\d s\)$", line) for line in vals)


# ------------------------------------------------------------------ the ETA's arithmetic
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_eta_counts_every_model_and_validation():
    clock = Clock()
    plan = [Planned("a", 10, 5), Planned("b", 10, 5)]
    p = Progress(Console(io.StringIO(), clock=clock), plan)
    p.start("a", 0)
    for t, step in ((5, 1), (6, 2), (7, 3)):  # a 5 s warm-up, then 1 s per step
        clock.t = t
        p.step(step, 1.0, 100.0)
    # a: 7 steps + 2 validations guessed at one step each; b: borrowed from a
    assert p.eta() == (9.0, 9.0 + 12.0, False)
    clock.t = 9
    p.step(4, 1.0, 100.0)
    p.step(5, 1.0, 100.0)  # 0 s: (1 + 1 + 2 + 0) / 4 = 1 s per step
    p.validating(5, 2)
    clock.t = 11
    p.validated(5, 3.0)  # 2 s
    assert p.eta() == (5 * 1.0 + 1 * 2.0, 7.0 + 10 * 1.0 + 2 * 2.0, False)
    line = p.finish("done", 5, 500, 100.0)
    assert line.count("a: done 5/10 steps") == 1
    clock.t = 20
    p.start("b", 0)
    for t, step in ((22, 1), (22.5, 2), (23, 3)):
        clock.t = t
        p.step(step, 1.0, 100.0)
    assert p.eta() == (7 * 0.5 + 2 * 2.0, 7 * 0.5 + 2 * 2.0, False)  # b's validation: a's


def test_calibrated_eta_is_exact_from_the_start():
    plan = [Planned("a", 10, 5, step_s=1.0, val_s=3.0), Planned("b", 20, 10, step_s=0.5, val_s=1.0)]
    p = Progress(Console(io.StringIO(), clock=Clock()), plan)
    p.start("a", 0)
    assert p.eta() == (10 + 2 * 3.0, 10 + 2 * 3.0 + 20 * 0.5 + 2 * 1.0, True)


def test_a_resumed_or_finished_model_counts_only_what_is_left():
    plan = [Planned("a", 10, 5, done=True), Planned("b", 10, 3, step=5, step_s=1.0, val_s=2.0)]
    p = Progress(Console(io.StringIO(), clock=Clock()), plan)
    p.start("b", 5)
    assert p.eta() == (5 * 1.0 + 3 * 2.0, 5 * 1.0 + 3 * 2.0, True)  # validations at 6, 9, 10
    with pytest.raises(KeyError, match="'a' is not a model still to train"):
        p.start("a", 0)


@pytest.mark.parametrize("start, steps, every", [(0, 10, 3), (5, 10, 3), (0, 8, 4), (7, 9, 2)])
def test_validations_left_is_what_the_trainer_runs(docs, tmp_path, start, steps, every):
    cfg = config(steps=steps, eval_every=every, checkpoint_every=10**6)
    t = make(cfg, docs, tmp_path)
    t.step = start
    t.run()
    assert len(t.history["val"]) == validations_left(start, steps, every)


# ------------------------------------------------------------------ a terminal
def make(cfg: TrainConfig, docs: Path, run_dir: Path, **kw) -> Trainer:
    learner = build_learner(cfg.model, cfg.preset, cfg.sizes, cfg.seed)
    opt = build_optimizer(cfg.optimizer, learner.parameters(), cfg.lr)
    corpus = load_corpus(docs, cfg.seq)
    kw.setdefault("progress", False)
    return Trainer(cfg, learner, opt, corpus, run_dir, log=lambda m: None, **kw)


def screen(raw: str) -> list[str]:
    """What a terminal shows: ``\\r`` returns to the start of the row, text overwrites."""
    rows = []
    for physical in raw.split("\n"):
        row: list[str] = []
        for part in physical.split("\r"):
            row[: len(part)] = part
        rows.append("".join(row).rstrip())
    return rows[:-1] if rows and rows[-1] == "" else rows


def reporter(width: int, tty: bool = True) -> tuple[Progress, io.StringIO]:
    stream, ticks = io.StringIO(), itertools.count()
    console = Console(stream, tty=tty, clock=lambda: float(next(ticks)))  # 1 s per reading
    console.width = lambda: width
    plan = Planned("transformer", STEPS, EVERY)
    return Progress(console, [plan, Planned("titans_lm", STEPS, EVERY)]), stream


@pytest.mark.parametrize("width", [160, 100, 60])
def test_terminal_redraws_one_row_and_leaves_only_permanent_lines(docs, tmp_path, width):
    bar, stream = reporter(width)
    make(config(), docs, tmp_path, progress=bar).run()
    raw = stream.getvalue()
    assert raw.count("\r") > 2  # the status line was redrawn in place
    rows = screen(raw)
    assert [r for r in rows if r.startswith("transformer: done ")] == [rows[-1]]
    assert not any(re.match(r"transformer \d+/", row) for row in rows)  # no bar left behind
    statuses = [part for part in raw.split("\r") if re.match(r"transformer \d+/8", part)]
    assert statuses and all("ETA" in s and " run " in s for s in statuses)
    assert all(len(s.rstrip()) < width for s in statuses)  # a wrapped row cannot be redrawn
    if width >= 160:
        assert any("[" in s and "bits/byte" in s for s in statuses)  # the bar graphic
    assert all(re.search(r"train \d+\.\d{3} (bits/byte|bpb)", s) for s in statuses)


def test_interrupted_model_has_one_final_line_that_says_so(docs, tmp_path):
    bar, stream = reporter(100, tty=False)

    def ctrl_c_at_5(t: Trainer) -> None:
        if t.step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag

    t = make(config(), docs, tmp_path, progress=bar, on_step=ctrl_c_at_5)
    assert t.run()["status"] == "interrupted"
    lines = stream.getvalue().splitlines()
    finals = [line for line in lines if line.startswith("transformer: interrupted")]
    assert len(finals) == 1 and finals == lines[-1:]
    assert "at 5/8 steps" in finals[0] and "(--resume continues)" in finals[0]
    assert re.search(r"val \d+\.\d{4} bits/byte \(step 4\)", finals[0])


def test_an_error_ends_the_open_phase_line(docs, tmp_path, monkeypatch):
    bar, stream = reporter(100, tty=False)
    t = make(config(), docs, tmp_path, progress=bar)

    def boom():
        raise RuntimeError("boom")

    monkeypatch.setattr(t, "_one_step", boom)
    with pytest.raises(RuntimeError):
        t.run()
    last = stream.getvalue().splitlines()[-1]
    assert re.fullmatch(r"transformer: first step \(warm-up\) \.\.\. stopped \(\d+\.\d s\)", last)


def test_no_progress_keeps_results_and_drops_status_lines(docs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress_mod, "PLAIN_EVERY_S", 0.0)
    args = ["train", "--model", "transformer", "--size", "tiny", "--steps", "6", "--batch", "2",
            "--seq", "16", "--eval-every", "3", "--no-baselines", "--data", str(docs),
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert main([*args, "--no-progress"]) == 0
    quiet = capsys.readouterr().err
    assert "ETA" not in quiet and "\r" not in quiet
    assert len([line for line in quiet.splitlines() if line.startswith("transformer: done")]) == 1
    assert len([line for line in quiet.splitlines() if VALIDATION.match(line)]) == 2
    assert main([*args[:-1], str(tmp_path / "again")]) == 0
    assert "ETA" in capsys.readouterr().err  # the same run with status lines


def test_a_warning_is_a_line_of_its_own(docs, tmp_path, monkeypatch):
    real = Trainer._one_step

    def warn_first(self):
        if self.step == 0:
            import warnings

            warnings.warn("a warning from inside the first step", UserWarning, stacklevel=1)
        return real(self)

    monkeypatch.setattr(Trainer, "_one_step", warn_first)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        train_run(RunOptions(config=config(), data=str(docs), out=str(tmp_path / "run"),
                             baselines=False, auto_steps=False))  # fmt: skip
    lines = err.getvalue().splitlines()
    hit = lines.index("warning: UserWarning: a warning from inside the first step")
    assert lines[hit - 1] == "transformer: first step (warm-up) ..."  # cut there, then repeated
    assert re.fullmatch(r"transformer: first step \(warm-up\) \.\.\. train .*", lines[hit + 1])
    log = (tmp_path / "run" / "train.log").read_text()
    assert "warning: UserWarning: a warning from inside the first step" in log
