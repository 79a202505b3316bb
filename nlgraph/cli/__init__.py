"""The ``nlgraph`` command line: one entry point, one verb per task.

Errors are one line on stderr with exit code 2 (``--debug`` shows the traceback); ``compile
--verify`` exits 1 when the chosen backend disagrees with the reference. See ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from nlgraph._argtypes import bounded_int
from nlgraph._argtypes import dim as _dim
from nlgraph._argtypes import seed as _seed
from nlgraph._errors import NLGraphError
from nlgraph.cli._bench import _cmd_bench
from nlgraph.cli._bench_optim import EXAMPLES as BENCH_OPTIM_EXAMPLES
from nlgraph.cli._bench_optim import add_bench_optim_parser, cmd_bench_optim
from nlgraph.cli._common import UsageError, _Parser, load_spec
from nlgraph.cli._compile import _cmd_compile
from nlgraph.cli._env import _cmd_env

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
    "bench": (
        "nlgraph bench titans --seq 256\n"
        "  nlgraph bench deltanet --backends reference,chunk --batch 2 --seq 512\n"
        "  nlgraph bench hope --backends chunk --seq 64 --repeats 1"
    ),
}

SPEC_HELP = "a library name, a .json/.yaml file, module:function, or - for stdin"


INTERNAL_ERROR = 3  # exit code of a bug in nlgraph (2: a user error, 1: --verify mismatch)

# Limits of the command line's sizes (docs/cli.md, "Limits"), checked before any work starts.
_BATCH = bounded_int(4096, "sequences per batch")
_SEQ = bounded_int(65536, "tokens per sequence")
_REPEATS = bounded_int(1000, "timed repeats")
_TICKS = bounded_int(4096, "columns of the drawn timeline")


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
    path = render(graph, args.output, kind=args.kind, ticks=args.ticks or 128, detail=args.detail)
    print(f"wrote {path}")
    return 0


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
    p.add_argument("--ticks", type=_TICKS, metavar="N", help="timeline width (default 128)")
    p.add_argument(
        "--detail",
        choices=["collapsed", "full"],
        default=None,
        help="nesting only: identical blocks once, groups of levels as one node (collapsed, "
        "the default), or every level and edge (full)",
    )

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
        choices=["auto", "reference", "chunk", "triton"],
        default=None,
        help="kernel backend (default: auto; chunk with --verify); triton needs a GPU or "
        "TRITON_INTERPRET=1 and computes in float32",
    )
    p.add_argument(
        "--dim", type=_dim, action="append", default=[], metavar="NAME=INT",
        help="bind a symbolic width (repeatable); vocab=N sizes token inputs",
    )  # fmt: skip
    p.add_argument("--batch", type=_BATCH, default=2, metavar="B", help="default 2")
    p.add_argument("--seq", type=_SEQ, default=16, metavar="T", help="default 16")
    p.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default=None,
        help="default float32; float64 with --verify",
    )
    p.add_argument("--seed", type=_seed, default=0, help="parameters and inputs (default 0)")

    verb("env", "print versions, devices and kernel backends for a bug report", _cmd_env)
    p = verb("bench", "time a graph's forward and training step per backend", _cmd_bench)
    p.add_argument("spec", metavar="SPEC", help=SPEC_HELP)
    p.add_argument("--backends", default="reference,chunk", help="comma list, first = baseline")
    p.add_argument("--batch", type=_BATCH, default=2)
    p.add_argument("--seq", type=_SEQ, default=128)
    p.add_argument("--repeats", type=_REPEATS, default=3)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--dim", type=_dim, action="append", default=[], metavar="NAME=INT")
    # The trainer's verb imports only argparse-level code until it runs.
    from nlgraph.train.cli import EXAMPLES as TRAIN_EXAMPLES
    from nlgraph.train.cli import add_train_parser, cmd_train

    EXAMPLES["train"] = TRAIN_EXAMPLES
    add_train_parser(sub, lambda name, help: verb(name, help, cmd_train))
    from nlgraph.evals.cli import EXAMPLES as EVAL_EXAMPLES
    from nlgraph.evals.cli import add_eval_parser, cmd_eval

    EXAMPLES["eval"] = EVAL_EXAMPLES
    add_eval_parser(sub, lambda name, help: verb(name, help, cmd_eval))
    EXAMPLES["bench-optim"] = BENCH_OPTIM_EXAMPLES
    add_bench_optim_parser(lambda name, help: verb(name, help, cmd_bench_optim))
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
    except MemoryError:  # a resource limit, not a bug: the sizes asked for do not fit
        if args.debug:
            raise
        print(f"nlgraph {args.verb}: error: out of memory; make the batch, sequence or model "
              "smaller", file=sys.stderr)  # fmt: skip
        return 2
    except KeyboardInterrupt:
        print(f"nlgraph {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # anything else is a bug in nlgraph: keep the traceback, say so
        traceback.print_exc()
        print(f"nlgraph {args.verb}: internal error (a bug in nlgraph, not in your input); "
              "please report it with the traceback above and the output of `nlgraph env`",
              file=sys.stderr)  # fmt: skip
        return INTERNAL_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
