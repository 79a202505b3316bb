"""What the collapsed nesting diagram draws: identical blocks once, level groups as one node,
edges bundled.

- Blocks: levels named ``<stem><N>.<rest>`` (``block0.titans.M_k``) belong to block ``<stem><N>``.
  Blocks of one stem are identical when they hold the same ``<rest>`` names and every level
  agrees on everything but its name (state, objective, optimizer, frequency, init, reset, heads,
  group, and its flows) once names inside the block are read relative to it and whatever
  comes from outside the block (the previous block's output, the embeddings) is treated as
  "an input". The same holds for the block's named flows and declared differentiation modes.
  Identical blocks are drawn once, as the first of them, labelled ``block ×2``.
- Groups: in one level box and one block, the levels trained by the outer optimizer alone (no
  context, no inner optimizer: projections, norms, convolutions) become one node per group
  (``projections (6)``); three or more levels whose drawn facts all agree (state, objective,
  optimizer, frequency, init, reset: a self-modifying Titans' memories) become one node too.
  Other levels are drawn in full.
- Edges: one per (source node, target node, kind), labelled with the kind and how many level
  edges it stands for. Edges from one copy of a block into another (a stack's residual stream)
  are left out: the ``×2`` says the copies are stacked.

Everything is sorted: the drawing is deterministic text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from nlgraph import flows
from nlgraph.level import GraphSpec, Level
from nlgraph.visualize._common import Tier, level_facts, ordered_tiers

__all__ = ["DETAILS", "BlockClass", "Node", "Box", "Plan", "identical_blocks", "plan"]

DETAILS = ("collapsed", "full")

_BLOCK = re.compile(r"^(?P<stem>[A-Za-z_]\w*?)(?P<index>\d+)$")
# The "op" tags of flow nodes in a JSON dump (input, ref, read, ...).
_FLOW_OPS = frozenset(
    cls.model_fields["op"].default
    for cls in (getattr(flows, name) for name in flows.__all__)
    if isinstance(cls, type) and issubclass(cls, flows.FlowBase) and "op" in cls.model_fields
)
# Levels whose facts agree become one node from this many on: a bank of memories. A pair (an
# optimizer's two moments) stays apart: what tells them apart is their context, which the
# facts do not show.
_ALIKE = 3
_EXTERNAL = "∘"  # a flow from outside the block, in a block's signature


def block_of(name: str) -> str:
    """The first part of a dotted level name (``block0`` of ``block0.titans.M_k``), else ``""``."""
    return name.split(".", 1)[0] if "." in name else ""


@dataclass(frozen=True)
class BlockClass:
    """Blocks of one stem with the same structure; ``members[0]`` is the one drawn."""

    stem: str
    members: tuple[str, ...]
    family: int  # how many blocks of this stem the graph has

    @property
    def label(self) -> str:
        n = len(self.members)
        if n == self.family:
            return f"{self.stem} ×{n}"
        return f"{', '.join(self.members)} (×{n})"


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def _canon(value: Any, block: str, known: frozenset[str]) -> Any:
    """``value`` (a JSON dump) with ``block``'s names written ``@.rest`` and every flow that reads
    only names from outside the block replaced by one placeholder."""
    prefix = block + "."
    if isinstance(value, str):
        if value == block:
            return "@"
        return "@." + value[len(prefix) :] if value.startswith(prefix) else value
    if isinstance(value, list):
        return [_canon(v, block, known) for v in value]
    if isinstance(value, dict):
        if value.get("op") in _FLOW_OPS:
            names = [s for s in _strings(value) if s in known]
            if names and not any(s.startswith(prefix) for s in names):
                return _EXTERNAL
        return {k: _canon(v, block, known) for k, v in value.items()}
    return value


def _signature(spec: GraphSpec, block: str, known: frozenset[str]) -> str:
    prefix = block + "."

    def name(n: str) -> str:
        return "@." + n[len(prefix) :] if n.startswith(prefix) else _EXTERNAL

    levels = sorted(
        (
            lv.name[len(prefix) :],
            _canon(lv.model_dump(mode="json", exclude={"name", "doc"}), block, known),
        )
        for lv in spec.levels
        if lv.name.startswith(prefix)
    )
    flows = sorted(
        (n[len(prefix) :], _canon(f.model_dump(mode="json"), block, known))
        for n, f in spec.flows.items()
        if n.startswith(prefix)
    )
    diffs = sorted(
        (name(d.src), name(d.dst), str(d.mode))
        for d in spec.diff
        if d.src.startswith(prefix) or d.dst.startswith(prefix)
    )
    return json.dumps([levels, flows, diffs], sort_keys=True, ensure_ascii=False)


def identical_blocks(spec: GraphSpec) -> list[BlockClass]:
    """Classes of two or more identical blocks (see the module docstring), sorted by stem, then
    by their first block; blocks sorted by index."""
    families: dict[str, set[str]] = {}
    for lv in spec.levels:
        m = _BLOCK.match(block_of(lv.name))
        if m:
            families.setdefault(m["stem"], set()).add(m.group(0))
    known = frozenset(
        [lv.name for lv in spec.levels] + [i.name for i in spec.inputs] + list(spec.flows)
    )
    out = []
    for stem in sorted(families):
        members = sorted(families[stem], key=lambda b: (int(b[len(stem) :]), b))
        if len(members) < 2:
            continue
        classes: dict[str, list[str]] = {}
        for b in members:
            classes.setdefault(_signature(spec, b, known), []).append(b)
        for same in sorted(classes.values()):
            if len(same) > 1:
                out.append(BlockClass(stem, tuple(same), len(members)))
    return out


# ------------------------------------------------------------------------------------ plan


@dataclass
class Node:
    """One node of the collapsed drawing: a level drawn in full (``title`` None) or a group."""

    id: str
    levels: tuple[str, ...]  # the drawn levels it stands for, sorted
    cluster: str  # "block ×2 · cms", "moments", "" (none)
    merged_block: bool  # the node belongs to a block drawn for several
    title: str | None = None


@dataclass
class Box:
    """One nested box: a tier of Def. 2, with the tiers whose levels are all drawn elsewhere
    (a later copy of a block) folded into it."""

    tier: Tier
    ranks: tuple[int, ...]
    nodes: list[Node] = field(default_factory=list)


@dataclass
class Plan:
    classes: list[BlockClass]
    drawn: dict[str, str]  # level -> the level drawn for it (itself, or its block's first copy)
    copy: dict[str, tuple[int, int]]  # level in a merged block -> (class, member index)
    boxes: list[Box]  # fastest first
    node_of: dict[str, str]  # drawn level -> node id

    @property
    def collapsed_anything(self) -> bool:
        return bool(self.classes) or any(n.title for b in self.boxes for n in b.nodes)


def _is_parameter(level: Level) -> bool:
    outer = level.objective is None or level.objective.kind == "outer"
    return outer and not level.optimizer and level.context is None


def _group_word(level: Level) -> str:
    """The group a level trained by the outer optimizer alone is counted in."""
    if level.group:
        return level.group
    if level.state.kind in ("linear", "conv"):
        return "projections"
    if level.state.kind == "module" and "norm" in str(level.state).lower():
        return "norms"
    return "parameters"


def plan(spec: GraphSpec) -> Plan:
    """What the collapsed drawing of ``spec`` shows."""
    classes = identical_blocks(spec)
    member: dict[str, tuple[int, int]] = {}
    for ci, cls in enumerate(classes):
        for mi, b in enumerate(cls.members):
            member[b] = (ci, mi)
    drawn: dict[str, str] = {}
    copy: dict[str, tuple[int, int]] = {}
    for lv in spec.levels:
        b = block_of(lv.name)
        drawn[lv.name] = lv.name
        if b in member:
            ci, mi = member[b]
            copy[lv.name] = (ci, mi)
            drawn[lv.name] = classes[ci].members[0] + lv.name[len(b) :]

    # Boxes: tiers keep their drawn levels; a tier left empty folds into the tier of its levels'
    # first copies.
    tiers = ordered_tiers(spec)
    rank_of = {n: t.rank for t in tiers for n in t.names}
    boxes: dict[int, Box] = {}
    folded: dict[int, list[int]] = {}
    for t in tiers:
        names = [n for n in t.names if drawn[n] == n]
        if names:
            boxes[t.rank] = Box(tier=Tier(t.rank, t.key, tuple(names)), ranks=(t.rank,))
        else:
            folded.setdefault(min(rank_of[drawn[n]] for n in t.names), []).append(t.rank)
    for rank, extra in folded.items():
        box = boxes[rank]
        box.ranks = tuple(sorted({*box.ranks, *extra}))

    node_of: dict[str, str] = {}
    used: set[str] = set()
    for box in boxes.values():
        groups: dict[tuple[str, ...], list[str]] = {}
        for n in box.tier.names:
            lv = spec.level(n)
            b = block_of(n)
            if _is_parameter(lv):
                key: tuple[str, ...] = (b, "parameters", _group_word(lv))
            else:
                facts = level_facts(spec, lv, relative=True)
                key = (b, "alike", lv.group or "", json.dumps(facts, ensure_ascii=False))
            groups.setdefault(key, []).append(n)
        for key, names in list(groups.items()):
            if key[1] == "alike" and 1 < len(names) < _ALIKE:
                del groups[key]
                for n in names:
                    groups[(*key, n)] = [n]
        for key, names in groups.items():
            b = key[0]
            cls = classes[member[b][0]] if b in member else None
            block_label = cls.label if cls else b
            if len(names) == 1:
                lv = spec.level(names[0])
                cluster = " · ".join(p for p in (block_label, lv.group or "") if p)
                node = Node(names[0], (names[0],), cluster, cls is not None)
            else:
                word = _group_word(spec.level(names[0])) if key[1] == "parameters" else None
                word = word or spec.level(names[0]).group or "levels"
                ident = "-".join(["group", str(box.tier.rank), *([b] if b else []), word])
                while ident in used:  # two groups of one word in a box
                    ident = ident.rsplit("~", 1)[0] + f"~{len(used)}"
                used.add(ident)
                title = f"{word} ({len(names)})"
                node = Node(ident, tuple(names), block_label, cls is not None, title)
            box.nodes.append(node)
            for n in node.levels:
                node_of[n] = node.id
        box.nodes.sort(key=lambda nd: nd.levels[0])
    ordered = [boxes[r] for r in sorted(boxes)]
    return Plan(classes, drawn, copy, ordered, node_of)
