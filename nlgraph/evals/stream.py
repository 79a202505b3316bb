"""The continual-learning stream: tasks A, B, then A again (PAPER.md 9 item 17, 7.4).

A task is a random key -> value function (:func:`~nlgraph.evals.tasks.kv_mapping`); each stream
(one row of the batch) draws its own A and B, never seen in training, so nothing about them is
in the slow weights. The stream is ``segments`` segments of A, then of B, then of A, each a
fresh sequence of facts ``k f(k)`` (:func:`~nlgraph.evals.tasks.kv_segment`). Attention and
other in-context memories restart with every segment, so a key's *first* occurrence in a
segment can only be answered from what the model's weights kept: its CMS levels.

Three ways to run the same trained model:

- ``carried``: CMS levels learn at test time (``loss_fn`` given) and their state is carried
  from segment to segment (``state=``), the continual-learning setting;
- ``reset``: they learn within each segment but restart from their initial state, as in
  training;
- ``frozen``: ``loss_fn=None``, the levels hold their meta-learned initial parameters.

Scores are the accuracy on first occurrences (from memory; chance is ``1/n_values``) and on
all scored positions. Forgetting is the drop of first-occurrence accuracy on A from the end of
the first A phase to the first segment after B.
"""

from __future__ import annotations

from typing import Any

import torch

from nlgraph.evals import loop
from nlgraph.evals.tasks import as_generator, kv_mapping, kv_segment

__all__ = ["VARIANTS", "run_stream"]

VARIANTS = ("carried", "reset", "frozen")


def _acc(correct: torch.Tensor, mask: torch.Tensor) -> float:
    return float(correct[mask].float().mean()) if mask.any() else float("nan")


def _mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 4)


def run_stream(learner: Any, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Run the A, B, A stream through ``learner`` in each of :data:`VARIANTS`.

    Returns ``{"chance", "variants": {name: {"A_learned", "B_learned", "A_after_B",
    "A_relearned", "forgetting", "curve": [...]}}}``; the ``*_learned`` scores average the
    second half of a phase, ``A_after_B`` is the first segment after B.
    """
    g = as_generator(seed)
    S, n = cfg["streams"], cfg["segments"]
    maps = {
        t: torch.stack([kv_mapping(cfg["n_keys"], cfg["n_values"], seed=g) for _ in range(S)])
        for t in "AB"
    }
    plan = [(i, t) for i, t in enumerate("ABA") for _ in range(n)]
    segments = [kv_segment(maps[t], n_pairs=cfg["n_pairs"], seed=g) for _, t in plan]
    out: dict[str, Any] = {"chance": round(1 / cfg["n_values"], 4), "variants": {}}
    for variant in VARIANTS:
        state: dict[str, Any] | None = None
        curve = []
        for (phase, task), batch in zip(plan, segments, strict=True):
            feedback = variant != "frozen"
            correct, new = loop.predict(learner, batch, feedback=feedback, state=state)
            state = loop.carried(learner, new) if variant == "carried" else None
            curve.append(
                {
                    "phase": phase,
                    "task": task,
                    "first": round(_acc(correct, batch.masks["first"]), 4),
                    "all": round(_acc(correct, batch.scored), 4),
                }
            )

        def late(phase: int, key: str = "first", curve: list = curve) -> float:
            return _mean([c[key] for c in curve if c["phase"] == phase][-max(1, n // 2) :])

        first_after = [c for c in curve if c["phase"] == 2][0]
        res = {
            "A_learned": late(0),
            "B_learned": late(1),
            "A_after_B": first_after["first"],
            "A_relearned": late(2),
            "all_A_learned": late(0, "all"),
            "all_A_after_B": first_after["all"],
        }
        res["forgetting"] = round(res["A_learned"] - res["A_after_B"], 4)
        out["variants"][variant] = {**res, "curve": curve}
    return out
