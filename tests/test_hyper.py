"""Symbolic hyperparameters survive a file: a loaded optimizer graph takes ``lr=`` and follows a
scheduler exactly as the optimizer compiled from its function (nlgraph.hyper)."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nlgraph as nl
import nlgraph.library as L
from nlgraph._expr import Fn, Name, Num, Op, evaluate, parse, text
from nlgraph.optim import compile_optimizer

F64 = torch.float64
MIXED = [(6, 4), (7,), (3, 4, 5), (1,), (4, 6)]
MATRICES = [(6, 4), (3, 4, 5), (4, 6)]
ROWS = {  # library name -> (values that shape the graph, shapes); every option switched on
    "sgd": ({"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, MIXED),
    "momentum": ({}, MIXED),
    "nesterov": ({}, MIXED),
    "adam": ({"amsgrad": True, "weight_decay": 0.01}, MIXED),
    "adamw": ({"amsgrad": True}, MIXED),
    "adagrad": ({"lr_decay": 0.01, "initial_accumulator_value": 0.1, "weight_decay": 0.1}, MIXED),
    "rmsprop": ({"momentum": 0.5, "centered": True, "weight_decay": 0.01}, MIXED),
    "adagrad_momentum": ({}, MIXED),
    "preconditioned_momentum": ({}, MIXED),
    "delta_momentum": ({"decay": 1e-2, "normalize": True}, MIXED),
    "meta_momentum": ({"every": 3}, MIXED),
    "dmgd": ({"width": 4}, MIXED),
    "muon": ({"nesterov": True, "wd": 0.01}, MATRICES),
    "muon_adamw": ({"variant": "cubic"}, MIXED),
    "m3": ({"f": 3}, MATRICES),
    "m3_adamw": ({"f": 4, "momenta": "ema"}, MIXED),
    "dgd_update": ({}, MATRICES),
}


def test_every_library_optimizer_has_a_row():
    assert set(ROWS) == set(L.names("optimizer"))


def saved(graph: nl.Graph, fmt: str) -> nl.Graph:
    return nl.from_yaml(graph.to_yaml()) if fmt == "yaml" else nl.from_json(graph.to_json())


def run(cls, shapes, steps=8, **kw):
    """``steps`` steps on a fixed quadratic, the lr halved every other step by a scheduler."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=F64).requires_grad_() for s in shapes]
    torch.manual_seed(0)  # DMGD's memories start random
    opt = cls(params, **kw)
    model = torch.nn.Linear(4, 6, bias=False, dtype=F64)
    if "dgd" in cls.__name__.lower():  # DGD regresses each layer's inputs: one watched layer
        params = [model.weight]
        opt = cls(params, **kw)
        opt.watch(model)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for i in range(steps):
        if params[0] is model.weight:
            x = torch.randn(5, 4, generator=gen, dtype=F64)
            model(x).pow(2).sum().backward()
        else:
            for j, p in enumerate(params):
                p.grad = (1 + j) * p.detach() + torch.sin(p.detach() * (i + 1))
        opt.step()
        opt.zero_grad()
        sched.step()
    assert all("lr" in g for g in opt.param_groups)
    return params, opt


@pytest.mark.parametrize("fmt", ["yaml", "json"])
@pytest.mark.parametrize("name", sorted(ROWS))
def test_a_loaded_library_optimizer_is_the_original(name, fmt):
    shape, shapes = ROWS[name]
    traced = nl.trace(L.builder(name), **shape)
    loaded = saved(traced, fmt)
    assert loaded.spec == traced.spec and loaded.spec.hyperparameters is not None
    original, again = compile_optimizer(L.builder(name)), compile_optimizer(loaded)
    names = list(inspect.signature(original.__init__).parameters)
    assert list(inspect.signature(again.__init__).parameters) == names
    lr = 0.5 * traced.hyperparameters.values()["lr"]
    p1, o1 = run(original, shapes, **{**shape, "lr": lr})
    p2, o2 = run(again, shapes, lr=lr)  # the shaping values are the loaded graph's defaults
    assert o2.compilations == 1  # the schedule changes numbers, not the program
    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b)
        for key in o1.state[a]:
            assert torch.equal(o1.state[a][key], o2.state[b][key]), key


@pytest.mark.parametrize("name", sorted(ROWS))
def test_substituting_any_hyperparameter_builds_what_the_function_builds(name):
    shape, _ = ROWS[name]
    loaded = saved(nl.trace(L.builder(name), **shape), "yaml")
    hp = loaded.hyperparameters
    for p in hp.params:
        if p.fixed:
            continue
        new = p.default * 0.75 if p.default else 0.0
        if not all(nl.hyper._holds(c, {**hp.values(), p.name: new}) for c in hp.requires):
            continue
        want = nl.trace(L.builder(name), **{**shape, p.name: new}).spec
        assert nl.substitute(loaded, **{p.name: new}).spec == want, p.name


def test_what_a_file_holds():
    data = nl.to_dict(nl.trace(L.builder("adamw")))
    assert data["schema_version"] == nl.SCHEMA_VERSION == 2
    hp = data["hyperparameters"]
    assert {"name": "amsgrad", "default": False, "fixed": True} in hp["params"]
    assert {"at": "levels[w].optimizer[0].rate", "value": "lr * wd"} in hp["uses"]
    assert {"at": "levels[m].optimizer[0].beta", "value": "b1"} in hp["uses"]


def test_a_version_1_file_still_loads():
    data = nl.to_dict(L.get("adam"))
    data["schema_version"] = 1
    assert "hyperparameters" not in data
    assert nl.from_dict(data).spec == L.get("adam").spec


