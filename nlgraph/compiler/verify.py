"""Check a compiled learner against the reference on random inputs.

The same comparison serves ``nlgraph compile SPEC --verify`` and the library-wide test: two
learners with the same parameters run the same inputs with the same outer loss (a fixed random
weighting of every output, so CMS blocks learn inside the sequence); then a fixed random
cotangent of every output and of every final state is pulled back. Compared per tensor, as the
max relative error ``max |chosen - reference| / max |reference|``: the outputs, every leaf of the
final state (non-tensor leaves such as chunk phases must be equal) and the gradient of every
parameter, meta-learned initial states included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nlgraph._errors import CompileError, NLGraphError

__all__ = ["Comparison", "compare", "random_inputs"]


@dataclass(frozen=True)
class Comparison:
    """The result of :func:`compare`: the max relative error per tensor (a string where two
    tensors cannot be compared: ``"missing"``, ``"shape"``, ``"differs"``) and the seconds each
    learner took for its forward and backward."""

    errors: dict[str, float | str]
    reference_seconds: float
    chosen_seconds: float

    def failures(self, tolerance: float) -> list[str]:
        """Names of the tensors whose error exceeds ``tolerance`` (or cannot be compared)."""
        return [k for k, e in self.errors.items() if not (isinstance(e, float) and e <= tolerance)]


def compare(
    reference: nn.Module, chosen: nn.Module, inputs: dict[str, torch.Tensor], seed: int = 0
) -> Comparison:
    """Run both learners (same parameters: load one's ``state_dict`` into the other first) on
    ``inputs`` and compare outputs, final states and gradients (module docstring)."""
    T = next(iter(inputs.values())).shape[1]
    has_blocks = any(lp.lowering == "boundary" for lp in chosen.plan.levels.values())
    gen = torch.Generator().manual_seed(seed + 1)
    weights: dict[str, torch.Tensor] = {}  # shared, so both learners see the same numbers
    cotangents: dict[str, torch.Tensor] = {}

    def fixed(table: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in table:
            table[name] = torch.randn(like.shape, generator=gen, dtype=like.dtype)
        return table[name]

    def loss_fn(outputs: dict[str, torch.Tensor], start: int, end: int) -> torch.Tensor:
        total = 0.0
        for name, y in sorted(outputs.items()):
            full = y.new_empty((y.shape[0], T, *y.shape[2:]))
            total = total + (y * fixed(weights, name, full)[:, start:end]).sum()
        return total

    def run(learner: nn.Module) -> tuple[dict[str, Any], float]:
        learner.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        try:
            outputs, state = learner(inputs, loss_fn=loss_fn if has_blocks else None)
            flat = {f"output {k}": v for k, v in sorted(outputs.items())}
            flat.update({f"state {k}": v for k, v in flatten(state)})
            pulled = {k: v for k, v in flat.items() if torch.is_tensor(v) and v.requires_grad}
            loss = sum((v * fixed(cotangents, k, v)).sum() for k, v in pulled.items())
            if pulled:
                loss.backward()
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise NLGraphError(
                f"the {learner.backend} learner failed on inputs "
                f"{ {k: list(v.shape) for k, v in inputs.items()} }: {first}"
            ) from err
        seconds = time.perf_counter() - t0
        flat.update(
            {f"grad {n}": p.grad for n, p in learner.named_parameters() if p.grad is not None}
        )
        return flat, seconds

    ref, ref_s = run(reference)
    new, new_s = run(chosen)
    return Comparison(_errors(ref, new), ref_s, new_s)


def random_inputs(
    learner: nn.Module,
    shape: tuple[int, int],
    dims: dict[str, int],
    dtype: torch.dtype,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Inputs of the spec's shapes: ``[B, T, dim]`` normals, or ``[B, T]`` token ids below the
    learner's smallest embedding (or ``dims["vocab"]``)."""
    B, T = shape
    gen = torch.Generator().manual_seed(seed)
    vocabs = [m.num_embeddings for m in learner.modules() if isinstance(m, nn.Embedding)]
    out: dict[str, torch.Tensor] = {}
    for inp in learner.plan.spec.inputs:
        if inp.kind == "tokens":
            if "vocab" in dims:
                vocab = dims["vocab"]
                if vocabs and vocab > min(vocabs):
                    raise CompileError(
                        f"vocab={vocab} exceeds the learner's embedding of {min(vocabs)} rows; "
                        f"bind vocab <= {min(vocabs)} (--dim vocab=N)"
                    )
            elif vocabs:
                vocab = min(vocabs)
            else:
                raise CompileError(
                    f"input {inp.name!r} takes tokens but the learner has no nn.Embedding to "
                    "size them; bind vocab=N (--dim vocab=N)"
                )
            out[inp.name] = torch.randint(vocab, (B, T), generator=gen)
            continue
        d = inp.dim
        if isinstance(d, str):
            if d not in dims:
                raise CompileError(
                    f"input {inp.name!r} has symbolic width {d!r}; bind it (--dim {d}=N)"
                )
            d = dims[d]
        if d is None:
            raise CompileError(f"input {inp.name!r} declares no width; cannot make test inputs")
        out[inp.name] = torch.randn(B, T, d, generator=gen, dtype=dtype)
    return out


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, leaf)`` of nested state dicts and lists, in a fixed order."""
    if isinstance(value, dict):
        for k in sorted(value, key=str):
            yield from flatten(value[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from flatten(v, f"{prefix}.{i}")
    else:
        yield prefix, value


def _errors(ref: dict[str, Any], new: dict[str, Any]) -> dict[str, float | str]:
    """Max relative error per tensor; equal non-tensor leaves (chunk phases, counters) are
    checked but not listed."""
    rows: dict[str, float | str] = {}
    for key in list(ref) + [k for k in new if k not in ref]:
        a, b = new.get(key), ref.get(key)
        if not torch.is_tensor(b) and not torch.is_tensor(a):
            if a != b:
                rows[key] = "differs"
            continue
        if a is None or b is None:
            rows[key] = "missing"
        elif a.shape != b.shape:
            rows[key] = "shape"
        else:
            a, b = a.detach().double(), b.detach().double()
            scale = b.abs().max().clamp_min(1e-12) if b.numel() else 1.0
            err = ((a - b).abs().max() / scale).item() if b.numel() else 0.0
            rows[key] = err if err == err else float("inf")  # NaN fails the check
    return rows
