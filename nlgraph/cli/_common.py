"""What every verb shares: the one-line usage error, the parser that raises it, SPEC loading."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nlgraph._errors import NLGraphError

__all__ = ["UsageError", "load_spec"]


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


def width_bindings(graph: Any, dims: dict[str, int]) -> dict[str, int]:
    """The ``--dim`` bindings for ``compile``: ``vocab`` sizes token inputs of random test
    inputs (``--verify``, ``bench``), so it goes to the compiler only when the spec names it
    as a symbolic width."""
    from nlgraph.compiler import symbolic_widths

    spec = graph.spec if hasattr(graph, "spec") else graph
    if "vocab" in dims and "vocab" not in symbolic_widths(spec):
        dims = {k: v for k, v in dims.items() if k != "vocab"}
    return dims


MAX_TOKENS = 1 << 20  # batch x sequence of random test inputs (docs/cli.md, "Limits")


def check_tokens(batch: int, seq: int) -> None:
    """Refuse test inputs of more than :data:`MAX_TOKENS` tokens before anything is built."""
    if batch * seq > MAX_TOKENS:
        raise UsageError(
            f"--batch {batch} x --seq {seq} = {batch * seq:,} tokens, more than {MAX_TOKENS:,}; "
            "make one of them smaller"
        )
