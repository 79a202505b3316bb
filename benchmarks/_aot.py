"""Compile nlgraph's Triton kernels ahead of time for a GPU that is not here (sm_90 by default).

Triton's CPU interpreter (``TRITON_INTERPRET=1``, what the tests use) accepts code that real
compilation rejects, and says nothing about registers. This module compiles the kernels for a
``GPUTarget`` with Triton's bundled ``ptxas`` on a CPU-only machine and reports, per launch
configuration: success or the compiler's error, registers per thread, spill stores / loads and
stack frame (``ptxas -v``), shared memory (Triton's metadata). Nothing is run.

Launch configurations are not re-derived here: each op's own launcher (``scan_forward`` /
``scan_backward``, ``window_forward``, ``sequence_forward``, the optimizer's ``launch``) runs on
``meta`` tensors with its ``@triton.jit`` kernels swapped for recorders (:func:`recording`), so
the block sizes, constexprs and ``num_warps`` are exactly those the wrapper picks for the shapes,
and Triton's own argument specialisation (integers equal to 1 become constants, pointers and
integers divisible by 16 get ``tt.divisibility``) turns the recorded arguments into the compiled
signature. Meta tensors have address 0, so every pointer is taken as 16-byte aligned, as fresh
CUDA allocations are. :func:`record_model` captures the op calls a library model makes (its
Triton ops answered by their chunked form), for the configurations a real model launches.

Must run where ``TRITON_INTERPRET`` is not set (the interpreter replaces the jit functions);
tests run it in a subprocess. :func:`representative` gives one configuration of every kernel;
``benchmarks/compile_sm90.py`` reports the configurations models and the GPU benchmark launch.

It lives with the benchmarks, not in :mod:`nlgraph.kernels`, because it builds models
(compiler, library, trainer, optimizers), which sit above the kernels. Import it with
``benchmarks/`` on ``sys.path``, as ``import _aot``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from nlgraph.kernels._triton import interpreted

__all__ = [
    "Launch",
    "Compiled",
    "SM90",
    "backend_missing",
    "recording",
    "compile_launch",
    "key",
    "MAX_SHARED",
    "launches",
    "record_model",
    "representative",
    "meta",
]

SM90 = ("cuda", 90, 32)  # Hopper (H100), warp size 32

# The ops with a Triton backend, whose launches :func:`launches` knows.
OPS = ("linear_memory", "momentum_memory", "deep_memory", "optimizer_update")


def backend_missing() -> str | None:
    """None when Triton's NVIDIA backend and its ptxas are here, else why not."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as err:
        return f"Triton or its NVIDIA backend is not installed ({err})"
    try:
        path = get_ptxas(SM90[1]).path
    except Exception as err:  # noqa: BLE001 - any failure to locate it means "not available"
        return f"no ptxas for sm_{SM90[1]} ({type(err).__name__}: {err})"
    if not path or not os.access(path, os.X_OK):
        return f"ptxas not found or not executable ({path!r})"
    return None


def _check_compiled_mode() -> None:
    if interpreted():
        raise RuntimeError(
            "benchmarks/_aot.py compiles the kernels, which TRITON_INTERPRET=1 replaces by "
            "interpreted functions: run it in a process without TRITON_INTERPRET"
        )


# --- recording launches ------------------------------------------------------------------------


@dataclass
class Launch:
    """One kernel launch as its launcher made it: the jit function, grid, arguments."""

    kernel: Any  # triton.runtime.jit.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.__name__

    def config(self) -> str:
        """The compile-time part: constexpr arguments and num_warps (e.g. ``BC=64 BK=64``)."""
        cons = [p.name for p in self.kernel.params if p.is_constexpr]
        bound = dict(zip([p.name for p in self.kernel.params], self.args, strict=False))
        bound.update(self.kwargs)
        parts = []
        for n in cons:
            v = bound.get(n)
            if n == "PREC" or v is None:
                continue
            parts.append(f"{n}={int(v) if isinstance(v, bool) else v}")
        parts.append(f"warps={self.kwargs.get('num_warps', 4)}")
        return " ".join(parts)


