"""`nlgraph train` refuses bad checkpoints, bad output folders and clashing runs: exit 2, one
error line, no traceback, and the output folder's files unchanged (``train.log`` only gains the
error line when the refusal comes after it was opened)."""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nlgraph._errors import NumericalFaultError
from nlgraph.cli import main
from nlgraph.train import checkpoint as ckpt
from nlgraph.train import run as run_mod
from nlgraph.train.errors import CheckpointError
from nlgraph.train.models import build_learner, build_optimizer
from nlgraph.train.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(d=16, n_layers=1, heads=1, hidden=32)


def argv(docs: Path, out: Path, *extra: str, model: str = "transformer") -> list[str]:
    return ["train", "--model", model, "--steps", "4", "--batch", "2", "--seq", "16",
            "--eval-every", "2", "--no-baselines", "--no-progress", "--data", str(docs),
            "--out", str(out), *extra]  # fmt: skip


def snapshot(folder: Path) -> dict[str, str]:
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def refused(capsys, args: list[str], out: Path, needle: str, *, quiet: bool = False) -> str:
    """Run ``nlgraph train`` expecting a refusal; return its error line."""
    before = {f: d for f, d in snapshot(out).items()}
    log_before = (out / "train.log").read_text() if (out / "train.log").is_file() else None
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    if quiet:  # refused before anything ran: the error is all there is
        assert len(lines) == 1, err
    assert needle in errors[0], errors[0]
    after = snapshot(out)
    for name, digest in before.items():
        if name == "train.log":  # the log may only gain the error
            assert (out / name).read_text().startswith(log_before)
        else:
            assert after.get(name) == digest, name
    assert set(after) - set(before) <= {"train.log"}, set(after) - set(before)
    return errors[0]


