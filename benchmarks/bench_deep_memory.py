"""Deep (MLP) memory on CPU: the reference token loop against the chunk-parallel kernel.

Shape of the run: B=2, T=2048, H=4, Dk=Dv=Dh=64, float32, chunk sizes 16 and 64, read="after",
all three gates on (lr, momentum, forget), the 2-layer residual SiLU memory of Eq. 89. For each
chunk size it times the forward pass (under ``torch.no_grad``) and forward+backward (random
cotangents on y and on the final fast weights, gradients to every input and to params0), as the
median of ``--repeats`` runs after a warm-up; the reference loop is timed once (it is slow), in the
same process, so the ratios compare like with like.

``chunk (torch.compile)`` compiles the per-chunk step (``chunk._chunk_analytic``) and keeps the
Python loop over chunks eager: compiling the whole op would unroll T / C chunk bodies into one
graph. The compile time is reported.

Before timing anything the chunk kernel is checked against the reference (float64, outputs,
final state, every gradient); if they disagree the script refuses to report speed.

    python benchmarks/bench_deep_memory.py            # full size; writes results/deep_memory_cpu.md
    python benchmarks/bench_deep_memory.py --quick    # tiny shapes, prints only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

# Compile from scratch so the reported compile time is a cold one (inductor's on-disk caches
# would otherwise make a second run look nearly free); --compile-cache keeps them.
if "--compile-cache" not in sys.argv:
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nlgraph.kernels.deep_memory import chunk as chunk_module  # noqa: E402
from nlgraph.kernels.deep_memory import deep_memory_chunk, deep_memory_naive  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "deep_memory_cpu.md"
NAMES = ("q", "k", "v", "lr", "momentum", "forget", "W1", "W2")


def make_problem(B, T, H, D, Dh, dtype, seed=0):
    """Inputs (unit-norm q/k, sigmoid-range gates) and fixed cotangents for y and the state."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    gate = lambda lo, hi: lo + (hi - lo) * torch.rand(B, T, H, generator=g, dtype=dtype)  # noqa: E731
    inputs = {
        "q": F.normalize(rnd(B, T, H, D), dim=-1),
        "k": F.normalize(rnd(B, T, H, D), dim=-1),
        "v": rnd(B, T, H, D),
        # A regime that stays finite in float32 for C = 64 at T = 2048 (lr up to 0.1 diverges
        # there) and keeps the memory alive (forget up to 0.05 decays it to ~1e-14).
        "lr": gate(0.005, 0.05),
        "momentum": gate(0.5, 0.9),
        "forget": gate(0.0, 0.01),
        "W1": rnd(H, D, Dh) * 0.02,
        "W2": rnd(H, Dh, D) * D**-0.5,
    }
    cot = {"y": rnd(B, T, H, D), "W1": rnd(B, H, D, Dh), "W2": rnd(B, H, Dh, D)}
    return inputs, cot


def run(fn, inputs, cot, C, backward):
    """One call; returns (y, final W1, W2, grads or None)."""
    x = {n: t.detach().requires_grad_(backward) for n, t in inputs.items()}
    ctx = contextlib.nullcontext() if backward else torch.no_grad()
    with ctx:
        y, st = fn(
            x["q"], x["k"], x["v"], x["lr"], x["momentum"], x["forget"],
            params0={"W1": x["W1"], "W2": x["W2"]}, chunk_size=C, read="after",
        )  # fmt: skip
    outs = [y, st["params"]["W1"], st["params"]["W2"]]
    if not backward:
        return outs, None
    loss = sum((o * c).sum() for o, c in zip(outs, cot.values(), strict=True))
    grads = torch.autograd.grad(loss, [x[n] for n in NAMES])
    return outs, grads


def max_rel_err(got, want):
    return max(
        ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
        for a, b in zip(got, want, strict=True)
    )


def timed(fn, inputs, cot, C, backward, repeats):
    """Median seconds over ``repeats`` calls, after one warm-up call (which may compile)."""
    run(fn, inputs, cot, C, backward)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(fn, inputs, cot, C, backward)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def compiled_step():
    """Swap the chunk kernel's per-chunk step for its torch.compile'd version, then restore it."""
    eager = chunk_module._chunk_analytic
    chunk_module._chunk_analytic = torch.compile(eager, dynamic=False)
    try:
        yield
    finally:
        chunk_module._chunk_analytic = eager


def machine_info():
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "uname -m": platform.machine(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch": torch.__version__,
        "torch threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load average at start (1 min)": f"{os.getloadavg()[0]:.2f}",
    }


