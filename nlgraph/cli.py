"""The ``nlgraph`` command line: one entry point, one verb per task.

Errors are one line on stderr with exit code 2 (``--debug`` shows the traceback); ``compile
--verify`` exits 1 when the chosen backend disagrees with the reference. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from nlgraph._errors import NLGraphError

__all__ = ["main", "load_spec", "build_parser"]

EXAMPLES = {
    "list": "nlgraph list\n  nlgraph list --kind optimizer",
    "show": (
        "nlgraph show adam\n  nlgraph show titans --format yaml\n  nlgraph show mypkg.models:build"
    ),
    "validate": "nlgraph validate spec.json\n  cat spec.yaml | nlgraph validate -",
    "viz": (
        "nlgraph viz titans -o titans.svg\n"
        "  nlgraph viz hope -o hope-ladder.png --kind ladder\n"
        "  nlgraph viz cms -o cms-timeline.pdf --kind timeline --ticks 512\n"
        "  nlgraph viz spec.yaml -o spec.dot        # DOT text, no graphviz needed"
    ),
    "compile": (
        "nlgraph compile titans --print-plan\n"
        "  nlgraph compile deltanet --verify --batch 2 --seq 9\n"
        "  nlgraph compile cms --verify --seq 20 --dtype float32\n"
        "  nlgraph compile spec.yaml --dim d=64 --dim vocab=1000 --verify"
    ),
    "env": "nlgraph env\n  nlgraph env > env.txt     # paste into a bug report",
}

SPEC_HELP = "a library name, a .json/.yaml file, module:function, or - for stdin"
# --verify tolerance: max |chosen - reference| / max |reference| per tensor.
TOLERANCE = {"float64": 1e-8, "float32": 1e-3}


class UsageError(NLGraphError):
    """A bad command line: an unknown flag, a malformed or out-of-range value."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting, so errors stay one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def load_spec(ref: str, stdin_text: str | None = None):
    """A graph from a library name, a ``.json``/``.yaml`` file, ``module:function`` or ``-``."""
    from nlgraph import library
    from nlgraph.serialize import from_json, from_yaml, load

    if ref == "-":
        text = sys.stdin.read() if stdin_text is None else stdin_text
        if text.lstrip().startswith("{"):
            return from_json(text, "<stdin>")
        return from_yaml(text, "<stdin>")
    path = Path(ref)
    if path.suffix in (".json", ".yaml", ".yml") or path.exists():
        return load(path)
    return library.get(ref)


# ------------------------------------------------------------------------------ list/show/...
def _cmd_list(args: argparse.Namespace) -> int:
    from nlgraph import library

    for entry in library.entries(args.kind):
        if args.verbose:
            print(f"{entry.name:28s} {entry.kind:10s} {entry.summary}")
        else:
            print(entry.name)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from nlgraph.serialize import to_json, to_yaml
    from nlgraph.validation import validate

    graph = load_spec(args.spec)
    spec = validate(graph.spec)
    if args.format == "json":
        print(to_json(spec))
    elif args.format == "yaml":
        print(to_yaml(spec), end="")
    else:
        from nlgraph.visualize import tree

        print(tree(spec))
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from nlgraph.topology import tiers
    from nlgraph.validation import validate

    graph = load_spec(args.spec)
    spec = validate(graph.spec)
    n = len(tiers(spec))
    print(f"ok: {spec.name!r} is valid ({len(spec.levels)} levels in {n} tiers)")
    return 0


