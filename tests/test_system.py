"""The whole system: a learner and its optimizer levels in one graph, compiled into one object
(docs/compiler.md, "The whole system"). It equals the two-part path (the learner and the
optimizer compiled apart, applied by hand), resumes exactly, and refuses what it cannot run
naming the level."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import nlgraph as nl
from nlgraph.compiler import compile, split_system
from nlgraph.optim import System, compile_optimizer, compile_system

torch.set_num_threads(1)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "declare_a_learner.py"
F64 = torch.float64


def _example():
    spec = importlib.util.spec_from_file_location("declare_a_learner", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def declared(d: int = 8) -> nl.Graph:
    """The example's learner (delta memory, per-token rate, momentum on the slow weights)."""
    return _example().build(d)


def with_block(d: int = 6) -> nl.Graph:
    """A memory read through a CMS block; two params levels select by name: the projections
    follow a momentum, the block's meta-learned initial parameters take plain gd."""
    g = nl.Graph("memory_block_two_optimizers")
    x = g.input("x", dim=d)
    k, v, q = (
        g.level(n, state=nl.linear(d, d), frequency=nl.per_step(), objective=nl.outer())(x)
        for n in ("W_k", "W_v", "W_q")
    )
    mem = g.level("M", state=nl.linear(d, d), frequency=nl.per_token(), chunk=4,
                  context=nl.kv(key=k.normalize(), value=v), objective=nl.l2(),
                  optimizer=nl.gd(lr=0.5))  # fmt: skip
    block = g.level("B", state=nl.mlp(d, d, width=8, residual=True),
                    frequency=nl.every(3, "token"), chunk=3, objective=nl.outer(),
                    optimizer=nl.gd(lr=0.05), init=nl.meta())  # fmt: skip
    g.output("y", block(mem(q.normalize(), at="new")))
    w = g.level("w", state=nl.params(select="W_*"), frequency=nl.per_step(),
                objective=nl.outer(), optimizer=nl.follow(nl.state("m", at="new")))  # fmt: skip
    g.level("m", state=nl.like("w"), frequency=nl.per_step(), context=-w.grad(),
            objective=nl.dot(), optimizer=nl.gd(lr=0.02, retain=0.8))  # fmt: skip
    g.level("wb", state=nl.params(select="B"), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.gd(lr=0.03))  # fmt: skip
    return g


def _task(d: int, seed: int = 1, B: int = 3, T: int = 7):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, d, generator=gen, dtype=F64)
    target = x @ (torch.randn(d, d, generator=gen, dtype=F64) / d**0.5).T

    def loss_fn(outputs, start, end):
        return (outputs["y"] - target[:, start:end]).pow(2).sum()

    return {"x": x}, loss_fn


def _groups(graph: nl.Graph, learner) -> list[dict]:
    """By hand: the learner's parameters of each params level, by module name."""
    if graph.spec.name == "memory_block_two_optimizers":
        named = dict(learner.named_parameters())
        w = [p for n, p in named.items() if n.startswith("top.slow.")]
        b = [p for n, p in named.items() if n.startswith("top.blocks.")]
        assert w and b and len(w) + len(b) == len(named)
        return [{"params": w, "level": "w"}, {"params": b, "level": "wb"}]
    return [{"params": list(learner.parameters())}]


