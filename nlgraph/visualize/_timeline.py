"""The update timeline: which level updates at which token tick (PAPER.md 5.1, the CMS picture of
chunks along a time axis).

Ticks count tokens of one stream from 1. A level every ``n`` tokens with offset ``o`` updates at
``o, o + n, ...`` (``n, 2n, ...`` when ``o = 0``; ``nlgraph.clock.Frequency.updates_at``); a chunk
level counts chunks of its chunk size; sequence- and step-level levels update when a sequence of
``seq_len`` tokens ends (one outer step consumes one sequence per batch row); frozen levels never.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nlgraph._errors import BackendUnavailableError
from nlgraph.graph import Graph
from nlgraph.level import GraphSpec, Level
from nlgraph.visualize._common import as_spec, elide, frequency_label, ordered_tiers
from nlgraph.visualize._style import TIER_FILLS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["update_ticks", "timeline"]


def _ticks_of(spec: GraphSpec, level: Level, ticks: int, seq_len: int) -> list[int]:
    freq = level.frequency
    if freq.unit == "never":
        return []
    if freq.unit == "token":
        return [t for t in range(1, ticks + 1) if freq.updates_at(t)]
    size = spec.chunk_of(level) if freq.unit == "chunk" else seq_len
    return [t for t in range(size, ticks + 1, size) if freq.updates_at(t // size)]


def update_ticks(
    graph: Graph | GraphSpec, ticks: int, seq_len: int | None = None
) -> dict[str, list[int]]:
    """The token ticks in ``1..ticks`` at which each level updates, fastest level first.

    Args:
        graph: the learner (validated first).
        ticks: how many token ticks to cover.
        seq_len: tokens per sequence, for sequence- and step-level levels (default: ``ticks``,
            i.e. the window is one sequence and they update at its last token).

    Example: levels every 1, 4 and 16 tokens give ``[1, 2, ...]``, ``[4, 8, ...]``,
    ``[16, 32, ...]``; ``every(4, offset=2)`` gives ``[2, 6, 10, ...]``.
    """
    spec = as_spec(graph)
    if isinstance(ticks, bool) or not isinstance(ticks, int) or ticks < 1:
        raise ValueError(f"ticks must be a positive int, got {ticks!r}")
    seq = ticks if seq_len is None else seq_len
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        raise ValueError(f"seq_len must be a positive int or None, got {seq_len!r}")
    return {
        name: _ticks_of(spec, spec.level(name), ticks, seq)
        for tier in ordered_tiers(spec)
        for name in tier.names
    }


def timeline(graph: Graph | GraphSpec, ticks: int = 128, seq_len: int | None = None) -> Figure:
    """A Gantt-style chart of :func:`update_ticks`: one row per level (fastest at the top), a
    mark at every update, the stretches between updates shaded as chunks, sequence ends dashed.

    Returns a ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state); save it with
    ``fig.savefig(path)`` or :func:`nlgraph.visualize.render`.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BackendUnavailableError(
            "the update timeline is drawn with matplotlib, which is not installed; "
            "install it with `pip install matplotlib` (or `pip install nlgraph[plot]`)"
        ) from None

    spec = as_spec(graph)
    updates = update_ticks(spec, ticks, seq_len)
    seq = ticks if seq_len is None else seq_len
    tiers = ordered_tiers(spec)
    rows = _rows(spec, updates)
    n = len(rows)

    fig = Figure(figsize=(10, 1.2 + 0.42 * n), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    # Tick t spans [t - 1, t] on the x axis, so an update at tick t is a mark at x = t.
    for i, (rank, names, marks) in enumerate(rows):
        y = n - 1 - i  # fastest at the top
        fill = TIER_FILLS[min(len(tiers) - rank, len(TIER_FILLS) - 1)]
        # Shade each chunk (the stretch a level holds its state between two updates) in
        # alternating tints, so chunk boundaries read at a glance.
        bounds = [0, *marks, ticks] if not marks or marks[-1] != ticks else [0, *marks]
        for j in range(len(bounds) - 1):
            a, b = bounds[j], bounds[j + 1]
            shade = fill if j % 2 == 0 else "#FFFFFF"
            ax.barh(y, b - a, left=a, height=0.7, color=shade, edgecolor="none")
        ax.vlines(marks, y - 0.35, y + 0.35, color="#D55E00", linewidth=1.4, zorder=3)
        if not marks:
            frozen = spec.level(names[0]).frequency.unit == "never"
            ax.text(
                ticks / 2,
                y,
                "frozen" if frozen else "no update in this window",
                ha="center",
                va="center",
                fontsize=8,
                color="#777777",
            )
    for end in range(seq, ticks + 1, seq):
        ax.axvline(end, color="#555555", linestyle="--", linewidth=0.8, zorder=1)
    ax.set_yticks(range(n - 1, -1, -1), [_row_label(spec, r, ns) for r, ns, _ in rows], fontsize=8)
    ax.set_xlim(0, ticks * 1.01 + 0.5)  # room for the marks at the last tick
    ax.set_ylim(-0.6, n - 0.4)
    ax.set_xlabel(f"token tick (1..{ticks}; dashed: end of a sequence of {seq} tokens)")
    ax.set_title(f"{spec.name}: when each level updates (marks) and the chunks it holds (shading)")
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def _rows(spec: GraphSpec, updates: dict[str, list[int]]) -> list[tuple[int, list[str], list[int]]]:
    # One row per level of Def. 2 and schedule: a model's dozens of per-step parameters share
    # one row instead of drawing the same single mark dozens of times.
    rows: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for tier in ordered_tiers(spec):
        for name in tier.names:
            rows.setdefault((tier.rank, tuple(updates[name])), []).append(name)
    return [(rank, names, list(marks)) for (rank, marks), names in rows.items()]


def _row_label(spec: GraphSpec, rank: int, names: list[str]) -> str:
    freqs = " / ".join(sorted({frequency_label(spec, spec.level(n)) for n in names}))
    if len(names) == 1:
        return f"{names[0]} (level {rank})\n{freqs}"
    listed = elide(", ".join(names), 40)
    return f"level {rank}: {len(names)} levels · {freqs}\n{listed}"
