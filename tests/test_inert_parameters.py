"""Inert parameters: those a call of T tokens gives no gradient are found by a probe, reported by
`nlgraph train` in one warning line, and do not break DDP (2 processes equal one)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

from nlgraph._errors import CompileError
from nlgraph.compiler import compile
from nlgraph.library import get
from nlgraph.train.data import load_corpus
from nlgraph.train.distributed import World
from nlgraph.train.models import build_learner, build_optimizer
from nlgraph.train.streams import inert_report
from nlgraph.train.trainer import TrainConfig, Trainer, lm_loss

ROOT = Path(__file__).resolve().parents[1]
# chunk_mem=8: a sequence of T <= 8 never reads a write of the self-modifying memories
HOPE = dict(d=16, n_layers=1, heads=1, hidden=32, chunk=4, chunk_mem=8, cms_chunks=(4, 8))
WRITE_PATH = {"block0.titans.W_eta", "block0.titans.W_alpha", "block0.titans.M_k",
              "block0.titans.M_v", "block0.titans.M_eta", "block0.titans.M_alpha"}  # fmt: skip


def hope(**kw):
    torch.manual_seed(0)
    return compile(get("hope", vocab=32, **{**HOPE, **kw}))


def no_grad_after_step(learner, T: int) -> set[str]:
    """What a real training step leaves without a gradient (the truth the probe must match)."""
    learner.zero_grad(set_to_none=True)
    tokens = torch.randint(32, (2, T + 1), generator=torch.Generator().manual_seed(3))
    loss, _ = lm_loss(learner, tokens)
    loss.backward()
    out = {n for n, p in learner.named_parameters() if p.grad is None}
    learner.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("T", [1, 5, 8, 9, 13])
def test_the_probe_names_exactly_what_a_step_leaves_without_gradient(T):
    learner = hope()
    found = learner.inert_parameters(T, outputs=("logits",))
    names = {p for ps in found.values() for p in ps}
    assert names == no_grad_after_step(learner, T)
    if T <= 8:  # the whole write path of the self-modifying memories, by level
        assert set(found) == WRITE_PATH
        assert found["block0.titans.M_k"] == [
            "layers.block0.clusters.0.members.block0__titans__M_k.initial.W1",
            "layers.block0.clusters.0.members.block0__titans__M_k.initial.W2",
        ]
    else:
        assert found == {}
    assert all(p.grad is None for p in learner.parameters())  # the probe leaves .grad alone


def test_first_order_writes_leave_the_write_path_without_gradient_at_any_length():
    learner = hope(meta="first_order")
    found = learner.inert_parameters(24, outputs=("logits",))
    assert set(found) == WRITE_PATH
    names = {p for ps in found.values() for p in ps}
    assert names == no_grad_after_step(learner, 24)


def test_the_probe_draws_nothing_from_the_global_rng():
    learner = hope()
    torch.manual_seed(5)
    learner.inert_parameters(8)
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(1))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_a_bad_length_is_refused(bad):
    with pytest.raises(CompileError, match="seq_len must be a positive int"):
        hope().inert_parameters(bad)


def test_an_unknown_output_is_refused():
    with pytest.raises(CompileError, match="has outputs"):
        hope().inert_parameters(4, outputs=("nope",))


def test_the_warning_names_levels_and_tensors():
    learner = build_learner("hope", "tiny", HOPE, 0)
    lines = inert_report(learner, 8, carry=False).lines("hope", 8)
    assert len(lines) == 1
    line = lines[0]
    assert line.startswith("warning: hope: 10 parameters of 6 levels get no gradient")
    assert "--seq 8" in line and "block0.titans.W_alpha (weight)" in line
    assert "block0.titans.M_k (W1, W2)" in line and "\n" not in line
    assert inert_report(learner, 9, carry=False).lines("hope", 9) == []
    # a run with the default hope at --seq 16 <= chunk_mem prints it at the start
    tiny = build_learner("hope", "tiny", {}, 0)
    (line,) = inert_report(tiny, 16, carry=False).lines("hope", 16)
    assert "20 parameters of 12 levels" in line and "block1.titans.W_eta (weight)" in line


def test_train_prints_one_warning_line_at_the_start(tmp_path, docs):
    logged = []
    cfg = TrainConfig(model="hope", sizes=dict(HOPE), steps=1, batch=2, seq=8, lr=1e-2,
                      val_windows=1, eval_every=100, checkpoint_every=100)  # fmt: skip
    t = make(cfg, docs, tmp_path)
    t.log = logged.append
    t.run()
    warned = [m for m in logged if "get no gradient" in m]
    assert len(warned) == 1 and warned[0].startswith("warning: hope:")
    for name in no_grad_after_step(t.learner, 8):  # untouched by the optimizer
        assert name in {n for ps in t.inert.first.values() for n in ps}


# ------------------------------------------------------------------ DDP
def make(cfg: TrainConfig, docs: Path, run_dir: Path, world: World | None = None) -> Trainer:
    learner = build_learner(cfg.model, cfg.preset, cfg.sizes, cfg.seed)
    opt = build_optimizer(cfg.optimizer, learner.parameters(), cfg.lr)
    corpus = load_corpus(docs, cfg.seq)
    return Trainer(cfg, learner, opt, corpus, run_dir, log=lambda m: None, progress=False,
                   world=world)  # fmt: skip


def ddp_config(**kw) -> TrainConfig:
    base = dict(model="hope", sizes=dict(HOPE), steps=3, batch=2, seq=8, lr=1e-2,
                val_windows=1, eval_every=100, checkpoint_every=100)  # fmt: skip
    return TrainConfig(**{**base, **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, docs: str, out: str, carry: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        t = make(ddp_config(carry_state=carry), Path(docs), Path(out), world=World(rank, world))
        t.run()  # without the probe, DDP stops at step 2: parameters without gradient
        if rank == 0:
            torch.save(t.learner.state_dict(), Path(out) / "final.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("carry", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_hope_at_a_length_within_chunk_mem_trains_under_two_processes(docs, tmp_path, carry):
    one = make(ddp_config(carry_state=carry), docs, tmp_path / "one")
    assert one.inert.any
    start = {n: p.detach().clone() for n, p in one.learner.named_parameters()}
    one.run()
    out = tmp_path / "two"
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(docs), str(out), carry),
                                nprocs=2)  # fmt: skip
    two = torch.load(out / "final.pt", weights_only=True)
    assert sorted(two) == sorted(one.learner.state_dict())  # the checkpoint holds every one
    for name, a in one.learner.state_dict().items():
        if torch.is_tensor(a):
            err = (a - two[name]).abs().max().item()
            assert err < 2e-4, (name, err)
    inert = {p for ps in one.inert.first.values() for p in ps}
    for name in inert:  # never stepped, on one process or two
        assert torch.equal(two[name], start[name]), name
