"""make_plan as a list of named passes: their names and order, the check after each (a broken
pass is caught right after it, by name), NLGRAPH_DEBUG as an integer level, and the typed
lowering and role of each level."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest

import nlgraph as nl
from nlgraph._errors import CompileError, ReferenceLoopWarning
from nlgraph.compiler import _debug
from nlgraph.compiler.ir import Lowering, Role
from nlgraph.compiler.plan import LOWERINGS, PASSES, LevelPlan, Plan, make_plan, passes
from nlgraph.library import get
from nlgraph.validation import validate

NAMES = ["classify", "clusters", "token_loops", "order", "warn"]


def hope():
    return get("hope", d=8, heads=2, vocab=11, n_layers=1, chunk=4, chunk_mem=8, cms_chunks=(4, 8))


def plan_of(graph) -> Plan:
    validate(graph.spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReferenceLoopWarning)
        return make_plan(graph.spec, {})


def nesterov_memory():
    """One MLP memory under Nesterov momentum: no kernel covers it, a reference loop."""
    g = nl.Graph("nesterov")
    x = g.input("x", dim=4)
    mem = g.level("M", state=nl.mlp(4, 4, width=3), frequency=nl.per_token(),
                  context=nl.kv(key=x, value=x), objective=nl.l2(),
                  optimizer=nl.gd(lr=0.2, momentum=0.6, nesterov=True), init=nl.meta())  # fmt: skip
    g.output("y", mem(x))
    return g


def with_pass(monkeypatch, name, run):
    """Replace pass ``name``'s function by ``run(state, original)``."""
    patched = tuple(
        replace(p, run=lambda s, p=p: run(s, p.run)) if p.name == name else p for p in PASSES
    )
    monkeypatch.setattr(passes, "PASSES", patched)


def test_the_passes_are_named_in_order():
    assert [p.name for p in PASSES] == NAMES
    assert all(callable(p.run) and callable(p.check) for p in PASSES)


def test_levels_carry_typed_lowerings_and_roles():
    plan = plan_of(hope())
    kinds = {lp.lowering for lp in plan.levels.values()}
    assert {Lowering.PARAMETER, Lowering.BOUNDARY, Lowering.CLUSTER} <= kinds
    for lp in plan.levels.values():
        assert isinstance(lp.lowering, Lowering) and isinstance(lp.role, Role)
        assert lp.lowering in LOWERINGS and lp.lowering == lp.lowering.value  # plain strings
    m = plan_of(get("deltanet", d=8)).levels["M"]
    assert m.lowering == "linear_memory" and m.role == "fast" and str(m.lowering) == "linear_memory"
    assert tuple(low.value for low in Lowering) == LOWERINGS
    assert "  tier 1  M                  fast linear_memory  every token chunk=64 reads" in str(
        plan_of(get("deltanet", d=8))
    )


def test_debug_2_prints_each_pass_and_the_plan(capsys, monkeypatch):
    monkeypatch.setenv("NLGRAPH_DEBUG", "2")
    plan = plan_of(hope())
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("plan pass ")]
    assert [line.split()[2].rstrip(":") for line in lines] == NAMES
    assert "recurrent cluster" in lines[1] and "parameter" in lines[0]
    assert str(plan) in out and "forward order" in out


def test_debug_1_prints_the_passes_but_not_the_plan(capsys, monkeypatch):
    monkeypatch.setenv("NLGRAPH_DEBUG", "1")
    plan_of(get("deltanet", d=8))
    out, err = capsys.readouterr()
    assert err.count("plan pass ") == len(NAMES) and "forward order" not in out


@pytest.mark.parametrize("value", ["", "0"])
def test_debug_0_or_unset_prints_nothing(capsys, monkeypatch, value):
    monkeypatch.setenv("NLGRAPH_DEBUG", value)
    plan_of(get("deltanet", d=8))
    monkeypatch.delenv("NLGRAPH_DEBUG")
    plan_of(get("deltanet", d=8))
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("value", ["banana", "-1", "1.5", "two"])
def test_debug_level_rejects_what_is_not_a_level(monkeypatch, value):
    monkeypatch.setenv("NLGRAPH_DEBUG", value)
    with pytest.raises(CompileError, match=r"NLGRAPH_DEBUG=.*expected 0 .*1 .*2") as err:
        _debug.debug_level()
    assert repr(value) in str(err.value)
    with pytest.raises(CompileError, match="NLGRAPH_DEBUG=") as err:
        plan_of(get("deltanet", d=8))
    assert repr(value) in str(err.value)


@pytest.mark.parametrize(("value", "level"), [("", 0), (" ", 0), ("0", 0), ("2", 2), (" 1 ", 1)])
def test_debug_level_reads_an_integer(monkeypatch, value, level):
    monkeypatch.setenv("NLGRAPH_DEBUG", value)
    assert _debug.debug_level() == level


