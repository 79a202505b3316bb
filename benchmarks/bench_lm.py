"""Training throughput of the tiny language models on CPU, and the cost of in-context writes.

For each model (tiny Hope, Titans, Transformer; batch 8, T=512 by default) it measures, in one
run: a training step (forward with every write on — self-modifying memories, CMS levels — the
backward through the writes, an AdamW step) in tokens/s; the same model's read-only training
step (``writes=False``: every memory read at its initial state, nothing updates) and read-only
forward; and peak resident memory (each model runs in its own process). Before timing it checks
chunked against reference on a small batch and refuses to report speed if they differ.

Run: python benchmarks/bench_lm.py [--quick] [--out benchmarks/results/lm_cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time

MODELS = ("hope", "titans_lm", "transformer")


def one(name: str, B: int, T: int, reps: int) -> dict:
    import torch

    from nlgraph.compiler import compile
    from nlgraph.library import get
    from nlgraph.train.trainer import next_token_loss

    torch.manual_seed(0)
    learner = compile(get(name))
    vocab = learner.slow["embed"].num_embeddings
    # correctness first: chunked equals the reference loops on a small batch (float64)
    small = compile(get(name), dtype=torch.float64)
    probe = torch.randint(0, vocab, (2, 24))
    with torch.no_grad():
        small.backend = "chunk"
        a = small({"tokens": probe}, None, loss_fn=next_token_loss(probe))[0]["loss"]
        small.backend = "reference"
        b = small({"tokens": probe}, None, loss_fn=next_token_loss(probe))[0]["loss"]
    err = abs(a.item() - b.item()) / abs(b.item())
    if err > 1e-9:
        raise SystemExit(f"{name}: chunked differs from the reference by {err:.1e}; no timing")
    opt = torch.optim.AdamW(learner.parameters(), lr=1e-3)
    tokens = torch.randint(0, vocab, (B, T))

    def step(writes: bool) -> float:
        t0 = time.perf_counter()
        out, _ = learner({"tokens": tokens}, None, loss_fn=next_token_loss(tokens), writes=writes)
        loss = out["loss"] if "loss" in out else next_token_loss(tokens)(out, 0, T)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def forward_read_only() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            learner({"tokens": tokens}, writes=False)
        return time.perf_counter() - t0

    def median(fn, *a):
        fn(*a)  # warm-up
        return sorted(fn(*a) for _ in range(reps))[reps // 2]

    train = median(step, True)
    train_ro = median(step, False)
    fwd_ro = median(forward_read_only)
    return {
        "model": name,
        "params": sum(p.numel() for p in learner.parameters()),
        "check": err,
        "train_s": train,
        "tokens_per_s": B * T / train,
        "train_read_only_s": train_ro,
        "forward_read_only_s": fwd_ro,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="batch 2, T=64, one repeat")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    B, T, reps = (2, 64, 1) if args.quick else (8, 512, 3)
    B, T, reps = args.batch or B, args.seq or T, args.reps or reps
    if args.one:
        print(json.dumps(one(args.one, B, T, reps)))
        return
    rows = []
    for name in args.models.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--batch", str(B), "--seq", str(T),
               "--reps", str(reps)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            raise SystemExit(res.stderr.strip().splitlines()[-1])
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    import torch

    load = os.getloadavg()[0]
    lines = [
        f"# Tiny language models on CPU: training throughput and the cost of writes (B={B}, T={T})",
        "",
        f"- date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average after the "
        f"run {load:.1f}",
        "- train step = forward with every write on + backward through the writes + AdamW; "
        "read-only = `writes=False` (memories read at their initial state, CMS frozen)",
        "- each model ran in its own process (peak RSS); medians of "
        f"{reps} after a warm-up; chunked vs reference checked first (rel. diff in the table)",
        "",
        "| model | params | train step (s) | tokens/s | read-only step (s) | write cost "
        "(step / read-only step) | read-only fwd (s) | peak RSS (MB) | check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['train_s']:.3f} | {r['tokens_per_s']:.0f} | "
            f"{r['train_read_only_s']:.3f} | {r['train_s'] / r['train_read_only_s']:.1f}x | "
            f"{r['forward_read_only_s']:.3f} | {r['peak_rss_mb']:.0f} | {r['check']:.0e} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
