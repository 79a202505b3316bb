"""A plain-text progress bar on stderr: steps, tokens/s, loss, validation, ETA. No dependencies.

On a terminal it redraws one line with ``\\r``; elsewhere (logs, CI, pipes) it prints a line
every ``every_s`` seconds and at the end, so captured output stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _rate(x: float) -> str:
    return f"{x / 1000:.1f}k" if x >= 1000 else f"{x:.0f}"


class Progress:
    """``update(step, loss=..., tokens_per_s=...)`` after each step; ``close()`` at the end."""

    def __init__(
        self,
        label: str,
        total: int,
        start: int = 0,
        stream: TextIO | None = None,
        every_s: float = 10.0,
        width: int = 24,
        enabled: bool = True,
    ) -> None:
        self.label, self.total, self.start = label, max(total, 1), start
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = 0.2 if self.tty else every_s
        self.width, self.enabled = width, enabled
        self.t0 = time.perf_counter()
        self.last_print = -float("inf")
        self.val: float | None = None
        self.line = ""

    def text(self, step: int, loss: float | None, tokens_per_s: float) -> str:
        frac = min(step / self.total, 1.0)
        fill = int(frac * self.width)
        bar = "#" * fill + "." * (self.width - fill)
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        parts = [
            f"{self.label} [{bar}] {step}/{self.total}",
            f"{_rate(tokens_per_s)} tok/s",
            f"loss {loss:.3f}" if loss is not None else "loss -",
        ]
        if self.val is not None:
            parts.append(f"val {self.val:.3f} bpb")
        parts.append(f"ETA {format_duration(eta) if eta == eta else '?'}")
        return "  ".join(parts)

    def update(
        self, step: int, loss: float | None = None, tokens_per_s: float = 0.0, force: bool = False
    ) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.last_print < self.every_s and step < self.total:
            return
        self.last_print = now
        line = self.text(step, loss, tokens_per_s)
        if self.tty:
            pad = max(len(self.line) - len(line), 0)
            self.stream.write("\r" + line + " " * pad)
        else:
            self.stream.write(line + "\n")
        self.line = line
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line that must not be overwritten by the bar (validation results, warnings)."""
        if not self.enabled:
            return
        if self.tty and self.line:
            self.stream.write("\r" + " " * len(self.line) + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        self.line = ""

    def close(self) -> None:
        if self.enabled and self.tty and self.line:
            self.stream.write("\n")
            self.stream.flush()
        self.line = ""
