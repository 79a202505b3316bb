"""``nlgraph bench-optim``: compare optimizers with the library's AdamW, Muon and M3 on small
standard problems (:func:`nlgraph.bench_optim.bench`)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from nlgraph._argtypes import bounded_int
from nlgraph._argtypes import seed as _seed
from nlgraph.cli._common import UsageError

__all__ = ["add_bench_optim_parser", "cmd_bench_optim", "EXAMPLES", "MAX_SPECS"]

EXAMPLES = (
    "nlgraph bench-optim my_optimizers:delta_adam       # ~3 min on a 2-core CPU\n"
    "  nlgraph bench-optim delta_adam.yaml my_optimizers:adam_sign --quick   # ~30 s\n"
    "  nlgraph bench-optim nesterov --problems least_squares,mlp --seeds 5 -o runs/nesterov\n"
    "  nlgraph bench-optim rmsprop --baselines adamw --lr-factors 0.25,0.5,1,2,4"
)
MAX_SPECS = 16  # optimizers named on one command line (each adds about a minute)
_SEEDS = bounded_int(100, "seeds per learning rate")
_MAX_FACTORS = 16


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",")]
    if not text.strip() or not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _factors(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or len(values) > _MAX_FACTORS or not all(0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(
            f"expected 1 to {_MAX_FACTORS} comma-separated positive numbers (factors of each "
            f"optimizer's default lr, e.g. 0.1,0.3,1,3,10), got {text!r}"
        )
    return values


def add_bench_optim_parser(make_verb: Callable[[str, str], argparse.ArgumentParser]) -> Any:
    """Add the ``bench-optim`` verb: ``make_verb(name, help)`` returns its (sub)parser."""
    p = make_verb(
        "bench-optim",
        "compare optimizers with the library's AdamW, Muon and M3 on three small problems at "
        "matched tuning over seeds (about 3 minutes on a 2-core CPU for one SPEC, under a "
        "minute more per extra SPEC; --quick: about 30 s)",
    )
    a = p.add_argument
    a(
        "specs",
        nargs="+",
        metavar="SPEC",
        help="optimizers to compare: a library name, a .json/.yaml file, module:function, or -",
    )
    a(
        "-o",
        "--out",
        default="nlgraph-bench-optim",
        metavar="DIR",
        help="where table.md, results.json and plot.png go (default ./nlgraph-bench-optim)",
    )
    a(
        "--quick",
        action="store_true",
        help="smaller problems, 3 learning rates, 2 seeds: about 30 s (the smoke test)",
    )
    a(
        "--problems",
        type=_names,
        default=None,
        metavar="A,B",
        help="some of least_squares, mlp, char_lm (default all)",
    )
    a(
        "--baselines",
        type=_names,
        default=None,
        metavar="A,B",
        help="library optimizers to compare against (default adamw,muon_adamw,m3_adamw; "
        "'none' for none)",
    )
    a(
        "--seeds",
        type=_SEEDS,
        default=None,
        metavar="N",
        help="seeds SEED..SEED+N-1 per learning rate (default 3; 2 with --quick)",
    )
    a("--seed", type=_seed, default=0, help="the first seed (default 0)")
    a(
        "--lr-factors",
        type=_factors,
        default=None,
        metavar="F,G",
        help="the learning-rate grid, factors of each optimizer's default lr "
        "(default 0.1,0.3,1,3,10; 0.3,1,3 with --quick)",
    )
    return p


def cmd_bench_optim(args: argparse.Namespace) -> int:
    """Run ``nlgraph bench-optim``; every refusal comes before any training or writing."""
    from nlgraph.bench_optim import DEFAULT_BASELINES, bench

    if len(args.specs) > MAX_SPECS:
        raise UsageError(
            f"{len(args.specs)} SPECs, more than {MAX_SPECS} (each adds about a minute); "
            "compare fewer at a time"
        )
    if args.specs.count("-") > 1:
        raise UsageError("stdin ('-') can hold one SPEC; save the others to files")
    baselines = DEFAULT_BASELINES if args.baselines is None else args.baselines
    if args.baselines == ["none"]:
        baselines = []
    result = bench(
        args.specs, baselines=baselines, problems=args.problems, seeds=args.seeds,
        seed=args.seed, quick=args.quick, factors=args.lr_factors, out=args.out, log=print,
    )  # fmt: skip
    for path in result.files:
        print(f"wrote {path}")
    return 0
