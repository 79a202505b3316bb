"""One optimizer step on ~10M parameters of mixed shapes (CPU): nlgraph's compiled Adam against
torch.optim.Adam with foreach and with fused, as ratios measured in one run.

Run: python benchmarks/bench_optim.py [--quick] [--out benchmarks/results/optim_cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

from nlgraph.library import builder
from nlgraph.optim import compile_optimizer


def make_params(scale: float, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(1024, 1024)] * 8 + [(1024, 4096)] * 2 + [(4096,)] * 4 + [(1024,)] * 16
    shapes = [tuple(max(1, int(d * scale)) for d in s) for s in shapes]
    ps = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps


def time_steps(opt: torch.optim.Optimizer, reps: int) -> float:
    opt.step()  # warm-up: state allocation
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check(steps: int = 20) -> float:
    """Max relative difference to torch's Adam after ``steps`` steps (small problem, float64)."""
    cls = compile_optimizer(builder("adam"))
    a = [p.detach().double().requires_grad_() for p in make_params(0.05)]
    b = [p.detach().clone().requires_grad_() for p in a]
    oa, ob = cls(a, lr=1e-3), torch.optim.Adam(b, lr=1e-3, foreach=True)
    for i in range(steps):
        for p, q in zip(a, b, strict=True):
            p.grad = torch.sin(p.detach() * (i + 1))
            q.grad = p.grad.clone()
        oa.step()
        ob.step()
    return max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(a, b, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    err = check()
    if err > 1e-10:
        raise SystemExit(f"refusing to report speed: nlgraph Adam differs from torch by {err:.2e}")
    scale = 0.05 if args.quick else 1.0
    n = sum(p.numel() for p in make_params(scale))
    cls = compile_optimizer(builder("adam"))
    rows = []
    for label, make in [
        ("torch.optim.Adam(foreach=True)", lambda ps: torch.optim.Adam(ps, foreach=True)),
        ("torch.optim.Adam(fused=True)", lambda ps: torch.optim.Adam(ps, fused=True)),
        ("nlgraph Adam (compiled graph)", lambda ps: cls(ps)),
    ]:
        rows.append((label, time_steps(make(make_params(scale)), 3 if args.quick else args.reps)))
    best_torch = min(t for label, t in rows if label.startswith("torch"))
    lines = [
        f"# Optimizer step, {n / 1e6:.1f}M parameters of mixed shapes (CPU, float32)",
        "",
        f"- date: {datetime.date.today()}; machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}",
        f"- correctness first: nlgraph Adam vs torch Adam after 20 steps, max rel. diff {err:.1e}",
        "",
        "| optimizer | median step (ms) | ratio to torch's fastest |",
        "|---|---|---|",
    ]
    lines += [f"| {label} | {t * 1e3:.2f} | {t / best_torch:.2f} |" for label, t in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
