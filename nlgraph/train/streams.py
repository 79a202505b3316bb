"""What a run's sequences reach: inert parameters, and fast state carried across steps.

:func:`inert_report` probes the learner (:meth:`CompiledLearner.inert_parameters`, one forward
and backward of one sequence) for the parameters a step gives no gradient, and words the
warning ``nlgraph train`` prints at the start of a model's training. With ``--carry-state``
every step after the first starts from the carried state instead of the initial one, so the
meta-learned initial states (and Hope's CMS blocks' initial weights) get a gradient only in
the first step; a second probe, from a carried state, names them.

:func:`check_carry` refuses a model whose fast state grows with every token (softmax attention
keeps every key and value), which a carried stream would grow without bound;
:func:`check_fast_state` refuses a checkpoint whose fast state does not fit the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from nlgraph.compiler.streaming import detach_state
from nlgraph.train.errors import CheckpointError, TrainConfigError
from nlgraph.train.faults import level_of, nonfinite_in_state

__all__ = ["Inert", "inert_report", "check_carry", "check_fast_state", "reference_state"]

LISTED = 12  # levels named in a warning before "..."


class Inert:
    """The probe's findings: ``first`` (parameters the first step, from the initial state, does
    not reach) and ``later`` (reached by the first step but not by a step from a carried
    state; empty without ``--carry-state``), each ``{level: [parameter name, ...]}``."""

    def __init__(self, first: dict[str, list[str]], later: dict[str, list[str]]) -> None:
        self.first, self.later = first, later

    @property
    def any(self) -> bool:
        return bool(self.first or self.later)

    def lines(self, label: str, seq: int) -> list[str]:
        """The warnings to print (none when every parameter gets a gradient every step)."""
        out = []
        if self.first:
            out.append(
                f"warning: {label}: {_count(self.first)} get no gradient in a step of --seq {seq} "
                "(the loss reaches them only through writes no token reads, or first-order "
                f"writes) and stay at their initial values: {_names(self.first)}"
            )
        if self.later:
            out.append(
                f"warning: {label}: with --carry-state, {_count(self.later)} get a gradient only "
                "in the first step (later steps start from the carried fast state, not from "
                f"them): {_names(self.later)}"
            )
        return out


def _count(found: dict[str, list[str]]) -> str:
    n, m = sum(len(v) for v in found.values()), len(found)
    return f"{n} parameter{'s' if n != 1 else ''} of {m} level{'s' if m != 1 else ''}"


def _names(found: dict[str, list[str]]) -> str:
    parts = []
    for level, params in list(found.items())[:LISTED]:
        tensors = [level_of(p, [level])[1] or p for p in params]
        parts.append(f"{level} ({', '.join(tensors)})")
    more = len(found) - LISTED
    return "; ".join(parts) + (f"; and {more} more levels" if more > 0 else "")


def inert_report(learner: Any, seq: int, carry: bool) -> Inert:
    """Probe ``learner`` at ``seq`` tokens (a learner without the probe, e.g. a plain module,
    reports nothing). With ``carry``, also from the state one call leaves."""
    if not hasattr(learner, "inert_parameters"):
        return Inert({}, {})
    first = learner.inert_parameters(seq, 1, outputs=("logits",))
    later: dict[str, list[str]] = {}
    if carry:
        state = reference_state(learner, 1, seq)
        second = learner.inert_parameters(seq, 1, outputs=("logits",), state=state)
        seen = {p for ps in first.values() for p in ps}
        for level, params in second.items():
            new = [p for p in params if p not in seen]
            if new:
                later[level] = new
    return Inert(first, later)


def reference_state(learner: Any, batch: int, seq: int) -> Any:
    """The (detached) fast state one call of ``seq`` zero tokens leaves, ``batch`` rows."""
    device = next(iter(learner.parameters())).device
    tokens = torch.zeros(batch, seq, dtype=torch.long, device=device)
    with torch.no_grad():
        _, state = learner({"tokens": tokens})
    return detach_state(state)


def _shapes(state: Any) -> dict[str, tuple[int, ...]]:
    leaves, _ = tree_flatten(state)
    return {str(i): tuple(x.shape) for i, x in enumerate(leaves) if torch.is_tensor(x)}


def check_carry(learner: Any, model: str, seq: int) -> None:
    """Refuse ``--carry-state`` for a model whose fast state grows with the tokens it reads."""
    one = reference_state(learner, 1, seq)
    tokens = torch.zeros(1, seq, dtype=torch.long, device=_device(learner))
    with torch.no_grad():
        _, two = learner({"tokens": tokens}, one)
    growing = sorted(lv for lv in one if _shapes(one[lv]) != _shapes(two.get(lv)))
    if growing:
        raise TrainConfigError(
            f"--carry-state: model {model!r} keeps every token it has read in its fast state "
            f"(levels {', '.join(growing)}: a key/value cache without a window), which would grow "
            "without bound over a stream; train it without --carry-state (--no-baselines drops "
            "the Transformer baseline)"
        )


def _device(learner: Any) -> torch.device:
    return next(iter(learner.parameters())).device


def check_fast_state(saved: Any, path: Path, learner: Any, batch: int, seq: int) -> None:
    """Refuse a checkpoint's fast state (of the global batch) that a ``batch``-row state of
    ``learner`` does not match: other levels or structure, other shapes or dtypes, non-finite
    values. Loads nothing into the learner."""
    mine = reference_state(learner, batch, seq)
    if not isinstance(saved, dict) or sorted(saved) != sorted(mine):
        held = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise _damaged(path, f"holds a fast state of {held}, not of this model's fast levels")
    for level in mine:
        a, spec_a = tree_flatten(saved[level])
        b, spec_b = tree_flatten(mine[level])
        if spec_a != spec_b:
            raise _damaged(path, f"holds a fast state of level {level!r} of another structure")
        for x, y in zip(a, b, strict=True):
            if torch.is_tensor(y):
                if not torch.is_tensor(x) or x.shape != y.shape or x.dtype != y.dtype:
                    what = (f"{tuple(x.shape)} {x.dtype}" if torch.is_tensor(x)
                            else type(x).__name__)  # fmt: skip
                    raise _damaged(
                        path,
                        f"holds a fast state of level {level!r} with {what} where this run has "
                        f"{tuple(y.shape)} {y.dtype} (the global batch of --batch {batch})",
                    )
            elif type(x) is not type(y):
                raise _damaged(path, f"holds a fast state of level {level!r} of another type")
    hit = nonfinite_in_state(saved, list(mine))
    if hit:
        raise _damaged(path, f"holds a non-finite fast state ({hit[0]})")


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {str(path)!r} {what}; it is damaged or not written by this run: start a "
        "new run without --resume (or move the file away)"
    )
