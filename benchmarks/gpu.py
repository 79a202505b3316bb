"""Every kernel on one GPU: checked against its reference, then timed per backend.

For each workload — the gated delta rule (linear memory), the Titans deep memory, the
self-modifying Titans inner step (momentum memory), the fused optimizer update and a full tiny-Hope
training step — it first checks every backend against the reference on a small float32 problem
(and refuses to time a backend that disagrees), then times forward + backward (the optimizer: one
step) for ``reference`` (token loops), ``chunk`` (batched PyTorch), ``chunk+compile``
(``torch.compile`` of the chunked form) and ``triton``. The delta rule is timed again at C=16,
``chunk`` and ``triton`` only: chunks whose summaries' backward runs as kernels (at C=64 it is the
recomputed PyTorch VJP). It prints milliseconds, achieved TFLOP/s
and GB/s, and both as a fraction of the card's peaks measured in the same run (a large
device-to-device copy for bandwidth, a large bf16 matmul for compute).

Work and traffic: FLOPs are those of the chunked form as counted by ``torch.utils.flop_counter``
(matrix products only), the same count for every backend; bytes are the minimum traffic (every
input and output read or written once, forward and backward), the bound a memory-bound kernel is
judged against. For Hope it also times the read-only step (``writes=False``) and reports the cost
of the in-context writes as a ratio.

Run on a GPU (about 3-4 minutes on an H100)::

    python benchmarks/gpu.py [--out benchmarks/results/gpu_h100.md]

Without a GPU it runs the same code on tiny shapes through Triton's CPU interpreter (a check that
the script works end to end, not a measurement)::

    python benchmarks/gpu.py --tiny [--no-compile]
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_GPU = "--tiny" not in sys.argv
try:  # decide before torch and triton are imported: the interpreter is read at import time
    import torch as _torch_probe

    _GPU = _GPU and _torch_probe.cuda.is_available()
except ImportError:  # pragma: no cover
    _GPU = False
if not _GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from nlgraph.kernels import _dispatch  # noqa: E402

BACKENDS = ("reference", "chunk", "chunk+compile", "triton")


# ------------------------------------------------------------------------------------ timing
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn: Callable[[], object], dev: torch.device, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``reps`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(dev)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peaks(dev: torch.device, tiny: bool) -> tuple[float, float]:
    """(bytes/s, FLOP/s) measured here: a large copy and a large matmul."""
    n = (1 << 16) if tiny else (1 << 28)
    x = torch.empty(n, device=dev)
    y = torch.empty_like(x)
    t = timeit(lambda: y.copy_(x), dev, reps=5 if tiny else 20)
    bw = 2 * x.numel() * x.element_size() / t
    m = 128 if tiny else 8192
    dt = torch.float32 if tiny else torch.bfloat16
    a, b = torch.randn(m, m, device=dev, dtype=dt), torch.randn(m, m, device=dev, dtype=dt)
    t = timeit(lambda: a @ b, dev, reps=5 if tiny else 20)
    return bw, 2 * m**3 / t


def flops_of(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def rel_err(got, ref) -> float:
    got, ref = list(got), list(ref)
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        if g is None and r is None:
            continue
        g, r = g.detach().double(), r.detach().double()
        worst = max(worst, ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item())
    return worst


# ----------------------------------------------------------------------------------- results
@dataclass
class Row:
    workload: str
    backend: str
    ms: float | None = None
    err: float | None = None
    note: str = ""


@dataclass
class Bench:
    dev: torch.device
    tiny: bool
    compile: bool
    budget: float
    hope_compile: bool = False
    start: float = field(default_factory=time.perf_counter)
    rows: list[Row] = field(default_factory=list)
    work: dict[str, tuple[int, int]] = field(default_factory=dict)  # flops, bytes

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.start)

    def run(self, workload: str, backends: dict[str, Callable | None], check, reps: int) -> None:
        """``backends``: name -> a factory returning the timed closure (None: not available,
        a string: why). ``check(name)`` returns the relative error against the reference."""
        for name in BACKENDS:
            make = backends.get(name)
            row = Row(workload, name)
            self.rows.append(row)
            if make is None or isinstance(make, str):
                row.note = make or "no such backend"
                continue
            if name == "chunk+compile" and not self.compile:
                row.note = "skipped (--no-compile)"
                continue
            if self.left() < 0:
                row.note = "skipped (time budget spent)"
                continue
            try:
                row.err = check(name)
                tol = 2e-2 if name == "triton" and not self.tiny else 1e-3
                if row.err is not None and row.err > tol:
                    row.note = f"NOT TIMED: differs from the reference by {row.err:.1e}"
                    continue
                fn = make()
                n = 1 if name == "reference" else reps
                row.ms = 1e3 * timeit(fn, self.dev, reps=n, warmup=1)
            except Exception as e:  # noqa: BLE001 - a failing backend is reported, not fatal
                row.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}"
            print(f"  {workload:>22} {name:>14}: " + (f"{row.ms:9.3f} ms" if row.ms else row.note),
                  flush=True)  # fmt: skip

    def run_kernel(self, workload: str, op: str, step, xs, check, reps: int) -> None:
        """:meth:`run` for a kernel op timed through ``step(leaves, backend)`` on inputs ``xs``:
        the reference, chunk, chunk+compile (the chunk step under ``torch.compile``) and triton
        rows."""

        def make(be):
            return lambda: step(_leaves(*xs), be)

        def compiled():
            fn = torch.compile(lambda ys: step(ys, "chunk"))
            return lambda: fn(_leaves(*xs))

        self.run(workload, {
            "reference": lambda: make("reference"), "chunk": lambda: make("chunk"),
            "chunk+compile": compiled,
            "triton": (lambda: make("triton")) if "triton" in _dispatch.available(op)
            else "no triton backend",
        }, check, reps)  # fmt: skip


# --------------------------------------------------------------------------------- workloads
def _leaves(*xs):
    return [x.detach().requires_grad_() for x in xs]


def delta_rule(b: Bench) -> None:
    from nlgraph.kernels.linear_memory import linear_memory

    dev = b.dev
    if b.tiny:
        B, T, H, D, C, dt = 1, 40, 2, 16, 16, torch.float32
    else:
        B, T, H, D, C, dt = 8, 4096, 16, 64, 64, torch.bfloat16

    def inputs(B, T, H, D, dtype, seed=0):
        g = torch.Generator(device=dev).manual_seed(seed)
        q = F.normalize(torch.randn(B, T, H, D, device=dev, generator=g), dim=-1)
        k = F.normalize(torch.randn(B, T, H, D, device=dev, generator=g), dim=-1)
        v = torch.randn(B, T, H, D, device=dev, generator=g)
        alpha = torch.sigmoid(4 + torch.randn(B, T, H, device=dev, generator=g))
        beta = torch.sigmoid(torch.randn(B, T, H, device=dev, generator=g))
        return _leaves(*(t.to(dtype) for t in (q, k, v, alpha, beta)))

    def step(xs, backend, chunk=C):
        q, k, v, alpha, beta = xs
        o, _ = linear_memory(q, k, v, alpha, alpha * beta, beta, chunk_size=chunk,
                             backend=backend, scale=D**-0.5)  # fmt: skip
        o.float().square().sum().backward()
        return [o] + [x.grad for x in xs]

    small = inputs(2, 37, 2, 16, torch.float32, seed=1)
    ref = step(_leaves(*small), "reference", 8)

    def check(name):
        be = "chunk" if name == "chunk+compile" else name
        return rel_err(step(_leaves(*small), be, 8), ref)

    xs = inputs(B, T, H, D, dt)
    b.work["delta rule"] = (
        flops_of(lambda: step(_leaves(*xs), "chunk")),
        # forward: read q, k, v, write o; backward: read q, k, v, do, write dq, dk, dv; the two
        # gates read twice and their gradients written
        (11 * B * T * H * D + 6 * B * T * H) * xs[0].element_size(),
    )

    b.run_kernel("delta rule", "linear_memory", step, xs, check, reps=3 if b.tiny else 10)

    # Same inputs in chunks small enough for the summaries' backward kernels (at C=64 that
    # backward is the recomputed PyTorch VJP: linear_memory._triton_summaries.backward_fits).
    C2 = 8 if b.tiny else 16
    name = f"delta rule C={C2}"
    b.work[name] = (flops_of(lambda: step(_leaves(*xs), "chunk", C2)), b.work["delta rule"][1])
    b.run(name, {
        be: (lambda be=be: lambda: step(_leaves(*xs), be, C2)) for be in ("chunk", "triton")
    }, check, reps=3 if b.tiny else 10)  # fmt: skip


def titans_memory(b: Bench) -> None:
    from nlgraph.kernels.deep_memory import deep_memory

    dev = b.dev
    if b.tiny:
        B, T, H, D, Dh, C = 1, 24, 2, 8, 16, 8
    else:
        # Per-head widths 32 and C = 16: the largest depth-2 memory the Triton kernel holds in
        # registers (deep_memory.triton.MAX_STATE); a wider one runs the chunk form under "triton"
        B, T, H, D, Dh, C = 4, 1024, 16, 32, 32, 16

    def inputs(B, T, H, D, Dh, seed=0):
        g = torch.Generator(device=dev).manual_seed(seed)
        q = F.normalize(torch.randn(B, T, H, D, device=dev, generator=g), dim=-1)
        k = F.normalize(torch.randn(B, T, H, D, device=dev, generator=g), dim=-1)
        v = torch.randn(B, T, H, D, device=dev, generator=g)
        lr = 0.1 * torch.sigmoid(torch.randn(B, T, H, device=dev, generator=g))
        mom = torch.sigmoid(torch.randn(B, T, H, device=dev, generator=g))
        fg = 0.1 * torch.sigmoid(torch.randn(B, T, H, device=dev, generator=g))
        w1 = torch.randn(H, D, Dh, device=dev, generator=g) / math.sqrt(Dh)
        w2 = torch.randn(H, Dh, D, device=dev, generator=g) / math.sqrt(D)
        return _leaves(q, k, v, lr, mom, fg, w1, w2)

    def step(xs, backend, chunk=C):
        q, k, v, lr, mom, fg, w1, w2 = xs
        y, _ = deep_memory(q, k, v, lr, mom, fg, params0={"W1": w1, "W2": w2},
                           chunk_size=chunk, backend=backend)  # fmt: skip
        y.square().sum().backward()
        return [y] + [x.grad for x in xs]

    small = inputs(2, 19, 2, 8, 16, seed=1)
    ref = step(_leaves(*small), "reference", 4)

    def check(name):
        be = "chunk" if name == "chunk+compile" else name
        return rel_err(step(_leaves(*small), be, 4), ref)

    xs = inputs(B, T, H, D, Dh)
    n_chunks = math.ceil(T / C)
    b.work["titans memory"] = (
        flops_of(lambda: step(_leaves(*xs), "chunk")),
        # as the delta rule for q, k, v, y (11 passes) and three gates (9); the two fast weight
        # matrices written once per chunk forward and read back in the backward
        (11 * B * T * H * D + 9 * B * T * H + 2 * n_chunks * B * H * 2 * D * Dh) * 4,
    )

    b.run_kernel("titans memory", "deep_memory", step, xs, check, reps=3 if b.tiny else 10)


def momentum_memory(b: Bench) -> None:
    try:
        from nlgraph.kernels.momentum_memory import momentum_memory as op
    except ImportError:
        b.rows.append(Row("self-mod inner step", "-", note="momentum_memory op not built"))
        return
    dev = b.dev
    # one window of Hope's self-modifying Titans: every memory's heads stacked
    B, C, H, I, O = (2, 8, 3, 5, 6) if b.tiny else (8, 16, 64, 64, 64)

    def inputs(B, C, H, I, O, dtype=torch.float32, seed=0):
        g = torch.Generator(device=dev).manual_seed(seed)
        x = F.normalize(torch.randn(B, C, H, I, device=dev, generator=g), dim=-1)
        d = torch.randn(B, C, H, O, device=dev, generator=g)
        bb = 0.5 * torch.rand(B, C, H, device=dev, generator=g)
        a = 0.9 + 0.1 * torch.rand(B, C, H, device=dev, generator=g)
        mu = torch.rand(B, C, H, device=dev, generator=g)
        w0 = torch.randn(B, H, O, I, device=dev, generator=g)
        s0 = torch.randn(B, H, O, I, device=dev, generator=g)
        return _leaves(*(t.to(dtype) for t in (x, d, bb, a, mu, w0, s0)))

    def step(xs, backend):
        w, s = op(*xs, backend=backend)
        (w.float().square().sum() + s.float().square().sum()).backward()
        return [w, s] + [x.grad for x in xs]

    small = inputs(2, 8, 3, 5, 6, seed=1)
    ref = step(_leaves(*small), "reference")

    def check(name):
        be = "chunk" if name == "chunk+compile" else name
        return rel_err(step(_leaves(*small), be), ref)

    xs = inputs(B, C, H, I, O)
    b.work["self-mod inner step"] = (
        flops_of(lambda: step(_leaves(*xs), "chunk")),
        # x, delta, three gates: read forward and backward, gradients written; w0, s0 read and
        # W, S written forward, their gradients read and dw0, ds0 written backward (and w0, s0
        # read again)
        (3 * B * C * H * (I + O + 3) + 10 * B * H * O * I) * 4,
    )

    reps = 3 if b.tiny else 20
    b.run_kernel("self-mod inner step", "momentum_memory", step, xs, check, reps=reps)


def optimizer(b: Bench) -> None:
    import nlgraph.optim as nlo

    dev = b.dev
    sizes = [7, 130, 1000] if b.tiny else [4096 * 4096] * 6 + [50257 * 768]

    def params(seed=0):
        g = torch.Generator(device=dev).manual_seed(seed)
        ps = [torch.nn.Parameter(torch.randn(n, device=dev, generator=g)) for n in sizes]
        for p in ps:
            p.grad = torch.randn(p.shape, device=dev, generator=g)
        return ps

    def run_steps(backend, n, ps=None):
        ps = ps or params()
        if backend == "torch":
            opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True)
        else:
            opt = nlo.AdamW(ps, lr=1e-3, weight_decay=0.01)
            opt.backend = backend
        for _ in range(n):
            opt.step()
        return ps, opt

    def check(name):
        be = {"chunk": "foreach", "chunk+compile": "foreach"}.get(name, name)
        got = run_steps(be, 3, params(1))[0]
        ref = torch.optim.AdamW(params(1), lr=1e-3, weight_decay=0.01, foreach=False)
        for _ in range(3):
            ref.step()
        return rel_err(got, [p for grp in ref.param_groups for p in grp["params"]])

    n = sum(sizes)
    b.work["optimizer update"] = (0, 7 * 4 * n)  # read p, g, m, v; write p, m, v

    def make(be):
        _, opt = run_steps(be, 1)
        return opt.step

    b.run("optimizer update", {
        "reference": lambda: make("reference"), "chunk": lambda: make("foreach"),
        "chunk+compile": "the foreach program is already one pass per op",
        "triton": (lambda: make("triton")) if "triton" in _dispatch.available("optimizer_update")
        else "no triton backend",
    }, check, reps=5 if b.tiny else 20)  # fmt: skip
    ps, opt = run_steps("torch", 1)
    row = Row("optimizer update", "torch fused (baseline)")
    row.ms = 1e3 * timeit(opt.step, dev, reps=5 if b.tiny else 20)
    b.rows.append(row)


def hope_step(b: Bench) -> None:
    from nlgraph.compiler import compile as nl_compile
    from nlgraph.library import get
    from nlgraph.train.trainer import next_token_loss

    dev = b.dev
    B, T = (2, 16) if b.tiny else (8, 512)
    torch.manual_seed(0)

    def learner(backend, dtype=torch.float32):
        lr = nl_compile(get("hope"), device=dev, dtype=dtype, backend=backend)
        return lr

    vocab = learner("chunk").slow["embed"].num_embeddings
    tokens = torch.randint(0, vocab, (B, T), device=dev)

    def step(lr, tok, writes=True):
        lr.zero_grad(set_to_none=True)
        out, _ = lr({"tokens": tok}, None, loss_fn=next_token_loss(tok), writes=writes)
        out["loss"].backward()
        return [out["loss"]] + [p.grad for p in lr.parameters()]

    probe = torch.randint(0, vocab, (2, 12), device=dev)
    ref_lr = learner("reference")
    ref = step(ref_lr, probe)

    def check(name):
        lr = learner("chunk" if name == "chunk+compile" else name)
        lr.load_state_dict(ref_lr.state_dict())
        return rel_err(step(lr, probe), ref)

    b.work["hope train step"] = (flops_of(lambda: step(learner("chunk"), tokens)), 0)

    def make(be, writes=True):
        lr = learner("chunk" if be == "chunk+compile" else be)
        if be == "chunk+compile":
            lr.compile_program()
        return lambda: step(lr, tokens, writes)

    skip = "skipped: compiling Hope's piece graph takes minutes (--hope-compile)"
    b.run("hope train step", {
        "reference": (lambda: make("reference")) if b.tiny else "skipped: one piece per token",
        "chunk": lambda: make("chunk"),
        "chunk+compile": (lambda: make("chunk+compile")) if b.hope_compile else skip,
        "triton": lambda: make("triton"),
    }, check, reps=2 if b.tiny else 5)  # fmt: skip
    b.run("hope read-only step", {
        "reference": "not timed (the baseline of the write cost)",
        "chunk": lambda: make("chunk", writes=False),
        "chunk+compile": (lambda: make("chunk+compile", writes=False)) if b.hope_compile
        else skip,
        "triton": lambda: make("triton", writes=False),
    }, lambda name: None, reps=2 if b.tiny else 5)  # fmt: skip


# -------------------------------------------------------------------------------------- main
def report(b: Bench, bw: float, fl: float) -> str:
    name = torch.cuda.get_device_name(b.dev) if b.dev.type == "cuda" else platform.processor()
    lines = [
        f"# GPU kernels — {name or 'CPU'}, {datetime.date.today().isoformat()}",
        "",
        f"torch {torch.__version__}, triton "
        f"{__import__('triton').__version__}, python {platform.python_version()}"
        + (", **tiny shapes through Triton's interpreter: not a measurement**" if b.tiny else ""),
        "",
        f"Measured peaks: {bw / 1e9:.4g} GB/s (device copy), {fl / 1e12:.4g} TFLOP/s "
        f"({'fp32' if b.tiny else 'bf16'} matmul).",
        "",
        "| workload | backend | ms | TFLOP/s | GB/s | % peak BW | % peak FLOP | "
        "x chunk | rel. err vs reference | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    chunk_ms = {r.workload: r.ms for r in b.rows if r.backend == "chunk" and r.ms}
    for r in b.rows:
        flops, nbytes = b.work.get(r.workload.replace("read-only", "train"), (0, 0))
        if r.workload == "hope read-only step":
            flops = 0
        cells = ["–"] * 6
        if r.ms:
            s = r.ms / 1e3
            cells[0] = f"{r.ms:.3f}"
            if flops:
                cells[1] = f"{flops / s / 1e12:.3g}"
                cells[4] = f"{100 * flops / s / fl:.1f}"
            if nbytes:
                cells[2] = f"{nbytes / s / 1e9:.3g}"
                cells[3] = f"{100 * nbytes / s / bw:.1f}"
            if chunk_ms.get(r.workload):
                cells[5] = f"{chunk_ms[r.workload] / r.ms:.2f}"
        err = "–" if r.err is None else f"{r.err:.1e}"
        row = " | ".join([r.workload, r.backend, *cells, err, r.note])
        lines.append(f"| {row} |")
    ro = {r.backend: r.ms for r in b.rows if r.workload == "hope read-only step" and r.ms}
    wr = {r.backend: r.ms for r in b.rows if r.workload == "hope train step" and r.ms}
    ratios = [f"{k}: {wr[k] / ro[k]:.1f}x" for k in ro if k in wr]
    if ratios:
        lines += ["", "Cost of the in-context writes (Hope train step / read-only step): "
                  + ", ".join(ratios) + " (target: at most 2x)."]  # fmt: skip
    lines += ["", "FLOPs: matrix products of the chunked form (torch.utils.flop_counter); bytes: "
              "minimum traffic (each input and output once, forward and backward)."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, Triton's CPU interpreter")
    ap.add_argument("--no-compile", action="store_true", help="skip the chunk+compile rows")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds before rows are skipped")
    ap.add_argument("--hope-compile", action="store_true",
                    help="also time Hope under torch.compile (compiles for minutes)")  # fmt: skip
    ap.add_argument("--only", default="", help="comma-separated workloads (delta,titans,momentum,"
                    "optimizer,hope)")  # fmt: skip
    ap.add_argument("--out", default=None, help="write the markdown table here")
    args = ap.parse_args(argv)
    tiny = args.tiny or not _GPU
    dev = torch.device("cuda" if _GPU and not args.tiny else "cpu")
    if dev.type == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    b = Bench(dev, tiny, compile=not args.no_compile, budget=args.budget,
              hope_compile=args.hope_compile)  # fmt: skip
    print(
        f"device {dev} ({'tiny, interpreter' if tiny else 'full size'}); measuring peaks",
        flush=True,
    )
    bw, fl = peaks(dev, tiny)
    work = {"delta": delta_rule, "titans": titans_memory, "momentum": momentum_memory,
            "optimizer": optimizer, "hope": hope_step}  # fmt: skip
    only = [w for w in args.only.split(",") if w] or list(work)
    for w in only:
        print(f"{w}:", flush=True)
        work[w](b)
    text = report(b, bw, fl)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    bad = [r for r in b.rows if r.note.startswith("NOT TIMED")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
