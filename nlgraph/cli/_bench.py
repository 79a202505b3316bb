"""``nlgraph bench``: time a compiled graph's forward and training step, per backend."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from nlgraph.cli._common import check_tokens, load_spec, width_bindings
from nlgraph.cli._compile import _random_inputs


def _time_backend(graph: Any, backend: str, args: argparse.Namespace) -> dict[str, float]:
    import torch

    from nlgraph.compiler import compile

    dims = dict(args.dim)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    learner = compile(graph, backend=backend, dtype=dtype, **width_bindings(graph, dims))
    inputs = _random_inputs(learner, (args.batch, args.seq), dims, dtype, args.seed)
    blocks = any(lp.lowering == "boundary" for lp in learner.plan.levels.values())

    def loss_fn(out, s, e):  # a fixed scalar of the outputs, so CMS blocks learn
        return sum(v[:, : e - s].float().square().mean() for v in out.values())

    signal = loss_fn if blocks else None

    def forward(writes: bool = True) -> None:
        with torch.no_grad():
            learner(inputs, None, signal, writes=writes)

    def step() -> None:
        learner.zero_grad(set_to_none=True)
        out, _ = learner(inputs, None, signal)
        loss = out.pop("loss", None)
        (loss_fn(out, 0, args.seq) if loss is None else loss).backward()

    times = {}
    for name, fn in (("forward", forward), ("train step", step),
                     ("read-only forward", lambda: forward(False))):  # fmt: skip
        fn()  # warm-up
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    return times


def _cmd_bench(args: argparse.Namespace) -> int:
    check_tokens(args.batch, args.seq)
    graph = load_spec(args.spec)
    rows = [(b, _time_backend(graph, b, args)) for b in args.backends.split(",")]
    base = rows[0][1]
    print(f"{graph.name}: batch {args.batch}, seq {args.seq}, {args.dtype}, "
          f"median of {args.repeats} after a warm-up; ratios against {rows[0][0]}")  # fmt: skip
    print(f"{'backend':10s} {'forward ms':>11s} {'train step ms':>14s} {'read-only ms':>13s}"
          f" {'fwd x':>7s} {'step x':>7s}")  # fmt: skip
    for backend, t in rows:
        print(
            f"{backend:10s} {t['forward'] * 1e3:11.2f} {t['train step'] * 1e3:14.2f} "
            f"{t['read-only forward'] * 1e3:13.2f} {base['forward'] / t['forward']:7.1f} "
            f"{base['train step'] / t['train step']:7.1f}"
        )
    return 0
