"""Hope's training step on CPU: how far the writes are from their arithmetic.

At two shapes — ``d256`` (B=2, T=512, d=256, one Hope block, 4 heads, vocab 256, self-modifying
Titans chunks 8 / 64, CMS periods 8 / 32 / 128 / 512, hidden 4d, memory width d) and ``tiny``
(the library's tiny Hope, B=8, T=512) — it measures in one run, per step kind:

- ``full``: forward with every write on (self-modifying memories, CMS levels), the backward
  through the writes (meta-gradients), an AdamW step;
- ``first_order``: the same writes without their autograd graph (``hope(meta="first_order")``:
  every update a constant increment to the outer gradient);
- ``teach``: the full step with the CMS blocks' chunk gradients from the teach signal
  (``hope(cms_signal="teach")``: one first pass with the blocks fixed instead of one pass per
  CMS tick; an approximation, docs/compiler.md);
- ``first_order_teach``: both (the two-pass step of community implementations);
- ``full_recompute``: the full step as ``nlgraph train --recompute`` runs it: each layer and
  each piece between two CMS ticks recomputed in the backward (``compiler.sweep``), the same
  gradients in less memory;
  a kind whose options the library lacks is reported as unavailable;
- ``read_only``: ``writes=False`` (every memory read at its initial state, nothing updates) —
  the same network as a fixed model, the baseline of the write cost.

For each: seconds per step (median and range of the repeats, the kinds interleaved), tokens/s,
FLOPs per step (``torch.utils.flop_counter``, forward and backward, inner gradients included),
achieved FLOP/s, and the peak resident memory after the kind's warm-up (each shape runs in its
own process, read-only first, so each kind's high-water mark includes only what ran before it;
the FLOPs are counted after the timed repeats).
Then the peak memory of the full (kept and recomputed) and the first-order teach steps at
T = 512, 1024 and 2048
(d256, one process each, capped at ``--mem-cap`` GB of address space; a run that exceeds it is
reported as such).

Before timing, each shape's chunked learner is checked against the reference loops (float64,
B=2, T=17: outputs, final states and every gradient, ``nlgraph.compiler.verify``); a mismatch
above 1e-10 stops the run with no figures.

``--peer PYTHON`` (optional) also times the community package ``nested-learning`` (0.2.0) at
``d256``, in the same run, after nlgraph's kinds and with the same B, T and repeats: PYTHON is
the interpreter of its own environment (``bash benchmarks/peer_env.sh`` builds
``benchmarks/.peer-venv``), which runs ``benchmarks/peer_nested_learning.py`` (how its config
maps to the shape, and what its steps do, is written there). It adds the rows "peer read path",
"peer full" (its two-pass step: read, backward, AdamW, then a no-grad write pass) and "peer
full, CMS 1/4/32/128" (the package's own CMS periods) to the d256 table, and lines with the
tokens/s ratios. Its writes go token by token (a d×d preconditioner each), so at T=512 the peer
part of the run takes minutes.

Run: python benchmarks/bench_hope.py [--quick] [--peer PYTHON] [--out benchmarks/results/...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {
    "d256": dict(
        B=2, T=512,
        build=dict(d=256, n_layers=1, heads=4, vocab=256, hidden=1024, width=256, chunk=8,
                   chunk_mem=64, cms_chunks=(8, 32, 128, 512)),
    ),
    "tiny": dict(B=8, T=512, build={}),
}  # fmt: skip
# In this order: each kind's peak includes the ones before (lightest first).
KINDS = ("read_only", "full_recompute", "first_order_teach", "teach", "first_order", "full")
OPTIONS = {  # hope's options per kind
    "read_only": {}, "full": {}, "full_recompute": {},
    "first_order": {"meta": "first_order"},
    "teach": {"cms_signal": "teach"},
    "first_order_teach": {"meta": "first_order", "cms_signal": "teach"},
}  # fmt: skip
# Kinds run as `nlgraph train --recompute` runs them: each layer, and the exact rules' pieces,
# recomputed in the backward (recompute_layers).
RECOMPUTE = {"full_recompute"}
TOLERANCE = 1e-10


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _graph(shape: str, kind: str):
    from nlgraph.library import get

    return get("hope", **SHAPES[shape]["build"], **OPTIONS[kind])


def _check(shape: str) -> float:
    """Max relative error, chunked vs reference, over outputs, states and gradients, for the
    exact and (where offered) the first-order learner."""
    return max(_check_kind(shape, kind) for kind in KINDS if kind != "read_only" and
               set(OPTIONS[kind]) <= _hope_options())  # fmt: skip


def _check_kind(shape: str, kind: str) -> float:
    import torch

    from nlgraph.compiler import compile
    from nlgraph.compiler.verify import compare, random_inputs
    from nlgraph.train.trainer import recompute_layers

    graph = _graph(shape, kind)
    torch.manual_seed(0)
    chosen = compile(graph, backend="chunk", dtype=torch.float64)
    if kind in RECOMPUTE:
        recompute_layers(chosen)
    reference = compile(graph, backend="reference", dtype=torch.float64)
    reference.load_state_dict(chosen.state_dict())
    inputs = random_inputs(chosen, (2, 17), {}, torch.float64, seed=0)
    errors = compare(reference, chosen, inputs).errors
    bad = [k for k, e in errors.items() if not isinstance(e, float)]
    if bad:
        raise SystemExit(f"{shape} {kind}: chunked and reference disagree on {bad[:3]}; no timing")
    worst = max(errors.values())
    if worst > TOLERANCE:
        raise SystemExit(
            f"{shape} {kind}: chunked differs from the reference by {worst:.1e}; no timing"
        )
    return worst


def _stepper(shape: str, kind: str, T: int):
    """A function running one training step of ``kind``, and the learner's size."""
    import torch

    from nlgraph.compiler import compile
    from nlgraph.train.trainer import next_token_loss, recompute_layers

    torch.manual_seed(0)
    learner = compile(_graph(shape, kind))
    if kind in RECOMPUTE:
        recompute_layers(learner)
    B = SHAPES[shape]["B"]
    vocab = learner.slow["embed"].num_embeddings
    tokens = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(1))
    loss_fn = next_token_loss(tokens)
    opt = torch.optim.AdamW(learner.parameters(), lr=1e-3)
    writes = kind != "read_only"

    def step() -> float:
        t0 = time.perf_counter()
        out, _ = learner({"tokens": tokens}, None, loss_fn=loss_fn, writes=writes)
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    return step, sum(p.numel() for p in learner.parameters())


