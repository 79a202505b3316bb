"""The frequency ladder: every level on one axis of update period, fastest at the top.

Token-clock levels sit on a log₂ axis of their period in tokens (the paper's chunk sizes, PAPER.md
1.2 and 5.7: 1, 16, 2K, 1M ...); levels updated per sequence, per outer step, or never (frozen)
are rungs beyond that axis, in that order. Like the paper's brain-wave picture, each rung carries
a wave whose density falls with its period.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nlgraph.graph import Graph
from nlgraph.level import GraphSpec
from nlgraph.visualize._common import (
    as_spec,
    frequency_label,
    html_lines,
    ordered_tiers,
    period_label,
    wrap,
)
from nlgraph.visualize._style import FONT, TIER_FILLS

if TYPE_CHECKING:
    import graphviz

__all__ = ["ladder", "ladder_text", "Rung", "rows"]

_MAX_TICKS = 12  # labelled ticks on the token axis before the stride grows past one octave
_UNIT_NAME = {1: "sequence", 2: "step"}


@dataclass(frozen=True)
class Rung:
    """One row of the ladder: an axis position, and the levels updating at that period.

    ``tiers`` is empty for a bare axis tick; else ``(level rank, names)`` per tier on the rung.
    """

    axis: str
    frequency: str = ""
    tiers: tuple[tuple[int, tuple[str, ...]], ...] = ()
    waves: int = 0
    beyond: bool = False  # the first rung past the token axis


def _axis_label(key: tuple[int, int]) -> str:
    unit_rank, period = key
    if unit_rank == 0:
        return f"{period_label(period)} tok"
    if unit_rank == 3:
        return "frozen"
    unit = _UNIT_NAME[unit_rank]
    return f"{period} {unit}" + ("s" if period > 1 else "")


def _waves(key: tuple[int, int]) -> int:
    # Dense for per-token levels, sparser with each factor of 4 in period; flat when frozen.
    unit_rank, period = key
    if unit_rank == 0:
        return max(2, 12 - round(math.log2(period) / 2))
    return {1: 2, 2: 1, 3: 0}[unit_rank]


def rows(graph: Graph | GraphSpec) -> list[Rung]:
    """The ladder's rows, fastest first: token-axis ticks and rungs, then rungs beyond it."""
    spec = as_spec(graph)
    by_key: dict[tuple[int, int], list[tuple[int, tuple[str, ...]]]] = {}
    for tier in ordered_tiers(spec):
        by_key.setdefault(tier.key, []).append((tier.rank, tier.names))

    def rung(key: tuple[int, int], beyond: bool = False) -> Rung:
        names = [n for _, tier_names in by_key[key] for n in tier_names]
        freqs = sorted({frequency_label(spec, spec.level(n)) for n in names})
        return Rung(
            axis=_axis_label(key),
            frequency=" / ".join(freqs),
            tiers=tuple(by_key[key]),
            waves=_waves(key),
            beyond=beyond,
        )

    out: list[Rung] = []
    token_keys = sorted(k for k in by_key if k[0] == 0)
    if token_keys:
        hi = math.ceil(math.log2(token_keys[-1][1]))
        stride = max(1, math.ceil(hi / _MAX_TICKS))
        periods = sorted({2**o for o in range(0, hi + 1, stride)} | {k[1] for k in token_keys})
        for p in periods:
            out.append(rung((0, p)) if (0, p) in by_key else Rung(axis=_axis_label((0, p))))
    for i, key in enumerate(sorted(k for k in by_key if k[0] > 0)):
        out.append(rung(key, beyond=bool(token_keys) and i == 0))
    return out


def _tier_text(tiers: tuple[tuple[int, tuple[str, ...]], ...]) -> list[str]:
    return [f"level {rank}: {', '.join(names)}" for rank, names in tiers]


