"""Compile every Triton kernel of nlgraph for an H100 (sm_90) on this machine, without a GPU.

For the shapes of ``benchmarks/gpu.py`` (the gated delta rule B=8, T=4096, H=16, d=64 in bf16 at
C=64 and C=16, the Titans memory, the self-modifying inner step, the optimizer update; plus the
two kernel specialisations a carried state adds) and for one training step of the library's
models at the ``tiny`` preset (batch 8, 32 tokens, as ``nlgraph train``), it takes the launches
the wrappers make (``benchmarks/_aot.py``: the wrappers' own block sizes and
``num_warps``), compiles each distinct one with Triton's bundled ptxas and prints registers per
thread, spill bytes (stores / loads), stack frame and shared memory. Compiled only: nothing here
runs on a GPU, so there are no timings, and a configuration that compiles can still be slow or
wrong there.

Run (about 2 minutes on one core)::

    python benchmarks/compile_sm90.py [--out benchmarks/results/compile_sm90.md] [--sweep]

``--sweep`` adds, for the delta rule's four linear-memory kernels, the other block sizes along
the split axis (Dv for the recurrences and the output, Dk for the chunk gradients) at 4 and 8
warps: what a retune could start from. Exit status 1 when a configuration fails to compile.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import warnings

# Compiling needs the real jit functions: the interpreter must be off before triton is imported.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import _aot  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)

warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def gpu_workloads() -> list[tuple[str, list[tuple[str, tuple, dict]]]]:
    """The timed shapes of benchmarks/gpu.py, as op calls (meta tensors)."""
    bf = torch.bfloat16
    B, T, H, D = 8, 4096, 16, 64
    qkv = [_aot.meta(B, T, H, D, dtype=bf) for _ in range(3)]
    g = _aot.meta(B, T, H, dtype=bf)
    delta_kw = {"chunk_size": 64, "scale": D**-0.5}
    delta = ("linear_memory", (*qkv, g, g, g), delta_kw)
    delta16 = ("linear_memory", (*qkv, g, g, g), {**delta_kw, "chunk_size": 16})
    carried = ("linear_memory", (*qkv, g, g, g),
               {**delta_kw, "initial_state": _aot.meta(B, H, D, D, dtype=bf),
                "final_state_grad": True})  # fmt: skip

    B, T, H, D, Dh, C = 4, 1024, 16, 32, 32, 16
    x, gate = _aot.meta(B, T, H, D), _aot.meta(B, T, H)
    p0 = {"W1": _aot.meta(H, D, Dh), "W2": _aot.meta(H, Dh, D)}
    titans = ("deep_memory", (x, x, x, gate, gate, gate), {"params0": p0, "chunk_size": C})
    layer = {"W1": _aot.meta(B, H, D, Dh), "W2": _aot.meta(B, H, Dh, D)}
    state = {"params": layer, "momentum": layer, "chunk_start": layer, "phase": 5,
             "chunk_size": C}  # fmt: skip
    titans_mid = ("deep_memory", (x, x, x, gate, gate, gate),
                  {"params0": p0, "state": state, "chunk_size": C})  # fmt: skip

    B, C, H, I, O = 8, 16, 64, 64, 64
    gate = _aot.meta(B, C, H)
    window = ("momentum_memory", (_aot.meta(B, C, H, I), _aot.meta(B, C, H, O), gate, gate, gate,
                                  _aot.meta(B, H, O, I), _aot.meta(B, H, O, I)), {})  # fmt: skip

    sizes = [4096 * 4096] * 6 + [50257 * 768]  # multiples of 64: FlatParams packs them aligned
    ends = torch.tensor(sizes).cumsum(0)
    spans = torch.stack([ends - torch.tensor(sizes), ends], 1)
    flat = _aot.meta(int(ends[-1]))
    adamw = ("optimizer_update", (flat, flat, flat, flat, None, spans),
             {"rule": "adam", "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
              "weight_decay": 0.01, "decoupled": True})  # fmt: skip
    return [
        ("delta rule (gpu.py)", [delta]),
        ("delta rule C=16 (gpu.py)", [delta16]),
        ("delta rule, carried state", [carried]),
        ("titans memory (gpu.py)", [titans]),
        ("titans memory, continued mid-chunk", [titans_mid]),
        ("self-mod inner step (gpu.py)", [window]),
        ("optimizer update (gpu.py)", [adamw]),
    ]


def preset_workloads() -> list[tuple[str, list[tuple[str, tuple, dict]]]]:
    """One training step of each library model at the tiny preset, and of the sequence memories
    the evals wrap into a language model at the tiny preset's block sizes."""
    from nlgraph.evals.models import MEMORY_LM_SIZES, memory_lm

    out = []
    for name in ("hope", "titans_lm", "hope_attention", "transformer"):
        out.append((f"{name} tiny", _aot.record_model(name)))
    for mem in ("linear_attention", "deltanet", "gated_deltanet"):
        graph = memory_lm(mem, vocab=256, **MEMORY_LM_SIZES)
        out.append((f"{mem} LM tiny", _aot.record_model(graph)))
    return out


