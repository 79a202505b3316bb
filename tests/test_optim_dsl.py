"""What optimizer graphs add to the DSL (shape selectors, the ``ticks`` flow) and how the compiler
lowers them: random flows compile to the same numbers as the naive reference; hyperparameters are
runtime numbers; what cannot be lowered is refused with a message that says why."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nlgraph as nl
import nlgraph.library as L
from nlgraph.compiler.optimizer import OptimizerProgram, scan
from nlgraph.flows import Ticks, ticks
from nlgraph.optim import compile_optimizer

F64 = torch.float64


def test_params_select_by_number_of_dimensions():
    assert str(nl.params(min_ndim=2)) == "params[ndim>=2]"
    assert str(nl.params(max_ndim=1)) == "params[ndim<=1]"
    sel = nl.params(min_ndim=1, max_ndim=2)
    assert [sel.selects_ndim(n) for n in range(4)] == [False, True, True, False]
    g = nl.Graph("bad")
    with pytest.raises(nl.SpecError, match="min_ndim=3 > max_ndim=1 selects no parameter"):
        g.level("w", state={"kind": "params", "min_ndim": 3, "max_ndim": 1},
                frequency=nl.per_step())  # fmt: skip
    with pytest.raises(ValueError, match="selects no parameter"):
        nl.params(min_ndim=3, max_ndim=1)


def test_ticks_flow_round_trips_and_prints():
    g = L.get("adagrad", lr_decay=0.1)
    assert any(isinstance(n, Ticks) for n in nl.flows.walk(g.get("w").optimizer[0].update))
    assert nl.from_json(g.to_json()) == g and nl.from_yaml(g.to_yaml()) == g
    assert str(ticks() - 1) == "t - 1"


def test_hyperparameters_are_numbers_of_one_skeleton():
    key1, nums1, _ = scan(L.get("adam", lr=1e-3).spec)
    key2, nums2, _ = scan(L.get("adam", lr=5e-4).spec)
    key3, _, _ = scan(L.get("adam", amsgrad=True).spec)
    assert key1 == key2 and key1 != key3
    assert -1e-3 in nums1 and -5e-4 in nums2


def _graph(**level) -> nl.Graph:
    g = nl.Graph("g")
    g.level("w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.follow(nl.state("m", at="new")))  # fmt: skip
    fields = {"state": nl.like("w"), "frequency": nl.per_step(), "context": -nl.grad_of("w"),
              "objective": nl.dot(), "optimizer": nl.gd(lr=0.1), **level}  # fmt: skip
    g.level("m", **fields)
    return g


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: _graph(frequency=nl.per_token()), "update per step"),
        (
            lambda: _graph(
                objective=nl.lp(3), context=nl.kv(key=nl.grad_of("w"), value=nl.grad_of("w"))
            ),
            "objective 'lp'",
        ),  # fmt: skip
        (
            lambda: _graph(
                state=nl.mlp(2, 2, width=4),
                context=nl.kv(key=nl.grad_of("w"), value=nl.grad_of("w")),
                objective=nl.l2(),
            ),
            "mlp\\(1, 1",
        ),  # fmt: skip
        (lambda: _graph(state=nl.tensor(3)), "belongs to no parameters"),
    ],
    ids=["per-token", "lp", "wide-mlp", "tensor-state"],
)
def test_what_has_no_lowering_is_refused(make, match):
    """One source of truth: an optimizer graph (every level per step) the compiler cannot run
    does not validate; any other graph handed to the optimizer compiler is refused there."""
    graph = make()
    optimizer_graph = all(lv.frequency.unit == "step" for lv in graph.spec.levels)
    error = nl.SpecError if optimizer_graph else nl.CompileError
    if optimizer_graph:
        with pytest.raises(nl.SpecError, match=match):
            graph.validate()
    with pytest.raises(error, match=match):
        OptimizerProgram(graph.spec)


def test_parts_share_no_state():
    g = nl.Graph("split")
    g.level("w", state=nl.params(min_ndim=2), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.follow(nl.state("b.m", at="new")))  # fmt: skip
    g.level("b", state=nl.params(max_ndim=1), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.follow(nl.state("b.m", at="new")))  # fmt: skip
    g.level("b.m", state=nl.like("b"), frequency=nl.per_step(), context=-nl.grad_of("b"),
            objective=nl.dot(), optimizer=nl.gd(lr=0.1))  # fmt: skip
    with pytest.raises(nl.SpecError, match="parts selected by shape share no state"):
        g.validate()


def test_params_selected_by_name_are_refused():
    g = nl.Graph("named")
    g.level("w", state=nl.params("*.weight"), frequency=nl.per_step(), context=-nl.grad_of("w"),
            objective=nl.dot(), optimizer=nl.gd(lr=0.1))  # fmt: skip
    with pytest.raises(nl.CompileError, match="select by shape"):
        OptimizerProgram(g.spec)


# ------------------------------------------------- random flows: compiled equals reference

LEAVES = st.sampled_from(["g", "m", "c"])
UNARY = ["neg", "square", "abs", "sign", "tanh", "sigmoid", "relu", "silu", "normalize", "exp"]


def flows(depth: int = 3):
    def build(tree):
        if isinstance(tree, str):
            return {"g": nl.grad_of("w"), "m": nl.state("m", at="new"), "c": nl.const(1.5)}[tree]
        op, *args = tree
        xs = [build(a) for a in args]
        if op in UNARY:
            inner = xs[0].apply("tanh") if op == "exp" else xs[0]  # keep exp bounded
            return inner.apply(op)
        if op == "sqrt":
            return (xs[0].abs() + 1).sqrt()
        if op == "div":
            return xs[0] / (xs[1].abs() + 0.5)
        if op == "pow":
            return (xs[0].abs() + 0.5) ** 1.5
        return {"add": xs[0] + xs[1], "sub": xs[0] - xs[1], "mul": xs[0] * xs[1]}[op]

    tree = st.recursive(
        LEAVES,
        lambda kids: st.one_of(
            st.tuples(st.sampled_from([*UNARY, "sqrt", "pow"]), kids),
            st.tuples(st.sampled_from(["add", "sub", "mul", "div"]), kids, kids),
        ),
        max_leaves=6,
    )
    return tree.map(build)


def flow_graph(update) -> nl.Graph:
    g = nl.Graph("random")
    g.level("w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.follow(-0.01 * update))  # fmt: skip
    g.level("m", state=nl.like("w"), frequency=nl.per_step(), objective=nl.l2_to(nl.grad_of("w")),
            optimizer=nl.ema(0.9))  # fmt: skip
    return g


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(update=flows())
def test_random_flows_compile_to_the_reference(update):
    g = flow_graph(update)
    if isinstance(update, nl.flows.Const):
        return
    cls = compile_optimizer(lambda: g)
    out = []
    for backend in ("foreach", "reference"):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=gen, dtype=F64).requires_grad_() for s in ((3, 2), (4,))]
        opt = cls(ps)
        opt.backend = backend
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen, dtype=F64)
            opt.step()
        out.append(ps)
    for a, b in zip(*out, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_the_design_example_declares_a_working_optimizer():
    """examples/design_an_optimizer.py: its delta-rule Adam compiles, equals its reference and
    trains (the script itself needs scikit-learn's digits; here a random problem)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "design_an_optimizer.py"
    spec = importlib.util.spec_from_file_location("design_an_optimizer", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.delta_adam().tiers() == [["m", "v"], ["w"]]
    out = []
    for backend in ("foreach", "reference"):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.randn(s, generator=gen, dtype=F64).requires_grad_() for s in ((5, 3), (3,))]
        opt = example.DeltaAdam(ps, lr=0.05)
        opt.backend = backend
        for _ in range(20):
            for p in ps:
                p.grad = 2 * p.detach()  # of ||p||^2
            opt.step()
        out.append(ps)
    for a, b in zip(*out, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert sum(p.norm() for p in out[0]) < 0.5 * sum(
        torch.randn(s, generator=torch.Generator().manual_seed(0), dtype=F64).norm()
        for s in ((5, 3), (3,))
    )
