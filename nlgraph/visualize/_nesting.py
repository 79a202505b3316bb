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
from nlgraph.topology import EDGE_KINDS, Edge, edges
from nlgraph.visualize._collapse import DETAILS, Box, Node, Plan, block_of
from nlgraph.visualize._collapse import plan as collapse_plan
from nlgraph.visualize._common import (
    Tier,
    as_spec,
    elide,
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
_COLLAPSED_LIMIT = 100
_WIDTH = 26  # label lines in the collapsed drawing (narrow nodes: the boxes sit side by side)
_LEGEND_ID = "legend-table"  # '-' is not allowed in level names: no clash possible


def _level_label(spec: GraphSpec, name: str, title: str | None = None, width: int = 44) -> str:
    rows = [f'<TR><TD COLSPAN="2" ALIGN="LEFT"><B>{html.escape(title or name)}</B></TD></TR>']
    for field, text in level_facts(spec, spec.level(name), relative=True, limit=_FACT_LIMIT):
        rows.append(
            f'<TR><TD ALIGN="RIGHT" VALIGN="TOP"><FONT COLOR="#666666" POINT-SIZE="9">{field}'
            f'</FONT></TD><TD ALIGN="LEFT" BALIGN="LEFT">{html_lines(text, width)}</TD></TR>'
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


def _legend(
    spec: GraphSpec,
    kinds: set[str],
    modes: set[str],
    extra: tuple[tuple[str, str, str], ...] = (),
    width: int | None = None,
) -> str:
    def meaning_cell(text: str) -> str:
        if width is None:
            return f'<TD ALIGN="LEFT">{html.escape(text)}</TD>'
        return f'<TD ALIGN="LEFT" BALIGN="LEFT">{html_lines(text, width)}</TD>'

    # A table of line samples rather than drawn edges: one node, so the legend never pushes the
    # levels around.
    rows = []
    for kind in EDGE_KINDS:
        if kind in kinds:
            rows.append(
                f'<TR><TD ALIGN="LEFT"><FONT COLOR="{EDGE_COLORS[kind]}">━━━▶</FONT></TD>'
                f'<TD ALIGN="LEFT"><B>{kind}</B></TD>'
                f"{meaning_cell(EDGE_MEANING[kind])}</TR>"
            )
    samples = [("━━━▶", "unrolled", "gradients through every inner update (default)")]
    if "stop_grad" in modes:
        samples.append(("╺ ╺ ╺▶", "stop_grad", "no gradient along the edge"))
    if any(m.startswith("truncated") for m in modes):
        samples.append(("┅┅┅▶", "truncated(k)", "gradients through the last k updates"))
    for glyph, mode, meaning in [*samples, *extra]:
        rows.append(
            f'<TR><TD ALIGN="LEFT">{glyph}</TD><TD ALIGN="LEFT"><B>{mode}</B></TD>'
            f"{meaning_cell(meaning)}</TR>"
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
    _add_nodes(parent, [(n, _level_label(spec, n)) for n in names])


def _add_nodes(
    parent: graphviz.Digraph, nodes: list[tuple[str, str]], groups: frozenset[str] = frozenset()
) -> None:
    for n, label in nodes:
        attrs = {"peripheries": "2"} if n in groups else {}  # a group: a stack of levels
        parent.node(
            n, label=label, shape="box", style="rounded,filled", fillcolor="#FFFFFF", **attrs
        )
    # Many side-by-side levels (a block's projections) are stacked in a grid of about sqrt(n)
    # columns by invisible edges, so the picture stays readable instead of one long row.
    if len(nodes) > _ROW:
        cols = math.ceil(math.sqrt(len(nodes)))
        for i in range(len(nodes) - cols):
            parent.edge(nodes[i][0], nodes[i + cols][0], style="invis")


def nesting(
    graph: Graph | GraphSpec,
    edge_kinds: Iterable[str] | None = None,
    *,
    detail: str = "collapsed",
) -> graphviz.Digraph:
    """The nesting diagram of ``graph`` as a ``graphviz.Digraph`` (validates first).

    Boxes are the levels of Def. 2, the slowest outermost; each node shows the level's name,
    state, objective, inner optimizer and frequency (inside a dotted namespace such as
    ``block0.titans.M_k``, other names are written relative to it; texts past 160 characters
    are elided, :func:`tree` prints them whole). Edges are coloured by kind and drawn by their
    differentiation mode: stop_grad dashed, truncated(k) dotted and labelled, unrolled solid.

    ``detail="collapsed"`` (the default) keeps a large model readable: identical blocks
    (``block0``, ``block1`` of the same structure) are drawn once and labelled ``block ×2``; in
    each box and block, the levels trained by the outer optimizer alone become one node per
    group (``projections (6)``), as do levels whose facts all agree (a self-modifying Titans'
    memories); edges between such nodes are bundled, one per (source, target, kind), labelled
    with the kind and how many edges they stand for. A graph with nothing to collapse (an
    optimizer) is drawn as in full. ``detail="full"`` draws every level and edge.

    Args:
        graph: the learner.
        edge_kinds: the edge kinds to draw (default: all of ``nlgraph.topology.EDGE_KINDS``);
            e.g. ``("optimizer", "init", "reset")`` thins out a large model's picture.
        detail: ``"collapsed"`` (default) or ``"full"``.

    Example::

        dot = nlgraph.visualize.nesting(nlgraph.library.get("adam"))
        print(dot.source)  # deterministic DOT text
        full = nlgraph.visualize.nesting(nlgraph.library.get("hope"), detail="full")
    """
    spec = as_spec(graph)
    if detail not in DETAILS:
        raise NLGraphError(f"detail must be one of {', '.join(DETAILS)}; got {detail!r}")
    kinds = EDGE_KINDS if edge_kinds is None else tuple(edge_kinds)
    unknown = sorted(set(kinds) - set(EDGE_KINDS))
    if unknown:
        raise NLGraphError(f"unknown edge kinds {unknown}; choose from {', '.join(EDGE_KINDS)}")
    all_edges = [e for e in edges(spec) if e.kind in kinds]
    plan = collapse_plan(spec) if detail == "collapsed" else None
    if plan is None or not plan.collapsed_anything:
        return _full(spec, all_edges)
    return _collapsed(spec, all_edges, plan)


def _digraph(spec: GraphSpec) -> graphviz.Digraph:
    import graphviz

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
    return dot


def _tier_attrs(label: str, depth: int) -> dict[str, str]:
    return {
        "label": label,
        "labeljust": "l",
        "labelloc": "b",
        "fontname": FONT,
        "fontsize": "11",
        "style": "rounded,filled",
        "fillcolor": TIER_FILLS[min(depth, len(TIER_FILLS) - 1)],
        "color": "#7F8C9A",
        "penwidth": "1.2",
    }


def _group_attrs(label: str) -> dict[str, str]:
    return {
        "label": label,
        "style": "dashed,rounded",
        "color": "#AAB2BD",
        "fontsize": "9",
        "fontcolor": "#666666",
        "labeljust": "l",
        "labelloc": "t",
    }


def _add_legend(dot: graphviz.Digraph, label: str) -> None:
    with dot.subgraph(name="cluster_legend") as legend:
        legend.attr(
            label="legend",
            labeljust="l",
            fontname=FONT,
            fontsize="10",
            style="rounded",
            color="#BBBBBB",
        )
        legend.node(_LEGEND_ID, label=label, shape="plaintext", fontsize="9")


def _full(spec: GraphSpec, all_edges: list[Edge]) -> graphviz.Digraph:
    """Every level and every edge."""
    tiers = ordered_tiers(spec)
    slow_first = tiers[::-1]
    modes = diff_modes(spec.diff)
    dot = _digraph(spec)

    def add_tier(parent: graphviz.Digraph, depth: int) -> None:
        tier = slow_first[depth]
        outer_same = depth > 0 and slow_first[depth - 1].key == tier.key
        with parent.subgraph(name=f"cluster_level{tier.rank}") as box:
            box.attr(**_tier_attrs(_tier_label(spec, tier, len(tiers), outer_same), depth))
            # Side-by-side levels are boxed by block (the first part of a dotted name) and
            # group, so a model's blocks stay apart: "block0 · projections".
            groups: dict[str, list[str]] = {}
            for name in tier.names:
                groups.setdefault(_group_label(spec.level(name)), []).append(name)
            for gi, group in enumerate(sorted(groups)):
                names = groups[group]
                if group and len(names) > 1:
                    with box.subgraph(name=f"cluster_level{tier.rank}_group{gi}") as sub:
                        sub.attr(**_group_attrs(group))
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

    _add_legend(dot, _legend(spec, {e.kind for e in all_edges}, set(modes.values())))
    return dot


# ------------------------------------------------------------------------------ collapsed


def _ranks_text(ranks: tuple[int, ...]) -> str:
    if len(ranks) == 1:
        return f"level {ranks[0]}"
    if ranks == tuple(range(ranks[0], ranks[-1] + 1)):
        return f"levels {ranks[0]}–{ranks[-1]}"
    return "levels " + ", ".join(str(r) for r in ranks)


def _box_label(spec: GraphSpec, box: Box, n_tiers: int, enclosing: Box | None) -> str:
    tier = box.tier
    freqs = sorted({frequency_label(spec, spec.level(n)) for n in tier.names})
    head = f"{_ranks_text(box.ranks)} of {n_tiers} · {' / '.join(freqs)}"
    if enclosing is not None and enclosing.tier.key == tier.key:
        head += f" · updates before {_ranks_text(enclosing.ranks[:1])} at the same tick"
    if n_tiers > 1 and box.ranks[-1] == n_tiers:
        head += " · slowest"
    elif n_tiers > 1 and box.ranks[0] == 1:
        head += " · fastest"
    return head


def _compact_names(names: list[str]) -> str:
    """``titans.conv, titans.W_q, W_o`` -> ``titans.{conv, W_q}, W_o`` (order kept)."""
    spaces: dict[str, list[str]] = {}
    for n in names:
        ns, _, leaf = n.rpartition(".")
        spaces.setdefault(ns, []).append(leaf)
    parts = []
    for ns, leaves in spaces.items():
        if not ns:
            parts.extend(leaves)
        elif len(leaves) == 1:
            parts.append(f"{ns}.{leaves[0]}")
        else:
            parts.append(f"{ns}.{{{', '.join(leaves)}}}")
    return ", ".join(parts)


def _summary(values: list[str]) -> str:
    """One text for the values a fact takes over a group's levels: the value when they agree,
    else each distinct value with its count, most common first."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    if len(counts) == 1:
        return values[0]
    ranked = sorted(counts, key=lambda v: (-counts[v], values.index(v)))
    if len(ranked) > 4:
        return f"{len(ranked)} different"
    return " · ".join(v + (f" ×{counts[v]}" if counts[v] > 1 else "") for v in ranked)


_MISSING = {"init": "default", "reset": "default"}


def _node_label(spec: GraphSpec, node: Node, box_frequency: str | None) -> str:
    """A node of the collapsed drawing: its name (inside its block when the block is drawn for
    several), the names of a group's levels, and the facts (those that differ within a group
    summarised); the frequency only where the box's label does not already say it."""
    block = block_of(node.levels[0])
    inside = block and (node.merged_block or node.title is not None)
    local = [n[len(block) + 1 :] if inside else n for n in node.levels]
    title = html.escape(node.title or local[0])
    rows = [f'<TR><TD COLSPAN="2" ALIGN="LEFT"><B>{title}</B></TD></TR>']
    if node.title is not None:
        rows.append(
            f'<TR><TD COLSPAN="2" ALIGN="LEFT" BALIGN="LEFT"><FONT COLOR="#444444" '
            f'POINT-SIZE="9">{html_lines(_compact_names(local), _WIDTH + 6)}</FONT></TD></TR>'
        )
    facts = [dict(level_facts(spec, spec.level(n), relative=True)) for n in node.levels]
    fields = list(facts[0])
    fields += [f for fs in facts[1:] for f in fs if f not in fields]
    for fld in fields:
        values = [fs.get(fld, _MISSING.get(fld, "none")) for fs in facts]
        if fld == "frequency" and set(values) == {box_frequency}:
            continue
        rows.append(
            f'<TR><TD ALIGN="RIGHT" VALIGN="TOP"><FONT COLOR="#666666" POINT-SIZE="9">{fld}'
            f'</FONT></TD><TD ALIGN="LEFT" BALIGN="LEFT">'
            f"{html_lines(elide(_summary(values), _COLLAPSED_LIMIT), _WIDTH)}</TD></TR>"
        )
    return (
        '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">'
        + "".join(rows)
        + "</TABLE>>"
    )


def _stack(dot: graphviz.Digraph, inputs: list[str], slow_first: list[Box]) -> None:
    """Invisible edges that put the inputs on top, then the slowest box's levels in rows, one
    per block (top-level levels first), above every faster box, whose levels then sit side by
    side: a wide model grows down its boxes, not sideways. (Emitted at the top level of the DOT
    text: an edge inside a cluster would pull its ends into the cluster.)"""
    by_block: dict[str, list[str]] = {}
    for nd in slow_first[0].nodes:
        by_block.setdefault(block_of(nd.levels[0]), []).append(nd.id)
    rows = [inputs, *(by_block[b] for b in sorted(by_block))]
    rows.append([nd.id for inner in slow_first[1:] for nd in inner.nodes])
    rows = [r for r in rows if r]
    for upper, lower in zip(rows, rows[1:], strict=False):
        for a in upper:
            dot.edge(a, lower[0], style="invis")
        for b in lower[1:]:
            dot.edge(upper[0], b, style="invis")


def _collapsed(spec: GraphSpec, all_edges: list[Edge], plan: Plan) -> graphviz.Digraph:
    """Identical blocks once, groups as one node, edges bundled (see ``_collapse``)."""
    n_tiers = len(ordered_tiers(spec))
    slow_first = plan.boxes[::-1]
    modes = diff_modes(spec.diff)
    dot = _digraph(spec)
    dot.graph_attr.update(ranksep="0.3", nodesep="0.2")
    group_ids = frozenset(nd.id for box in plan.boxes for nd in box.nodes if nd.title)

    def add_box(parent: graphviz.Digraph, depth: int) -> None:
        box = slow_first[depth]
        enclosing = slow_first[depth - 1] if depth > 0 else None
        with parent.subgraph(name=f"cluster_level{box.ranks[0]}") as sub:
            sub.attr(**_tier_attrs(_box_label(spec, box, n_tiers, enclosing), depth))
            clusters: dict[str, list[Node]] = {}
            for node in box.nodes:
                clusters.setdefault(node.cluster, []).append(node)
            freqs = {frequency_label(spec, spec.level(n)) for n in box.tier.names}
            one = next(iter(freqs)) if len(freqs) == 1 else None
            for gi, cluster in enumerate(sorted(clusters)):
                nodes = clusters[cluster]
                labelled = [(nd.id, _node_label(spec, nd, one)) for nd in nodes]
                if cluster and (len(nodes) > 1 or any(nd.merged_block for nd in nodes)):
                    with sub.subgraph(name=f"cluster_level{box.ranks[0]}_group{gi}") as grp:
                        grp.attr(**_group_attrs(cluster))
                        _add_nodes(grp, labelled, group_ids)
                else:
                    _add_nodes(sub, labelled, group_ids)
            if depth + 1 < len(slow_first):
                add_box(sub, depth + 1)

    add_box(dot, 0)
    _stack(dot, sorted(i.name for i in spec.inputs), slow_first)

    # Bundles: (source node, target node, kind) -> the drawn level pairs and their modes.
    bundles: dict[tuple[str, str, str], tuple[set[tuple[str, str]], set[str]]] = {}
    for e in all_edges:
        if e.src in plan.copy and e.dst in plan.copy:
            (cs, ms), (cd, md) = plan.copy[e.src], plan.copy[e.dst]
            if cs == cd and ms != md:
                continue  # one copy of a block reading another: the ×n says they are stacked
        src = e.src if e.src_is_input else plan.drawn[e.src]
        dst = plan.drawn[e.dst]
        mode = None if e.src_is_input else modes.get((e.src, e.dst))
        key = (plan.node_of.get(src, src), plan.node_of[dst], e.kind)
        pairs, seen = bundles.setdefault(key, (set(), set()))
        pairs.add((src, dst))
        seen.add(mode or "unrolled")
    labelled: set[tuple[str, str]] = set()
    for (src, dst, kind), (pairs, seen) in sorted(bundles.items()):
        mode = next(iter(seen)) if len(seen) == 1 else None
        attrs = edge_attrs(kind, mode)
        if src not in group_ids and dst not in group_ids:
            # Level to level, as in the full drawing: the "truncated(k)" label once per pair.
            if "label" in attrs:
                if (src, dst) in labelled:
                    del attrs["label"]
                labelled.add((src, dst))
        else:
            text = kind + (f" ×{len(pairs)}" if len(pairs) > 1 else "")
            if "label" in attrs:
                text += f", {attrs['label']}"
            elif len(seen) > 1:
                text += ", mixed modes"
            attrs["label"] = text
        dot.edge(src, dst, **attrs)

    extra: list[tuple[str, str, str]] = []
    if plan.classes:
        extra.append(("×n", "blocks", "n identical blocks, drawn once"))
    if group_ids:
        extra.append(("(n)", "groups", "n levels in one node"))
    if extra:
        extra.append(("", "full detail", "every level drawn: --detail full"))
    kinds = {kind for _, _, kind in bundles}
    _add_legend(dot, _legend(spec, kinds, set(modes.values()), tuple(extra), width=18))
    # The legend beside the faster boxes, not beside the first row (which it would make tall).
    dot.edge(slow_first[0].nodes[0].id, _LEGEND_ID, style="invis")
    return dot
