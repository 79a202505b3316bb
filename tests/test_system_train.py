"""``nlgraph train`` on a spec whose optimizer is inside it (docs/training.md): the graph's
optimizer levels train it (their state in the checkpoint), and ``--optimizer`` beside them is
refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import nlgraph as nl
from nlgraph.cli import main
from nlgraph.optim import GraphOptimizer

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def tiny_lm_with_momentum() -> nl.Graph:
    """Bytes -> embedding -> LM head; the weights follow a momentum of their gradients."""
    g = nl.Graph("tiny_lm_momentum")
    tokens = g.input("tokens", kind="tokens")
    table = nl.module("torch.nn:Embedding", num_embeddings=256, embedding_dim=8)
    embed = g.level("embed", state=table, frequency=nl.per_step(), objective=nl.outer())
    head = g.level("lm_head", state=nl.linear(8, 256), frequency=nl.per_step(),
                   objective=nl.outer())  # fmt: skip
    g.output("logits", head(embed(tokens)))
    w = g.level("w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
                optimizer=nl.follow(nl.state("m", at="new")))  # fmt: skip
    g.level("m", state=nl.like("w"), frequency=nl.per_step(), context=-w.grad(),
            objective=nl.dot(), optimizer=nl.gd(lr=0.05, retain=0.9))  # fmt: skip
    return g


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("sys")
    docs = folder / "docs"
    docs.mkdir()
    text = (ROOT / "nlgraph" / "train" / "trainer.py").read_text()
    for i in range(3):
        (docs / f"doc{i}.txt").write_text(text[i * 3000 : (i + 1) * 3000])
    return nl.save(tiny_lm_with_momentum(), folder / "lm.yaml"), docs


def _argv(spec: Path, docs: Path, out: Path, *extra: str) -> list[str]:
    run = ["--steps", "4", "--batch", "2", "--seq", "8", "--no-baselines", "--no-progress"]
    return ["train", "--model", str(spec), "--data", str(docs), "--out", str(out), *run, *extra]


def test_a_spec_with_optimizer_levels_trains_with_them(setup, tmp_path, monkeypatch):
    spec, docs = setup
    from nlgraph.train import run

    seen = []
    original = run.Trainer.__init__

    def spy(self, config, learner, optimizer, *a, **k):
        seen.append((config.optimizer, optimizer))
        original(self, config, learner, optimizer, *a, **k)

    monkeypatch.setattr(run.Trainer, "__init__", spy)
    out = tmp_path / "run"
    assert main(_argv(spec, docs, out)) == 0
    ((name, opt),) = seen
    assert name == "spec" and isinstance(opt, GraphOptimizer)
    assert [g["level"] for g in opt.param_groups] == ["w"]
    assert all("m" in s for s in opt.state.values()) and len(opt.state) == 2
    (path,) = out.rglob("checkpoint.pt")
    payload = torch.load(path, weights_only=False)
    assert payload["config"]["optimizer"] == "spec" and payload["step"] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["results"][0]["steps"] == 4


def test_optimizer_beside_the_specs_own_is_refused_in_one_line(setup, tmp_path, capsys):
    spec, docs = setup
    assert main(_argv(spec, docs, tmp_path / "run", "--optimizer", "adam")) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "declares its own optimizer levels (w, m); drop --optimizer" in err
