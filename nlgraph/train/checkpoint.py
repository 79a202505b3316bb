"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and primitive containers: the learner's and the optimizer's
``state_dict``, the step (which is also the data position, see :mod:`nlgraph.train.data`), the RNG
states, the metrics so far and the run's settings. It is written to a temporary file in the same
folder, flushed and fsynced, then moved over the old one with ``os.replace`` (atomic on POSIX and
Windows), so a crash or Ctrl-C mid-write leaves the last good checkpoint in place.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from nlgraph.train.errors import CheckpointError

__all__ = [
    "FORMAT",
    "VERSION",
    "STATUSES",
    "save_atomic",
    "write_checkpoint",
    "load",
    "check_schema",
    "check_resume",
    "capture_rng",
    "restore_rng",
]

FORMAT = "nlgraph-train"
VERSION = 1
STATUSES = ("running", "done", "interrupted", "budget", "nan")


def save_atomic(payload: dict[str, Any], path: str | Path) -> Path:
    """Write ``payload`` to ``path`` so that ``path`` is always either the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def write_checkpoint(payload: dict[str, Any], path: str | Path, kept: str) -> Path:
    """:func:`save_atomic`, with an OS error (disk full, read-only...) as one line that names
    ``path`` and says what is still on disk (``kept``, e.g. "the checkpoint of step 4")."""
    path = Path(path)
    try:
        return save_atomic(payload, path)
    except OSError as err:
        intact = f"{kept} is intact" if kept else "no earlier checkpoint was written"
        if err.errno == errno.ENOSPC:
            raise CheckpointError(
                f"no space left on the device to write {str(path)!r}; {intact}; free some "
                "space, then continue with --resume"
            ) from None
        why = err.strerror or type(err).__name__
        raise CheckpointError(
            f"cannot write {str(path)!r}: {why}; {intact}; make the folder writable, then "
            "continue with --resume"
        ) from None


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic` (tensors and primitives only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {str(path)!r}; train without --resume first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt/unsafe files
        text = str(err).strip()
        # never pass on torch's advice to load with weights_only=False: unpickling an
        # untrusted file can run arbitrary code
        if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in text:
            raise CheckpointError(
                f"{str(path)!r} holds pickled Python objects, not only tensors: it is not a "
                "checkpoint nlgraph can load safely; start a new run without --resume"
            ) from None
        first = text.splitlines()[0] if text else type(err).__name__
        if "weights" in text.lower():
            first = "not a file of tensors nlgraph can load safely"
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {first}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an nlgraph training checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"{str(path)!r} has checkpoint version {payload.get('version')!r}; this nlgraph "
            f"reads version {VERSION}"
        )
    return payload


def capture_rng() -> dict[str, Any]:
    """The torch, Python ``random`` and (when imported) numpy RNG states, as tensors."""
    version, words, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64),
                   "gauss": gauss},
    }  # fmt: skip
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {
            "name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached),
        }  # fmt: skip
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(w) for w in py["words"].tolist()), py["gauss"]))
    np = sys.modules.get("numpy")
    if np is not None and "numpy" in state:
        s = state["numpy"]
        keys = s["keys"].numpy().astype("uint32")
        np.random.set_state((s["name"], keys, s["pos"], s["has_gauss"], s["cached"]))


# ------------------------------------------------------------------ validation before a resume
def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_rng(v: Any) -> bool:
    if not isinstance(v, dict) or not isinstance(v.get("torch"), torch.Tensor):
        return False
    py = v.get("python")
    if not (isinstance(py, dict) and _int(py.get("version"))):
        return False
    words, gauss = py.get("words"), py.get("gauss")
    if not (isinstance(words, torch.Tensor) and words.numel() == 625):
        return False
    if gauss is not None and not _num(gauss):
        return False
    np = v.get("numpy")
    if np is not None:
        keys = np.get("keys") if isinstance(np, dict) else None
        return (
            isinstance(keys, torch.Tensor)
            and keys.numel() == 624
            and isinstance(np.get("name"), str)
            and all(_int(np.get(k)) for k in ("pos", "has_gauss"))
            and _num(np.get("cached"))
        )
    return True


def _is_history(v: Any) -> bool:
    return isinstance(v, dict) and all(
        isinstance(v.get(k), list) and all(isinstance(r, dict) for r in v[k])
        for k in ("train", "val")
    )


_SCHEMA: dict[str, tuple[str, Any]] = {
    "label": ("a string", lambda v: isinstance(v, str)),
    "config": ("a dict of settings", lambda v: isinstance(v, dict)),
    "step": ("an integer", _int),
    "tokens": ("an integer", _int),
    "train_seconds": ("a number", _num),
    "skipped": ("an integer", _int),
    "status": (f"one of {', '.join(STATUSES)}", lambda v: v in STATUSES),
    "model": ("a state_dict", lambda v: isinstance(v, dict)),
    "optimizer": (
        "an optimizer state_dict",
        lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
        and isinstance(v.get("param_groups"), list),
    ),
    "rng": ("the RNG states", _is_rng),
    "history": ("a dict of 'train' and 'val' lists", _is_history),
}  # fmt: skip


def _damaged(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {str(path)!r} {what}; it is damaged or not written by nlgraph train: "
        "start a new run without --resume (or move the file away)"
    )


def check_schema(payload: dict[str, Any], path: str | Path, config_keys: Iterable[str]) -> None:
    """Refuse a checkpoint that lacks a key :meth:`Trainer.resume` reads, or holds the wrong
    type there (``config_keys``: the settings it must record)."""
    path = Path(path)
    for key, (expected, ok) in _SCHEMA.items():
        if key not in payload:
            raise _damaged(path, f"has no {key!r}")
        if not ok(payload[key]):
            raise _damaged(path, f"holds {type(payload[key]).__name__} for {key!r}, not {expected}")
    for key in config_keys:
        if key not in payload["config"]:
            raise _damaged(path, f"has no setting {key!r} in its 'config'")
    steps = payload["config"].get("steps")
    if not (_int(steps) and steps > 0):
        raise _damaged(path, f"records steps={steps!r}, not a positive integer")
    if "summary" in payload and not isinstance(payload["summary"], dict):
        raise _damaged(path, f"holds {type(payload['summary']).__name__} for 'summary', not a dict")


def _shape(t: torch.Tensor) -> str:
    return f"({', '.join(str(n) for n in t.shape)})"


def check_resume(
    payload: dict[str, Any],
    path: str | Path,
    steps: int,
    learner: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    levels: Iterable[str] = (),
) -> None:
    """Refuse a checkpoint (already through :func:`check_schema`) whose step is outside
    ``0..steps``, whose tensors do not fit ``learner`` (names the first mismatching one), whose
    weights are not finite, or whose optimizer state does not fit ``optimizer``. Loads nothing."""
    from nlgraph.train.faults import describe, first_nonfinite

    path = Path(path)
    step = payload["step"]
    if step < 0:
        raise _damaged(path, f"is at step {step}, below 0")
    if step > steps:
        raise _damaged(path, f"is at step {step}, beyond the {steps} steps this run plans")
    saved, mine = payload["model"], learner.state_dict()
    for name in mine:
        if name not in saved:
            raise _damaged(path, f"has no tensor {name!r} of this model")
    for name, value in saved.items():
        if name not in mine:
            raise _damaged(path, f"holds {name!r}, which this model does not have")
        if isinstance(mine[name], torch.Tensor):
            if not isinstance(value, torch.Tensor):
                raise _damaged(path, f"holds {type(value).__name__} for tensor {name!r}")
            if value.shape != mine[name].shape:
                raise _damaged(
                    path,
                    f"holds {name!r} with shape {_shape(value)}, this model has "
                    f"{_shape(mine[name])}",
                )
    hit = first_nonfinite(((n, v) for n, v in saved.items() if isinstance(v, torch.Tensor)), levels)
    if hit:
        raise _damaged(path, f"holds {describe(hit, 'parameters')}")
    groups, my_groups = payload["optimizer"]["param_groups"], optimizer.state_dict()["param_groups"]
    sizes = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
    my_sizes = [len(g["params"]) for g in my_groups]
    if sizes != my_sizes:
        raise _damaged(
            path, f"holds optimizer groups of {sizes} parameters, this optimizer has {my_sizes}"
        )
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in my_groups for i in g["params"]]
    by_id = dict(zip(ids, params, strict=True))
    saved_ids = [i for g in groups for i in g["params"]]
    for old, new in zip(saved_ids, ids, strict=True):
        entry = payload["optimizer"]["state"].get(old)
        if not isinstance(entry, dict):
            continue
        for key, t in entry.items():
            # the per-parameter buffers of torch's optimizers have the parameter's shape
            bad = isinstance(t, torch.Tensor) and t.shape != by_id[new].shape
            if key in _PER_PARAMETER and bad:
                raise _damaged(
                    path,
                    f"holds optimizer state {key!r} of shape {_shape(t)} for a parameter "
                    f"of shape {_shape(by_id[new])}",
                )


_PER_PARAMETER = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "square_avg")
