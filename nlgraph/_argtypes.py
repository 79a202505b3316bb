"""argparse value types shared by every command-line verb (torch-free)."""

from __future__ import annotations

import argparse
import re

__all__ = ["positive_int", "bounded_int", "seed", "positive_float", "dim", "MAX_SEED"]

MAX_SEED = 2**32 - 1  # every generator nlgraph seeds (torch, Python, numpy) takes 32 bits


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def bounded_int(most: int, why: str):
    """An argparse type: a positive integer of at most ``most`` (``why`` says why, in the
    message and in docs/cli.md, "Limits")."""

    def parse(text: str) -> int:
        value = positive_int(text)
        if value > most:
            raise argparse.ArgumentTypeError(
                f"expected a positive integer of at most {most:,} ({why}), got {text!r}"
            )
        return value

    return parse


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 0 and at most {MAX_SEED:,} (a 32-bit seed), got {text!r}"
        )
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def dim(text: str) -> tuple[str, int]:
    """``NAME=INT`` with a positive INT (a symbolic width's value)."""
    m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(\d+)", text.strip())
    if not m or int(m.group(2)) < 1:
        raise argparse.ArgumentTypeError(
            f"expected NAME=INT with a positive INT (e.g. d=64), got {text!r}"
        )
    return m.group(1), int(m.group(2))
