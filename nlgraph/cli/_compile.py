"""``nlgraph compile``: build a learner, print its plan, verify it against the reference."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from typing import Any

from nlgraph._errors import NLGraphError
from nlgraph.cli._common import UsageError, load_spec

# --verify tolerance: max |chosen - reference| / max |reference| per tensor.
TOLERANCE = {"float64": 1e-8, "float32": 1e-3}


def _cmd_compile(args: argparse.Namespace) -> int:
    import torch

    from nlgraph.compiler import compile

    dims = dict(args.dim)
    # Triton kernels compute in float32 (they refuse float64)
    wide = args.verify and args.backend != "triton"
    dtype_name = args.dtype or ("float64" if wide else "float32")
    dtype = getattr(torch, dtype_name)
    backend = args.backend or ("chunk" if args.verify else "auto")
    graph = load_spec(args.spec)

    def build(b: str):
        torch.manual_seed(args.seed)
        return compile(graph, backend=b, dtype=dtype, **dims)

    forced = os.environ.get("NLGRAPH_BACKEND")
    if args.verify and forced:
        raise UsageError(
            f"NLGRAPH_BACKEND={forced} forces one backend on both sides of --verify; unset it "
            "and pick the backend to check with --backend"
        )
    learner = build(backend)
    plan = learner.plan
    n_params = sum(p.numel() for p in learner.parameters())
    lowerings = [lp.lowering for lp in plan.levels.values()]
    counts = ", ".join(f"{lowerings.count(k)} {k}" for k in sorted(set(lowerings)))
    print(
        f"compiled {plan.spec.name!r}: {len(lowerings)} levels ({counts}), "
        f"{n_params:,} parameters, backend {backend}, {dtype_name}"
    )
    if args.print_plan:
        print(plan)
    if not args.verify:
        return 0
    reference = build("reference")
    reference.load_state_dict(learner.state_dict())
    return _verify(reference, learner, args, dims, dtype_name)


def _verify(reference, chosen, args, dims: dict[str, int], dtype_name: str) -> int:
    """Run both learners on the same inputs and cotangent; print errors and times; 0 or 1."""
    import torch

    import nlgraph.kernels.deep_memory  # noqa: F401 - imported here, not inside the timed run
    import nlgraph.kernels.linear_memory  # noqa: F401

    dtype = getattr(torch, dtype_name)
    inputs = _random_inputs(chosen, (args.batch, args.seq), dims, dtype, args.seed)
    has_blocks = any(lp.lowering == "boundary" for lp in chosen.plan.levels.values())
    gen = torch.Generator().manual_seed(args.seed + 1)
    weights: dict[str, torch.Tensor] = {}  # shared, so both learners see the same numbers
    cotangents: dict[str, torch.Tensor] = {}

    def fixed(table: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
        if name not in table:
            table[name] = torch.randn(like.shape, generator=gen, dtype=like.dtype)
        return table[name]

    def loss_fn(outputs: dict[str, torch.Tensor], start: int, end: int) -> torch.Tensor:
        total = 0.0
        for name, y in sorted(outputs.items()):
            full = y.new_empty((y.shape[0], args.seq, *y.shape[2:]))
            total = total + (y * fixed(weights, name, full)[:, start:end]).sum()
        return total

    def run(learner) -> tuple[dict[str, Any], dict[str, torch.Tensor], float]:
        learner.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        try:
            outputs, state = learner(inputs, loss_fn=loss_fn if has_blocks else None)
            flat = {f"output {k}": v for k, v in sorted(outputs.items())}
            flat.update({f"state {k}": v for k, v in _flatten(state)})
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
        grads = {f"grad {n}": p.grad for n, p in learner.named_parameters() if p.grad is not None}
        return flat, grads, seconds

    ref_values, ref_grads, ref_s = run(reference)
    new_values, new_grads, new_s = run(chosen)
    tol = TOLERANCE[dtype_name]
    rows = _compare({**ref_values, **ref_grads}, {**new_values, **new_grads})
    name = chosen.plan.spec.name
    print(
        f"verify {name!r}: {chosen.backend} vs reference, B={args.batch} T={args.seq} "
        f"{dtype_name}, seed {args.seed}, tolerance {tol:g} (max relative error)"
    )
    width = max(len(k) for k in rows) if rows else 6
    print(f"  {'tensor':{width}s}  {'max rel err':>11s}")
    bad = []
    for key, err in rows.items():
        ok = isinstance(err, float) and err <= tol
        text = f"{err:11.2e}" if isinstance(err, float) else f"{err:>11s}"
        print(f"  {key:{width}s}  {text}  {'ok' if ok else 'FAIL'}")
        if not ok:
            bad.append(key)
    ratio = ref_s / new_s if new_s > 0 else float("inf")
    print(
        f"  time (forward+backward): reference {ref_s * 1e3:.1f} ms, {chosen.backend} "
        f"{new_s * 1e3:.1f} ms, speed ratio (reference/{chosen.backend}) {ratio:.2f}x"
    )
    if bad:
        print(f"FAIL: {len(bad)} of {len(rows)} tensors exceed {tol:g}: {', '.join(bad)}")
        return 1
    print(f"ok: all {len(rows)} tensors within {tol:g}")
    return 0


def _random_inputs(learner, shape: tuple[int, int], dims: dict[str, int], dtype, seed: int):
    """Inputs of the spec's shapes: ``[B, T, dim]`` normals, or ``[B, T]`` token ids."""
    import torch
    from torch import nn

    B, T = shape
    gen = torch.Generator().manual_seed(seed)
    vocabs = [m.num_embeddings for m in learner.modules() if isinstance(m, nn.Embedding)]
    out: dict[str, torch.Tensor] = {}
    for inp in learner.plan.spec.inputs:
        if inp.kind == "tokens":
            if "vocab" in dims:
                vocab = dims["vocab"]
                if vocabs and vocab > min(vocabs):
                    raise UsageError(
                        f"--dim vocab={vocab} exceeds the learner's embedding of "
                        f"{min(vocabs)} rows; pass vocab <= {min(vocabs)}"
                    )
            elif vocabs:
                vocab = min(vocabs)
            else:
                raise UsageError(
                    f"input {inp.name!r} takes tokens but the learner has no nn.Embedding to "
                    "size them; pass --dim vocab=N"
                )
            out[inp.name] = torch.randint(vocab, (B, T), generator=gen)
            continue
        d = inp.dim
        if isinstance(d, str):
            if d not in dims:
                raise UsageError(f"input {inp.name!r} has symbolic width {d!r}; pass --dim {d}=N")
            d = dims[d]
        if d is None:
            raise UsageError(f"input {inp.name!r} declares no width; cannot make test inputs")
        out[inp.name] = torch.randn(B, T, d, generator=gen, dtype=dtype)
    return out


def _flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted name, leaf)`` of nested state dicts and lists, in a fixed order."""
    if isinstance(value, dict):
        for k in sorted(value, key=str):
            yield from _flatten(value[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{prefix}.{i}")
    else:
        yield prefix, value


def _compare(ref: dict[str, Any], new: dict[str, Any]) -> dict[str, float | str]:
    """Max relative error per tensor (``str`` where they cannot be compared); equal non-tensor
    leaves (chunk phases, counters) are checked but not listed."""
    import torch

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


# ------------------------------------------------------------------------------ env
