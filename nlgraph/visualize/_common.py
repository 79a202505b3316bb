"""What every drawing shares: the spec it reads, the levels ordered by frequency, labels.

Drawings read specs only (STYLE.md 1): nothing here imports the compiler or torch.
"""

from __future__ import annotations

import html
import re
import textwrap
from dataclasses import dataclass

from nlgraph.graph import Graph
from nlgraph.level import GraphSpec, Level
from nlgraph.optimizers import describe
from nlgraph.topology import frequency_key, tiers
from nlgraph.validation import validate

__all__ = [
    "Tier",
    "as_spec",
    "ordered_tiers",
    "frequency_label",
    "period_label",
    "wrap",
    "html_lines",
    "level_facts",
    "elide",
    "relative_names",
]


def as_spec(graph: Graph | GraphSpec) -> GraphSpec:
    """The validated spec of ``graph`` (raises :class:`~nlgraph.SpecError` when invalid)."""
    if isinstance(graph, Graph):
        spec = graph.spec
    elif isinstance(graph, GraphSpec):
        spec = graph
    else:
        raise TypeError(
            f"expected an nlgraph.Graph or GraphSpec, got {type(graph).__name__}; "
            "build one with nl.Graph(...) or nlgraph.library.get(name)"
        )
    return validate(spec)


@dataclass(frozen=True)
class Tier:
    """One level of Def. 2: levels sharing a frequency, independent of each other.

    ``rank`` counts from the fastest (1); ``key`` is the frequency key on the global clock.
    """

    rank: int
    key: tuple[int, int]
    names: tuple[str, ...]


def ordered_tiers(spec: GraphSpec) -> list[Tier]:
    """Tiers of ``spec``, fastest first, names sorted (``nlgraph.topology.tiers``)."""
    out = []
    for i, names in enumerate(tiers(spec), start=1):
        key = frequency_key(spec, spec.level(names[0]))
        out.append(Tier(rank=i, key=key, names=tuple(names)))
    return out


def period_label(tokens: int) -> str:
    """``16`` -> ``16``, ``2048`` -> ``2K``, ``1048576`` -> ``1M`` (exact multiples only)."""
    for div, suffix in ((1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if tokens >= div and tokens % div == 0:
            return f"{tokens // div}{suffix}"
    return str(tokens)


def frequency_label(spec: GraphSpec, level: Level) -> str:
    """``str(level.frequency)``, with the period in tokens when the unit is ``chunk``."""
    text = str(level.frequency)
    if level.frequency.unit == "chunk":
        period = level.frequency.every * spec.chunk_of(level)
        text += f" = {period_label(period)} tokens"
    return text


def wrap(text: str, width: int = 44) -> list[str]:
    """Break ``text`` into lines of at most ``width`` characters: at spaces, else after ``(`` or
    ``,`` inside long expressions, else anywhere."""
    out: list[str] = []
    for line in textwrap.wrap(text, width=width, break_long_words=False, break_on_hyphens=False):
        while len(line) > width:
            cut = max((i + 1 for i, ch in enumerate(line[:width]) if ch in "(,"), default=0)
            cut = cut if cut >= width // 3 else width
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return out or [""]


def html_lines(text: str, width: int = 44) -> str:
    """``text`` wrapped and escaped for a graphviz HTML-like label, lines left-aligned."""
    return '<BR ALIGN="LEFT"/>'.join(html.escape(line) for line in wrap(text, width))


def elide(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ending in ``…`` when cut."""
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def relative_names(spec: GraphSpec, level: Level, text: str) -> str:
    """Level and input names in ``text`` written relative to ``level``'s dotted namespace where
    that is unambiguous: inside ``block1.titans.M_k``, ``block1.titans.W_q`` reads ``W_q`` and
    ``block1.norm_mix`` reads ``norm_mix`` (unless another name would read the same)."""
    namespace = level.name.split(".")[:-1]
    if not namespace:
        return text
    known = {lv.name for lv in spec.levels} | {i.name for i in spec.inputs}
    prefixes = [".".join(namespace[:k]) + "." for k in range(len(namespace), 0, -1)]
    short: dict[str, str] = {}
    for name in known:
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is not None and name[len(prefix) :] not in known:
            short[name] = name[len(prefix) :]
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
    short = {k: v for k, v in short.items() if v not in clashes}
    if not short:
        return text
    alternatives = "|".join(re.escape(n) for n in sorted(short, key=lambda n: (-len(n), n)))
    pattern = re.compile(rf"(?<![\w.])({alternatives})(?![\w.])")
    return pattern.sub(lambda m: short[m.group(1)], text)


def level_facts(
    spec: GraphSpec, level: Level, *, relative: bool = False, limit: int | None = None
) -> list[tuple[str, str]]:
    """``(field, text)`` pairs describing ``level``, in the order drawings show them.

    ``relative``: write names relative to the level's namespace (:func:`relative_names`);
    ``limit``: elide texts longer than this many characters.
    """
    state = str(level.state) + (f" × {level.heads} heads" if level.heads > 1 else "")
    optimizer = describe(level.optimizer)
    if not level.optimizer and level.objective is not None and level.objective.kind == "outer":
        optimizer += " (the outer optimizer)"
    facts = [
        ("state", state),
        ("objective", str(level.objective) if level.objective is not None else "none"),
        ("optimizer", optimizer),
        ("frequency", frequency_label(spec, level)),
    ]
    if level.init.kind not in ("zeros", "default"):
        init = str(level.init)
        if level.init.kind == "meta" and not level.init.level:
            init += " (learned by the outermost level)"
        facts.append(("init", init))
    if level.reset is not None:
        facts.append(("reset", str(level.reset)))
    if relative:
        facts = [(k, relative_names(spec, level, v)) for k, v in facts]
    if limit is not None:
        facts = [(k, elide(v, limit)) for k, v in facts]
    return facts
