"""The library's definitions: every one builds, validates, round-trips, and orders its levels as
the paper says (PAPER.md 1.2, Def. 2); the whole library stays torch-free."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import nlgraph as nl
import nlgraph.library as L

NAMES = L.names()

# Non-default options worth building too: each changes the spec's structure.
VARIANTS = [
    ("muon", {"variant": "cubic", "nesterov": True}),
    ("m3", {"momenta": "ema", "variant": "cubic"}),
    ("delta_momentum", {"normalize": True}),
    ("gated_linear_attention", {"decay": 0.9}),
    ("self_modifying_titans", {"adaptive_q": True, "momentum": 0.0}),
    ("self_modifying_titans", {"conv_window": 0, "output_gate": False, "heads": 4}),
    ("cms", {"variant": "nested"}),
    ("cms", {"variant": "independent", "lrs": (1e-2, 1e-3, 1e-4)}),
    ("hope", {"cms_variant": "nested", "adaptive_q": True}),
    ("hope", {"n_layers": 3, "cms_chunks": (4, 16, 64)}),
]


def tier_of(g: nl.Graph) -> dict[str, int]:
    return {n: i for i, tier in enumerate(g.tiers()) for n in tier}


def round_trips(g: nl.Graph) -> None:
    assert nl.from_json(g.to_json()) == g
    assert nl.from_yaml(g.to_yaml()) == g


@pytest.mark.parametrize("name", NAMES)
def test_builds_validates_and_round_trips(name: str) -> None:
    g = L.get(name)
    assert isinstance(g, nl.Graph) and g.name == name
    g.validate()
    round_trips(g)


@pytest.mark.parametrize("name,kwargs", VARIANTS, ids=[f"{n}-{'-'.join(k)}" for n, k in VARIANTS])
def test_options_build_validate_and_round_trip(name: str, kwargs: dict) -> None:
    g = L.get(name, **kwargs).validate()
    round_trips(g)


@pytest.mark.parametrize("name", NAMES)
def test_summary_is_one_line_citing_the_paper(name: str) -> None:
    (entry,) = [e for e in L.entries() if e.name == name]
    assert entry.summary.endswith((".", ")")), entry.summary
    assert re.search(r"Eqs?\. \d|Algorithm \d|App\. [A-C]|PAPER\.md \d", entry.summary), (
        entry.summary
    )
    assert entry.kind in ("optimizer", "memory", "model", "block")


def test_library_imports_without_torch() -> None:
    code = (
        "import sys, nlgraph.library as L\n"
        "[L.get(n) for n in L.names()]\n"
        "assert 'torch' not in sys.modules, 'torch imported by the library'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ optimizers


@pytest.mark.parametrize(
    "name", ["momentum", "nesterov", "muon", "delta_momentum", "dmgd", "preconditioned_momentum"]
)
def test_momentum_precedes_the_weights(name: str) -> None:
    g = L.get(name)
    pos = tier_of(g)
    assert pos["m"] < pos["w"]
    assert not g.is_faster("w", "m")


@pytest.mark.parametrize("name", ["adam", "adamw", "adagrad_momentum"])
def test_two_moments_share_a_tier_before_the_weights(name: str) -> None:
    assert L.get(name).tiers() == [["m", "v"], ["w"]]


@pytest.mark.parametrize("name", ["adagrad", "rmsprop"])
def test_second_moment_precedes_the_weights(name: str) -> None:
    assert L.get(name).tiers() == [["v"], ["w"]]


def test_preconditioned_momentum_reads_the_preconditioner_first() -> None:
    assert L.get("preconditioned_momentum").tiers() == [["v"], ["m"], ["w"]]


@pytest.mark.parametrize("momenta", ["sum", "ema"])
def test_m3_slow_momentum_is_slower(momenta: str) -> None:
    g = L.get("m3", f=4, momenta=momenta)
    assert g.tiers() == [["M1", "V"], ["w"], ["M2"]]
    assert g.is_faster("M1", "M2")
    assert g.get("M2").frequency == nl.per_step(4)
    # W reads the slow momentum as it was before this step: the previous chunk's.
    refs = {(r.level, r.at) for r in _walk(g.get("w").optimizer[0].update) if r.op == "state"}
    assert ("M2", "prev") in refs and ("M1", "new") in refs and ("V", "new") in refs


def test_dgd_update_is_one_exact_dgd_level() -> None:
    (w,) = L.get("dgd_update").spec.levels
    assert w.optimizer[0].rule == "dgd" and w.optimizer[0].exact


def test_delta_momentum_needs_a_positive_decay_step() -> None:
    with pytest.raises(nl.SpecError, match="decay"):
        L.get("delta_momentum", decay=0.0)


# -------------------------------------------------------------------------------- memories


@pytest.mark.parametrize("name", L.names("memory"))
def test_memories_precede_their_projections(name: str) -> None:
    g = L.get(name)
    pos = tier_of(g)
    fast = [lv.name for lv in g.spec.levels if lv.frequency.unit == "token"]
    slow = [lv.name for lv in g.spec.levels if lv.frequency.unit == "step"]
    assert fast and slow
    assert max(pos[n] for n in fast) < min(pos[n] for n in slow)


@pytest.mark.parametrize("adaptive_q", [False, True])
def test_self_modifying_titans_memories_share_a_tier(adaptive_q: bool) -> None:
    g = L.get("self_modifying_titans", adaptive_q=adaptive_q, chunk=8, chunk_mem=32)
    mems = {"M_k", "M_v", "M_eta", "M_alpha", "M_mem"} | ({"M_q"} if adaptive_q else set())
    assert g.tiers()[0] == sorted(mems)
    assert ("W_q" in g.levels) is not adaptive_q
    spec = g.spec
    for n in mems:
        lv = spec.level(n)
        assert lv.init == nl.meta() and lv.objective == nl.l2()
        assert lv.optimizer[0].rule == "dgd" and lv.state.residual
        assert spec.chunk_of(lv) == (32 if n == "M_mem" else 8)
        # the value is self-generated from the previous state, l2-normalised: hat v = M(v)
        value = lv.context.value
        assert value.fn == "normalize" and value.x.level == n and value.x.at == "prev"
    assert g.meta["adaptive_q"] is adaptive_q and g.meta["eta_act"] == "softplus"


def test_self_modifying_titans_momentum_switch() -> None:
    on = L.get("self_modifying_titans").spec.level("M_k").optimizer[0]
    off = L.get("self_modifying_titans", momentum=0.0).spec.level("M_k").optimizer[0]
    assert on.momentum == 0.9 and off.momentum is None


def test_attention_is_non_parametric_and_exact() -> None:
    m = L.get("sliding_window_attention", window=32).spec.level("M")
    assert m.state == nl.nonparametric(window=32)
    assert m.objective.kind == "nadaraya_watson" and m.optimizer[0].rule == "exact"


# ---------------------------------------------------------------------------------- models


@pytest.mark.parametrize("variant", ["sequential", "nested", "independent"])
def test_cms_levels_ordered_by_chunk(variant: str) -> None:
    g = L.get("cms", chunks=(2, 8, 32, 128), variant=variant)
    pos = tier_of(g)
    assert [pos[f"mlp{i}"] for i in range(4)] == [0, 1, 2, 3]
    spec = g.spec
    for i, c in enumerate((2, 8, 32, 128)):
        lv = spec.level(f"mlp{i}")
        assert lv.frequency == nl.every(c, "token") and lv.objective == nl.outer()
    if variant == "nested":
        assert spec.level("mlp0").reset == nl.reset_with("mlp1")
        assert spec.level("mlp0").init == nl.meta("mlp1")
        assert spec.level("mlp3").init == nl.meta()


def test_cms_rejects_bad_arguments() -> None:
    with pytest.raises(nl.SpecError, match="increasing"):
        L.get("cms", chunks=(64, 16))
    with pytest.raises(nl.SpecError, match="variant"):
        L.get("cms", variant="parallel")
    with pytest.raises(nl.SpecError, match="learning rates"):
        L.get("cms", lrs=(1e-3, 1e-4))


def test_hope_tiers_follow_the_paper() -> None:
    g = L.get("hope", preset="tiny")
    assert g.meta["d"] == 64 and g.meta["n_layers"] == 2 and g.meta["heads"] == 2
    pos = tier_of(g)
    for b in ("block0", "block1"):
        mems = [n for n in g.levels if n.startswith(f"{b}.titans.M_")]
        assert len({pos[n] for n in mems}) == 1  # one tier per block's memories
        cms = [pos[f"{b}.cms.mlp{i}"] for i in range(len(g.meta["cms_chunks"]))]
        assert cms == sorted(cms) and len(set(cms)) == len(cms)  # ordered by chunk
        assert max(pos[n] for n in mems) < min(cms) < pos[f"{b}.W_o"]
    assert pos["embed"] == pos["lm_head"] == len(g.tiers()) - 1
    # include keeps each memory's own chunk size
    assert g.spec.chunk_of(g.spec.level("block0.titans.M_mem")) == g.meta["chunk_mem"]


def test_hope_block_wraps_titans_then_cms() -> None:
    g = L.get("hope_block")
    assert g.inputs == ["x"] and "y" in g.spec.outputs
    assert {"titans", "cms"} <= set(g.meta)
    assert tier_of(g)["titans.M_mem"] < tier_of(g)["cms.mlp0"]


@pytest.mark.parametrize("name", L.names("model"))
def test_language_models_map_tokens_to_logits(name: str) -> None:
    g = L.get(name, n_layers=1, d=32, heads=2)
    (tokens,) = g.spec.inputs
    assert tokens.kind == "tokens" and set(g.spec.outputs) == {"logits"}
    assert g.meta["d"] == 32 and g.meta["preset"] == "tiny"
    with pytest.raises(nl.SpecError, match="preset"):
        L.get(name, preset="huge")


def _walk(flow):
    from nlgraph.flows import walk

    return walk(flow)


def test_cms_with_one_level_takes_an_int():
    from nlgraph.library import get

    one = get("cms", d=8, chunks=8, hidden=16)
    same = get("cms", d=8, chunks=(8,), hidden=16)
    assert one.to_json() == same.to_json()
    assert list(one.levels) == ["mlp0"]