def _hope_options() -> set[str]:
    import inspect

    from nlgraph.library import builder

    return set(inspect.signature(builder("hope")).parameters)


def _flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def run_shape(shape: str, reps: int, T: int | None) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    T = T or SHAPES[shape]["T"]
    out: dict = {"shape": shape, "B": SHAPES[shape]["B"], "T": T}
    steps, kinds = {}, {}
    for kind in KINDS:
        missing = set(OPTIONS[kind]) - _hope_options()
        if missing:
            kinds[kind] = {"available": False, "why": f"the library's hope has no {missing}"}
            continue
        step, params = _stepper(shape, kind, T)
        step()  # warm-up
        kinds[kind] = {"available": True, "params": params, "peak_rss_mb": _rss_mb()}
        steps[kind] = step
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(reps):  # interleaved
        for kind, step in steps.items():
            times[kind].append(step())
    for kind, ts in times.items():
        kinds[kind].update(median_s=statistics.median(ts), min_s=min(ts), max_s=max(ts))
    # Last: the counter's module hooks hold tensors a recomputed step drops (the sweep's
    # first-order pieces), so counting first would raise the peaks and slow the timed steps.
    for kind, step in steps.items():
        kinds[kind]["flops"] = _flops(step)
    out["kinds"] = kinds
    return out


