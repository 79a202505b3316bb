"""Where ``nlgraph train`` talks: permanent lines, phases, and one live status line on a terminal.

On a terminal (``isatty``) the status line is redrawn in place with ``\\r`` and cut to the
terminal's width. Anywhere else (a file, a pipe, CI) nothing is ever redrawn: every write ends
a line, so ``grep``/``tail`` see one line per report and no carriage returns.

A *phase* is work that may be silent for seconds (building a model, the first step, a
validation pass, writing results): :meth:`Console.begin` writes ``"what ..."`` before it starts
and :meth:`Console.end` completes that same line with the outcome and the time it took, e.g.
``hope: step 160/1600 validating 16 windows ... 4.0443 bits/byte (1.2 s)``.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["Console", "format_duration", "format_seconds"]


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (rounded to the second)."""
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def format_seconds(seconds: float) -> str:
    """A phase's time: ``0.4 s`` below a minute, else ``H:MM:SS``."""
    return f"{seconds:.1f} s" if seconds < 59.95 else format_duration(seconds)


class Console:
    """Lines to ``stream`` (stderr by default).

    Args:
        stream: where to write; its ``isatty()`` picks terminal or plain behaviour.
        enabled: ``False`` writes nothing at all.
        live: ``False`` drops the status line (``--no-progress``); lines and phases stay.
        tty: overrides ``stream.isatty()`` (tests).
        clock: seconds, for the phases' times (tests pass a fake one).
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        enabled: bool = True,
        live: bool = True,
        tty: bool | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.tty, self.enabled, self.live, self.clock = tty, enabled, live, clock
        self.shown = ""  # the status line now on screen (terminal only)
        self.phase: str | None = None  # the open phase's text, written without its end
        self.phase_cut = False  # a line came between the phase's start and its end
        self.phase_t0 = 0.0

    # ------------------------------------------------------------------ writing
    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def clear(self) -> None:
        """Remove the status line from the terminal (before other output, or at the end)."""
        if self.enabled:
            self._clear_status()

    def _clear_status(self) -> None:
        if self.shown:
            self._write("\r" + " " * len(self.shown) + "\r")
            self.shown = ""

    def _cut_phase(self) -> None:
        """End the open phase's line early (something else must be said first)."""
        if self.phase is not None and not self.phase_cut:
            self._write("\n")
            self.phase_cut = True

    def line(self, text: str) -> None:
        """A permanent line; never overwritten."""
        if not self.enabled:
            return
        self._clear_status()
        self._cut_phase()
        self._write(text + "\n")

    def status(self, text: str) -> None:
        """The live line: redrawn in place on a terminal, a plain line elsewhere.

        Callers throttle it (:class:`~nlgraph.train.progress.Progress` every 0.2 s on a
        terminal, every 10 s elsewhere)."""
        if not (self.enabled and self.live) or self.phase is not None:
            return
        if not self.tty:
            self._write(text + "\n")
            return
        text = self.fit(text)
        pad = max(len(self.shown) - len(text), 0)
        self._write("\r" + text + " " * pad)
        self.shown = text

    def width(self) -> int:
        return shutil.get_terminal_size(fallback=(100, 24)).columns

    def fit(self, text: str) -> str:
        """``text`` cut to the terminal's width (a line that wraps cannot be redrawn)."""
        room = max(self.width() - 1, 20)
        return text if len(text) <= room else text[: room - 1] + "…"

    # ------------------------------------------------------------------ phases
    def begin(self, text: str) -> None:
        """Announce a phase that may be silent for a while: writes ``text ...`` now."""
        if self.phase is not None:  # a phase left open: close it without an outcome
            self.end("")
        self.phase, self.phase_cut, self.phase_t0 = text, False, self.clock()
        if self.enabled:
            self._clear_status()
            self._write(text + " ...")

    def end(self, outcome: str, timed: bool = True) -> str:
        """Complete the phase's line with ``outcome`` (and its time); returns the whole line.

        If other lines were written during the phase, its text is repeated so that the
        outcome still reads as one line."""
        if self.phase is None:
            return outcome
        took = self.clock() - self.phase_t0
        tail = " ".join(p for p in (outcome, f"({format_seconds(took)})" if timed else "") if p)
        whole = f"{self.phase} ... {tail}".rstrip()
        if self.enabled:
            self._write((whole if self.phase_cut else (" " + tail if tail else "")) + "\n")
        self.phase = None
        return whole

    def elapsed(self) -> float:
        """Seconds since the open phase began (0 when none is open)."""
        return self.clock() - self.phase_t0 if self.phase is not None else 0.0
