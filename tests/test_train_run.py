"""The trainer end to end: exact resume after Ctrl-C and after a kill, NaN faults, outputs, DDP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from nlgraph._errors import NumericalFaultError
from nlgraph.train import checkpoint as ckpt
from nlgraph.train import trainer as trainer_mod
from nlgraph.train.data import load_corpus
from nlgraph.train.distributed import World
from nlgraph.train.models import build_learner, build_optimizer
from nlgraph.train.run import RunOptions, train_run
from nlgraph.train.trainer import TrainConfig, Trainer

TINY = dict(d=16, n_layers=1, heads=1, hidden=32)
ROOT = Path(__file__).resolve().parents[1]


def config(**kw) -> TrainConfig:
    base = dict(model="transformer", sizes=dict(TINY), steps=8, batch=4, seq=16, lr=1e-2,
                val_windows=2, eval_every=4, checkpoint_every=2)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def make(cfg: TrainConfig, docs: Path, run_dir: Path, world: World | None = None, **kw) -> Trainer:
    learner = build_learner(cfg.model, cfg.preset, cfg.sizes, cfg.seed)
    opt = build_optimizer(cfg.optimizer, learner.parameters(), cfg.lr)
    corpus = load_corpus(docs, cfg.seq)
    return Trainer(cfg, learner, opt, corpus, run_dir, log=lambda m: None, progress=False,
                   world=world, **kw)  # fmt: skip


def losses(history) -> list[float]:
    return [r["loss"] for r in history["train"]]


def test_resume_after_ctrl_c_reproduces_the_trajectory(docs, tmp_path):
    full = make(config(), docs, tmp_path / "full")
    full.run()

    def ctrl_c_at_5(t: Trainer) -> None:
        if t.step == 5:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag

    cut = make(config(), docs, tmp_path / "cut", on_step=ctrl_c_at_5)
    assert cut.run()["status"] == "interrupted" and cut.step == 5
    again = make(config(), docs, tmp_path / "cut")
    again.resume(ckpt.load(tmp_path / "cut" / "checkpoint.pt"))
    assert again.step == 5
    result = again.run()
    assert result["status"] == "done" and result["steps"] == 8
    assert losses(again.history) == losses(full.history)  # exactly, step by step
    assert again.history["val"] == full.history["val"]
    mine = again.learner.state_dict()
    for name, a in full.learner.state_dict().items():
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, mine[name]), name


KILL_SCRIPT = """
import sys, time
from nlgraph.train.run import RunOptions, train_run
from nlgraph.train.trainer import TrainConfig, Trainer
slow = Trainer._one_step
def one_step(self):
    if self.step >= 4:
        time.sleep(0.5)  # leave time to be killed after the step-4 checkpoint
    return slow(self)
Trainer._one_step = one_step
cfg = TrainConfig(model="transformer", sizes=dict(d=16, n_layers=1, heads=1, hidden=32),
                  steps=8, batch=4, seq=16, lr=1e-2, val_windows=2, eval_every=4,
                  checkpoint_every=2)
train_run(RunOptions(config=cfg, data=sys.argv[1], out=sys.argv[2], baselines=False,
                     auto_steps=False, progress=False))