MEMORY_KINDS = ("full", "full_recompute", "first_order_teach")


def run_memory(T: int, kind: str) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    step, _ = _stepper("d256", kind, T)
    seconds = step()
    return {"T": T, "seconds": seconds, "peak_rss_mb": _rss_mb()}


def _sub(args: list[str], cap_gb: float | None = None) -> dict:
    def limit() -> None:
        if cap_gb:
            cap = int(cap_gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                         check=False, preexec_fn=limit)  # fmt: skip
    if res.returncode:
        tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {res.returncode}: {tail[:200]}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


# The peer's runs at d256 (see --peer): row label, its CMS periods, its step kinds.
PEER_RUNS = (("peer", "8,32,128,512", "read,full"), ("peer, CMS 1/4/32/128", "1,4,32,128", "full"))


def _peer(python: str, r: dict, reps: int) -> list[tuple[str, dict]]:
    """The peer's kinds at ``r``'s B and T, each run in its own process: ``[(label, kind)]``."""
    script = str(Path(__file__).with_name("peer_nested_learning.py"))
    rows = []
    for label, cms, kinds in PEER_RUNS:
        cmd = [python, script, "--seq", str(r["T"]), "--batch", str(r["B"]), "--reps", str(reps),
               "--cms", cms, "--kinds", kinds]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            tail = (res.stderr.strip().splitlines() or ["(no output)"])[-1]
            rows.append((label, {"error": f"exit {res.returncode}: {tail[:200]}"}))
            continue
        out = json.loads(res.stdout.strip().splitlines()[-1])
        for kind, k in out["kinds"].items():
            name = f"{label} {'read path' if kind == 'read' else kind}"
            rows.append((name, {**k, "package": out["package"], "torch": out["torch"]}))
    return rows


def _peer_lines(r: dict) -> list[str]:
    """The peer's rows of the d256 table, then the tokens/s ratios."""
    ro, lines = r["kinds"].get("read_only", {}), []
    for name, k in r["peer"]:
        if "error" in k:
            lines.append(f"| {name} | failed: {k['error']} |||||||||")
            continue
        vs_ro = f"{k['median_s'] / ro['median_s']:.1f}x" if ro.get("available") else ""
        lines.append(
            f"| {name} | {k['params']:,} | {k['median_s']:.3f} | {k['min_s']:.3f}–{k['max_s']:.3f}"
            f" | {r['B'] * r['T'] / k['median_s']:.0f} | | | | {vs_ro} | {k['peak_rss_mb']:.0f} |"
        )
    peer = dict(r["peer"])
    ok = [k for k in peer.values() if "error" not in k]
    if not ok:
        return lines
    lines += [
        "",
        f"Against the peer ({ok[0]['package']}, torch {ok[0]['torch']}; its writes "
        "are stop-gradient, the nearest nlgraph kind is first_order_teach), tokens/s:",
    ]
    for ref in ("peer full", "peer read path"):
        if "error" in peer.get(ref, {"error": ""}):
            continue
        ratios = [f"{kind} / {ref} {peer[ref]['median_s'] / k['median_s']:.2f}x"
                  for kind, k in r["kinds"].items() if k.get("available")]  # fmt: skip
        lines.append(f"- {'; '.join(ratios)}")
    return lines


