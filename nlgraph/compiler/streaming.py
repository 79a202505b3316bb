"""Fast state as a stream: detach it, move it, save it and load it back.

A learner's fast state (what ``forward`` returns and takes back) is nested dicts and lists of
tensors and ints: per-sample memory states ``[B, ...]``, convolution tails, CMS blocks'
parameters, momentum buffers, chunk phases and token counts. Carrying it into the next call
continues the sequence exactly; these helpers make that usable over a long stream:

- :func:`detach_state` cuts the autograd graph (truncated backprop through time between calls);
- :func:`state_to` moves it to a device and casts its floating tensors (ints stay ints);
- :func:`save_state` / :func:`load_state` write it with ``torch.save`` and read it with
  ``torch.load(weights_only=True)`` (tensors and primitives only: nothing is unpickled). The
  file records the learner's spec and widths, and loading refuses a state from another one.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from nlgraph._errors import CompileError
from nlgraph.compiler.lowerings._state import detach_state
from nlgraph.serialize import to_dict

__all__ = ["FORMAT", "VERSION", "detach_state", "state_to", "save_state", "load_state"]

FORMAT = "nlgraph-fast-state"
VERSION = 1


def state_to(
    state: Any, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> Any:
    """``state`` with every tensor on ``device`` and every floating tensor cast to ``dtype``
    (``None``: unchanged); integer tensors and Python ints keep their type. Differentiable, like
    ``Tensor.to``: detach first to drop the graph."""
    if isinstance(state, torch.Tensor):
        cast = dtype if dtype is not None and state.is_floating_point() else None
        return state.to(device=device, dtype=cast)
    if isinstance(state, dict):
        return {k: state_to(v, device, dtype) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(state_to(v, device, dtype) for v in state)
    return state


def _identity(learner: Any) -> dict[str, Any]:
    return {"spec": to_dict(learner.spec), "dims": dict(learner.plan.dims)}


def save_state(learner: Any, state: Any, path: str | Path) -> Path:
    """Write ``state`` (as ``learner`` returned it) to ``path``: detached, on the CPU, with the
    learner's spec and widths. Returns the path."""
    path = Path(path)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        **_identity(learner),
        "state": state_to(detach_state(state), "cpu"),
    }
    torch.save(payload, path)
    return path


def load_state(
    learner: Any,
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Any:
    """The fast state saved by :func:`save_state` at ``path``, on ``device`` (default: where the
    learner's parameters are) with floating tensors in ``dtype`` (default: theirs). Refuses, with
    a :class:`~nlgraph.CompileError`, a file that is not a saved fast state or one saved from
    another spec or other widths."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CompileError(f"no fast state at {str(path)!r}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CompileError(f"cannot read fast state {str(path)!r}: {first[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CompileError(f"{str(path)!r} is not a fast state written by save_state")
    if payload.get("version") != VERSION:
        raise CompileError(
            f"{str(path)!r} holds fast-state version {payload.get('version')!r}; this nlgraph "
            f"reads version {VERSION}"
        )
    mine = _identity(learner)
    if payload.get("spec") != mine["spec"] or payload.get("dims") != mine["dims"]:
        theirs = payload.get("spec")
        name = theirs.get("name") if isinstance(theirs, dict) else None
        raise CompileError(
            f"{str(path)!r} holds the fast state of graph {name!r} with widths "
            f"{payload.get('dims')}, not of this learner's graph {learner.spec.name!r} with "
            f"widths {mine['dims']}; load it into a learner compiled from the same spec"
        )
    ref = next(iter(learner.parameters()), None)
    if device is None and ref is not None:
        device = ref.device
    if dtype is None and ref is not None:
        dtype = ref.dtype
    return state_to(payload["state"], device, dtype)