"""


def test_resume_after_kill_reproduces_the_trajectory(docs, tmp_path):
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(docs), str(out)], env=env)
    path = out / "transformer" / "checkpoint.pt"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if path.is_file() and ckpt.load(path)["step"] >= 4:
                break
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no handler runs, nothing is flushed
    finally:
        proc.wait()
    saved = ckpt.load(path)
    assert 4 <= saved["step"] < 8 and saved["status"] == "running"
    opts = dict(data=str(docs), out=str(out), baselines=False, auto_steps=False, progress=False)
    torch.set_num_threads(1)
    resumed = train_run(RunOptions(config=config(), resume=True, **opts))
    full = train_run(RunOptions(config=config(), **{**opts, "out": str(tmp_path / "full")}))
    assert resumed["results"][0]["steps"] == 8
    assert losses(resumed["histories"]["transformer"]) == losses(full["histories"]["transformer"])


def test_nan_stops_names_the_level_and_keeps_the_checkpoint(docs, tmp_path):
    def poison(t: Trainer) -> None:
        if t.step == 4:  # after the step-4 checkpoint
            with torch.no_grad():
                t.learner.slow["block0__attn__W_q"].weight[0, 0] = float("nan")

    t = make(config(), docs, tmp_path, on_step=poison)
    with pytest.raises(NumericalFaultError) as info:
        t.run()
    msg = str(info.value)
    assert "step 5" in msg and "nan loss" in msg and "'block0.attn.W_q'" in msg
    assert "last good checkpoint (step 4," in msg and ") is kept" in msg and "\n" not in msg
    saved = ckpt.load(tmp_path / "checkpoint.pt")
    assert saved["step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if torch.is_tensor(v))


def test_nan_skip_skips_only_the_bad_step(docs, tmp_path, monkeypatch):
    real = trainer_mod.lm_loss
    calls = {"n": 0}

    def sometimes_nan(module, tokens):
        loss, state = real(module, tokens)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), state

    monkeypatch.setattr(trainer_mod, "lm_loss", sometimes_nan)
    logged = []
    t = make(config(on_nan="skip", eval_every=100), docs, tmp_path)
    t.log = logged.append
    result = t.run()
    assert result["status"] == "done" and result["skipped_steps"] == 1
    assert t.history["train"][2]["loss"] is None
    assert any("step 3" in m and "skipping" in m for m in logged)
    assert all(torch.isfinite(p).all() for p in t.learner.parameters())


def test_run_writes_table_json_csv_png(docs, tmp_path, capsys):
    cfg = config(steps=3, eval_every=3, sizes=dict(d=16, n_layers=1, heads=1))
    out = tmp_path / "out"
    report = train_run(RunOptions(config=cfg, data=str(docs), out=str(out), progress=False,
                                  auto_steps=False))  # fmt: skip
    names = [r["model"] for r in report["results"]]
    assert names == ["transformer", "titans_lm"]
    target, titans = (r["params"] for r in report["results"])
    assert abs(titans - target) / target < 0.05  # matched through hidden
    assert {r["tokens"] for r in report["results"]} == {3 * 4 * 16}
    for f in ("metrics.json", "metrics.csv", "loss.png", "results.md", "train.log"):
        assert (out / f).stat().st_size > 0, f
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["results"][0]["val_bpb"] == report["results"][0]["val_bpb"]
    assert "VmHWM" in saved["memory"] or "ru_maxrss" in saved["memory"]
    assert "| transformer |" in capsys.readouterr().out


# ------------------------------------------------------------------ data parallel
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_MODELS = {
    "transformer": dict(steps=4),
    # CMS blocks learn inside the forward from per-sequence gradients: no sync needed
    "hope_attention": dict(model="hope_attention", steps=2, batch=2,
                           sizes=dict(TINY, cms_chunks=(4, 8))),
}  # fmt: skip


def _worker(rank: int, world: int, port: int, docs: str, out: str, model: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = config(checkpoint_every=100, eval_every=100, **DDP_MODELS[model])
        t = make(cfg, Path(docs), Path(out), world=World(rank, world))
        t.run()
        if rank == 0:
            torch.save(t.learner.state_dict(), Path(out) / "final.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize(
    "model", ["transformer", pytest.param("hope_attention", marks=pytest.mark.slow)]
)
def test_two_processes_equal_one_with_the_same_global_batch(docs, tmp_path, model):
    cfg = config(checkpoint_every=100, eval_every=100, **DDP_MODELS[model])
    one = make(cfg, docs, tmp_path / "one")
    one.run()
    out = tmp_path / "two"
    args = (2, _free_port(), str(docs), str(out), model)
    torch.multiprocessing.spawn(_worker, args=args, nprocs=2)
    two = torch.load(out / "final.pt", weights_only=True)
    for name, a in one.learner.state_dict().items():
        if torch.is_tensor(a):
            # float32: the split batch sums in another order; Adam divides near-zero gradients
            # (bytes absent from the batch) by their own size, so rounding grows to ~1e-5,
            # still far below one step's change (lr = 1e-2)
            err = (a - two[name]).abs().max().item()
            assert err < 2e-4, (name, err)
    assert sorted(two) == sorted(one.learner.state_dict())
    # and it matters: rank 0's half of the batch alone ends elsewhere
    alone = make(config(**{**asdict(cfg), "batch": cfg.batch // 2}), docs, tmp_path / "half")
    alone.run()
    head = "top.slow.lm_head.weight"
    assert (alone.learner.state_dict()[head] - two[head]).abs().max() > 1e-3