def correctness_gate():
    """float64 chunk vs reference on a small awkward case (T not a multiple of C, odd dims)."""
    inputs, cot = make_problem(2, 19, 2, 5, 7, torch.float64, seed=1)
    want = run(deep_memory_naive, inputs, cot, 4, True)
    got = run(deep_memory_chunk, inputs, cot, 4, True)
    return max(max_rel_err(got[0], want[0]), max_rel_err(got[1], want[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, print only, no compile")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-budget", type=int, default=60, help="seconds, reported against")
    ap.add_argument("--compile-cache", action="store_true", help="keep inductor's disk caches")
    ap.add_argument(
        "--out", type=Path, default=None, help=f"markdown (full run default: {RESULTS})"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, T, H, D, Dh = (1, 64, 2, 16, 16) if args.quick else (2, 2048, 4, 64, 64)
    use_compile = not (args.no_compile or args.quick)
    out_path = args.out or (None if args.quick else RESULTS)

    info = machine_info()
    for key, val in info.items():
        print(f"{key}: {val}")
    err = correctness_gate()
    print(f"check: chunk vs reference, float64 B2 T19 H2 D5 Dh7 C4, y/state/all grads: {err:.1e}")
    if not err < 1e-10:
        sys.exit(f"chunk disagrees with the reference ({err:.1e}): refusing to report speed")

    inputs, cot = make_problem(B, T, H, D, Dh, torch.float32)
    notes, sections = [], []
    for C in args.chunk_sizes:
        # The chunk kernel first: the reference's autograd graph (GBs at full size) would
        # otherwise leave the allocator cold and the chunk timings noisier.
        outs, grads = run(deep_memory_chunk, inputs, cot, C, True)
        if not all(t.isfinite().all() for t in (*outs, *grads)):
            sys.exit(f"C={C}: non-finite outputs or gradients: refusing to report speed")
        rows = []
        impls = [("chunk (eager)", contextlib.nullcontext)]
        if use_compile:
            impls.append(("chunk (torch.compile of the step)", compiled_step))
        for name, ctx in impls:
            with ctx():
                t0 = time.perf_counter()
                c_outs, c_grads = run(deep_memory_chunk, inputs, cot, C, True)
                run(deep_memory_chunk, inputs, cot, C, False)
                warm = time.perf_counter() - t0
                if ctx is compiled_step:
                    cerr = max(max_rel_err(c_outs, outs), max_rel_err(c_grads, grads))
                    notes.append(
                        f"C={C}: torch.compile warm-up (compiling the fwd and fwd+bwd graphs, "
                        f"{'cached' if args.compile_cache else 'caches off'}) took {warm:.0f} s "
                        f"(budget {args.compile_budget} s); compiled vs eager float32: {cerr:.1e}"
                    )
                    if not cerr < 1e-4:
                        notes.append(f"C={C}: compiled step disagrees with eager, not timed")
                        continue
                    if warm > args.compile_budget:
                        notes.append(f"C={C}: compile exceeded the budget; timed anyway")
                fwd = timed(deep_memory_chunk, inputs, cot, C, False, args.repeats)
                fb = timed(deep_memory_chunk, inputs, cot, C, True, args.repeats)
            rows.append((name, fwd, fb))
            print(f"C={C} {name}: fwd {fwd * 1e3:.0f} ms, fwd+bwd {fb * 1e3:.0f} ms", flush=True)
        ref_f = timed(deep_memory_naive, inputs, cot, C, False, repeats=1)
        t0 = time.perf_counter()
        ref_outs, ref_grads = run(deep_memory_naive, inputs, cot, C, True)
        ref_fb = time.perf_counter() - t0
        rows.insert(0, ("reference (token loop)", ref_f, ref_fb))
        print(f"C={C} reference: fwd {ref_f:.2f} s, fwd+bwd {ref_fb:.2f} s", flush=True)
        full_err = (max_rel_err(outs, ref_outs), max_rel_err(grads, ref_grads))
        notes.append(
            f"C={C}: full-size float32 chunk vs reference: outputs {full_err[0]:.1e}, "
            f"gradients {full_err[1]:.1e} (max relative error)"
        )
        if not max(full_err) < 1e-3:
            sys.exit(f"C={C}: chunk disagrees with the reference at full size: {full_err}")
        del ref_outs, ref_grads
        sections.append((C, rows))
    if args.no_compile or args.quick:
        notes.append("torch.compile: not run (--quick or --no-compile)")
    info["load average at end (1 min)"] = f"{os.getloadavg()[0]:.2f}"
    report = render(info, (B, T, H, D, Dh), sections, notes, err)
    print(report)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(report)
        print(f"wrote {out_path}")


def render(info, shape, sections, notes, err):
    B, T, H, D, Dh = shape
    lines = [
        "# deep_memory on CPU: reference token loop vs chunk-parallel",
        "",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- shape: B={B}, T={T}, H={H}, Dk=Dv={D}, Dh={Dh}, float32, read='after', "
        "lr + momentum + forget gates, 2-layer residual SiLU memory",
        "- forward is timed under torch.no_grad; forward+backward sends random cotangents into y "
        "and the final fast weights and takes gradients of q, k, v, all gates and params0",
        "- chunk times: median of repeats after a warm-up; reference: one run (its forward also "
        "runs torch.func.grad per token, under no_grad)",
        f"- correctness gate (float64, chunk vs reference incl. all gradients): {err:.1e}",
        "",
    ]
    for C, rows in sections:
        base_f, base_fb = rows[0][1], rows[0][2]
        lines += [
            f"## chunk_size = {C}",
            "",
            "| implementation | fwd (ms) | fwd+bwd (ms) | fwd speed-up | fwd+bwd speed-up |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, f, fb in rows:
            lines.append(
                f"| {name} | {f * 1e3:.0f} | {fb * 1e3:.0f} | {base_f / f:.1f}x "
                f"| {base_fb / fb:.1f}x |"
            )
        lines.append("")
    lines += ["## notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
