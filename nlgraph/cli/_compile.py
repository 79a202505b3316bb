"""``nlgraph compile``: build a learner, print its plan, verify it against the reference."""

from __future__ import annotations

import argparse

from nlgraph._errors import CompileError
from nlgraph.cli._common import UsageError, check_tokens, load_spec, width_bindings
from nlgraph.kernels import forced_backend

# --verify tolerance: max |chosen - reference| / max |reference| per tensor.
TOLERANCE = {"float64": 1e-8, "float32": 1e-3}


def _cmd_compile(args: argparse.Namespace) -> int:
    import torch

    if args.verify:
        check_tokens(args.batch, args.seq)

    from nlgraph.compiler import compile, optimizer_levels
    from nlgraph.optim import compile_system

    dims = dict(args.dim)
    # Triton kernels compute in float32 (they refuse float64)
    wide = args.verify and args.backend != "triton"
    dtype_name = args.dtype or ("float64" if wide else "float32")
    dtype = getattr(torch, dtype_name)
    backend = args.backend or ("chunk" if args.verify else "auto")
    graph = load_spec(args.spec)
    spec = getattr(graph, "spec", graph)
    system = bool(spec.inputs and optimizer_levels(spec))  # a learner with its optimizer
    systems = []

    def build(b: str):
        torch.manual_seed(args.seed)
        if system:  # the learner part is what runs (and is verified); the optimizer binds to it
            systems.append(compile_system(graph, backend=b, dtype=dtype,
                                          **width_bindings(graph, dims)))  # fmt: skip
            return systems[-1].learner
        return compile(graph, backend=b, dtype=dtype, **width_bindings(graph, dims))

    forced = forced_backend()
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
    if systems:
        print(f"  with its optimizer levels: {systems[0]!r}")
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
    from nlgraph.compiler.verify import compare

    dtype = getattr(torch, dtype_name)
    inputs = _random_inputs(chosen, (args.batch, args.seq), dims, dtype, args.seed)
    result = compare(reference, chosen, inputs, seed=args.seed)
    tol = TOLERANCE[dtype_name]
    name = chosen.plan.spec.name
    print(
        f"verify {name!r}: {chosen.backend} vs reference, B={args.batch} T={args.seq} "
        f"{dtype_name}, seed {args.seed}, tolerance {tol:g} (max relative error)"
    )
    rows = result.errors
    width = max(len(k) for k in rows) if rows else 6
    print(f"  {'tensor':{width}s}  {'max rel err':>11s}")
    bad = result.failures(tol)
    for key, err in rows.items():
        text = f"{err:11.2e}" if isinstance(err, float) else f"{err:>11s}"
        print(f"  {key:{width}s}  {text}  {'FAIL' if key in bad else 'ok'}")
    ref_s, new_s = result.reference_seconds, result.chosen_seconds
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
    """:func:`nlgraph.compiler.verify.random_inputs`, its errors as command-line errors."""
    from nlgraph.compiler.verify import random_inputs

    try:
        return random_inputs(learner, shape, dims, dtype, seed)
    except CompileError as err:
        raise UsageError(str(err)) from None
