"""``nlgraph eval``: the parser and the command, for ``nlgraph/cli`` to wire in.

Wiring (in ``build_parser``)::

    from nlgraph.evals.cli import EXAMPLES as EVAL_EXAMPLES, add_eval_parser
    EXAMPLES["eval"] = EVAL_EXAMPLES
    add_eval_parser(sub, lambda name, help: verb(name, help, _cmd_eval_stub))

``add_eval_parser`` sets ``func=cmd_eval`` itself, so whatever ``make_verb`` set is replaced.
"""

from __future__ import annotations

import argparse
import ast
import re
from collections.abc import Callable
from typing import Any

from nlgraph._argtypes import positive_int as _positive_int
from nlgraph._argtypes import seed as _seed
from nlgraph.evals.errors import EvalConfigError

__all__ = ["add_eval_parser", "cmd_eval", "EXAMPLES"]

EXAMPLES = (
    "nlgraph eval                        # every suite, the four default models (~10 min)\n"
    "  nlgraph eval --quick              # seconds: the smoke test of the whole pipeline\n"
    "  nlgraph eval mqar --seeds 3       # mean±std over seeds 0, 1, 2\n"
    "  nlgraph eval formal --languages parity,aa --models hope,transformer --steps 400\n"
    "  nlgraph eval mqar niah --models deltanet,hope_attention --out runs/recall\n"
    "  nlgraph eval continual --size cms_lrs=1.0 --jobs 1"
)
SUITES = ("mqar", "niah", "formal", "continual")


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _size(text: str) -> tuple[str, Any]:
    m = re.fullmatch(r"([A-Za-z_]\w*)=(.+)", text)
    if m:
        try:
            value = ast.literal_eval(m.group(2))
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, int | float | tuple | list) and not isinstance(value, bool):
            return m.group(1), list(value) if isinstance(value, tuple) else value
    raise argparse.ArgumentTypeError(
        f"expected NAME=NUMBER or NAME=N,M,... (e.g. d=64, cms_chunks=8,32), got {text!r}"
    )


def add_eval_parser(sub: Any, make_verb: Callable[[str, str], argparse.ArgumentParser]) -> Any:
    """Add the ``eval`` verb: ``make_verb(name, help)`` returns its (sub)parser."""
    p = make_verb(
        "eval",
        "train small models on synthetic suites (MQAR, NIAH, formal languages, a continual "
        "stream) and score them beside the paper's numbers",
    )
    p.set_defaults(func=cmd_eval)
    a = p.add_argument
    a("suites", nargs="*", metavar="SUITE", help=f"some of {', '.join(SUITES)} (default all)")
    a(
        "--models",
        type=_names,
        default=None,
        metavar="A,B",
        help="library models or memories (default linear_attention,transformer,titans_lm,hope)",
    )
    a(
        "--languages",
        type=_names,
        default=None,
        metavar="A,B",
        help="formal languages (default parity,aa,abab,anbn,anbncn,shuffle2)",
    )
    a(
        "--continual-models",
        type=_names,
        default=None,
        metavar="A,B",
        help="models with CMS levels for the continual stream (default hope_attention)",
    )
    a("--quick", action="store_true", help="tiny budgets: the whole run in seconds")
    a("--steps", type=_positive_int, default=None, help="outer steps per model, every suite")
    a("--batch", type=_positive_int, default=None, help="training batch, every suite")
    a(
        "--size",
        type=_size,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="model size override, repeatable (d=64, chunk=4, cms_chunks=8,32, cms_lrs=1.0)",
    )
    a("--seed", type=_seed, default=0, help="initialisation and data (default 0)")
    a(
        "--seeds",
        type=_positive_int,
        default=1,
        metavar="N",
        help="run everything with seeds SEED..SEED+N-1 and report mean±std (default 1)",
    )
    a(
        "--jobs",
        type=_positive_int,
        default=2,
        help="training runs in parallel, one core each (default 2)",
    )
    a(
        "--out",
        default="nlgraph-eval",
        metavar="DIR",
        help="where <suite>.json and <suite>.txt go (default ./nlgraph-eval)",
    )
    return p  # fmt: skip


def cmd_eval(args: argparse.Namespace) -> int:
    """Run ``nlgraph eval``; 0 when every suite ran (whatever the directions found)."""
    from nlgraph.evals.models import DEFAULT_MODELS
    from nlgraph.evals.run import run_suites

    names = args.suites or list(SUITES)
    bad = [s for s in names if s not in SUITES]
    if bad:
        raise EvalConfigError(f"unknown suite {bad[0]!r}; expected some of {', '.join(SUITES)}")
    if args.languages and "formal" not in names:
        raise EvalConfigError("--languages applies to the formal suite, which is not selected")
    common: dict[str, Any] = {}
    if args.steps:
        common["steps"] = args.steps
    if args.batch:
        common["batch"] = args.batch
    if args.size:
        common["sizes"] = dict(args.size)
    overrides = {s: dict(common) for s in names}
    if args.languages:
        overrides["formal"]["languages"] = args.languages
    if args.continual_models and "continual" in names:
        overrides["continual"]["models"] = args.continual_models
    run_suites(
        names, models=args.models or list(DEFAULT_MODELS), quick=args.quick,
        overrides=overrides, seed=args.seed, seeds=args.seeds, out=args.out, jobs=args.jobs,
    )  # fmt: skip
    return 0