def test_a_graph_without_hyperparameters_compiles_with_none():
    cls = compile_optimizer(nl.from_yaml(L.get("sgd").to_yaml()))
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(TypeError, match="unknown hyperparameters"):
        cls([w], lr=0.1)
    with pytest.raises(nl.SpecError, match="nl.trace"):
        nl.substitute(L.get("sgd"), lr=0.1)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"weight_decay": 0.1}, "weight_decay=0.1 breaks 'weight_decay == 0'"),
        ({"amsgrad": True}, "amsgrad is fixed at False"),
        ({"beta": 0.5}, "unknown hyperparameters ['beta']"),
        ({"b1": 1.5}, "b1=1.5 makes levels[w].optimizer[0].update.a.b.beta = b1 invalid"),
        ({"lr": float("nan")}, "not a finite number"),
    ],
)
def test_a_value_the_saved_graph_cannot_take_is_one_line(values, message):
    loaded = saved(nl.trace(L.builder("adam")), "yaml")
    with pytest.raises(nl.SpecError) as err:
        nl.substitute(loaded, **values)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_float_the_trace_cannot_follow_is_fixed():
    def rooted(lr: float = 0.04, scale: float = 2.0) -> nl.Graph:
        g = nl.Graph("rooted")
        step = -math.sqrt(lr) * scale * nl.grad_of("w")  # math.sqrt leaves the trace
        g.level("w", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
                optimizer=nl.follow(step))  # fmt: skip
        return g

    hp = nl.trace(rooted).hyperparameters
    assert {p.name: p.fixed for p in hp.params} == {"lr": True, "scale": False}
    with pytest.raises(nl.SpecError, match="lr is fixed at 0.04"):
        nl.substitute(nl.trace(rooted), lr=0.01)
    got = nl.substitute(nl.trace(rooted), scale=3.0).spec
    assert got == nl.trace(rooted, scale=3.0).spec


def test_a_hand_edited_number_that_disagrees_with_its_default_is_refused():
    data = nl.to_dict(nl.trace(L.builder("momentum")))
    data["levels"][1]["optimizer"][0]["lr"] = 0.5
    with pytest.raises(nl.SpecError, match="holds 0.5 but lr gives 0.01"):
        nl.from_dict(data)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda hp: hp["uses"].append({"at": "levels[w].nope", "value": "lr"}), "not a number"),
        (lambda hp: hp["uses"].append({"at": "levels[w]..x", "value": "lr"}), "is not a path"),
        (lambda hp: hp["uses"][0].update(value="__import__('os')"), "cannot read"),
        (lambda hp: hp["uses"][0].update(value="lr2"), "uses ['lr2']"),
        (lambda hp: hp["requires"].append("lr"), "expected a comparison"),
        (lambda hp: hp["params"].append({"name": "lr", "default": 1.0}), "declared twice"),
        (lambda hp: hp["params"].append({"name": "a b", "default": 1.0}), "not a Python ident"),
    ],
)
def test_a_bad_hyperparameters_section_is_one_line(edit, message):
    data = nl.to_dict(nl.trace(L.builder("momentum")))
    data["hyperparameters"].setdefault("requires", [])
    edit(data["hyperparameters"])
    with pytest.raises(nl.SpecError) as err:
        nl.from_dict(data)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_tracing_refuses_what_cannot_be_saved():
    def needs(lr: float, net: object = object) -> nl.Graph:
        return L.get("sgd", lr=lr)

    with pytest.raises(nl.SpecError, match="'lr' has no default"):
        nl.trace(needs)
    with pytest.raises(nl.SpecError, match="net=<class 'object'> is a type"):
        nl.trace(needs, lr=0.1)
    with pytest.raises(nl.SpecError, match=r"unknown hyperparameters \['mu'\]"):
        nl.trace(L.builder("sgd"), mu=0.9)


# expressions print as Python arithmetic that evaluates, bit for bit, to what was recorded
NAMES = ["lr", "b1", "wd"]
leaves = st.sampled_from([Name(n) for n in NAMES]) | st.builds(
    Num, st.floats(-4, 4, allow_nan=False) | st.integers(-3, 3)
)
exprs = st.recursive(
    leaves,
    lambda kids: (
        st.builds(lambda x: Op(Fn.NEG, (x,)), kids)
        | st.builds(
            lambda f, a, b: Op(f, (a, b)),
            st.sampled_from([Fn.ADD, Fn.SUB, Fn.MUL, Fn.DIV]),
            kids,
            kids,
        )
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(e=exprs, values=st.tuples(*[st.floats(0.1, 3.0)] * 3))
def test_an_expression_reads_back_to_the_same_number(e, values):
    env = dict(zip(NAMES, values, strict=True))
    try:
        want = evaluate(e, env)
    except ZeroDivisionError:
        return
    got = evaluate(parse(text(e)), env)
    assert got == want or (math.isnan(got) and math.isnan(want)), text(e)


def test_powers_and_signs_print_with_python_precedence():
    a, b = Name("a"), Name("b")
    for e, s in [
        (Op(Fn.NEG, (Op(Fn.POW, (a, b)),)), "-a ** b"),
        (Op(Fn.POW, (Op(Fn.NEG, (a,)), b)), "(-a) ** b"),
        (Op(Fn.POW, (a, Op(Fn.POW, (b, a)))), "a ** (b ** a)"),
        (Op(Fn.SUB, (a, Op(Fn.SUB, (b, a)))), "a - (b - a)"),
        (Op(Fn.POW, (Num(-2.0), a)), "(-2.0) ** a"),
    ]:
        assert text(e) == s
        assert evaluate(parse(s), {"a": 2.0, "b": 3.0}) == evaluate(e, {"a": 2.0, "b": 3.0})
