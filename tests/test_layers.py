"""A compiled learner is a module of layers (``compiler.layers``): one ``nn.Module`` per layer of
levels (``"block0.attn.W_q"`` is in ``"block0"``), each running its part of the program.

Checked: every library LM has one layer per block holding exactly that block's parameters;
the cut is the same learner (outputs, state, gradients); modules shared across layers and
layers that cannot run as one call fall back to the top level; recomputing every layer in the
backward (``layer.checkpoint``) gives the same loss and gradients, in every meta mode."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import nlgraph as nl
from nlgraph.compiler import compile
from nlgraph.compiler.layers import level_of
from nlgraph.library import get

DT = torch.float64


def lm_loss(tokens: torch.Tensor):
    def loss_fn(out, start, end):
        logits = out["logits"][:, out["logits"].shape[1] - (end - start) :]
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, start:end].reshape(-1), reduction="sum"
        )

    return loss_fn


LMS = [
    ("transformer", {}),
    ("titans_lm", {}),
    ("hope", {}),
    ("hope", {"meta": "first_order", "cms_signal": "teach"}),
    ("hope", {"cms_signal": "teach"}),
    ("hope_attention", {}),
]


@pytest.mark.parametrize("name", ["transformer", "titans_lm", "hope", "hope_attention"])
def test_one_layer_per_block_holding_its_parameters(name):
    learner = compile(get(name))
    n_layers = len({lv.name.split(".")[0] for lv in learner.spec.levels if "." in lv.name})
    assert list(learner.layers) == [f"block{i}" for i in range(n_layers)]
    levels = [lv.name for lv in learner.spec.levels]
    for g, layer in learner.layers.items():
        owned = {level_of(f"layers.{g}.{n}", levels)[0] for n, _ in layer.named_parameters()}
        assert owned and all(lv.startswith(f"{g}.") for lv in owned)
    top = {level_of(f"top.{n}", levels)[0] for n, _ in learner.top.named_parameters()}
    assert top and all("." not in lv for lv in top)
    # the top-level program calls each layer once, in order
    calls = [ln for ln in learner.program.source.splitlines() if "self.layers[" in ln]
    assert calls == [f"    _layer = self.layers['block{i}']" for i in range(n_layers)]


def test_level_of_names_every_parameter():
    learner = compile(get("hope"))
    levels = {lv.name for lv in learner.spec.levels}
    for n, _ in learner.named_parameters():
        level, tensor = level_of(n, levels)
        assert level in levels and tensor, n


@pytest.mark.parametrize("name,kw", LMS, ids=lambda v: str(v))
def test_recompute_per_layer_gives_the_same_step(name, kw):
    torch.manual_seed(0)
    learner = compile(get(name, **kw), dtype=DT)
    tokens = torch.randint(0, 256, (2, 20))
    runs = []
    for recompute in (False, True):
        for layer in learner.layers.values():
            layer.checkpoint = recompute
        learner.zero_grad()
        out, state = learner(tokens, loss_fn=lm_loss(tokens))
        out["loss"].backward()
        grads = [p.grad for p in learner.parameters()]
        runs.append((out["loss"].detach(), out["logits"].detach(), grads))
    (l0, y0, g0), (l1, y1, g1) = runs
    assert torch.equal(l0, l1) and torch.equal(y0, y1)
    assert [g is None for g in g0] == [g is None for g in g1]
    assert any(g is not None for g in g0)
    for a, b in zip(g0, g1, strict=True):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _graph(order: str) -> nl.Graph:
    """Three slow levels in layers ``a``/``b``; ``order`` ``"aab"`` runs a, a, b (contiguous),
    ``"aba"`` interleaves them (``a`` cannot run as one call)."""
    g = nl.Graph(f"cut_{order}")
    x = g.input("x", dim=4)
    h = x
    for i, layer in enumerate(order):
        w = g.level(f"{layer}.W{i}", state=nl.linear(4, 4), frequency=nl.per_step(),
                    objective=nl.outer(), optimizer=nl.gd(lr=0.1))  # fmt: skip
        h = h + w(h)
    g.output("y", h)
    return g


@pytest.mark.parametrize("order,layers", [("aab", ["a", "b"]), ("aba", ["b"]), ("abab", [])])
def test_a_layer_that_cannot_run_as_one_call_runs_at_the_top(order, layers):
    learner = compile(_graph(order), dtype=DT)
    assert list(learner.layers) == layers
    x = torch.randn(2, 3, 4, dtype=DT)
    y = x
    for i, layer in enumerate(order):  # the same learner whatever the cut
        y = y + learner.slow[f"{layer}__W{i}"](y)
    torch.testing.assert_close(learner(x)[0]["y"], y, rtol=0, atol=0)


def test_a_module_read_from_two_layers_lives_at_the_top():
    g = nl.Graph("shared")
    x = g.input("x", dim=4)
    w = g.level("a.W", state=nl.linear(4, 4), frequency=nl.per_step(), objective=nl.outer(),
                optimizer=nl.gd(lr=0.1))  # fmt: skip
    v = g.level("b.V", state=nl.linear(4, 4), frequency=nl.per_step(), objective=nl.outer(),
                optimizer=nl.gd(lr=0.1))  # fmt: skip
    g.output("y", w(v(w(x))))
    learner = compile(g, dtype=DT)
    assert "a__W" in learner.top.slow and list(learner.layers) == ["b"]
    x = torch.randn(1, 2, 4, dtype=DT)
    W, V = learner.slow["a__W"], learner.slow["b__V"]
    torch.testing.assert_close(learner(x)[0]["y"], W(V(W(x))), rtol=0, atol=0)


def test_a_recomputed_layer_gives_freed_cpu_pages_back_before_it_runs(monkeypatch):
    import nlgraph.compiler.layers as layers

    calls = []
    monkeypatch.setattr(layers, "_TRIM", lambda pad: calls.append(pad))
    learner = compile(get("titans_lm"))
    tokens = torch.randint(0, 256, (1, 8))
    learner(tokens)[0]["logits"].sum().backward()
    assert calls == []  # nothing recomputed: nothing to give back
    for layer in learner.layers.values():
        layer.checkpoint = True
    learner(tokens)[0]["logits"].sum().backward()
    # each layer once in the forward and once more where the backward recomputes it
    assert calls == [0] * (2 * len(learner.layers))
