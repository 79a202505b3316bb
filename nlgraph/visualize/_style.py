"""Colours, line styles and fonts shared by the diagrams (fixed tables: drawings are compared as
text in tests, so nothing here may depend on hashing or iteration order)."""

from __future__ import annotations

from nlgraph.level import EdgeDiff

__all__ = ["FONT", "EDGE_COLORS", "EDGE_MEANING", "TIER_FILLS", "edge_attrs", "diff_modes"]

FONT = "DejaVu Sans"

# One colour per edge kind of nlgraph.topology.EDGE_KINDS (colour-blind-safe Okabe-Ito hues
# where there are enough of them).
EDGE_COLORS = {
    "context": "#333333",
    "gradient": "#D55E00",
    "optimizer": "#0072B2",
    "generates": "#E69F00",
    "init": "#009E73",
    "reset": "#CC79A7",
    "shape": "#999999",
}
EDGE_MEANING = {
    "context": "context flow: compresses / reads the source",
    "gradient": "context is a gradient w.r.t. the source",
    "optimizer": "source is this level's optimizer state",
    "generates": "source generates a rate, momentum or gate",
    "init": "source meta-learns the initial state",
    "reset": "resets when the source's chunk ends",
    "shape": "state shaped like the source's",
}
# Cluster fills from the outermost (slowest) level inwards: pale to deeper, so that the nesting
# reads at a glance; the last colour repeats for deeper nests.
TIER_FILLS = ("#F4F6FA", "#E4ECF7", "#FCEFD9", "#F9DEDC", "#E5F2E4", "#EDE3F4", "#FFF6BF")

# Edges that carry a differentiable signal; the others (shape, reset) are structural.
_DIFFERENTIABLE = ("context", "gradient", "optimizer", "generates", "init")


def diff_modes(diff: tuple[EdgeDiff, ...]) -> dict[tuple[str, str], str]:
    """``(src, dst) -> "stop_grad" | "truncated(k)" | "unrolled"`` for the declared edges."""
    return {(d.src, d.dst): str(d.mode) for d in diff}


def edge_attrs(kind: str, mode: str | None) -> dict[str, str]:
    """graphviz attributes of an edge of ``kind`` differentiated by ``mode`` (``None``: the
    default, unrolled). stop_grad is dashed, truncated(k) dotted and labelled, unrolled solid."""
    attrs = {"color": EDGE_COLORS[kind], "fontcolor": EDGE_COLORS[kind]}
    if kind == "optimizer":
        attrs["penwidth"] = "1.8"
    if kind == "shape":
        attrs["arrowhead"] = "onormal"
        attrs["penwidth"] = "0.8"
    if kind in ("init", "reset"):
        attrs["arrowhead"] = "diamond" if kind == "init" else "tee"
    if mode is not None and kind in _DIFFERENTIABLE:
        if mode == "stop_grad":
            attrs["style"] = "dashed"
        elif mode.startswith("truncated"):
            attrs["style"] = "dotted"
            attrs["label"] = mode
    return attrs