class _Recorder:
    def __init__(self, kernel: Any, out: list[Launch]):
        self.kernel, self.out = kernel, out

    def __getitem__(self, grid: tuple) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.out.append(Launch(self.kernel, tuple(grid), args, kwargs))

        return launch


@contextlib.contextmanager
def recording(*modules: Any) -> Iterator[list[Launch]]:
    """Within the block, launching any jit kernel of ``modules`` records it instead, all in one
    list in launch order."""
    _check_compiled_mode()
    from triton.runtime.jit import JITFunction

    out: list[Launch] = []
    kernels = [(m, n, f) for m in modules for n, f in vars(m).items() if isinstance(f, JITFunction)]
    for m, n, f in kernels:
        setattr(m, n, _Recorder(f, out))
    try:
        yield out
    finally:
        for m, n, f in kernels:
            setattr(m, n, f)


def _bind(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name, the function's own defaults filled in."""
    ba = inspect.signature(fn).bind(*args, **kwargs)
    ba.apply_defaults()
    return dict(ba.arguments)


def _contig(x: Any) -> Any:
    return None if x is None else x.contiguous()


def _linear_memory(args: tuple, kwargs: dict[str, Any]) -> tuple[list[Launch], str]:
    from nlgraph.kernels.linear_memory import triton as W

    final_state_grad = kwargs.pop("final_state_grad", False)
    a = _bind(W.linear_memory_triton, args, kwargs)
    K, S = W._kernels(), W._summary_kernels()  # the scan's and the chunk summaries' kernels
    q, k, v = a["q"], a["k"], a["v"]
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    C = min(a["chunk_size"], T)  # as linear_memory_triton
    gates = (a["alpha"], a["b"], a["c"])
    Qg, A, U, Wk, Kc, gC = W._summaries(q, k, v, *gates, a["scale"], a["read"], C)
    s0 = a["initial_state"]
    s0 = None if s0 is None else s0.to(torch.float32).reshape(B * H, Dv, Dk)
    with recording(K, S) as out:
        S.summaries_forward(q, k, v, *gates, a["scale"], a["read"], C)
        o, s_end, s_all, w = K.scan_forward(*map(_contig, (Qg, A, U, Wk, Kc, gC, s0)))
        # backward; the final state has a cotangent where a later segment or the loss reads it
        ds_last = s_end if final_state_grad else None
        K.scan_backward(*map(_contig, (Qg, A, Wk, Kc, gC, s_all, w, torch.empty_like(o), ds_last)))
        if S.backward_fits(C, Dk, Dv):  # else the summaries' backward is batched PyTorch
            cot = [torch.empty(0, device=k.device) if x is None else x
                   for x in (Qg, A, U, Wk, Kc, gC)]  # fmt: skip
            S.summaries_backward(q, k, v, *gates, a["scale"], a["read"], C, cot)
    return out, ""


def _momentum_memory(args: tuple, kwargs: dict[str, Any]) -> tuple[list[Launch], str]:
    from nlgraph.kernels.momentum_memory import triton as W
    from nlgraph.kernels.momentum_memory._validate import MAX_TRITON_WINDOW

    a = _bind(W.momentum_memory_triton, args, kwargs)
    if a["x"].shape[1] > MAX_TRITON_WINDOW:
        return [], f"window {a['x'].shape[1]} > {MAX_TRITON_WINDOW}: refused by the wrapper"
    K = W._kernels()
    ins = [_contig(a[n]) for n in ("x", "delta", "b", "a", "mu", "w0", "s0")]
    with recording(K) as out:
        K.window_forward(*ins)
        if K.backward_fits(a["x"].shape[1], a["x"].shape[-1]):
            K.window_backward(*ins, ins[5], ins[6])
    if len(out) == 1:
        return out, "backward: chunk form (no kernel at this size)"
    return out, ""


def _deep_memory(args: tuple, kwargs: dict[str, Any]) -> tuple[list[Launch], str]:
    from nlgraph.kernels.deep_memory import triton as W
    from nlgraph.kernels.deep_memory._validate import check_inputs, initial_state

    a = _bind(W.deep_memory_triton, args, kwargs)
    opts = {n: a[n] for n in ("read", "objective", "activation", "residual")}
    q, k, v, lr, mom, fg = (a[n] for n in ("q", "k", "v", "lr", "momentum", "forget"))
    dims = check_inputs(q, k, v, lr, mom, fg, params0=a["params0"], state=a["state"],
                        chunk_size=a["chunk_size"], **opts)  # fmt: skip
    why = W.fits(dims, a["params0"], a["chunk_size"])
    if why is not None:
        return [], f"delegated to the chunk form: {why}"
    params, moms, starts, phase = initial_state(a["params0"], a["state"], dims)
    names = dims.names
    K = W._kernels()
    with recording(K) as out:
        K.sequence_forward(
            *map(_contig, (q, k, v, lr, mom, fg)), [_contig(params[n]) for n in names],
            [_contig(moms[n]) for n in names], [_contig(starts[n]) for n in names], phase,
            a["chunk_size"], *opts.values(),
        )  # fmt: skip
    return out, "backward: chunk form (no kernel)"


def _optimizer_update(args: tuple, kwargs: dict[str, Any]) -> tuple[list[Launch], str]:
    from nlgraph.kernels.optimizer import triton as W
    from nlgraph.kernels.optimizer._validate import check

    a = _bind(W.optimizer_update_triton, args, kwargs)
    hp = check(**a)
    with recording(W) as out:
        W.launch(a["param"], a["grad"], a["m"], a["v"], a["vmax"], a["spans"], hp)
    return out, ""


_LAUNCHES = {
    "linear_memory": _linear_memory,
    "momentum_memory": _momentum_memory,
    "deep_memory": _deep_memory,
    "optimizer_update": _optimizer_update,
}


def launches(op: str, *args: Any, **kwargs: Any) -> tuple[list[Launch], str]:
    """The kernel launches of one call of ``op``'s Triton backend (forward and, where it is a
    kernel, backward), and a note (why nothing is launched, or that backward is not a kernel).

    The arguments are those of the op's Triton wrapper (``linear_memory_triton``,
    ``momentum_memory_triton``, ``deep_memory_triton``, ``optimizer_update_triton``), tensors
    best on the ``meta`` device (spans of the optimizer on the CPU); ``linear_memory`` also takes
    ``final_state_grad`` (default False): whether the backward gets a cotangent of the final
    state (a kernel specialisation).
    """
    if op not in _LAUNCHES:
        raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
    return _LAUNCHES[op](args, kwargs)


# --- recording a model's op calls --------------------------------------------------------------


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        if x.dtype in (torch.int64, torch.int32) and x.device.type == "cpu" and x.ndim == 2:
            return x.clone()  # the optimizer's spans: read on the host
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    if isinstance(x, dict):
        return {k: _to_meta(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_meta(v) for v in x)
    return x


@contextlib.contextmanager
def _ops_answered_by_chunk() -> Iterator[list[tuple[str, tuple, dict[str, Any]]]]:
    """Every op's ``triton`` backend records its call (as meta tensors) and runs the chunked
    form (the reference where there is none)."""
    import nlgraph.kernels.deep_memory  # noqa: F401 - registers the backends
    import nlgraph.kernels.linear_memory  # noqa: F401
    import nlgraph.kernels.momentum_memory  # noqa: F401
    import nlgraph.kernels.optimizer  # noqa: F401
    from nlgraph.kernels import _dispatch

    calls: list[tuple[str, tuple, dict[str, Any]]] = []
    saved = {}
    for op, impls in _dispatch._REGISTRY.items():
        if "triton" not in impls:
            continue
        saved[op] = impls["triton"]
        stand_in = impls.get("chunk", impls["reference"])[0]

        def rec(*args: Any, _op: str = op, _fn: Callable = stand_in, **kwargs: Any) -> Any:
            calls.append((_op, _to_meta(args), _to_meta(kwargs)))
            return _fn(*args, **kwargs)

        impls["triton"] = (rec, lambda: True)
    try:
        yield calls
    finally:
        for op, entry in saved.items():
            _dispatch._REGISTRY[op]["triton"] = entry


def record_model(
    name: Any, batch: int = 8, seq: int = 32, optimizer: str | None = "AdamW", **sizes: Any
) -> list[tuple[str, tuple, dict[str, Any]]]:
    """The distinct calls of Triton ops that one training step of a language model makes
    (forward, backward and, with ``optimizer``, one ``nlgraph.optim`` step on the Triton
    backend), float32 on the CPU with the chunked forms standing in; arguments as meta tensors.

    ``name``: a library model (built with ``sizes``) or a graph taking ``tokens``."""
    import nlgraph.optim as nlo
    from nlgraph.compiler import compile as nl_compile
    from nlgraph.library import get
    from nlgraph.train.trainer import next_token_loss

    with _ops_answered_by_chunk() as calls:
        torch.manual_seed(0)
        graph = get(name, **sizes) if isinstance(name, str) else name
        learner = nl_compile(graph, backend="triton")
        vocab = learner.slow["embed"].num_embeddings
        tokens = torch.randint(0, vocab, (batch, seq))
        out, _ = learner({"tokens": tokens}, None, loss_fn=next_token_loss(tokens))
        out["loss"].backward()
        if optimizer is not None:
            opt = getattr(nlo, optimizer)(learner.parameters(), lr=3e-3, weight_decay=0.01)
            opt.backend = "triton"
            opt.step()
    distinct: dict[str, tuple[str, tuple, dict[str, Any]]] = {}
    for call in calls:
        distinct.setdefault(_describe(call), call)
    return list(distinct.values())


def _describe(call: tuple[str, tuple, dict[str, Any]]) -> str:
    def d(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            spans = x.tolist() if x.device.type == "cpu" else None
            return f"{str(x.dtype)[6:]}{list(x.shape)}" + (f"={spans}" if spans else "")
        if isinstance(x, dict):
            return "{" + ", ".join(f"{k}: {d(v)}" for k, v in x.items()) + "}"
        if isinstance(x, (list, tuple)):
            return "[" + ", ".join(d(v) for v in x) + "]"
        return repr(x)

    op, args, kwargs = call
    return f"{op}({d(list(args))[1:-1]}{', ' if kwargs else ''}{d(kwargs)[1:-1]})"


# --- compiling ---------------------------------------------------------------------------------


@dataclass
class Compiled:
    """What compiling one launch for the target gave."""

    kernel: str
    config: str
    ok: bool
    error: str = ""
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    shared: int | None = None
    seconds: float = 0.0


_PTXAS = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill "
    r"loads.*?Used (?P<regs>\d+) registers",
    re.S,
)


# The most shared memory one block may opt into, by compute capability (Triton's runtime refuses
# a kernel over it at its first launch): sm_90, 227 KiB.
MAX_SHARED = {90: 232448}


def _specialise(launch: Launch, target: tuple[str, int, int]) -> tuple[Any, Any, Any]:
    """``(source, options, GPUTarget)`` as ``JITFunction.run`` builds them for a first launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    gpu = GPUTarget(*target)
    backend = make_backend(gpu)
    kwargs = dict(launch.kwargs)
    # what JITFunction.run adds before binding, as far as this Triton version's options know it
    # (Triton 3.6, on the lent GPU machines, has no fpsan_homomorphic_casts)
    known = backend.parse_options({}).__dict__
    added = dict(debug=bool(fn.debug), instrumentation_mode="", fpsan_homomorphic_casts=False)
    kwargs.update({k: v for k, v in added.items() if k in known})
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return ASTSource(fn, signature, constexprs, attrs), options, gpu


def key(launch: Launch, target: tuple[str, int, int] = SM90) -> str:
    """Equal for launches that compile to the same binary (same specialisation and options)."""
    _check_compiled_mode()
    src, options, _ = _specialise(launch, target)
    return f"{src.hash()}-{options.hash()}"


def compile_launch(launch: Launch, target: tuple[str, int, int] = SM90) -> Compiled:
    """Compile ``launch`` for ``target`` as Triton's runtime would on a first launch there (same
    specialisation and options), always afresh so that ptxas runs and reports its usage. A
    kernel that needs more shared memory than the target has is a failure (it cannot launch)."""
    _check_compiled_mode()
    import triton
    from triton import knobs

    res = Compiled(launch.name, launch.config(), ok=False)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        src, options, gpu = _specialise(launch, target)
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True
            knobs.nvidia.dump_ptxas_log = True
            kernel = triton.compile(src, target=gpu, options=options.__dict__)
    except Exception as err:  # noqa: BLE001 - a compile error is a result here
        res.error = f"{type(err).__name__}: {_first_lines(str(err))}"
        res.seconds = time.perf_counter() - t0
        return res
    res.seconds = time.perf_counter() - t0
    res.ok = True
    res.shared = int(kernel.metadata.shared)
    m = _PTXAS.search(log.getvalue())
    if m is not None:
        res.registers = int(m["regs"])
        res.stack, res.spill_stores, res.spill_loads = int(m["stack"]), int(m["st"]), int(m["ld"])
    else:
        res.ok = False
        res.error = "no resource usage in the ptxas log"
    limit = MAX_SHARED.get(target[1])
    if limit is not None and res.shared > limit:
        res.ok = False
        res.error = f"needs {res.shared} bytes of shared memory; sm_{target[1]} has {limit}"
    return res


def _first_lines(text: str, n: int = 5) -> str:
    """The error's first line and its last ``n - 1`` (the cause, after any source excerpt)."""
    lines = [ln.strip() for ln in text.strip().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("Repro command")]
    if len(lines) > n:
        lines = [lines[0], "...", *lines[-(n - 1) :]]
    return " | ".join(lines)[:800]


# --- one configuration per kernel --------------------------------------------------------------


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An empty tensor on the meta device: launches are recorded without memory."""
    return torch.empty(shape, dtype=dtype, device="meta")


def representative() -> list[tuple[str, tuple, dict[str, Any]]]:
    """One op call per kernel family, at shapes a tiny model runs (quick to compile): a gated
    delta rule at the tiny preset's head width (d=32, 32 tokens, so C=32; carried state: all four
    scan kernels), the tiny Hope's self-modifying memory window (C=8, 8 heads, 32 -> 64), a
    depth-2 Titans memory at widths 16 (C=16, momentum and forgetting) and AdamW over an aligned
    flat buffer."""
    B, T, H, D = 8, 32, 2, 32
    g = meta(B, T, H)
    delta = ("linear_memory", (meta(B, T, H, D), meta(B, T, H, D), meta(B, T, H, D), g, g, g),
             {"initial_state": meta(B, H, D, D), "chunk_size": 64})  # fmt: skip
    B, C, H, I, O = 8, 8, 8, 32, 64
    gate = meta(B, C, H)
    window = ("momentum_memory", (meta(B, C, H, I), meta(B, C, H, O), gate, gate, gate,
                                  meta(B, H, O, I), meta(B, H, O, I)), {})  # fmt: skip
    B, T, H, D = 4, 1024, 16, 16
    x, gate = meta(B, T, H, D), meta(B, T, H)
    w = {"W1": meta(H, D, D), "W2": meta(H, D, D)}
    titans = ("deep_memory", (x, x, x, gate, gate, gate), {"params0": w, "chunk_size": 16})
    n = 4096 * 64
    flat = meta(n)
    adamw = ("optimizer_update", (flat, flat, flat, flat, None, torch.tensor([[0, n]])),
             {"rule": "adam", "lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
              "weight_decay": 0.01, "decoupled": True})  # fmt: skip
    return [delta, window, titans, adamw]