def test_a_pass_that_drops_a_level_is_caught_after_it(monkeypatch):
    def drop(state, run):
        state = run(state)
        levels = dict(state.levels)
        levels.pop("W_k")
        return replace(state, levels=levels)

    with_pass(monkeypatch, "classify", drop)
    with pytest.raises(CompileError, match="plan invariant after pass 'classify': planned"):
        plan_of(get("deltanet", d=8))


def test_a_pass_that_mislabels_a_lowering_is_caught_after_it(monkeypatch):
    def mislabel(state, run):  # a cluster member relabelled as a deep memory
        state = run(state)
        n = state.clusters[0][0]
        levels = {**state.levels, n: replace(state.levels[n], lowering=Lowering.DEEP_MEMORY)}
        return replace(state, levels=levels)

    with_pass(monkeypatch, "clusters", mislabel)
    with pytest.raises(CompileError, match="after pass 'clusters': cluster member .* deep_memory"):
        plan_of(hope())


def test_a_plain_string_lowering_or_a_wrong_role_is_caught(monkeypatch):
    def as_string(state, run):
        state = run(state)
        levels = {**state.levels, "M": replace(state.levels["M"], lowering="linear_memory")}
        return replace(state, levels=levels)

    with_pass(monkeypatch, "classify", as_string)
    with pytest.raises(CompileError, match="after pass 'classify': level 'M' has lowering"):
        plan_of(get("deltanet", d=8))

    def slow_memory(state, run):  # a later pass that breaks what classify established
        state = run(state)
        levels = {**state.levels, "M": replace(state.levels["M"], role=Role.SLOW)}
        return replace(state, levels=levels)

    with_pass(monkeypatch, "token_loops", slow_memory)
    with pytest.raises(CompileError, match="after pass 'token_loops': level 'M' is slow"):
        plan_of(get("deltanet", d=8))


def test_a_wrong_forward_order_is_caught_after_order(monkeypatch):
    def reverse(state, run):
        state = run(state)
        return replace(state, order=state.order[::-1])

    with_pass(monkeypatch, "order", reverse)
    with pytest.raises(CompileError, match="after pass 'order': 'M' runs before"):
        plan_of(get("deltanet", d=8))

    def drop(state, run):
        state = run(state)
        return replace(state, order=state.order[1:])

    with_pass(monkeypatch, "order", drop)
    with pytest.raises(CompileError, match="after pass 'order': the forward order must list"):
        plan_of(get("deltanet", d=8))


def test_a_silent_reference_loop_is_caught_after_warn(monkeypatch):
    with pytest.warns(ReferenceLoopWarning, match="level 'M' has no fast lowering"):
        plan = make_plan(nesterov_memory().spec, {})
    assert plan.levels["M"].lowering == Lowering.REFERENCE_LOOP
    with_pass(monkeypatch, "warn", lambda state, run: state)
    with pytest.raises(CompileError, match="after pass 'warn': level 'M' runs as a reference_loop"):
        make_plan(nesterov_memory().spec, {})


def test_plan_check_still_checks_a_finished_plan():
    plan = plan_of(get("deltanet", d=8))
    plan.check()
    plan.levels["M"] = LevelPlan("M", Role.FAST, Lowering.LINEAR_MEMORY, 0, "every token", ())
    with pytest.raises(CompileError, match="plan invariant: level 'M' has chunk 0"):
        plan.check()
    plan.levels.pop("M")
    with pytest.raises(CompileError, match="plan invariant: planned"):
        plan.check()


@pytest.mark.parametrize("rule", ["gd", "dgd"])
def test_the_printed_plan_describes_a_cluster_member_by_its_rule(rule):
    """A self-referential memory under plain GD is printed as GD, not as DGD (Eq. 88)."""
    import nlgraph as nl
    from nlgraph.compiler import compile

    g = nl.Graph("selfref")
    x = g.input("x", dim=4)
    opt = nl.gd(lr=0.1) if rule == "gd" else nl.dgd(lr=0.1, exact=True)
    m = g.level("M", state=nl.mlp(4, 4, width=4), frequency=nl.per_token(),
                context=nl.kv(key=x, value=nl.read("M", x)), objective=nl.l2(),
                optimizer=opt, init=nl.meta())  # fmt: skip
    g.output("y", m(x))
    detail = compile(g).plan.levels["M"].detail
    if rule == "gd":
        assert "W <- a W - lr delta x^T" in detail and "DGD" not in detail and "x x^T" not in detail
    else:
        assert "(a I - lr' x x^T)" in detail and "DGD, Eq. 88" in detail
