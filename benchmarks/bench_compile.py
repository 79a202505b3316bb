"""How long the library's language models take to build: planning, code generation and
parameter initialisation (``nlgraph.compiler.compile``), per preset, in one run.

Each model is built ``--reps`` times in turn (interleaved) in this process after one warm-up
build of each; the table gives the median and range in seconds, the parameter count and each
model's time against the Transformer's. Also tiny Hope at 2, 4, 6 and 8 layers, to show how
the build time grows with depth.

Run: python benchmarks/bench_compile.py [--preset small] [--out benchmarks/results/compile_cpu.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("transformer", "titans_lm", "hope_attention", "hope")


def build_seconds(name: str, **options: object) -> tuple[float, int]:
    from nlgraph.compiler import compile
    from nlgraph.library import get

    t0 = time.perf_counter()
    learner = compile(get(name, **options))
    seconds = time.perf_counter() - t0
    return seconds, sum(p.numel() for p in learner.parameters())


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    times: dict[str, list[float]] = {m: [] for m in MODELS}
    params: dict[str, int] = {}
    for m in MODELS:  # warm-up: imports, first allocations
        build_seconds(m, preset=args.preset)
    for _ in range(args.reps):
        for m in MODELS:
            seconds, params[m] = build_seconds(m, preset=args.preset)
            times[m].append(seconds)
    base = statistics.median(times["transformer"])
    lines = [
        "# Building the library's language models on CPU",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average after the run {os.getloadavg()[0]:.1f}",
        f"- `compile(get(name, preset={args.preset!r}))`: planning, code generation and "
        f"parameter initialisation; medians of {args.reps} interleaved builds after a warm-up",
        "",
        "| model | params | build s (median) | range | vs transformer |",
        "|---|---|---|---|---|",
    ]
    for m in MODELS:
        med = statistics.median(times[m])
        lines.append(f"| {m} | {params[m]:,} | {med:.2f} | {min(times[m]):.2f}–"
                     f"{max(times[m]):.2f} | {med / base:.1f}x |")  # fmt: skip
    lines += ["", "### Tiny Hope by depth", "", "| layers | build s |", "|---|---|"]
    for n in (2, 4, 6, 8):
        lines.append(f"| {n} | {build_seconds('hope', n_layers=n)[0]:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
