"""Where a Hope training step spends its time on CPU, and whether the CMS boundary update matters.

Times one training step of Hope (by default the library's tiny Hope with every write on:
self-modifying Titans clusters, CMS blocks learning in the sequence, meta-gradients through the
writes; ``--shape``/``--kind`` take a shape and a step kind of ``bench_hope.py``) and splits its
wall time into regions by wrapping the runtime's entry points with timers:

- ``cluster reads``: the self-modifying Titans window programs (every member's read at its
  chunk-start state: keys, values, rates, the memory's read-out);
- ``cluster inner errors``: each member's inner objective's error at its chunk-start state (its
  own forward on its keys, backpropagated to every layer's output);
- ``cluster inner step``: the members' inner optimizer over each window (the momentum-memory or
  linear-memory kernel: the new weights and momentum);
- ``clusters, rest``: the rest of the clusters (gates, stacking, bookkeeping);
- ``cms teach schedule``: a teach signal's per-block chunk updates (``teach.schedule``);
- ``cms inner gradient``: each piece's gradient of the outer loss w.r.t. the blocks' parameters
  (``torch.autograd.grad`` with ``create_graph``) and its accumulation;
- ``cms boundary update``: the rule chain applied at chunk ends (``apply_rules``; the element-wise
  update a fused kernel would replace);
- ``rest of forward``: everything else of the forward (embeddings, projections, block reads);
- ``outer backward``: ``loss.backward()`` through all of it.

The regions nest (the clusters run inside each piece's forward), so each is reported exclusive of
the ones inside it. One warm-up step, then ``--reps`` steps; the one of median time is reported.
One thread by default.

    python benchmarks/profile_hope.py [--batch 8] [--seq 128] [--out benchmarks/results/...]
    python benchmarks/profile_hope.py --shape d256 --kind first_order_teach --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_hope import KINDS, OPTIONS, RECOMPUTE, SHAPES  # noqa: E402

from nlgraph.compiler import compile as compile_graph  # noqa: E402
from nlgraph.compiler import runtime  # noqa: E402
from nlgraph.compiler.lowerings import boundary, cluster, teach  # noqa: E402
from nlgraph.library import get  # noqa: E402
from nlgraph.train.trainer import next_token_loss, recompute_layers  # noqa: E402


class Timers:
    """Exclusive wall time per region: a region's time excludes the regions opened inside it."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []  # [name, start, time spent in children]

    @contextmanager
    def region(self, name: str):
        self.stack.append([name, time.perf_counter(), 0.0])
        try:
            yield
        finally:
            n, t0, inner = self.stack.pop()
            spent = time.perf_counter() - t0
            self.total[n] += spent - inner
            if self.stack:
                self.stack[-1][2] += spent

    def wrap(self, module, attr: str, name: str) -> None:
        fn = getattr(module, attr)

        def timed(*args, **kwargs):
            with self.region(name):
                return fn(*args, **kwargs)

        setattr(module, attr, timed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default=None,
        help="a shape of bench_hope.py (default: the library's hope, B=8, T=128)",
    )
    ap.add_argument("--kind", choices=KINDS, default="full", help="a step kind of bench_hope.py")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = SHAPES.get(args.shape, {"B": 8, "T": 128, "build": {}})
    batch, seq = args.batch or shape["B"], args.seq or shape["T"]

    timers = Timers()
    # The lowerings call these through the module attributes wrapped here, so every call the
    # learner makes is timed.
    timers.wrap(cluster, "run_cluster", "clusters, rest")
    timers.wrap(cluster, "_window", "cluster reads")
    timers.wrap(cluster, "_layer_errors", "cluster inner errors")
    timers.wrap(cluster, "momentum_memory", "cluster inner step")
    timers.wrap(cluster, "linear_memory", "cluster inner step")
    timers.wrap(teach, "schedule", "cms teach schedule")
    timers.wrap(boundary, "apply_rules", "cms boundary update")
    timers.wrap(boundary, "accumulate_and_update", "cms inner gradient")
    assert runtime.boundary is boundary and runtime.teach is teach

    learner = compile_graph(get("hope", **shape["build"], **OPTIONS[args.kind]))
    if args.kind in RECOMPUTE:
        recompute_layers(learner)
    writes = args.kind != "read_only"
    vocab = learner.slow["embed"].num_embeddings
    tokens = torch.randint(0, vocab, (batch, seq + 1))
    inputs = {"tokens": tokens[:, :-1]}
    loss_fn = next_token_loss(tokens)

    def step() -> dict[str, float]:
        timers.total.clear()
        learner.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with timers.region("rest of forward"):
            out, _ = learner(inputs, None, loss_fn=loss_fn, writes=writes)
        with timers.region("outer backward"):
            out["loss"].backward()
        return {"step": time.perf_counter() - t0, **timers.total}

    step()  # warm-up
    runs = [step() for _ in range(args.reps)]
    names = ["cluster reads", "cluster inner errors", "cluster inner step", "clusters, rest",
             "cms teach schedule", "cms inner gradient", "cms boundary update", "rest of forward",
             "outer backward"]  # fmt: skip
    # the run whose step time is the median, so that its regions add up to its step
    med = sorted(runs, key=lambda r: r["step"])[len(runs) // 2]
    med = {n: med.get(n, 0.0) for n in ["step", *names]}
    names.append("other (zero_grad, timers)")
    med[names[-1]] = med["step"] - sum(med[n] for n in names[:-1])
    lines = [
        "# Hope training step on CPU: where the time goes",
        "",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), load (1 min) {os.getloadavg()[0]:.2f}",
        f"- model: library `hope` ({args.shape or 'defaults'}), kind {args.kind} "
        f"(bench_hope.py), batch {batch}, T={seq}, float32; the step of median time among "
        f"{args.reps} after one warm-up",
        f"- produced by `python benchmarks/profile_hope.py {' '.join(sys.argv[1:])}`",
        "",
        "| region | ms | share of the step |",
        "|---|---:|---:|",
    ]
    for n in names:
        lines.append(f"| {n} | {med[n] * 1e3:.1f} | {100 * med[n] / med['step']:.1f} % |")
    lines.append(f"| **step** | {med['step'] * 1e3:.1f} | 100 % |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