def _sweep_launches(base: list[_aot.Launch]) -> list[_aot.Launch]:
    out = []
    for ln in base:
        axis = "BK" if ln.name == "_chunk_grads" else "BV"
        for size in (64, 32, 16):
            for warps in (4, 8):
                kw = {**ln.kwargs, axis: size, "num_warps": warps}
                if kw != ln.kwargs:
                    out.append(_aot.Launch(ln.kernel, ln.grid, ln.args, kw))
    return out


def _ptxas_version() -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    path = get_ptxas(_aot.SM90[1]).path
    text = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    return text.strip().splitlines()[-2] if text else "unknown"


def _n(x: int | None) -> str:
    return "–" if x is None else str(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="write the markdown report here")
    ap.add_argument("--sweep", action="store_true", help="also sweep the delta rule's blocks")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    why = _aot.backend_missing()
    if why is not None:
        print(f"cannot compile for sm_90 here: {why}")
        return 2

    workloads = gpu_workloads() + preset_workloads()
    done: dict[str, _aot.Compiled] = {}
    rows, notes = [], []
    header = f"{'workload':<36} {'kernel':<16} {'config':<74} {'regs':>4} {'spill st/ld':>12} "
    print(header + f"{'stack':>6} {'smem':>7} ok", flush=True)

    shown: set[tuple[str, str]] = set()

    def compile_row(label: str, ln: _aot.Launch) -> None:
        k = _aot.key(ln)
        if (label, k) in shown:  # the same binary again in this workload (e.g. other heads)
            return
        shown.add((label, k))
        if k not in done:
            done[k] = _aot.compile_launch(ln)
        r = done[k]
        rows.append((label, r))
        spill = f"{_n(r.spill_stores)}/{_n(r.spill_loads)}"
        ok = "yes" if r.ok else "NO"
        print(f"{label:<36} {r.kernel:<16} {r.config:<74} {_n(r.registers):>4} {spill:>12} "
              f"{_n(r.stack):>6} {_n(r.shared):>7} {ok}", flush=True)  # fmt: skip

    delta_launches: list[_aot.Launch] = []
    for label, calls in workloads:
        if not calls:
            notes.append(f"{label}: no Triton op (softmax attention and MLPs only)")
        for op, a, kw in calls:
            found, note = _aot.launches(op, *a, **kw)
            if not found:
                notes.append(f"{label}: {op}: {note}")
            for ln in found:
                compile_row(label, ln)
            if label == "delta rule (gpu.py)":
                delta_launches = found
    if args.sweep:
        for ln in _sweep_launches(delta_launches):
            compile_row("sweep: delta rule blocks", ln)

    failed = [r for _, r in rows if not r.ok]
    for note in notes:
        print("note:", note)
    for r in {id(r): r for r in failed}.values():
        print(f"FAILED {r.kernel} [{r.config}]: {r.error}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(report(rows, notes, workloads, sweep=args.sweep))
    return 1 if failed else 0


def report(rows, notes, workloads, sweep: bool) -> str:
    import triton

    lines = [
        f"# Triton kernels compiled for sm_90 (H100), {datetime.date.today().isoformat()}",
        "",
        f"triton {triton.__version__} ({_ptxas_version()}), torch {torch.__version__}. "
        "**Compiled only, never run on a GPU**: no timings; registers and spills are ptxas' "
        'report for `GPUTarget("cuda", 90, 32)` (`python benchmarks/compile_sm90.py'
        + (" --sweep" if sweep else "")
        + "`).",
        "",
        "Launch configurations are the wrappers' own (`benchmarks/_aot.py` runs each "
        "launcher on meta tensors and records its launches); spills are bytes per thread "
        "(stores / loads), stack the stack frame in bytes, smem the shared memory per block in "
        f"bytes (at most {_aot.MAX_SHARED[90]} on sm_90).",
        "",
        "| workload | kernel | config | regs | spill st/ld | stack | smem | ok |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows:
        ok = "yes" if r.ok else f"**NO**: {r.error[:200]}"
        spill = f"{_n(r.spill_stores)} / {_n(r.spill_loads)}"
        cells = [label, f"`{r.kernel}`", r.config, _n(r.registers), spill, _n(r.stack)]
        cells += [_n(r.shared), ok]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Shapes of the model rows (one training step, batch 8, 32 tokens):", ""]
    for label, calls in workloads:
        if label.endswith("tiny"):
            for op, a, kw in calls:
                lines.append(f"- {label}: {_short(op, a, kw)}")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _short(op: str, args: tuple, kwargs: dict) -> str:
    def d(x):
        if isinstance(x, torch.Tensor):
            if x.device.type == "cpu":  # the optimizer's spans
                aligned = bool((x % 64 == 0).all())
                return f"spans[{x.shape[0]}] ({'' if aligned else 'not '}64-aligned)"
            return f"{str(x.dtype)[6:]}{list(x.shape)}"
        if isinstance(x, dict):
            inner = ", ".join(f"{k}: {d(v)}" for k, v in x.items() if v is not None)
            return "{" + inner + "}"
        return repr(x)

    parts = [d(a) for a in args] + [f"{k}={d(v)}" for k, v in kwargs.items() if v is not None]
    return f"`{op}({', '.join(parts)})`"


if __name__ == "__main__":
    sys.exit(main())