def _cmd_viz(args: argparse.Namespace) -> int:
    from nlgraph.visualize import render

    if args.ticks is not None and args.kind != "timeline":
        raise UsageError(f"--ticks applies to --kind timeline only, not --kind {args.kind}")
    graph = load_spec(args.spec)
    path = render(graph, args.output, kind=args.kind, ticks=args.ticks or 128)
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------ compile
def _cmd_compile(args: argparse.Namespace) -> int:
    import torch

    from nlgraph.compiler import compile

    dims = dict(args.dim)
    dtype_name = args.dtype or ("float64" if args.verify else "float32")
    dtype = getattr(torch, dtype_name)
    backend = args.backend or ("chunk" if args.verify else "auto")
    graph = load_spec(args.spec)

    def build(b: str):
        torch.manual_seed(args.seed)
        return compile(graph, backend=b, dtype=dtype, **dims)

    forced = os.environ.get("NLGRAPH_BACKEND")
    if args.verify and forced:
        raise UsageError(
            f"NLGRAPH_BACKEND={forced} forces one backend on both sides of --verify; unset it "
            "and pick the backend to check with --backend"
        )
    learner = build(backend)
    plan = learner.plan
    n_params = sum(p.numel() for p in learner.parameters())
    lowerings = [lp.lowering for lp in plan.levels.values()]
    counts = ", ".join(f"{lowerings.count(k)} {k}" for k in sorted(set(lowerings)))
    print(
        f"compiled {plan.spec.name!r}: {len(lowerings)} levels ({counts}), "
        f"{n_params:,} parameters, backend {backend}, {dtype_name}"
    )
    if args.print_plan:
        print(plan)
    if not args.verify:
        return 0
    reference = build("reference")
    reference.load_state_dict(learner.state_dict())
    return _verify(reference, learner, args, dims, dtype_name)


