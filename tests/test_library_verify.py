"""Every memory, block and model of the library: the chunked learner equals the reference.

Outputs, final states, and the gradient of every parameter and meta-learned initial state agree
to 1e-10 (max relative error, float64) at B in {1, 2} and T in {1, 8, 9, 16, 33}: sequences of
one token, of whole chunks and of ragged ones. Entries are built small (the keyword arguments
below, where a builder takes them), so a library entry added later is covered without a row.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from nlgraph.compiler import compile
from nlgraph.compiler.verify import compare, random_inputs
from nlgraph.library import entries

TOLERANCE = 1e-10
# Small sizes, for every builder that takes the argument. Chunks of 4 and 8 make T = 9, 16, 33
# cross several boundaries of every level; CMS rates are large enough for the updates to matter.
SMALL = dict(
    d=8, heads=2, width=8, hidden=16, vocab=11, n_layers=2, chunk=4, chunk_mem=8,
    cms_chunks=(4, 8), chunks=(4, 8), cms_lrs=0.05, lrs=0.05, window=4,
)  # fmt: skip
ENTRIES = [e for kind in ("memory", "block", "model") for e in entries(kind)]


def small(entry) -> dict:
    params = inspect.signature(entry.builder).parameters
    return {k: v for k, v in SMALL.items() if k in params}


def learners(entry):
    graph = entry.builder(**small(entry))
    torch.manual_seed(0)
    chosen = compile(graph, backend="chunk", dtype=torch.float64)
    reference = compile(graph, backend="reference", dtype=torch.float64)
    reference.load_state_dict(chosen.state_dict())
    return reference, chosen


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
def test_chunked_equals_reference(entry, monkeypatch):
    monkeypatch.delenv("NLGRAPH_BACKEND", raising=False)
    torch.set_num_threads(1)
    reference, chosen = learners(entry)
    for B in (1, 2):
        for T in (1, 8, 9, 16, 33):
            inputs = random_inputs(chosen, (B, T), {}, torch.float64, seed=B * 100 + T)
            result = compare(reference, chosen, inputs, seed=B * 100 + T)
            bad = {k: result.errors[k] for k in result.failures(TOLERANCE)}
            assert not bad, f"{entry.name} B={B} T={T}: {bad}"
            grads = [k for k in result.errors if k.startswith("grad ")]
            assert grads, f"{entry.name}: no parameter received a gradient"


def test_the_comparison_catches_a_dropped_path(monkeypatch):
    """The check can fail: a reference that cuts a CMS chunk at every token (the old cuts, which
    drop the paths between a piece's tokens) differs from the chunked hope model in its logits
    and its CMS parameters."""
    from nlgraph.compiler.lowerings import boundary

    monkeypatch.delenv("NLGRAPH_BACKEND", raising=False)
    torch.set_num_threads(1)
    entry = next(e for e in ENTRIES if e.name == "hope")
    reference, chosen = learners(entry)
    real = boundary.cut_points
    calls = {"n": 0}

    def cut_points(T, periods, phases, every_token):
        calls["n"] += 1
        # the reference runs first in compare(): cut its pieces at every token
        return real(T, periods, phases, every_token or calls["n"] <= 1)

    monkeypatch.setattr(boundary, "cut_points", cut_points)
    inputs = random_inputs(chosen, (2, 16), {}, torch.float64, seed=7)
    result = compare(reference, chosen, inputs, seed=7)
    bad = result.failures(TOLERANCE)
    assert "output logits" in bad and any(k.startswith("state ") and ".theta." in k for k in bad)
