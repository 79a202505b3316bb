"""The spec layer: builder, ordering (PAPER.md 1.2), composition, round trips, torch-freedom."""

from __future__ import annotations

import subprocess
import sys

import pytest
from specs import small_memory

import nlgraph as nl
from nlgraph.topology import edges, to_networkx


def test_import_does_not_pull_torch():
    code = (
        "import sys, nlgraph as nl, nlgraph.library as L, nlgraph.cli\n"
        "for n in L.names():\n"
        "    g = L.get(n); g.validate(); nl.from_yaml(g.to_yaml()); nl.from_json(g.to_json())\n"
        "assert 'torch' not in sys.modules, 'torch imported by the spec layer'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_momentum_is_faster_than_weights():
    g = small_memory()
    tiers = g.tiers()
    pos = {n: i for i, t in enumerate(tiers) for n in t}
    assert pos["M"] < pos["m"] < pos["w"]  # per token, then momentum (same step, read new) ≻ w
    assert pos["W_k"] == pos["W_v"] == pos["W_b"]  # independent, same frequency: one tier
    assert g.is_faster("m", "w") and not g.is_faster("w", "m")


def test_adam_moments_share_a_tier():
    from nlgraph.library import get

    assert get("adam").tiers() == [["m", "v"], ["w"]]


def test_ordering_by_frequency_then_dependency():
    g = nl.Graph("clock", chunk=4)
    g.input("x", dim=2)
    kw = dict(state=nl.tensor(2), objective=nl.l2_to(nl.read("x0", nl.state("x0", at="new"))))
    del kw["objective"]
    for name, freq in [
        ("slow", nl.per_step()),
        ("seq", nl.per_sequence()),
        ("c2", nl.per_chunk(2)),  # 8 tokens
        ("t4", nl.every(4, "token")),
        ("t1", nl.per_token()),
        ("frozen", nl.frozen()),
    ]:
        g.level(name, frequency=freq, **kw)
    assert g.tiers() == [["t1"], ["t4"], ["c2"], ["seq"], ["slow"], ["frozen"]]


def test_edges_have_kinds():
    spec = small_memory().spec
    kinds = {(e.src, e.dst, e.kind) for e in edges(spec)}
    assert ("W_k", "M", "context") in kinds
    assert ("W_b", "M", "generates") in kinds
    assert ("m", "w", "optimizer") in kinds
    assert ("w", "m", "gradient") in kinds
    assert ("w", "m", "shape") in kinds
    g = to_networkx(spec)
    assert g.nodes["x"]["type"] == "input" and g.nodes["M"]["type"] == "level"


def test_include_prefixes_and_binds():
    from nlgraph.library import get

    outer = nl.Graph("two_layers")
    x = outer.input("x", dim=8)
    out1 = outer.include(get("linear_attention", d=8), "l1", bind={"x": x})
    out2 = outer.include(get("linear_attention", d=8), "l2", bind={"x": out1["y"]})
    outer.output("y", out2["y"])
    outer.validate()
    assert "l1.M" in outer.levels and "l2.W_k" in outer.levels
    assert outer.inputs == ["x"]
    ctx = outer.get("l2.M").context
    assert ctx.key.level == "l2.W_k" and ctx.key.arg.level == "l1.M"
    with pytest.raises(nl.SpecError, match="exists"):
        outer.include(get("linear_attention", d=8), "l1", bind={"x": x})


def test_round_trips_are_identities():
    g = small_memory()
    assert nl.from_json(g.to_json()) == g
    assert nl.from_yaml(g.to_yaml()) == g
    assert nl.from_dict(nl.to_dict(g)).spec == g.spec


def test_flow_algebra_prints_like_the_paper():
    m, v = nl.state("m", at="new"), nl.state("v", at="new")
    e = -0.1 * nl.debias(m, 0.9) / (nl.debias(v, 0.999).sqrt() + 1e-8)
    assert str(e) == "(-0.1 * debias(m, 0.9)) / (sqrt(debias(v, 0.999)) + 1e-08)"
    assert str(nl.grad_of("w") ** 2) == "∇w²"
    with pytest.raises(TypeError, match="expected a flow"):
        nl.state("m", at="new") + "text"


def test_frequency_ticks():
    f = nl.every(4, "token", offset=1)
    assert [t for t in range(1, 14) if f.updates_at(t)] == [1, 5, 9, 13]
    assert [t for t in range(1, 10) if nl.every(4).updates_at(t)] == [4, 8]
    assert not any(nl.frozen().updates_at(t) for t in range(1, 10))


def test_default_reset_rule():
    g = small_memory()
    assert g.get("M").effective_reset().kind == "sequence"
    assert g.get("w").effective_reset().kind == "never"


def test_unknown_library_name_suggests():
    from nlgraph.library import get

    with pytest.raises(nl.SpecError, match="did you mean 'adam'"):
        get("adma")
    with pytest.raises(nl.SpecError, match="bad arguments"):
        get("adam", nope=1)


def test_named_flows_keep_deep_stacks_linear():
    """g.let names a flow once; including a block 30 times stays small and round-trips."""
    from nlgraph.library import get

    g = nl.Graph("stack")
    h = g.input("x", dim=4)
    for i in range(30):
        y = g.include(get("linear_attention", d=4), f"l{i}", bind={"x": h})["y"]
        h = g.let(f"h{i}", h + y)  # residual: h is read twice, stored once
    g.output("y", h)
    g.validate()
    assert len(g.to_json()) < 200_000
    assert nl.from_json(g.to_json()) == g
    tiers = g.tiers()
    # each memory reads the previous one's new output: one tier per memory (Def. 2)
    assert tiers[0] == ["l0.M"] and tiers[29] == ["l29.M"]
    from nlgraph.topology import edges

    assert ("l0.M", "l1.M", "context") in {(e.src, e.dst, e.kind) for e in edges(g.spec)}


def test_include_renames_named_flows_and_keeps_chunk():
    sub = nl.Graph("sub", chunk=8)
    x = sub.input("x", dim=2)
    w = sub.level("W", state=nl.linear(2, 2), frequency=nl.per_step(), objective=nl.outer())
    sub.output("y", sub.let("z", w(x)))
    kv = nl.kv(key=x, value=x)
    sub.level("M", state=nl.linear(2, 2), frequency=nl.per_token(), context=kv,
              objective=nl.l2(), optimizer=nl.gd(lr=0.1))  # fmt: skip
    g = nl.Graph("top")
    out = g.include(sub, "s", bind={"x": g.input("x", dim=2)})
    assert str(out["y"]) == "$s.z" and "s.z" in g.spec.flows
    assert g.get("s.M").chunk == 8
    g.validate()