def ladder(graph: Graph | GraphSpec) -> graphviz.Digraph:
    """The frequency ladder of ``graph`` as a ``graphviz.Digraph`` (deterministic DOT).

    The left column is the axis (period in tokens, log₂, then sequence / step / frozen); each
    rung to its right names the levels that update at that period, with their Def. 2 level.
    """
    import graphviz

    spec = as_spec(graph)
    ladder_rows = rows(spec)
    dot = graphviz.Digraph(
        name=f"{spec.name}_ladder",
        graph_attr={
            "label": f"{spec.name}: update-frequency ladder (fastest at the top)",
            "labelloc": "t",
            "fontname": FONT,
            "fontsize": "16",
            "rankdir": "TB",
            "nodesep": "0.25",
            "ranksep": "0.18",
        },
        node_attr={"fontname": FONT, "fontsize": "10"},
        edge_attr={"arrowhead": "none"},
    )
    n_rungs = sum(1 for r in ladder_rows if r.tiers)
    # Each row is three nodes on one rank: the tick label, a point on the axis, the rung. The
    # points make the axis one continuous line; invisible flat edges keep the left-to-right order.
    dot.node(
        "axis-title", label="update period", shape="plaintext", fontsize="9", fontcolor="#444444"
    )
    prev = None
    rung_no = 0
    for i, row in enumerate(ladder_rows):
        tick_id, axis_id = f"tick-{i}", f"axis-{i}"
        dot.node(
            tick_id,
            label=row.axis,
            shape="plaintext",
            fontsize="9",
            fontcolor="#444444",
            height="0.2",
        )
        dot.node(axis_id, label="", shape="point", width="0.07", color="#555555")
        if prev is None:
            dot.edge("axis-title", tick_id, style="invis")
        else:
            # A dashed stretch marks the break: the token clock ends, sequences and steps begin.
            dot.edge(
                prev,
                axis_id,
                penwidth="2",
                color="#555555",
                style="dashed" if row.beyond else "solid",
                label=" beyond one sequence" if row.beyond else "",
                fontname=FONT,
                fontsize="8",
                fontcolor="#777777",
            )
        prev = axis_id
        with dot.subgraph() as same:
            same.attr(rank="same")
            same.node(tick_id)
            same.node(axis_id)
            dot.edge(tick_id, axis_id, style="invis")
            if row.tiers:
                same.node(f"rung-{i}")
        if not row.tiers:
            continue
        fill = TIER_FILLS[min(n_rungs - 1 - rung_no, len(TIER_FILLS) - 1)]
        rung_no += 1
        wave = "∿" * row.waves if row.waves else "─" * 6
        body = "".join(
            f'<TR><TD ALIGN="LEFT" BALIGN="LEFT">{html_lines(line, 60)}</TD></TR>'
            for line in _tier_text(row.tiers)
        )
        label = (
            '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">'
            f'<TR><TD ALIGN="LEFT"><FONT COLOR="#D55E00">{wave}</FONT>  '
            f"<B>{html.escape(row.frequency)}</B></TD></TR>{body}</TABLE>>"
        )
        dot.node(
            f"rung-{i}",
            label=label,
            shape="box",
            style="rounded,filled",
            fillcolor=fill,
            color="#7F8C9A",
        )
        dot.edge(axis_id, f"rung-{i}", color="#AAAAAA", style="dotted")
    return dot


def ladder_text(graph: Graph | GraphSpec) -> str:
    """The frequency ladder as plain text for terminals (the same rows as :func:`ladder`)."""
    spec = as_spec(graph)
    ladder_rows = rows(spec)
    width = max(len(r.axis) for r in ladder_rows)
    lines = [f"{spec.name}: update-frequency ladder (fastest first; tokens on a log2 axis)", ""]
    for row in ladder_rows:
        if row.beyond:
            lines.append(f"{'':>{width}} ┆   beyond one sequence")
        if not row.tiers:
            lines.append(f"{row.axis:>{width}} │")
            continue
        lines.append(f"{row.axis:>{width}} ┼── {row.frequency}")
        for text in _tier_text(row.tiers):
            for j, part in enumerate(wrap(text, 72)):
                lines.append(f"{'':>{width}} │     {'' if j == 0 else '  '}{part}")
    return "\n".join(lines)
