"""Benchmark the linear-memory kernels on CPU: token loop vs chunk form (eager and compiled).

Times forward and forward+backward (random cotangents on the outputs and the final state) of
DeltaNet gates, M_t = M_{t-1}(I - beta_t k_t k_t^T) + beta_t v_t k_t^T, and reports medians and
ratios against the reference loop measured in the same run. It first checks chunk vs reference
(outputs and every gradient, float64) and refuses to time anything that disagrees.

    python benchmarks/bench_linear_memory.py            # B=2, T=2048, H=4, D=64; writes results
    python benchmarks/bench_linear_memory.py --quick    # tiny shapes, prints only
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nlgraph.kernels.linear_memory import linear_memory_chunk, linear_memory_naive  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "linear_memory_cpu.md"


def make_inputs(B, T, H, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    k = F.normalize(torch.randn(B, T, H, D, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    beta = torch.sigmoid(torch.randn(B, T, H, generator=g, dtype=dtype))
    go = torch.randn(B, T, H, D, generator=g, dtype=dtype)
    gs = torch.randn(B, H, D, D, generator=g, dtype=dtype)
    return (q, k, v, beta), (go, gs)


def run(fn, inputs, cot, backward, chunk_size):
    q, k, v, beta = (x.detach().requires_grad_() for x in inputs)
    kw = {} if fn is linear_memory_naive else {"chunk_size": chunk_size}
    o, s = fn(q, k, v, None, beta, beta, scale=q.shape[-1] ** -0.5, **kw)
    if not backward:
        return o, s, None
    (o * cot[0]).sum().add((s * cot[1]).sum()).backward()
    return o, s, [x.grad for x in (q, k, v, beta)]


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def disagreement(fn, ref_fn, inputs, cot, chunk_size):
    """Largest relative error of fn vs ref_fn over the output, final state and every gradient."""
    ref = run(ref_fn, inputs, cot, True, chunk_size)
    got = run(fn, inputs, cot, True, chunk_size)
    pairs = [(got[0], ref[0]), (got[1], ref[1]), *zip(got[2], ref[2], strict=True)]
    return max(max_rel(a, b) for a, b in pairs)


def median_time(fn, inputs, cot, backward, chunk_size, repeats):
    run(fn, inputs, cot, backward, chunk_size)  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(fn, inputs, cot, backward, chunk_size)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class _Timeout(Exception):
    pass


def try_compile(chunk_size, inputs, cot, budget_s):
    """torch.compile the chunk form and run it once (fwd+bwd) within budget_s seconds.
    Returns (fn, compile seconds, None) or (None, seconds, why)."""
    fn = torch.compile(linear_memory_chunk, dynamic=False)

    def on_alarm(*_):
        raise _Timeout

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(budget_s)
    t0 = time.perf_counter()
    try:
        run(fn, inputs, cot, False, chunk_size)
        run(fn, inputs, cot, True, chunk_size)
    except _Timeout:
        return None, time.perf_counter() - t0, f"did not compile within {budget_s} s"
    except Exception as e:  # report any compiler failure instead of crashing the benchmark
        secs = time.perf_counter() - t0
        if secs >= budget_s - 1:  # dynamo may re-wrap the alarm's exception
            return None, secs, f"did not compile within {budget_s} s"
        return None, secs, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return fn, time.perf_counter() - t0, None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes; print only")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-budget", type=int, default=60, help="seconds")
    ap.add_argument("--out", type=Path, default=None, help=f"markdown file (full run: {RESULTS})")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, T, H, D = (1, 64, 2, 16) if args.quick else (2, 2048, 4, 64)
    C = min(args.chunk_size, 16) if args.quick else args.chunk_size
    out = args.out or (None if args.quick else RESULTS)

    machine = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "uname -m": platform.machine(),
        "nproc": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
    }
    for key, val in machine.items():
        print(f"{key}: {val}")

    small, small_cot = make_inputs(2, 37, 2, 16, torch.float64, seed=1)
    err = disagreement(linear_memory_chunk, linear_memory_naive, small, small_cot, chunk_size=5)
    print(f"check chunk vs reference (float64, B2 T37 H2 D16 C5, all grads): max rel err {err:.1e}")
    if not err < 1e-10:
        sys.exit("chunk disagrees with the reference: refusing to report speed")

    inputs, cot = make_inputs(B, T, H, D, torch.float32)
    ref_o, ref_s, _ = run(linear_memory_naive, inputs, cot, False, C)
    ch_o, ch_s, _ = run(linear_memory_chunk, inputs, cot, False, C)
    full_err = max(max_rel(ch_o, ref_o), max_rel(ch_s, ref_s))
    print(f"timed-shape float32 chunk vs reference: max rel err {full_err:.1e}")

    impls = [
        ("reference (token loop)", linear_memory_naive),
        ("chunk (eager)", linear_memory_chunk),
    ]
    notes = []
    if args.no_compile:
        notes.append("torch.compile: skipped (--no-compile)")
    else:
        fn, secs, why = try_compile(C, inputs, cot, args.compile_budget)
        if fn is not None:
            # Checked against eager chunk at the timed shape: another shape would recompile.
            cerr = disagreement(fn, linear_memory_chunk, inputs, cot, C)
            if cerr < 1e-4:
                impls.append(("chunk (torch.compile)", fn))
                notes.append(
                    f"torch.compile: first fwd + fwd/bwd call took {secs:.0f} s; compiled vs "
                    f"eager chunk (float32, o, state, all grads): {cerr:.1e}"
                )
            else:
                notes.append(f"torch.compile: disagrees with eager chunk ({cerr:.1e}); not timed")
        else:
            notes.append(
                f"torch.compile: not timed, {why} (dynamo unrolls the Python loop over the "
                f"{-(-T // C)} chunks, so the fwd and bwd graphs grow with T / C)"
            )
    for n in notes:
        print(n)

    rows = []
    for name, fn in impls:
        fwd = median_time(fn, inputs, cot, False, C, args.repeats)
        fb = median_time(fn, inputs, cot, True, C, args.repeats)
        rows.append((name, fwd, fb))
        print(f"{name:24s} fwd {fwd * 1e3:9.1f} ms   fwd+bwd {fb * 1e3:9.1f} ms", flush=True)
    load_end = os.getloadavg()[0]
    machine["load average (1 min) at end"] = f"{load_end:.2f}"
    if max(load_end, float(machine["load average (1 min) at start"])) > 0.75 * os.cpu_count():
        notes.append(
            "the machine was shared (load above 0.75 x nproc): absolute times are inflated and "
            "noisy; the ratios come from the same run but contention favours neither side reliably"
        )
    base_f, base_fb = rows[0][1], rows[0][2]
    table = [
        "| implementation | fwd (ms) | fwd+bwd (ms) | fwd speed-up | fwd+bwd speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, f, fb in rows:
        table.append(
            f"| {name} | {f * 1e3:.1f} | {fb * 1e3:.1f} | {base_f / f:.1f}x | {base_fb / fb:.1f}x |"
        )
    print("\n".join(table))

    if out is not None:
        lines = [
            "# linear_memory on CPU: token loop vs chunk form",
            "",
            f"DeltaNet gates, float32, B={B}, T={T}, H={H}, Dk=Dv={D}, chunk size {C}; median of "
            f"{args.repeats} runs after one warm-up; forward with inputs requiring grad, "
            "fwd+bwd adds the backward of random cotangents on o and the final state. "
            "Produced by `python benchmarks/bench_linear_memory.py`.",
            "",
            *(f"- {k}: {v}" for k, v in machine.items()),
            f"- check chunk vs reference before timing (float64, all gradients): {err:.1e}",
            f"- timed-shape float32 chunk vs reference (o and final state): {full_err:.1e}",
            *(f"- {n}" for n in notes),
            "",
            *table,
            "",
        ]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
