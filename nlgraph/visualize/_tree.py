"""The terminal view of a graph: levels as a tree, the slowest outside, the fastest inside (what
``nlgraph show`` prints)."""

from __future__ import annotations

from nlgraph.graph import Graph
from nlgraph.level import GraphSpec, Level
from nlgraph.optimizers import describe
from nlgraph.visualize._common import Tier, as_spec, frequency_label, ordered_tiers

__all__ = ["tree"]


def _level_line(spec: GraphSpec, level: Level) -> str:
    state = str(level.state) + (f" × {level.heads} heads" if level.heads > 1 else "")
    objective = str(level.objective) if level.objective is not None else "none"
    parts = [
        f"state {state}",
        f"objective {objective}",
        f"optimizer {describe(level.optimizer)}",
        frequency_label(spec, level),
        f"init {level.init}",
        str(level.effective_reset()),
    ]
    return f"{level.name}: " + "; ".join(parts)


def _tier_head(spec: GraphSpec, tier: Tier, n_tiers: int, outer_same: bool) -> str:
    freqs = sorted({frequency_label(spec, spec.level(n)) for n in tier.names})
    head = f"level {tier.rank} · {' / '.join(freqs)}"
    if outer_same:
        head += f" · updates before level {tier.rank + 1} at the same tick"
    if n_tiers > 1 and tier.rank == n_tiers:
        head += " · slowest"
    elif n_tiers > 1 and tier.rank == 1:
        head += " · fastest"
    return head


def tree(graph: Graph | GraphSpec) -> str:
    """``graph``'s levels as a text tree, the slowest level outermost (validates first).

    Each level is one line with its state, objective, inner optimizer, frequency, init and reset
    rule; inputs and outputs are listed above and below. Example::

        print(nlgraph.visualize.tree(nlgraph.library.get("adam")))
    """
    spec = as_spec(graph)
    slow_first = ordered_tiers(spec)[::-1]
    n = len(slow_first)
    lines = [f"{spec.name} ({len(spec.levels)} levels in {n} tiers; slowest outside)"]
    for inp in sorted(spec.inputs, key=lambda i: i.name):
        dim = f", dim {inp.dim}" if inp.dim is not None else ""
        lines.append(f"input {inp.name} ({inp.kind}{dim})")

    indent = ""
    for depth, tier in enumerate(slow_first):
        outer_same = depth > 0 and slow_first[depth - 1].key == tier.key
        lines.append(f"{indent}└── {_tier_head(spec, tier, n, outer_same)}")
        indent += "    "
        last_tier = depth == n - 1
        for i, name in enumerate(tier.names):
            branch = "└── " if last_tier and i == len(tier.names) - 1 else "├── "
            lines.append(f"{indent}{branch}{_level_line(spec, spec.level(name))}")
    for name in sorted(spec.outputs):
        lines.append(f"output {name} = {spec.outputs[name]}")
    return "\n".join(lines)
