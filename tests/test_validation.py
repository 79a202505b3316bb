"""Every invalid spec raises a SpecError naming the culprit — through the API and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
from specs import levels_at, small_memory

import nlgraph as nl
from nlgraph.cli import main


def base() -> dict:
    return nl.to_dict(small_memory())


def lv(d: dict, name: str) -> dict:
    return levels_at(d, name)


def _set(path_fn, value):
    def mutate(d):
        obj, key = path_fn(d)
        obj[key] = value

    return mutate


def _add_level(level: dict):
    return lambda d: d["levels"].append(level)


_LIN = {"kind": "linear", "d_in": 4, "d_out": 4}
_TOK = {"unit": "token"}
_STEP = {"unit": "step"}

# (id, mutation of the valid base dict, text the message must contain)
BAD: list[tuple[str, object, str]] = [
    ("unknown-level-ref", lambda d: lv(d, "M")["context"]["key"]["x"].update(level="W_kk"), "W_kk"),
    ("unknown-input-ref", lambda d: lv(d, "M")["context"]["value"]["arg"].update(name="xx"), "xx"),
    (
        "duplicate-level",
        lambda d: d["levels"].append(copy.deepcopy(lv(d, "M"))),
        "duplicate name 'M'",
    ),
    ("duplicate-input-level", _add_level({"name": "x", "state": _LIN, "frequency": _STEP}), "'x'"),
    ("unknown-level-field", lambda d: lv(d, "M").update(frequncy=_TOK), "did you mean 'frequency'"),
    ("unknown-optimizer-field", lambda d: lv(d, "m")["optimizer"][0].update(lrr=1), "lrr"),
    ("unknown-top-field", lambda d: d.update(levelz=[]), "levelz"),
    ("unknown-state-kind", lambda d: lv(d, "M")["state"].update(kind="lineer"), "lineer"),
    ("unknown-unit", lambda d: lv(d, "M")["frequency"].update(unit="tokens"), "tokens"),
    ("zero-period", lambda d: lv(d, "M")["frequency"].update(every=0), "'M'"),
    ("negative-period", lambda d: lv(d, "m")["frequency"].update(every=-3), "'m'"),
    (
        "offset-not-below-period",
        lambda d: lv(d, "M")["frequency"].update(every=2, offset=2),
        "offset",
    ),
    ("zero-chunk-graph", lambda d: d.update(chunk=0), "chunk"),
    ("zero-chunk-level", lambda d: lv(d, "M").update(chunk=0), "'M'"),
    ("negative-lr", lambda d: lv(d, "m")["optimizer"][0].update(lr=-0.1), "negative"),
    ("retain-above-one", lambda d: lv(d, "m")["optimizer"][0].update(retain=1.5), "outside [0, 1]"),
    ("retain-negative", lambda d: lv(d, "M")["optimizer"][0].update(retain=-0.1), "outside [0, 1]"),
    (
        "decay-signal-unsquashed",
        lambda d: lv(d, "M")["optimizer"][0].update(
            retain={"kind": "signal", "flow": {"op": "input", "name": "x"}, "act": "softplus"}
        ),
        "can leave [0, 1]",
    ),
    (
        "lr-signal-can-be-negative",
        lambda d: lv(d, "M")["optimizer"][0]["lr"].update(act="identity"),
        "can be negative",
    ),
    (
        "learned-out-of-range",
        lambda d: lv(d, "m")["optimizer"][0].update(retain={"kind": "learned", "init": 2.0}),
        "outside",
    ),
    (
        "same-tick-cycle",
        lambda d: lv(d, "m").update(context={"op": "state", "level": "w", "at": "new"}),
        "cycle",
    ),
    (
        "nested-optimizer-slower",
        lambda d: lv(d, "m")["frequency"].update(every=4),
        "nested optimizer level must be at least as fast",
    ),
    (
        "width-mismatch-key",
        lambda d: lv(d, "W_k")["state"].update(d_out=3),
        "key width 3",
    ),
    ("read-width-mismatch", lambda d: d["inputs"][0].update(dim=5), "width"),
    (
        "residual-mlp-not-square",
        lambda d: lv(d, "M").update(
            state={"kind": "mlp", "d_in": 4, "d_out": 3, "width": 8, "residual": True}
        ),
        "residual",
    ),
    ("objective-without-value", lambda d: lv(d, "M")["context"].pop("value"), "'M'"),
    ("objective-without-context", lambda d: lv(d, "M").pop("context"), "needs a context"),
    ("l2-to-missing-target", lambda d: lv(d, "m").update(objective={"kind": "l2_to"}), "target"),
    (
        "ema-without-target",
        lambda d: lv(d, "m").update(optimizer=[{"rule": "ema", "beta": 0.9}]),
        "ema needs",
    ),
    (
        "objective-without-optimizer",
        lambda d: lv(d, "m").update(optimizer=[]),
        "no optimizer",
    ),
    (
        "optimizer-without-objective",
        lambda d: lv(d, "m").pop("objective"),
        "no objective",
    ),
    (
        "bad-custom-objective-path",
        lambda d: lv(d, "m").update(objective={"kind": "custom", "path": "no colon here"}),
        "custom objective path",
    ),
    (
        "bad-module-path",
        lambda d: lv(d, "W_k").update(state={"kind": "module", "path": "torch.nn.Linear"}),
        "module path",
    ),
    (
        "meta-from-faster",
        lambda d: lv(d, "m").update(init={"kind": "meta", "level": "M"}),
        "slower",
    ),
    ("meta-unknown", lambda d: lv(d, "M").update(init={"kind": "meta", "level": "nope"}), "nope"),
    (
        "reset-with-faster",
        lambda d: lv(d, "m").update(reset={"kind": "with", "level": "M"}),
        "slower enclosing",
    ),
    (
        "reset-every-zero",
        lambda d: lv(d, "M").update(reset={"kind": "every", "n": 0, "unit": "token"}),
        "'M'",
    ),
    ("reset-every-missing-n", lambda d: lv(d, "M").update(reset={"kind": "every"}), "needs n"),
    ("like-unknown", lambda d: lv(d, "m").update(state={"kind": "like", "level": "ww"}), "ww"),
    ("like-self", lambda d: lv(d, "m").update(state={"kind": "like", "level": "m"}), "itself"),
    ("heads-indivisible", lambda d: lv(d, "M").update(heads=3), "divisible"),
    ("heads-zero", lambda d: lv(d, "M").update(heads=0), "'M'"),
    ("bad-level-name", lambda d: lv(d, "M").update(name="1M"), "invalid name"),
    ("no-levels", lambda d: d.update(levels=[]), "no levels"),
    (
        "diff-on-missing-edge",
        lambda d: d.update(diff=[{"src": "m", "dst": "M", "mode": {"mode": "stop_grad"}}]),
        "no such edge",
    ),
    (
        "truncated-zero",
        lambda d: d.update(
            diff=[{"src": "W_k", "dst": "M", "mode": {"mode": "truncated", "k": 0}}]
        ),
        "diff",
    ),
    ("lp-below-one", lambda d: lv(d, "M").update(objective={"kind": "lp", "p": 0.5}), "'M'"),
    (
        "chunk-unit-without-size",
        lambda d: (d.update(chunk=1), lv(d, "M").update(frequency={"unit": "chunk"})),
        "no chunk size",
    ),
    (
        "grad-of-objectiveless",
        lambda d: (
            lv(d, "W_k").pop("objective"),
            lv(d, "m").update(context={"op": "grad", "wrt": "w", "objective": "W_k"}),
        ),
        "has no objective",
    ),
    ("output-unknown", lambda d: d["outputs"].update(z={"op": "state", "level": "Q"}), "'Q'"),
    (
        "dgd-on-tensor",
        lambda d: lv(d, "m").update(optimizer=[{"rule": "dgd", "lr": 0.1}]),
        "DGD needs keys",
    ),
    ("newer-schema", lambda d: d.update(schema_version=99), "newer"),
    ("missing-schema", lambda d: d.pop("schema_version"), "schema_version"),
    ("missing-name", lambda d: d.pop("name"), "name"),
    (
        "unknown-named-flow",
        lambda d: d["outputs"].update(z={"op": "ref", "name": "hh"}),
        "unknown named flow 'hh'",
    ),
    (
        "named-flow-cycle",
        lambda d: d.update(
            flows={"a1": {"op": "ref", "name": "a2"}, "a2": {"op": "ref", "name": "a1"}}
        ),
        "cycle",
    ),
    (
        "read-a-tensor",
        lambda d: lv(d, "M")["context"]["key"]["x"].update(level="m"),
        "not a memory",
    ),
]


def test_base_is_valid():
    nl.from_dict(base()).validate()


def test_at_least_thirty_distinct_bad_specs():
    assert len({case[0] for case in BAD}) == len(BAD) >= 30


@pytest.mark.parametrize("mutate,needle", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_spec_raises_spec_error(mutate, needle):
    data = base()
    mutate(data)
    with pytest.raises(nl.SpecError) as info:
        nl.from_dict(data).validate()
    assert needle in str(info.value)


@pytest.mark.parametrize("mutate,needle", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_cli_validate_exits_2_with_message(mutate, needle, tmp_path, capsys):
    data = base()
    mutate(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err
    assert err.count("\n") == 1  # one line


def test_builder_errors_name_the_level():
    g = nl.Graph("g")
    with pytest.raises(nl.SpecError, match="level 'M'.*frequency"):
        g.level("M", state=nl.linear(2, 2), frequency={"every": 0, "unit": "token"})
    with pytest.raises(nl.SpecError, match="level 'M'.*unknown field 'frequncy'"):
        g.level("M", state=nl.linear(2, 2), frequncy=nl.per_token())
    g.level("a", state=nl.linear(2, 2), frequency=nl.per_step(), objective=nl.outer())
    with pytest.raises(nl.SpecError, match="duplicate name 'a'"):
        g.level("a", state=nl.linear(2, 2), frequency=nl.per_step())


def test_all_problems_are_listed():
    data = base()
    lv(data, "m")["optimizer"][0]["lr"] = -1.0
    lv(data, "M")["optimizer"][0]["retain"] = 2.0
    with pytest.raises(nl.SpecError) as info:
        nl.from_dict(data).validate()
    msg = str(info.value)
    assert "2 problems" in msg and "'m'" in msg and "'M'" in msg


def test_import_paths_resolve_only_on_request():
    from nlgraph.library import resolve

    g = nl.Graph("p")
    g.level(
        "n", state=nl.module("no_such_pkg.mod:Thing"), frequency=nl.per_step(), objective=nl.outer()
    )
    g.validate()  # the spec layer never imports user code
    with pytest.raises(nl.SpecError, match="no_such_pkg.mod:Thing"):
        resolve("no_such_pkg.mod:Thing")
    with pytest.raises(nl.SpecError, match="has no attribute 'Nope'"):
        resolve("json:Nope")
    assert resolve("json:dumps") is json.dumps
