"""The peer of bench_hope.py: the community package ``nested-learning`` (0.2.0) at ``d256``.

Run with the peer's own environment (``bash benchmarks/peer_env.sh``), never nlgraph's:

    benchmarks/.peer-venv/bin/python benchmarks/peer_nested_learning.py [--seq 64] [--reps 1]

The model is the package's ``hope_selfmod`` variant (self-modifying Titans, then a CMS: the
paper's Hope block, Eqs. 94–97), built by its own ``build_model_from_cfg`` from its
``hope/pilot_selfmod`` config with the sizes of bench_hope's ``d256``: d=256, one block, vocab
256, self-modifying chunks 8 (k, v, eta, alpha) / 64 (the memory), memory width d (fixed by the
package), CMS hidden 4d (the package's default), CMS update periods 8 / 32 / 128 / 512
(``--cms``; the package's own default is 1 / 4 / 32 / 128), Titans momentum 0.9 (as nlgraph's
default). ``heads`` is set but unused: the package's self-modifying block has no heads.
Deviations from the package config, each so the step does the work nlgraph's does:
``surprise_threshold`` off (its gate of 0.02 would skip CMS writes whose teach signal is small),
no bf16 autocast, AdamW (lr 1e-3, weight decay 0.01, torch's defaults) instead of Muon, and
``online_updates`` off: with it on (the config's setting) the loop runs the same two passes on
successive windows of the fastest CMS period (8 tokens here, 64 windows per sequence) before one
AdamW step; that mode is not timed here.

Step kinds (float32, CPU, the kinds interleaved after one warm-up step each):

- ``full``: one training step as ``nested_learning.training.run_training_loop`` runs it with
  ``per_layer_teach_signal`` and no ``online_updates`` ("two-pass", stop-gradient writes):
  forward with block outputs, per-layer teach signals (``_compute_layer_teach_signals``),
  backward, gradient clipping, AdamW, then the no-grad update pass (``model(tokens,
  teach_signals=...)``: the self-modifying memories' chunked writes and the CMS levels' writes).
  The loop's body is inline in the package, so this calls the same functions in its order;
  ``--check`` runs the package's loop for one step and compares every parameter.
- ``read``: the same minus the teach signals and the update pass (forward, backward, clipping,
  AdamW). The package's differentiable forward reads every memory at its current weights, so
  this is its read path; no switch is needed.

The outer gradient never flows through a write here: the nearest nlgraph kind is
``first_order_teach``. Prints one JSON line: tokens/s per kind (median, min, max over
``--reps``), seconds, peak RSS after each kind's warm-up, parameters, versions, threads.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import resource
import statistics
import sys
import time

import torch
from nested_learning import training as nl_training
from nested_learning.config_utils import compose_config
from omegaconf import OmegaConf

D256 = dict(B=2, T=512, d=256, heads=4, vocab=256, chunk=8, chunk_mem=64, momentum=0.9)


def config(T: int, B: int, cms: list[int]):
    """The package's ``hope/pilot_selfmod`` config at bench_hope's ``d256`` sizes."""
    cfg = compose_config("hope/pilot_selfmod")
    levels = [{"name": f"cms_{i}", "update_period": p, "optimizer_key": "cms_opt"}
              for i, p in enumerate(cms)]  # fmt: skip
    overrides = {
        "model": {"vocab_size": D256["vocab"], "dim": D256["d"], "num_layers": 1,
                  "heads": D256["heads"], "cms_levels": levels,
                  "self_mod_chunk_size": D256["chunk"],
                  "self_mod_chunk_size_memory": D256["chunk_mem"],
                  "self_mod_momentum": D256["momentum"], "surprise_threshold": None},
        "train": {"online_updates": False, "per_layer_teach_signal": True, "device": "cpu",
                  "mixed_precision": {"enabled": False}, "steps": 1, "log_interval": 1,
                  "checkpoint": {"enable": False}, "seed": 0},
        "optim": {"type": "adamw", "lr": 1e-3, "weight_decay": 0.01},
        "data": {"source": "synthetic", "seq_len": T, "batch_size": B, "num_workers": 0},
        "logging": {"enabled": False},
    }  # fmt: skip
    OmegaConf.set_struct(cfg, False)
    return OmegaConf.merge(cfg, overrides)


def stepper(cfg, tokens: torch.Tensor, kind: str):
    """The model, its optimizer and a function running one ``kind`` step (returns seconds)."""
    torch.manual_seed(0)
    model = nl_training.build_model_from_cfg(cfg.model)
    opt = nl_training._build_optimizer(model, cfg, device=torch.device("cpu"))
    metric = model.get_surprise_metric()
    ce = torch.nn.functional.cross_entropy
    state = {"step": 0}

    def step() -> float:
        t0 = time.perf_counter()
        nl_training._apply_teach_schedule(model, cfg, state["step"])
        logits, _pre, outputs = model.forward_with_block_outputs(tokens)
        loss = ce(logits[:, :-1].reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
        surprise = nl_training._compute_surprise_override(
            metric, logits=logits, tokens=tokens, loss=loss, next_tokens=None
        )
        opt.zero_grad()
        if kind == "full":
            teach = nl_training._compute_layer_teach_signals(loss, outputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        opt.step()
        if kind == "full":
            with torch.no_grad():
                model(tokens, teach_signals=teach, surprise_value=surprise, fast_state=None)
                model.pop_update_metrics()
        state["step"] += 1
        return time.perf_counter() - t0

    return model, step


def check(cfg, tokens: torch.Tensor) -> float:
    """Max abs difference of every parameter after one ``full`` step here and one step of the
    package's own ``run_training_loop`` (same initial weights and batch)."""
    model, step = stepper(cfg, tokens, "full")
    step()
    built = {}
    saved = nl_training.build_model_from_cfg, nl_training.build_dataloader

    def build(model_cfg):
        torch.manual_seed(0)
        built["model"] = saved[0](model_cfg)
        return built["model"]

    nl_training.build_model_from_cfg = build
    nl_training.build_dataloader = lambda *a, **k: ([tokens], None)
    try:  # the loop's log lines go to stderr: stdout carries the JSON line only
        with contextlib.redirect_stdout(sys.stderr):
            nl_training.run_training_loop(cfg, device=torch.device("cpu"))
    finally:
        nl_training.build_model_from_cfg, nl_training.build_dataloader = saved
    theirs = built["model"].state_dict()
    return max((v - theirs[k]).abs().max().item() for k, v in model.state_dict().items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=D256["T"])
    ap.add_argument("--batch", type=int, default=D256["B"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cms", default="8,32,128,512", help="CMS update periods, fastest first")
    ap.add_argument("--kinds", default="read,full", help="lightest first (peak RSS order)")
    ap.add_argument("--check", action="store_true", help="compare with the package's own loop")
    args = ap.parse_args()
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    cms = [int(p) for p in args.cms.split(",")]
    cfg = config(args.seq, args.batch, cms)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, D256["vocab"], (args.batch, args.seq), generator=gen)
    out: dict = {"package": f"nested-learning {importlib.metadata.version('nested-learning')}",
                 "torch": torch.__version__, "threads": threads, "B": args.batch, "T": args.seq,
                 "cms_periods": cms, "reps": args.reps}  # fmt: skip
    if args.check:
        out["check_max_abs_diff"] = check(cfg, tokens)
    steps, kinds = {}, {}
    for kind in args.kinds.split(","):
        model, step = stepper(cfg, tokens, kind)
        step()  # warm-up
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        params = sum(p.numel() for p in model.parameters())
        kinds[kind] = {"params": params, "peak_rss_mb": rss}
        steps[kind] = step
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.reps):
        for kind, step in steps.items():
            times[kind].append(step())
    n = args.batch * args.seq
    for kind, ts in times.items():
        kinds[kind].update(median_s=statistics.median(ts), min_s=min(ts), max_s=max(ts),
                           tokens_per_s=n / statistics.median(ts),
                           tokens_per_s_range=[n / max(ts), n / min(ts)])  # fmt: skip
    out["params"] = next(iter(kinds.values()))["params"]
    out["kinds"] = kinds
    print(json.dumps(out))


if __name__ == "__main__":
    main()
