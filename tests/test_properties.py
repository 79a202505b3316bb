"""Random graphs and random corruptions: accepted, or rejected with a SpecError — never a crash."""

from __future__ import annotations

import copy
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from specs import small_memory

import nlgraph as nl

NAMES = ["a", "b", "c", "d", "x"]
_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 70),
    st.floats(-2, 2, allow_nan=False),
    st.sampled_from(NAMES + ["token", "step", "linear", "gd", "l2", "zeros", "meta", "??"]),
    st.lists(st.integers(0, 3), max_size=2),
    st.builds(dict),
)


def _flow(draw) -> dict:
    kind = draw(st.sampled_from(["input", "state", "read", "grad", "unary", "kv", "const"]))
    name = draw(st.sampled_from(NAMES))
    if kind == "input":
        return {"op": "input", "name": name}
    if kind == "state":
        return {"op": "state", "level": name, "at": draw(st.sampled_from(["prev", "new"]))}
    if kind == "read":
        return {"op": "read", "level": name, "arg": {"op": "input", "name": "x"}}
    if kind == "grad":
        return {"op": "grad", "wrt": name}
    if kind == "unary":
        return {"op": "unary", "fn": draw(st.sampled_from(["square", "normalize", "silu"])),
                "x": {"op": "state", "level": name}}  # fmt: skip
    if kind == "const":
        return {"op": "const", "value": draw(st.floats(-1, 1))}
    return {
        "op": "kv",
        "key": {"op": "input", "name": "x"},
        "value": {"op": "state", "level": name},
    }


@st.composite
def graphs(draw) -> dict:
    n = draw(st.integers(1, 4))
    levels = []
    for i in range(n):
        state = draw(
            st.sampled_from(
                [
                    {"kind": "params"},
                    {"kind": "linear", "d_in": 4, "d_out": draw(st.sampled_from([4, 2]))},
                    {
                        "kind": "mlp",
                        "d_in": 4,
                        "d_out": 4,
                        "width": 3,
                        "residual": draw(st.booleans()),
                    },
                    {"kind": "like", "level": draw(st.sampled_from(NAMES))},
                    {"kind": "tensor", "shape": [draw(st.integers(0, 3))]},
                ]
            )
        )
        level = {
            "name": NAMES[i],
            "state": state,
            "frequency": {
                "every": draw(st.integers(-1, 8)),
                "unit": draw(st.sampled_from(["token", "chunk", "sequence", "step", "never"])),
            },
        }
        if draw(st.booleans()):
            level["context"] = _flow(draw)
        obj = draw(st.sampled_from([None, "dot", "l2", "outer", "l2_to"]))
        if obj == "l2_to":
            level["objective"] = {"kind": "l2_to", "target": _flow(draw)}
        elif obj:
            level["objective"] = {"kind": obj}
        rule = draw(st.sampled_from([None, "gd", "dgd", "ema", "follow"]))
        if rule in ("gd", "dgd"):
            retain = draw(st.one_of(st.none(), st.floats(-0.5, 1.5)))
            level["optimizer"] = [{"rule": rule, "lr": draw(st.floats(-0.5, 2)), "retain": retain}]
        elif rule == "ema":
            level["optimizer"] = [{"rule": "ema", "beta": draw(st.floats(-0.5, 1.5))}]
        elif rule == "follow":
            level["optimizer"] = [{"rule": "follow", "update": _flow(draw)}]
        if draw(st.booleans()):
            level["init"] = {"kind": "meta", "level": draw(st.sampled_from(NAMES))}
        levels.append(level)
    return {
        "schema_version": 1,
        "name": "random",
        "chunk": draw(st.integers(0, 4)),
        "inputs": [{"name": "x", "dim": 4}],
        "levels": levels,
    }


def _accept_or_spec_error(data) -> None:
    try:
        g = nl.from_dict(data)
        g.validate()
    except nl.SpecError:
        return
    # accepted: it must round-trip
    assert nl.from_json(g.to_json()) == g
    assert nl.from_yaml(g.to_yaml()) == g
    g.tiers()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_random_graphs_are_accepted_or_rejected_cleanly(data):
    _accept_or_spec_error(data)


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


BASE = nl.to_dict(small_memory())
PATHS = list(_paths(BASE))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PATHS), _values), min_size=1, max_size=3))
def test_mutating_fields_never_crashes(mutations):
    data = copy.deepcopy(BASE)
    for path, value in mutations:
        node = data
        try:
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue
    _accept_or_spec_error(json.loads(json.dumps(data)))