def _table(r: dict) -> list[str]:
    lines = [
        f"### {r['shape']}: B={r['B']}, T={r['T']} "
        f"(chunked vs reference before timing: {r['check']:.1e})",
        "",
        "| step | params | s/step (median) | range | tokens/s | GFLOP/step | GFLOP/s | "
        "FLOP/s vs read-only | time vs read-only | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ro = r["kinds"].get("read_only", {})
    tokens = r["B"] * r["T"]
    for kind in KINDS:
        k = r["kinds"].get(kind, {})
        if not k.get("available"):
            lines.append(f"| {kind} | not available: {k.get('why', '')} |||||||||")
            continue
        rate = k["flops"] / k["median_s"]
        ro_rate = ro["flops"] / ro["median_s"] if ro.get("available") else float("nan")
        lines.append(
            f"| {kind} | {k['params']:,} | {k['median_s']:.3f} | {k['min_s']:.3f}–{k['max_s']:.3f}"
            f" | {tokens / k['median_s']:.0f} | {k['flops'] / 1e9:.2f} | {rate / 1e9:.2f} | "
            f"{rate / ro_rate:.2f}x | {k['median_s'] / ro['median_s']:.1f}x | "
            f"{k['peak_rss_mb']:.0f} |"
        )
    return lines + (_peer_lines(r) if r.get("peer") else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T=32, one repeat, no memory sweep")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--mem-seqs", default="512,1024,2048", help="T of the memory sweep ('' skips)")
    ap.add_argument("--mem-cap", type=float, default=20.0, help="GB of address space per run")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--peer",
        default=None,
        metavar="PYTHON",
        help="also time nested-learning at d256 with this interpreter (its own "
        "environment: bash benchmarks/peer_env.sh); minutes at T=512",
    )
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--check", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--seq", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer and not shutil.which(args.peer):
        raise SystemExit(f"--peer {args.peer}: no such interpreter (bash benchmarks/peer_env.sh)")
    if args.one:
        print(json.dumps(run_shape(args.one, args.reps, args.seq)))
        return
    if args.check:
        print(json.dumps({"check": _check(args.check)}))
        return
    if args.memory:
        print(json.dumps(run_memory(args.memory, args.kind)))
        return
    reps = 1 if args.quick else args.reps
    seq = ["--seq", "32"] if args.quick else []
    results = []
    for shape in args.shapes.split(","):
        # the check in its own process, so it adds nothing to the timed one's peak memory
        check = _sub(["--check", shape])
        if "error" in check:
            raise SystemExit(f"{shape}: {check['error']}")
        r = _sub(["--one", shape, "--reps", str(reps), *seq])
        if "error" in r:
            raise SystemExit(f"{shape}: {r['error']}")
        if args.peer and shape == "d256":  # after nlgraph's kinds, same B, T and repeats
            r["peer"] = _peer(args.peer, r, reps)
        results.append({**r, **check})
    sweep = [] if args.quick or not args.mem_seqs else [int(t) for t in args.mem_seqs.split(",")]
    memory = [(kind, T, _sub(["--memory", str(T), "--kind", kind], args.mem_cap))
              for kind in MEMORY_KINDS for T in sweep]  # fmt: skip

    import torch

    lines = [
        "# Hope on CPU: full, first-order and read-only training steps",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
        f"{platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{os.environ.get('BENCH_THREADS', '2')} threads; load average after the run "
        f"{os.getloadavg()[0]:.1f}",
        "- step = forward + backward + AdamW; full: every write on, meta-gradients through the "
        "writes; read-only: `writes=False`; medians of "
        f"{reps} interleaved repeats after a warm-up; FLOPs from `torch.utils.flop_counter` "
        "(matrix products; forward, inner gradients and backward)",
        "",
    ]
    for r in results:
        lines += _table(r) + [""]
    if memory:
        lines += [
            "### Peak memory by sequence length (d256, B=2)",
            "",
            "| step | T | s/step (one run) | peak RSS (MB) |",
            "|---|---|---|---|",
        ]
        for kind, T, m in memory:
            if "error" in m:
                lines.append(
                    f"| {kind} | {T} | failed under a {args.mem_cap:g} GB cap: {m['error']} | |"
                )
            else:
                lines.append(f"| {kind} | {T} | {m['seconds']:.2f} | {m['peak_rss_mb']:.0f} |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
