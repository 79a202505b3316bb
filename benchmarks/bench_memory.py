"""Memory per token of a training step of the library's "small" LMs on CPU: peak RSS of one
forward and backward at batch 1 and several lengths T, each in a fresh process.

Per model and mode the table gives the process's peak RSS at each T, the RSS before the step
(the model's parameters, built and resident) and the growth per token between the two longest
lengths that ran, (peak(T2) - peak(T1)) / (T2 - T1): what a longer sequence costs. The modes:
each layer's intermediates kept (``keep``) or recomputed in the backward (``recompute``,
``layer.checkpoint = True``), and for Hope its exact rules (meta-gradients through every
write) and first-order writes with the teach signal (``meta="first_order", cms_signal="teach"``).
A run past ``--cap-gb`` of address space stops with an allocation error and shows as such.

Peak RSS on CPU depends on the allocator as much as on what the step keeps: glibc serves
tensors below its (dynamic) mmap threshold from heaps it rarely gives back, so freed tensors of
one layer's recompute stay resident. ``--mmap-threshold BYTES`` runs the children with
``MALLOC_MMAP_THRESHOLD_`` fixed, so every larger tensor is returned when freed: the peak then
measures what the step holds (and the step is slower: every large allocation is fresh pages).

Run: python benchmarks/bench_memory.py [--seq 64 256 1024] [--out benchmarks/results/memory_cpu.md]
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (label, model, options of get, recompute each layer)
RUNS = (
    ("transformer", "transformer", {}, False),
    ("titans_lm", "titans_lm", {}, False),
    ("titans_lm, recompute", "titans_lm", {}, True),
    ("hope exact", "hope", {}, False),
    ("hope exact, recompute", "hope", {}, True),
    ("hope first-order teach", "hope", {"meta": "first_order", "cms_signal": "teach"}, False),
    ("hope first-order teach, recompute", "hope",
     {"meta": "first_order", "cms_signal": "teach"}, True),
)  # fmt: skip


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(
    model: str, options: dict, recompute: bool, T: int, preset: str, sweep_states: int | None
) -> dict:
    """One forward and backward at batch 1 in this process: peak RSS before and after."""
    import torch
    from torch.nn import functional as F

    from nlgraph.compiler import compile
    from nlgraph.library import get
    from nlgraph.train.trainer import recompute_layers

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    torch.manual_seed(0)
    learner = compile(get(model, preset=preset, **options))
    if recompute:  # what `nlgraph train --recompute` does: layers, and exact CMS pieces
        recompute_layers(learner)
        learner.sweep_states = sweep_states
    vocab = learner.top.slow["embed"].weight.shape[0]
    x = torch.randint(0, vocab, (1, T + 1))
    inputs, targets = x[:, :-1], x[:, 1:]

    def loss_fn(out: dict, start: int, end: int) -> torch.Tensor:
        logits = out["logits"][:, out["logits"].shape[1] - (end - start) :]
        flat = logits.reshape(-1, logits.shape[-1])
        return F.cross_entropy(flat, targets[:, start:end].reshape(-1), reduction="sum")

    # the gradients' memory is the parameters' again, before the step: count it as the model's
    for p in learner.parameters():
        p.grad = torch.zeros_like(p)
    before = _rss_mb()
    t0 = time.perf_counter()
    out, state = learner(inputs, loss_fn=loss_fn)
    del state  # a training step that does not carry its fast state on
    (out["loss"] / T).backward()
    seconds = time.perf_counter() - t0
    params = sum(p.numel() for p in learner.parameters())
    return {"before_mb": before, "peak_mb": _rss_mb(), "seconds": seconds, "params": params}


def _sub(args: list[str], cap_gb: float, mmap_threshold: int | None) -> dict:
    def limit() -> None:
        cap = int(cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         check=False, preexec_fn=limit, env=env)  # fmt: skip
    if res.returncode:
        if "can't allocate memory" in res.stderr or res.returncode == -9:
            return {"error": f"out of memory (cap {cap_gb:g} GB)"}
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {res.returncode}: {tail[:160]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _slope(row: dict, seqs: list[int]) -> str:
    ran = [T for T in seqs if "peak_mb" in row[T]]
    if len(ran) < 2:
        return "—"
    t1, t2 = ran[-2], ran[-1]
    return f"{(row[t2]['peak_mb'] - row[t1]['peak_mb']) / (t2 - t1):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seq", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--cap-gb", type=float, default=20.0, help="address-space cap per run")
    ap.add_argument("--only", nargs="*", default=None, help="labels of RUNS to run")
    ap.add_argument("--sweep-states", type=int, default=None,
                    help="most piece states an exact learner's recompute keeps")  # fmt: skip
    ap.add_argument("--mmap-threshold", type=int, default=None, help="MALLOC_MMAP_THRESHOLD_")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process's run
    args = ap.parse_args()
    if args.one:
        model, options, recompute, T = json.loads(args.one)
        print(json.dumps(one(model, options, recompute, T, args.preset, args.sweep_states)))
        return
    import torch

    seqs = sorted(args.seq)
    runs = [r for r in RUNS if args.only is None or r[0] in args.only]
    table: dict[str, dict] = {}
    sweep = ["--sweep-states", str(args.sweep_states)] if args.sweep_states else []
    for label, model, options, recompute in runs:
        table[label] = {}
        for T in seqs:
            spec = json.dumps([model, options, recompute, T])
            table[label][T] = r = _sub(
                ["--one", spec, "--preset", args.preset, *sweep], args.cap_gb, args.mmap_threshold
            )
            print(label, T, r, file=sys.stderr, flush=True)
            if "error" in r:  # a longer one would not fit either
                break
        for T in seqs:
            table[label].setdefault(T, {"error": "not run (a shorter one did not fit)"})
    lines = [
        f"# Memory of a training step of the {args.preset!r} LMs on CPU",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB; torch "
        f"{torch.__version__}, {os.environ.get('BENCH_THREADS', '2')} threads",
        f"- one forward and backward at B=1, float32, each in a fresh process capped at "
        f"{args.cap_gb:g} GB of address space; peak RSS in MB (`ru_maxrss`), the step's "
        "seconds in brackets; 'model' is the RSS before the step (parameters and zeroed "
        "gradients); MB/token is the growth between the two longest lengths that ran",
        "- allocator: glibc malloc, "
        + (
            "default settings"
            if args.mmap_threshold is None
            else f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}"
        ),
        "- exact CMS learners recompute their pieces (`recompute_pieces`) keeping "
        + (
            "log2(pieces) + 1 states at most (bisection)"
            if args.sweep_states is None
            else f"at most {args.sweep_states} piece states (`sweep_states`)"
        ),
        "",
        "| run | params | model MB | " + " | ".join(f"T={T}" for T in seqs) + " | MB/token |",
        "|---|---|---|" + "---|" * len(seqs) + "---|",
    ]
    for label, row in table.items():
        ok = [row[T] for T in seqs if "peak_mb" in row[T]]
        params = f"{ok[0]['params'] / 1e6:.1f}M" if ok else "—"
        model_mb = f"{ok[0]['before_mb']:.0f}" if ok else "—"
        cells = [
            f"{row[T]['peak_mb']:.0f} ({row[T]['seconds']:.0f} s)" if "peak_mb" in row[T]
            else row[T]["error"].replace("|", "/")
            for T in seqs
        ]  # fmt: skip
        lines.append(f"| {label} | {params} | {model_mb} | " + " | ".join(cells)
                     + f" | {_slope(row, seqs)} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
