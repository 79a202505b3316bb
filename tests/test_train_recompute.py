"""``nlgraph train --recompute``: every layer recomputed in the backward, and with exact CMS
rules every piece between two CMS ticks (``recompute_pieces``), trains the same weights (same
steps, same data, same seed) without a warning."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from nlgraph.train.data import load_corpus
from nlgraph.train.models import build_learner, build_optimizer
from nlgraph.train.trainer import TrainConfig, Trainer

SIZES = dict(d=16, n_layers=2, heads=1, hidden=32, chunk=4, chunk_mem=8, cms_chunks=(4, 8))


def trained(docs: Path, run_dir: Path, recompute: bool, **kw) -> tuple[dict, list[str]]:
    cfg = TrainConfig(model="hope", sizes={**SIZES, **kw}, steps=2, batch=2, seq=16, lr=1e-2,
                      val_windows=1, eval_every=100, checkpoint_every=100,
                      recompute=recompute)  # fmt: skip
    # float64: the kept-graph step sums a chunk's gradient as one product of its factors, the
    # sweep piece by piece; in float32 the rounding of that order, in gradients near zero, is
    # what Adam's normalisation amplifies. The comparison is of the math, tighter in float64.
    learner = build_learner(cfg.model, cfg.preset, cfg.sizes, cfg.seed).double()
    opt = build_optimizer(cfg.optimizer, learner.parameters(), cfg.lr)
    logged: list[str] = []
    t = Trainer(cfg, learner, opt, load_corpus(docs, cfg.seq), run_dir, log=logged.append,
                progress=False)  # fmt: skip
    assert all(layer.checkpoint == recompute for layer in learner.layers.values())
    assert learner.recompute_pieces == (recompute and not kw)  # exact rules: the sweep too
    t.run()
    return {n: p.detach().clone() for n, p in learner.named_parameters()}, logged


@pytest.mark.parametrize("kw", [{}, {"meta": "first_order", "cms_signal": "teach"}], ids=str)
def test_recompute_trains_the_same_weights(docs, tmp_path, kw):
    kept, _ = trained(docs, tmp_path / "kept", False, **kw)
    again, logged = trained(docs, tmp_path / "again", True, **kw)
    for name, w in kept.items():
        torch.testing.assert_close(again[name], w, rtol=1e-9, atol=1e-10, msg=name)
    assert [m for m in logged if "--recompute" in m] == []


def test_recompute_is_a_flag_of_train():
    from nlgraph.train.cli import add_train_parser, options_from_args

    def config(*argv: str) -> TrainConfig:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        add_train_parser(sub, lambda name, help: sub.add_parser(name, help=help))
        return options_from_args(parser.parse_args(["train", *argv])).config

    assert config("--recompute").recompute and not config().recompute