def _verify(reference, chosen, args, dims: dict[str, int], dtype_name: str) -> int:
    """Run both learners on the same inputs and cotangent; print errors and times; 0 or 1."""
    import torch

    import nlgraph.kernels.deep_memory  # noqa: F401 - imported here, not inside the timed run
    import nlgraph.kernels.linear_memory  # noqa: F401

    dtype = getattr(torch, dtype_name)
    inputs = _random_inputs(chosen, (args.batch, args.seq), dims, dtype, args.seed)
    has_blocks = any(lp.lowering == "boundary" for lp in chosen.plan.levels.values())
    gen = torch.Generator().manual_seed(args.seed + 1)
    weights: dict[str, torch.Tensor] = {}  # shared, so both learners see the same numbers
    cotangents: dict[str, torch.Tensor] = {}

    def fixed(table: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in table:
            table[name] = torch.randn(like.shape, generator=gen, dtype=like.dtype)
        return table[name]

    def loss_fn(outputs: dict[str, torch.Tensor], start: int, end: int) -> torch.Tensor:
        total = 0.0
        for name, y in sorted(outputs.items()):
            full = y.new_empty((y.shape[0], args.seq, *y.shape[2:]))
            total = total + (y * fixed(weights, name, full)[:, start:end]).sum()
        return total

    def run(learner) -> tuple[dict[str, Any], dict[str, torch.Tensor], float]:
        learner.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        try:
            outputs, state = learner(inputs, loss_fn=loss_fn if has_blocks else None)
            flat = {f"output {k}": v for k, v in sorted(outputs.items())}
            flat.update({f"state {k}": v for k, v in _flatten(state)})
            pulled = {k: v for k, v in flat.items() if torch.is_tensor(v) and v.requires_grad}
            loss = sum((v * fixed(cotangents, k, v)).sum() for k, v in pulled.items())
            if pulled:
                loss.backward()
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise NLGraphError(
                f"the {learner.backend} learner failed on inputs "
                f"{ {k: list(v.shape) for k, v in inputs.items()} }: {first}"
            ) from err
        seconds = time.perf_counter() - t0
        grads = {f"grad {n}": p.grad for n, p in learner.named_parameters() if p.grad is not None}
        return flat, grads, seconds

    ref_values, ref_grads, ref_s = run(reference)
    new_values, new_grads, new_s = run(chosen)
    tol = TOLERANCE[dtype_name]
    rows = _compare({**ref_values, **ref_grads}, {**new_values, **new_grads})
    name = chosen.plan.spec.name
    print(
        f"verify {name!r}: {chosen.backend} vs reference, B={args.batch} T={args.seq} "
        f"{dtype_name}, seed {args.seed}, tolerance {tol:g} (max relative error)"
    )
    width = max(len(k) for k in rows) if rows else 6
    print(f"  {'tensor':{width}s}  {'max rel err':>11s}")
    bad = []
    for key, err in rows.items():
        ok = isinstance(err, float) and err <= tol
        text = f"{err:11.2e}" if isinstance(err, float) else f"{err:>11s}"
        print(f"  {key:{width}s}  {text}  {'ok' if ok else 'FAIL'}")
        if not ok:
            bad.append(key)
    ratio = ref_s / new_s if new_s > 0 else float("inf")
    print(
        f"  time (forward+backward): reference {ref_s * 1e3:.1f} ms, {chosen.backend} "
        f"{new_s * 1e3:.1f} ms, speed ratio (reference/{chosen.backend}) {ratio:.2f}x"
    )
    if bad:
        print(f"FAIL: {len(bad)} of {len(rows)} tensors exceed {tol:g}: {', '.join(bad)}")
        return 1
    print(f"ok: all {len(rows)} tensors within {tol:g}")
    return 0


def _random_inputs(learner, shape: tuple[int, int], dims: dict[str, int], dtype, seed: int):
    """Inputs of the spec's shapes: ``[B, T, dim]`` normals, or ``[B, T]`` token ids."""
    import torch
    from torch import nn

    B, T = shape
    gen = torch.Generator().manual_seed(seed)
    vocabs = [m.num_embeddings for m in learner.modules() if isinstance(m, nn.Embedding)]
    out: dict[str, torch.Tensor] = {}
    for inp in learner.plan.spec.inputs:
        if inp.kind == "tokens":
            if "vocab" in dims:
                vocab = dims["vocab"]
                if vocabs and vocab > min(vocabs):
                    raise UsageError(
                        f"--dim vocab={vocab} exceeds the learner's embedding of "
                        f"{min(vocabs)} rows; pass vocab <= {min(vocabs)}"
                    )
            elif vocabs:
                vocab = min(vocabs)
            else:
                raise UsageError(
                    f"input {inp.name!r} takes tokens but the learner has no nn.Embedding to "
                    "size them; pass --dim vocab=N"
                )
            out[inp.name] = torch.randint(vocab, (B, T), generator=gen)
            continue
        d = inp.dim
        if isinstance(d, str):
            if d not in dims:
                raise UsageError(f"input {inp.name!r} has symbolic width {d!r}; pass --dim {d}=N")
            d = dims[d]
        if d is None:
            raise UsageError(f"input {inp.name!r} declares no width; cannot make test inputs")
        out[inp.name] = torch.randn(B, T, d, generator=gen, dtype=dtype)
    return out


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, leaf)`` of nested state dicts and lists, in a fixed order."""
    if isinstance(value, dict):
        for k in sorted(value, key=str):
            yield from _flatten(value[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{prefix}.{i}")
    else:
        yield prefix, value


def _compare(ref: dict[str, Any], new: dict[str, Any]) -> dict[str, float | str]:
    """Max relative error per tensor (``str`` where they cannot be compared); equal non-tensor
    leaves (chunk phases, counters) are checked but not listed."""
    import torch

    rows: dict[str, float | str] = {}
    for key in list(ref) + [k for k in new if k not in ref]:
        a, b = new.get(key), ref.get(key)
        if not torch.is_tensor(b) and not torch.is_tensor(a):
            if a != b:
                rows[key] = "differs"
            continue
        if a is None or b is None:
            rows[key] = "missing"
        elif a.shape != b.shape:
            rows[key] = "shape"
        else:
            a, b = a.detach().double(), b.detach().double()
            scale = b.abs().max().clamp_min(1e-12) if b.numel() else 1.0
            err = ((a - b).abs().max() / scale).item() if b.numel() else 0.0
            rows[key] = err if err == err else float("inf")  # NaN fails the check
    return rows


# ------------------------------------------------------------------------------ env
def _cmd_env(args: argparse.Namespace) -> int:
    import platform

    rows: list[tuple[str, str]] = []
    import nlgraph

    rows.append(("nlgraph", nlgraph.__version__))
    rows.append(("python", f"{platform.python_version()} ({platform.python_implementation()})"))
    rows.append(("platform", platform.platform()))
    for name in ("torch", "triton", "numpy", "pydantic", "networkx", "graphviz", "matplotlib"):
        rows.append((name, _version(name)))
    rows.append(("dot", _dot_version()))
    try:
        import torch
    except ImportError:
        rows.append(("cuda", "torch not installed"))
    else:
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
            rows.append(("cuda", f"available: {n} device(s): {names} (CUDA {torch.version.cuda})"))
        else:
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only"
            rows.append(("cuda", f"not available (torch build: {build})"))
        rows.append(("threads", str(torch.get_num_threads())))
        rows += _kernel_rows()
    for var in ("NLGRAPH_BACKEND", "NLGRAPH_DEBUG"):
        rows.append((var, os.environ.get(var, "(unset)")))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:{width}s}  {v}" for k, v in rows))
    return 0


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _dot_version() -> str:
    import shutil
    import subprocess

    exe = shutil.which("dot")
    if exe is None:
        return "not found on PATH"
    try:
        done = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as err:
        return f"{exe}: cannot run ({err})"
    text = (done.stderr or done.stdout).strip().splitlines()
    return f"{text[0] if text else 'unknown version'} ({exe})"


def _kernel_rows() -> list[tuple[str, str]]:
    """Available backends per registered kernel op, fastest first, and what ``auto`` picks."""
    import importlib

    from nlgraph.kernels import _dispatch

    rows = []
    for mod in ("linear_memory", "deep_memory"):
        try:
            importlib.import_module(f"nlgraph.kernels.{mod}")
        except ImportError as err:
            rows.append((f"kernel {mod}", f"cannot import: {err}"))
    for op in sorted(_dispatch._REGISTRY):
        try:
            picked = f"auto picks {_dispatch.resolve_backend(op)}"
        except NLGraphError as err:
            picked = f"auto fails: {err}"
        rows.append((f"kernel {op}", f"{', '.join(_dispatch.available(op))} ({picked})"))
    return rows


# ------------------------------------------------------------------------------ parser
def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _dim(text: str) -> tuple[str, int]:
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(\d+)", text.strip())
    if not m or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(
            f"expected NAME=INT with a positive INT (e.g. d=64), got {text!r}"
        )
    return m.group(1), int(m.group(2))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nlgraph",
        description="Nested Learning as graphs of levels: declare, validate, draw, compile, train.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="SPEC is a library name (`nlgraph list`), a .json/.yaml file, or module:function.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str, help: str, func: Callable[[argparse.Namespace], int]) -> Any:
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog="examples:\n  " + EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.set_defaults(func=func)
        return p

    p = verb("list", "list the library's definitions, one name a line", _cmd_list)
    p.add_argument("--kind", choices=["optimizer", "memory", "model", "block"], default=None)
    p.add_argument("-v", "--verbose", action="store_true", help="add kind and summary")

    p = verb(
        "show", "print a graph's levels with frequencies, objectives and optimizers", _cmd_show
    )
    p.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--format", choices=["text", "json", "yaml"], default="text")

    p = verb(
        "validate", "check a spec; exit 0 when valid, 2 with the reason when not", _cmd_validate
    )
    p.add_argument("spec", metavar="SPEC", help=SPEC_HELP)

    p = verb("viz", "draw a graph to a file (.svg, .png, .pdf or .dot, from the suffix)", _cmd_viz)
    p.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write")
    p.add_argument(
        "--kind",
        choices=["nesting", "ladder", "timeline"],
        default="nesting",
        help="levels as nested boxes, the frequency ladder, or updates per token tick",
    )
    p.add_argument("--ticks", type=_positive, metavar="N", help="timeline width (default 128)")

    p = verb("compile", "build the PyTorch learner; print its plan; check it", _cmd_compile)
    p.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--print-plan", action="store_true", help="print the compiler's plan")
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare the backend with the reference on random inputs (exit 1 on mismatch)",
    )
    p.add_argument(
        "--backend",
        choices=["auto", "reference", "chunk"],
        default=None,
        help="kernel backend (default: auto; chunk with --verify)",
    )
    p.add_argument(
        "--dim", type=_dim, action="append", default=[], metavar="NAME=INT",
        help="bind a symbolic width (repeatable); vocab=N sizes token inputs",
    )  # fmt: skip
    p.add_argument("--batch", type=_positive, default=2, metavar="B", help="default 2")
    p.add_argument("--seq", type=_positive, default=16, metavar="T", help="default 16")
    p.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default=None,
        help="default float32; float64 with --verify",
    )
    p.add_argument("--seed", type=_seed, default=0, help="parameters and inputs (default 0)")

    verb("env", "print versions, devices and kernel backends for a bug report", _cmd_env)
    return parser


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        if "--debug" in argv:
            raise
        print(f"nlgraph: error: {_one_line(err)}", file=sys.stderr)
        return 2
    if args.verb is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (NLGraphError, OSError) as err:
        if isinstance(err, BrokenPipeError):
            return 0
        if args.debug:
            raise
        print(f"nlgraph {args.verb}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nlgraph {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
