"""The plan's nodes: :class:`LevelPlan` (how one level runs) and :class:`Plan` (all of them, in
forward order, with the recurrent clusters), its printing and its final invariants; and
:class:`PlanState`, what the passes of :mod:`nlgraph.compiler.plan.passes` build."""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from nlgraph._errors import CompileError
from nlgraph.compiler.ir import Lowering, Role
from nlgraph.level import GraphSpec

__all__ = [
    "LOWERINGS", "LevelPlan", "Plan", "PlanState", "TokenLoop", "level_problems", "order_problems",
]  # fmt: skip

LOWERINGS: tuple[str, ...] = tuple(low.value for low in Lowering)


@dataclass(frozen=True)
class LevelPlan:
    """How one level is executed."""

    name: str
    role: Role
    lowering: Lowering
    chunk: int
    frequency: str
    reads: tuple[str, ...]  # levels whose state or output this level's update reads
    detail: str = ""  # the rule as lowered (coefficients), for the printed plan
    why: str = ""  # reference_loop: why no fast lowering covers the level


@dataclass
class Plan:
    spec: GraphSpec
    dims: dict[str, int]
    levels: dict[str, LevelPlan]
    order: list[str]  # evaluation order of the forward pass
    tiers: list[list[str]] = field(default_factory=list)
    backend: str = "auto"
    clusters: list[list[str]] = field(default_factory=list)  # memories run jointly

    def __str__(self) -> str:
        lines = [f"plan {self.spec.name!r}  backend={self.backend}  dims={self.dims}"]
        for i, tier in enumerate(self.tiers, 1):
            for n in tier:
                lp = self.levels[n]
                reads = f" reads {', '.join(lp.reads)}" if lp.reads else ""
                chunk = f" chunk={lp.chunk}" if lp.role == Role.FAST else ""
                lines.append(
                    f"  tier {i}  {n:18s} {lp.role!s:4s} {lp.lowering!s:14s} "
                    f"{lp.frequency}{chunk}{reads}"
                    + (f"\n{'':30s}{lp.detail}" if lp.detail else "")
                )
        lines.append("  forward order: " + " -> ".join(self.order))
        return "\n".join(lines)

    def check(self) -> None:
        """The invariants of a finished plan: every level planned once with a valid lowering
        and role, a positive chunk for fast levels, and the forward order lists every level once,
        after the levels it reads (slow ones, and fast ones outside its cluster)."""
        problems = level_problems(self.spec, self.levels) or order_problems(
            self.spec, self.levels, self.order, self.clusters
        )
        if problems:
            raise CompileError(f"plan invariant: {problems[0]}")

    def schedule(self, ticks: int) -> dict[str, list[int]]:
        """Token ticks 1..ticks at which each token/chunk level updates."""
        out: dict[str, list[int]] = {}
        for lv in self.spec.levels:
            f = lv.frequency
            if f.unit == "token":
                out[lv.name] = [t for t in range(1, ticks + 1) if f.updates_at(t)]
            elif f.unit == "chunk":
                c = self.spec.chunk_of(lv)
                out[lv.name] = [
                    t for t in range(1, ticks + 1) if t % c == 0 and f.updates_at(t // c)
                ]
        return out


@dataclass(frozen=True)
class TokenLoop:
    """A recurrent cluster run one token per window because ``late`` members are read at
    "new"."""

    members: tuple[str, ...]
    late: tuple[str, ...]


@dataclass(frozen=True)
class PlanState:
    """What the passes have built so far; each pass returns a new state (``replace``)."""

    spec: GraphSpec
    levels: dict[str, LevelPlan] = field(default_factory=dict)  # classify (clusters amend)
    deps: nx.DiGraph | None = None  # clusters: fast level -> the fast levels that read it
    clusters: list[list[str]] = field(default_factory=list)  # clusters: sorted members
    token_loops: tuple[TokenLoop, ...] = ()  # token_loops
    order: list[str] = field(default_factory=list)  # order: the forward order
    warned: tuple[str, ...] = ()  # warn: levels named in a ReferenceLoopWarning


def level_problems(spec: GraphSpec, levels: dict[str, LevelPlan]) -> list[str]:
    """What is wrong with ``levels`` on their own (empty: nothing): every level of ``spec``
    planned once under its own name, an :class:`~nlgraph.compiler.ir.Lowering` and a
    :class:`~nlgraph.compiler.ir.Role` that agree (``parameter`` exactly for slow levels), a
    positive chunk for fast levels, and a reason for every reference loop."""
    names = [lv.name for lv in spec.levels]
    if sorted(levels) != sorted(names):
        return [f"planned {sorted(levels)} != {sorted(names)}"]
    out = []
    for n, lp in levels.items():
        if lp.name != n:
            out.append(f"level {n!r} is planned under the name {lp.name!r}")
        if not isinstance(lp.lowering, Lowering):
            out.append(f"level {n!r} has lowering {lp.lowering!r}, not one of {LOWERINGS}")
        if not isinstance(lp.role, Role):
            out.append(f"level {n!r} has role {lp.role!r}, not slow or fast")
        elif (lp.role == Role.SLOW) != (lp.lowering == Lowering.PARAMETER):
            out.append(f"level {n!r} is {lp.role} but lowered as {lp.lowering}")
        if lp.role == Role.FAST and lp.chunk < 1:
            out.append(f"level {n!r} has chunk {lp.chunk}")
        if lp.lowering == Lowering.REFERENCE_LOOP and not lp.why:
            out.append(f"level {n!r} runs as the reference loop without saying why")
    return out


def order_problems(
    spec: GraphSpec, levels: dict[str, LevelPlan], order: list[str], clusters: list[list[str]]
) -> list[str]:
    """What is wrong with the forward ``order`` (empty: nothing): it lists every level once,
    each level after the slow levels it reads, and each fast level after the fast levels it
    reads outside its own recurrent cluster."""
    if sorted(order) != sorted(lv.name for lv in spec.levels):
        return ["the forward order must list every level once"]
    pos = {n: i for i, n in enumerate(order)}
    cluster_of = {n: i for i, members in enumerate(clusters) for n in members}
    out = []
    for n, lp in levels.items():
        for r in lp.reads:
            if r not in pos or pos[r] < pos[n]:
                continue
            joint = n in cluster_of and cluster_of.get(r) == cluster_of[n]
            slow_read = levels[r].role == Role.SLOW
            fast_read = lp.role == Role.FAST and levels[r].role == Role.FAST and not joint
            if slow_read or fast_read:
                out.append(f"{n!r} runs before {r!r}, which it reads")
    return out
