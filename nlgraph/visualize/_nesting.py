"""The nesting diagram: levels as nested boxes, the slowest outermost (PAPER.md 1.2, Def. 2).

Each box is one level of the ordering (a tier of ``nlgraph.topology.tiers``): levels that share a
frequency and are independent sit side by side in it, the next faster level is the box inside.
Edges are the typed edges of ``nlgraph.topology.edges``, coloured by kind and drawn by how they
are differentiated (``spec.diff``). The DOT text is deterministic: nodes and edges are emitted in
sorted order with fixed colours, so it can be compared in tests.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from nlgraph._errors import NLGraphError
from nlgraph.graph import Graph
from nlgraph.level import GraphSpec, Level
from nlgraph.topology import EDGE_KINDS, edges
from nlgraph.visualize._common import (
    Tier,
    as_spec,
    frequency_label,
    html_lines,
    level_facts,
    ordered_tiers,
)
from nlgraph.visualize._style import (
    EDGE_COLORS,
    EDGE_MEANING,
    FONT,
    TIER_FILLS,
    diff_modes,
    edge_attrs,
)

if TYPE_CHECKING:
    import graphviz

__all__ = ["nesting"]

# Facts longer than this are elided in boxes (a Hope residual stream's target runs to hundreds of
# characters); `tree` prints them whole.
_FACT_LIMIT = 160
_ROW = 4  # levels side by side before they wrap into a grid
_LEGEND_ID = "legend-table"  # '-' is not allowed in level names: no clash possible


def _level_label(spec: GraphSpec, name: str) -> str:
    rows = [f'<TR><TD COLSPAN="2" ALIGN="LEFT"><B>{html.escape(name)}</B></TD></TR>']
    for field, text in level_facts(spec, spec.level(name), relative=True, limit=_FACT_LIMIT):
        rows.append(
            f'<TR><TD ALIGN="RIGHT" VALIGN="TOP"><FONT COLOR="#666666" POINT-SIZE="9">{field}'
            f'</FONT></TD><TD ALIGN="LEFT" BALIGN="LEFT">{html_lines(text)}</TD></TR>'
        )
    return (
        '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">'
        + "".join(rows)
        + "</TABLE>>"
    )


def _tier_label(spec: GraphSpec, tier: Tier, n_tiers: int, outer_same: bool) -> str:
    freqs = sorted({frequency_label(spec, spec.level(n)) for n in tier.names})
    head = f"level {tier.rank} of {n_tiers} · {' / '.join(freqs)}"
    if outer_same:
        head += f" · updates before level {tier.rank + 1} at the same tick"
    if n_tiers > 1 and tier.rank == n_tiers:
        head += " · slowest"
    elif n_tiers > 1 and tier.rank == 1:
        head += " · fastest"
    return head


def _legend(spec: GraphSpec, kinds: set[str], modes: set[str]) -> str:
    # A table of line samples rather than drawn edges: one node, so the legend never pushes the
    # levels around.
    rows = []
    for kind in EDGE_KINDS:
        if kind in kinds:
            rows.append(
                f'<TR><TD ALIGN="LEFT"><FONT COLOR="{EDGE_COLORS[kind]}">━━━▶</FONT></TD>'
                f'<TD ALIGN="LEFT"><B>{kind}</B></TD>'
                f'<TD ALIGN="LEFT">{html.escape(EDGE_MEANING[kind])}</TD></TR>'
            )
    samples = [("━━━▶", "unrolled", "gradients through every inner update (default)")]
    if "stop_grad" in modes:
        samples.append(("╺ ╺ ╺▶", "stop_grad", "no gradient along the edge"))
    if any(m.startswith("truncated") for m in modes):
        samples.append(("┅┅┅▶", "truncated(k)", "gradients through the last k updates"))
    for glyph, mode, meaning in samples:
        rows.append(
            f'<TR><TD ALIGN="LEFT">{glyph}</TD><TD ALIGN="LEFT"><B>{mode}</B></TD>'
            f'<TD ALIGN="LEFT">{html.escape(meaning)}</TD></TR>'
        )
    return (
        '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="2">'
        + "".join(rows)
        + "</TABLE>>"
    )


def _group_label(level: Level) -> str:
    block = level.name.split(".")[0] if "." in level.name else ""
    return " · ".join(p for p in (block, level.group or "") if p)


def _add_levels(parent: graphviz.Digraph, spec: GraphSpec, names: list[str]) -> None:
    for n in names:
        parent.node(
            n, label=_level_label(spec, n), shape="box", style="rounded,filled", fillcolor="#FFFFFF"
        )
    # Many side-by-side levels (a block's projections) are stacked in a grid of about sqrt(n)
    # columns by invisible edges, so the picture stays readable instead of one long row.
    if len(names) > _ROW:
        cols = math.ceil(math.sqrt(len(names)))
        for i in range(len(names) - cols):
            parent.edge(names[i], names[i + cols], style="invis")


def nesting(graph: Graph | GraphSpec, edge_kinds: Iterable[str] | None = None) -> graphviz.Digraph:
    """The nesting diagram of ``graph`` as a ``graphviz.Digraph`` (validates first).

    Boxes are the levels of Def. 2, the slowest outermost; each node shows the level's name,
    state, objective, inner optimizer and frequency (inside a dotted namespace such as
    ``block0.titans.M_k``, other names are written relative to it; texts past 160 characters
    are elided, :func:`tree` prints them whole). Edges are coloured by kind and drawn by their
    differentiation mode: stop_grad dashed, truncated(k) dotted and labelled, unrolled solid.

    Args:
        graph: the learner.
        edge_kinds: the edge kinds to draw (default: all of ``nlgraph.topology.EDGE_KINDS``);
            e.g. ``("optimizer", "init", "reset")`` thins out a large model's picture.

    Example::

        dot = nlgraph.visualize.nesting(nlgraph.library.get("adam"))
        print(dot.source)  # deterministic DOT text
    """
    import graphviz

    spec = as_spec(graph)
    kinds = EDGE_KINDS if edge_kinds is None else tuple(edge_kinds)
    unknown = sorted(set(kinds) - set(EDGE_KINDS))
    if unknown:
        raise NLGraphError(f"unknown edge kinds {unknown}; choose from {', '.join(EDGE_KINDS)}")
    tiers = ordered_tiers(spec)
    slow_first = tiers[::-1]
    all_edges = [e for e in edges(spec) if e.kind in kinds]
    modes = diff_modes(spec.diff)

    dot = graphviz.Digraph(
        name=spec.name,
        graph_attr={
            "label": f"{spec.name}: levels nested by update frequency (outermost = slowest)",
            "labelloc": "t",
            "fontname": FONT,
            "fontsize": "16",
            "rankdir": "TB",
            "newrank": "true",
            "nodesep": "0.3",
            "ranksep": "0.5",
        },
        node_attr={"fontname": FONT, "fontsize": "10"},
        edge_attr={"fontname": FONT, "fontsize": "9", "arrowsize": "0.7"},
    )

    for inp in sorted(spec.inputs, key=lambda i: i.name):
        detail = inp.kind + (f", dim {inp.dim}" if inp.dim is not None else "")
        name = html.escape(inp.name)
        dot.node(
            inp.name,
            label=f'<<B>{name}</B><BR/><FONT POINT-SIZE="9">input: {detail}</FONT>>',
            shape="cds",
            style="filled",
            fillcolor="#FFFFFF",
            color="#555555",
        )

    def add_tier(parent: graphviz.Digraph, depth: int) -> None:
        tier = slow_first[depth]
        outer_same = depth > 0 and slow_first[depth - 1].key == tier.key
        with parent.subgraph(name=f"cluster_level{tier.rank}") as box:
            box.attr(
                label=_tier_label(spec, tier, len(tiers), outer_same),
                labeljust="l",
                labelloc="b",
                fontname=FONT,
                fontsize="11",
                style="rounded,filled",
                fillcolor=TIER_FILLS[min(depth, len(TIER_FILLS) - 1)],
                color="#7F8C9A",
                penwidth="1.2",
            )
            # Side-by-side levels are boxed by block (the first part of a dotted name) and
            # group, so a model's blocks stay apart: "block0 · projections".
            groups: dict[str, list[str]] = {}
            for name in tier.names:
                groups.setdefault(_group_label(spec.level(name)), []).append(name)
            for gi, group in enumerate(sorted(groups)):
                names = groups[group]
                if group and len(names) > 1:
                    with box.subgraph(name=f"cluster_level{tier.rank}_group{gi}") as sub:
                        sub.attr(
                            label=group,
                            style="dashed,rounded",
                            color="#AAB2BD",
                            fontsize="9",
                            fontcolor="#666666",
                            labeljust="l",
                            labelloc="t",
                        )
                        _add_levels(sub, spec, names)
                else:
                    _add_levels(box, spec, names)
            if depth + 1 < len(slow_first):
                add_tier(box, depth + 1)

    add_tier(dot, 0)

    labelled: set[tuple[str, str]] = set()
    for e in all_edges:
        mode = None if e.src_is_input else modes.get((e.src, e.dst))
        attrs = edge_attrs(e.kind, mode)
        # A pair joined by several kinds (context and init) shares one declared mode: every
        # edge gets the line style, only the first the "truncated(k)" label.
        if "label" in attrs:
            if (e.src, e.dst) in labelled:
                del attrs["label"]
            labelled.add((e.src, e.dst))
        dot.edge(e.src, e.dst, **attrs)

    with dot.subgraph(name="cluster_legend") as legend:
        legend.attr(
            label="legend",
            labeljust="l",
            fontname=FONT,
            fontsize="10",
            style="rounded",
            color="#BBBBBB",
        )
        legend.node(
            _LEGEND_ID,
            label=_legend(spec, {e.kind for e in all_edges}, set(modes.values())),
            shape="plaintext",
            fontsize="9",
        )
    return dot