@pytest.mark.parametrize("build", [declared, with_block], ids=["momentum", "block_two_groups"])
def test_a_system_equals_its_learner_and_optimizer_compiled_apart(build):
    g = build()
    inputs, loss_fn = _task(g.spec.inputs[0].dim)
    torch.manual_seed(0)
    system = compile_system(g, dtype=F64)
    split = split_system(g.spec)
    torch.manual_seed(0)
    learner = compile(split.learner, dtype=F64)
    opt = compile_optimizer(split.optimizer)(_groups(g, learner))
    losses = []
    for _ in range(4):
        out = system.step(inputs, loss_fn)
        opt.zero_grad()
        outputs, _ = learner(inputs, loss_fn=loss_fn)
        outputs["loss"].backward()
        opt.step()
        torch.testing.assert_close(out.loss, outputs["loss"].detach(), rtol=1e-13, atol=0)
        losses.append(float(out.loss))
    for (n, a), b in zip(system.learner.named_parameters(), learner.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15, msg=n)
    sa, sb = system.optimizer.state_dict()["state"], opt.state_dict()["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:
        for key in sa[i]:
            torch.testing.assert_close(sa[i][key], sb[i][key], rtol=1e-13, atol=1e-15)
    assert losses[-1] < losses[0]
    assert int(system.learner.clock) == 4


def test_the_examples_momentum_is_the_update_it_declares():
    """m <- 0.9 m - 0.01 g; w <- w + m (Eqs. 10-13), written out in torch."""
    g = declared()
    inputs, loss_fn = _task(8)
    torch.manual_seed(0)
    system = compile_system(g, dtype=F64)
    torch.manual_seed(0)
    learner = compile(split_system(g.spec).learner, dtype=F64)
    params = list(learner.parameters())
    momenta = [torch.zeros_like(p) for p in params]
    for _ in range(3):
        system.step(inputs, loss_fn)
        learner.zero_grad()
        learner(inputs, loss_fn=loss_fn)[0]["loss"].backward()
        with torch.no_grad():
            for p, m in zip(params, momenta, strict=True):
                m.mul_(0.9).add_(p.grad, alpha=-0.01)
                p.add_(m)
    for a, b in zip(system.learner.parameters(), params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("build", [declared, with_block], ids=["momentum", "block_two_groups"])
def test_a_system_resumes_exactly_from_its_state_dict(build):
    g = build()
    inputs, loss_fn = _task(g.spec.inputs[0].dim)
    torch.manual_seed(0)
    a = compile_system(g, dtype=F64)
    for _ in range(2):
        a.step(inputs, loss_fn)
    saved = copy.deepcopy(a.state_dict())
    torch.manual_seed(5)  # other initial weights: all must come from the state_dict
    b = compile_system(g, dtype=F64)
    b.load_state_dict(saved)
    for _ in range(3):
        la, lb = a.step(inputs, loss_fn).loss, b.step(inputs, loss_fn).loss
        assert torch.equal(la, lb)
    for x, y in zip(a.learner.parameters(), b.learner.parameters(), strict=True):
        assert torch.equal(x, y)
    assert int(b.learner.clock) == 5


def test_a_state_dict_of_another_graph_is_refused():
    a = compile_system(declared())
    other = declared().spec.model_copy(update={"name": "other"})
    b = compile_system(other)
    with pytest.raises(nl.CompileError, match="saved from graph 'delta_memory_with_momentum'"):
        b.load_state_dict(a.state_dict())
    with pytest.raises(nl.CompileError, match="not a System state_dict"):
        b.load_state_dict(a.learner.state_dict())


def test_the_parts_and_the_groups():
    system = compile_system(with_block())
    assert isinstance(system, System)
    split = system.split
    assert [lv.name for lv in split.learner.levels] == ["W_k", "W_v", "W_q", "M", "B"]
    assert [lv.name for lv in split.optimizer.levels] == ["w", "m", "wb"]
    assert split.weights == ("w", "wb")
    assert [g["level"] for g in system.optimizer.param_groups] == ["w", "wb"]
    assert [len(g["params"]) for g in system.optimizer.param_groups] == [3, 4]
    assert "w: " in repr(system)


def _graph_with(edit) -> nl.Graph:
    g = nl.Graph("sys")
    x = g.input("x", dim=4)
    k = g.level("W_k", state=nl.linear(4, 4), frequency=nl.per_step(), objective=nl.outer())
    g.output("y", k(x))
    edit(g, x, k)
    return g


def _momentum(g, select=None, lr=0.1):
    w = g.level("w", state=nl.params(select=select), frequency=nl.per_step(),
                objective=nl.outer(), optimizer=nl.follow(nl.state("m", at="new")))  # fmt: skip
    g.level("m", state=nl.like("w"), frequency=nl.per_step(), context=-w.grad(),
            objective=nl.dot(), optimizer=nl.gd(lr=lr, retain=0.9))  # fmt: skip
    return w


REFUSED = {
    "no_params_level": (lambda g, x, k: None, "has no params level"),
    "unselected": (
        lambda g, x, k: (
            g.level("W_v", state=nl.linear(4, 4), frequency=nl.per_step(), objective=nl.outer()),
            _momentum(g, select="W_k"),
        ),
        "parameter 'W_v.weight' .* is selected by no params level",
    ),
    "selected_twice": (
        lambda g, x, k: (
            _momentum(g),
            g.level(
                "w2",
                state=nl.params(select="W_*"),
                frequency=nl.per_step(),
                objective=nl.outer(),
                optimizer=nl.gd(lr=0.1),
            ),
        ),  # fmt: skip
        "'W_k.weight' .* is selected by params levels w, w2",
    ),
    "like_a_learner_level": (
        lambda g, x, k: (
            _momentum(g),
            g.level(
                "mk",
                state=nl.like("W_k"),
                frequency=nl.per_step(),
                context=-nl.grad_of("W_k"),
                objective=nl.dot(),
                optimizer=nl.gd(lr=0.1),
            ),
        ),  # fmt: skip
        "level 'mk': like\\('W_k'\\) follows learner level 'W_k'",
    ),
    "learner_reads_optimizer": (
        lambda g, x, k: (
            _momentum(g),
            g.level(
                "M",
                state=nl.linear(4, 4),
                frequency=nl.per_token(),
                context=nl.kv(key=x, value=x),
                objective=nl.l2(),
                optimizer=nl.gd(lr=nl.signal(nl.state("m", at="prev"), "sigmoid")),
            ),
        ),  # fmt: skip
        "learner level 'M' reads optimizer level 'm'",
    ),
    "output_reads_optimizer": (
        lambda g, x, k: (_momentum(g), g.output("z", nl.state("m", at="prev"))),
        "output 'z' reads optimizer level 'm'",
    ),
    "optimizer_reads_input": (
        lambda g, x, k: _momentum(g, lr=nl.signal(x, "sigmoid")),
        "optimizer level 'm' reads input 'x'",
    ),
    "optimizer_reads_learner": (
        lambda g, x, k: (_momentum(g, lr=nl.signal(k(x), "sigmoid")),),
        "optimizer level 'm' reads learner level 'W_k'",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_system_it_cannot_run_is_refused_naming_the_level(case):
    edit, message = REFUSED[case]
    g = _graph_with(edit).validate()  # each is a valid graph: the system cannot run it
    with pytest.raises(nl.CompileError, match=message) as err:
        compile_system(g)
    assert "\n" not in str(err.value)


def test_each_compiler_points_a_system_to_compile_system():
    g = declared()
    with pytest.raises(
        nl.CompileError, match="holds optimizer levels \\('w', 'm'\\).*compile_system"
    ):
        compile(g)
    with pytest.raises(
        nl.CompileError, match="it is a learner, not an optimizer graph.*compile_system"
    ):
        compile_optimizer(g)(torch.nn.Linear(2, 2).parameters())


def test_a_param_group_may_name_its_params_level():
    """An optimizer graph with two params levels and no shape bounds: each group says which."""
    g = nl.Graph("two")
    g.level("a", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.gd(lr=1.0))  # fmt: skip
    g.level("b", state=nl.params(), frequency=nl.per_step(), objective=nl.outer(),
            optimizer=nl.gd(lr=0.5))  # fmt: skip
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = compile_optimizer(g)([{"params": [p], "level": "a"}, {"params": [q], "level": "b"}])
    (p.sum() + q.sum()).backward()
    opt.step()
    assert p.tolist() == [0.0, 0.0] and q.tolist() == [0.5, 0.5]
    bad = compile_optimizer(g)([{"params": [p], "level": "c"}])
    p.grad = torch.ones(2)
    with pytest.raises(nl.CompileError, match="names params level 'c'.* a, b"):
        bad.step()


def test_the_example_trains_end_to_end(capsys):
    _example().train(steps=20)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("step")]
    first, last = (float(ln.split("loss")[1]) for ln in (lines[0], lines[-1]))
    assert last < 0.7 * first


def test_the_cli_compiles_and_draws_the_whole_system(tmp_path, capsys):
    from nlgraph.cli import main

    path = nl.save(declared(), tmp_path / "system.yaml")
    assert main(["compile", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4 parameter" in out and "with its optimizer levels: System(" in out
    assert main(["viz", str(path), "-o", str(tmp_path / "s.dot")]) == 0
    dot = (tmp_path / "s.dot").read_text()
    assert all(f"<B>{n}</B>" in dot for n in ("w", "m", "M"))


def test_a_traced_system_keeps_its_optimizer_hyperparameters():
    """nl.trace of a system builder: the optimizer part takes its ``lr``, which a param group
    (an LR schedule) then drives."""

    def fit(lr=0.05):
        g = nl.Graph("fit")
        x = g.input("x", dim=3)
        W = g.level("W", state=nl.linear(3, 3), frequency=nl.per_step(), objective=nl.outer())
        g.output("y", W(x))
        _momentum(g, lr=lr)
        return g

    traced = nl.trace(fit)
    split = split_system(traced.spec)
    assert [p.name for p in split.optimizer.hyperparameters.params] == ["lr"]
    system = compile_system(traced)
    assert system.optimizer.defaults["lr"] == 0.05
    inputs = {"x": torch.randn(2, 4, 3)}

    def loss_fn(outputs, start, end):
        return outputs["y"].square().sum()

    (weight,) = system.learner.parameters()
    before = weight.detach().clone()
    system.optimizer.param_groups[0]["lr"] = 0.0
    system.step(inputs, loss_fn)
    assert torch.equal(weight, before)
    system.optimizer.param_groups[0]["lr"] = 0.05
    system.step(inputs, loss_fn)
    assert not torch.equal(weight, before)