@pytest.fixture(scope="module")
def finished(docs, tmp_path_factory) -> Path:
    """A finished tiny transformer run."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(argv(docs, out)) == 0
    assert (out / "transformer" / "checkpoint.pt").is_file() and (out / "run.json").is_file()
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    for p in finished.rglob("*"):
        if p.is_file():
            dest = out / p.relative_to(finished)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(p.read_bytes())
    return out


def edit_checkpoint(out: Path, edit) -> Path:
    path = out / "transformer" / "checkpoint.pt"
    payload = ckpt.load(path)
    edit(payload)
    torch.save(payload, path)
    return path


# ------------------------------------------------------------------ 1: checkpoint contents
def _drop(key):
    return lambda p: p.pop(key)


def _set(key, value):
    return lambda p: p.__setitem__(key, value)


def _reshape(p):
    p["model"]["top.slow.lm_head.weight"] = torch.zeros(3, 5)


def _nan_weights(p):
    p["model"]["top.slow.lm_head.weight"][0, 0] = float("nan")


def _drop_tensor(p):
    p["model"].pop("top.slow.lm_head.weight")


def _running(step):
    def edit(p):
        p["step"], p["status"] = step, "running"
        p.pop("summary", None)

    return edit


CRAFTED = {
    "no-config": (_drop("config"), "has no 'config'"),
    "no-rng": (_drop("rng"), "has no 'rng'"),
    "rng-not-a-dict": (_set("rng", 3), "for 'rng'"),
    "step-a-string": (_set("step", "4"), "for 'step'"),
    "bad-status": (_set("status", "weird"), "for 'status'"),
    "wrong-shape": (_reshape, "'top.slow.lm_head.weight' with shape (3, 5)"),
    "missing-tensor": (_drop_tensor, "has no tensor 'top.slow.lm_head.weight'"),
    "nan-weights": (_nan_weights, "nan in the parameters of level 'lm_head'"),
    "step-beyond-plan": (_running(10**9), "beyond the 4 steps this run plans"),
    "step-negative": (_running(-5), "at step -5, below 0"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_checkpoints_are_refused(docs, run_copy, capsys, case):
    edit, needle = CRAFTED[case]
    edit_checkpoint(run_copy, edit)
    line = refused(capsys, argv(docs, run_copy, "--resume"), run_copy, needle)
    assert "without --resume" in line


def test_a_pickled_checkpoint_is_refused_without_unpickling_advice(docs, run_copy, capsys):
    path = run_copy / "transformer" / "checkpoint.pt"
    payload = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "x": argparse.Namespace(a=1)}
    torch.save(payload, path)
    line = refused(capsys, argv(docs, run_copy, "--resume"), run_copy, str(path))
    assert "not a checkpoint nlgraph can load safely" in line
    assert "weights_only" not in line and "trust" not in line


# ------------------------------------------------------------------ 2: the kept checkpoint
def make(run_dir: Path, docs: Path, **kw) -> Trainer:
    cfg = TrainConfig(model="transformer", sizes=dict(TINY), steps=6, batch=2, seq=16,
                      lr=1e-2, val_windows=2, eval_every=2, checkpoint_every=2)  # fmt: skip
    learner = build_learner(cfg.model, cfg.preset, cfg.sizes, cfg.seed)
    opt = build_optimizer(cfg.optimizer, learner.parameters(), cfg.lr)
    from nlgraph.train.data import load_corpus

    corpus = load_corpus(docs, cfg.seq)
    return Trainer(cfg, learner, opt, corpus, run_dir, log=lambda m: None, progress=False, **kw)


def _poison_at(step: int):
    def poison(t: Trainer) -> None:
        if t.step == step:
            with torch.no_grad():
                t.learner.slow["lm_head"].weight[0, 0] = float("nan")

    return poison


def test_a_fault_before_any_save_does_not_claim_an_old_file(docs, tmp_path):
    make(tmp_path, docs).run()  # an earlier run's checkpoint in the same folder
    with pytest.raises(NumericalFaultError) as info:
        make(tmp_path, docs, on_step=_poison_at(1)).run()
    msg = str(info.value)
    assert "no checkpoint was written by this run" in msg and "last good" not in msg


def test_a_non_finite_optimizer_state_is_never_saved(docs, tmp_path):
    t = make(tmp_path, docs)
    cut = _stop_at(3)
    t.on_step = cut
    t.run()  # interrupted at step 3: saved
    before = hashlib.sha256((tmp_path / "checkpoint.pt").read_bytes()).hexdigest()
    state = next(iter(t.opt.state.values()))
    state["exp_avg"].view(-1)[0] = float("inf")
    with pytest.raises(NumericalFaultError) as info:
        t.save()
    msg = str(info.value)
    assert "inf in the optimizer state" in msg and "last good checkpoint (step 3," in msg
    assert hashlib.sha256((tmp_path / "checkpoint.pt").read_bytes()).hexdigest() == before


def _stop_at(step: int):
    def stop(t: Trainer) -> None:
        if t.step == step:
            t.stop_requested = True

    return stop


def test_a_resumed_checkpoint_with_nan_weights_is_refused(docs, tmp_path):
    t = make(tmp_path, docs, on_step=_stop_at(2))
    t.run()
    payload = ckpt.load(tmp_path / "checkpoint.pt")
    payload["model"]["top.slow.lm_head.weight"][0, 0] = float("nan")
    again = make(tmp_path, docs)
    with pytest.raises(CheckpointError, match="nan in the parameters"):
        again.resume(payload)
    assert again.step == 0 and again.saved_step is None


# ------------------------------------------------------------------ 4: disk full
def test_disk_full_keeps_the_previous_checkpoint(docs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    real, calls = ckpt.torch.save, {"n": 0}

    def full_on_second(obj, f):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"PK half")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", full_on_second)
    capsys.readouterr()
    assert main(argv(docs, out, "--checkpoint-every", "2")) == 2
    err = capsys.readouterr().err
    line = err.strip().splitlines()[-1]
    path = out / "transformer" / "checkpoint.pt"
    assert "Traceback" not in err and "no space left" in line and str(path) in line
    assert "last good checkpoint (step 2," in line and "is intact" in line
    assert ckpt.load(path)["step"] == 2
    assert not [p for p in path.parent.iterdir() if p.name != "checkpoint.pt"]  # no temp file


# ------------------------------------------------------------------ 5: resume and the folder
def test_resume_without_a_checkpoint_is_refused(docs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(capsys, argv(docs, empty, "--resume"), empty, "nothing to resume", quiet=True)
    assert not list(empty.iterdir())
    missing = tmp_path / "missing"
    refused(capsys, argv(docs, missing, "--resume"), missing, "drop --resume", quiet=True)
    assert not missing.exists()


def test_resume_of_another_models_run_is_refused(docs, run_copy, capsys):
    line = refused(
        capsys, argv(docs, run_copy, "--resume", model="hope"), run_copy, "'transformer'",
        quiet=True,
    )  # fmt: skip
    assert "'hope'" in line and "another --out" in line


def test_resume_with_other_settings_is_refused(docs, run_copy, capsys):
    line = refused(capsys, argv(docs, run_copy, "--resume", "--seed", "3"), run_copy, "seed",
                   quiet=True)  # fmt: skip
    assert "(seed 0 there, 3 here)" in line


def test_resume_of_a_finished_run_reuses_it(docs, run_copy, capsys):
    assert main(argv(docs, run_copy, "--resume")) == 0
    assert "finished earlier" in capsys.readouterr().err


def test_a_second_run_on_the_same_folder_is_refused(docs, run_copy, capsys):
    fd = os.open(run_copy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running `nlgraph train` holds it
        line = refused(capsys, argv(docs, run_copy), run_copy, "in use by another", quiet=True)
        assert str(run_copy) in line
        refused(capsys, argv(docs, run_copy, "--resume"), run_copy, "in use", quiet=True)
    finally:
        os.close(fd)


def test_a_killed_run_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    code = ("import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "time.sleep(60)\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        with pytest.raises(run_mod.OutputError, match="in use"):
            run_mod._lock(out)
    finally:
        proc.kill()  # SIGKILL: nothing cleans up, the OS drops the lock
        proc.wait()
    fd = run_mod._lock(out)
    assert fd is not None
    os.close(fd)
    assert not list(out.iterdir())  # the lock leaves no file behind


# ------------------------------------------------------------------ 6: the output folder
def test_out_that_is_a_file_is_refused(docs, tmp_path, capsys):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    line = refused(capsys, argv(docs, blocker / "run"), tmp_path, "a file (not a folder)",
                   quiet=True)  # fmt: skip
    assert str(blocker) in line
    refused(capsys, argv(docs, blocker), tmp_path, "a file (not a folder)", quiet=True)


def test_read_only_out_is_one_line(docs, tmp_path, capsys, monkeypatch):
    def read_only(self, *a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    out = tmp_path / "ro" / "run"
    line = refused(capsys, argv(docs, out), tmp_path, "read-only file system", quiet=True)
    assert str(out) in line and "another --out" in line


def test_unwritable_results_are_one_line(docs, tmp_path, capsys, monkeypatch):
    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "run" / "x"))

    monkeypatch.setattr(run_mod, "write_json", read_only)
    capsys.readouterr()
    assert main(argv(docs, tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "read-only file system" in err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "flag, value, needle",
    [("--device", "cpu:banana", "expected cpu, cuda or cuda:N"),
     ("--batch", "99999999999999", "at most 4,096"),
     ("--seq", "99999999999999", "at most 65,536"),
     ("--steps", "99999999999", "at most 10,000,000"),
     ("--seed", "99999999999999999999999", "32-bit seed")],
)  # fmt: skip
def test_train_sizes_and_devices_past_their_limits_are_one_line(flag, value, needle, tmp_path,
                                                                capsys):  # fmt: skip
    from nlgraph.cli import main

    assert main(["train", flag, value, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].count("error:") == 1 and needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "flag, value, needle",
    [("--model", "nope", "unknown library name 'nope'"),
     ("--optimizer", "nope", "unknown optimizer 'nope'")],
)  # fmt: skip
def test_a_mistyped_name_is_refused_before_anything_is_printed(docs, tmp_path, capsys, flag,
                                                               value, needle):  # fmt: skip
    out = tmp_path / "run"
    refused(capsys, argv(docs, out, flag, value), out, needle, quiet=True)  # the last flag wins
