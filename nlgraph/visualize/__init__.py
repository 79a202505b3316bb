"""Drawings of graphs of levels: nesting diagrams, the frequency ladder, the update timeline and
a terminal tree.

Everything here reads specs (a :class:`~nlgraph.Graph` or :class:`~nlgraph.GraphSpec`, validated
first) and never imports the compiler or torch. graphviz drawings are deterministic DOT text, so
tests compare them; pictures need graphviz's ``dot`` program (``render`` falls back to writing
the DOT text), the timeline needs matplotlib (imported only when drawn).

Example::

    import nlgraph.library, nlgraph.visualize as viz
    g = nlgraph.library.get("titans")
    print(viz.tree(g))
    viz.render(g, "titans.svg")                      # nested levels
    hope = nlgraph.library.get("hope")
    viz.render(hope, "hope.svg")                     # identical blocks once, groups as one node
    viz.render(hope, "hope-full.svg", detail="full") # every level and edge
    viz.render(g, "titans-ladder.png", kind="ladder")
    viz.update_ticks(g, ticks=32)                    # {"M": [1, 2, ..., 32], "W_k": [32], ...}
"""

from __future__ import annotations

from nlgraph.visualize._ladder import ladder, ladder_text
from nlgraph.visualize._nesting import nesting
from nlgraph.visualize._render import Diagram, dot_available, render
from nlgraph.visualize._timeline import timeline, update_ticks
from nlgraph.visualize._tree import tree

__all__ = [
    "nesting",
    "ladder",
    "ladder_text",
    "timeline",
    "update_ticks",
    "tree",
    "Diagram",
    "render",
    "dot_available",
]
