"""`nlgraph train --carry-state`: each row continues its text and fast state across steps, the
checkpoint holds the state, and a resumed run continues exactly (2N steps == N + resume + N)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from nlgraph.cli import main
from nlgraph.compiler.verify import flatten
from nlgraph.train import checkpoint as ckpt
from nlgraph.train.data import load_corpus, stream_batch_at
from nlgraph.train.errors import CheckpointError
from nlgraph.train.models import build_learner, build_optimizer
from nlgraph.train.trainer import TrainConfig, Trainer, lm_loss

ROOT = Path(__file__).resolve().parents[1]
HOPE = dict(d=16, n_layers=1, heads=1, hidden=32, chunk=4, chunk_mem=8, cms_chunks=(4, 8))


def config(**kw) -> TrainConfig:
    base = dict(model="hope", sizes=dict(HOPE), steps=6, batch=2, seq=12, lr=1e-2,
                val_windows=2, eval_every=3, checkpoint_every=2, carry_state=True)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def make(cfg: TrainConfig, docs: Path, run_dir: Path, **kw) -> Trainer:
    learner = build_learner(cfg.model, cfg.preset, cfg.sizes, cfg.seed)
    opt = build_optimizer(cfg.optimizer, learner.parameters(), cfg.lr)
    corpus = load_corpus(docs, cfg.seq)
    return Trainer(cfg, learner, opt, corpus, run_dir, log=lambda m: None, progress=False, **kw)


def leaves(x):
    return [v for _, v in flatten(x)]


def test_each_row_continues_its_text_and_the_ranks_split_the_rows():
    stream = torch.arange(1000)  # each byte names its position
    steps = [stream_batch_at(stream, i, 4, 16, seed=3) for i in range(70)]
    for a, b in zip(steps, steps[1:], strict=False):
        assert torch.equal(a[:, -1], b[:, 0])  # step i's last target is step i+1's first input
    row = torch.cat([s[:, :-1] for s in steps], dim=1)[0]
    start = int(row[0])
    assert torch.equal(row, stream[(start + torch.arange(len(row))) % len(stream)])  # wraps
    both = [stream_batch_at(stream, 5, 4, 16, 3, rank, 2) for rank in (0, 1)]
    assert torch.equal(torch.cat(both), steps[5])
    assert not torch.equal(stream_batch_at(stream, 5, 4, 16, seed=4), steps[5])


def test_the_fast_state_runs_on_across_steps(docs, tmp_path):
    t = make(config(steps=2, eval_every=100, checkpoint_every=100), docs, tmp_path)
    t.run()
    assert t.fast is not None
    assert not any(torch.is_tensor(x) and x.requires_grad for x in leaves(t.fast))  # TBPTT
    # step 3 from the carried state is what the trainer's state continues: compare with a
    # restart from the initial state on the same text
    tokens = stream_batch_at(t.corpus.train, 2, 2, 12, 0)
    with torch.no_grad():
        carried, _ = lm_loss(t.learner, tokens, t.fast)
        fresh, _ = lm_loss(t.learner, tokens, None)
    assert abs(float(carried) - float(fresh)) > 1e-6
    saved = ckpt.load(t.checkpoint_path)["fast_state"]
    assert sorted(saved) == sorted(t.fast)
    for a, b in zip(leaves(saved), leaves(t.fast), strict=True):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b
    # validation starts from the carried state (documented), not from the initial one
    carried_val = t.evaluate()
    t.fast = None
    assert abs(carried_val - t.evaluate()) > 1e-6


def test_resume_continues_the_stream_exactly(docs, tmp_path):
    full = make(config(), docs, tmp_path / "full")
    full.run()

    def ctrl_c_at_3(t: Trainer) -> None:
        if t.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the handler only sets a flag

    cut = make(config(), docs, tmp_path / "cut", on_step=ctrl_c_at_3)
    assert cut.run()["status"] == "interrupted" and cut.step == 3
    payload = ckpt.load(tmp_path / "cut" / "checkpoint.pt")
    again = make(config(), docs, tmp_path / "cut")
    again.resume(payload)
    again.run()
    assert [r["loss"] for r in again.history["train"]] == [r["loss"] for r in full.history["train"]]
    assert again.history["val"] == full.history["val"]
    mine = again.learner.state_dict()
    for name, a in full.learner.state_dict().items():
        if torch.is_tensor(a):
            assert torch.equal(a, mine[name]), name
    for a, b in zip(leaves(full.fast), leaves(again.fast), strict=True):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b
    # without the saved fast state the continuation would differ
    lost = make(config(), docs, tmp_path / "lost")
    lost.resume(payload)
    lost.fast = None
    lost.run()
    assert lost.history["train"][-1]["loss"] != full.history["train"][-1]["loss"]


def test_a_checkpoint_whose_fast_state_does_not_fit_is_refused(docs, tmp_path):
    t = make(config(steps=2, eval_every=100, checkpoint_every=100), docs, tmp_path / "a")
    t.run()
    payload = ckpt.load(t.checkpoint_path)
    payload["status"] = "running"
    level = sorted(payload["fast_state"])[0]
    other = make(config(steps=2), docs, tmp_path / "b")
    bad = dict(payload, fast_state={k: v for k, v in payload["fast_state"].items() if k != level})
    with pytest.raises(CheckpointError, match="not of this model's fast levels"):
        other.resume(bad)
    wide = make(config(steps=2, batch=4), docs, tmp_path / "c")
    with pytest.raises(CheckpointError, match="batch=2, not 4"):
        wide.resume(payload)  # the settings are compared first
    no_carry = make(config(steps=2, carry_state=False), docs, tmp_path / "d")
    with pytest.raises(CheckpointError, match="carry_state=True, not False"):
        no_carry.resume(payload)


def test_an_old_checkpoint_without_the_setting_resumes_without_carry(docs, tmp_path):
    t = make(config(steps=2, carry_state=False, eval_every=100), docs, tmp_path / "a")
    t.run()
    payload = ckpt.load(t.checkpoint_path)
    del payload["config"]["carry_state"]  # written before --carry-state existed
    payload["status"] = "running"
    make(config(steps=2, carry_state=False), docs, tmp_path / "b").resume(payload)
    with pytest.raises(CheckpointError, match="carry_state=False, not True"):
        make(config(steps=2), docs, tmp_path / "c").resume(payload)


def test_a_model_whose_state_grows_is_refused_in_one_line(docs, tmp_path, capsys):
    args = ["train", "--model", "hope", "--steps", "2", "--batch", "2", "--seq", "8",
            "--carry-state", "--no-progress", "--data", str(docs),
            "--out", str(tmp_path)]  # fmt: skip
    assert main(args) == 2  # the Transformer baseline keeps a growing key/value cache
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "--carry-state: model 'transformer'" in last and "--no-baselines" in last
    assert "Traceback" not in err


def test_the_flag_reaches_the_run_and_its_identity(docs, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "titans_lm", "--size", "tiny", "--steps", "2", "--batch", "2",
            "--seq", "8", "--carry-state", "--no-baselines", "--no-progress",
            "--data", str(docs), "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    saved = ckpt.load(out / "titans_lm" / "checkpoint.pt")
    assert saved["config"]["carry_state"] is True and saved["fast_state"]
    assert '"carry_state": true' in (out / "run.json").read_text()
    capsys.readouterr()
    without = [a for a in args if a != "--carry-state"]
    assert main([*without, "--resume"]) == 2
    assert "carry_state True there, False here" in capsys.readouterr().err
